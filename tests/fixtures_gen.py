"""Generator fixtures, built once per session in the real on-disk layouts:

- `gen_assets`  (session) a tiny InternVL3 `-hf` directory (weights + Qwen2 BPE tokenizer with
                InternVL3's special tokens and chat template), a SANA diffusers directory, a
                DC-AE directory and a recon export whose encoder is the InternVL's.
- `gen_task`    (function) build_gen(target=..., **overrides) -> (task, GenModel) in process,
                loaded through load_pretrained as a fresh gen_stage1 / 2 would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest


@dataclass
class GenAssets:
    internvl: Path
    sana: Path
    dcae: Path
    recon: Path

    def overrides(self, target: str = "unilip") -> List[str]:
        return ["model.flavor=tiny", f"model.internvl_path={self.internvl}", f"model.unilip_path={self.recon}",
                f"model.sana_path={self.sana}", f"model.dcae_path={self.dcae}",
                f"data.resolution={256 if target == 'dcae' else 224}"]


@pytest.fixture(scope="session")
def gen_assets(tmp_path_factory) -> GenAssets:
    from unilip_ds.data.sample_images import PHOTOS
    from unilip_ds.models import tiny_assets as T
    root = tmp_path_factory.mktemp("gen_assets")
    internvl = T.save_tiny_internvl(root / "internvl", corpus=[c for _, c in PHOTOS])
    return GenAssets(internvl, T.save_tiny_sana(root / "sana"), T.save_tiny_dcae(root / "dcae"),
                     T.save_tiny_recon_export(root / "recon", internvl))


@pytest.fixture
def build_gen(gen_assets):
    from unilip_ds.config import load_config
    from unilip_ds.tasks.base import MAIN, build_task

    def build(target: str = "unilip", extra: List[str] = ()):
        preset = "gen_stage1" if target == "dcae" else "gen_stage2"
        cfg = load_config(preset, gen_assets.overrides(target) + [
            "data.train.sources=[]", "data.train.urls=[/nonexistent]", "train.precision=fp32", *extra])
        task = build_task(cfg)
        modules = task.build_modules()
        task.load_pretrained(modules)
        return task, modules[MAIN]
    return build
