"""launch/export.py --as-internvl: an export as a complete InternVL3 `-hf` directory that
InternVLForConditionalGeneration.from_pretrained loads as is, whose logits are those of
the InternVL3 with the export's vision path put in by load_vision_into_internvl."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from tests.launch_util import REPO


def export_main(argv) -> int:
    spec = importlib.util.spec_from_file_location("launch_export", REPO / "launch" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def trained_export(gen_assets, tmp_path_factory):
    """A recon export whose encoder + projector differ from the InternVL's (as training leaves them)."""
    from unilip_ds.engine.weights import read_weights_dir, write_safetensors
    root = tmp_path_factory.mktemp("internvl_export") / "recon"
    shutil.copytree(gen_assets.recon, root)
    g = torch.Generator().manual_seed(0)
    sd = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v).clone()
          for k, v in read_weights_dir(root / "vision").items()}
    write_safetensors(sd, root / "vision" / "model.safetensors")
    return root


def _logits(model, config, tokenizer):
    from unilip_ds.evaluation.understanding import prompt_ids
    torch.manual_seed(1)
    size = config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    pixels = torch.randn(2, 3, size, size)
    ids = prompt_ids(tokenizer, config, "Describe the image.", (size // 28) ** 2).expand(2, -1)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


def test_as_internvl_loads_as_is_and_gives_the_swapped_logits(gen_assets, trained_export, tmp_path):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from unilip_ds.models.unilip import load_vision_into_internvl
    out = tmp_path / "unilip-hf"
    assert export_main(["--as-internvl", gen_assets.internvl, "--export", trained_export, "--out", out]) == 0
    src_files = {f.name for f in gen_assets.internvl.iterdir()}
    assert src_files <= {f.name for f in out.iterdir()}  # weights, config, tokenizer, chat template
    info = json.loads((out / "unilip_export.json").read_text())
    assert info["vision_from"] == "vision/" and info["dtype"] == "float32"

    tok = AutoTokenizer.from_pretrained(str(out))
    exported = InternVLForConditionalGeneration.from_pretrained(str(out)).eval()
    swapped = InternVLForConditionalGeneration.from_pretrained(str(gen_assets.internvl)).eval()
    before = _logits(swapped, swapped.config, tok)
    load_vision_into_internvl(swapped, trained_export / "vision")
    a, b = _logits(exported, exported.config, tok), _logits(swapped, swapped.config, tok)
    assert torch.equal(a, b)
    assert not torch.allclose(a, before, atol=1e-4)  # the swap matters

    # a gen export's mllm/ gives the same vision path
    gen = tmp_path / "gen"
    swapped.save_pretrained(str(gen / "mllm"))
    (gen / "model_index.json").write_text("{}")
    out2 = tmp_path / "unilip-hf-from-gen"
    assert export_main(["--as-internvl", gen_assets.internvl, "--export", gen, "--out", out2]) == 0
    again = InternVLForConditionalGeneration.from_pretrained(str(out2)).eval()
    assert torch.equal(_logits(again, again.config, tok), b)


def test_as_internvl_bad_inputs(gen_assets, tmp_path, capsys):
    assert export_main(["--as-internvl", tmp_path, "--export", gen_assets.recon, "--out", tmp_path / "o"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert export_main(["--as-internvl", gen_assets.internvl, "--export", tmp_path, "--out", tmp_path / "o"]) == 2
    assert "neither a recon export" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
