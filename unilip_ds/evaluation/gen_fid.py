"""Generation FID during training (gen stages, `gen.eval_fid=true`): at every
`train.eval_every`, besides the held-out flow loss, images are sampled from the held-out T2I
captions (the sample grids' settings: gen.sample_steps, gen.guidance_scale,
gen.flow_shift_sample; image i of the evaluation takes the seed i, so steps are comparable)
and their FID against the held-out images themselves is logged as `eval/gen_fid`, with the
project's FID Inception (`recon.inception_path`, the pt_inception-2015-12-05 weights file, as
for rFID). Every rank evaluates the same held-out batches (trainer.evaluate), so the sampling
forwards match across ranks under ZeRO-3 and no statistics need gathering.

The held-out set is small (train.eval_batches x the micro batch): the number is a biased
estimate of the FID of a large sample, useful to follow a run, not to compare with papers.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import torch

from unilip_ds.evaluation.fid import FeatureStats, fid_from_stats


def check_config(cfg) -> None:
    """gen.eval_fid needs the Inception weights file (a ConfigError naming the key)."""
    if not getattr(cfg.gen, "eval_fid", False):
        return
    from pathlib import Path

    from unilip_ds.config import ConfigError
    path = cfg.recon.inception_path
    if not path:
        raise ConfigError("config key 'gen.eval_fid': needs recon.inception_path (the FID Inception "
                          "weights file pt_inception-2015-12-05-6726825d.pth)")
    if not Path(path).is_file():
        raise ConfigError(f"config key 'recon.inception_path': no such file {path}")


@functools.lru_cache(maxsize=2)
def _inception(path: str, device: str):
    # float32 features (statistics in float64): a training-time figure, cheaper than the
    # float64 network of evaluation.recon
    from unilip_ds.evaluation.inception import load_fid_inception
    return load_fid_inception(path, dtype=torch.float32, device=device)


def _uint8(images: torch.Tensor) -> torch.Tensor:
    return torch.round(images.float().clamp(0, 1) * 255).to(torch.uint8)


def fid_of_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of two (N, D) feature sets, exactly as fid_from_stats (N - 1 covariances), in float64.
    With fewer images than dimensions (a held-out set against 2048 Inception features) the
    trace term comes from an N x N matrix: the nonzero eigenvalues of S_r S_f = X_r' X_r X_f' X_f
    are those of (X_r X_f')(X_r X_f')', X the centred features / sqrt(N - 1)."""
    real, fake = real.double(), fake.double()
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} and {len(fake)}")
    if min(len(real), len(fake)) >= real.shape[1]:
        a, b = FeatureStats(real.shape[1], real.device), FeatureStats(real.shape[1], real.device)
        a.update(real)
        b.update(fake)
        return fid_from_stats(a, b)
    mu_r, mu_f = real.mean(0), fake.mean(0)
    xr = (real - mu_r) / (len(real) - 1) ** 0.5
    xf = (fake - mu_f) / (len(fake) - 1) ** 0.5
    k = xr @ xf.T
    tr_covmean = torch.linalg.eigvalsh(k @ k.T).clamp_min(0).sqrt().sum()
    diff = mu_r - mu_f
    return float(diff @ diff + (xr * xr).sum() + (xf * xf).sum() - 2 * tr_covmean)


class GenFID:
    """Inception features of held-out images and of images sampled from their captions."""

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.net = _inception(str(cfg.recon.inception_path), str(torch.device(device)))
        self.real, self.fake = [], []

    @classmethod
    def for_run(cls, cfg, device) -> Optional["GenFID"]:
        return cls(cfg, device) if getattr(cfg.gen, "eval_fid", False) else None

    @torch.no_grad()
    def update(self, model, builder, batch: dict) -> None:
        """Adds a held-out T2I batch (edit batches are skipped)."""
        if batch["__task__"] != "t2i":
            return
        from unilip_ds.inference.sampling import sample
        g = self.cfg.gen
        captions = list(batch["caption"])
        done = sum(len(f) for f in self.fake)
        gens = [torch.Generator().manual_seed(done + i) for i in range(len(captions))]
        fake = sample(model, builder, "t2i", captions, steps=g.sample_steps, guidance=g.guidance_scale,
                      flow_shift=g.flow_shift_sample, generator=gens)
        dev = next(self.net.parameters()).device
        self.fake.append(self.net(_uint8(fake).to(dev)).double().cpu())
        self.real.append(self.net(_uint8(batch["image"]).to(dev)).double().cpu())

    def result(self) -> Dict[str, float]:
        if sum(len(f) for f in self.fake) < 2:
            return {}
        return {"eval/gen_fid": fid_of_features(torch.cat(self.real), torch.cat(self.fake))}
