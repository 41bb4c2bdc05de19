"""Losses of the supervised anomaly-segmentation models."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017), mean over all elements.

    Args:
        logits: any shape, raw scores.
        targets: same shape, in {0, 1}.
    Returns:
        scalar tensor.
    """
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = torch.exp(-bce)
    return ((1 - p_t) ** gamma * bce).mean()


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the batch (maps with no defect contribute only through false positives).

    Args:
        logits: [B, 1, H, W] raw scores.
        targets: [B, 1, H, W] in {0, 1}.
    Returns:
        scalar tensor.
    """
    probs = torch.sigmoid(logits)
    inter = (probs * targets).sum()
    return 1 - (2 * inter + eps) / (probs.sum() + targets.sum() + eps)
