"""The run-config of the tests' tiny one-round runs (32 px, one batch) and each method's tiny
settings, shared by the tests that run a method end to end and then score, export or
threshold its result."""

TINY_RUN = {"image-size": 32, "num-server-rounds": 1, "plot-every-round": False,
            "val-fraction": 0.0, "local-epochs": 1, "max-train-batches": 1, "batch-size": 4}
TINY_HEADS = {"max-patches": 2000, "feature-scales": "1", "feature-padding": 0}
TINY_METHODS = {
    "memorybank": {**TINY_HEADS, "method": "memorybank", "num-prototypes": 8,
                   "bank-clustering": "kmeans"},
    "gmm": {**TINY_HEADS, "method": "gmm", "gmm-components": 2, "gmm-covariance": "diag"},
    "flow": {**TINY_HEADS, "method": "flow", "flow-blocks": 2, "flow-hidden": 32,
             "flow-epochs": 1},
    "padim": {**TINY_HEADS, "method": "padim", "gaussian-grid": 4, "gaussian-channels": 8},
    "msvt": {"method": "msvt", "backbone": "none"},
    "mae": {"method": "mae", "mae-patch-size": 8, "mae-embed-dim": 32, "mae-depth": 1,
            "mae-heads": 2, "mae-decoder-dim": 16, "mae-decoder-depth": 1,
            "mae-decoder-heads": 2, "mae-pretrain-rounds": 1},
    "dadda": {"method": "dadda", "dadda-synthesis": "dam-only", "dadda-dam-per-class": 1,
              "dadda-localizer-channels": 8, "dam-quality-tries": 2},
}
