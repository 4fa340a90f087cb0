"""Gaussian smoothing of anomaly maps in torch, matching scipy.ndimage.gaussian_filter.

scipy's defaults are reproduced: kernel radius = int(truncate * sigma + 0.5) with truncate 4 and
'reflect' borders (the edge pixel is repeated: d c b a | a b c d | d c b a).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised float64 1-D Gaussian of radius int(truncate * sigma + 0.5), as scipy builds it."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _reflect_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """scipy 'reflect' (symmetric) padding along dim; repeats the reflection for pads wider than x."""
    size = x.shape[dim]
    idx = torch.arange(-pad, size + pad, device=x.device)
    period = 2 * size
    idx = torch.remainder(idx, period)
    idx = torch.where(idx >= size, period - 1 - idx, idx)
    return x.index_select(dim, idx)


class GaussianSmoothing(nn.Module):
    """Separable Gaussian blur of [N, H, W] maps on their own device; sigma 0 is the identity."""

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0) -> None:
        super().__init__()
        if sigma < 0 or not math.isfinite(sigma):
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)
        kernel = gaussian_kernel1d(sigma, truncate).float() if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.sigma == 0:
            return maps
        n, h, w = maps.shape
        kernel = self.kernel.to(maps.dtype)
        radius = (kernel.numel() - 1) // 2
        x = maps[:, None]  # [N, 1, H, W]
        x = _reflect_pad(x, radius, dim=2)
        x = F.conv2d(x, kernel.view(1, 1, -1, 1))  # blur along H
        x = _reflect_pad(x, radius, dim=3)
        x = F.conv2d(x, kernel.view(1, 1, 1, -1))  # blur along W
        return x[:, 0]
