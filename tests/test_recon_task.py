"""The recon task driven single-process with plain modules (engines = the modules)."""

import numpy as np
import pytest
import torch
from skimage import data as skdata
from transformers import InternVLForConditionalGeneration

from unilip_ds.config import ConfigError, load_config
from unilip_ds.engine.weights import full_state_dict, save_component
from unilip_ds.models.flavors import get_flavor, internvl_config
from unilip_ds.tasks.base import MAIN, build_task

BASE = ["model.flavor=tiny", "model.perceptual_pretrained=false"]


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


def test_stage2_groups_distill_gan_and_teacher():
    task, mods = make("recon_stage2", "recon.gan_start_step=3")
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


def test_bf16_params_fp32_losses():
    task, mods = make("recon_stage2", "recon.gan_start_step=0")
    for m in mods.values():
        m.to(torch.bfloat16)
    loss, logs = task.loss(MAIN, batch(), 0, mods)
    assert loss.dtype == torch.float32 and logs["loss/mse"].dtype == torch.float32
    dloss, _ = task.loss("disc", batch(), 0, mods)
    assert dloss.dtype == torch.float32


def test_448_preset_checkpointing_keeps_grads():
    task, mods = make("recon_stage2_448")
    model = mods[MAIN]
    assert model.unilip.vision.vision_tower.is_activation_checkpointing
    loss, _ = task.loss(MAIN, batch(1, 56), 0, mods)
    loss.backward()
    assert model.unilip.vision.vision_tower.embeddings.patch_embeddings.projection.weight.grad is not None
    assert model.unilip.dcae.decoder.conv_in.weight.grad is not None


def test_export_init_from_roundtrip_and_teacher(tmp_path):
    task, mods = make("recon_stage1")
    with torch.no_grad():  # make the student differ from any fresh init
        for p in mods[MAIN].unilip.parameters():
            p.add_(0.01)
    for name, comp in task.export_components(mods[MAIN]).items():
        save_component(comp, tmp_path / "export" / name)
    expected = full_state_dict(mods[MAIN].unilip)

    # stage 2 from the export, no InternVL path: the teacher is the initial student
    task2, mods2 = make("recon_stage2")
    task2.init_from(mods2, str(tmp_path / "export"))
    got = full_state_dict(mods2[MAIN].unilip)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    for k, v in full_state_dict(mods2[MAIN].teacher).items():
        assert torch.equal(v, expected[f"vision.{k}"])

    # with the pretrained InternVL given, the teacher is the ORIGINAL encoder
    hf = InternVLForConditionalGeneration(internvl_config(get_flavor("tiny")))
    hf.save_pretrained(tmp_path / "internvl")
    task3, mods3 = make("recon_stage2", f"model.internvl_path={tmp_path / 'internvl'}")
    task3.init_from(mods3, str(tmp_path / "export"))
    t = full_state_dict(mods3[MAIN].teacher)
    ref = hf.state_dict()
    assert torch.equal(t["multi_modal_projector.linear_1.weight"], ref["model.multi_modal_projector.linear_1.weight"])
    assert torch.equal(full_state_dict(mods3[MAIN].unilip)["vision.multi_modal_projector.linear_1.weight"],
                       expected["vision.multi_modal_projector.linear_1.weight"])


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
