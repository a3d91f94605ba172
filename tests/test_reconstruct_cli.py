"""python -m unilip_ds.inference.reconstruct on a fake export dir (save_component layout)."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from unilip_ds.config import load_config, to_yaml
from unilip_ds.engine.weights import save_component
from unilip_ds.inference.reconstruct import ReconstructError, main, reconstruct
from unilip_ds.models.flavors import get_flavor
from unilip_ds.models.unilip import UniLIP

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = UniLIP(get_flavor("tiny"))
    for name, comp in model.export_components().items():
        save_component(comp, out / name)
    cfg = load_config("recon_stage1", ["model.flavor=tiny", "model.perceptual_pretrained=false",
                                       "data.resolution=56"], world_size=1)
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out, model.eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    Image.fromarray(skdata.astronaut()).save(d / "astronaut.png")
    Image.fromarray(skdata.chelsea()).save(d / "chelsea.jpg")
    shard = d / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, arr in (("000001", skdata.coffee()), ("000002", skdata.rocket())):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            txt = b"a caption"
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(txt)
            tar.addfile(info, io.BytesIO(txt))
    return d, shard


def test_reconstruct_files_and_shards(export, inputs, tmp_path, capsys):
    ckpt, model = export
    d, shard = inputs
    rc = main(["--ckpt", str(ckpt), "--images", str(d / "astronaut.png"), str(d / "chelsea.jpg"), str(shard),
               "--out", str(tmp_path / "out")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in summary["images"]]
    assert names == ["astronaut.png", "chelsea.jpg", "shard-000000/000001.jpg", "shard-000000/000002.jpg"]
    assert summary["resolution"] == 56
    assert summary["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in summary["images"]]), abs=1e-3)
    grid = Image.open(tmp_path / "out" / "grid.png")
    from unilip_ds.inference.sampling import LABEL_H  # header band, a label band above each row
    assert grid.size == (2 * 56, LABEL_H + 4 * (LABEL_H + 56))  # original | reconstruction, one row per image
    rec = np.asarray(Image.open(tmp_path / "out" / "astronaut.recon.png"), dtype=np.float32) / 255
    # the PNG is what the exported weights produce (the export was loaded, not a fresh init)
    from unilip_ds.inference.reconstruct import to_tensor
    x = to_tensor(Image.open(d / "astronaut.png").convert("RGB"), 56)[None]
    with torch.no_grad():
        want = model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.abs(rec - want).max() < 1.5 / 255


def test_directory_input_and_resolution(export, inputs, tmp_path):
    ckpt, _ = export
    d, _ = inputs
    summary = reconstruct(ckpt, [str(d)], tmp_path / "o", resolution=28)
    assert [r["name"] for r in summary["images"]] == ["astronaut.png", "chelsea.jpg"]
    assert all(-1 <= r["ssim"] <= 1 and r["psnr"] > 0 for r in summary["images"])


def test_bad_inputs_one_line_errors(export, tmp_path):
    ckpt, _ = export
    with pytest.raises(ReconstructError, match="not an export dir"):
        reconstruct(tmp_path, [str(tmp_path)], tmp_path / "o")
    with pytest.raises(ReconstructError, match="no such file"):
        reconstruct(ckpt, [str(tmp_path / "missing.png")], tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReconstructError, match="no images"):
        reconstruct(ckpt, [str(tmp_path / "empty")], tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing left behind
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "grid.png").write_bytes(b"someone's")
    with pytest.raises(ReconstructError, match="not empty; nothing was written"):
        reconstruct(ckpt, [str(tmp_path / "empty")], tmp_path / "used")
    assert [f.name for f in (tmp_path / "used").iterdir()] == ["grid.png"]
    with pytest.raises(ReconstructError, match=">= 28"):
        reconstruct(ckpt, [str(tmp_path / "empty")], tmp_path / "o", resolution=20)


def test_any_size_through_the_reference_pad_path(export, inputs, tmp_path):
    """A size that is not a multiple of 28 (the paper's 256 px) is reconstructed as the
    reference evaluates it (reflect-pad, decode, 28/32 resize, crop), not refused."""
    from unilip_ds.inference.reconstruct import to_tensor
    from unilip_ds.models.unilip import reconstruct_padded
    ckpt, model = export
    d, _ = inputs
    summary = reconstruct(ckpt, [str(d / "astronaut.png")], tmp_path / "o", resolution=64)
    assert summary["resolution"] == 64
    rec = np.asarray(Image.open(tmp_path / "o" / "astronaut.recon.png"), dtype=np.float32) / 255
    assert rec.shape == (64, 64, 3)
    x = to_tensor(Image.open(d / "astronaut.png").convert("RGB"), 64)[None]
    with torch.no_grad():
        want = reconstruct_padded(model, x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.abs(rec - want).max() < 1.5 / 255


def test_cli_entry_point(export, inputs, tmp_path):
    ckpt, _ = export
    d, _ = inputs
    proc = subprocess.run([sys.executable, "-m", "unilip_ds.inference.reconstruct", "--ckpt", str(ckpt),
                           "--images", str(d / "nope.png"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --images: no such file or directory {d / 'nope.png'}"]


def test_each_export_component_loads_with_from_pretrained(export):
    """vision/, adapter/ and decoder/ are save_pretrained directories (config.json + weights):
    the library classes load each one alone."""
    from transformers import InternVLForConditionalGeneration
    from unilip_ds.engine.weights import full_state_dict
    from unilip_ds.models.unilip import Adapter, DCAEDecoder
    ckpt, model = export
    assert all((ckpt / c / "config.json").is_file() for c in ("vision", "adapter", "decoder"))
    internvl = InternVLForConditionalGeneration.from_pretrained(ckpt / "vision")
    for part in ("vision_tower", "multi_modal_projector"):
        got, want = getattr(internvl.model, part).state_dict(), getattr(model.vision, part).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for cls, comp, name in ((Adapter, model.adapter, "adapter"), (DCAEDecoder, model.dcae, "decoder")):
        got, want = full_state_dict(cls.from_pretrained(ckpt / name)), full_state_dict(comp)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
