"""Loading and saving weights whether or not parameters are ZeRO-3 partitioned.

Modules built under `deepspeed.zero.Init` hold empty partitions; reading or writing their
full values goes through `GatheredParameters`. These helpers hide that so task and model
code stays single-device code.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import pickle
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None):
    """Context giving full values of (possibly) ZeRO-3 partitioned params; with
    `modifier_rank`, writes made on that rank are scattered back on exit."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Parameters and persistent buffers: exactly the keys of module.state_dict()."""
    out = dict(module.named_parameters(remove_duplicate=False))
    for mname, sub in module.named_modules(remove_duplicate=False):
        for bname, buf in sub.named_buffers(recurse=False):
            if buf is not None and bname not in sub._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = buf
    return out


class WeightsMismatch(ValueError):
    """Keys or shapes of a weights file do not fit the module."""


def load_state_dict_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor],
                         strict: bool = True, what: str = "weights") -> None:
    """Copy `state_dict` into `module` (partitioned or not). With `strict`, missing or
    unexpected keys and any shape mismatch raise WeightsMismatch naming them."""
    targets = _tensors(module)
    missing = sorted(set(targets) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(targets))
    if strict and (missing or unexpected):
        parts = [f"{len(names)} {kind} keys (e.g. {names[:3]})"
                 for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise WeightsMismatch(f"{what}: {', '.join(parts)}")
    for name, src in state_dict.items():
        if name not in targets:
            continue
        dst = targets[name]
        shape = tuple(dst.ds_shape) if is_partitioned(dst) else tuple(dst.shape)
        if tuple(src.shape) != shape:
            raise WeightsMismatch(f"{what}: shape of '{name}' is {tuple(src.shape)}, "
                                  f"the model has {shape}")
    # gather per top-level child so a large model is never whole on one device at once
    chunks = [{f"{n}.{k}": t for k, t in _tensors(c).items()} for n, c in module.named_children()]
    seen = {k for c in chunks for k in c}
    chunks.append({k: t for k, t in targets.items() if k not in seen})
    for chunk in chunks:
        params = [t for t in chunk.values() if isinstance(t, nn.Parameter)]
        with gathered(params, modifier_rank=0), torch.no_grad():
            for k, dst in chunk.items():
                if k in state_dict:
                    dst.data.copy_(state_dict[k].to(dtype=dst.dtype, device=dst.device))


def full_state_dict(module: nn.Module, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """A full CPU copy of `module`'s parameters and persistent buffers."""
    out: Dict[str, torch.Tensor] = {}
    params = dict(module.named_parameters())
    with gathered(params.values()):
        for k, v in module.state_dict().items():
            t = params[k] if k in params else v
            out[k] = t.detach().to("cpu", dtype=dtype if (dtype and t.is_floating_point()) else t.dtype).clone()
    return out


def weight_files(path: str | Path) -> Dict[str, Optional[List[str]]]:
    """The safetensors files of a save_pretrained-style directory (one *.safetensors file,
    or the shards listed by a *.safetensors.index.json), each with the keys the index says
    it holds (None: not known without opening it)."""
    path = Path(path)
    if path.is_file():
        return {str(path): None}
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        by_file: Dict[str, List[str]] = {}
        for key, f in json.loads(index[0].read_text())["weight_map"].items():
            by_file.setdefault(str(path / f), []).append(key)
        return dict(sorted(by_file.items()))
    files = {str(f): None for f in sorted(path.glob("*.safetensors"))}
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        raise FileNotFoundError(f"no *.safetensors weights in {path}" + (
            f" (only {bins[0]}; the safetensors files of the published checkpoint are read)" if bins else ""))
    return files


# ---------------------------------------------------------------------------------------
# start checks: the files a loader will read, checked by that loader reading headers only
# ---------------------------------------------------------------------------------------
_HEADERS_ONLY: contextvars.ContextVar = contextvars.ContextVar("headers_only", default=False)

# safetensors header dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@contextlib.contextmanager
def headers_only():
    """Inside this block `read_weights_dir` and `read_torch` (so every loader built on them)
    return meta tensors of the shapes and dtypes the files declare and read no tensor data.
    A loader run into a module built on the meta device then checks every file, key and
    shape the real load will, in a fraction of a second (the start checks, `dry_load`)."""
    token = _HEADERS_ONLY.set(True)
    try:
        yield
    finally:
        _HEADERS_ONLY.reset(token)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def start_error(key: str, path, reason: str, expect: str):
    from unilip_ds.config import ConfigError
    where = "" if str(path) in reason else f"{path}: "
    return ConfigError(f"config key '{key}': {where}{reason} (expected {expect})")


def dry_load(key: str, path: str | Path, expect: str, load: Callable[[], None]) -> None:
    """Start check of weights the run will read: `load` is the run's own loader called into a
    module built on the meta device; it runs on the files' headers (`headers_only`), so a
    missing file, key or component, a wrong shape or an unreadable header fails now, before
    any process group, as one ConfigError line naming the key, the path and `expect` (what
    belongs there), not minutes later after the engines are built."""
    from safetensors import SafetensorError

    from unilip_ds.config import ConfigError
    try:
        with headers_only():
            load()
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, pickle.UnpicklingError) as exc:
        raise start_error(key, path, _first_line(exc), expect) from None


def check_config_json(path: str | Path, key: str, expect: str, field: str,
                      accepted: Iterable[str]) -> dict:
    """A save_pretrained directory's config.json: present, JSON, and `field` (transformers'
    `model_type`, diffusers' `_class_name`) one of `accepted`; one ConfigError line if not."""
    path = Path(path)
    if not path.is_dir():
        raise start_error(key, path, "not a directory", expect)
    conf = path / "config.json"
    if not conf.is_file():
        raise start_error(key, path, "no config.json", expect)
    try:
        data = json.loads(conf.read_text())
    except (ValueError, OSError) as exc:
        raise start_error(key, path, f"config.json is not readable JSON ({_first_line(exc)})", expect) from None
    if not isinstance(data, dict):
        raise start_error(key, path, "config.json is not a JSON object", expect)
    accepted = tuple(accepted)
    if data.get(field) is None and not (data.get("model_type") or data.get("_class_name")):
        raise start_error(key, path, f"config.json names no {field}", expect)
    if data.get(field) not in accepted:
        what = data.get(field) or data.get("model_type") or data.get("_class_name")
        arch = data.get("architectures")
        found = f"{what!r}" + (f" ({', '.join(arch)})" if isinstance(arch, list) and arch else "")
        raise start_error(key, path, f"config.json describes {found}, not {' / '.join(accepted)}", expect)
    return data


def weight_keys(path: str | Path) -> List[str]:
    """Every tensor name of a weights file / directory, from the headers alone."""
    keys: List[str] = []
    for f, listed in weight_files(path).items():
        if listed is None:
            with safe_open(f, framework="pt") as h:
                listed = list(h.keys())
        keys.extend(listed)
    return keys


def read_weights_dir(path: str | Path, keep: Optional[Callable[[str], bool]] = None,
                     backend: str = "mmap") -> Dict[str, torch.Tensor]:
    """The tensors of a weights file or directory (see `weight_files`); with `keep`, only
    the keys it accepts: each is requested once, the others never are, and shards holding
    none of them are not opened (a 1b InternVL checkpoint is ~1.9 GB, its vision path
    ~0.6 GB). `backend` is safetensors': "mmap" maps the file (bytes are read when a tensor
    is used), "pread" reads each requested tensor with pread(2) at once."""
    sd: Dict[str, torch.Tensor] = {}
    meta = _HEADERS_ONLY.get()
    for f, listed in weight_files(path).items():
        if listed is not None and keep is not None and not any(keep(k) for k in listed):
            continue
        if meta:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    if keep is None or keep(k):
                        t = h.get_slice(k)
                        sd[k] = torch.empty(t.get_shape(), dtype=_DTYPES.get(t.get_dtype(), torch.float32),
                                            device="meta")
            continue
        with safe_open(f, framework="pt", backend=backend) as h:
            for k in h.keys():
                if keep is None or keep(k):
                    sd[k] = h.get_tensor(k)
    return sd


def read_torch(path: str | Path) -> Dict[str, torch.Tensor]:
    """A single weights file: safetensors, or a torch.save file (weights_only); under
    `headers_only`, meta tensors (a torch.save file's pickle is read, its data is not)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_weights_dir(path)
    try:
        return torch.load(str(path), map_location="meta" if _HEADERS_ONLY.get() else "cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is not a state-dict file torch.load(weights_only=True) reads "
                         f"({type(exc).__name__})") from None


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                      metadata: Optional[Dict[str, str]] = None) -> None:
    # safetensors refuses tensors that share storage: store contiguous copies
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, str(path),
              metadata=metadata or {"format": "pt"})


def save_component(component: nn.Module, out_dir: str | Path) -> None:
    """Write one component: library classes (transformers / diffusers) in their
    save_pretrained layout, anything else as a config-less model.safetensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(component, "save_pretrained"):
        component.save_pretrained(str(out_dir), safe_serialization=True)
    else:
        write_safetensors(full_state_dict(component), out_dir / "model.safetensors")


def load_component(component: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Inverse of save_component (any save_pretrained safetensors layout)."""
    load_state_dict_into(component, read_weights_dir(path), strict=strict, what=str(path))
