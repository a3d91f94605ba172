"""Generation benchmarks: a gen export's images for GenEval, WISE and ImgEdit, written in the
layout each benchmark's official scorer reads (the scorers themselves are not run here:
GenEval needs its object detector, WISE and ImgEdit a GPT judge; README "Benchmarks").

    python -m unilip_ds.evaluation.bench geneval --ckpt <gen export> --data geneval_prompt.jsonl --out <dir>
    python -m unilip_ds.evaluation.bench wise    --ckpt <gen export> --data WISE/data --out <dir>
    python -m unilip_ds.evaluation.bench imgedit --ckpt <gen export> --data Benchmark/singleturn/singleturn.json --out <dir>
    torchrun --nproc_per_node 8 -m unilip_ds.evaluation.bench geneval ...     (prompts split over ranks)

  geneval  the prompt metadata JSONL (the reference's geneval_prompt.jsonl or GenEval's
           prompts/evaluation_metadata.jsonl): `<out>/<index>/metadata.jsonl` (the prompt's
           line) + `<out>/<index>/samples/<k:05d>.png`, --samples (4) per prompt, and
           `grid.png` (--no-grid: none); <index> is the line's "index" field, else its line
           number as 5 digits.
  wise     WISE's cultural_common_sense.json, natural_science.json and
           spatio-temporal_reasoning.json (a directory holding them, or the files):
           `<out>/<prompt_id>.png`.
  imgedit  ImgEdit's singleturn.json (key -> {"id": image path, "prompt": instruction}; the
           images relative to --image-root, default the json's folder): `<out>/<key>.png`.

As the reference: T2I content "Generate an image: {prompt}" with CFG null "Generate an
image.", edit content "Edit the image: {prompt}" + the image with null "Edit the image." +
the image (unilip_ds.models.prompts), guidance 4.5, 20 steps, seed 42, the export's
resolution (448 for the 1b / 2b exports), 4 GenEval samples per prompt. Unlike the
reference, image k of prompt i (its position in the benchmark file) gets its own noise seed
`seed + i * samples + k`, so an image depends neither on the number of ranks nor on the
batch; several prompts run per forward (--batch-size images).

Resumable: a re-run (any number of ranks, any batch size) generates only the images that are
missing; each PNG is written to a hidden temporary file and renamed, so a killed run never
leaves a partial image. A re-run with other settings, another export or other benchmark
files is refused. `<out>/run.json` holds every setting, the export's identity (path, sha256
of its weight files, its export.json), the benchmark files' sha256, counts and timings.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

BENCHMARKS = ("geneval", "wise", "imgedit")
WISE_FILES = ("cultural_common_sense.json", "natural_science.json", "spatio-temporal_reasoning.json")
IMGEDIT_FILES = ("singleturn.json", "basic_edit.json")
# the reference's settings (eval/geneval/geneval.py, eval/WISE/wise.py, eval/ImgEdit/imgedit.py)
DEFAULTS = {"steps": 20, "guidance": 4.5, "seed": 42, "samples": 4}
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BenchError(ValueError):
    """Bad input (benchmark file, field, option, output directory): one line, exit code 2."""


@dataclass
class Item:
    """One prompt of a benchmark: its text (and input image for editing), the images it owes
    (paths relative to --out) and their noise seeds."""
    index: int
    text: str
    outputs: List[str]
    seeds: List[int]
    image: Optional[Path] = None
    folder: Optional[str] = None  # geneval: the prompt's folder (metadata.jsonl, grid.png)
    metadata: Optional[dict] = None  # geneval: the prompt's line, written as metadata.jsonl


# ---------------------------------------------------------------------------------------
# benchmark files
# ---------------------------------------------------------------------------------------
def _read_json(path: Path):
    if not path.is_file():
        raise BenchError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: not valid JSON ({exc})") from None


def _text(path, where: str, record, name: str) -> str:
    if not isinstance(record, dict):
        raise BenchError(f"{path}: {where} is not a JSON object")
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BenchError(f"{path}: {where} has no '{name}' field (a non-empty string)")
    return value


def geneval_items(data: Sequence[str], samples: int, seed: int) -> Tuple[List[Item], List[Path]]:
    if len(data) != 1:
        raise BenchError("--data: geneval takes one file, the prompt metadata JSONL")
    path = Path(data[0])
    if not path.is_file():
        raise BenchError(f"{path}: no such file (geneval: the prompt metadata JSONL)")
    items, folders = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}: line {lineno} is not valid JSON ({exc})") from None
        prompt = _text(path, f"line {lineno}", meta, "prompt")
        _text(path, f"line {lineno}", meta, "tag")  # GenEval's scorer reads it
        i = len(items)
        folder = meta.get("index", i)
        if isinstance(folder, int) and not isinstance(folder, bool) and folder >= 0:
            folder = f"{folder:05d}"
        if not isinstance(folder, str) or not folder.isdigit():
            raise BenchError(f"{path}: line {lineno} field 'index' must be a string of digits "
                             f"(GenEval's scorer reads numeric folders), got {folder!r}")
        if folder in folders:
            raise BenchError(f"{path}: line {lineno} field 'index' {folder!r} repeats an earlier line")
        folders.add(folder)
        items.append(Item(i, prompt, [f"{folder}/samples/{k:05d}.png" for k in range(samples)],
                          [seed + i * samples + k for k in range(samples)], folder=folder, metadata=meta))
    if not items:
        raise BenchError(f"{path}: no prompts")
    return items, [path]


def wise_items(data: Sequence[str], seed: int) -> Tuple[List[Item], List[Path]]:
    paths = [Path(p) for p in data]
    if len(paths) == 1 and paths[0].is_dir():
        paths = [paths[0] / name for name in WISE_FILES]
    items, ids = [], {}
    for path in paths:
        records = _read_json(path)
        if not isinstance(records, list):
            raise BenchError(f"{path}: must be a JSON list of prompts (WISE's data/*.json)")
        for j, rec in enumerate(records):
            prompt = _text(path, f"item {j}", rec, "Prompt")
            pid = rec.get("prompt_id")
            if isinstance(pid, bool) or not (isinstance(pid, int) or (isinstance(pid, str) and pid.isdigit())):
                raise BenchError(f"{path}: item {j} has no 'prompt_id' field (an integer)")
            pid = str(pid)
            if pid in ids:
                raise BenchError(f"{path}: item {j} field 'prompt_id' {pid} repeats one of {ids[pid]}")
            ids[pid] = path.name
            i = len(items)
            items.append(Item(i, prompt, [f"{pid}.png"], [seed + i]))
    if not items:
        raise BenchError(f"{', '.join(map(str, paths))}: no prompts")
    return items, paths


def imgedit_items(data: Sequence[str], seed: int, image_root: Optional[str]) -> Tuple[List[Item], List[Path]]:
    if len(data) != 1:
        raise BenchError("--data: imgedit takes one file, singleturn.json (or its folder)")
    path = Path(data[0])
    if path.is_dir():
        found = [path / n for n in IMGEDIT_FILES if (path / n).is_file()]
        if not found:
            raise BenchError(f"{path}: holds none of {', '.join(IMGEDIT_FILES)}")
        path = found[0]
    records = _read_json(path)
    if not isinstance(records, dict):
        raise BenchError(f"{path}: must be a JSON object mapping keys to {{'id', 'prompt'}}")
    root = Path(image_root) if image_root else path.parent
    if image_root and not root.is_dir():
        raise BenchError(f"--image-root {root}: no such directory")
    items = []
    for key, rec in records.items():
        if not SAFE_NAME.match(key):
            raise BenchError(f"{path}: key {key!r} cannot name an output file")
        prompt = _text(path, f"key {key!r}", rec, "prompt")
        rel = _text(path, f"key {key!r}", rec, "id")
        image = root / rel
        if not image.is_file():
            raise BenchError(f"{path}: key {key!r} field 'id': no such image {image}")
        i = len(items)
        items.append(Item(i, prompt, [f"{key}.png"], [seed + i], image=image))
    if not items:
        raise BenchError(f"{path}: no edits")
    return items, [path]


def load_items(bench: str, data: Sequence[str], samples: int = DEFAULTS["samples"], seed: int = DEFAULTS["seed"],
               image_root: Optional[str] = None) -> Tuple[List[Item], List[Path]]:
    """The benchmark's prompts, in file order, and the files read."""
    if bench == "geneval":
        return geneval_items(data, samples, seed)
    if bench == "wise":
        return wise_items(data, seed)
    if bench == "imgedit":
        return imgedit_items(data, seed, image_root)
    raise BenchError(f"unknown benchmark {bench!r}: one of {', '.join(BENCHMARKS)}")


# ---------------------------------------------------------------------------------------
# identity, files
# ---------------------------------------------------------------------------------------
def file_sha256(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def weights_digest(ckpt: Path) -> Tuple[str, int]:
    """sha256 over (relative path, sha256) of every weight file of an export, and their bytes."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))
    h, size = hashlib.sha256(), 0
    for p in files:
        h.update(f"{p.relative_to(ckpt).as_posix()}\0{file_sha256(p)}\n".encode())
        size += p.stat().st_size
    return h.hexdigest(), size


def tmp_path(path: Path) -> Path:
    """A hidden sibling: no scorer reads it (GenEval's matches `\\d+\\.png` at the start)."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` then rename: a reader (or a re-run) sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    write(tmp)
    os.replace(tmp, path)


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))


def atomic_png(path: Path, image) -> None:
    atomic_write(path, lambda t: image.save(t, format="PNG"))


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
@dataclass
class Options:
    bench: str
    ckpt: str
    data: List[str]
    out: str
    steps: int = DEFAULTS["steps"]
    guidance: float = DEFAULTS["guidance"]
    seed: int = DEFAULTS["seed"]
    samples: int = DEFAULTS["samples"]
    batch_size: int = 8
    resolution: int = 0
    flow_shift: Optional[float] = None
    device: Optional[str] = None
    dtype: Optional[str] = None
    image_root: Optional[str] = None
    limit: int = 0
    grid: bool = True
    progress: bool = True


def check_options(o: Options) -> None:
    from unilip_ds.writable import unwritable
    why = unwritable(o.out)
    if why:  # before the weights are hashed and the pipeline loaded
        raise BenchError(f"--out {o.out}: {why}; choose a directory you can write")
    if not (Path(o.ckpt) / "model_index.json").is_file():
        raise BenchError(f"--ckpt {o.ckpt} is not a gen export (no model_index.json)")
    for name in ("steps", "samples", "batch_size"):
        if getattr(o, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1")
    if o.limit < 0:
        raise BenchError("--limit must be >= 0")
    if o.resolution and o.resolution % 28:
        raise BenchError(f"--resolution must be a multiple of 28 (the encoder's 14 px patches, "
                         f"pixel shuffle 0.5), got {o.resolution}")
    if o.flow_shift is not None and o.flow_shift <= 0:
        raise BenchError("--flow-shift must be > 0")
    if o.bench != "geneval" and o.samples != 1:
        o.samples = 1  # WISE and ImgEdit score one image per prompt


def _identity_keys() -> Tuple[str, ...]:
    """What decides the images: a re-run into the same --out must agree on all of them."""
    return ("benchmark", "weights_sha256", "data_sha256", "steps", "guidance", "seed", "samples_per_prompt",
            "resolution", "flow_shift", "dtype")


def _check_out(out: Path, run: dict) -> None:
    prev_file = out / "run.json"
    if not prev_file.is_file():
        if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise BenchError(f"--out {out} is not empty and holds no run.json of a benchmark run; "
                             "nothing was written")
        return
    try:
        prev = json.loads(prev_file.read_text())
    except json.JSONDecodeError:
        raise BenchError(f"--out {out}: run.json is not valid JSON; nothing was written") from None
    for k in _identity_keys():
        if prev.get(k) != run.get(k):
            raise BenchError(f"--out {out} holds a run with other settings ({k}: {prev.get(k)!r} there, "
                             f"{run.get(k)!r} now); use a new --out")


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, smoothing=0.1)


def _batches(pending: List[Tuple[Item, int]], size: int):
    for start in range(0, len(pending), size):
        yield pending[start:start + size]


def _grouped(batch: List[Tuple[Item, int]]) -> Tuple[List[Item], int]:
    """(prompts, images per prompt) when the batch is whole runs of equal length of distinct
    prompts (the usual case: one condition per prompt), else one row per image."""
    runs: List[List[Tuple[Item, int]]] = []
    for entry in batch:
        if runs and runs[-1][0][0] is entry[0]:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    n = len(runs[0])
    if all(len(r) == n for r in runs) and len({id(r[0][0]) for r in runs}) == len(runs):
        return [r[0][0] for r in runs], n
    return [it for it, _ in batch], 1


def _init_distributed():
    from unilip_ds.engine import dist
    if dist.world_size() <= 1:
        return None
    import torch
    import torch.distributed as tdist
    dist.ensure_env()
    if not tdist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(dist.local_rank())
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                 timeout=datetime.timedelta(hours=2))
    return tdist


def _gather(tdist, obj) -> List:
    if tdist is None:
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def run_bench(o: Options) -> dict:
    """Generate what is missing under o.out; returns run.json's content (rank 0's view)."""
    from unilip_ds.engine import dist
    check_options(o)
    items, files = load_items(o.bench, o.data, o.samples, o.seed, o.image_root)
    if o.limit:
        items = items[:o.limit]
    rank, world = dist.rank(), dist.world_size()
    out = Path(o.out)
    t_start = time.time()

    import torch
    device = o.device or (f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")
    dtype = o.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    # rank 0 alone reads every weight file (the others need no identity)
    digest, nbytes = weights_digest(Path(o.ckpt)) if rank == 0 else (None, None)
    export_json = Path(o.ckpt) / "export.json"
    t2i = o.bench != "imgedit"
    from unilip_ds.models.prompts import NULL_PROMPTS, TEMPLATES
    task = "t2i" if t2i else "edit"
    run = {"benchmark": o.bench, "ckpt": str(Path(o.ckpt).resolve()), "weights_sha256": digest,
           "weights_bytes": nbytes,
           "export": json.loads(export_json.read_text()) if export_json.is_file() else None,
           "data": [str(p.resolve()) for p in files], "data_sha256": {p.name: file_sha256(p) for p in files},
           "image_root": str(Path(o.image_root).resolve()) if o.image_root else None,
           "steps": o.steps, "guidance": o.guidance, "seed": o.seed, "samples_per_prompt": o.samples,
           "seed_rule": "image k of prompt i (file order): seed + i * samples_per_prompt + k",
           "prompt_template": TEMPLATES[task], "null_prompt": NULL_PROMPTS[task], "limit": o.limit,
           "dtype": dtype}

    index = json.loads((Path(o.ckpt) / "model_index.json").read_text())
    sched = Path(o.ckpt) / "scheduler" / "scheduler_config.json"
    run.update(resolution=o.resolution or index.get("resolution"),
               flow_shift=o.flow_shift if o.flow_shift is not None else
               (json.loads(sched.read_text()).get("flow_shift") if sched.is_file() else None))
    tdist = _init_distributed()
    error = None
    if rank == 0:
        try:
            _check_out(out, run)
        except BenchError as exc:
            error = str(exc)
    error = _gather(tdist, error)[0]  # every rank waits for rank 0's check before writing anything
    if error:
        raise BenchError(error)

    mine = items[rank::world]
    pending = [(it, k) for it in mine for k, rel in enumerate(it.outputs) if not (out / rel).is_file()]
    skipped = sum(len(it.outputs) for it in mine) - len(pending)
    pipe = _load_pipeline(o, run, device, dtype) if pending else None  # nothing to do: no model
    t_loaded = time.time()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_text(out / "run.json", json.dumps({**run, "complete": False, "started": _now()}, indent=1))
    for it in mine:
        if it.metadata is not None and not (out / it.folder / "metadata.jsonl").is_file():
            atomic_text(out / it.folder / "metadata.jsonl", json.dumps(it.metadata))
    generated, bar = 0, _progress(len(pending), o.progress and rank == 0)
    from PIL import Image
    for batch in _batches(pending, o.batch_size):
        prompts, n = _grouped(batch)
        gens = [torch.Generator().manual_seed(it.seeds[k]) for it, k in batch]
        refs = [Image.open(it.image).convert("RGB") for it in prompts] if not t2i else None
        images = pipe(prompt=[it.text for it in prompts], image=refs, num_inference_steps=o.steps,
                      guidance_scale=o.guidance, generator=gens, num_images_per_prompt=n).images
        for (it, k), im in zip(batch, images):
            atomic_png(out / it.outputs[k], im)
            if o.grid and it.folder is not None and k == len(it.outputs) - 1:
                _write_grid(out, it)
        generated += len(batch)
        bar.update(len(batch))
    bar.close()
    for it in mine:  # grids of prompts finished by an earlier run
        if o.grid and it.folder is not None and not (out / it.folder / "grid.png").is_file():
            _write_grid(out, it)
    t_done = time.time()
    stats = _gather(tdist, {"generated": generated, "skipped": skipped, "seconds": t_done - t_loaded,
                            "load_seconds": t_loaded - t_start, "device": device})
    if rank == 0:
        total = sum(len(it.outputs) for it in items)
        missing = sum(1 for it in items for rel in it.outputs if not (out / rel).is_file())
        gen = sum(s["generated"] for s in stats)
        busy = sum(s["seconds"] for s in stats)
        run.update(
            complete=missing == 0, prompts=len(items), images=total, missing=missing, generated=gen,
            skipped=sum(s["skipped"] for s in stats), world_size=world, batch_size=o.batch_size,
            devices=sorted({s["device"] for s in stats}), grid=o.grid and o.bench == "geneval",
            seconds={"load": round(max(s["load_seconds"] for s in stats), 2),
                     "generate": round(max(s["seconds"] for s in stats), 2),
                     "total": round(time.time() - t_start, 2)},
            seconds_per_image=round(busy / gen, 4) if gen else None,
            images_per_second=round(gen / max(max(s["seconds"] for s in stats), 1e-9), 4) if gen else None,
            started=_now(t_start), finished=_now())
        atomic_text(out / "run.json", json.dumps(run, indent=1))
    if tdist is not None:
        tdist.barrier()
        tdist.destroy_process_group()
    return run


def _load_pipeline(o: Options, run: dict, device: str, dtype: str):
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from unilip_ds.inference.pipeline import UniLIPPipeline
    pipe = UniLIPPipeline.from_pretrained(o.ckpt)
    if run["resolution"] != pipe.config.resolution:
        pipe.register_to_config(resolution=run["resolution"])
    if o.flow_shift is not None:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=o.flow_shift)
    pipe = pipe.to(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _write_grid(out: Path, it: Item) -> None:
    from PIL import Image

    from unilip_ds.inference.sampling import grid
    paths = [out / rel for rel in it.outputs]
    if all(p.is_file() for p in paths):
        atomic_png(out / it.folder / "grid.png", grid([[Image.open(p).convert("RGB") for p in paths]]))


def _now(t: Optional[float] = None) -> str:
    return datetime.datetime.fromtimestamp(t or time.time(), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", required=True, help="gen export directory (a UniLIPPipeline: launch/export.py "
                                                      "of a gen run, or unilip_ds.models.convert_gen)")
    common.add_argument("--data", required=True, nargs="+", help="the benchmark's files (see above)")
    common.add_argument("--out", required=True, help="output directory (new, or an earlier run's to resume)")
    common.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="DPM-Solver steps (20)")
    common.add_argument("--guidance", type=float, default=DEFAULTS["guidance"], help="CFG scale (4.5)")
    common.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="base seed (42)")
    common.add_argument("--batch-size", type=int, default=8, help="images per forward, per rank (8)")
    common.add_argument("--resolution", type=int, default=0,
                        help="image size (default: the export's, 448 for the 1b / 2b exports)")
    common.add_argument("--flow-shift", type=float, default=None,
                        help="sampling flow shift (default: the export's scheduler, 3.0 as the reference)")
    common.add_argument("--device", default=None, help="default: cuda:<local rank> if available, else cpu")
    common.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    common.add_argument("--limit", type=int, default=0, help="only the first N prompts (a smoke test)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap = argparse.ArgumentParser(prog="python -m unilip_ds.evaluation.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="bench", required=True, metavar="{geneval,wise,imgedit}")
    g = sub.add_parser("geneval", parents=[common], help="GenEval (prompt metadata JSONL)")
    g.add_argument("--samples", type=int, default=DEFAULTS["samples"], help="images per prompt (4)")
    g.add_argument("--no-grid", action="store_true", help="no grid.png per prompt")
    sub.add_parser("wise", parents=[common], help="WISE (its three data/*.json files)")
    e = sub.add_parser("imgedit", parents=[common], help="ImgEdit (singleturn.json + its images)")
    e.add_argument("--image-root", default=None, help="folder the 'id' paths are relative to "
                                                      "(default: the json's folder)")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    o = Options(bench=args.bench, ckpt=args.ckpt, data=list(args.data), out=args.out, steps=args.steps,
                guidance=args.guidance, seed=args.seed, samples=getattr(args, "samples", 1),
                batch_size=args.batch_size, resolution=args.resolution, flow_shift=args.flow_shift,
                device=args.device, dtype=args.dtype, image_root=getattr(args, "image_root", None),
                limit=args.limit, grid=not getattr(args, "no_grid", True), progress=not args.no_progress)
    try:
        run = run_bench(o)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from unilip_ds.engine import dist
    if dist.rank() == 0:
        print(json.dumps({k: run[k] for k in ("benchmark", "complete", "prompts", "images", "generated",
                                               "skipped", "missing", "seconds", "seconds_per_image")}
                         | {"out": str(Path(o.out).resolve())}))
    return 0 if run.get("complete", True) else 1


if __name__ == "__main__":
    sys.exit(main())
