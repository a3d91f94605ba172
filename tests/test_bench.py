"""Generation benchmarks (unilip_ds.evaluation.bench) on a tiny gen export, with tiny benchmark
files in each benchmark's real format (GenEval's prompt metadata JSONL as the reference's
geneval_prompt.jsonl and GenEval's own evaluation_metadata.jsonl; WISE's three data/*.json;
ImgEdit's singleturn.json + images): the scorers' layouts and file names, the reference's
prompts / null prompts and settings, run.json, the same images for 1 and 2 ranks (torchrun)
and for other batch sizes, resume after a SIGKILL mid-run, one-line errors for bad files."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.launch_util import check, run

GENEVAL_LINES = [  # the reference's eval/geneval/geneval_prompt.jsonl format (its first lines, shortened)
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench",
     "detailed_caption": "A clear photo of a wooden bench.", "index": "00000"},
    {"tag": "two_object", "include": [{"class": "cow", "count": 1}, {"class": "bicycle", "count": 1}],
     "prompt": "a photo of a cow and a bicycle", "detailed_caption": "A cow next to a bicycle.", "index": "00001"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car",
     "detailed_caption": "A red car.", "index": "00002"},
]
WISE = {
    "cultural_common_sense.json": [{"prompt_id": 1, "Prompt": "Traditional food of the Mid-Autumn Festival",
                                    "Explanation": "Mooncakes", "Category": "Cultural knowledge",
                                    "Subcategory": "Festival"}],
    "natural_science.json": [{"prompt_id": 401, "Prompt": "Ice left in the sun for an hour",
                              "Explanation": "A puddle of water", "Category": "Natural science",
                              "Subcategory": "Physics"}],
    "spatio-temporal_reasoning.json": [{"prompt_id": 701, "Prompt": "The Eiffel Tower at midnight",
                                        "Explanation": "Dark sky, tower lit", "Category": "Spatio-temporal",
                                        "Subcategory": "Time"}],
}
IMGEDIT = {"1082": {"id": "animal/000342021.jpg", "prompt": "Change the cat's fur to white.", "edit_type": "adjust"},
           "673": {"id": "style/000278574.jpg", "prompt": "Turn it into a ukiyo-e woodblock print.",
                   "edit_type": "style"}}
FAST = ["--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def gen_export(gen_assets, tmp_path_factory):
    """A tiny gen_stage2 model (pretrained parts loaded as a fresh stage would), exported once."""
    from unilip_ds.config import load_config, to_yaml
    from unilip_ds.tasks.base import MAIN, build_task
    cfg = load_config("gen_stage2", gen_assets.overrides("unilip") + [
        "data.train.sources=[]", "data.train.urls=[/nonexistent]", "train.precision=fp32"])
    task = build_task(cfg)
    modules = task.build_modules()
    task.load_pretrained(modules)
    out = tmp_path_factory.mktemp("bench") / "gen_export"
    out.mkdir()
    task.write_export(modules[MAIN], out)
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "export.json").write_text(json.dumps({"source": "tiny", "step": 0}))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_files")
    (root / "geneval_prompt.jsonl").write_text("".join(json.dumps(m) + "\n" for m in GENEVAL_LINES))
    # GenEval's own prompts/evaluation_metadata.jsonl has no "index": folders are line numbers
    (root / "evaluation_metadata.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in m.items() if k in ("tag", "include", "prompt")}) + "\n"
                for m in GENEVAL_LINES))
    (root / "WISE" / "data").mkdir(parents=True)
    for name, records in WISE.items():
        (root / "WISE" / "data" / name).write_text(json.dumps(records, indent=2))
    single = root / "Benchmark" / "singleturn"
    from skimage import data as skdata
    for rec, img in zip(IMGEDIT.values(), (skdata.chelsea(), skdata.coffee())):
        (single / rec["id"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(single / rec["id"])
    (single / "singleturn.json").write_text(json.dumps(IMGEDIT, indent=4))
    return root


def bench(*args) -> int:
    from unilip_ds.evaluation.bench import main
    return main([str(a) for a in args])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def pngs(root: Path):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def hidden(root: Path):
    return sorted(p.name for p in root.rglob(".*"))


def same_images(a: Path, b: Path, names) -> None:
    for name in names:
        # an image depends on its seed alone; batched float rounding may move a level
        assert np.abs(pixels(a / name) - pixels(b / name)).max() <= 1, name


def geneval_args(gen_export, files):
    return ["--ckpt", gen_export, "--data", files / "geneval_prompt.jsonl", "--samples", 2, *FAST]


@pytest.fixture(scope="module")
def geneval_out(gen_export, files, tmp_path_factory):
    """3 prompts x 2 samples, 4 images per forward, in one process."""
    out = tmp_path_factory.mktemp("geneval") / "out"
    assert bench("geneval", *geneval_args(gen_export, files), "--out", out, "--batch-size", 4) == 0
    return out


def test_geneval_layout_prompts_and_run_json(gen_export, files, geneval_out):
    out = geneval_out
    samples = [f"{m['index']}/samples/{k:05d}.png" for m in GENEVAL_LINES for k in range(2)]
    assert pngs(out) == sorted(samples + [f"{m['index']}/grid.png" for m in GENEVAL_LINES])
    assert hidden(out) == []  # no temporary file left
    for m in GENEVAL_LINES:  # what GenEval's evaluate_images.py reads: json.load(metadata.jsonl)
        assert json.loads((out / m["index"] / "metadata.jsonl").read_text()) == m
    with Image.open(out / "00000/samples/00000.png") as im:
        assert im.size == (224, 224) and im.mode == "RGB"
    assert np.abs(pixels(out / "00000/samples/00000.png") - pixels(out / "00000/samples/00001.png")).mean() > 1
    with Image.open(out / "00000" / "grid.png") as im:
        assert im.size == (448, 224)

    r = json.loads((out / "run.json").read_text())
    h = hashlib.sha256()
    for p in sorted(gen_export.rglob("*.safetensors")):
        h.update(f"{p.relative_to(gen_export).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    assert r["weights_sha256"] == h.hexdigest() and r["ckpt"] == str(gen_export.resolve())
    assert r["export"] == {"source": "tiny", "step": 0}
    assert r["data_sha256"] == {"geneval_prompt.jsonl": hashlib.sha256(
        (files / "geneval_prompt.jsonl").read_bytes()).hexdigest()}
    # the reference's settings are the defaults
    assert (r["guidance"], r["seed"], r["resolution"], r["flow_shift"], r["steps"]) == (4.5, 42, 224, 3.0, 2)
    assert r["prompt_template"] == "Generate an image: {}" and r["null_prompt"] == "Generate an image."
    assert (r["complete"], r["prompts"], r["images"], r["generated"], r["skipped"], r["world_size"]) == \
        (True, 3, 6, 6, 0, 1)
    assert r["seconds"]["generate"] > 0 and r["seconds_per_image"] > 0

    from unilip_ds.evaluation.bench import load_items
    items, _ = load_items("geneval", [str(files / "evaluation_metadata.jsonl")], samples=4)
    assert [it.outputs[3] for it in items] == [f"{i:05d}/samples/00003.png" for i in range(3)]
    assert [it.text for it in items] == [m["prompt"] for m in GENEVAL_LINES]  # "prompt", not the detailed one


def test_wise_and_imgedit_layouts_prompts_and_seeds(gen_export, files, tmp_path):
    from unilip_ds.inference.pipeline import UniLIPPipeline
    wise, edit = tmp_path / "wise", tmp_path / "imgedit"
    assert bench("wise", "--ckpt", gen_export, "--data", files / "WISE" / "data", "--out", wise, *FAST) == 0
    assert pngs(wise) == ["1.png", "401.png", "701.png"]
    assert bench("imgedit", "--ckpt", gen_export, "--data", files / "Benchmark/singleturn/singleturn.json",
                 "--out", edit, "--batch-size", 2, *FAST) == 0
    assert pngs(edit) == ["1082.png", "673.png"] and hidden(wise) + hidden(edit) == []
    r = json.loads((edit / "run.json").read_text())
    assert r["prompt_template"] == "Edit the image: {}\n<image>" and r["null_prompt"] == "Edit the image.\n<image>"
    assert r["samples_per_prompt"] == 1 and r["images"] == 2

    # each image is the pipeline's, on the raw prompt (the pipeline adds the template), the
    # input image, guidance 4.5 and the seed 42 + its position in the file
    pipe = UniLIPPipeline.from_pretrained(str(gen_export))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(42 + 2)
    im = pipe(prompt=[WISE["spatio-temporal_reasoning.json"][0]["Prompt"]], num_inference_steps=2,
              guidance_scale=4.5, generator=[g]).images[0]
    assert np.abs(np.asarray(im, dtype=np.int16) - pixels(wise / "701.png")).max() <= 1
    src = Image.open(files / "Benchmark/singleturn" / IMGEDIT["673"]["id"])
    im = pipe(prompt=[IMGEDIT["673"]["prompt"]], image=[src], num_inference_steps=2, guidance_scale=4.5,
              generator=[torch.Generator().manual_seed(42 + 1)]).images[0]
    assert np.abs(np.asarray(im, dtype=np.int16) - pixels(edit / "673.png")).max() <= 1


def test_prompts_are_the_references(gen_export):
    """The sequences the pipeline conditions on are the reference's add_template strings
    (eval/*/geneval.py, wise.py, imgedit.py), image tokens where its <image> is."""
    from unilip_ds.inference.pipeline import UniLIPPipeline
    pipe = UniLIPPipeline.from_pretrained(str(gen_export))
    builder, tok = pipe.prompt_builder(), pipe.tokenizer

    def ref(content):
        image = "<img>" + "<IMG_CONTEXT>" * (224 // 28) ** 2 + "</img>"
        text = ("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n<img>").format(input=content)
        return tok(text.replace("<image>", image), add_special_tokens=False)["input_ids"]

    p = "a photo of a bench"
    for task, text, content in (("t2i", p, f"Generate an image: {p}"), ("t2i", None, "Generate an image."),
                                ("edit", p, f"Edit the image: {p}\n<image>"), ("edit", None, "Edit the image.\n<image>")):
        assert builder(task, [text]).input_ids[0].tolist() == ref(content), (task, text)


def _killed_run(argv, out: Path, after: int) -> list:
    """bench in a forked process, SIGKILLed once `after` images exist; the images it left."""
    def child():
        torch.set_num_threads(1)
        from unilip_ds.evaluation.bench import main
        os._exit(main(argv))
    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    deadline = time.time() + 120
    while time.time() < deadline and proc.is_alive():
        if len(list(out.rglob("samples/*.png"))) >= after:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL, "the run ended before it could be killed"
    return sorted(out.rglob("samples/*.png"))


def test_same_images_over_ranks_and_batches_and_resume_after_kill(gen_export, files, geneval_out, tmp_path):
    data = geneval_args(gen_export, files) + ["--no-grid"]
    one, two, killed = geneval_out, tmp_path / "two", tmp_path / "killed"
    names = [n for n in pngs(one) if "/samples/" in n]  # 1 rank, 4 images per forward
    assert len(names) == 6

    # 2 ranks under torchrun, 3 images per forward: prompts split over ranks, same images
    check(run("-m", ["unilip_ds.evaluation.bench", "geneval", *map(str, data), "--out", str(two),
                     "--batch-size", "3"], nproc=2, launcher="torchrun"))
    assert pngs(two) == names
    same_images(one, two, names)
    r = json.loads((two / "run.json").read_text())
    assert (r["world_size"], r["generated"], r["complete"], r["batch_size"]) == (2, 6, True, 3)

    # SIGKILL mid-run, then resume with another batch size
    left = _killed_run([str(a) for a in ["geneval", *data, "--out", killed, "--batch-size", 1]], killed, 2)
    assert 2 <= len(left) < 6
    for p in left:  # every image there is whole
        with Image.open(p) as im:
            im.load()
    before = {p.relative_to(killed).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in left}
    assert bench("geneval", *data, "--out", killed, "--batch-size", 5) == 0
    r = json.loads((killed / "run.json").read_text())
    assert (r["skipped"], r["generated"], r["complete"]) == (len(left), 6 - len(left), True)
    assert {k: ((killed / k).stat().st_ino, (killed / k).stat().st_mtime_ns) for k in before} == before
    assert pngs(killed) == names and hidden(killed) == []
    same_images(one, killed, names)
    # a re-run of a finished --out has nothing to do
    assert bench("geneval", *data, "--out", killed) == 0
    assert json.loads((killed / "run.json").read_text())["generated"] == 0


def _error(capsys, *args) -> str:
    capsys.readouterr()
    assert bench(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_inputs_are_one_line_errors(gen_export, files, tmp_path, capsys):
    ck = ["--ckpt", str(gen_export)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GENEVAL_LINES[0]) + "\n" + json.dumps({"tag": "colors", "text": "x"}) + "\n")
    assert "bad.jsonl: line 2 has no 'prompt' field" in _error(capsys, "geneval", *ck, "--data", bad, "--out",
                                                               tmp_path / "o")
    assert "nope.jsonl: no such file" in _error(capsys, "geneval", *ck, "--data", tmp_path / "nope.jsonl",
                                                "--out", tmp_path / "o")
    wise = tmp_path / "wise"
    wise.mkdir()
    for name, records in WISE.items():
        (wise / name).write_text(json.dumps(records))
    (wise / "natural_science.json").write_text(json.dumps([{"Prompt": "x"}]))
    assert "natural_science.json: item 0 has no 'prompt_id' field" in _error(
        capsys, "wise", *ck, "--data", wise, "--out", tmp_path / "o")
    (wise / "natural_science.json").unlink()
    assert "natural_science.json: no such file" in _error(capsys, "wise", *ck, "--data", wise, "--out", tmp_path / "o")
    edit = tmp_path / "singleturn.json"
    edit.write_text(json.dumps({"5": {"id": "animal/missing.jpg", "prompt": "x"}}))
    assert "singleturn.json: key '5' field 'id': no such image" in _error(
        capsys, "imgedit", *ck, "--data", edit, "--out", tmp_path / "o")
    edit.write_text(json.dumps({"5": {"id": "animal/000342021.jpg"}}))
    assert "singleturn.json: key '5' has no 'prompt' field" in _error(
        capsys, "imgedit", *ck, "--data", edit, "--image-root", files / "Benchmark/singleturn", "--out", tmp_path / "o")
    assert "not a gen export" in _error(capsys, "wise", "--ckpt", files, "--data", files / "WISE/data",
                                        "--out", tmp_path / "o")
    # another run's --out with other settings: refused before anything is loaded or written
    out = tmp_path / "prev"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"benchmark": "wise", "steps": 20}))
    assert "holds a run with other settings" in _error(capsys, "wise", *ck, "--data", files / "WISE/data",
                                                       "--out", out)
    assert not (tmp_path / "o").exists() and os.listdir(out) == ["run.json"]
