"""Raw inputs of data_prep: where samples come from, and how each one is validated.

A source is cut into units (one source tar, or a chunk of folder pairs / json records)
that workers process independently; the order of units and of samples inside a unit is
deterministic, so the output does not depend on the number of workers.

Sample kinds and the members they become in the output shards:
  t2i : <key>.jpg, <key>.txt (caption), <key>.json (provenance)
  edit: <key>.input.jpg, <key>.output.jpg, <key>.txt (instruction), <key>.json
Every image member is a JPEG (other formats, and images re-encoded with --resize, are
written as JPEG).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image

from unilip_ds.data import storage
from unilip_ds.data.storage import StorageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "caption")
UNIT_RECORDS = 128  # folder pairs / json records per unit

# json field names tried in order (GPT-Image-Edit, ShareGPT-4o-Image and similar layouts)
FIELDS = {
    "input": ("input", "input_image", "source_image", "src_image", "image_in"),
    "output": ("output", "output_image", "edited_image", "target_image", "image_out"),
    "image": ("image", "output_image", "path", "file_name", "output"),
    "text": ("instruction", "caption", "prompt", "input_prompt", "edit_instruction", "text"),
}


class PrepError(ValueError):
    """Bad data_prep input or arguments; one line."""


class Skip(Exception):
    """A sample is dropped; args[0] is the reason counted in the manifest."""


@dataclass
class Unit:
    index: int
    kind: str  # t2i | edit
    source: str  # "tar" | "folder" | "json"
    url: str = ""  # the tar (source="tar") or the json file (source="json")
    # folder: [(ref, {part: url})]; json: [(ref, record)]
    items: List[Tuple[str, Any]] = field(default_factory=list)
    image_root: str = ""
    fields: Dict[str, str] = field(default_factory=dict)


@dataclass
class Options:
    resize: Optional[int] = None  # max image side; larger images are re-encoded
    quality: int = 95
    min_side: int = 16


# ------------------------------------------------------------------------ validation

def check_image(data: Optional[bytes], opts: Options, what: str = "image") -> bytes:
    """Decode fully (catches truncation), return JPEG bytes to store (the original bytes
    when they already are a small-enough RGB/L JPEG)."""
    if not data:
        raise Skip(f"missing_{what}")
    try:
        im = Image.open(io.BytesIO(data))
        fmt, (w, h) = im.format, im.size
        target = None
        if opts.resize and max(w, h) > opts.resize:
            s = opts.resize / max(w, h)
            target = (max(1, round(w * s)), max(1, round(h * s)))
            if fmt == "JPEG":
                im.draft("RGB", target)  # DCT-domain downscale: decode less
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise Skip(f"bad_{what}") from None
    if min(w, h) < opts.min_side:
        raise Skip(f"small_{what}")
    if fmt == "JPEG" and target is None and im.mode in ("RGB", "L"):
        return data
    im = im.convert("RGB")
    if target is not None and im.size != target:
        im = im.resize(target, Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=opts.quality)
    return buf.getvalue()


def check_text(data: Optional[bytes], what: str = "caption") -> str:
    if data is None:
        raise Skip(f"missing_{what}")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise Skip(f"bad_{what}") from None
    if not text:
        raise Skip(f"empty_{what}")
    return text


def build_sample(kind: str, parts: Dict[str, Optional[bytes]], ref: str,
                 opts: Options) -> Tuple[str, Dict[str, bytes]]:
    """Validate one raw sample -> (content hash, {member ext: bytes}); raises Skip."""
    meta = json.dumps({"source": ref}).encode()
    if kind == "t2i":
        raw = parts.get("image")
        caption = check_text(parts.get("text"), "caption")
        image = check_image(raw, opts, "image")
        digest = hashlib.sha256(raw).hexdigest()  # type: ignore[arg-type]
        return digest, {"jpg": image, "txt": caption.encode(), "json": meta}
    raw_in, raw_out = parts.get("input"), parts.get("output")
    instruction = check_text(parts.get("text"), "instruction")
    image_in = check_image(raw_in, opts, "input_image")
    image_out = check_image(raw_out, opts, "output_image")
    h = hashlib.sha256()
    for b in (raw_in, raw_out, instruction.encode()):
        h.update(hashlib.sha256(b).digest())  # type: ignore[arg-type]
    return h.hexdigest(), {"input.jpg": image_in, "output.jpg": image_out,
                           "txt": instruction.encode(), "json": meta}


# --------------------------------------------------------------------------- reading

def _split_name(name: str) -> Tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _role(kind: str, ext: str) -> Optional[str]:
    if ext in TEXT_EXTS:
        return "text"
    if kind == "t2i" and ext in IMAGE_EXTS:
        return "image"
    if kind == "edit":
        sub, _, img = ext.partition(".")
        if sub in ("input", "output") and img in IMAGE_EXTS:
            return sub
    return None


def read_unit(unit: Unit, counts: Dict[str, int],
              cfg: Any = None) -> Iterator[Tuple[str, Dict[str, Optional[bytes]]]]:
    """Raw samples (ref, parts) of a unit. Problems with the container itself (corrupt
    tar, unreadable file) are counted in `counts` and end or skip what they affect."""
    if unit.source == "tar":
        yield from _read_tar(unit, counts, cfg)
    elif unit.source == "folder":
        for ref, urls in unit.items:
            parts: Dict[str, Optional[bytes]] = {}
            for role, url in urls.items():
                parts[role] = _read_or_count(url, counts, cfg)
            yield ref, parts
    else:
        for ref, rec in unit.items:
            yield ref, _json_parts(unit, rec, counts, cfg)


def _read_or_count(url: str, counts: Dict[str, int], cfg: Any) -> Optional[bytes]:
    try:
        return storage.read_bytes(url, cfg)
    except StorageError:
        counts["unreadable_file"] = counts.get("unreadable_file", 0) + 1
        return None


def _read_tar(unit: Unit, counts: Dict[str, int], cfg: Any):
    key, parts = None, {}
    try:
        with storage.open_shard(unit.url, cfg) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = _split_name(m.name)
                role = _role(unit.kind, ext)
                if k != key:
                    if key is not None:
                        yield f"{unit.url}#{key}", parts
                    key, parts = k, {}
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                if role is not None:
                    parts[role] = data
            # tarfile ends iteration silently at an invalid header in mid-archive; only
            # zero padding may follow a real end-of-archive
            for block in iter(lambda: tar.fileobj.read(1 << 20), b""):  # type: ignore
                if block.strip(b"\0"):
                    raise tarfile.ReadError("data after the end of the archive")
    except (tarfile.TarError, EOFError, OSError, StorageError):
        # a corrupt member or truncated tar ends this source tar; what came before stays
        counts["corrupt_tar"] = counts.get("corrupt_tar", 0) + 1
        key = None
    if key is not None:
        yield f"{unit.url}#{key}", parts


def _field(rec: Dict[str, Any], role: str, fields: Dict[str, str]) -> Any:
    names = (fields[role],) if fields.get(role) else FIELDS[role]
    for name in names:
        if rec.get(name) is not None:  # "" counts: an empty instruction is "empty"
            return rec[name]
    return None


def _json_parts(unit: Unit, rec: Dict[str, Any], counts: Dict[str, int], cfg: Any):
    roles = ("input", "output", "text") if unit.kind == "edit" else ("image", "text")
    parts: Dict[str, Optional[bytes]] = {}
    for role in roles:
        value = _field(rec, role, unit.fields)
        if isinstance(value, list):  # ShareGPT-4o-Image lists input images
            value = value[0] if len(value) == 1 else None
        if role == "text":
            parts[role] = None if value is None else str(value).encode()
        elif isinstance(value, str) and value:
            url = value if storage.is_s3(value) or os.path.isabs(value) else \
                storage.join(unit.image_root, value)
            parts[role] = _read_or_count(url, counts, cfg)
        else:
            parts[role] = None
    return parts


# ---------------------------------------------------------------------------- listing

def _chunks(items: Sequence[Tuple[str, Any]], kind: str, source: str, start: int,
            **kw: Any) -> List[Unit]:
    return [Unit(start + i, kind, source, items=list(items[j:j + UNIT_RECORDS]), **kw)
            for i, j in enumerate(range(0, len(items), UNIT_RECORDS))]


def _folder_units(files: List[str], kind: str, start: int) -> List[Unit]:
    groups: Dict[str, Dict[str, str]] = {}
    for url in files:
        key, ext = _split_name(url)
        role = _role(kind, ext)
        if role is not None:
            groups.setdefault(key, {})[role] = url
    roles = ("image", "text") if kind == "t2i" else ("input", "output", "text")
    items = []
    for key in sorted(groups):
        urls = groups[key]
        # a missing role becomes a url that does not exist -> counted as missing
        items.append((key, {r: urls[r] for r in roles if r in urls}))
    return _chunks(items, kind, "folder", start)


def _load_records(url: str, cfg: Any) -> List[Dict[str, Any]]:
    text = storage.read_bytes(url, cfg).decode("utf-8")
    try:
        if url.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PrepError(f"--src {url}: not valid json ({exc})") from None
    if isinstance(data, dict):  # {"data": [...]} / {"id": record}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else list(data.values())
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise PrepError(f"--src {url}: expected a list of records")
    return data


def plan_units(srcs: List[str], kind: str, cfg: Any = None, image_root: Optional[str] = None,
               fields: Optional[Dict[str, str]] = None) -> List[Unit]:
    """Cut the sources into units. Each src is a tar / json file, a brace or glob pattern
    of them, or a directory / s3 prefix holding tars, json files or image+text files."""
    from unilip_ds.data.shards import list_shards

    units: List[Unit] = []
    for src in srcs:
        src = src.rstrip("/") if len(src) > 1 else src
        if any(c in src for c in "{*?["):
            files = list_shards([src], cfg) if src.endswith(".tar") else storage.glob(src, cfg)
        elif storage.isdir(src, cfg):
            files = storage.list_files(src, cfg, recursive=True)
        elif storage.exists(src, cfg):
            files = [src]
        else:
            raise PrepError(f"--src {src}: no such file, directory or prefix")
        before = len(units)
        tars = [f for f in files if f.endswith(".tar")]
        jsons = [f for f in files if f.endswith((".json", ".jsonl"))]
        images = [f for f in files if _split_name(f)[1].rpartition(".")[2] in IMAGE_EXTS]
        if tars:
            units += [Unit(len(units) + i, kind, "tar", url=t) for i, t in enumerate(tars)]
        elif jsons and not (kind == "t2i" and images):
            for j in jsons:
                recs = _load_records(j, cfg)
                items = [(f"{j}#{i}", r) for i, r in enumerate(recs)]
                units += _chunks(items, kind, "json", len(units), url=j,
                                 image_root=image_root or storage.parent(j),
                                 fields=dict(fields or {}))
        else:
            units += _folder_units(files, kind, len(units))
        if len(units) == before:
            raise PrepError(f"--src {src}: no tars, json records or image+text pairs found")
    return units
