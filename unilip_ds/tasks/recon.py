"""The recon task: train the UniLIP autoencoder (stages recon_stage1 / 2 / 2_448).

Engines:
  "model"  ReconModel: UniLIP + (stage 2) a frozen teacher copy of the original encoder +
           projector + the frozen perceptual nets; its forward returns the reconstruction
           and the generator-side loss terms.
  "disc"   DiscriminatorLoss, only when recon.gan_start_step >= 0; its own optimizer/LR.

Per micro-batch: phase "model" computes the weighted generator loss (+ the GAN generator
term from gan_start_step, with the discriminator's params frozen for that call) and caches
the detached reconstruction; phase "disc" trains the discriminator on it.
Heavy libraries are imported lazily: `unilip_ds.config` imports this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from unilip_ds.tasks.base import MAIN, ParamGroup, Task, register, split_decay

DISC = "disc"


class ReconModel(nn.Module):
    """The "model" engine's module. Frozen parts (teacher, perceptual nets, and in stage 1
    the encoder + projector) have requires_grad=False and stay in eval mode whatever
    `train()` is asked for."""

    def __init__(self, flavor, with_teacher: bool, train_encoder: bool):
        super().__init__()
        from unilip_ds.models.perceptual import PerceptualNets
        from unilip_ds.models.unilip import UniLIP, VisionPath
        self.unilip = UniLIP(flavor)
        self.train_encoder = train_encoder
        if not train_encoder:
            self.unilip.vision.requires_grad_(False)
        self.teacher = VisionPath(flavor).requires_grad_(False) if with_teacher else None
        self.perceptual = PerceptualNets(flavor.vgg_width_div, flavor.convnext_dims, flavor.convnext_depths,
                                         flavor.classifier_size)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        self.perceptual.eval()
        if not self.train_encoder:
            self.unilip.vision.eval()
        return self

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> {"recon", "loss/mse", "loss/lpips", "loss/logits"
        [, "loss/distill"]}; losses are fp32 scalars, unweighted."""
        dtype = self.unilip.adapter.down_mlp[1].weight.dtype  # bf16 runs have bf16 params
        x = images.to(dtype)
        target = images.float()
        # a frozen encoder needs no graph: stage 1 keeps no encoder activations
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            feats = self.unilip.features(x)
        recon = self.unilip.decode(self.unilip.latent_from_features(feats), size=tuple(x.shape[-2:]))
        out = {"recon": recon, "loss/mse": F.mse_loss(recon.float(), target)}
        out["loss/lpips"], out["loss/logits"] = self.perceptual(recon, target)
        if self.teacher is not None:
            with torch.no_grad():
                teacher_feats = self.teacher(self.unilip.normalize(x))
            out["loss/distill"] = F.mse_loss(feats.float(), teacher_feats.float())
        return out


@register
class ReconTask(Task):
    name = "recon"

    def __init__(self, cfg):
        super().__init__(cfg)
        from unilip_ds.config import ConfigError
        r, m = cfg.recon, cfg.model
        if r.distill_weight > 0 and not r.train_encoder:
            raise ConfigError("config key 'recon.distill_weight': self-distillation needs "
                              "recon.train_encoder=true (a frozen encoder equals its teacher)")
        if r.encoder_lr_scale <= 0:
            raise ConfigError(f"config key 'recon.encoder_lr_scale': must be > 0, got {r.encoder_lr_scale}")
        self._cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        # import the model libraries now, not inside build_modules: importing diffusers /
        # transformers under deepspeed.zero.Init (which patches tensor creation) fails
        import unilip_ds.models.discriminator  # noqa: F401
        import unilip_ds.models.perceptual  # noqa: F401
        import unilip_ds.models.unilip  # noqa: F401

    def check_inputs(self) -> None:
        from unilip_ds.config import ConfigError
        m = self.cfg.model
        if m.perceptual_pretrained:
            for key in ("vgg_path", "lpips_path", "convnext_path"):
                path = getattr(m, key)
                if not path or not Path(path).is_file():
                    raise ConfigError(f"config key 'model.{key}': model.perceptual_pretrained is set but "
                                      f"the file {path!r} does not exist")
        for key in ("internvl_path", "dcae_path"):
            path = getattr(m, key)
            if path and not Path(path).exists():
                raise ConfigError(f"config key 'model.{key}': no such path {path}")

    @property
    def with_teacher(self) -> bool:
        return self.cfg.recon.distill_weight > 0

    def gan_active(self, step: int) -> bool:
        start = self.cfg.recon.gan_start_step
        return start >= 0 and step >= start

    # -- building ---------------------------------------------------------------------
    def build_modules(self) -> Dict[str, nn.Module]:
        from unilip_ds.models.discriminator import DiscriminatorLoss, PatchDiscriminator
        from unilip_ds.models.flavors import get_flavor
        r = self.cfg.recon
        flavor = get_flavor(self.cfg.model.flavor)
        model = ReconModel(flavor, with_teacher=self.with_teacher, train_encoder=r.train_encoder)
        if self.cfg.model.grad_checkpointing:
            model.unilip.enable_gradient_checkpointing()
        modules: Dict[str, nn.Module] = {MAIN: model}
        if r.gan_start_step >= 0:
            disc = PatchDiscriminator(flavor.disc_channels, flavor.disc_mults, flavor.disc_groups)
            modules[DISC] = DiscriminatorLoss(disc, r.lecam_weight, r.lecam_decay)
        return modules

    def load_pretrained(self, modules: Mapping[str, nn.Module]) -> None:
        from unilip_ds.config import ConfigError
        from unilip_ds.models.unilip import load_internvl_vision
        m, model = self.cfg.model, modules[MAIN]
        if m.flavor != "tiny" and not m.init_from and not (m.internvl_path and m.dcae_path):
            raise ConfigError(f"config key 'model.internvl_path': flavor {m.flavor} needs model.internvl_path "
                              "and model.dcae_path (or model.init_from); random real-size models are not trained")
        if m.internvl_path:
            load_internvl_vision(model.unilip.vision, m.internvl_path)
        if m.dcae_path:
            model.unilip.dcae.load_dcae_weights(m.dcae_path)
        self._load_frozen(model)

    def init_from(self, modules: Mapping[str, nn.Module], path: str) -> None:
        """Student (encoder, projector, adapter, decoder) from the export at `path`; the frozen
        parts, which no export holds, from the config as for a fresh start."""
        super().init_from(modules, path)
        self._load_frozen(modules[MAIN])

    def _load_frozen(self, model: ReconModel) -> None:
        """The teacher is the ORIGINAL encoder + projector: the pretrained InternVL weights
        when model.internvl_path is given, else the student as it starts. The perceptual
        nets get their published weights (model.perceptual_pretrained)."""
        from unilip_ds.engine.weights import full_state_dict, load_state_dict_into
        from unilip_ds.models.unilip import load_internvl_vision
        m = self.cfg.model
        if model.teacher is not None:
            if m.internvl_path:
                load_internvl_vision(model.teacher, m.internvl_path)
            else:
                load_state_dict_into(model.teacher, full_state_dict(model.unilip.vision), what="teacher")
        if m.perceptual_pretrained:
            model.perceptual.load_pretrained(m.vgg_path, m.lpips_path, m.convnext_path)

    def param_groups(self, name: str, module: nn.Module) -> List[ParamGroup]:
        wd = self.cfg.optim.weight_decay
        if name != MAIN:
            return split_decay(module, name, wd)
        encoder = module.unilip.vision
        groups = split_decay(module, MAIN, wd, exclude={id(p) for p in encoder.parameters()})
        if self.cfg.recon.train_encoder:
            groups += split_decay(encoder, f"{MAIN}.encoder", wd, lr_scale=self.cfg.recon.encoder_lr_scale)
        return groups

    def engine_lr(self, name: str) -> float:
        return self.cfg.recon.disc_lr if name == DISC else self.cfg.optim.lr

    def engine_first_step(self, name: str) -> int:
        return max(0, self.cfg.recon.gan_start_step) if name == DISC else 0

    def set_train_mode(self, modules: Mapping[str, nn.Module]) -> None:
        for mod in modules.values():
            mod.train()  # ReconModel.train keeps its frozen parts in eval mode

    # -- stepping -----------------------------------------------------------------------
    def phases(self, step: int) -> List[str]:
        return [MAIN, DISC] if self.gan_active(step) else [MAIN]

    def loss(self, phase: str, batch: dict, step: int,
             engines: Mapping[str, nn.Module]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if phase == MAIN:
            return self._generator_loss(batch["image"], step, engines)
        if phase == DISC:
            if self._cache is None:
                raise RuntimeError("recon task: the 'disc' phase needs the 'model' phase of the same "
                                   "micro-batch first")
            real, fake = self._cache
            self._cache = None
            return engines[DISC](fake, real)
        raise ValueError(f"recon task: unknown phase '{phase}'")

    def _generator_loss(self, images, step, engines):
        r = self.cfg.recon
        out = engines[MAIN](images)
        perceptual = out["loss/lpips"] + r.logits_weight * out["loss/logits"]
        total = r.mse_weight * out["loss/mse"] + r.perceptual_weight * perceptual
        logs = {k: v.detach() for k, v in out.items() if k.startswith("loss/")}
        logs["loss/perceptual"] = perceptual.detach()
        if "loss/distill" in out:
            total = total + r.distill_weight * out["loss/distill"]
        if self.gan_active(step):
            # the bare module, not its engine: an engine's forward hooks its outputs into
            # that engine's backward bookkeeping, so the model engine's backward would run the
            # discriminator engine's gradient reduction too (ZeRO-2 fails on its empty buckets)
            disc = getattr(engines[DISC], "module", engines[DISC])
            params = list(disc.parameters())
            flags = [p.requires_grad for p in params]
            for p in params:  # the generator's GAN term must not leave grads on the discriminator
                p.requires_grad_(False)
            try:
                logits_fake = disc(out["recon"])
            finally:
                for p, f in zip(params, flags):
                    p.requires_grad_(f)
            from unilip_ds.models.discriminator import hinge_g_loss
            gan_g = hinge_g_loss(logits_fake.float())
            total = total + r.gan_weight * gan_g
            logs["loss/gan_g"] = gan_g.detach()
            self._cache = (images.detach(), out["recon"].detach())
        logs["loss/total"] = total.detach()
        return total, logs

    # -- evaluation / export ----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, engines: Mapping[str, nn.Module], batches) -> Dict[str, float]:
        from unilip_ds.evaluation.metrics import psnr, ssim
        model = getattr(engines[MAIN], "module", engines[MAIN])
        modes = {mod: mod.training for mod in model.modules()}
        model.eval()
        try:
            ps, ss = [], []
            dtype = model.unilip.adapter.down_mlp[1].weight.dtype
            for batch in batches:
                images = batch["image"]
                recon = model.unilip(images.to(dtype)).float().clamp(0, 1)
                ps.append(psnr(recon, images.float()))
                ss.append(ssim(recon, images.float()))
        finally:
            for mod, mode in modes.items():
                mod.training = mode
        if not ps:
            return {}
        return {"eval/psnr": torch.cat(ps).mean().item(), "eval/ssim": torch.cat(ss).mean().item(),
                "eval/images": float(sum(len(p) for p in ps))}

    def export_components(self, module: nn.Module) -> Dict[str, nn.Module]:
        return module.unilip.export_components()

    def components(self, modules: Mapping[str, nn.Module]) -> Dict[str, nn.Module]:
        model = modules[MAIN]
        vision = model.unilip.vision
        out = {"encoder (InternViT)": vision.vision_tower,
               "projector (mlp1)": vision.multi_modal_projector,
               "adapter": model.unilip.adapter, "decoder (DC-AE)": model.unilip.dcae,
               "perceptual (frozen)": model.perceptual}
        if model.teacher is not None:
            out["teacher (frozen)"] = model.teacher
        if DISC in modules:
            out["discriminator"] = modules[DISC]
        return out
