"""PSNR and SSIM of (B, C, H, W) images in [0, 1], per image.

- `psnr`: data range 1.0, as scikit-image's `peak_signal_noise_ratio` infers it for float
  images in [0, 1] (and as the reference evaluator gets it).
- `ssim`: Wang et al. 2004, data range 1.0, as skimage computes it with
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False: an 11x11 Gaussian window,
  valid region only, mean over channels.
- `ssim_ref`: the reference evaluator's convention, kept only so numbers compare with the
  paper's table: skimage's default uniform 7x7 window with sample covariance and
  data_range=2.0 on [0, 1] images. The doubled data range quadruples SSIM's stabilising
  constants C1, C2, which inflates the score (most in flat, dark regions); `ssim` is the
  correct figure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR (dB)."""
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))).float()


def _gaussian(sigma: float, radius: int, device) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _ssim(x: torch.Tensor, y: torch.Tensor, taps: torch.Tensor, data_range: float,
          cov_norm: float) -> torch.Tensor:
    x, y = x.double(), y.double()
    c = x.shape[1]
    kx = taps.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = taps.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def blur(t):  # separable, valid region only
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    mx, my = blur(x), blur(y)
    vx = cov_norm * (blur(x * x) - mx * mx)
    vy = cov_norm * (blur(y * y) - my * my)
    cov = cov_norm * (blur(x * y) - mx * my)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM, Gaussian window (skimage gaussian_weights=True, truncate 3.5)."""
    radius = int(3.5 * sigma + 0.5)  # 11 taps at sigma 1.5
    return _ssim(x, y, _gaussian(sigma, radius, x.device), data_range, 1.0)


def ssim_ref(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win_size: int = 7) -> torch.Tensor:
    """Per-image SSIM as the reference evaluator computes it: skimage defaults (uniform
    win_size x win_size window, sample covariance) with data_range=2.0."""
    n = win_size * win_size
    taps = torch.full((win_size,), 1.0 / win_size, dtype=torch.float64, device=x.device)
    return _ssim(x, y, taps, data_range, n / (n - 1.0))


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 256 levels of an 8-bit image (as the reference does
    before every metric); returns float images in [0, 1]."""
    return torch.round(images.float().clamp(0, 1) * 255.0) / 255.0
