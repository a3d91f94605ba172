"""data_prep/cache_features.py: cache shards of the generator's frozen outputs, built through
the CLI on the tiny flavor; their records equal GenModel's live computation (fp32), a re-run
reuses verified shards and rebuilds a damaged one, a builder killed mid-shard resumes without
partial or duplicated shards, a cache of other settings is refused."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import torch

from tests.launch_util import check, run
from unilip_ds.data.cache import MANIFEST, CacheManifest, decode_record, record_digest
from unilip_ds.data.decode import Decoder
from unilip_ds.data.stream import iter_shard


def _args(assets, task, shards, dst, *extra):
    return ["--config", "gen_stage2", "--task", task, "--src", shards.dir, "--dst", str(dst), "--what",
            "latents,prefix", "--dtype", "fp32", "--batch-size", "4", "--no-progress", *assets.overrides(), *extra]


def _build(assets, task, shards, dst, *extra):
    return run("data_prep/cache_features.py", _args(assets, task, shards, dst, *extra))


def _kill_mid_shard(args, dst: Path) -> Path:
    """Starts the builder and SIGKILLs it while it writes a shard; returns the partial file."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.launch_util import REPO, env
    proc = subprocess.Popen([sys.executable, "data_prep/cache_features.py", *args], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            partial = [p for p in dst.glob("*.tmp-*") if p.stat().st_size > 0] if dst.is_dir() else []
            if partial:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return partial[0]
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            proc.kill()
    raise AssertionError("the builder finished before it could be killed mid-shard")


def _records(path: Path):
    with tarfile.open(path) as tar:
        return [(m.name[:-len(".cache")], decode_record(tar.extractfile(m).read())) for m in tar.getmembers()]


def test_cache_records_equal_the_live_computation(gen_assets, sample_shards, sample_edit_shards, build_gen, tmp_path):
    task_obj, model = build_gen()
    model.eval()
    builder = task_obj.prompts()
    for task, shards in (("t2i", sample_shards), ("edit", sample_edit_shards)):
        dst = tmp_path / f"cache_{task}"
        proc = check(_build(gen_assets, task, shards, dst))
        est = json.loads(proc.stdout.splitlines()[0])["storage_estimate"]
        assert est["samples"] == len(shards.keys) and est["bytes_per_sample"]["none"] == 0
        assert 0 < est["bytes_per_sample"]["latents"] < est["bytes_per_sample"]["prefix"]
        manifest = CacheManifest.from_json((dst / MANIFEST).read_text())
        assert manifest.level == "prefix" and manifest.task == task
        assert [s.name for s in manifest.shards] == [Path(u).name for u in shards.urls]
        assert sum(s.samples for s in manifest.shards) == len(shards.keys)
        assert {"weights.encoder", "weights.llm", "tokenizer", "prompt", "resolution"} <= set(manifest.fingerprint)

        url = shards.urls[0]
        raws = list(iter_shard(url, None, None))
        records = _records(dst / Path(url).name)
        assert [k for k, _ in records] == [r["__key__"] for r in raws]  # aligned with the source
        index = json.loads((dst / (Path(url).name + ".index.json")).read_text())
        blob = (dst / Path(url).name).read_bytes()
        for key, rec in records:  # the index gives each record by byte range, with its digest
            start, length, digest = index[key]
            assert record_digest(blob[start:start + length]) == digest
            assert torch.equal(decode_record(blob[start:start + length])["latent"], rec["latent"])
        decoder = Decoder(task, task_obj.cfg.data.resolution, train=False)
        for raw, (_, rec) in list(zip(raws, records))[:5]:
            fields = decoder(raw)
            image = fields["image"][None].float() / 255
            ref = fields["input_image"][None].float() / 255 if task == "edit" else None
            text = fields["caption" if task == "t2i" else "instruction"]
            with torch.no_grad():
                torch.testing.assert_close(rec["latent"], model.target_latent(image)[0], atol=1e-5, rtol=1e-5)
                feats = model.image_features(ref) if ref is not None else None
                if feats is not None:
                    torch.testing.assert_close(rec["ref"], feats[0], atol=1e-5, rtol=1e-5)
                # computed in a padded batch of 4, compared with the sample alone
                for prefix, texts in (("prefix", [text]), ("null", [None])):
                    if prefix == "null" and task == "t2i":
                        assert "null.hidden" not in rec  # T2I's null prompt is one constant
                        continue
                    state = model.prefix(builder(task, texts), feats)
                    torch.testing.assert_close(rec[f"{prefix}.hidden"], state.hidden[0], atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(rec[f"{prefix}.k"], torch.stack([k[0] for k, _ in state.kv]),
                                               atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(rec[f"{prefix}.v"], torch.stack([v[0] for _, v in state.kv]),
                                               atol=1e-5, rtol=1e-5)


def _build_in_process(capsys, assets, task, shards, dst, *extra):
    """The CLI's main in this process (the same code, without a fresh interpreter's imports):
    (exit code, stdout, stderr)."""
    from data_prep.cache_features import main
    capsys.readouterr()
    rc = main(_args(assets, task, shards, dst, *extra))
    out, err = capsys.readouterr()
    return rc, out, err


def test_rerun_reuses_verified_shards_rebuilds_damaged_ones_and_refuses_other_settings(
        gen_assets, sample_edit_shards, tmp_path, capsys):
    dst = tmp_path / "cache"
    assert _build_in_process(capsys, gen_assets, "edit", sample_edit_shards, dst)[0] == 0
    names = [Path(u).name for u in sample_edit_shards.urls]
    digest = {n: hashlib.sha256((dst / n).read_bytes()).hexdigest() for n in names}
    damaged = dst / names[1]
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a shard cut short
    rc, out, err = _build_in_process(capsys, gen_assets, "edit", sample_edit_shards, dst)
    assert rc == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["reused"] == len(names) - 1 and summary["samples"] == len(sample_edit_shards.keys)
    assert {n: hashlib.sha256((dst / n).read_bytes()).hexdigest() for n in names} == digest  # rebuilt exactly
    assert not list(dst.glob("*.tmp-*"))

    killed = tmp_path / "killed"  # (batch size 1: many writes per shard, a window to kill in)
    partial = _kill_mid_shard(_args(gen_assets, "edit", sample_edit_shards, killed, "--batch-size", "1"), killed)
    assert partial.exists() and not (killed / MANIFEST).exists()
    assert _build_in_process(capsys, gen_assets, "edit", sample_edit_shards, killed)[0] == 0
    assert not list(killed.glob("*.tmp-*"))  # the killed run's partial file is gone
    assert sorted(p.name for p in killed.glob("*.tar")) == sorted(names)  # each shard once
    assert {n: hashlib.sha256((killed / n).read_bytes()).hexdigest() for n in names} == digest
    manifest = CacheManifest.from_json((killed / MANIFEST).read_text())
    assert [s.name for s in manifest.shards] == names and \
        sum(s.samples for s in manifest.shards) == len(sample_edit_shards.keys)
    rc, _, err = _build_in_process(capsys, gen_assets, "edit", sample_edit_shards, dst, "data.resolution=196")
    assert rc == 2 and "built differently (differs: " in err
    assert "resolution (cache: 224, this run: 196)" in err
    assert len([line for line in err.splitlines() if not line.startswith("warning:")]) == 1
