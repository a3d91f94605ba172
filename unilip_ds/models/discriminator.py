"""Patch discriminator (conv stack, GroupNorm, LeakyReLU; 16x16 logits) and the GAN loss
helpers: hinge losses and LeCam regularisation (Tseng et al. 2021)."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """stem conv -> [conv3x3, 2x avg-pool down, GroupNorm, LeakyReLU] per level ->
    adaptive max-pool to 16x16 -> 1x1 conv, LeakyReLU, 5x5 conv -> (B, 1, 16, 16) logits.
    The fixed 16x16 grid makes the logit count independent of resolution (224 / 256 / 448)."""

    def __init__(self, channels: int = 128, mults: Sequence[int] = (1, 2, 4, 4, 4), groups: int = 32,
                 logits_size: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.LeakyReLU(0.1))
        blocks, c = [], channels
        for m in mults:
            out = channels * m
            blocks.append(nn.Sequential(nn.Conv2d(c, out, 3, padding=1), nn.AvgPool2d(2),
                                        nn.GroupNorm(min(groups, out), out), nn.LeakyReLU(0.1)))
            c = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool2d(logits_size)
        self.to_logits = nn.Sequential(nn.Conv2d(c, c, 1), nn.LeakyReLU(0.1), nn.Conv2d(c, 1, 5, padding=2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> (B, 1, 16, 16) logits (fp32)."""
        dtype = self.stem[0].weight.dtype
        x = (images * 2 - 1).to(dtype)
        return self.to_logits(self.pool(self.blocks(self.stem(x)))).float()


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


class LeCamEMA(nn.Module):
    """EMAs of the mean real / fake logits (buffers, so they are checkpointed with the
    discriminator engine) and the LeCam regulariser built on them."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        self.real.mul_(self.decay).add_(real.float().mean() * (1 - self.decay))
        self.fake.mul_(self.decay).add_(fake.float().mean() * (1 - self.decay))

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return (F.relu(real.float() - self.fake.float()) ** 2).mean() + \
            (F.relu(self.real.float() - fake.float()) ** 2).mean()


class DiscriminatorLoss(nn.Module):
    """The "disc" engine's module. `forward(fake)` -> logits of `fake` (the generator's GAN
    term uses it with this module's params frozen); `forward(fake, real)` -> (loss, logs)
    with loss = hinge + lecam_weight * LeCam, all fp32."""

    def __init__(self, disc: PatchDiscriminator, lecam_weight: float = 0.001, lecam_decay: float = 0.999):
        super().__init__()
        self.disc = disc
        self.lecam = LeCamEMA(lecam_decay)
        self.lecam_weight = lecam_weight

    def forward(self, fake: torch.Tensor, real: torch.Tensor = None):
        if real is None:
            return self.disc(fake)
        logits_real = self.disc(real.detach())
        logits_fake = self.disc(fake.detach())
        hinge = hinge_d_loss(logits_real, logits_fake)
        lecam = self.lecam(logits_real, logits_fake)  # against the EMAs of past steps
        self.lecam.update(logits_real, logits_fake)
        loss = hinge + self.lecam_weight * lecam
        logs: Dict[str, torch.Tensor] = {
            "loss/disc": hinge.detach(), "loss/lecam": lecam.detach(),
            "disc/logits_real": logits_real.detach().mean(), "disc/logits_fake": logits_fake.detach().mean()}
        return loss, logs
