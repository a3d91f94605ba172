#!/usr/bin/env python
"""Wall time of each data set's data_prep command (README "Data") on replicas written in
the published layouts, `--samples` samples each at `--size` px (photos from
scikit-image, so they compress like photos):

    python data_prep/bench_prep.py --samples 10000 --size 256 --dir /tmp/prep_bench

  blip3o     shard_blip3o.py on webdataset tars of <key>.jpg + <key>.txt
  gpt_edit   shard_edit.py on a GPT-Image-Edit-1.5M task-folder tree (PNG input / output)
  llava      shard_edit.py on the reference's list file + LLaVA-style jsons (same images)
  sgpt_t2i   shard_sft.py --kind t2i on ShareGPT-4o-Image text_to_image.json (PNG in tars)
  sgpt_edit  shard_sft.py --kind edit on text_and_image_to_image.json

Prints one json line per command: seconds, samples written, seconds per 10k samples.
--resize is passed on to the commands; --workers likewise (default: all cores).
"""

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_all(root: Path, n: int, size: int, only=None) -> None:
    from PIL import ImageOps

    from unilip_ds.data.sample_images import jpeg_bytes, samples

    pool = samples(min(n, 200), size)  # captions carry the index: no two samples equal
    photos = [pool[i % len(pool)] for i in range(n)]
    want = lambda *names: not only or any(x in only for x in names)  # noqa: E731
    root.mkdir(parents=True)
    # BLIP3o: tars of 1000 samples
    (root / "blip3o").mkdir()
    for t in range(0, n if want("blip3o") else 0, 1000):
        with tarfile.open(root / "blip3o" / f"{t // 1000:05d}.tar", "w") as tar:
            for i in range(t, min(n, t + 1000)):
                _add(tar, f"{i:08d}.jpg", jpeg_bytes(photos[i].image))
                _add(tar, f"{i:08d}.txt", f"{photos[i].caption} ({i})".encode())
    # GPT-Image-Edit tree: 3 sources x 2 tasks; + list file and LLaVA jsons
    tasks = [("hqedit", "edit"), ("hqedit", "generate"), ("omniedit", "addition"),
             ("omniedit", "swap"), ("ultraedit", "edit"), ("ultraedit", "color")]
    ge = root / "GPT-Image-Edit-1.5M"
    (ge / "training_json").mkdir(parents=True)
    lines = []
    for k, (src, task) in enumerate(tasks if want("gpt_edit", "llava") else []):
        folder = ge / "gpt-edit" / src / task
        for d in ("input", "output", "metadata"):
            (folder / d).mkdir(parents=True)
        meta, llava = [], []
        for i in range(k, n, len(tasks)):
            rid = f"{src}_{task}_{i:08d}"
            (folder / "input" / f"{rid}.png").write_bytes(_png(photos[i].image))
            (folder / "output" / f"{rid}.png").write_bytes(_png(ImageOps.mirror(photos[i].image)))
            text = f"mirror the picture of {photos[i].caption} ({i})"
            meta.append({"id": rid, "dataset_source": src, "task": task,
                         "input": f"input/{rid}.png", "output": f"output/{rid}.png",
                         "instruction": text})
            llava.append({"id": rid, "image": [f"input/{rid}.png", f"output/{rid}.png"],
                          "conversations": [{"from": "human", "value": f"<image>\n{text}"},
                                            {"from": "gpt", "value": "<image>"}]})
        (folder / "metadata" / f"{src}_{task}.json").write_text(json.dumps(meta))
        (ge / "training_json" / f"{src}_gpt_{task}.json").write_text(json.dumps(llava))
        lines.append(f"gpt-edit/{src}/{task},training_json/{src}_gpt_{task}.json,false")
    (ge / "gptedit.txt").write_text("\n".join(lines) + "\n")
    # ShareGPT-4o-Image: jsons + images only in part tars
    sg = root / "ShareGPT-4o-Image"
    sg.mkdir()
    t2i, edit, images = [], [], []
    for i in range(n if want("sgpt_t2i", "sgpt_edit") else 0):
        t2i.append({"input_prompt": f"{photos[i].caption} ({i})",
                    "output_image": f"text_to_image/{i}.png"})
        images.append((f"text_to_image/{i}.png", photos[i].image))
        edit.append({"input_prompt": f"mirror it ({i})", "input_image": [f"text_and_image/{i}_in.png"],
                     "output_image": f"text_and_image/{i}.png"})
        images.append((f"text_and_image/{i}_in.png", photos[i].image))
        images.append((f"text_and_image/{i}.png", ImageOps.mirror(photos[i].image)))
    (sg / "text_to_image.json").write_text(json.dumps(t2i, indent=2))
    (sg / "text_and_image_to_image.json").write_text(json.dumps(edit, indent=2))
    per = max(1, len(images) // 5 + 1)
    for p in range(5):
        with tarfile.open(sg / f"images_part_{p + 1}.tar", "w") as tar:
            for name, im in images[p * per:(p + 1) * per]:
                _add(tar, name, _png(im))


def commands(root: Path, out: Path):
    py = [sys.executable]
    return {
        "blip3o": py + ["data_prep/shard_blip3o.py", "--src", f"{root}/blip3o/", "--dst",
                        f"{out}/blip3o"],
        "gpt_edit": py + ["data_prep/shard_edit.py", "--src",
                          f"{root}/GPT-Image-Edit-1.5M/gpt-edit", "--dst", f"{out}/gpt_edit"],
        "llava": py + ["data_prep/shard_edit.py", "--src",
                       f"{root}/GPT-Image-Edit-1.5M/gptedit.txt", "--dst", f"{out}/gpt_edit_ref"],
        "sgpt_t2i": py + ["data_prep/shard_sft.py", "--kind", "t2i", "--src",
                          f"{root}/ShareGPT-4o-Image/text_to_image.json", "--dst",
                          f"{out}/sharegpt_t2i"],
        "sgpt_edit": py + ["data_prep/shard_sft.py", "--kind", "edit", "--src",
                           f"{root}/ShareGPT-4o-Image/text_and_image_to_image.json", "--dst",
                           f"{out}/sharegpt_edit"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10000, help="samples per data set")
    p.add_argument("--size", type=int, default=256, help="image side (px)")
    p.add_argument("--resize", type=int, default=None, help="passed on to the commands")
    p.add_argument("--workers", type=int, default=0, help="passed on (0 = all cores)")
    p.add_argument("--dir", required=True, help="scratch folder (emptied first)")
    p.add_argument("--only", nargs="*", default=None, help="these commands only")
    args = p.parse_args()
    root = Path(args.dir)
    if root.exists():
        shutil.rmtree(root)
    t0 = time.time()
    write_all(root / "raw", args.samples, args.size, args.only)
    print(json.dumps({"wrote_replicas_s": round(time.time() - t0, 1)}), flush=True)
    extra = ["--no-progress", "--workers", str(args.workers)]
    if args.resize:
        extra += ["--resize", str(args.resize)]
    for name, cmd in commands(root / "raw", root / "out").items():
        if args.only and name not in args.only:
            continue
        t = time.time()
        proc = subprocess.run(cmd + extra, cwd=REPO, capture_output=True, text=True)
        secs = time.time() - t
        if proc.returncode:
            sys.stderr.write(proc.stderr[-3000:])
            return proc.returncode
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({"command": name, "seconds": round(secs, 1),
                          "samples": summary["samples"], "skipped": summary["skipped"],
                          "s_per_10k": round(secs * 10000 / max(1, summary["samples"]), 1)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
