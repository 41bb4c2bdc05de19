"""Structural similarity (Wang et al. 2004) as a differentiable torch loss term.

Gaussian-weighted local statistics (sigma 1.5, kernel truncated at 3.5 sigma: 11 taps),
population covariances, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L the data range, averaged over
the pixels whose window lies inside the image and over channels. This is scikit-image's
``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=L, channel_axis=...)``, which crops the same border before averaging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy.ndimage.gaussian_filter's default, as scikit-image uses it


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """Normalized 1D Gaussian taps [2r + 1] with r = int(truncate * sigma + 0.5) (scipy's)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Mean SSIM of each image pair.

    Args:
        x, y: [B, C, H, W] images, H and W at least the window size (11 for sigma 1.5).
        data_range: L, the value range of the images (1 for images in [0, 1]).
    Returns:
        [B] mean SSIM per image (1 for identical images).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two [B, C, H, W] of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    taps = gaussian_window(sigma).to(x)
    size = len(taps)
    if min(x.shape[-2:]) < size:
        raise ValueError(f"ssim: images {tuple(x.shape[-2:])} smaller than the {size}-px window")
    channels = x.shape[1]
    rows = taps.view(1, 1, size, 1).expand(channels, 1, size, 1)
    cols = taps.view(1, 1, 1, size).expand(channels, 1, 1, size)

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x ** 2
    var_y = local_mean(y * y) - mu_y ** 2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)
