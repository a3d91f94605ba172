"""Import the reference implementation's tokenizer checkpoint onto UniLIP.

The reference checkpoint is a torch state dict holding
  encoder.*      InternViT in the remote-code layout (fused attn.qkv, ls1/ls2, norm1/norm2, ...)
  mlp1.{0,1,3}.* InternVL's projector (LayerNorm, Linear, -, Linear)
  down_blocks.*, down_mlp.*  the adapter
  decoder.*      the DC-AE decoder (diffusers keys)
The remote-code -> transformers key mapping below follows transformers' InternVL conversion
script (convert_internvl_weights_to_hf.py, not shipped in the wheel): same renames, and the
fused qkv split into q/k/v in that order.

    python -m unilip_ds.models.convert --src ref.pt --out exports/unilip_1b [--flavor 1b]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

# (pattern, replacement) applied to keys below the InternViT prefix, first match wins
VISION_RENAMES: List[Tuple[str, str]] = [
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"^embeddings\.patch_embedding\.(weight|bias)$", r"embeddings.patch_embeddings.projection.\1"),
    (r"^encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layer.\1.attention.projection_layer.\2"),
    (r"^encoder\.layers\.(\d+)\.attn\.q_norm\.(weight|bias)$", r"encoder.layer.\1.attention.q_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.attn\.k_norm\.(weight|bias)$", r"encoder.layer.\1.attention.k_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.ls1$", r"encoder.layer.\1.lambda_1"),
    (r"^encoder\.layers\.(\d+)\.ls2$", r"encoder.layer.\1.lambda_2"),
    (r"^encoder\.layers\.(\d+)\.norm1\.(weight|bias)$", r"encoder.layer.\1.layernorm_before.\2"),
    (r"^encoder\.layers\.(\d+)\.norm2\.(weight|bias)$", r"encoder.layer.\1.layernorm_after.\2"),
    (r"^encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"encoder.layer.\1.mlp.\2.\3"),
]
QKV = re.compile(r"^encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
PROJECTOR_RENAMES = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
PARTS = ("encoder.", "mlp1.", "down_blocks.", "down_mlp.", "decoder.")  # the checkpoint's parts


class ConversionError(ValueError):
    """The source checkpoint does not fit the model (keys or shapes); the message names them."""


def _rename_vision(key: str) -> Optional[str]:
    for pat, rep in VISION_RENAMES:
        if re.match(pat, key):
            return re.sub(pat, rep, key)
    return None


def remote_vision_to_hf(sd: Mapping[str, torch.Tensor], src_prefix: str,
                        dst_prefix: str = "") -> Dict[str, torch.Tensor]:
    """Remote-code InternViT (`{src_prefix}*`) + `mlp1.*` -> VisionPath keys
    (`vision_tower.*`, `multi_modal_projector.*`), prefixed with `dst_prefix`."""
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        if key.startswith("mlp1."):
            idx, _, leaf = key[len("mlp1."):].partition(".")
            if idx not in PROJECTOR_RENAMES:
                unknown.append(key)
                continue
            out[f"{dst_prefix}multi_modal_projector.{PROJECTOR_RENAMES[idx]}.{leaf}"] = t
            continue
        if not key.startswith(src_prefix):
            unknown.append(key)
            continue
        sub = key[len(src_prefix):]
        m = QKV.match(sub)
        if m:
            if t.shape[0] % 3:
                raise ConversionError(f"'{key}': fused qkv of shape {tuple(t.shape)} is not divisible by 3")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[f"{dst_prefix}vision_tower.encoder.layer.{m.group(1)}.attention.{name}.{m.group(2)}"] = \
                    part.contiguous()
            continue
        new = _rename_vision(sub)
        if new is None:
            unknown.append(key)
            continue
        out[f"{dst_prefix}vision_tower.{new}"] = t
    if unknown:
        raise ConversionError(f"{len(unknown)} unrecognised InternViT keys, e.g. {sorted(unknown)[:5]}")
    return out


def reference_to_unilip(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Reference tokenizer state dict -> UniLIP state dict keys."""
    vision_src = {k: v for k, v in sd.items() if k.startswith(("encoder.", "mlp1."))}
    out = remote_vision_to_hf(vision_src, src_prefix="encoder.", dst_prefix="vision.")
    unknown = []
    for k, v in sd.items():
        if k.startswith(("down_blocks.", "down_mlp.")):
            out[f"adapter.{k}"] = v
        elif k.startswith("decoder."):
            out[f"dcae.{k}"] = v
        elif not k.startswith(("encoder.", "mlp1.")):
            unknown.append(k)
    if unknown:
        raise ConversionError(f"{len(unknown)} keys of no known part ({', '.join(PARTS)}), "
                              f"e.g. {sorted(unknown)[:5]}")
    return out


def read_reference(path: str | Path) -> Dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"--src: no such file {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors readers raise many kinds
        raise ConversionError(f"--src: {path} is not a readable torch / safetensors checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"--src: {path} is not a state dict of tensors")
    if not any(k.startswith(PARTS) for k in sd):
        raise ConversionError(f"--src: {path} is not a reference tokenizer checkpoint (no key starts with "
                              f"{', '.join(PARTS)}; it holds e.g. {sorted(sd)[:3]})")
    return sd


def infer_flavor(sd: Mapping[str, torch.Tensor]) -> str:
    from unilip_ds.models.flavors import FLAVORS
    w = sd.get("mlp1.1.weight")
    if w is None:
        raise ConversionError("cannot infer the flavor: no 'mlp1.1.weight' (pass --flavor)")
    for name, fl in FLAVORS.items():
        if name != "tiny" and fl.d_llm == w.shape[0] and fl.vision["hidden_size"] * 4 == w.shape[1]:
            return name
    raise ConversionError(f"cannot infer the flavor from mlp1.1.weight {tuple(w.shape)} (pass --flavor)")


def convert(src: str | Path, out: str | Path, flavor: Optional[str] = None, preset: str = "recon_stage2"):
    """Build UniLIP for the flavor, load the reference weights (strict: every key and shape
    must fit) and write an export dir: one sub-dir per component + config.yaml."""
    from unilip_ds.config import load_config, to_yaml
    from unilip_ds.engine.weights import WeightsMismatch, load_state_dict_into, save_component
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.unilip import UniLIP

    sd = read_reference(src)
    flavor = flavor or infer_flavor(sd)
    mapped = reference_to_unilip(sd)
    model = UniLIP(get_flavor(flavor))
    try:
        load_state_dict_into(model, mapped, strict=True, what=f"{src} as UniLIP-{flavor}")
    except WeightsMismatch as exc:
        raise ConversionError(str(exc)) from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, comp in model.export_components().items():
        save_component(comp, out / name)
    cfg = load_config(preset, [f"model.flavor={flavor}"], world_size=1)
    (out / "config.yaml").write_text(to_yaml(cfg))
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="reference tokenizer checkpoint (.pt/.bin/.safetensors)")
    ap.add_argument("--out", required=True, help="export directory to write")
    ap.add_argument("--flavor", default=None, help="tiny, 1b or 2b (default: inferred from shapes)")
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.out, args.flavor)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
