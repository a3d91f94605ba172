"""Loading and saving weights whether or not parameters are ZeRO-3 partitioned.

Modules built under `deepspeed.zero.Init` hold empty partitions; reading or writing their
full values goes through `GatheredParameters`. These helpers hide that so task and model
code stays single-device code.
"""

from __future__ import annotations

import contextlib
import json
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
        raise WeightsMismatch(
            f"{what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
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
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def check_weights_dir(path: str | Path, key: str, what: str) -> None:
    """Start check of a weights directory the run will read: it holds safetensors weights
    whose headers parse (an empty or wrong folder fails now, in one line naming the key, not
    after the engines are built)."""
    from safetensors import SafetensorError

    from unilip_ds.config import ConfigError
    try:
        if not weight_keys(path):
            raise FileNotFoundError(f"no tensors in {path}")
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ConfigError(f"config key '{key}': {what} {path} is unusable: "
                          f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None


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
    for f, listed in weight_files(path).items():
        if listed is not None and keep is not None and not any(keep(k) for k in listed):
            continue
        with safe_open(f, framework="pt", backend=backend) as h:
            for k in h.keys():
                if keep is None or keep(k):
                    sd[k] = h.get_tensor(k)
    return sd


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
