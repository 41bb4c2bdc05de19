"""What the feature heads' server and sites say to each other: the custom queries (and the
payload kind that answers each) and the checkpoint keys of the server's state;
:data:`QUERY_ACTIONS` lists the site actions (the registry names it)."""

from __future__ import annotations

from fedad.payloads import Query

FEATURE_MOMENTS = Query("feature_moments", "feature-moments")
"""Moments of the sites' normal patch features, for the global whitening (round 0)."""
NORMAL_MAP = Query("normal_map", "normal-map")
"""Mean anomaly map of the sites' normal images under the global head (the map baseline)."""
QUERY_ACTIONS = (FEATURE_MOMENTS.action, NORMAL_MAP.action)
"""The site actions of the feature heads besides Flower's ``train`` and ``evaluate``."""

SCORE_MOMENTS = "score-moments"
"""Audit kind of an ``evaluate`` reply: the sites' normal-score moments for calibration."""

WHITENING_MEAN = "whitening_mean"
WHITENING_MATRIX = "whitening_matrix"
"""Checkpoint keys of the global whitening (next to the head's arrays and ``map_baseline``)."""
