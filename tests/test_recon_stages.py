"""The three recon stages as users chain them, 2 processes through launch/train.py: stage 2
(two engines, the GAN, the teacher) under ZeRO-2 (deepspeed launcher) and ZeRO-3 (torchrun),
both from one stage 1 export; stage 1 and recon_stage2_448 (stage 2's task at 448 px) under
ZeRO-3 (stage 1 under ZeRO-2: tests/test_training.py):

    recon_stage1      model.init_from=<init export> (vision = a saved tiny InternVL -hf's)
      -> export (EMA) -> recon_stage2      model.init_from=<stage1 export>, internvl_path
      -> export (EMA) -> recon_stage2_448  model.init_from=<stage2 export>, internvl_path

Every frozen tensor starts from a file the test wrote (the init export, the InternVL
checkpoint, the three perceptual weight files), so "did not change" is an exact comparison
with known values. The fp32 loss networks (teacher, perceptual nets) live outside the
engines: no checkpoint holds them, they are loaded from the config. Then the understanding check (evaluation/understanding.py) on the
stage 1 and stage 2 exports against that InternVL checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest
import torch

from tests.launch_util import check, run, tiny_recon_args
from unilip_ds.engine import checkpoint
from unilip_ds.engine.export import consolidated, export, raw_weights
from unilip_ds.engine.weights import full_state_dict, read_weights_dir, save_component
from unilip_ds.models.tiny_assets import bf16_exact

IMAGE_TOKEN = "<IMG_CONTEXT>"
GAN_KEYS = ("loss/gan_g", "loss/disc", "loss/lecam", "grad_norm/disc")
# ReconModel key prefix of each export component's keys / perceptual weight file's keys
EXPORT_PREFIX = {"vision": ("model.", "unilip.vision."), "adapter": ("", "unilip.adapter."),
                 "decoder": ("", "unilip.dcae.")}
PERCEPTUAL_PREFIX = {"vgg_path": "perceptual.lpips.vgg.", "lpips_path": "perceptual.lpips.heads.",
                     "convnext_path": "perceptual.convnext."}


# ---------------------------------------------------------------------------------------
# assets: files in the real layouts
# ---------------------------------------------------------------------------------------
def save_tiny_internvl(out: Path, seed: int = 0) -> Path:
    """A random tiny InternVLForConditionalGeneration in the -hf layout, with a word-level
    tokenizer that has InternVL's image / chat special tokens (real -hf repos ship one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerFast
    from unilip_ds.models.flavors import get_flavor, internvl_config

    special = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", IMAGE_TOKEN]
    words = "user assistant system describe the image in detail what is this a an of and . , ? \n".split(" ")
    vocab = {t: i for i, t in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=special[2:])
    config = internvl_config(get_flavor("tiny"))
    config.image_token_id = vocab[IMAGE_TOKEN]  # within the tiny vocabulary
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    bf16_exact(model)
    model.save_pretrained(str(out))
    fast.save_pretrained(str(out))
    return out


def save_perceptual(out: Path, seed: int = 1) -> Dict[str, str]:
    """Random tiny perceptual nets, one file each in the published layouts."""
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.perceptual import PerceptualNets
    f = get_flavor("tiny")
    torch.manual_seed(seed)
    nets = bf16_exact(PerceptualNets(f.vgg_width_div, f.convnext_dims, f.convnext_depths, f.classifier_size))
    out.mkdir(parents=True, exist_ok=True)
    files = {"vgg_path": out / "vgg16.pth", "lpips_path": out / "lpips_vgg.pth",
             "convnext_path": out / "convnext_small.pth"}
    torch.save(nets.lpips.vgg.state_dict(), files["vgg_path"])
    torch.save(nets.lpips.heads.state_dict(), files["lpips_path"])
    torch.save(nets.convnext.state_dict(), files["convnext_path"])
    return {k: str(v) for k, v in files.items()}


def save_init_export(out: Path, internvl: Path, seed: int = 2) -> Path:
    """A stage-0 export (launch/export.py layout): vision = the InternVL checkpoint's,
    adapter and decoder freshly initialised."""
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.unilip import UniLIP, load_internvl_vision
    torch.manual_seed(seed)
    unilip = bf16_exact(UniLIP(get_flavor("tiny")))
    load_internvl_vision(unilip.vision, internvl)
    for name, comp in unilip.export_components().items():
        save_component(comp, out / name)
    return out


def export_weights(export_dir: Path) -> Dict[str, torch.Tensor]:
    """An export's tensors under ReconModel's keys (unilip.*)."""
    out = {}
    for comp, (strip, prefix) in EXPORT_PREFIX.items():
        for k, v in read_weights_dir(export_dir / comp).items():
            out[prefix + k[len(strip):]] = v.float()
    return out


@dataclass
class Assets:
    shards: str
    internvl: Path
    perceptual: Dict[str, str]
    init: Path
    images: Path

    def frozen_known(self) -> Dict[str, torch.Tensor]:
        """ReconModel keys of the perceptual nets and the teacher, from the files."""
        out = {}
        for key, prefix in PERCEPTUAL_PREFIX.items():
            out.update({prefix + k: v.float() for k, v in
                        torch.load(self.perceptual[key], weights_only=True).items()})
        from unilip_ds.models.unilip import internvl_vision_state_dict
        out.update({"teacher." + k: v.float() for k, v in internvl_vision_state_dict(self.internvl).items()})
        return out

    def args(self, preset: str, out: Path, zero: int, steps: int, *extra: str):
        a = tiny_recon_args(out, self.shards, steps=steps, ds=f"ds_configs/zero{zero}.json", extra=[
            "model.perceptual_pretrained=true", *(f"model.{k}={v}" for k, v in self.perceptual.items()),
            *extra])
        a[a.index("--config") + 1] = preset
        return a


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    from unilip_ds.data.sample_images import load_photo, write_caption_tars
    d = tmp_path_factory.mktemp("assets")
    write_caption_tars(d / "shards", count=24, per_tar=6, size=256)
    internvl = save_tiny_internvl(d / "InternVL3-tiny-hf")
    (d / "images").mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        load_photo(name).save(d / "images" / name)
    return Assets(str(d / "shards"), internvl, save_perceptual(d / "perceptual"),
                  save_init_export(d / "init", internvl), d / "images")


def metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(assets: Assets, preset: str, out: Path, zero: int, steps: int, *extra: str) -> Path:
    launcher = "deepspeed" if zero == 2 else "torchrun"
    check(run("launch/train.py", assets.args(preset, out, zero, steps, *extra), nproc=2, launcher=launcher))
    return out


def assert_unchanged(weights, known, what):
    assert known, what
    for k, v in known.items():
        assert torch.equal(weights[k].float(), v), f"{what}: {k} changed"


def assert_adam_steps(weights, start, lrs, scale_of):
    """Every element moved by at most sum(lr_t) x its group's scale (Adam moves an element by
    <= lr per step; 1% + 1e-7 slack for rounding), from `start` as the run held it (bf16)."""
    for k, w0 in start.items():
        bound = sum(lrs) * scale_of(k) * 1.01 + 1e-7
        d = (weights[k].float() - w0.bfloat16().float()).abs().max().item()
        assert d <= bound, f"{k}: moved {d:.3g} > {bound:.3g} from the init_from export"


# ---------------------------------------------------------------------------------------
# the chain: stage 2 once per ZeRO stage
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def stage1(assets, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("stage1_zero3")
    train(assets, "recon_stage1", d / "run", 3, 2, f"model.init_from={assets.init}")
    export(d / "run", d / "export")
    return d


@pytest.fixture(scope="module")
def stage2(assets, zero, stage1, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp(f"stage2_zero{zero}")
    # GAN from 0-based step 1; a checkpoint per step, so the first step can be looked at
    train(assets, "recon_stage2", d / "run", zero, 3, f"model.init_from={stage1 / 'export'}",
          f"model.internvl_path={assets.internvl}", "recon.gan_start_step=1",
          "checkpoint.every_steps=1", "checkpoint.keep_last=3")
    export(d / "run", d / "export")
    return d


@pytest.fixture(scope="module")
def stage448(assets, zero, stage2, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp(f"stage448_zero{zero}")
    # the preset's real 448 px (tiny_recon_args pins 224: put it back), micro batch 1, one
    # step (~3 s for the tiny flavor on 2 cores): the GAN and the distillation from the start
    return train(assets, "recon_stage2_448", d / "run", zero, 1, f"model.init_from={stage2 / 'export'}",
                 f"model.internvl_path={assets.internvl}", "data.resolution=448", "train.micro_batch_size=1")


def test_stage1_frozen_encoder_and_perceptual_exact_trainable_move(assets, stage1):
    run_dir = stage1 / "run"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss/distill",) + GAN_KEYS:
        assert not any(key in r for r in rows), key
    cfg, weights, _ = consolidated(run_dir, use_ema=False)
    assert not cfg.recon.train_encoder and cfg.data.resolution == 224
    assert not any(k.startswith("teacher.") for k in weights)
    init = export_weights(assets.init)
    assert set(weights) == set(init)  # every tensor has a known start; no loss network inside
    assert_unchanged(weights, {k: v for k, v in init.items() if k.startswith("unilip.vision.")},
                     "frozen encoder + projector")
    trainable = [k for k in init if not k.startswith("unilip.vision.")]
    moved = [k for k in trainable if not torch.equal(weights[k].float(), init[k])]
    assert moved == trainable, sorted(set(trainable) - set(moved))[:5]
    assert list((run_dir / "checkpoints" / "step_00000002").glob("disc")) == []  # no GAN engine


def test_stage2_encoder_lr_teacher_distill_gan_onset_init_from(assets, stage1, stage2):
    run_dir = stage2 / "run"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # phases(step) sees the 0-based step about to run; rows carry the count of finished steps:
    # gan_start_step=1 -> absent from row 1, present from row 2 on
    for key in GAN_KEYS:
        assert [key in r for r in rows] == [False, True, True], key
    assert all("loss/distill" in r and "lr/disc" in r for r in rows)
    # student and teacher start with equal weights (stage 1 froze the encoder; the teacher
    # is the InternVL checkpoint), the fp32 teacher vs the bf16 student: only bf16 rounding
    # at the first step, more once the encoder moved
    assert 0 <= rows[0]["loss/distill"] < rows[2]["loss/distill"] < 1e-3

    _, weights, _ = consolidated(run_dir, use_ema=False)
    assert not any(k.startswith(("teacher.", "perceptual.")) for k in weights)
    start = export_weights(stage1 / "export")
    # the LeCam EMAs are fp32 in the bf16 run (also built under zero.Init at ZeRO-3)
    emas = [state["module"] for f in sorted((checkpoint.ckpt_root(run_dir) / "step_00000003" / "disc")
                                            .glob("*model_states.pt"))
            for state in [torch.load(f, map_location="cpu", weights_only=False)]
            if state.get("module") and "lecam.real" in state["module"]]
    assert emas
    for saved in emas:
        assert saved["lecam.real"].dtype == torch.float32 and saved["lecam.fake"].dtype == torch.float32
        assert saved["lecam.real"].item() != 0

    # the first step, against the init_from export (as the bf16 run held it): with Adam
    # every element moves by ~lr x its group's scale; the encoder + projector's is 0.1
    lr1 = rows[0]["lr/model"]
    first = raw_weights(checkpoint.ckpt_root(run_dir) / "step_00000001", "model")
    scale = lambda k: 0.1 if k.startswith("unilip.vision.") else 1.0  # noqa: E731
    assert_adam_steps(first, start, [lr1], scale)  # also: init_from reached every (partitioned) param
    encoder = [k for k in start if k.startswith("unilip.vision.")]
    rest = [k for k in start if k not in encoder]
    for what, keys, s in (("encoder + projector", encoder, 0.1), ("adapter + decoder", rest, 1.0)):
        d = torch.cat([(first[k].float() - start[k].bfloat16().float()).abs().flatten() for k in keys])
        assert d.median().item() == pytest.approx(s * lr1, rel=0.02), what
        assert (d > 0.5 * s * lr1).float().mean() > 0.8, what  # (tiny gradients: Adam's eps)
    # the discriminator trains from its first phase on
    disc = [raw_weights(checkpoint.ckpt_root(run_dir) / f"step_0000000{i}", "disc") for i in (1, 2)]
    assert any(not torch.equal(disc[0][k], disc[1][k]) for k in disc[0] if k.startswith("disc."))


# once, under ZeRO-3: the 448 preset is stage 2's task at another resolution (its ZeRO-2 run,
# the slowest of the chain, tested nothing the stage 2 runs do not)
@pytest.mark.parametrize("zero", [3], ids=["zero3"], indirect=True)
def test_stage2_448_gan_from_start_teacher_fixed(assets, stage2, stage448):
    rows = metrics(stage448)
    assert [r["step"] for r in rows] == [1]
    for key in GAN_KEYS + ("loss/distill",):
        assert all(key in r for r in rows), key
    cfg, weights, _ = consolidated(stage448, use_ema=False)
    assert cfg.data.resolution == 448 and cfg.model.grad_checkpointing and cfg.recon.gan_start_step == 0
    assert not any(k.startswith(("teacher.", "perceptual.")) for k in weights)
    start = export_weights(stage2 / "export")
    lrs = [r["lr/model"] for r in rows]
    assert_adam_steps(weights, start, lrs, lambda k: 0.1 if k.startswith("unilip.vision.") else 1.0)
    assert any(not torch.equal(weights[k].float(), start[k].bfloat16().float()) for k in start
               if k.startswith("unilip.vision."))


def test_frozen_parts_come_from_the_config_also_under_init_from(assets, tmp_path):
    """The teacher is the ORIGINAL encoder (the InternVL checkpoint, or a recon_stage1 export
    of it) and the perceptual nets carry the configured weights, all fp32, on a fresh start
    and when starting from an export (which holds neither). Single process, plain modules."""
    from unilip_ds.config import load_config, to_yaml
    from unilip_ds.tasks.base import MAIN, build_task
    known = assets.frozen_known()
    perceptual = {k[len("perceptual."):]: v for k, v in known.items() if k.startswith("perceptual.")}
    teacher = {k[len("teacher."):]: v for k, v in known.items() if k.startswith("teacher.")}
    stage1_like = tmp_path / "stage1_export"  # a recon_stage1 export: vision = the InternVL's
    for comp in ("vision", "adapter", "decoder"):
        save_component_dir = assets.init / comp
        (stage1_like / comp).mkdir(parents=True)
        for f in save_component_dir.iterdir():
            (stage1_like / comp / f.name).write_bytes(f.read_bytes())
    cfg1 = load_config("recon_stage1", ["model.flavor=tiny", "model.perceptual_pretrained=false"], world_size=1)
    (stage1_like / "config.yaml").write_text(to_yaml(cfg1))
    for init_from, source in ((None, f"model.internvl_path={assets.internvl}"),
                              (assets.init, f"model.internvl_path={assets.internvl}"),
                              (assets.init, f"recon.teacher_path={stage1_like}")):
        overrides = ["model.flavor=tiny", "model.perceptual_pretrained=true", source,
                     *(f"model.{k}={v}" for k, v in assets.perceptual.items())]
        task = build_task(load_config("recon_stage2", overrides, world_size=1))
        task.check_inputs()
        torch.manual_seed(3)
        model = task.build_modules()[MAIN]
        if init_from is None:
            task.load_pretrained({MAIN: model})
        else:
            task.init_from({MAIN: model}, str(init_from))
        what = f"(init_from={init_from}, {source})"
        assert_unchanged(model.perceptual.state_dict(), perceptual, f"perceptual nets {what}")
        assert_unchanged(full_state_dict(model.teacher), teacher, f"teacher {what}")
        assert {p.dtype for p in model.teacher.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------------
# understanding: the exports against the original InternVL (the teacher)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero", [3], ids=["zero3"], indirect=True)
def test_understanding_kept_through_stage2(assets, zero, stage1, stage2, tmp_path, capsys):
    from unilip_ds.evaluation.understanding import evaluate, main
    images = [str(assets.images), str(assets.images / "coffee.png")]
    # before stage 2: stage 1 froze encoder + projector, so the MLLM is exactly the original
    before = evaluate(stage1 / "export", assets.internvl, images)
    assert before["images"] == 4 and before["image_tokens"] == 64  # 224 px: 16x16 patches, shuffled
    assert before["feature_mse"] == 0.0 and before["logits_mse"] == 0.0 and before["top1_agreement"] == 1.0

    # after stage 2, through the CLI's main (in process): the encoder moved, self-distillation
    # kept it close
    out = tmp_path / "understanding.json"
    capsys.readouterr()
    assert main(["--export", str(stage2 / "export"), "--internvl", str(assets.internvl), "--images", *images,
                 "--prompt", "what is in the image ?", "--out", str(out)]) == 0
    after = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):]) == after
    distill = metrics(stage2 / "run")[-1]["loss/distill"]
    print(f"ZeRO-{zero} feature MSE to the teacher: before stage 2 {before['feature_mse']:.3g}, after "
          f"{after['feature_mse']:.3g} (relative {after['feature_rel_mse']:.3g}; last logged distill "
          f"{distill:.3g}); top-1 agreement {after['top1_agreement']:.3f}, hidden cosine "
          f"{after['hidden_cosine']:.6f}")
    assert 0 < after["feature_mse"] and after["feature_rel_mse"] < 1e-3
    assert after["feature_cosine"] > 0.999 and after["hidden_cosine"] > 0.999
    assert after["top1_agreement"] > 0.9 and after["images"] == 4


def test_understanding_detects_a_different_encoder_and_rejects_bad_input(assets, tmp_path, capsys):
    from unilip_ds.evaluation.understanding import evaluate, main
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.unilip import UniLIP
    torch.manual_seed(7)  # an encoder that is not the teacher: the check must see it
    other = tmp_path / "other"
    for name, comp in UniLIP(get_flavor("tiny")).export_components().items():
        save_component(comp, other / name)
    res = evaluate(other, assets.internvl, [str(assets.images)])
    assert res["feature_rel_mse"] > 0.1 and res["feature_cosine"] < 0.9 and res["hidden_cosine"] < 0.999

    (tmp_path / "empty").mkdir()
    for argv, msg in ((["--export", str(other), "--images", str(tmp_path / "empty")], "no images found"),
                      (["--export", str(tmp_path), "--images", str(assets.images)], "not a recon export"),
                      (["--export", str(other), "--images", str(tmp_path / "nope.png")], "no such file"),
                      (["--export", str(other), "--images", str(assets.images), "--resolution", "100"],
                       "multiple of 28")):
        capsys.readouterr()
        assert main(argv + ["--internvl", str(assets.internvl)]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
