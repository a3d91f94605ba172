"""The reference's patch discriminator (taming / MaskGIT "N-layer" style, as in the UniLIP
tokenizer code) and the GAN losses: hinge (with its 0.5 factor) and LeCam regularisation
(Tseng et al. 2021) on the batch-mean logits.

Module names follow the reference (`block_in`, `blocks.N`, `to_logits`), so its
discriminator weights load (its blur kernels are constants here, not state).
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_BLUR_1331 = (1.0, 3.0, 3.0, 1.0)


class BlurDown(nn.Module):
    """(1,3,3,1) x (1,3,3,1) / 64 blur with stride 2, TF-"same" padding (pad 1/1 on even
    sides, 1/2 on odd ones), per channel. The kernel is built in forward, so it is never a
    buffer that a bf16 engine or zero.Init could hold in another precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[-3:]
        ph, pw = max((-(-h // 2) - 1) * 2 + 4 - h, 0), max((-(-w // 2) - 1) * 2 + 4 - w, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        k = torch.tensor(_BLUR_1331, dtype=torch.float32, device=x.device)
        k = (k[None, :] * k[:, None]) / 64.0
        weight = k.to(x.dtype).expand(c, 1, 4, 4)
        return F.conv2d(x, weight, stride=2, groups=c)


class PatchDiscriminator(nn.Module):
    """5x5 stem (same padding), LeakyReLU(0.1) -> per level [3x3 conv, blur + stride-2 down,
    GroupNorm, LeakyReLU(0.1)] -> adaptive max-pool to 16x16 -> 1x1 conv, LeakyReLU, 5x5 conv
    -> (B, 1, 16, 16) logits. Level widths are channels x mults: the reference's
    128 -> 128 -> 256 -> 512 is channels=128, mults=(1, 2, 4). Inputs in [0, 1], as the
    reference feeds it. The fixed 16x16 grid makes the logit count independent of resolution."""

    def __init__(self, channels: int = 128, mults: Sequence[int] = (1, 2, 4), groups: int = 32,
                 logits_size: int = 16):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.block_in = nn.Sequential(nn.Conv2d(3, channels, 5, padding=2), act())
        blocks, c = [], channels
        for m in mults:
            out = channels * m
            blocks.append(nn.Sequential(nn.Conv2d(c, out, 3, padding=1), BlurDown(),
                                        nn.GroupNorm(min(groups, out), out), act()))
            c = out
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveMaxPool2d(logits_size)
        self.to_logits = nn.Sequential(nn.Conv2d(c, c, 1), act(), nn.Conv2d(c, 1, 5, padding=2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> (B, 1, 16, 16) logits (fp32)."""
        x = self.block_in(images.to(self.block_in[0].weight.dtype))
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.pool(x)).float()


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))), as taming / the reference."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def lecam_loss(real_mean: torch.Tensor, fake_mean: torch.Tensor, ema_real: torch.Tensor,
               ema_fake: torch.Tensor) -> torch.Tensor:
    """relu(mean D(real) - ema_fake)^2 + relu(ema_real - mean D(fake))^2 (batch means)."""
    return F.relu(real_mean - ema_fake) ** 2 + F.relu(ema_real - fake_mean) ** 2


class LeCamEMA(nn.Module):
    """EMAs of the batch-mean real / fake logits, always fp32. They are buffers (checkpointed
    with the discriminator engine), and a bf16 copy would stall: 0.5 x 0.999 + 1e-3 rounds back
    to 0.5 in bf16. So whatever builds the module (zero.Init creates every float tensor in
    the training dtype) or casts it (`.to(bf16)`), they are kept / put back in fp32 before
    use and before a checkpoint is loaded into them (their values are 0 until the first update)."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))
        self._fp32()

    def _fp32(self) -> None:
        for name in ("real", "fake"):
            buf = self._buffers[name]
            if buf.dtype != torch.float32:
                self._buffers[name] = buf.float()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._fp32()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._fp32()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """The LeCam term of logits `real` / `fake` against the EMAs of past steps; then the
        EMAs take this step's batch means."""
        self._fp32()
        real_mean, fake_mean = real.float().mean(), fake.float().mean()
        loss = lecam_loss(real_mean, fake_mean, self.real, self.fake)
        with torch.no_grad():  # a non-finite step (skipped by the trainer) leaves them as they are
            for ema, mean in ((self.real, real_mean), (self.fake, fake_mean)):
                new = ema * self.decay + mean.detach() * (1 - self.decay)
                ema.copy_(torch.where(torch.isfinite(new), new, ema))
        return loss


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
        lecam = self.lecam(logits_real, logits_fake)
        loss = hinge + self.lecam_weight * lecam
        logs: Dict[str, torch.Tensor] = {
            "loss/disc": hinge.detach(), "loss/lecam": lecam.detach(),
            "disc/logits_real": logits_real.detach().mean(), "disc/logits_fake": logits_fake.detach().mean()}
        return loss, logs
