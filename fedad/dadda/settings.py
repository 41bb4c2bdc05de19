"""D-ADDA stage 2-3 settings (run-config keys ``dadda-*``): ``cfg.section(DADDASettings)``.

Defaults are the CPU default: one category's stages in about 15 minutes on two cores (diffusion
at 32 x 32, a 3-level U-Net with 32 base channels (0.95 M parameters), 200 diffusion steps, 2000
training iterations per stage-2 model (at 300, G^I's samples were still noise) and 200
fine-tuning iterations per site in batches of 8,
DDIM with 25 steps, 16 DAM and 16 diffusion pairs per defect class). The paper's scale
(128 x 128, 1000 steps, 30 000 iterations, 5000 warm-up, lr 1e-4, 500 pairs per defect) is
``configs/dadda_paper.yaml``, meant for a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm

from fedad.models.backbones import PACKAGED

SYNTHESIS = ("dadda", "dam-only")
SAMPLERS = ("ddim", "ddpm")
CLASSIFIER_INPUTS = ("windows", "image")


@dataclass(frozen=True)
class DADDASettings:
    """Settings of D-ADDA's generative stages and detector; key = field name in kebab case."""

    dadda_synthesis: str = "dadda"
    """dadda: diffusion pairs; dam-only: DAM pairs only (Table II)."""
    dadda_diffusion_size: int = 32
    """Side of the diffusion models' images (paper 128)."""
    dadda_unet_channels: int = 32
    """U-Net base channels."""
    dadda_unet_levels: int = 3
    """U-Net resolution levels; channels x (1, 2, 2, 2, ...)."""
    dadda_attention_heads: int = 4
    """Attention heads of the U-Net (paper 4)."""
    dadda_head_dim: int = 32
    """Attention head dimension d_h (paper 32)."""
    dadda_diffusion_steps: int = 200
    """Diffusion training timesteps T (paper 1000)."""
    dadda_train_iterations: int = 2000
    """Stage-2 training iterations per model (paper 30 000)."""
    dadda_finetune_iterations: int = 200
    """Stage-3 fine-tuning iterations of G^I on each site."""
    dadda_warmup: int = 50
    """Linear learning-rate warm-up iterations (paper 5000)."""
    dadda_diffusion_lr: float = 5e-4
    """Adam learning rate of the diffusion models (paper 1e-4)."""
    dadda_diffusion_batch: int = 8
    """Batch size of diffusion training."""
    dadda_ema: float = 0.995
    """EMA decay of the diffusion weights (paper)."""
    dadda_class_dropout: float = 0.1
    """Classifier-free guidance: share of training labels dropped."""
    dadda_guidance: float = 2.0
    """Classifier-free guidance scale w (1: conditional only)."""
    dadda_sampler: str = "ddim"
    """Sampler: ddim (fast) or ddpm (ancestral, all T steps)."""
    dadda_sample_steps: int = 25
    """DDIM sampling steps."""
    dadda_dam_per_class: int = 16
    """DAM pairs per defect class on each site (paper 500)."""
    dadda_synth_per_class: int = 16
    """Diffusion pairs per defect class on each site (paper 500)."""
    dadda_classifier: str = "resnet10t"
    """Classifier: a timm name (from scratch) or lite0/1/2 (pre-trained)."""
    dadda_classifier_input: str = "windows"
    """windows (plus a no-defect class) or image (paper)."""
    dadda_window_fraction: float = 0.25
    """Side of a classifier window over the side of the image."""
    dadda_window_stride: float = 0.125
    """Distance of scanned windows over the side of the image."""
    dadda_classifier_lr: float = 3e-4
    """AdamW learning rate of the classifier (the localizer's is lr)."""
    dadda_localizer_channels: int = 16
    """Base channels of the U-Net localizer."""
    dadda_cache_dir: str = ""
    """Site cache of synthetic pairs; empty: ~/.cache/fedad/dadda."""
    dadda_reuse_cache: bool = True
    """Skip stages 1-3 when every site holds pairs for them."""

    def __post_init__(self) -> None:
        if self.dadda_synthesis not in SYNTHESIS:
            raise ValueError(f"dadda-synthesis={self.dadda_synthesis!r}: expected one of "
                             f"{', '.join(SYNTHESIS)}")
        if self.dadda_classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(f"dadda-classifier-input={self.dadda_classifier_input!r}: expected "
                             f"one of {', '.join(CLASSIFIER_INPUTS)}")
        for name in ("dadda_window_fraction", "dadda_window_stride"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)}: must be in "
                                 "(0, 1]")
        if self.dadda_sampler not in SAMPLERS:
            raise ValueError(f"dadda-sampler={self.dadda_sampler!r}: expected one of "
                             f"{', '.join(SAMPLERS)}")
        factor = 2 ** (self.dadda_unet_levels - 1)
        if self.dadda_unet_levels < 1 or self.dadda_diffusion_size % max(factor, 8):
            raise ValueError(f"dadda-diffusion-size={self.dadda_diffusion_size}: must be a "
                             f"multiple of max(8, 2^(dadda-unet-levels - 1) = {factor})")
        positive = ("dadda_unet_channels", "dadda_attention_heads", "dadda_head_dim",
                    "dadda_diffusion_steps", "dadda_train_iterations", "dadda_diffusion_batch",
                    "dadda_sample_steps", "dadda_localizer_channels")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")
        for name in ("dadda_finetune_iterations", "dadda_warmup", "dadda_dam_per_class",
                     "dadda_synth_per_class"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)}: must be >= 0")
        if self.dadda_sample_steps > self.dadda_diffusion_steps:
            raise ValueError(f"dadda-sample-steps={self.dadda_sample_steps}: must be <= "
                             f"dadda-diffusion-steps={self.dadda_diffusion_steps}")
        if not 0.0 < self.dadda_ema < 1.0:
            raise ValueError(f"dadda-ema={self.dadda_ema}: must be in (0, 1)")
        if not 0.0 <= self.dadda_class_dropout < 1.0:
            raise ValueError(f"dadda-class-dropout={self.dadda_class_dropout}: must be in [0, 1)")
        for name in ("dadda_diffusion_lr", "dadda_classifier_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)}: must be > 0")
        if self.dadda_classifier not in PACKAGED and not timm.is_model(self.dadda_classifier):
            raise ValueError(f"dadda-classifier={self.dadda_classifier!r}: neither a packaged "
                             f"backbone ({', '.join(PACKAGED)}) nor a timm architecture "
                             "(timm.list_models() names them)")

    @property
    def channel_mults(self) -> tuple[int, ...]:
        """U-Net channel multipliers: (1, 2, 2, ...) over ``dadda-unet-levels`` levels."""
        return (1, *(2,) * (self.dadda_unet_levels - 1))

    def unet_kwargs(self, in_channels: int, num_classes: int = 0,
                    mask_conditioning: bool = False) -> dict:
        """Constructor arguments of :class:`fedad.models.diffusion_unet.DiffusionUNet`."""
        return {"in_channels": in_channels, "image_size": self.dadda_diffusion_size,
                "base_channels": self.dadda_unet_channels, "channel_mults": self.channel_mults,
                "heads": self.dadda_attention_heads, "head_dim": self.dadda_head_dim,
                "num_classes": num_classes, "mask_conditioning": mask_conditioning}
