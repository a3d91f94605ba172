"""Checkpoints hold only what trains; resume and export read the frozen parts from their
sources, checked by digest.

One tiny gen_stage1 run (2 processes, ZeRO-2: the DiT, the MLLM, the UniLIP adapter / decoder
and the DC-AE frozen, from copies of the session's weight directories) with a checkpoint per
step. Its step-1 checkpoint is resumed twice: on 2 processes (bit-identical to the run), and on
1 process (the universal-checkpoint path), first refused while a frozen source is edited in
place (mtime put back), then accepted once the bytes are back. The other resume tests
(test_training, test_gen_stages, test_elastic, test_fault_tolerance) run on lean checkpoints
too wherever their frozen parts come from files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.launch_util import check, run, tiny_gen_args, with_overrides
from unilip_ds.engine import checkpoint, sources
from unilip_ds.engine.export import ExportError, consolidated, export
from unilip_ds.engine.weights import read_weights_dir
from unilip_ds.models.gen_loading import mllm_state_dict

FROZEN = ("mllm.", "transformer.", "adapter.", "decoder.", "dcae.")


def _rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as if it had stopped after the checkpoint of `step`."""
    shutil.copytree(src, dst)
    root = checkpoint.ckpt_root(dst)
    for d in root.iterdir():
        if d.is_dir() and checkpoint.STEP_RE.match(d.name) and int(d.name[5:]) > step:
            shutil.rmtree(d)
    (root / "latest").write_text(f"step_{step:08d}\n")
    for f in [dst / "metrics.jsonl", *(dst / "keys").glob("*.jsonl")]:
        rows = [x for x in f.read_text().splitlines() if json.loads(x)["step"] <= step]
        f.write_text("".join(r + "\n" for r in rows))
    return dst


@pytest.fixture(scope="module")
def lean(gen_assets, sample_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    srcs = {}
    for name in ("internvl", "sana", "dcae", "recon"):  # copies: one is edited below
        srcs[name] = root / "src" / name
        shutil.copytree(getattr(gen_assets, name), srcs[name])

    def args(out, extra=()):
        base = tiny_gen_args(out, "gen_stage1", gen_assets, sample_shards.dir, steps=2, ds="ds_configs/zero2.json")
        return with_overrides(base, [f"model.internvl_path={srcs['internvl']}", f"model.unilip_path={srcs['recon']}",
                                     f"model.sana_path={srcs['sana']}", f"model.dcae_path={srcs['dcae']}",
                                     "checkpoint.every_steps=1", "checkpoint.keep_last=2", "data.log_keys=true",
                                     "wandb.mode=disabled", "optim.warmup_steps=1", *extra])
    full = root / "full"
    check(run("launch/train.py", args(full), nproc=2, launcher="torchrun"))
    return root, srcs, full, args


def test_checkpoint_holds_only_what_trains(lean):
    _, _, full, _ = lean
    cdir = checkpoint.ckpt_root(full) / "step_00000002"
    meta = checkpoint.read_meta(full, "step_00000002")
    assert meta["frozen_saved"] is False
    assert sorted(meta["frozen_sources"]) == ["model.dcae_path", "model.internvl_path", "model.sana_path",
                                              "model.unilip_path"]
    assert all(len(d["sha256"]) == 64 and d["files"] > 0 for d in meta["frozen_sources"].values())
    states = torch.load(cdir / "model" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert states["frozen_param_fragments"] is None and states["frozen_param_shapes"] is None
    keys = set(states["module"])
    assert keys and not [k for k in keys if k.startswith(FROZEN)], sorted(keys)[:5]
    assert all(k.startswith("connector.") for k in keys)
    trainable = {k for k, v in consolidated(full, use_ema=False)[1].items() if k.startswith("connector.")}
    shapes = {k for group in states["param_shapes"] for k in group}
    assert shapes == trainable  # the optimizer states: exactly the parameters that train
    # every frozen tensor of the run's weights is its source file's
    _, sd, _ = consolidated(full, use_ema=False)
    sana = read_weights_dir(lean[1]["sana"] / "transformer")
    assert all(torch.equal(sd["transformer." + k], v.float()) for k, v in sana.items())
    internvl = mllm_state_dict(lean[1]["internvl"])
    llm = [k for k in internvl if "language_model" in k]
    assert llm and all(torch.equal(sd["mllm." + k], internvl[k].float()) for k in llm)
    size = sum(f.stat().st_size for f in cdir.rglob("*") if f.is_file())
    frozen = sum(v.numel() for k, v in sd.items() if k.startswith(FROZEN)) * 4
    assert size < frozen, (size, frozen)  # less than the frozen fp32 weights alone


def test_resume_is_bit_identical(lean):
    root, _, full, args = lean
    split = _rewind(full, root / "split", 1)
    proc = check(run("launch/train.py", args(split), nproc=2, launcher="torchrun"))
    assert "resumed from" in proc.stdout and "step_00000001" in proc.stdout
    a, b = consolidated(full, False)[1], consolidated(split, False)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, split)]
    assert [r["step"] for r in rows[1]] == [1, 2] and rows[0][1]["loss/flow"] == rows[1][1]["loss/flow"]
    for r in (0, 1):
        assert (full / "keys" / f"rank{r}.jsonl").read_text() == (split / "keys" / f"rank{r}.jsonl").read_text()


def _edit_in_place(f: Path, offset: int) -> bytes:
    """Flip one byte of the file's data, size and mtime kept."""
    st = f.stat()
    with open(f, "r+b") as h:
        h.seek(offset)
        old = h.read(1)
        h.seek(offset)
        h.write(bytes([old[0] ^ 0xFF]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    return old


def test_changed_source_refused_then_elastic_resume_and_complete_export(lean, tmp_path):
    root, srcs, full, args = lean
    weights = next((srcs["sana"] / "transformer").glob("*.safetensors"))
    old = _edit_in_place(weights, weights.stat().st_size - 3)
    moved = _rewind(full, root / "moved", 1)
    one = ["train.grad_accum=2"]  # 1 process, the same global batch
    try:
        proc = run("launch/train.py", args(moved, one))
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: checkpoint step_00000001 of "), lines
        assert "model.sana_path" in lines[0] and "changed since the run started" in lines[0], lines
        assert checkpoint.latest_tag(moved) == "step_00000001"
        with pytest.raises(ExportError, match="model.sana_path") as err:
            export(full, tmp_path / "refused")
        assert "\n" not in str(err.value) and not (tmp_path / "refused").exists()
    finally:
        with open(weights, "r+b") as h:  # the bytes back (mtime and ctime now new: rehashed, the same)
            h.seek(weights.stat().st_size - 3)
            h.write(old)
    # the same bytes again: resumed on 1 process through DeepSpeed's universal checkpoint
    proc = check(run("launch/train.py", args(moved, one)))
    assert "to DeepSpeed's universal format" in proc.stdout and "resumed from" in proc.stdout
    assert checkpoint.latest_tag(moved) == "step_00000002"
    assert checkpoint.read_meta(moved, "step_00000002")["frozen_sources"] == \
        checkpoint.read_meta(full, "step_00000002")["frozen_sources"]
    # the export is complete: frozen components bit for bit their sources, the rest the run's
    out = tmp_path / "export"
    info = export(moved, out)
    assert info["components"] == ["adapter", "connector", "dcae", "decoder", "mllm", "scheduler", "tokenizer",
                                  "transformer"]
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)  # noqa: E731
    assert same(read_weights_dir(out / "transformer"), read_weights_dir(srcs["sana"] / "transformer"))
    assert same(read_weights_dir(out / "dcae"), read_weights_dir(srcs["dcae"]))
    for name in ("adapter", "decoder"):
        assert same(read_weights_dir(out / name), read_weights_dir(srcs["recon"] / name))
    internvl, mllm = mllm_state_dict(srcs["internvl"]), mllm_state_dict(out / "mllm")
    assert all(torch.equal(mllm[k].float(), v.float()) for k, v in internvl.items() if "language_model" in k)
    _, sd, _ = consolidated(moved, use_ema=False)
    conn = read_weights_dir(out / "connector")
    assert all(torch.equal(v.float(), sd["connector." + k]) for k, v in conn.items())


def test_digest_cache_is_keyed_by_ctime_and_inode(tmp_path):
    """An in-place edit with the size and mtime put back is seen (ctime moved); an unchanged
    file is not read again."""
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 1000)
    cache = tmp_path / sources.CACHE
    first = sources.digests({"k": [str(tmp_path)]}, cache)
    _edit_in_place(f, 10)
    assert sources.digests({"k": [str(tmp_path)]}, cache)["k"]["sha256"] != first["k"]["sha256"]
    entries = json.loads(cache.read_text())
    entries[str(f.resolve())]["sha256"] = "0" * 64  # a hit is served from the cache
    cache.write_text(json.dumps(entries))
    assert sources.file_digests([f], cache)[f] == "0" * 64
