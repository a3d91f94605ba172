"""Reading pretrained weights: only the tensors a component needs are read from a checkpoint
(the vision path of an InternVL file, not its language model), and they load unchanged."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unilip_ds.engine.weights import read_weights_dir, weight_keys
from unilip_ds.models.flavors import get_flavor
from unilip_ds.models.unilip import HFVisionLayout, VisionPath, internvl_vision_state_dict

UNRELATED_MB = 384  # the "language model": 24 tensors of 16 MiB


def _checkpoint(path, vision: VisionPath, unrelated_mb: int = UNRELATED_MB) -> dict:
    """An InternVL `-hf`-layout file: the vision path's tensors among large unrelated ones."""
    sd = {k: v.contiguous() for k, v in HFVisionLayout(vision).state_dict().items()}
    per = 16 * 2 ** 20 // 4
    for i in range(unrelated_mb // 16):
        sd[f"model.language_model.layers.{i}.mlp.weight"] = torch.full((per,), float(i))
    save_file(sd, str(path))
    return sd


@pytest.fixture(scope="module")
def vision():
    torch.manual_seed(0)
    return VisionPath(get_flavor("tiny"))


def _rchar() -> int:
    """Bytes this process has read through read(2) / pread(2) so far (page-cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise KeyError("rchar")


def test_vision_keys_read_alone_and_unchanged(tmp_path, vision):
    path = tmp_path / "model.safetensors"
    _checkpoint(path, vision)
    got = internvl_vision_state_dict(path)
    want = vision.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the bytes read: with the pread backend every requested tensor is read at once, so
    # rchar counts exactly what was requested (the default mmap backend reads on use)
    wanted = sum(v.numel() * v.element_size() for v in want.values())
    before = _rchar()
    part = read_weights_dir(path, keep=lambda k: k.startswith("model.vision_tower."), backend="pread")
    read = _rchar() - before
    assert len(part) == sum(k.startswith("vision_tower.") for k in want)
    assert read <= wanted + 2 ** 20, (read, wanted)  # MiB of header slack; the file is > 384 MiB
    before = _rchar()
    read_weights_dir(path, backend="pread")
    assert _rchar() - before >= UNRELATED_MB * 2 ** 20  # the measure sees a full read


def test_sharded_checkpoint_skips_shards_without_wanted_keys(tmp_path, vision):
    sd = {k: v.contiguous() for k, v in HFVisionLayout(vision).state_dict().items()}
    save_file(sd, str(tmp_path / "model-00001-of-00002.safetensors"))
    # the second shard holds only language-model keys; its bytes are not even a valid file,
    # so opening it would fail
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 64)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in sd}
    weight_map["model.language_model.embed_tokens.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = internvl_vision_state_dict(tmp_path)
    assert sorted(got) == sorted(vision.state_dict())
    assert all(torch.equal(got[k], v) for k, v in vision.state_dict().items())
    assert "model.language_model.embed_tokens.weight" in weight_keys(tmp_path)
    with pytest.raises(Exception):
        read_weights_dir(tmp_path)  # everything: the broken shard is opened
