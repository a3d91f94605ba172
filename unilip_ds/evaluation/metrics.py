"""PSNR and SSIM on images in [0, 1] (data_range = 1.0; the reference evaluator passes 2.0
for [0, 1] images, which inflates SSIM).

SSIM follows Wang et al. 2004 as skimage computes it with gaussian_weights=True, sigma=1.5,
use_sample_covariance=False: an 11x11 Gaussian window, valid region only, mean over channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR (dB) of (B, C, H, W) tensors."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-12))


def _gaussian(sigma: float, radius: int, device) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) tensors."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    radius = int(3.5 * sigma + 0.5)  # skimage: truncate=3.5 -> 11 taps at sigma 1.5
    g = _gaussian(sigma, radius, x.device)
    kx = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()
