"""Import a released UniLIP generator (the reference's `save_pretrained` directory, e.g.
UniLIP-1B / UniLIP-3B) as a gen export of this project: a UniLIPPipeline directory that
`UniLIPPipeline.from_pretrained`, the generate / edit CLIs, the evaluations and
`model.init_from` (fine-tuning) all read.

    python -m unilip_ds.models.convert_gen --src UniLIP-1B --out exports/unilip_1b_released

The reference saves `UniLIP_InternVLForCausalLM` (config model_type "unilip_internvl", with
n_query, connect_layer, unilip_factor, ...). Its tensors, read from the reference source
(unilip/model/unilip_internvl.py, language_model/unilip_internvl.py, vae_modules.py, sana.py):

  reference key (transformers 4.52 writes the legacy      this export
  names on the left of '|'; later versions the right)
  language_model.model.* | model.language_model.*      -> mllm  model.language_model.*
  language_model.lm_head.* | lm_head.*                 -> mllm  lm_head.*
  vision_tower.* | model.vision_tower.*                -> mllm  model.vision_tower.*  (remote-code
        InternViT: fused attn.qkv, ls1, norm1, ... -> transformers InternVLVision, via convert.py)
  multi_modal_projector.{0,1,3}.* | model.multi_...    -> mllm  model.multi_modal_projector.*
  model.latent_queries                                 -> connector  queries.weight
  model.llm_connector.layers.N.*  (N = 0..5: the deleted
        ModuleList renumbers its remaining layers)      -> connector  layers.N.*
  model.llm_connector.norm.weight                      -> connector  norm.weight
  model.llm_connector.rotary_emb.*  (non-persistent; dropped if present)
  model.projector.*                                    -> connector  projector.*
  model.dit.*                                          -> transformer (SanaTransformer2DModel)
  model.vae_decoder.down_blocks.* / down_mlp.*         -> adapter
  model.vae_decoder.decoder.*                          -> decoder (DC-AE decoder)
  model.vae.*  (build_sana returns None: absent; if present, a DC-AE) -> dcae

`latent_scale` comes from the checkpoint's unilip_factor; the flavor from the LLM width.
Every tensor must land somewhere and every parameter of the export must be filled
(strict); anything else is one error line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

REFERENCE_TYPE = "unilip_internvl"
REFERENCE_ARCH = "UniLIP_InternVLForCausalLM"
# keys the reference adds to its InternVLConfig (not InternVL's)
REFERENCE_CONFIG_KEYS = ("n_query", "connect_layer", "mllm_path", "mllm_hf_path", "vae_path", "dit_path",
                         "unilip_factor")
DTYPES = ("keep", "fp32", "bf16")


class GenConversionError(ValueError):
    """The source is not a usable reference checkpoint; the message says why (one line)."""


# ---------------------------------------------------------------------------------------
# reading the reference directory
# ---------------------------------------------------------------------------------------
def read_reference_config(src: Path) -> dict:
    if not src.is_dir():
        raise GenConversionError(f"--src: {src} is not a directory")
    path = src / "config.json"
    if not path.is_file():
        raise GenConversionError(f"--src: {src} is not a reference UniLIP checkpoint (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GenConversionError(f"--src: cannot read {path}: {exc}") from None
    mtype, archs = config.get("model_type"), config.get("architectures") or []
    if mtype == "unilip_vae_internvl":
        raise GenConversionError(f"--src: {src} is a reference stage-1 checkpoint (DC-AE target, model_type "
                                 "'unilip_vae_internvl'); only the UniLIP-space generators are imported")
    if mtype != REFERENCE_TYPE and REFERENCE_ARCH not in archs:
        raise GenConversionError(f"--src: {src} is not a reference UniLIP checkpoint (config.json model_type "
                                 f"'{mtype}', expected '{REFERENCE_TYPE}')")
    for key in ("text_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise GenConversionError(f"--src: {path} has no {key}")
    return config


def read_reference_weights(src: Path) -> Dict[str, "torch.Tensor"]:
    """save_pretrained's weights: model.safetensors (+ shards and index), or the
    pytorch_model.bin equivalents."""
    import torch
    from unilip_ds.engine.weights import read_weights_dir
    if list(src.glob("*.safetensors")) or list(src.glob("*.safetensors.index.json")):
        try:
            return read_weights_dir(src)
        except (OSError, ValueError, KeyError) as exc:
            raise GenConversionError(f"--src: cannot read the weights of {src}: {exc}") from None
    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(src.glob("pytorch_model*.bin"))]
    if not files:
        raise GenConversionError(f"--src: {src} holds no weights (*.safetensors or pytorch_model*.bin)")
    sd = {}
    for name in files:
        try:
            sd.update(torch.load(str(src / name), map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one error line
            raise GenConversionError(f"--src: cannot read {src / name}: {exc}") from None
    return sd


# ---------------------------------------------------------------------------------------
# key mapping
# ---------------------------------------------------------------------------------------
# (reference prefix, component, prefix there); first match wins. Both the legacy names that
# transformers 4.52 writes (it reverts InternVL's _checkpoint_conversion_mapping on save) and
# the current ones are accepted.
_PREFIXES: Tuple[Tuple[str, str, str], ...] = (
    ("language_model.model.", "mllm", "model.language_model."),
    ("model.language_model.", "mllm", "model.language_model."),
    ("language_model.lm_head.", "mllm", "lm_head."),
    ("lm_head.", "mllm", "lm_head."),
    ("model.llm_connector.", "connector", ""),
    ("model.projector.", "connector", "projector."),
    ("model.dit.", "transformer", ""),
    ("model.vae_decoder.decoder.", "decoder", "decoder."),
    ("model.vae_decoder.down_blocks.", "adapter", "down_blocks."),
    ("model.vae_decoder.down_mlp.", "adapter", "down_mlp."),
    ("model.vae.", "dcae", ""),
)
_VISION = ("vision_tower.", "model.vision_tower.")
_PROJECTOR = ("multi_modal_projector.", "model.multi_modal_projector.")


def _strip(key: str, prefixes) -> Optional[str]:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return None


def _vision_to_hf(vision: Mapping, projector: Mapping) -> Dict:
    """The MLLM's vision path under InternVLForConditionalGeneration keys. The reference holds
    the remote-code InternViT and mlp1 (indices 0, 1, 3); a transformers-layout tower is
    passed through as it is."""
    from unilip_ds.models.convert import ConversionError, remote_vision_to_hf
    remote = any(k.startswith("encoder.layers.") for k in vision) or \
        any(k.split(".", 1)[0].isdigit() for k in projector)
    if not remote:
        return {**{f"model.vision_tower.{k}": v for k, v in vision.items()},
                **{f"model.multi_modal_projector.{k}": v for k, v in projector.items()}}
    sd = {**{f"vision_model.{k}": v for k, v in vision.items()}, **{f"mlp1.{k}": v for k, v in projector.items()}}
    try:
        return remote_vision_to_hf(sd, src_prefix="vision_model.", dst_prefix="model.")
    except ConversionError as exc:
        raise GenConversionError(f"vision tower: {exc}") from None


def split_reference(sd: Mapping) -> Tuple[Dict[str, Dict], Dict[str, int]]:
    """Reference state dict -> {component: its state dict}; and the count of tensors read per
    reference part. Unknown keys are an error naming them."""
    out: Dict[str, Dict] = {}
    vision, projector, unknown, dropped = {}, {}, [], 0
    for key, t in sd.items():
        sub = _strip(key, _VISION)
        if sub is not None:
            vision[sub] = t
            continue
        sub = _strip(key, _PROJECTOR)
        if sub is not None:
            projector[sub] = t
            continue
        if key == "model.latent_queries":
            out.setdefault("connector", {})["queries.weight"] = t
            continue
        for prefix, comp, dst in _PREFIXES:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                if comp == "connector" and dst == "":
                    if rest.startswith("rotary_emb."):  # recomputed buffers, never trained
                        dropped += 1
                        break
                    if not rest.startswith(("layers.", "norm.")):
                        unknown.append(key)
                        break
                out.setdefault(comp, {})[dst + rest] = t
                break
        else:
            unknown.append(key)
    if unknown:
        raise GenConversionError(f"{len(unknown)} keys of no known part of the reference model, "
                                 f"e.g. {sorted(unknown)[:4]}")
    if vision or projector:
        out.setdefault("mllm", {}).update(_vision_to_hf(vision, projector))
    counts = {name: len(v) for name, v in sorted(out.items())}
    counts["dropped_rotary_buffers"] = dropped
    return out, counts


# ---------------------------------------------------------------------------------------
# flavor, config, model
# ---------------------------------------------------------------------------------------
def detect_flavor(ref_config: dict, parts: Mapping[str, Mapping]) -> str:
    """The flavor whose LLM width is the checkpoint's (embed_tokens), then its other
    dimensions must agree too."""
    from unilip_ds.models.flavors import FLAVORS
    embed = parts.get("mllm", {}).get("model.language_model.embed_tokens.weight")
    if embed is None:
        raise GenConversionError("missing key language_model.model.embed_tokens.weight "
                                 "(or model.language_model.embed_tokens.weight): cannot tell the LLM width")
    d = int(embed.shape[1])
    names = [n for n, f in FLAVORS.items() if f.d_llm == d]
    if not names:
        known = ", ".join(f"{n} {f.d_llm}" for n, f in FLAVORS.items())
        raise GenConversionError(f"the LLM width {d} fits no flavor ({known})")
    flavor = FLAVORS[names[0]]
    text = ref_config["text_config"]
    layers = text.get("num_hidden_layers")
    if layers != flavor.text["num_hidden_layers"]:
        raise GenConversionError(f"config.json text_config.num_hidden_layers={layers}, flavor {flavor.name} "
                                 f"(LLM width {d}) has {flavor.text['num_hidden_layers']}")
    conn = parts.get("connector", {})
    q = conn.get("queries.weight")
    if q is None:
        raise GenConversionError("missing key model.latent_queries")
    if tuple(q.shape) != (1, flavor.num_queries, d):
        raise GenConversionError(f"model.latent_queries has shape {tuple(q.shape)}, flavor {flavor.name} "
                                 f"has (1, {flavor.num_queries}, {d})")
    n_layers = len({k.split(".")[1] for k in conn if k.startswith("layers.")})
    if n_layers != flavor.connector_layers:
        raise GenConversionError(f"model.llm_connector has {n_layers} layers, flavor {flavor.name} has "
                                 f"{flavor.connector_layers}")
    return flavor.name


def mllm_config_dict(ref_config: dict, parts: Mapping[str, Mapping]) -> dict:
    """The reference's config as a plain InternVL (`-hf`) config.json."""
    from transformers import InternVLConfig
    cfg = {k: v for k, v in ref_config.items()
           if k not in REFERENCE_CONFIG_KEYS + ("architectures", "auto_map", "_name_or_path", "model_type",
                                                "transformers_version")}
    cfg["text_config"] = dict(cfg["text_config"])
    embed = parts["mllm"]["model.language_model.embed_tokens.weight"]
    cfg["text_config"]["vocab_size"] = int(embed.shape[0])  # the rows it was saved with
    try:
        config = InternVLConfig(**cfg)
    except (TypeError, ValueError, KeyError) as exc:
        raise GenConversionError(f"config.json is not an InternVL config: {str(exc).splitlines()[0]}") from None
    config.architectures = ["InternVLForConditionalGeneration"]
    return config.to_dict()


def _fill_tied(model, mllm_sd: dict) -> None:
    text = model.mllm.config.get_text_config()
    tied = getattr(text, "tie_word_embeddings", False) or getattr(model.mllm.config, "tie_word_embeddings", False)
    if "lm_head.weight" not in mllm_sd and tied:
        mllm_sd["lm_head.weight"] = mllm_sd.get("model.language_model.embed_tokens.weight")


def _target_dtype(sd: Mapping, choice: str):
    import torch
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    found = {t.dtype for t in sd.values() if t.is_floating_point()}
    return found.pop() if len(found) == 1 else torch.float32  # mixed: the widest


def convert(src, out, tokenizer: Optional[str] = None, dtype: str = "keep") -> dict:
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise GenConversionError(f"--dtype: one of {', '.join(DTYPES)}, got '{dtype}'")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GenConversionError(f"--out {out} exists and is not empty; nothing was written")
    ref_config = read_reference_config(src)

    import transformers
    from transformers import AutoTokenizer
    from unilip_ds.config import ConfigError, load_config, to_yaml
    from unilip_ds.engine.weights import WeightsMismatch, load_state_dict_into
    from unilip_ds.inference.pipeline import UniLIPPipeline
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.gen_loading import build_gen_model
    from unilip_ds.models.prompts import PromptBuilder, PromptError

    sd = read_reference_weights(src)
    parts, counts = split_reference(sd)
    flavor = detect_flavor(ref_config, parts)
    fl = get_flavor(flavor)
    factor = ref_config.get("unilip_factor")
    scale_from = "unilip_factor"
    if factor is None:
        factor, scale_from = fl.unilip_latent_scale, "flavor default (no unilip_factor in config.json)"
    if not float(factor) > 0:
        raise GenConversionError(f"config.json unilip_factor must be > 0, got {factor}")
    target = _target_dtype(sd, dtype)

    tok_src = tokenizer or str(src)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its config.json is of a type transformers does not know
    try:
        tok = AutoTokenizer.from_pretrained(tok_src)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        hint = "" if tokenizer else " (pass --tokenizer <InternVL3-hf dir>)"
        raise GenConversionError(f"no tokenizer in {tok_src}: {str(exc).splitlines()[0]}{hint}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)

    overrides = [f"model.flavor={flavor}", "gen.target=unilip", f"gen.latent_scale={float(factor)}",
                 f"data.resolution={fl.gen_resolution}"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(mllm_config_dict(ref_config, parts)))
        try:
            cfg = load_config("gen_stage3", overrides)
            model = build_gen_model(load_config("gen_stage3", overrides + [f"model.internvl_path={tmp}"]),
                                    float(factor))
        except ConfigError as exc:
            raise GenConversionError(str(exc)) from None
    try:
        PromptBuilder(tok, (cfg.data.resolution // 28) ** 2, fl.num_queries, cfg.gen.max_length)
    except PromptError as exc:
        raise GenConversionError(f"tokenizer {tok_src}: {exc}") from None

    if "dcae" in parts:  # not written by the published reference (build_sana: vae None)
        from diffusers import AutoencoderDC
        model.dcae = AutoencoderDC(**fl.dcae).requires_grad_(False).eval()
    _fill_tied(model, parts.setdefault("mllm", {}))
    model.to(target)
    for name in ("mllm", "connector", "transformer", "adapter", "decoder", "dcae"):
        comp = getattr(model, name)
        if comp is None:
            continue
        given, want = parts.get(name, {}), set(comp.state_dict())
        missing, unexpected = sorted(want - set(given)), sorted(set(given) - want)
        if missing or unexpected:
            what = f"{len(missing)} missing" + (f" (e.g. {[reference_name(name, k) for k in missing[:3]]})"
                                                if missing else "")
            what += f", {len(unexpected)} unexpected" + (
                f" (e.g. {[reference_name(name, k) for k in unexpected[:3]]})" if unexpected else "")
            raise GenConversionError(f"{name}: {what} tensors against the {flavor} flavor")
        try:
            load_state_dict_into(comp, given, strict=True, what=f"{name} (from the reference's {_SOURCE[name]})")
        except WeightsMismatch as exc:
            raise GenConversionError(str(exc)) from None
    model.eval()

    pipe = UniLIPPipeline.from_gen_model(model, tok, cfg)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out))
    (out / "config.yaml").write_text(to_yaml(cfg))
    summary = {"source": str(src.resolve()), "converted_from": f"reference {REFERENCE_ARCH} (save_pretrained)",
               "weights": "converted", "step": _reference_step(src), "flavor": flavor,
               "latent_scale": float(factor), "latent_scale_from": scale_from,
               "dtype": str(target).replace("torch.", ""), "tokenizer": tok_src,
               "components": sorted(pipe.components), "tensors": counts,
               "tensors_total": sum(v for k, v in counts.items() if k != "dropped_rotary_buffers")}
    (out / "export.json").write_text(json.dumps(summary, indent=1))
    return summary


def reference_name(component: str, key: str) -> str:
    """A component's key under the reference's (current transformers) name, for messages; the
    vision tower keeps the transformers name."""
    if component == "connector":
        return "model.latent_queries" if key == "queries.weight" else \
            f"model.{key}" if key.startswith("projector.") else f"model.llm_connector.{key}"
    prefix = {"transformer": "model.dit.", "adapter": "model.vae_decoder.", "decoder": "model.vae_decoder.",
              "dcae": "model.vae."}.get(component, "")
    return prefix + key


_SOURCE = {"mllm": "language_model.* / lm_head / vision_tower.* / multi_modal_projector.*",
           "connector": "model.latent_queries / model.llm_connector.* / model.projector.*",
           "transformer": "model.dit.*", "adapter": "model.vae_decoder.down_blocks.* / down_mlp.*",
           "decoder": "model.vae_decoder.decoder.*", "dcae": "model.vae.*"}


def _reference_step(src: Path) -> Optional[int]:
    """The training step of a Trainer checkpoint directory (trainer_state.json), if any."""
    state = src / "trainer_state.json"
    if state.is_file():
        try:
            return int(json.loads(state.read_text()).get("global_step"))
        except (ValueError, TypeError):
            return None
    m = re.search(r"checkpoint-(\d+)$", src.name)
    return int(m.group(1)) if m else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="the reference's save_pretrained directory (e.g. UniLIP-1B)")
    ap.add_argument("--out", required=True, help="export directory to write (new or empty)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer directory (an InternVL3 -hf dir) when --src holds none")
    ap.add_argument("--dtype", default="keep", choices=DTYPES,
                    help="weights of the export: keep the checkpoint's (default), fp32 or bf16")
    args = ap.parse_args(argv)
    try:
        summary = convert(args.src, args.out, args.tokenizer, args.dtype)
    except GenConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
