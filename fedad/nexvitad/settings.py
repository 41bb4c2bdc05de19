"""Run-config settings of ``method=nexvitad`` (kebab-case keys ``nexvitad-*``).

The paper's values where it gives them (θ = 0.7, r = d / 4, decoder channels 256/128/64,
DINOv2 ViT-S/14's final block); CPU-sized where it does not fit here: the packaged
EfficientNet-Lite0 levels of strides 4-32 stand in for Hiera, DINOv2 sees the image at 112 px
(8 x 8 tokens) and one pre-training round stands in for the paper's T epochs. The target
category is the feature heads' ``target-category`` (its images train unlabelled; the memory
bank of §3.2 is built from its normal images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedad.heads.settings import _numbers
from fedad.models.backbones import PACKAGED, WEIGHT_SOURCES
from fedad.models.dinov2 import DEPTH, PATCH


@dataclass(frozen=True)
class NexViTADSettings:
    """Encoder, decoder, pseudo-labelling and loss settings of NexViTAD."""

    nexvitad_encoder: str = "lite0"
    """Frozen multi-scale encoder: lite0/lite1/lite2 (packaged) or a timm name (Hiera)."""
    nexvitad_encoder_checkpoint: str = ""
    """Local state dict of a timm nexvitad-encoder (needed unless packaged; never downloaded)."""
    nexvitad_levels: str = "1,2,3,4"
    """Encoder levels (timm out_indices, strides doubling; lite0: strides 4-32)."""
    nexvitad_dino: str = "packaged"
    """DINOv2 ViT-S/14 weights: packaged (offline), file, hub or none (random)."""
    nexvitad_dino_checkpoint: str = ""
    """With nexvitad-dino=file: the DINOv2 ONNX file."""
    nexvitad_dino_block: int = 11
    """DINOv2 block whose patch tokens are projected (0-11; 11: the final one)."""
    nexvitad_dino_size: int = 112
    """Side (px, multiple of 14) DINOv2 sees the image at."""
    nexvitad_decoder_channels: str = "256,128,64"
    """Channels of each segmentation head's up-steps (one fewer than the levels)."""
    nexvitad_theta: float = 0.7
    """Pseudo-label confidence: pixels with max softmax > theta are labelled (eq. 6)."""
    nexvitad_lambda_s: float = 1.0
    """Weight of the source segmentation loss."""
    nexvitad_lambda_t: float = 0.5
    """Weight of the target losses (pseudo-label CE and consistency MSE, eqs. 7-8)."""
    nexvitad_pretrain_rounds: int = 1
    """Rounds of pre-training (T) before joint training with refreshed pseudo-labels."""
    nexvitad_pseudo_labels: bool = True
    """Train the target head on pseudo-labels (false: the ablation without them)."""
    nexvitad_mtl: bool = True
    """One segmentation head per source category (false: one shared source head)."""
    nexvitad_synthetic_per_image: int = 1
    """Synthetic anomalous copies of each source normal training image (cached)."""
    nexvitad_bank_levels: str = "0,1,2"
    """Encoder scales (indices into nexvitad-levels) whose features fill the memory bank."""

    def __post_init__(self) -> None:
        checks = {
            "nexvitad-dino": (self.nexvitad_dino in WEIGHT_SOURCES, f"one of {WEIGHT_SOURCES}"),
            "nexvitad-dino-block": (0 <= self.nexvitad_dino_block < DEPTH, f"in 0-{DEPTH - 1}"),
            "nexvitad-dino-size": (self.nexvitad_dino_size >= PATCH
                                   and self.nexvitad_dino_size % PATCH == 0,
                                   f"a positive multiple of {PATCH}"),
            "nexvitad-theta": (0.5 <= self.nexvitad_theta < 1, "in [0.5, 1)"),
            "nexvitad-lambda-s": (self.nexvitad_lambda_s >= 0, ">= 0"),
            "nexvitad-lambda-t": (self.nexvitad_lambda_t >= 0, ">= 0"),
            "nexvitad-pretrain-rounds": (self.nexvitad_pretrain_rounds >= 0, ">= 0"),
            "nexvitad-synthetic-per-image": (self.nexvitad_synthetic_per_image >= 0, ">= 0"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"{key}={getattr(self, key.replace('-', '_'))!r}: must be "
                                 f"{expected}")
        levels = self.levels()
        if len(levels) < 2 or len(set(levels)) != len(levels):
            raise ValueError(f"nexvitad-levels={self.nexvitad_levels!r}: expected at least two "
                             "distinct levels, e.g. '1,2,3,4'")
        if len(self.decoder_channels()) != len(levels) - 1:
            raise ValueError(f"nexvitad-decoder-channels={self.nexvitad_decoder_channels!r}: "
                             f"expected {len(levels) - 1} values (one per up-step of "
                             f"nexvitad-levels={self.nexvitad_levels!r})")
        if not set(self.bank_levels()) <= set(range(len(levels))):
            raise ValueError(f"nexvitad-bank-levels={self.nexvitad_bank_levels!r}: expected "
                             f"indices in 0-{len(levels) - 1} of nexvitad-levels")
        for key, path in (("nexvitad-encoder-checkpoint", self.nexvitad_encoder_checkpoint),
                          ("nexvitad-dino-checkpoint", self.nexvitad_dino_checkpoint)):
            if path and not Path(path).expanduser().is_file():
                raise ValueError(f"{key}={path!r}: no such file")
        if self.nexvitad_encoder not in PACKAGED and not self.nexvitad_encoder_checkpoint:
            raise ValueError(f"nexvitad-encoder={self.nexvitad_encoder!r}: not packaged; give "
                             "its local weights in nexvitad-encoder-checkpoint (never downloaded)")
        if (self.nexvitad_dino == "file") != bool(self.nexvitad_dino_checkpoint):
            raise ValueError(f"nexvitad-dino-checkpoint={self.nexvitad_dino_checkpoint!r} with "
                             f"nexvitad-dino={self.nexvitad_dino!r}: a file goes with (and only "
                             "with) nexvitad-dino=file")

    def levels(self) -> tuple[int, ...]:
        """nexvitad-levels as integers."""
        return _numbers("nexvitad-levels", self.nexvitad_levels, int, "'1,2,3,4'")

    def decoder_channels(self) -> tuple[int, ...]:
        """nexvitad-decoder-channels as positive integers."""
        channels = _numbers("nexvitad-decoder-channels", self.nexvitad_decoder_channels, int,
                            "'256,128,64'")
        if min(channels) < 1:
            raise ValueError(f"nexvitad-decoder-channels={self.nexvitad_decoder_channels!r}: "
                             "must be >= 1")
        return channels

    def bank_levels(self) -> tuple[int, ...]:
        """nexvitad-bank-levels as integers."""
        return _numbers("nexvitad-bank-levels", self.nexvitad_bank_levels, int, "'0,1,2'")

