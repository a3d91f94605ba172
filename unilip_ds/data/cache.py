"""Caches of what the generator's frozen parts compute, per source shard.

A cache set (a directory or s3:// prefix) holds, for every source shard `X.tar`, a cache
shard `X.tar` whose members are `<sample key>.cache`: the safetensors bytes of that sample's
tensors, in the source shard's order:

  level latents  latent          (C, h, w)       target latent x gen.latent_scale
                 ref             (N, d)          edit: the reference image's UniLIP features
  level prefix   prefix.hidden   (P, d)          the frozen LLM over the prompt prefix (post-norm,
                 prefix.k/.v     (L, kvh, P, hd)   image positions = raw features) and its K/V
                 null.hidden/.k/.v               edit: the same for the CFG-null prompt (it keeps
                                                 the image); T2I's null prompt is one constant

plus `cache_manifest.json`: the level, the fingerprint (everything the values depend on),
and per shard its sample count, bytes and sha256. Values come from GenModel's own
`target_latent` / `image_features` / `prefix`, the calls the live training path makes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch

LEVELS = ("none", "latents", "prefix")
MANIFEST = "cache_manifest.json"
INDEX_SUFFIX = ".index.json"  # per cache shard: key -> [offset, length, digest] of its record
FORMAT = "unilip_ds.cache/1"


class CacheError(ValueError):
    """A cache that cannot be used for this run; the message is one line."""


def encode_record(tensors: Dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def decode_record(data: bytes) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load
    return load(data)


def record_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def tensor_hash(state: Dict[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(model, builder, level: str, dtype: torch.dtype, flavor: str) -> Dict[str, str]:
    """Everything the cached values depend on, part by part (a mismatch names the part)."""
    from unilip_ds.engine.weights import full_state_dict
    from unilip_ds.models.prompts import NULL_PROMPTS, TEMPLATES, chat
    if level not in LEVELS[1:]:
        raise CacheError(f"cache level must be latents or prefix, got '{level}'")
    base = model.mllm.model
    encoder = {**{f"vision.{k}": v for k, v in full_state_dict(base.vision_tower).items()},
               **{f"projector.{k}": v for k, v in full_state_dict(base.multi_modal_projector).items()},
               **{f"adapter.{k}": v for k, v in full_state_dict(model.adapter).items()}}
    if model.dcae is not None:
        encoder.update({f"dcae.{k}": v for k, v in full_state_dict(model.dcae.encoder).items()})
    parts = {"format": FORMAT, "level": level, "flavor": flavor, "dtype": str(dtype).replace("torch.", ""),
             "target": model.target, "latent_scale": repr(float(model.latent_scale)),
             "resolution": str(model.resolution), "weights.encoder": tensor_hash(encoder),
             # how images become encoder inputs (ImageNet normalisation in fp32, then the dtype)
             "pixels": "imagenet-norm-fp32"}
    if level == "prefix":
        parts["weights.llm"] = tensor_hash(full_state_dict(model.llm))
        prompt = {"templates": TEMPLATES, "null": NULL_PROMPTS, "chat": chat("{}"),
                  # user text tokenised as text between the template's special tokens
                  "user_text": "split_special_tokens; edit: <image> cut",
                  "max_length": builder.max_length, "num_queries": builder.num_queries,
                  "num_image_tokens": builder.num_image_tokens}
        parts["prompt"] = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()
        tok = builder.tokenizer
        parts["tokenizer"] = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest() \
            if hasattr(tok, "backend_tokenizer") else hashlib.sha256(
                json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    return parts


def mismatch(theirs: Dict[str, str], ours: Dict[str, str]) -> Optional[str]:
    """The parts that differ, as a phrase; None when the cache fits."""
    diff = [f"{k} (cache: {str(theirs.get(k))[:12]}, this run: {str(ours.get(k))[:12]})"
            for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    return ("differs: " + ", ".join(diff)) if diff else None


@dataclass
class CacheShard:
    name: str  # the source shard's file name
    source: str  # the source shard's URL when built
    samples: int
    bytes: int
    sha256: str
    skipped: Dict[str, int] = field(default_factory=dict)


@dataclass
class CacheManifest:
    task: str  # t2i | edit
    level: str
    fingerprint: Dict[str, str]
    shards: List[CacheShard] = field(default_factory=list)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CacheManifest":
        d = json.loads(text)
        d["shards"] = [CacheShard(**s) for s in d.get("shards", [])]
        return cls(**d)


# -------------------------------------------------------------------------- reading
def read_manifest(url: str, cfg: Any = None) -> CacheManifest:
    from unilip_ds.data import storage
    try:
        return CacheManifest.from_json(storage.read_bytes(storage.join(url, MANIFEST), cfg).decode())
    except (storage.StorageError, OSError, ValueError, TypeError, KeyError) as exc:
        raise CacheError(f"cache {url}: no readable {MANIFEST} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def level_keys(level: str, task: str) -> tuple:
    keys = ("latent",) + (("ref",) if task == "edit" else ())
    if level == "prefix":
        keys += ("prefix.hidden", "prefix.k", "prefix.v")
        if task == "edit":
            keys += ("null.hidden", "null.k", "null.v")
    return keys


class SourceCache:
    """Records of one cached source, fetched by (source shard URL, sample key) with ranged
    reads (read ahead, see DataConfig.cache_read_ahead_kib); a record that is missing,
    unreadable or fails its digest is a miss (the sample is then computed live), never a
    wrong value."""

    def __init__(self, url: str, task: str, cfg: Any = None):
        self.url, self.cfg = url, cfg
        self.manifest = read_manifest(url, cfg)
        if self.manifest.task != task:
            raise CacheError(f"cache {url} holds {self.manifest.task} samples, its source is {task}")
        self.sizes = {s.name: s.bytes for s in self.manifest.shards}
        self.names = set(self.sizes)
        self.keys = level_keys(self.manifest.level, task)
        self._index: Dict[str, Optional[dict]] = {}
        self.read_ahead = 1024 * int(getattr(cfg, "cache_read_ahead_kib", 0) or 0)
        self._chunks: "OrderedDict[Tuple[str, int], bytes]" = OrderedDict()  # LRU, 8 x read_ahead
        self.requests = 0  # ranged reads of records made (for benchmarks and tests)

    def _read(self, name: str, start: int, length: int) -> bytes:
        from unilip_ds.data import storage
        for (n, s), chunk in reversed(self._chunks.items()):
            if n == name and s <= start and start + length <= s + len(chunk):
                self._chunks.move_to_end((n, s))
                return chunk[start - s:start - s + length]
        # the aligned window around the record (shuffled requests come from both sides)
        first = start - start % self.read_ahead if self.read_ahead else start
        end = max(start + length, min(first + self.read_ahead, self.sizes.get(name, 0)))
        self.requests += 1
        data = storage.read_bytes(storage.join(self.url, name), self.cfg, first, end - first)
        if end - first > length:
            self._chunks[(name, first)] = data
            while len(self._chunks) > 8:
                self._chunks.popitem(last=False)
        return data[start - first:start - first + length]

    def _shard_index(self, name: str) -> Optional[dict]:
        from unilip_ds.data import storage
        if name not in self._index:
            if len(self._index) > 8:  # a worker reads few shards at a time
                self._index.clear()
            try:
                self._index[name] = json.loads(storage.read_bytes(
                    storage.join(self.url, name + INDEX_SUFFIX), self.cfg)) if name in self.names else None
            except (storage.StorageError, OSError, ValueError):
                self._index[name] = None
        return self._index[name]

    def get(self, shard_url: str, key: str):
        """(record, None) or (None, miss reason)."""
        from unilip_ds.data import storage
        name = shard_url.rstrip("/").rsplit("/", 1)[-1]
        index = self._shard_index(name)
        if index is None:
            return None, "missing_shard"
        entry = index.get(key)
        if entry is None:
            return None, "missing_sample"
        start, length, digest = entry
        try:
            data = self._read(name, start, length)
        except (storage.StorageError, OSError):
            return None, "unreadable"
        if len(data) != length or record_digest(data) != digest:
            return None, "corrupt"
        try:
            rec = decode_record(data)
        except Exception:  # safetensors raises its own error types on bad bytes
            return None, "corrupt"
        if not all(k in rec for k in self.keys):
            return None, "corrupt"
        return rec, None


# -------------------------------------------------------------------------- per-sample records
def prefix_rows(state, prefix: str) -> List[Dict[str, torch.Tensor]]:
    """Row i of a PrefixState, unpadded: {prefix.hidden (P_i, d), prefix.k/.v (L, kvh, P_i, hd)}."""
    rows = []
    for i, n in enumerate(state.mask.sum(1).tolist()):
        real = state.mask[i]
        rows.append({f"{prefix}.hidden": state.hidden[i][real],
                     f"{prefix}.k": torch.stack([k[i][:, real] for k, _ in state.kv]),
                     f"{prefix}.v": torch.stack([v[i][:, real] for _, v in state.kv])})
    return rows


def state_from_rows(rows: List[Dict[str, torch.Tensor]], prefix: str, device, dtype):
    """The PrefixState of a batch from per-sample records: right-padded to the longest."""
    from unilip_ds.models.generator import PrefixState
    lengths = [r[f"{prefix}.hidden"].shape[0] for r in rows]
    width, b = max(lengths), len(rows)
    first = rows[0]
    d = first[f"{prefix}.hidden"].shape[1]
    layers, kvh, _, hd = first[f"{prefix}.k"].shape
    hidden = torch.zeros(b, width, d, dtype=dtype, device=device)
    keys = torch.zeros(layers, b, kvh, width, hd, dtype=dtype, device=device)
    values = torch.zeros_like(keys)
    mask = torch.zeros(b, width, dtype=torch.bool, device=device)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        hidden[i, :n] = r[f"{prefix}.hidden"].to(device, dtype)
        keys[:, i, :, :n] = r[f"{prefix}.k"].to(device, dtype)
        values[:, i, :, :n] = r[f"{prefix}.v"].to(device, dtype)
        mask[i, :n] = True
    return PrefixState(hidden, [(keys[l], values[l]) for l in range(layers)], mask)


@torch.no_grad()
def compute_records(model, builder, task: str, images: torch.Tensor, texts: List[str], level: str,
                    dtype: torch.dtype, ref_images: Optional[torch.Tensor] = None) -> List[Dict[str, torch.Tensor]]:
    """The cache records of one decoded batch (images in [0, 1] on the model's device)."""
    latents = model.target_latent(images)
    feats = model.image_features(ref_images) if task == "edit" else None
    rows: List[Dict[str, torch.Tensor]] = [{"latent": latents[i]} for i in range(len(texts))]
    if feats is not None:
        for i, r in enumerate(rows):
            r["ref"] = feats[i]
    if level == "prefix":
        device = images.device
        for r, p in zip(rows, prefix_rows(model.prefix(builder(task, texts).to(device), feats), "prefix")):
            r.update(p)
        if task == "edit":
            null = model.prefix(builder(task, [None] * len(texts)).to(device), feats)
            for r, p in zip(rows, prefix_rows(null, "null")):
                r.update(p)
    return [{k: v.to(dtype) for k, v in r.items()} for r in rows]


def bytes_per_sample(model, builder, task: str, level: str, dtype: torch.dtype, prompt_tokens: float) -> int:
    """Storage of one sample's record at `level` (prompt_tokens: mean prefix length)."""
    if level == "none":
        return 0
    size = torch.tensor([], dtype=dtype).element_size()
    side = model.resolution // (32 if model.target == "dcae" else 28)
    n = model.transformer.config.in_channels * side * side
    d = model.llm.config.hidden_size
    if task == "edit":
        n += builder.num_image_tokens * d
    if level == "prefix":
        cfg = model.llm.config
        hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
        per_token = d + 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd
        n += int(prompt_tokens * per_token) * (2 if task == "edit" else 1)
    return n * size
