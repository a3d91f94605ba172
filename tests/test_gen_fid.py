"""gen.eval_fid: the gen task's periodic evaluation adds eval/gen_fid, the FID of images
sampled from the held-out captions against the held-out images (the project's FID
Inception, recon.inception_path); a missing weights file is a config error."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_eval_recon import _random_inception


def _batch(captions, seed):
    g = torch.Generator().manual_seed(seed)
    return {"__task__": "t2i", "__key__": [f"k{seed}_{i}" for i in range(len(captions))], "caption": captions,
            "image": torch.rand(len(captions), 3, 224, 224, generator=g)}


def test_eval_adds_gen_fid(build_gen, gen_assets, tmp_path):
    from unilip_ds.config import ConfigError
    from unilip_ds.tasks.base import MAIN
    inception = tmp_path / "pt_inception-2015-12-05-random.pth"
    torch.save({k: v for k, v in _random_inception().state_dict().items()
                if not k.endswith("num_batches_tracked")}, inception)
    task, model = build_gen(extra=["gen.eval_fid=true", f"recon.inception_path={inception}", "gen.sample_steps=2"])
    m = task.evaluate({MAIN: model}, [_batch(["a red car", "a cat on a table"], 0)])
    assert "eval/flow" in m and math.isfinite(m["eval/gen_fid"]) and m["eval/gen_fid"] > 0

    from unilip_ds.config import load_config
    from unilip_ds.tasks.base import build_task
    cfg = load_config("gen_stage2", gen_assets.overrides() + ["gen.eval_fid=true"])
    with pytest.raises(ConfigError, match="gen.eval_fid"):
        build_task(cfg).check_inputs()


def test_low_rank_fid_is_the_full_one():
    """Fewer images than feature dimensions: the N x N trace term gives fid_from_stats' number."""
    from unilip_ds.evaluation.fid import FeatureStats, fid_from_stats
    from unilip_ds.evaluation.gen_fid import fid_of_features
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(7, 64, generator=g), 0.5 + 2 * torch.randn(5, 64, generator=g)
    a, b = FeatureStats(64), FeatureStats(64)
    a.update(real)
    b.update(fake)
    assert fid_of_features(real, fake) == pytest.approx(fid_from_stats(a, b), rel=1e-6)
    assert fid_of_features(real, real) == pytest.approx(0, abs=1e-6)
