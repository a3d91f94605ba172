"""The one typed config tree: dataclasses as OmegaConf structured configs.

A run's config is: defaults (this file) <- stage preset (yaml, may name a `_base_` preset)
<- dotted command-line overrides. Everything is validated before any process group or
model exists; errors are `ConfigError` with one line naming the key.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import ListConfig, OmegaConf, StringNode
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from unilip_ds.data.config import DataConfig
from unilip_ds.models.config import ModelConfig
from unilip_ds.tasks.config import GenConfig, ReconConfig

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A bad setting; the message is one line that names the key."""


@dataclass
class RunConfig:
    name: str = "unilip"
    output_dir: str = "runs/unilip"
    task: str = "recon"  # which task object turns batches into losses
    seed: int = 0
    # start a new run in an output_dir that holds one: the old run is moved aside to
    # <output_dir>.old-<time>/ (never deleted); without it such a start is refused
    overwrite: bool = False


@dataclass
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    # 0 = micro_batch_size x grad_accum x world size; any other value must equal that
    global_batch_size: int = 0
    grad_clip: Optional[float] = 1.0
    precision: str = "bf16"  # bf16 | fp32
    log_every: int = 10
    # stop (after writing a checkpoint) once this process has run this many steps;
    # 0 = run to max_steps. For time-limited jobs: the next job resumes.
    stop_after: int = 0
    eval_every: int = 0  # 0 = no periodic evaluation (on data.eval.urls, EMA weights)
    eval_batches: int = 8  # held-out batches per evaluation
    # image grids every this many steps (0 = never), PNGs under <run.output_dir>/samples/ and
    # in W&B: gen, samples for gen.sample_prompts; recon, originals over reconstructions
    sample_every: int = 0
    # torch's intra-op threads per process; 0 = the cores of this process's share of the node
    # (cores / local ranks) minus one per data worker, at least 1 (launchers differ: torchrun
    # sets OMP_NUM_THREADS=1, plain python would let torch take every core)
    torch_threads: int = 0
    # a non-finite loss or gradient norm skips the optimizer step on every rank; after
    # max_nonfinite_in_a_row such steps in a row: keep skipping (skip), reload the last
    # checkpoint with the LR scaled by rollback_lr_scale and continue on new data
    # (rollback), or stop with an error (stop)
    on_nonfinite: str = "rollback"  # skip | rollback | stop
    max_nonfinite_in_a_row: int = 5
    rollback_lr_scale: float = 0.5
    # FAULT INJECTION, for the tests of the above: the n-th micro-batch (1-based, counted
    # per process since it started) of the last rank is filled with NaN
    test_nan_batches: List[int] = field(default_factory=list)
    # ... or keeps its (finite) loss but back-propagates infinite gradients
    test_inf_grad_batches: List[int] = field(default_factory=list)
    # peak TFLOPS per device for the MFU in every logged step; 0 = from the device table
    # (tracking.PEAK_TFLOPS: H100 / H200 SXM bf16 dense 989, A100 312, ...); on CPU, MFU
    # only when this is set
    peak_tflops: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10000
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 1e-4


@dataclass
class EMAConfig:
    enabled: bool = True
    # decay at update t (0-based) is 0 for t = 0, then min(max_decay, (1 + t) / (10 + t))
    max_decay: float = 0.999
    every_steps: int = 1


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    resume: bool = True  # resume when run.output_dir already holds a checkpoint


@dataclass
class DeepSpeedConfig:
    # path of a DeepSpeed JSON (ZeRO settings); `--ds_config` on the command line sets it.
    # "auto" fields in it are filled from this tree.
    config: str = "ds_configs/zero2.json"


@dataclass
class DistConfig:
    # a collective that does not complete in this time (a stalled or dead rank) is an
    # error naming the step, and the job exits non-zero instead of hanging
    timeout_s: int = 1800


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "unilip_ds"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class TensorBoardConfig:
    enabled: bool = False  # event files under <run.output_dir>/tensorboard, beside W&B


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    gen: GenConfig = field(default_factory=GenConfig)


def _error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}")


def preset_path(name: str) -> Path:
    """A preset by name (unilip_ds/configs/<name>.yaml) or a path to a yaml file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"--config: no such file {name}")
        return p
    p = PRESET_DIR / f"{name}.yaml"
    if not p.is_file():
        known = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"--config: unknown preset '{name}' (known: {', '.join(known)})")
    return p


def _load_preset(name: str, seen: tuple = ()) -> Any:
    path = preset_path(name)
    if str(path) in seen:
        raise ConfigError(f"--config: _base_ cycle through {path}")
    node = OmegaConf.load(path)
    base = node.pop("_base_", None)
    if base is None:
        return node
    base_node = _load_preset(str(path.parent / f"{base}.yaml") if not str(base).endswith(
        (".yaml", ".yml")) else base, seen + (str(path),))
    return OmegaConf.merge(base_node, node)


def load_config(preset: Optional[str] = None, overrides: Optional[List[str]] = None,
                world_size: Optional[int] = None) -> Config:
    """Resolve defaults <- preset <- overrides, then validate. Returns a typed Config."""
    schema = OmegaConf.structured(Config)
    try:
        if preset:
            schema = OmegaConf.merge(schema, _load_preset(preset))
        for item in overrides or []:
            schema = _apply_override(schema, item)
        OmegaConf.resolve(schema)
        cfg: Config = OmegaConf.to_object(schema)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _error(exc) from None
    validate(cfg, world_size)
    return cfg


def check_repeated(overrides: List[str]) -> None:
    """Command-line overrides name each key once: a key given twice would silently keep the
    last value, and the usual cause is an unquoted brace pattern the shell expanded into one
    `key=...` argument per shard. (Programs composing overrides may layer them.)"""
    counts: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key = item.split("=", 1)[0].strip()
        counts[key] = counts.get(key, 0) + 1
    for key, n in counts.items():
        if n > 1:
            hint = (" (an unquoted brace pattern {a..b} is expanded by the shell into one argument per "
                    f"value; quote the argument: '{key}=/data/shard-{{000..009}}.tar')"
                    if key.endswith(".urls") else "; give it once")
            raise ConfigError(f"config key '{key}': given {n} times on the command line{hint}")


def _schema_node(schema: Any, key: str) -> Any:
    """The typed node `key` of the schema, or None when no such key exists (yet)."""
    parent, _, last = key.rpartition(".")
    try:
        container = OmegaConf.select(schema, parent) if parent else schema
        return container._get_node(last) if OmegaConf.is_dict(container) else None
    except (OmegaConfBaseException, AttributeError, KeyError):
        return None


def _apply_override(schema: Any, item: str) -> Any:
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value")
    key, raw = (part.strip() for part in item.split("=", 1))
    try:
        parsed = OmegaConf.from_dotlist([item])
    except yaml.YAMLError as exc:
        hint = " (quote brace patterns: 'key=[\"shard-{0..9}.tar\"]')" if "{" in item else ""
        raise ConfigError(f"override '{item}': not a valid value: "
                          f"{str(exc).splitlines()[0]}{hint}") from None
    value = OmegaConf.select(parsed, key)
    node = _schema_node(schema, key)
    if isinstance(node, StringNode) and isinstance(value, bool):
        # YAML reads off / no / on / yes as booleans; a string key gets the text typed
        OmegaConf.update(parsed, key, raw, merge=False)
    elif isinstance(node, ListConfig) and value is not None and not OmegaConf.is_list(value):
        if key.endswith(".urls"):  # webdataset's convention: one pattern (or path) as a string
            OmegaConf.update(parsed, key, [value], merge=False)
        else:
            raise ConfigError(f"config key '{key}': takes a list, got {raw!r}; write it in brackets, "
                              f"e.g. {key}=[a,b]")
    try:
        schema = OmegaConf.merge(schema, parsed)
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        if isinstance(exc, ConfigKeyError) and key.startswith(str(getattr(exc, "full_key", "") or "")):
            near = _did_you_mean(schema, key)
            msg = f"unknown key; did you mean '{near}'?" if near else f"unknown key ({msg})"
        raise ConfigError(f"config key '{key}': {msg}") from None
    for split in ("train", "eval"):
        # a split has urls or sources: the one the command line names replaces
        # whichever the preset set (e.g. a preset's weighted mixture)
        other = {f"data.{split}.urls": "sources", f"data.{split}.sources": "urls"}.get(key)
        if other:
            OmegaConf.update(schema, f"data.{split}.{other}", [], merge=False)
    return schema


# names users bring from other trainers -> this tree's leaf name
_ALIASES = {"learning_rate": "lr", "batch_size": "micro_batch_size", "per_device_train_batch_size":
            "micro_batch_size", "gradient_accumulation_steps": "grad_accum", "max_grad_norm": "grad_clip",
            "warmup": "warmup_steps", "steps": "max_steps", "bf16": "precision"}


def _did_you_mean(schema: Any, key: str) -> Optional[str]:
    """The existing key closest to an unknown one: an alias's target in the same section,
    else the nearest dotted key by spelling."""
    import difflib
    leaves: List[str] = []

    def walk(node: Any, prefix: str) -> None:
        for k in node.keys() if OmegaConf.is_dict(node) else ():
            child = node._get_node(k)
            path = f"{prefix}{k}"
            if OmegaConf.is_dict(child):
                walk(child, path + ".")
            else:
                leaves.append(path)
    walk(schema, "")
    section, _, last = key.rpartition(".")
    alias = _ALIASES.get(last)
    for leaf in leaves:
        if alias and leaf.rpartition(".")[2] == alias and leaf.startswith(section):
            return leaf
    near = difflib.get_close_matches(key, leaves, n=1, cutoff=0.75)
    if near:
        return near[0]
    same = [leaf for leaf in leaves if leaf.rpartition(".")[0] == section]
    near = difflib.get_close_matches(last, [leaf.rpartition(".")[2] for leaf in same], n=1, cutoff=0.6)
    return f"{section}.{near[0]}" if near and section else (near[0] if near else None)


# feedback during a run (the gen presets' train.eval_every, `${feedback_every:}`): at least
# FEEDBACK_PER_RUN held-out evaluations + sample grids per run, at most FEEDBACK_MAX_PERIOD
# steps apart; a run longer than LONG_RUN_STEPS without either gets a warning at start
FEEDBACK_PER_RUN = 20
FEEDBACK_MAX_PERIOD = 1000
LONG_RUN_STEPS = 2000


def feedback_every(max_steps: int, has_eval: bool) -> int:
    """min(1000, max_steps // 20) with held-out data, else 0 (and 0 for runs under 20 steps)."""
    return min(FEEDBACK_MAX_PERIOD, max_steps // FEEDBACK_PER_RUN) if has_eval else 0


def _feedback_every_resolver(*, _root_: Any) -> int:
    data = _root_.data
    return feedback_every(int(_root_.train.max_steps), bool(data.eval.urls or data.eval.sources))


OmegaConf.register_resolver("feedback_every", _feedback_every_resolver, replace=True)


def config_warnings(cfg: Config) -> List[str]:
    """Settings that are valid but probably not what the user meant."""
    out = []
    t = cfg.train
    if t.max_steps > LONG_RUN_STEPS and not t.eval_every and not t.sample_every:
        out.append(f"train.max_steps={t.max_steps} with neither train.eval_every nor train.sample_every: no "
                   "held-out loss and no sample grids until the run ends; give held-out shards "
                   "(data.eval.urls=[...]) and train.eval_every=N (the gen presets set it themselves: "
                   f"every min({FEEDBACK_MAX_PERIOD}, max_steps // {FEEDBACK_PER_RUN}) steps)")
    if cfg.optim.warmup_steps >= cfg.train.max_steps:
        out.append(f"optim.warmup_steps={cfg.optim.warmup_steps} >= train.max_steps={cfg.train.max_steps}: "
                   "the learning rate never leaves its warmup; lower optim.warmup_steps")
    return out


_held: Optional[List[str]] = None  # warnings raised inside `warnings_after_checks`


def warn(msg: str) -> None:
    """One warning line on stderr from rank 0 (checks run before logging is set up)."""
    if _held is not None:
        _held.append(msg)
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {msg}", file=sys.stderr)


@contextlib.contextmanager
def warnings_after_checks():
    """Warnings raised in the block are printed once it completes: a failing check's error
    stays the only line."""
    global _held
    _held = []
    try:
        yield
        held = _held
    finally:
        _held = None
    for msg in held:
        warn(msg)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Consistency checks that types alone cannot express."""
    from unilip_ds.data.config import DataError, check_data_config
    from unilip_ds.models.flavors import FLAVORS
    world = world_size if world_size is not None else env_world_size()
    t, o = cfg.train, cfg.optim
    for key in ("max_steps", "micro_batch_size", "grad_accum"):
        _require(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    expect = t.micro_batch_size * t.grad_accum * world
    _require(t.global_batch_size in (0, expect), "train.global_batch_size",
             f"{t.global_batch_size} != micro_batch_size {t.micro_batch_size} x grad_accum "
             f"{t.grad_accum} x world size {world} = {expect}")
    _require(t.grad_clip is not None and t.grad_clip > 0, "train.grad_clip",
             "gradient clipping is required (> 0)")
    _require(t.precision in ("bf16", "fp32"), "train.precision", f"bf16 or fp32, got '{t.precision}'")
    _require(not t.eval_every or bool(cfg.data.eval.urls or cfg.data.eval.sources), "train.eval_every",
             "set, but data.eval.urls names no held-out shards")
    _require(t.on_nonfinite in ("skip", "rollback", "stop"), "train.on_nonfinite",
             f"skip, rollback or stop, got '{t.on_nonfinite}'")
    _require(t.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row", "must be >= 1")
    _require(0 < t.rollback_lr_scale <= 1, "train.rollback_lr_scale", "must be in (0, 1]")
    _require(cfg.dist.timeout_s >= 1, "dist.timeout_s", "must be >= 1")
    _require(t.torch_threads >= 0, "train.torch_threads", f"must be >= 0 (0 = automatic), got {t.torch_threads}")
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr], got {o.min_lr}")
    _require(len(o.betas) == 2, "optim.betas", "two values expected")
    for key in ("every_steps", "keep_last"):
        _require(getattr(cfg.checkpoint, key) >= 1, f"checkpoint.{key}", "must be >= 1")
    _require(cfg.wandb.mode in ("offline", "online", "disabled"), "wandb.mode",
             f"offline, online or disabled, got '{cfg.wandb.mode}'")
    _require(0 <= cfg.ema.max_decay < 1, "ema.max_decay", "must be in [0, 1)")
    _require(cfg.model.flavor in FLAVORS, "model.flavor",
             f"{', '.join(FLAVORS)}, got '{cfg.model.flavor}'")
    try:
        check_data_config(cfg.data)
    except DataError as exc:
        raise ConfigError(str(exc)) from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore


def from_dict(d: dict) -> Config:
    """A config saved by `to_dict` (e.g. inside a checkpoint or export)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))  # type: ignore
    except OmegaConfBaseException as exc:
        raise _error(exc) from None
