"""The recon task: train the UniLIP autoencoder (stages recon_stage1 / 2 / 2_448).

Engines:
  "model"  ReconModel: UniLIP (the student); its forward returns the reconstruction and the
           generator-side loss terms, computed with fp32 frozen loss networks (LPIPS-VGG,
           ConvNeXt-S and, with self-distillation, the original encoder + projector as the
           teacher) that live outside every engine.
  "disc"   DiscriminatorLoss, only when recon.gan_start_step >= 0; its own optimizer/LR.

Per micro-batch: phase "model" computes the weighted generator loss (+ the GAN generator
term from gan_start_step, with the discriminator's params frozen for that call) and caches
the detached reconstruction; phase "disc" trains the discriminator on it.
Heavy libraries are imported lazily: `unilip_ds.config` imports this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from unilip_ds.tasks.base import MAIN, ParamGroup, Task, eval_mode, register, split_decay

DISC = "disc"
SAMPLE_IMAGES = 8  # per grid row (train.sample_every)
# model.perceptual_pretrained: the published files of the frozen perceptual nets
PERCEPTUAL_FILES = {"vgg_path": "torchvision's VGG16 weights (vgg16-397923af.pth)",
                    "lpips_path": "the LPIPS head (lpips weights/v0.1/vgg.pth)",
                    "convnext_path": "torchvision's ConvNeXt-S weights (convnext_small-0c510722.pth)"}


class ReconModel(nn.Module):
    """The "model" engine's module: UniLIP (the student, what trains and is exported) and its
    forward that returns the reconstruction and the generator-side loss terms.

    The frozen loss networks (the distillation teacher = the original encoder + projector,
    LPIPS-VGG and the ConvNeXt-S) are NOT submodules: DeepSpeed never sees them, so they stay
    fp32 whatever the training precision (the reference computes its losses with autocast
    off; a bf16 teacher puts rounding noise of the distillation MSE's own size into it), are
    not partitioned, cast or checkpointed. They are built and loaded on first use, outside
    any zero.Init, from the config (`frozen_loader`), identical on every rank and after a
    resume; each rank holds a full fp32 copy (see the README for the memory)."""

    def __init__(self, flavor, with_teacher: bool, train_encoder: bool,
                 frozen_loader: Optional[Callable[["FrozenNets"], None]] = None, frozen_seed: int = 0):
        super().__init__()
        from unilip_ds.models.unilip import UniLIP
        self.unilip = UniLIP(flavor)
        self.train_encoder = train_encoder
        if not train_encoder:
            self.unilip.vision.requires_grad_(False)
        self.flavor = flavor
        self.with_teacher = with_teacher
        self.frozen_loader = frozen_loader
        self.frozen_seed = frozen_seed
        self.__dict__["_frozen"] = None  # not a submodule (see the class doc)

    def frozen(self, device: Optional[torch.device] = None) -> "FrozenNets":
        if self.__dict__["_frozen"] is None:
            with torch.random.fork_rng(devices=[]):  # random stand-ins: the same on every rank
                torch.manual_seed(self.frozen_seed)
                nets = FrozenNets(self.flavor, self.with_teacher)
            if self.frozen_loader is not None:
                self.frozen_loader(nets)
            self.__dict__["_frozen"] = nets
        nets = self.__dict__["_frozen"]
        if device is not None and nets.device != device:
            nets.to(device)
        return nets

    @property
    def teacher(self):
        return self.frozen().teacher if self.with_teacher else None

    @property
    def perceptual(self):
        return self.frozen().perceptual

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_encoder:
            self.unilip.vision.eval()
        return self

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> {"recon", "loss/mse", "loss/lpips", "loss/logits"
        [, "loss/distill"]}; losses are fp32 scalars, unweighted."""
        dtype = self.unilip.adapter.down_mlp[1].weight.dtype  # bf16 runs have bf16 params
        frozen = self.frozen(images.device)
        x = images.to(dtype)
        target = images.float()
        # a frozen encoder needs no graph: stage 1 keeps no encoder activations
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            feats = self.unilip.features(x)
        recon = self.unilip.decode(self.unilip.latent_from_features(feats), size=tuple(x.shape[-2:]))
        out = {"recon": recon, "loss/mse": F.mse_loss(recon.float(), target)}
        out["loss/lpips"], out["loss/logits"] = frozen.perceptual(recon.float(), target)
        if frozen.teacher is not None:
            out["loss/distill"] = distill_loss(feats, frozen.teacher, target)
        return out


class FrozenNets(nn.Module):
    """The fp32 loss networks: `perceptual` (LPIPS-VGG + ConvNeXt-S) and, with
    self-distillation, `teacher` (a VisionPath holding the original encoder + projector)."""

    def __init__(self, flavor, with_teacher: bool):
        super().__init__()
        from unilip_ds.models.perceptual import PerceptualNets
        from unilip_ds.models.unilip import VisionPath
        self.perceptual = PerceptualNets(flavor.vgg_width_div, flavor.convnext_dims, flavor.convnext_depths,
                                         flavor.classifier_size)
        self.teacher = VisionPath(flavor) if with_teacher else None
        self.float().requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True):
        return super().train(False)


def distill_loss(student_feats: torch.Tensor, teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MSE between the student's projector output and the fp32 teacher's on the same images
    (in [0, 1]; the teacher gets them in fp32, ImageNet-normalised, as the reference's)."""
    from unilip_ds.models.unilip import IMAGENET_MEAN, IMAGENET_STD, normalize
    with torch.no_grad():
        target = teacher(normalize(images.float(), IMAGENET_MEAN, IMAGENET_STD))
    return F.mse_loss(student_feats.float(), target.float())


def _is_recon_export(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "vision").is_dir()


def check_teacher_path(cfg) -> str:
    """The teacher's path (recon.teacher_path, else model.internvl_path), checked; raises
    ConfigError with one line naming the key."""
    from unilip_ds.config import ConfigError
    key = "recon.teacher_path" if cfg.recon.teacher_path else "model.internvl_path"
    path = cfg.recon.teacher_path or cfg.model.internvl_path
    if not path:
        raise ConfigError("config key 'recon.teacher_path': self-distillation (recon.distill_weight > 0) "
                          "needs the original encoder: set recon.teacher_path (or model.internvl_path) to "
                          "an InternVL checkpoint or a recon_stage1 export")
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config key '{key}': no such path {path}")
    if _is_recon_export(p):
        from omegaconf import OmegaConf
        exported = OmegaConf.load(p / "config.yaml")
        if OmegaConf.select(exported, "recon.train_encoder", default=False):
            raise ConfigError(f"config key '{key}': the export {path} comes from a run that trained the "
                              "encoder; the teacher must be the original encoder (an InternVL checkpoint "
                              "or a recon_stage1 export)")
    return str(path)


def check_start_weights(cfg) -> None:
    """A real-size model starts from pretrained weights or an export, never random."""
    from unilip_ds.config import ConfigError
    m = cfg.model
    if m.flavor != "tiny" and not m.init_from and not (m.internvl_path and m.dcae_path):
        raise ConfigError(f"config key 'model.internvl_path': flavor {m.flavor} needs model.internvl_path "
                          "and model.dcae_path (or model.init_from); random real-size models are not trained")


def load_teacher(teacher: nn.Module, path: str) -> None:
    """The original encoder + projector into `teacher` (a VisionPath), from an InternVL
    checkpoint or the `vision/` component of a recon export."""
    from unilip_ds.engine.weights import load_component
    from unilip_ds.models.unilip import HFVisionLayout, load_internvl_vision
    p = Path(path)
    if _is_recon_export(p):
        load_component(HFVisionLayout(teacher), p / "vision")
    else:
        load_internvl_vision(teacher, p)


@register
class ReconTask(Task):
    name = "recon"

    def __init__(self, cfg):
        super().__init__(cfg)
        from unilip_ds.config import ConfigError
        r = cfg.recon
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
        from unilip_ds.config import ConfigError, warn
        from unilip_ds.models import weight_checks as W
        m = self.cfg.model
        if m.perceptual_pretrained:
            for key, what in PERCEPTUAL_FILES.items():
                path = getattr(m, key)
                if not path:
                    raise ConfigError(f"config key 'model.{key}': model.perceptual_pretrained=true needs {what}: "
                                      f"set model.{key}=<file>, or model.perceptual_pretrained=false to train "
                                      "with random perceptual nets (tests only)")
                if not Path(path).is_file():
                    raise ConfigError(f"config key 'model.{key}': no such file {path} ({what})")
        for key in ("internvl_path", "dcae_path"):
            path = getattr(m, key)
            if path and not Path(path).exists():
                raise ConfigError(f"config key 'model.{key}': no such path {path}")
        if m.init_from and not Path(m.init_from).exists():
            raise ConfigError(f"config key 'model.init_from': no such path {m.init_from}")
        if m.init_from:
            missing = [c for c in ("vision", "adapter", "decoder") if not (Path(m.init_from) / c).is_dir()]
            if missing:
                raise ConfigError(f"config key 'model.init_from': {m.init_from} is not a recon export "
                                  f"(no {', '.join(c + '/' for c in missing)}; launch/export.py writes one)")
        elif self.cfg.recon.train_encoder:  # stage 2 and later start from a stage's export
            msg = "a stage that trains the encoder starts from a recon export (model.init_from=<export>)"
            if m.flavor != "tiny":
                raise ConfigError(f"config key 'model.init_from': {msg}")
            warn(f"model.init_from is not set: {msg}; this tiny run starts from random weights")
        check_start_weights(self.cfg)
        # inside every file the run will read: its loader, run on the headers (weight_checks)
        if m.init_from:
            W.check_recon_export("model.init_from", m.init_from, m.flavor)
        else:
            if m.internvl_path:
                W.check_internvl_vision("model.internvl_path", m.internvl_path, m.flavor)
            if m.dcae_path:
                W.check_dcae_decoder("model.dcae_path", m.dcae_path, m.flavor)
        if self.with_teacher:
            path = check_teacher_path(self.cfg)
            W.check_teacher("recon.teacher_path" if self.cfg.recon.teacher_path else "model.internvl_path",
                            path, m.flavor)
        if m.perceptual_pretrained:
            W.check_perceptual({k: getattr(m, k) for k in PERCEPTUAL_FILES}, m.flavor, PERCEPTUAL_FILES)
        ip = self.cfg.recon.inception_path
        if ip and not Path(ip).is_file():
            raise ConfigError(f"config key 'recon.inception_path': no such file {ip}")
        if ip:
            W.check_inception("recon.inception_path", ip)

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
        model = ReconModel(flavor, with_teacher=self.with_teacher, train_encoder=r.train_encoder,
                           frozen_loader=self._load_frozen, frozen_seed=self.cfg.run.seed)
        if self.cfg.model.grad_checkpointing:
            model.unilip.enable_gradient_checkpointing()
        modules: Dict[str, nn.Module] = {MAIN: model}
        if r.gan_start_step >= 0:
            disc = PatchDiscriminator(flavor.disc_channels, tuple(flavor.disc_mults), flavor.disc_groups)
            modules[DISC] = DiscriminatorLoss(disc, r.lecam_weight, r.lecam_decay)
        return modules

    def load_pretrained(self, modules: Mapping[str, nn.Module]) -> None:
        from unilip_ds.models.unilip import load_internvl_vision
        check_start_weights(self.cfg)
        m, model = self.cfg.model, modules[MAIN]
        if m.internvl_path:
            load_internvl_vision(model.unilip.vision, m.internvl_path)
        if m.dcae_path:
            model.unilip.dcae.load_dcae_weights(m.dcae_path)

    def _load_frozen(self, nets: FrozenNets) -> None:
        """The frozen loss networks' weights, from the config alone (a fresh start, init_from
        and a resume get the same): the teacher is the ORIGINAL encoder + projector
        (recon.teacher_path, else model.internvl_path; never the student as it starts, which
        after init_from is a previous stage's encoder); the perceptual nets get their
        published weights (model.perceptual_pretrained), else stay the seeded random ones."""
        m = self.cfg.model
        if nets.teacher is not None:
            load_teacher(nets.teacher, check_teacher_path(self.cfg))
        if m.perceptual_pretrained:
            nets.perceptual.load_pretrained(m.vgg_path, m.lpips_path, m.convnext_path)

    def frozen_sources(self) -> Dict[str, Optional[List[str]]]:
        """The frozen encoder + projector (recon.train_encoder=false: recon_stage1) from the
        init_from export's vision/ or the InternVL checkpoint; and the loss networks outside
        the engines (the teacher, the published perceptual weights), checked alike."""
        m, out = self.cfg.model, {}
        if not self.cfg.recon.train_encoder:
            if m.init_from:
                out["model.init_from"] = [str(Path(m.init_from) / "vision")]
            else:
                out["model.internvl_path"] = [m.internvl_path] if m.internvl_path else None
        if self.with_teacher:
            key = "recon.teacher_path" if self.cfg.recon.teacher_path else "model.internvl_path"
            path = self.cfg.recon.teacher_path or m.internvl_path
            if path:  # the teacher as load_teacher reads it
                out[key] = [str(Path(path) / "vision")] if _is_recon_export(Path(path)) else [path]
        if m.perceptual_pretrained:
            out.update({f"model.{key}": [getattr(m, key)] for key in PERCEPTUAL_FILES})
        return out

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
        # the reference's perceptual module averages its terms: (1.0 x LPIPS + 0.1 x logits) / 1.1
        perceptual = (out["loss/lpips"] + r.logits_weight * out["loss/logits"]) / (1.0 + r.logits_weight)
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
        """The paper's metrics on held-out batches (evaluation/recon.py's ReconMetrics: uint8
        rounding, PSNR, SSIM, the reference's SSIM, and rFID when recon.inception_path is set)."""
        from unilip_ds.evaluation.recon import ReconMetrics
        from unilip_ds.models.unilip import reconstruct_any
        model = getattr(engines[MAIN], "module", engines[MAIN])
        with eval_mode(model):
            metrics, per_source = None, {}
            dtype = model.unilip.adapter.down_mlp[1].weight.dtype
            for batch in batches:
                images = batch["image"]
                if metrics is None:
                    metrics = ReconMetrics(self._inception(images.device), images.device)
                recon = reconstruct_any(model.unilip, images.to(dtype)).float()
                metrics.update(images.float(), recon)
                source = batch.get("__source__", ["eval"])[0]
                per_source.setdefault(source, ReconMetrics(None, images.device)).update(images.float(), recon)
        if metrics is None:
            return {}
        res = {f"eval/{k}": v for k, v in metrics.result().items()}
        if len(per_source) > 1:  # several eval sources (e.g. a training-set view): each one's too
            for source, m in per_source.items():
                res.update({f"eval/{source}/{k}": v for k, v in m.result().items()})
        return res

    @torch.no_grad()
    def samples(self, engines: Mapping[str, nn.Module], step: int, eval_batches) -> Dict[str, object]:
        """Originals (top row) over their reconstructions (bottom row) from the first eval
        batch of each eval source, each row labelled: "recon", or "recon_<source>" with
        several sources."""
        from unilip_ds.inference.sampling import grid, to_pil
        from unilip_ds.models.unilip import reconstruct_any
        model = getattr(engines[MAIN], "module", engines[MAIN])
        firsts: Dict[str, dict] = {}
        for batch in eval_batches or []:
            firsts.setdefault(batch.get("__source__", ["eval"])[0], batch)
        out = {}
        with eval_mode(model):
            dtype = model.unilip.adapter.down_mlp[1].weight.dtype
            for source, batch in firsts.items():
                images = batch["image"][:SAMPLE_IMAGES]
                recon = reconstruct_any(model.unilip, images.to(dtype)).float()
                name = f"recon_{source}" if len(firsts) > 1 else "recon"
                out[name] = grid([to_pil(images.float()), to_pil(recon)],
                                 labels=[f"{source}: originals", f"reconstructions at step {step}"])
        return out

    def _inception(self, device):
        path = self.cfg.recon.inception_path
        if not path:
            return None
        if getattr(self, "_inception_net", None) is None:
            from unilip_ds.evaluation.inception import load_fid_inception
            self._inception_net = load_fid_inception(path, device=device)
        return self._inception_net

    def export_components(self, module: nn.Module) -> Dict[str, nn.Module]:
        return module.unilip.export_components()

    def components(self, modules: Mapping[str, nn.Module]) -> Dict[str, nn.Module]:
        model = modules[MAIN]
        vision = model.unilip.vision
        out = {"encoder (InternViT)": vision.vision_tower,
               "projector (mlp1)": vision.multi_modal_projector,
               "adapter": model.unilip.adapter, "decoder (DC-AE)": model.unilip.dcae,
               }
        if DISC in modules:
            out["discriminator"] = modules[DISC]
        return out

    def outside_engines(self, modules: Mapping[str, nn.Module]) -> Dict[str, nn.Module]:
        """The fp32 loss networks (built on the meta device for counting)."""
        model = modules[MAIN]
        frozen = model.__dict__["_frozen"]
        if frozen is None:
            with torch.device("meta"):
                frozen = FrozenNets(model.flavor, model.with_teacher)
        out = {"perceptual (frozen)": frozen.perceptual}
        if frozen.teacher is not None:
            out["teacher (frozen)"] = frozen.teacher
        return out
