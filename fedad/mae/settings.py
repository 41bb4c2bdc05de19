"""Run-config settings of the masked autoencoder (method ``mae``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedad.mae.scoring import ERRORS
from fedad.models.dyt import NORM_LAYERS


@dataclass(frozen=True)
class MAESettings:
    """Run-config keys of ``method=mae`` (kebab-case twins of these fields)."""

    mae_patch_size: int = 8
    """Side of the square patches, pixels (divides image-size)."""
    mae_embed_dim: int = 192
    """Encoder embedding dimension."""
    mae_depth: int = 6
    """Encoder transformer blocks."""
    mae_heads: int = 3
    """Encoder attention heads."""
    mae_decoder_dim: int = 96
    """Decoder embedding dimension."""
    mae_decoder_depth: int = 2
    """Decoder transformer blocks."""
    mae_decoder_heads: int = 3
    """Decoder attention heads."""
    mae_norm: str = "dyt"
    """Normalisation layer: dyt (Dynamic Tanh) or layernorm."""
    mae_mask_ratio: float = 0.75
    """Share of patches masked in training, in [0, 1)."""
    mae_pretrain_rounds: int = 3
    """Rounds of pre-training with the SSIM term; fine-tuning after (MSE only)."""
    mae_ssim_weight: float = 0.5
    """Weight of 1 - SSIM beside the MSE in pre-training."""
    mae_holdout_fraction: float = 0.2
    """Share of a site's normal images held out to set the thresholds."""
    mae_threshold_quantile: float = 0.99
    """Quantile of held-out normal errors the decision threshold is set at."""
    mae_inference_passes: int = 4
    """Complementary masked passes at inference, each patch rebuilt from context (0: the seed's)."""
    mae_error: str = "feature"
    """What the map measures: feature (Lite0 cosine distance) or pixel (the seed's)."""

    def __post_init__(self) -> None:
        if self.mae_norm not in NORM_LAYERS:
            raise ValueError(f"mae-norm={self.mae_norm!r}: expected one of "
                             f"{', '.join(NORM_LAYERS)}")
        if self.mae_error not in ERRORS:
            raise ValueError(f"mae-error={self.mae_error!r}: expected one of {', '.join(ERRORS)}")
        if self.mae_inference_passes == 1 or self.mae_inference_passes < 0:
            raise ValueError(f"mae-inference-passes={self.mae_inference_passes}: must be 0 or "
                             ">= 2")
        if not 0.0 <= self.mae_mask_ratio < 1.0:
            raise ValueError(f"mae-mask-ratio={self.mae_mask_ratio}: must be in [0, 1)")
        if self.mae_pretrain_rounds < 0:
            raise ValueError(f"mae-pretrain-rounds={self.mae_pretrain_rounds}: must be >= 0")
        if self.mae_ssim_weight < 0:
            raise ValueError(f"mae-ssim-weight={self.mae_ssim_weight}: must be >= 0")
        if not 0.0 < self.mae_holdout_fraction < 1.0:
            raise ValueError(f"mae-holdout-fraction={self.mae_holdout_fraction}: must be in "
                             "(0, 1)")
        if not 0.5 <= self.mae_threshold_quantile <= 1.0:
            raise ValueError(f"mae-threshold-quantile={self.mae_threshold_quantile}: must be "
                             "in [0.5, 1]")
        for name in ("patch_size", "embed_dim", "depth", "heads", "decoder_dim",
                     "decoder_depth", "decoder_heads"):
            if getattr(self, f"mae_{name}") < 1:
                raise ValueError(f"mae-{name.replace('_', '-')}={getattr(self, f'mae_{name}')}:"
                                 " must be >= 1")
