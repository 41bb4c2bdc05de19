"""What crosses between the server and the sites of the one-model workflow, besides the arrays.

Fed-MSVT's strategies (Adaptive Client Aggregation, strategies/aca.py; Contrastive Feature
Alignment, strategies/cfa.py) ask for statistics in the round's training config and read them
from the replies' metrics; the sites (clients/model.py, also used by ``mae``) answer. Both sides
use these names.
"""

# Training-config keys (server -> site).
SERVER_ROUND = "server-round"
"""The round number (set by Flower's strategies)."""
PROXIMAL_MU = "proximal-mu"
"""FedProx's mu (set by Flower's FedProx); 0 or absent: no proximal term."""
REPORT_VALIDATION = "report-validation"
"""True: reply the validation metrics of the locally trained model (ACA's q_i)."""
SEND_PROTOTYPE = "send-prototype"
"""True: reply the site's normal-feature prototype (ACA's d_i, CFA's anchors)."""
CFA_WEIGHT = "cfa-weight"
"""CFA's lambda; 0 or absent: no alignment term."""
CFA_TAU = "cfa-tau"
"""CFA's InfoNCE temperature."""
CFA_ANCHORS = "cfa-anchors"
"""The sites' prototypes [C, D], flattened (absent before any site has sent one)."""
CFA_ANCHOR_DIM = "cfa-anchor-dim"
"""D, to unflatten :data:`CFA_ANCHORS`."""
CFA_ANCHOR_PARTITIONS = "cfa-anchor-partitions"
"""The partition [C] of each anchor (a site leaves out its own)."""

# Reply metrics (site -> server).
VAL_PIXEL_ACCURACY = "val_pixel_accuracy"
"""Pixel accuracy at threshold 0.5 on the site's validation split (ACA's q_i, Fed-MSVT eq. 4)."""
VAL_IMAGE_ACCURACY = "val_image_accuracy"
"""Image accuracy at threshold 0.5 on the site's validation split."""
VAL_PIXEL_AUROC = "val_pixel_auroc"
"""Pixel AUROC on the site's validation split (UNDEFINED without normal and defect pixels)."""
VAL_PIXEL_AP = "val_pixel_ap"
"""Pixel average precision on the site's validation split (UNDEFINED as above)."""
VAL_IMAGE_AUROC = "val_image_auroc"
"""Image AUROC on the site's validation split (UNDEFINED without normal and defective images)."""
VALIDATION_METRICS = (VAL_PIXEL_ACCURACY, VAL_PIXEL_AUROC, VAL_PIXEL_AP, VAL_IMAGE_AUROC)
"""What a site reports on its validation split; ACA's q_i is one of them (aca-quality-metric)."""
UNDEFINED = -1.0
"""The value of a validation metric the split cannot define (every reply has the same keys)."""
PROTOTYPE = "prototype"
"""The site's normal-feature prototype [D], a list of floats."""
PARTITION = "partition"
"""The site's partition id, sent with its statistics."""
