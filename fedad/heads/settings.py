"""Run-config settings of the feature heads (``method=memorybank|gmm|flow|padim``).

Defaults are fixed a priori from the papers: Gaussian smoothing of the upsampled map (NexViTAD
§3.2); locally aware features of an ImageNet backbone with a 3 x 3 neighbourhood (PatchCore's
defaults). The others were chosen on validation splits of synthetic anomalies, small and large,
on held-out training normals of the two real dev sets (MPDD metal_plate, KolektorSDD;
bench/heads_validation.py, BENCHMARKS.md "Feature heads on real images"), never on test images:
Lite0's stride-2, 4 and 16 levels at the image's own size (feature-layers 0,1,3, feature-scales
1) scored level with the stride-4, 8, 16 levels of the image enlarged 2x (1,2,3 at 2: better on
MPDD, worse on KolektorSDD, the same on average, for the memory bank and padim) at a quarter of
the backbone work; no per-image photometric normalisation (grey-world was worse on MPDD and
mixed on KolektorSDD), K = 300 prototypes (1000 no better). Whitening, the reflect padding, the
map baseline (no effect either way on the real validation splits) and sigma = 2 come from the
synthetic validation of earlier versions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from fedad.heads.features import PHOTOMETRIC
from fedad.models.anomaly_map import MapSettings
from fedad.models.backbones import WEIGHT_SOURCES

Number = TypeVar("Number", int, float)
CLUSTERINGS = ("sinkhorn", "kmeans", "coreset")
IMAGE_SCORES = ("max", "topk")
COVARIANCES = ("full", "diag")
GAUSSIAN_POSITIONS = ("per-position", "shared")


@dataclass(frozen=True)
class HeadSettings(MapSettings):
    """Feature extraction, head and scoring settings (kebab-case run-config keys)."""

    feature_source: str = "lite0"
    """Feature backbone: lite0, lite1, lite2, any timm name, msvt or nexvitad."""
    feature_layers: str = "0,1,3"
    """timm out_indices, Lite0 strides 2/4/16 (msvt: its stages; DINOv2: its blocks)."""
    feature_neighbourhood: int = 3
    """Side of the patch neighbourhood averaged into each feature."""
    feature_padding: int = 32
    """Reflect padding of the image, pixels (fedad.heads.features)."""
    feature_scales: str = "1"
    """Image resize factors seen by the backbone, e.g. "1,2"."""
    feature_photometric: str = "none"
    """Per-image photometric normalisation (fedad.heads.features)."""
    feature_centring: bool = False
    """Subtract each image's mean patch feature (fedad.heads.features)."""
    feature_pretrained: str = "packaged"
    """Backbone weights: packaged (offline), hub (timm's download), file, none (random)."""
    feature_checkpoint: str = ""
    """With feature-pretrained=file: timm state dict, DINOv2 ONNX or MSVT checkpoint."""
    feature_whitening: bool = True
    """Federated whitening of patch features (fedad.heads.whitening)."""
    max_patches: int = 20000
    """Patches per site used to fit a head (seeded subsample)."""
    bank_clustering: str = "sinkhorn"
    """How the memory bank is reduced to prototypes: sinkhorn, kmeans or coreset."""
    num_prototypes: int = 300
    """Memory-bank prototypes K (NexViTAD: 30; chosen on a validation split)."""
    sinkhorn_epsilon: float = 0.05
    """Sinkhorn entropy, relative to the median cost gap (relative_cost)."""
    gmm_components: int = 5
    """Components of the Gaussian mixture head."""
    gmm_covariance: str = "full"
    """Covariance of the Gaussian mixture: full or diag."""
    gaussian_positions: str = "per-position"
    """padim: a Gaussian per cell of gaussian-grid (PaDiM) or one shared by all patches."""
    gaussian_grid: int = 16
    """padim per-position: cells per side; each cell's patches share a Gaussian."""
    gaussian_channels: int = 100
    """padim: seeded random feature channels the Gaussians keep (PaDiM's d)."""
    flow_blocks: int = 4
    """Coupling blocks of the normalising-flow head."""
    flow_hidden: int = 256
    """Hidden units of each coupling block."""
    flow_epochs: int = 10
    """Training epochs of the flow head."""
    flow_lr: float = 1e-3
    """Learning rate of the flow head."""
    map_baseline: bool = True
    """Subtract the normal maps' border artefact (fedad.heads.scoring)."""
    image_score: str = "max"
    """Image score from the map: max or topk (mean of the top pixels)."""
    topk_fraction: float = 0.01
    """Share of the map's pixels averaged by image-score=topk."""
    target_category: str = ""
    """by-category: evaluate on it, fit on the other categories only."""
    target_normals: bool = False
    """With target-category: fit on its own normal images instead (NexViTAD's bank)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "feature-photometric": (self.feature_photometric in PHOTOMETRIC,
                                    f"one of {PHOTOMETRIC}"),
            "feature-pretrained": (self.feature_pretrained in WEIGHT_SOURCES,
                                   f"one of {WEIGHT_SOURCES}"),
            "bank-clustering": (self.bank_clustering in CLUSTERINGS, f"one of {CLUSTERINGS}"),
            "image-score": (self.image_score in IMAGE_SCORES, f"one of {IMAGE_SCORES}"),
            "gmm-covariance": (self.gmm_covariance in COVARIANCES, f"one of {COVARIANCES}"),
            "gaussian-positions": (self.gaussian_positions in GAUSSIAN_POSITIONS,
                                   f"one of {GAUSSIAN_POSITIONS}"),
            "gaussian-grid": (self.gaussian_grid >= 1, ">= 1"),
            "gaussian-channels": (self.gaussian_channels >= 1, ">= 1"),
            "num-prototypes": (self.num_prototypes >= 1, ">= 1"),
            "gmm-components": (self.gmm_components >= 1, ">= 1"),
            "max-patches": (self.max_patches >= 1, ">= 1"),
            "feature-padding": (self.feature_padding >= 0, ">= 0"),
            "flow-blocks": (self.flow_blocks >= 1, ">= 1"),
            "flow-hidden": (self.flow_hidden >= 1, ">= 1"),
            "flow-epochs": (self.flow_epochs >= 1, ">= 1"),
            "flow-lr": (self.flow_lr > 0, "> 0"),
            "sinkhorn-epsilon": (self.sinkhorn_epsilon > 0, "> 0"),
            "topk-fraction": (0 < self.topk_fraction <= 1, "in (0, 1]"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                value = getattr(self, key.replace("-", "_"))
                raise ValueError(f"{key}={value!r}: must be {expected}")
        if (self.feature_pretrained == "file") != bool(self.feature_checkpoint):
            raise ValueError(f"feature-checkpoint={self.feature_checkpoint!r} with "
                             f"feature-pretrained={self.feature_pretrained!r}: a checkpoint file "
                             "is read with (and only with) feature-pretrained=file")
        self.layers()
        self.scales()

    def layers(self) -> tuple[int, ...]:
        """feature-layers as integers."""
        return _numbers("feature-layers", self.feature_layers, int, "'2,3'")

    def scales(self) -> tuple[float, ...]:
        """feature-scales as positive floats."""
        scales = _numbers("feature-scales", self.feature_scales, float, "'1' or '1,2'")
        if min(scales) <= 0:
            raise ValueError(f"feature-scales={self.feature_scales!r}: must be > 0")
        return scales


def _numbers(key: str, text: str, kind: Callable[[str], Number], example: str
             ) -> tuple[Number, ...]:
    """A comma-separated list of non-negative numbers; ValueError naming ``key``."""
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise ValueError(f"{key}={text!r}: expected e.g. {example}") from err
    if not values or min(values) < 0:
        raise ValueError(f"{key}={text!r}: expected e.g. {example}")
    return values
