"""The recon task driven single-process with plain modules (engines = the modules)."""

import numpy as np
import pytest
import torch
from skimage import data as skdata
from transformers import InternVLForConditionalGeneration

from unilip_ds.config import ConfigError, load_config, to_yaml
from unilip_ds.engine.weights import full_state_dict, save_component
from unilip_ds.models.flavors import get_flavor, internvl_config
from unilip_ds.tasks.base import MAIN, build_task

BASE = ["model.flavor=tiny", "model.perceptual_pretrained=false"]


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    """A random tiny InternVL -hf checkpoint: the original encoder + projector (the teacher)."""
    d = tmp_path_factory.mktemp("internvl")
    torch.manual_seed(11)
    InternVLForConditionalGeneration(internvl_config(get_flavor("tiny"))).save_pretrained(d)
    return d


def make(preset, *overrides):
    torch.manual_seed(0)
    task = build_task(load_config(preset, BASE + list(overrides), world_size=1))
    modules = task.build_modules()
    task.set_train_mode(modules)
    return task, modules


def optimizer(task, modules, name=MAIN):
    groups = task.param_groups(name, modules[name])
    lr = task.engine_lr(name)
    return torch.optim.AdamW([{"params": g.params, "lr": lr * g.lr_scale, "weight_decay": g.weight_decay}
                              for g in groups]), groups


def batch(n=2, res=112):
    return {"image": torch.rand(n, 3, res, res), "__key__": [f"k{i}" for i in range(n)]}


def test_stage1_encoder_frozen_in_eval_and_unchanged():
    task, mods = make("recon_stage1")
    model = mods[MAIN]
    assert set(mods) == {MAIN} and model.teacher is None and task.phases(10**6) == [MAIN]
    assert not model.unilip.vision.training and model.unilip.adapter.training
    opt, groups = optimizer(task, mods)
    enc_ids = {id(p) for p in model.unilip.vision.parameters()}
    assert not any(id(p) in enc_ids for g in groups for p in g.params)
    before = full_state_dict(model.unilip.vision)
    adapter_before = model.unilip.adapter.down_mlp[1].weight.detach().clone()
    loss, logs = task.loss(MAIN, batch(), 0, mods)
    assert set(logs) >= {"loss/mse", "loss/lpips", "loss/logits", "loss/total"}
    assert "loss/distill" not in logs and "loss/gan_g" not in logs
    assert all(not v.requires_grad for v in logs.values())
    loss.backward()
    assert all(p.grad is None for p in model.unilip.vision.parameters())
    assert all(p.grad is None for p in model.perceptual.parameters())
    opt.step()
    for k, v in full_state_dict(model.unilip.vision).items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(model.unilip.adapter.down_mlp[1].weight, adapter_before)
    model.train()  # whatever the trainer does, the frozen encoder stays in eval mode
    assert not model.unilip.vision.training


def test_stage2_groups_distill_gan_and_teacher(internvl):
    task, mods = make("recon_stage2", "recon.gan_start_step=3", f"recon.teacher_path={internvl}")
    model, disc = mods[MAIN], mods["disc"]
    assert model.teacher is not None and not model.teacher.training
    opt, groups = optimizer(task, mods)
    scales = {g.name: g.lr_scale for g in groups}
    assert scales["model.encoder"] == pytest.approx(0.1) and scales["model"] == 1.0
    enc = {id(p) for p in model.unilip.vision.parameters()}
    assert {id(p) for g in groups if g.name.startswith("model.encoder") for p in g.params} == enc
    assert task.engine_lr("disc") == pytest.approx(1e-4)
    dopt, _ = optimizer(task, mods, "disc")
    teacher_before = full_state_dict(model.teacher)
    b = batch()

    assert task.phases(2) == [MAIN]
    loss, logs = task.loss(MAIN, b, 2, mods)
    assert "loss/distill" in logs and "loss/gan_g" not in logs
    loss.backward()
    opt.step()
    opt.zero_grad()

    assert task.phases(3) == [MAIN, "disc"]
    loss, logs = task.loss(MAIN, b, 3, mods)
    assert "loss/gan_g" in logs
    loss.backward()
    # the generator's GAN term reached the generator, not the discriminator
    assert model.unilip.dcae.decoder.conv_out.weight.grad is not None
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # toggled back
    opt.step()
    opt.zero_grad(set_to_none=True)
    dloss, dlogs = task.loss("disc", b, 3, mods)
    assert {"loss/disc", "loss/lecam"} <= set(dlogs)
    dloss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert all(p.grad is None for p in model.parameters())  # the cached recon is detached
    dopt.step()
    for k, v in full_state_dict(model.teacher).items():
        assert torch.equal(v, teacher_before[k]), k
    with pytest.raises(RuntimeError, match="'model' phase"):
        task.loss("disc", b, 3, mods)


def test_bf16_params_fp32_losses_and_loss_networks(internvl):
    task, mods = make("recon_stage2", "recon.gan_start_step=0", f"recon.teacher_path={internvl}")
    for m in mods.values():
        m.to(torch.bfloat16)
    loss, logs = task.loss(MAIN, batch(), 0, mods)
    assert loss.dtype == torch.float32 and logs["loss/mse"].dtype == torch.float32
    # the teacher, LPIPS-VGG and the ConvNeXt are fp32 whatever the trained model's precision
    # (they are no part of any engine's module: nothing casts or partitions them)
    model = mods[MAIN]
    assert model.unilip.dcae.decoder.conv_in.weight.dtype == torch.bfloat16
    for net in (model.teacher, model.perceptual):
        assert {p.dtype for p in net.parameters()} == {torch.float32}
    ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in model.teacher.parameters())
    assert not any(id(p) in ids for p in model.perceptual.parameters())
    assert not any(k.startswith(("teacher.", "perceptual.")) for k in model.state_dict())
    dloss, _ = task.loss("disc", batch(), 0, mods)
    assert dloss.dtype == torch.float32


def test_448_preset_checkpointing_keeps_grads(internvl):
    task, mods = make("recon_stage2_448", f"model.internvl_path={internvl}")
    model = mods[MAIN]
    assert model.unilip.vision.vision_tower.is_activation_checkpointing
    loss, _ = task.loss(MAIN, batch(1, 56), 0, mods)
    loss.backward()
    assert model.unilip.vision.vision_tower.embeddings.patch_embeddings.projection.weight.grad is not None
    assert model.unilip.dcae.decoder.conv_in.weight.grad is not None


def test_export_init_from_roundtrip_and_teacher(tmp_path, internvl):
    task, mods = make("recon_stage1")
    with torch.no_grad():  # make the student differ from any fresh init
        for p in mods[MAIN].unilip.parameters():
            p.add_(0.01)
    for name, comp in task.export_components(mods[MAIN]).items():
        save_component(comp, tmp_path / "export" / name)
    (tmp_path / "export" / "config.yaml").write_text(to_yaml(task.cfg))  # a recon_stage1 export
    expected = full_state_dict(mods[MAIN].unilip)

    # stage 2 from the export, the teacher from the same recon_stage1 export (its encoder is
    # the original): the teacher is the export's encoder + projector
    task2, mods2 = make("recon_stage2", f"recon.teacher_path={tmp_path / 'export'}")
    task2.check_inputs()
    task2.init_from(mods2, str(tmp_path / "export"))
    got = full_state_dict(mods2[MAIN].unilip)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    for k, v in full_state_dict(mods2[MAIN].teacher).items():
        assert torch.equal(v, expected[f"vision.{k}"])

    # with the pretrained InternVL given (model.internvl_path), the teacher is the ORIGINAL
    # encoder, not the student that init_from loaded
    task3, mods3 = make("recon_stage2", f"model.internvl_path={internvl}")
    task3.init_from(mods3, str(tmp_path / "export"))
    t = full_state_dict(mods3[MAIN].teacher)
    ref = {k: v for k, v in InternVLForConditionalGeneration.from_pretrained(internvl).state_dict().items()}
    assert torch.equal(t["multi_modal_projector.linear_1.weight"], ref["model.multi_modal_projector.linear_1.weight"])
    assert torch.equal(full_state_dict(mods3[MAIN].unilip)["vision.multi_modal_projector.linear_1.weight"],
                       expected["vision.multi_modal_projector.linear_1.weight"])

    # the 448 stage started from a stage-2 export: without a teacher path it is an error (it
    # used to distil to the stage-2 encoder), and a stage-2 export is refused as the teacher
    stage2_export = tmp_path / "export2"
    for name, comp in task2.export_components(mods2[MAIN]).items():
        save_component(comp, stage2_export / name)
    (stage2_export / "config.yaml").write_text(to_yaml(task2.cfg))
    t448 = build_task(load_config("recon_stage2_448", BASE + [f"model.init_from={stage2_export}"], world_size=1))
    with pytest.raises(ConfigError, match="recon.teacher_path"):
        t448.check_inputs()
    m448 = t448.build_modules()
    t448.init_from(m448, str(stage2_export))
    with pytest.raises(ConfigError, match="recon.teacher_path"):
        t448.loss(MAIN, batch(1, 56), 0, m448)
    bad = build_task(load_config("recon_stage2_448", BASE + [f"recon.teacher_path={stage2_export}"], world_size=1))
    with pytest.raises(ConfigError, match="trained the encoder"):
        bad.check_inputs()


def test_distillation_term_is_against_the_teacher(internvl):
    """loss/distill = MSE(student projector output, the InternVL checkpoint's on the same
    images, fp32); a student-vs-itself term (0 here) fails."""
    from unilip_ds.models.unilip import VisionPath, load_internvl_vision
    task, mods = make("recon_stage2", f"model.internvl_path={internvl}")
    b = batch(2, 56)
    _, logs = task.loss(MAIN, b, 0, mods)
    teacher = VisionPath(get_flavor("tiny")).eval()
    load_internvl_vision(teacher, internvl)
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(mods[MAIN].unilip.features(b["image"]),
                                            teacher(mods[MAIN].unilip.normalize(b["image"])))
    assert want.item() > 1e-3
    assert logs["loss/distill"].item() == pytest.approx(want.item(), rel=1e-5)


def test_total_loss_weights_match_the_reference(internvl):
    """total = MSE + (LPIPS + 0.1 x logits) + distill + 0.1 x GAN: the reference's perceptual
    module averages (1.0 x LPIPS + 0.1 x logits) / 1.1 and the loss weighs it by 1.1."""
    task, mods = make("recon_stage2", "recon.gan_start_step=0", f"model.internvl_path={internvl}")
    _, logs = task.loss(MAIN, batch(), 0, mods)
    want = logs["loss/mse"] + logs["loss/lpips"] + 0.1 * logs["loss/logits"] + logs["loss/distill"] \
        + 0.1 * logs["loss/gan_g"]
    assert logs["loss/total"].item() == pytest.approx(want.item(), rel=1e-6)
    assert logs["loss/perceptual"].item() == pytest.approx(
        ((logs["loss/lpips"] + 0.1 * logs["loss/logits"]) / 1.1).item(), rel=1e-6)


def test_weight_decay_only_on_weight_matrices(internvl):
    """AdamW decay (1e-4) on conv / linear weights; none on biases, norms, embeddings, layer
    scales (the reference's exclusion rule: ndim < 2, bias, norm, embed, gamma, ln)."""
    task, mods = make("recon_stage2", "recon.gan_start_step=0", f"model.internvl_path={internvl}")
    for name in (MAIN, "disc"):
        groups = task.param_groups(name, mods[name])
        decay_of = {id(p): g.weight_decay for g in groups for p in g.params}
        named = [(n, p) for n, p in mods[name].named_parameters() if p.requires_grad]
        assert set(decay_of) == {id(p) for _, p in named}
        for n, p in named:
            excluded = p.ndim < 2 or any(s in n for s in ("bias", "norm", "embed", "gamma", "ln"))
            assert decay_of[id(p)] == (0.0 if excluded else pytest.approx(1e-4)), n
        assert any(v == 0.0 for v in decay_of.values()) and any(v > 0 for v in decay_of.values())


def test_ema_decay_schedule_and_values():
    """EMA decay 0 at the first update, then min(0.999, (1 + t) / (10 + t)) at update t = 1, 2,
    ... (the reference's EMAModel); values after three known updates (a constant decay gives
    other values)."""
    from unilip_ds.engine.ema import EMA
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, max_decay=0.999)
    shadow, decays = 0.0, []
    for t, w in enumerate((1.0, 2.0, 4.0)):
        with torch.no_grad():
            lin.weight.fill_(w)
        d = ema.decay()
        decays.append(d)
        ema.update()
        shadow = d * shadow + (1 - d) * w
    assert decays == pytest.approx([0.0, 2 / 11, 3 / 12])
    assert ema.shadow["weight"].item() == pytest.approx(shadow, rel=1e-6)
    assert ema.shadow["weight"].item() == pytest.approx(
        (1.0 * 2 / 11 + 9 / 11 * 2.0) * 0.25 + 0.75 * 4.0, rel=1e-6)
    ema.updates = 10 ** 6
    assert ema.decay() == 0.999


def test_config_errors(tmp_path):
    task = build_task(load_config("recon_stage1", ["model.flavor=tiny"], world_size=1))
    with pytest.raises(ConfigError, match="model.vgg_path"):
        task.check_inputs()  # named files are checked before training (not for a dry run)
    with pytest.raises(ConfigError, match="recon.distill_weight"):
        build_task(load_config("recon_stage1", BASE + ["recon.distill_weight=1.0"], world_size=1))
    with pytest.raises(ConfigError, match="model.dcae_path"):
        build_task(load_config("recon_stage1", BASE + [f"model.dcae_path={tmp_path / 'x'}"],
                               world_size=1)).check_inputs()
    task = build_task(load_config("recon_stage1", ["model.perceptual_pretrained=false"], world_size=1))
    with torch.device("meta"):
        mods = task.build_modules()
    with pytest.raises(ConfigError, match="model.internvl_path"):
        task.load_pretrained(mods)  # real-size flavor without weights


def test_training_raises_psnr():
    """A short AdamW run on two natural images must clearly improve reconstructions."""
    task, mods = make("recon_stage1")
    imgs = [skdata.astronaut(), skdata.chelsea()]
    x = torch.stack([torch.from_numpy(np.ascontiguousarray(i[:300, :300:, :])).permute(2, 0, 1).float() / 255
                     for i in imgs])
    x = torch.nn.functional.interpolate(x, size=(56, 56), mode="area")
    b = {"image": x, "__key__": ["astronaut", "chelsea"]}
    groups = task.param_groups(MAIN, mods[MAIN])
    opt = torch.optim.AdamW([{"params": g.params, "lr": 3e-3 * g.lr_scale} for g in groups])
    before = task.evaluate(mods, [b])
    for step in range(80):
        loss, _ = task.loss(MAIN, b, step, mods)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.evaluate(mods, [b])
    assert mods[MAIN].training  # evaluate restores the train mode
    assert after["eval/psnr"] > before["eval/psnr"] + 5, (before, after)
    assert after["eval/ssim"] > before["eval/ssim"]
