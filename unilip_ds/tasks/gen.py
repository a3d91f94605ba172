"""The gen task: text-to-image and image editing on UniLIP latents (gen_stage1/2/3).

One engine, "model" = GenModel. Trainable: the queries, the connector and the projector,
plus the whole SANA DiT when `gen.train_dit` (stage 2/3). Everything else is frozen: the
InternVL3 MLLM (whose vision path is the UniLIP encoder + mlp1), the UniLIP adapter and
decoder, and in gen_stage1 the DC-AE that defines the target space.

Per micro-batch (all-T2I or all-edit): tokenise the captions / instructions (each replaced by
the null prompt with probability gen.cfg_dropout), then the rectified-flow loss of GenModel.
Heavy libraries are imported lazily: `unilip_ds.config` imports this package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from unilip_ds.tasks.base import MAIN, ParamGroup, Task, eval_mode, register, split_decay

# export / pipeline component -> GenModel attribute
COMPONENTS = ("mllm", "connector", "transformer", "adapter", "decoder", "dcae")


def _error(key: str, msg: str):
    from unilip_ds.config import ConfigError
    return ConfigError(f"config key '{key}': {msg}")


@register
class GenTask(Task):
    name = "gen"

    def __init__(self, cfg):
        super().__init__(cfg)
        g = cfg.gen
        if g.target not in ("unilip", "dcae"):
            raise _error("gen.target", f"unilip or dcae, got '{g.target}'")
        if not 0 <= g.cfg_dropout < 1:
            raise _error("gen.cfg_dropout", f"must be in [0, 1), got {g.cfg_dropout}")
        for key in ("flow_shift_train", "flow_shift_sample"):
            if not getattr(g, key) > 0:
                raise _error(f"gen.{key}", f"must be > 0, got {getattr(g, key)}")
        if g.latent_scale is not None and not g.latent_scale > 0:
            raise _error("gen.latent_scale", f"must be > 0, got {g.latent_scale}")
        step = 32 if g.target == "dcae" else 28
        if cfg.data.resolution % step:
            raise _error("data.resolution", f"gen.target={g.target} needs a multiple of {step}, "
                         f"got {cfg.data.resolution}")
        for which in ("train", "eval"):
            split = getattr(cfg.data, which)
            kinds = {s.task for s in split.sources} or {split.task}
            if (split.urls or split.sources or which == "train") and not kinds <= {"t2i", "edit"}:
                raise _error(f"data.{which}", f"the gen task reads t2i and edit sources, got {sorted(kinds)}")
        tasks = {s.task for s in cfg.data.train.sources} or {cfg.data.train.task}
        if g.target == "dcae" and "edit" in tasks:
            raise _error("data.train", "edit sources need gen.target=unilip (the reference image is "
                         "encoded by UniLIP at 448 px)")
        self._prompts = None
        # import the model libraries now, not under deepspeed.zero.Init (see recon.py)
        import diffusers  # noqa: F401
        import unilip_ds.models.generator  # noqa: F401

    # -- settings derived from the flavor --------------------------------------------------
    @property
    def flavor(self):
        from unilip_ds.models.flavors import get_flavor
        return get_flavor(self.cfg.model.flavor)

    def latent_scale(self) -> float:
        g, f = self.cfg.gen, self.flavor
        if g.latent_scale is not None:
            return g.latent_scale
        return f.dcae["scaling_factor"] if g.target == "dcae" else f.unilip_latent_scale

    def num_image_tokens(self) -> int:
        return (self.cfg.data.resolution // 28) ** 2

    # -- inputs --------------------------------------------------------------------------
    def check_inputs(self) -> None:
        from unilip_ds.config import ConfigError
        from unilip_ds.models import gen_loading as L
        from unilip_ds.models.prompts import PromptError
        m = self.cfg.model
        if self.cfg.gen.train_dit and not m.init_from:  # stage 2 and later start from a stage's export
            msg = "a stage that trains the DiT starts from a gen export (model.init_from=<export>)"
            if m.flavor != "tiny":
                raise ConfigError(f"config key 'model.init_from': {msg}")
            from unilip_ds.config import warn
            warn(f"model.init_from is not set: {msg}; this tiny run starts from random weights")
        L.check_paths(self.cfg)
        from unilip_ds.evaluation.gen_fid import check_config
        check_config(self.cfg)  # gen.eval_fid
        self._check_edit_sources()
        if self.cfg.model.init_from or self.cfg.model.internvl_path:
            try:
                self.prompts()
            except PromptError as exc:
                key = "model.init_from" if self.cfg.model.init_from else "model.internvl_path"
                raise ConfigError(f"config key '{key}': {exc}") from None

    def _check_edit_sources(self) -> None:
        """An edit source whose first sample has no input image (e.g. T2I shards named as
        edit) is a config error now, not a stream of skipped samples later."""
        from unilip_ds.config import ConfigError
        from unilip_ds.data.config import split_sources
        from unilip_ds.data.shards import list_shards
        from unilip_ds.data.storage import open_shard
        from unilip_ds.data.stream import TarMembers
        for i, src in enumerate(split_sources(self.cfg.data.train, "train")):
            if src.task != "edit":
                continue
            url = list_shards(list(src.urls), self.cfg.data)[0]
            fields, key = set(), None
            with open_shard(url, self.cfg.data) as f:
                for member in TarMembers(f, url):
                    name = member["fname"].rsplit("/", 1)[-1]
                    k, _, ext = name.partition(".")
                    if key is not None and k != key:
                        break
                    key = k
                    fields.add(ext)
            if not any(f.startswith("input.") for f in fields):
                where = f"data.train.sources[{i}]" if self.cfg.data.train.sources else "data.train.urls"
                raise ConfigError(f"config key '{where}': edit source '{src.name}' has no input images "
                                  f"(first sample of {url} holds {', '.join(sorted(fields)) or 'nothing'}; "
                                  "edit samples need input.jpg, output.jpg and txt)")

    def prompts(self):
        """The PromptBuilder (tokenizer from the InternVL3 dir or the init_from export)."""
        if self._prompts is None:
            from unilip_ds.models import gen_loading as L
            from unilip_ds.models.prompts import PromptBuilder
            tok = L.load_tokenizer(self.cfg)
            self._prompts = PromptBuilder(tok, self.num_image_tokens(), self.flavor.num_queries,
                                          self.cfg.gen.max_length)
        return self._prompts

    # -- building ------------------------------------------------------------------------
    def build_modules(self) -> Dict[str, nn.Module]:
        from unilip_ds.models import gen_loading as L
        return {MAIN: L.build_gen_model(self.cfg, self.latent_scale())}

    def load_pretrained(self, modules: Mapping[str, nn.Module]) -> None:
        from unilip_ds.models import gen_loading as L
        L.load_pretrained(modules[MAIN], self.cfg)

    def init_from(self, modules: Mapping[str, nn.Module], path: str) -> None:
        from unilip_ds.models import gen_loading as L
        L.load_export(modules[MAIN], path, self.cfg)

    def frozen_sources(self) -> Dict[str, Optional[List[str]]]:
        """As gen_loading.load_export / load_pretrained read them: the MLLM, the UniLIP adapter
        and decoder, the DC-AE (gen.target=dcae) and, unless gen.train_dit, the DiT."""
        m, g = self.cfg.model, self.cfg.gen
        frozen = ["mllm", "adapter", "decoder"] + ([] if g.train_dit else ["transformer"])
        dcae = g.target == "dcae"
        out: Dict[str, Optional[List[str]]] = {}
        if m.init_from:
            root = Path(m.init_from)
            if dcae and not (root / "dcae").exists():
                out["model.dcae_path"] = [m.dcae_path] if m.dcae_path else None
            elif dcae:
                frozen.append("dcae")
            out["model.init_from"] = [str(root / name) for name in frozen]
            return out
        unilip = Path(m.unilip_path) if m.unilip_path else None
        # the language model (and, without a recon export, the vision path) from InternVL3
        out["model.internvl_path"] = [m.internvl_path] if m.internvl_path else None
        out["model.unilip_path"] = [str(unilip / n) for n in ("vision", "adapter", "decoder")] if unilip else None
        if not g.train_dit:
            out["model.sana_path"] = [str(Path(m.sana_path) / "transformer")] if m.sana_path else None
        if dcae:
            out["model.dcae_path"] = [m.dcae_path] if m.dcae_path else None
        return out

    def param_groups(self, name: str, module: nn.Module) -> List[ParamGroup]:
        wd = self.cfg.optim.weight_decay
        groups = split_decay(module.connector, f"{name}.connector", wd)
        if module.train_dit:
            groups += split_decay(module.transformer, f"{name}.dit", wd)
        return groups

    # -- stepping ------------------------------------------------------------------------
    @staticmethod
    def _texts(batch: dict, null: Optional[torch.Tensor]) -> List[Optional[str]]:
        """Captions / instructions, None where the row takes the null prompt."""
        texts = batch["caption"] if batch["__task__"] == "t2i" else batch["instruction"]
        return list(texts) if null is None else [None if d else t for t, d in zip(texts, null.tolist())]

    def _inputs(self, batch: dict, null: Optional[torch.Tensor]):
        task = batch["__task__"]
        prompts = self.prompts()(task, self._texts(batch, null)).to(batch["image"].device)
        return prompts, (batch["input_image"] if task == "edit" else None)

    def null_mask(self, n: int) -> torch.Tensor:
        """Rows whose prompt becomes the null prompt (CFG dropout); the default CPU generator
        is in every checkpoint, so a resumed run draws the same."""
        return torch.rand(n) < self.cfg.gen.cfg_dropout

    def loss(self, phase: str, batch: dict, step: int,
             engines: Mapping[str, nn.Module]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        null = self.null_mask(len(batch["__key__"]))
        model = getattr(engines[MAIN], "module", engines[MAIN])
        cached = self._cached(batch, null, model)
        frac = {k: cached.pop(k, torch.tensor(0.0)) for k in ("cached_latents", "cached_prefix")}
        truncated = cached.pop("truncated", 0)
        prompts, ref = (None, None) if "prefix" in cached else self._inputs(batch, null)
        out = engines[MAIN](prompts, image=batch["image"], ref_image=ref,
                            shift=self.cfg.gen.flow_shift_train, **cached)
        loss = out["loss"].mean()
        task = batch["__task__"]
        from unilip_ds.models.prompts import PromptBuilder
        neutralised = sum(PromptBuilder.clean(task, t)[1] for t in self._texts(batch, null))
        logs = {"loss/flow": loss.detach(), f"loss/flow_{task}": loss.detach(),
                "data/cfg_null_frac": null.float().mean(),
                "data/truncated_prompts": torch.tensor(float(prompts.truncated if prompts else truncated)),
                # prompts whose text spelled a special token or <image> (kept as text / cut)
                "data/neutralised_prompts": torch.tensor(float(neutralised)),
                # the share of samples whose frozen outputs came from a cache
                **{f"data/{k}": v for k, v in frac.items()}}
        return loss, logs

    # -- frozen-output caches ------------------------------------------------------------
    def _cached(self, batch: dict, null: torch.Tensor, model) -> dict:
        """GenModel.forward's cached inputs for this batch: `target` (+ `ref_features` for
        edit), and `prefix` when the cache has that level. Rows with a record take its values;
        the others (a miss, or a source without cache: their images were decoded) are computed
        live, by the same GenModel calls, so mixed batches are exact. Ranks agree first on
        which frozen parts run: under ZeRO-3 each forward is a collective, so a rank with no
        live row then runs one row and discards it. {} when the batch has no cache at all."""
        from unilip_ds.data.cache import prefix_rows, state_from_rows
        from unilip_ds.engine import dist
        records = batch.get("__cache__")
        if not records:
            return {}
        task, b = batch["__task__"], len(records)
        device, dtype = batch["image"].device, model.dtype
        live = [i for i, r in enumerate(records) if r is None]
        live_prefix = [i for i, r in enumerate(records) if r is None or "prefix.hidden" not in r]
        has_prefix = len(live_prefix) < b
        any_live, any_live_prefix, any_prefix = (v > 0 for v in dist.all_reduce(
            [float(bool(live)), float(bool(live_prefix)), float(has_prefix)]))
        # target latents and the edit reference features
        target = [None if r is None else r["latent"].to(device, torch.float32) for r in records]
        feats = [None if r is None else r["ref"].to(device, dtype) for r in records] if task == "edit" else None
        if any_live:
            rows = live or [0]
            x0 = model.target_latent(batch["image"][rows]).float()
            f = model.image_features(batch["input_image"][rows]) if feats is not None else None
            for j, i in enumerate(live):
                target[i] = x0[j]
                if f is not None:
                    feats[i] = f[j]
        out = {"target": torch.stack(target),
               "cached_latents": torch.tensor(1 - len(live) / b),
               "cached_prefix": torch.tensor(1 - len(live_prefix) / b if any_prefix else 0.0)}
        if feats is not None:
            out["ref_features"] = torch.stack(feats)
        if not any_prefix:  # level latents everywhere: forward runs the prefix over all rows
            return out
        # per-sample prefix rows (unpadded), cached or live, then padded as one batch
        null_t2i = self._null_t2i_row(model) if task == "t2i" else None  # collective: every rank
        rows: list = [None] * b
        for i, (r, drop) in enumerate(zip(records, null.tolist())):
            if i in live_prefix:
                continue
            if not drop:
                rows[i] = r
            elif task == "edit":  # the null edit prompt keeps the image: its own record
                rows[i] = {k.replace("null.", "prefix.", 1): v for k, v in r.items() if k.startswith("null.")}
            else:
                rows[i] = null_t2i
        if any_live_prefix:
            idx, texts = live_prefix or [0], self._texts(batch, null)
            prompts = self.prompts()(task, [texts[i] for i in idx]).to(device)
            state = model.prefix(prompts, out["ref_features"][idx] if feats is not None else None)
            for i, row in zip(live_prefix, prefix_rows(state, "prefix")):
                rows[i] = row
            out["truncated"] = prompts.truncated if live_prefix else 0
        out["prefix"] = state_from_rows(rows, "prefix", device, dtype)
        return out

    def _null_t2i_row(self, model) -> dict:
        """T2I's null prompt is one constant: its prefix, computed once."""
        if getattr(self, "_null_t2i", None) is None:
            from unilip_ds.data.cache import prefix_rows
            device = model.connector.projector.weight.device
            self._null_t2i = prefix_rows(model.prefix(self.prompts()("t2i", [None]).to(device)), "prefix")[0]
        return self._null_t2i

    def after_load(self, modules: Mapping[str, nn.Module]) -> None:
        """Every cache this run reads was built from the same weights and settings."""
        from unilip_ds.config import ConfigError
        from unilip_ds.data.cache import CacheError, fingerprint, mismatch, read_manifest
        from unilip_ds.data.config import split_sources
        model = modules[MAIN]
        for i, src in enumerate(split_sources(self.cfg.data.train, "train")):
            if not src.cache:
                continue
            key = f"data.train.sources[{i}].cache" if self.cfg.data.train.sources else "data.train.cache"
            try:
                theirs = read_manifest(src.cache, self.cfg.data)
            except CacheError as exc:
                raise ConfigError(f"config key '{key}': {exc}") from None
            ours = fingerprint(model, self.prompts(), theirs.level, torch.float32, self.cfg.model.flavor)
            ours["dtype"] = theirs.fingerprint.get("dtype")  # the stored precision is the cache's choice
            why = mismatch(theirs.fingerprint, ours)
            if why or theirs.task != src.task:
                raise ConfigError(f"config key '{key}': the cache {src.cache} was built for other settings: "
                                  f"{why or f'task {theirs.task}, the source is {src.task}'}")

    @torch.no_grad()
    def evaluate(self, engines: Mapping[str, nn.Module], batches) -> Dict[str, float]:
        """Held-out flow loss at fixed sigmas and noise (comparable across steps)."""
        model = getattr(engines[MAIN], "module", engines[MAIN])
        gen = torch.Generator().manual_seed(0)
        totals: Dict[str, list] = {}
        from unilip_ds.evaluation.gen_fid import GenFID
        fid = GenFID.for_run(self.cfg, next(model.parameters()).device)  # None unless gen.eval_fid
        with eval_mode(model):
            for batch in batches:
                prompts, ref = self._inputs(batch, None)
                b = len(batch["__key__"])
                u = (torch.arange(b, dtype=torch.float64) + 0.5) / b
                x0 = model.target_latent(batch["image"])
                noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
                out = model(prompts, target=x0, ref_image=ref, u=u.float(), noise=noise,
                            shift=self.cfg.gen.flow_shift_train)
                totals.setdefault(batch["__task__"], []).append(out["loss"].float().cpu())
                if fid is not None:
                    fid.update(model, self.prompts(), batch)
        metrics = {f"eval/flow_{t}": torch.cat(v).mean().item() for t, v in totals.items()}
        metrics.update(fid.result() if fid is not None else {})
        if totals:
            metrics["eval/flow"] = torch.cat([torch.cat(v) for v in totals.values()]).mean().item()
        return metrics

    def samples(self, engines: Mapping[str, nn.Module], step: int, eval_batches) -> Dict[str, object]:
        """Sample grids for the fixed prompts (and held-out edit pairs): {name: PIL image}."""
        from unilip_ds.inference.sampling import sample_grids
        model = getattr(engines[MAIN], "module", engines[MAIN])
        return sample_grids(model, self.prompts(), self.cfg, eval_batches)

    # -- export --------------------------------------------------------------------------
    def export_components(self, module: nn.Module) -> Dict[str, nn.Module]:
        return {name: getattr(module, name) for name in COMPONENTS if getattr(module, name) is not None}

    def write_export(self, module: nn.Module, out: Path) -> List[str]:
        """The export is a UniLIPPipeline directory (diffusers layout, one from_pretrained)."""
        from unilip_ds.inference.pipeline import UniLIPPipeline
        pipe = UniLIPPipeline.from_gen_model(module, self.prompts().tokenizer, self.cfg)
        pipe.save_pretrained(str(out))
        return sorted(pipe.components)

    def components(self, modules: Mapping[str, nn.Module]) -> Dict[str, nn.Module]:
        m = modules[MAIN]
        out = {"queries": m.connector.queries,
               f"connector ({len(m.connector.layers)} layers)": m.connector.layers,
               "connector norm": m.connector.norm,
               "projector": m.connector.projector,
               "DiT (SANA)" + ("" if m.train_dit else ", frozen"): m.transformer,
               "MLLM (frozen)": m.mllm,
               "UniLIP adapter+decoder (frozen)": nn.ModuleList([m.adapter, m.decoder])}
        if m.dcae is not None:
            out["DC-AE (frozen)"] = m.dcae
        return out
