"""Building the generator from config and filling it from the user's weight directories.

Sources, for a fresh gen_stage1 (`load_pretrained`):
  model.internvl_path  InternVL3 `-hf` directory: the MLLM (config, weights, tokenizer); its
                       language model's last layers + final norm initialise the connector
  model.unilip_path    a recon export (launch/export.py): its encoder + mlp1 become the MLLM's
                       vision path, its adapter / decoder define the UniLIP latent space
  model.sana_path      a SANA diffusers directory (`transformer/` is read)
  model.dcae_path      a diffusers AutoencoderDC directory (gen.target=dcae only)
and for every later stage `model.init_from` = a gen export (a UniLIPPipeline directory),
which carries every component, tokenizer included.

All checks run before any process group and fail with one line naming the key or path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from unilip_ds.config import ConfigError
from unilip_ds.engine.weights import (full_state_dict, load_component, load_state_dict_into,
                                      read_weights_dir)

# transformers' legacy InternVL `-hf` key layout (as published) -> the current one
_LEGACY_KEYS = ((r"^language_model\.model\.", "model.language_model."),
                (r"^language_model\.lm_head\.", "lm_head."),
                (r"^vision_tower\.", "model.vision_tower."),
                (r"^multi_modal_projector\.", "model.multi_modal_projector."))


def _path(cfg, key: str) -> Optional[Path]:
    value = getattr(cfg.model, key)
    return Path(value) if value else None


def _need(path: Path, what: str, key: str) -> None:
    if not path.exists():
        raise ConfigError(f"config key '{key}': {what} {path} does not exist")


def check_paths(cfg) -> None:
    """Every directory the run will read, before any process group exists: present, the
    expected model (config.json), and every file / key / shape the loaders below need (they
    run into a meta-device model on the files' headers: weight_checks, weights.dry_load)."""
    from unilip_ds.engine.weights import check_config_json, dry_load, start_error
    from unilip_ds.models import weight_checks as W
    m, g = cfg.model, cfg.gen
    if m.init_from:
        root = Path(m.init_from)
        _need(root, "gen export", "model.init_from")
        if not (root / "model_index.json").is_file():
            recon = all((root / n).exists() for n in ("vision", "adapter", "decoder"))
            raise ConfigError(f"config key 'model.init_from': {root} is not a gen export (no model_index.json)"
                              + ("; it is a recon export: give it as model.unilip_path" if recon else
                                 "; recon exports go to model.unilip_path"))
        for name in ("mllm", "tokenizer", "connector", "transformer", "adapter", "decoder"):
            _need(root / name, f"component '{name}' of the export", "model.init_from")
        if g.target == "dcae" and not (root / "dcae").exists() and not m.dcae_path:
            raise ConfigError("config key 'model.dcae_path': gen.target=dcae and the export "
                              f"{root} holds no DC-AE")
        _check_export_flavor(root, m.flavor, "model.init_from")
        _check_export_pos_embed(root, cfg)
        check_config_json(root / "mllm", "model.init_from", W.GEN_EXPORT, "model_type", ("internvl",))
        model = W.on_meta(lambda: build_gen_model(cfg, 1.0))
        dry_load("model.init_from", root, W.GEN_EXPORT, lambda: load_export(model, str(root), cfg))
        return
    paths = {"internvl_path": "InternVL3 -hf directory", "unilip_path": "recon export",
             "sana_path": "SANA diffusers directory"}
    if g.target == "dcae":
        paths["dcae_path"] = "DC-AE directory"
    for key, what in paths.items():
        p = _path(cfg, key)
        if p is None:
            if m.flavor != "tiny":
                raise ConfigError(f"config key 'model.{key}': flavor {m.flavor} needs the {what} "
                                  "(or model.init_from = a gen export)")
            continue
        _need(p, what, f"model.{key}")
    internvl, unilip, sana = _path(cfg, "internvl_path"), _path(cfg, "unilip_path"), _path(cfg, "sana_path")
    if internvl:  # the MLLM's config comes from it (mllm_config): check it first
        check_config_json(internvl, "model.internvl_path", W.expect_internvl(m.flavor), "model_type", ("internvl",))
    if unilip:
        for name in ("vision", "adapter", "decoder"):
            if not (unilip / name).is_dir():
                gen = (unilip / "model_index.json").is_file()
                raise start_error("model.unilip_path", unilip, f"no {name}/"
                                  + ("; it is a gen export (give it as model.init_from)" if gen else ""),
                                  W.RECON_EXPORT)
        _check_export_flavor(unilip, m.flavor, "model.unilip_path")
    if sana:
        expect = W.expect_sana(m.flavor)
        if not (sana / "transformer").is_dir():
            inner = (sana / "config.json").is_file() and '"SanaTransformer2DModel"' in (sana / "config.json").read_text()
            raise start_error("model.sana_path", sana, "no transformer/" + (
                f"; this is the transformer folder itself: give its parent {sana.parent}" if inner else ""), expect)
        check_config_json(sana / "transformer", "model.sana_path", expect, "_class_name", ("SanaTransformer2DModel",))
    dcae = _path(cfg, "dcae_path") if g.target == "dcae" else None
    if dcae:
        check_config_json(dcae, "model.dcae_path", W.expect_dcae(m.flavor), "_class_name", ("AutoencoderDC",))
    model = W.on_meta(lambda: build_gen_model(cfg, 1.0))
    if internvl:  # its vision path is replaced by the recon export's
        dry_load("model.internvl_path", internvl, W.expect_internvl(m.flavor),
                 lambda: load_mllm(model.mllm, internvl, with_vision=unilip is None))
    if unilip:
        from unilip_ds.models.unilip import load_vision_into_internvl
        dry_load("model.unilip_path", unilip, W.RECON_EXPORT, lambda: (
            load_vision_into_internvl(model.mllm, unilip / "vision"),
            load_component(model.adapter, unilip / "adapter"),
            load_component(model.decoder, unilip / "decoder")))
    if sana:
        dry_load("model.sana_path", sana, W.expect_sana(m.flavor),
                 lambda: load_component(model.transformer, sana / "transformer"))
    if dcae:
        dry_load("model.dcae_path", dcae, W.expect_dcae(m.flavor), lambda: load_component(model.dcae, dcae))


def _check_export_flavor(root: Path, flavor: str, key: str) -> None:
    saved = root / "config.yaml"
    if saved.is_file():
        from omegaconf import OmegaConf
        theirs = OmegaConf.select(OmegaConf.load(saved), "model.flavor")
        if theirs and theirs != flavor:
            raise ConfigError(f"config key '{key}': {root} is an export of flavor '{theirs}', "
                              f"this run is model.flavor={flavor}")


def _check_export_pos_embed(root: Path, cfg) -> None:
    """An export's DiT continues with the positional embedding it was trained with."""
    conf = root / "transformer" / "config.json"
    if not conf.is_file():
        return
    theirs = json.loads(conf.read_text()).get("interpolation_scale") is not None
    if theirs != cfg.gen.dit_pos_embed:
        raise ConfigError(f"config key 'gen.dit_pos_embed': the DiT of {root} was trained "
                          f"{'with' if theirs else 'without'} the positional embedding; set "
                          f"gen.dit_pos_embed={str(theirs).lower()} to continue it")


def load_tokenizer(cfg):
    from transformers import AutoTokenizer
    src = Path(cfg.model.init_from) / "tokenizer" if cfg.model.init_from else _path(cfg, "internvl_path")
    if src is None:
        raise ConfigError("config key 'model.internvl_path': the generator needs the InternVL3 "
                          "tokenizer (model.internvl_path, or model.init_from = a gen export)")
    try:
        return AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as exc:
        key = "model.init_from" if cfg.model.init_from else "model.internvl_path"
        raise ConfigError(f"config key '{key}': no tokenizer in {src}: "
                          f"{str(exc).splitlines()[0]}") from None


def mllm_config(cfg):
    """InternVLConfig: from the checkpoint's config.json when there is one (rope, norms, ids
    as published), else from the flavor; its dimensions must be the flavor's."""
    from transformers import InternVLConfig
    from unilip_ds.models.connector import resolve_attn_impl
    from unilip_ds.models.flavors import get_flavor, internvl_config
    flavor = get_flavor(cfg.model.flavor)
    src = (Path(cfg.model.init_from) / "mllm" if cfg.model.init_from else _path(cfg, "internvl_path"))
    if src is not None and (src / "config.json").is_file():
        config = InternVLConfig.from_pretrained(str(src))
        t = config.text_config
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            if getattr(t, k) != flavor.text[k]:
                raise ConfigError(f"config key 'model.flavor': {src} has text_config.{k}="
                                  f"{getattr(t, k)}, flavor {flavor.name} has {flavor.text[k]}")
    else:
        config = internvl_config(flavor)
    config._attn_implementation = resolve_attn_impl(cfg.model.attn_impl)
    return config


def sana_config(flavor, pos_embed: bool = True) -> dict:
    """SanaTransformer2DModel kwargs with `interpolation_scale` explicit (gen.dit_pos_embed):
    diffusers 0.32's value for an unset key, max(sample_size // 64, 1), or None (no positional
    embedding). Explicit, so an export's transformer/config.json gives the same function under
    every diffusers version; the embedding is a non-persistent buffer, so no weight load would
    ever notice the difference."""
    sana = dict(flavor.sana)
    sana["interpolation_scale"] = max(sana["sample_size"] // 64, 1) if pos_embed else None
    return sana


def build_gen_model(cfg, latent_scale: float):
    """GenModel from config only (meta device / zero.Init friendly: no weights read)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import InternVLForConditionalGeneration
    from unilip_ds.models.connector import QueryConnector
    from unilip_ds.models.flavors import get_flavor
    from unilip_ds.models.generator import GenModel
    from unilip_ds.models.unilip import Adapter, DCAEDecoder
    flavor = get_flavor(cfg.model.flavor)
    config = mllm_config(cfg)
    mllm = InternVLForConditionalGeneration(config)
    connector = QueryConnector(text_config=config.text_config.to_dict(), num_layers=flavor.connector_layers,
                               num_queries=flavor.num_queries,
                               caption_channels=flavor.sana["caption_channels"])
    connector.set_attn_implementation(config._attn_implementation)
    dcae = AutoencoderDC(**flavor.dcae) if cfg.gen.target == "dcae" else None
    dit = SanaTransformer2DModel(**sana_config(flavor, cfg.gen.dit_pos_embed))
    return GenModel(mllm, connector, dit,
                    Adapter(flavor.d_llm, flavor.latent_channels), DCAEDecoder(**flavor.dcae), dcae,
                    target=cfg.gen.target, latent_scale=latent_scale, resolution=cfg.data.resolution,
                    train_dit=cfg.gen.train_dit, grad_checkpointing=cfg.model.grad_checkpointing)


def _current_key(k: str) -> str:
    for pat, rep in _LEGACY_KEYS:
        k = re.sub(pat, rep, k)
    return k


_VISION = ("model.vision_tower.", "model.multi_modal_projector.")


def mllm_state_dict(path: Path, with_vision: bool = True) -> dict:
    """An InternVL `-hf` checkpoint's tensors under InternVLForConditionalGeneration's keys;
    without the vision path's, which are then never read."""
    def keep(k: str) -> bool:
        return with_vision or not _current_key(k).startswith(_VISION)
    return {_current_key(k): v for k, v in read_weights_dir(path, keep=keep).items()}


def load_mllm(mllm, path: Path, with_vision: bool = True) -> None:
    """The MLLM from an InternVL3 checkpoint; `with_vision=False` leaves its vision path
    (another source fills it) and checks every other key strictly."""
    sd = mllm_state_dict(path, with_vision)
    tied = getattr(mllm.config.get_text_config(), "tie_word_embeddings", False) or \
        getattr(mllm.config, "tie_word_embeddings", False)
    if "lm_head.weight" not in sd and tied:
        sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]
    target = mllm
    if not with_vision:
        from torch import nn
        target, inner = nn.Module(), nn.Module()  # a view: the submodules stay owned by mllm
        inner.language_model = mllm.model.language_model
        target.model, target.lm_head = inner, mllm.lm_head
    load_state_dict_into(target, sd, strict=True, what=f"InternVL3 {path}")


def init_connector(model) -> None:
    """Connector = the LLM's last layers + final norm (queries N(0,1), projector default)."""
    llm = model.llm
    sd = model.connector.load_from_llm(full_state_dict(llm), len(llm.layers))
    want = {k for k in model.connector.state_dict() if k.startswith(("layers.", "norm."))}
    if set(sd) != want:
        raise ValueError(f"connector init: keys {sorted(want ^ set(sd))[:3]} do not match")
    load_state_dict_into(model.connector, sd, strict=False, what="connector from the LLM")


def load_pretrained(model, cfg) -> None:
    """A fresh gen_stage1: every frozen part from its published files."""
    from unilip_ds.models.unilip import load_vision_into_internvl
    if _path(cfg, "internvl_path"):  # its vision path is replaced by the recon export's
        load_mllm(model.mllm, _path(cfg, "internvl_path"), with_vision=not _path(cfg, "unilip_path"))
    if _path(cfg, "unilip_path"):
        u = _path(cfg, "unilip_path")
        load_vision_into_internvl(model.mllm, u / "vision")
        load_component(model.adapter, u / "adapter")
        load_component(model.decoder, u / "decoder")
    init_connector(model)
    if _path(cfg, "sana_path"):
        load_component(model.transformer, _path(cfg, "sana_path") / "transformer")
    if model.dcae is not None and _path(cfg, "dcae_path"):
        load_component(model.dcae, _path(cfg, "dcae_path"))


def load_export(model, path: str, cfg) -> None:
    """Every component from a gen export (`model.init_from`). A component this stage has
    but the export lacks is an error naming it; the DC-AE may come from model.dcae_path."""
    root = Path(path)
    index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
    for name in ("mllm", "connector", "transformer", "adapter", "decoder", "dcae"):
        comp = getattr(model, name)
        if comp is None:
            continue
        src = root / name
        if name == "dcae" and not src.exists() and _path(cfg, "dcae_path"):
            src = _path(cfg, "dcae_path")
        if not src.exists() or (name in index and index[name][0] is None):
            raise ConfigError(f"config key 'model.init_from': the export {root} has no '{name}' "
                              "component, which this stage needs")
        if name == "mllm":
            load_mllm(comp, src)
        else:
            load_component(comp, src)
