"""Raw inputs of data_prep: where samples come from, and how each one is validated.

A source is cut into units (one source tar, or a chunk of folder pairs / json records)
that workers process independently; the order of units and of samples inside a unit is
deterministic, so the output does not depend on the number of workers.

Layouts (see README "Data" for the published sets and their commands):
  tars      webdataset tars of <key>.jpg + <key>.txt (t2i) or <key>.input.jpg +
            <key>.output.jpg + <key>.txt (edit)
  folders   the same members as loose files, at any depth
  json      a list of records (a .json holding JSON Lines is accepted too); field names
            detected (FIELDS) or given. Image paths are relative to --image-root, by
            default the json's folder, or the task folder for a json inside a
            `metadata/` folder (GPT-Image-Edit-1.5M: <src>/<task>/metadata/<src>_<task>.json
            naming input/<id>.png, output/<id>.png). LLaVA-style records (`image: [in,
            out]`, `conversations`) give image[0] / image[-1] and the instruction from
            conversations[0].value with `<image>` and newlines removed; records with
            other than 2 images are skipped (`not_single_turn`), as the reference does.
            When the image root holds .tar files (ShareGPT-4o-Image's *_part_N.tar),
            images are read from them by member name, through an index of the tars
            built once (kept in the staging folder), without extracting them.
  list      a .txt of `img_dir,json[,flag]` lines (the reference's gptedit.txt; relative
            paths are relative to the list file's folder)

Sample kinds and the members they become in the output shards:
  t2i : <key>.jpg, <key>.txt (caption), <key>.json (provenance)
  edit: <key>.input.jpg, <key>.output.jpg, <key>.txt (instruction), <key>.json
Every image member is a JPEG (other formats, and images re-encoded with --resize, are
written as JPEG). <key> is the first 16 hex digits of the sample's content hash: of
(image, caption) for t2i, of (input, output, instruction) for edit.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from PIL import Image

from unilip_ds.data import storage
from unilip_ds.data.storage import StorageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "caption")
UNIT_RECORDS = 128  # folder pairs / json records per unit
ARCHIVE_PART = re.compile(r"\.tar\.gz\.part\d+$|\.tar\.gz$|\.tgz$")

# json field names tried in order (GPT-Image-Edit, ShareGPT-4o-Image and similar layouts)
FIELDS = {
    "input": ("input", "input_image", "source_image", "src_image", "image_in"),
    "output": ("output", "output_image", "edited_image", "target_image", "image_out"),
    "image": ("image", "output_image", "path", "file_name", "output"),
    "text": ("instruction", "caption", "prompt", "input_prompt", "edit_instruction", "text"),
}

# records left out by design (not losses): not counted against --max-skip-rate
FILTERED = ("not_single_turn", "several_input_images", "edit_record", "t2i_record")
# reasons that may go away when the input is fixed: a unit with one is redone on a re-run
RETRY = ("unreadable_file", "corrupt_tar", "missing_image", "missing_input_image",
         "missing_output_image")
EXAMPLES = 3  # offending paths kept per reason and unit

# where an image is: a url, or (tar url, data offset, size) of a member of an image tar
Loc = Union[str, Tuple[str, int, int]]


class PrepError(ValueError):
    """Bad data_prep input or arguments; one line."""


class Skip(Exception):
    """A sample is dropped; args[0] is the reason counted in the manifest, args[1] (if
    given) the offending path."""


@dataclass
class Unit:
    index: int
    kind: str  # t2i | edit
    source: str  # "tar" | "folder" | "json" | "items"
    # the tar (source="tar"), the json file (source="json"), or the JSON Lines file of
    # planned json records (source="items": `length` bytes from `start`, one line each)
    url: str = ""
    # folder: [(ref, {role: url})]; json: [(ref, {role: Loc | text | None} or skip reason)]
    items: List[Tuple[str, Any]] = field(default_factory=list)
    start: int = 0
    length: int = 0
    digest: str = ""  # of the planned records (source="items")

    def identity(self) -> str:
        """What the unit covers (checked when a re-run reuses its staged result)."""
        h = hashlib.sha256(f"{self.kind}|{self.source}|{self.url}|{len(self.items)}|"
                           f"{self.digest}".encode())
        for ref, _ in self.items[:1] + self.items[-1:]:
            h.update(ref.encode())
        return h.hexdigest()[:16]


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


def _sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def build_sample(kind: str, parts: Dict[str, Any], ref: str, opts: Options,
                 cfg: Any = None) -> Tuple[bytes, Dict[str, bytes]]:
    """Validate one raw sample -> (content digest, {member ext: bytes}); raises Skip.
    Image parts are bytes or a Loc (read here); text parts bytes, str or None."""
    meta = json.dumps({"source": ref}).encode()
    if kind == "t2i":
        caption = check_text(_text(parts.get("text"), "caption", cfg), "caption")
        raw = load(parts.get("image"), "image", cfg)
        image = check_image(raw, opts, "image")
        digest = _sha(_sha(raw) + _sha(caption.encode()))  # type: ignore[arg-type]
        return digest, {"jpg": image, "txt": caption.encode(), "json": meta}
    instruction = check_text(_text(parts.get("text"), "instruction", cfg), "instruction")
    raw_in = load(parts.get("input"), "input_image", cfg)
    raw_out = load(parts.get("output"), "output_image", cfg)
    image_in = check_image(raw_in, opts, "input_image")
    image_out = check_image(raw_out, opts, "output_image")
    digest = _sha(_sha(raw_in) + _sha(raw_out) + _sha(instruction.encode()))  # type: ignore
    return digest, {"input.jpg": image_in, "output.jpg": image_out,
                    "txt": instruction.encode(), "json": meta}


def _text(v: Any, what: str, cfg: Any = None) -> Optional[bytes]:
    if isinstance(v, TextFile):
        return load(str(v), what, cfg)
    return v.encode() if isinstance(v, str) else v


def load(part: Any, what: str, cfg: Any = None) -> Optional[bytes]:
    """The bytes of an image part: already bytes, None, or read from its Loc. A file
    that does not exist is `missing_<what>`; one that cannot be read `unreadable_file`."""
    if part is None or isinstance(part, bytes):
        return part
    if isinstance(part, tuple):
        url, off, n = part
        where = f"{url}@{off}"
    else:
        url, off, n, where = part, 0, None, part
    try:
        return storage.read_bytes(url, cfg, start=off, length=n)
    except StorageError:
        if not storage.is_s3(url) and not os.path.exists(storage.local_path(url)):
            raise Skip(f"missing_{what}", where) from None
        raise Skip("unreadable_file", where) from None


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


def read_unit(unit: Unit, counts: Dict[str, int], examples: Dict[str, List[str]],
              cfg: Any = None) -> Iterator[Tuple[str, Any]]:
    """Raw samples (ref, parts) of a unit; parts is a dict, or a skip reason decided
    when the unit was planned. Problems with the container itself (a corrupt tar) are
    counted in `counts` and end what they affect."""
    if unit.source == "tar":
        yield from _read_tar(unit, counts, examples, cfg)
    elif unit.source == "items":
        data = storage.read_bytes(unit.url, cfg, start=unit.start, length=unit.length)
        for line in data.splitlines():
            ref, parts = json.loads(line)
            if isinstance(parts, dict):  # a Loc in a tar came back as a list
                parts = {k: tuple(v) if isinstance(v, list) else v for k, v in parts.items()}
            yield ref, parts
    else:
        yield from unit.items


def note(counts: Dict[str, int], examples: Dict[str, List[str]], reason: str,
         path: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1
    ex = examples.setdefault(reason, [])
    if len(ex) < EXAMPLES:
        ex.append(path)


def _read_tar(unit: Unit, counts: Dict[str, int], examples: Dict[str, List[str]], cfg: Any):
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
            # tarfile ends iteration silently where the file ends (no end-of-archive
            # block was read: a truncated tar) and at an invalid header in mid-archive;
            # only zero padding may follow a real end-of-archive
            if tar.fileobj.tell() == tar.offset:  # type: ignore[union-attr]
                raise tarfile.ReadError("truncated: no end-of-archive marker")
            for block in iter(lambda: tar.fileobj.read(1 << 20), b""):  # type: ignore
                if block.strip(b"\0"):
                    raise tarfile.ReadError("data after the end of the archive")
    except (tarfile.TarError, EOFError, OSError, StorageError):
        # a corrupt member or truncated tar ends this source tar; what came before stays
        note(counts, examples, "corrupt_tar", unit.url)
        key = None
    if key is not None:
        yield f"{unit.url}#{key}", parts


# ---------------------------------------------------------------------------- listing

def walk(url: str, cfg: Any = None, keep: Callable[[str], bool] = lambda name: True
         ) -> List[str]:
    """Files under a directory or s3 prefix whose name passes `keep`, sorted; local
    symlinked folders are followed (each real folder once)."""
    if storage.is_s3(url):
        return [f for f in storage.list_files(url, cfg, recursive=True) if keep(f)]
    root = storage.local_path(url)
    scheme = "file://" if url.startswith("file://") else ""
    seen, out = set(), []
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        out += [os.path.join(d, f) for f in files if keep(f)]
    return sorted(scheme + p for p in out)


def _container(name: str) -> bool:
    return name.endswith((".tar", ".json", ".jsonl")) or bool(ARCHIVE_PART.search(name))


def stat(url: str, cfg: Any = None) -> Dict[str, Any]:
    """What identifies a version of a source file: size and mtime (or S3 ETag)."""
    if storage.is_s3(url):
        info = storage.with_retry(lambda: storage.s3_filesystem(cfg).info(storage.s3_key(url)),
                                  url, cfg)
        return {"size": int(info.get("size", 0)),
                "etag": str(info.get("ETag") or info.get("etag") or "").strip('"')}
    st = os.stat(storage.local_path(url))
    return {"size": st.st_size, "mtime": st.st_mtime_ns}


@dataclass
class Source:
    """One --src as found: its layout and the files it is read from."""
    spec: str
    layout: str  # tar | folder | json | list
    files: List[str]  # tars, jsons, list files, or folder files
    image_tars: Dict[str, List[str]] = field(default_factory=dict)  # image root -> tars


def _is_image(url: str) -> bool:
    return _split_name(url)[1].rpartition(".")[2] in IMAGE_EXTS


def find_sources(srcs: List[str], kind: str, cfg: Any = None,
                 image_root: Optional[str] = None) -> List[Source]:
    """Resolve each --src to its layout and files (no records read yet)."""
    from unilip_ds.data.shards import list_shards

    out: List[Source] = []
    for src in srcs:
        src = src.rstrip("/") if len(src) > 1 else src
        if any(c in src for c in "{*?["):
            files = list_shards([src], cfg) if src.endswith(".tar") else storage.glob(src, cfg)
        elif storage.isdir(src, cfg):
            # tars and jsons first: a GPT-Image-Edit tree's millions of images are not
            # listed in memory; loose image + text pairs only when there is nothing else
            files = walk(src, cfg, keep=_container)
            tars_here = any(f.endswith(".tar") for f in files)
            jsons_here = any(f.endswith((".json", ".jsonl")) for f in files)
            if not (tars_here or jsons_here) or (kind == "t2i" and not tars_here):
                files = walk(src, cfg)  # (t2i: <key>.json next to <key>.jpg + .txt?)
        elif storage.exists(src, cfg):
            files = [src]
        else:
            raise PrepError(f"--src {src}: no such file, directory or prefix")
        if len(files) == 1 and files[0] == src and src.endswith(".txt") and _is_list(src, cfg):
            out.append(Source(src, "list", [src]))
            continue
        tars = [f for f in files if f.endswith(".tar")]
        jsons = [f for f in files if f.endswith((".json", ".jsonl"))]
        if jsons and not (kind == "t2i" and any(map(_is_image, files)) and not tars):
            # json records; tars in their image root (ShareGPT-4o-Image) hold their images
            roots = {image_root.rstrip("/")} if image_root else {_default_root(j) for j in jsons}
            stores = {r: [f for f in storage.list_files(r, cfg) if f.endswith(".tar")]
                      for r in sorted(roots) if storage.isdir(r, cfg)}
            out.append(Source(src, "json", jsons, {r: t for r, t in stores.items() if t}))
        elif tars:
            out.append(Source(src, "tar", tars))
        else:
            pairs = [f for f in files if _role(kind, _split_name(f)[1]) is not None]
            if not pairs:
                parts = [f for f in files if ARCHIVE_PART.search(f)]
                if parts:
                    raise PrepError(
                        f"--src {src}: holds archives ({os.path.basename(parts[0])} ...) but "
                        f"no metadata json; extract them first: cd {src} && for a in "
                        f"$(ls *.tar.gz.part* | sed 's/\\.part[0-9]*$//' | sort -u); do cat "
                        f"$a.part* | tar -xzf -; done (README, Data)")
                raise PrepError(f"--src {src}: no tars, json records or image+text pairs found")
            out.append(Source(src, "folder", pairs))
    return out


def _is_list(url: str, cfg: Any) -> bool:
    lines = [ln for ln in storage.read_bytes(url, cfg).decode("utf-8", "replace").splitlines()
             if ln.strip()]
    return bool(lines) and all(len(ln.split(",")) >= 2 and
                               ln.split(",")[1].strip().endswith((".json", ".jsonl"))
                               for ln in lines)


def _default_root(json_url: str) -> str:
    """A json's image root: its folder, or the task folder of a `metadata/` json."""
    folder = storage.parent(json_url)
    if folder.rstrip("/").rsplit("/", 1)[-1] == "metadata":
        return storage.parent(folder)
    return folder


def source_files(sources: List[Source], cfg: Any = None) -> Dict[str, Any]:
    """The fingerprint of the inputs: every container file with its size and mtime /
    ETag (a folder of loose pairs by count and one digest over its files)."""
    fp: Dict[str, Any] = {}
    for s in sources:
        if s.layout == "folder":
            h = hashlib.sha256()
            for f in s.files:
                st = stat(f, cfg)
                h.update(f"{f}|{st}".encode())
            fp[f"{s.spec} (folder)"] = {"files": len(s.files), "digest": h.hexdigest()[:16]}
            continue
        files = list(s.files) + [t for ts in s.image_tars.values() for t in ts]
        if s.layout == "list":
            files += [j for _, j in _list_entries(s.spec, cfg)]
        for f in files:
            fp[f] = stat(f, cfg)
    return fp


def _list_entries(url: str, cfg: Any) -> List[Tuple[str, str]]:
    """(image dir, json) of each line of a list file, resolved against its folder."""
    base = storage.parent(url)
    out = []
    for ln in storage.read_bytes(url, cfg).decode("utf-8").splitlines():
        if not ln.strip():
            continue
        cols = [c.strip() for c in ln.split(",")]
        img_dir, js = (_resolve(base, c) for c in cols[:2])
        out.append((img_dir, js))
    return out


def _resolve(base: str, path: str) -> str:
    return path if storage.is_s3(path) or os.path.isabs(path) else storage.join(base, path)


def load_records(url: str, cfg: Any = None) -> List[Dict[str, Any]]:
    """A json list of records, a {"key": [records]} / {id: record} object, or JSON
    Lines (in a .jsonl or a .json file)."""
    text = storage.read_bytes(url, cfg).decode("utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise PrepError(f"--src {url}: not valid json or JSON Lines ({exc})") from None
    if isinstance(data, dict):  # {"data": [...]} / {"id": record}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else list(data.values())
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise PrepError(f"--src {url}: expected a list of records")
    return data


def index_tars(tars: List[str], cfg: Any = None,
               progress: Callable[[str], None] = lambda t: None) -> Dict[str, Tuple[str, int, int]]:
    """member name -> (tar url, data offset, size), reading only the tar headers."""
    index: Dict[str, Tuple[str, int, int]] = {}
    for t in tars:
        progress(t)
        if storage.is_s3(t):
            f = storage.s3_filesystem(cfg).open(storage.s3_key(t), "rb", block_size=1 << 16)
        else:
            f = open(storage.local_path(t), "rb")
        with f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    index[_norm(m.name)] = (t, m.offset_data, m.size)
    return index


def _norm(path: str) -> str:
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path.lstrip("/")


class _Resolver:
    """Turns a record's image path into a Loc: a member of the root's image tars (by
    name, or by name below the tars' top folder), else a file under the root."""

    def __init__(self, root: str, index: Optional[Dict[str, Tuple[str, int, int]]]):
        self.root, self.index = root, index
        self.short: Optional[Dict[str, Tuple[str, int, int]]] = None

    def __call__(self, path: str) -> Loc:
        if self.index is not None and not (storage.is_s3(path) or os.path.isabs(path)):
            p = _norm(path)
            hit = self.index.get(p)
            if hit is None:
                if self.short is None:
                    self.short = {}
                    for k, v in self.index.items():
                        if "/" in k:
                            self.short.setdefault(k.split("/", 1)[1], v)
                hit = self.short.get(p)
            if hit is not None:
                return hit
        return _resolve(self.root, path)


def _field(rec: Dict[str, Any], role: str, fields: Dict[str, str]) -> Tuple[bool, Any]:
    names = (fields[role],) if fields.get(role) else FIELDS[role]
    present = False
    for name in names:
        if name in rec:
            present = True
        if rec.get(name) is not None:  # "" counts: an empty instruction is "empty"
            return True, rec[name]
    return present, None


def record_parts(rec: Dict[str, Any], kind: str, fields: Dict[str, str],
                 resolve: Callable[[str], Loc]) -> Union[str, Dict[str, Any]]:
    """{role: Loc | text | None} of one json record, or the reason it is skipped."""
    llava = isinstance(rec.get("image"), list) and "conversations" in rec and not fields
    if llava:
        images = rec["image"]
        if len(images) != 2:
            return "not_single_turn"
        try:
            text = rec["conversations"][0]["value"]
        except (KeyError, IndexError, TypeError):
            text = None
        if isinstance(text, str):
            text = text.replace("<image>", "").replace("\n", "")
        vals = {"input": images[0], "output": images[-1], "image": images[-1]}
        roles = ("input", "output") if kind == "edit" else ("image",)
        out: Dict[str, Any] = {r: resolve(vals[r]) if isinstance(vals[r], str) and vals[r]
                               else None for r in roles}
        out["text"] = text
        return out
    parts: Dict[str, Any] = {}
    if kind == "t2i":
        has_input, value = _field(rec, "input", {})
        if value and not fields.get("image") and "image" not in rec:
            return "edit_record"  # a t2i run over a folder holding edit records too
    roles = ("input", "output", "text") if kind == "edit" else ("image", "text")
    for role in roles:
        present, value = _field(rec, role, fields)
        if role == "input" and not present and not fields.get("input") \
                and _field(rec, "output", fields)[1] is not None:
            return "t2i_record"  # an edit run over a folder holding t2i records too
        if isinstance(value, list):  # ShareGPT-4o-Image lists input images
            if len(value) > 1:
                return "several_input_images"
            value = value[0] if value else None
        if role == "text":
            parts[role] = None if value is None else str(value)
        elif isinstance(value, str) and value:
            parts[role] = resolve(value)
        else:
            parts[role] = None
    return parts


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
        parts: Dict[str, Any] = {r: urls.get(r) for r in roles}
        if parts["text"] is not None:
            parts["text"] = TextFile(parts["text"])
        items.append((key, parts))
    return _chunks(items, kind, "folder", start)


class TextFile(str):
    """A caption file's url (read by the worker)."""


def plan_units(sources: List[Source], kind: str, cfg: Any = None,
               image_root: Optional[str] = None, fields: Optional[Dict[str, str]] = None,
               tar_index: Optional[Callable[[List[str]], Dict[str, Tuple[str, int, int]]]] = None,
               spill: Optional[Callable[[int, bytes], str]] = None) -> List[Unit]:
    """Cut the sources into units. json records are reduced to their image locations
    and text here (the workers get no whole records). With `spill(k, data) -> url`,
    the reduced records of the k-th json are written out as JSON Lines and units only
    point at their byte ranges: nothing per record stays in memory (1.5M GPT-Image-Edit
    records would hold ~1.4 KB each as Python objects)."""
    fields = dict(fields or {})
    tar_index = tar_index or (lambda tars: index_tars(tars, cfg))
    units: List[Unit] = []
    spilled = 0
    for s in sources:
        before = len(units)
        if s.layout == "tar":
            units += [Unit(len(units) + i, kind, "tar", url=t) for i, t in enumerate(s.files)]
        elif s.layout == "folder":
            units += _folder_units(s.files, kind, len(units))
        else:
            jobs = (_list_entries(s.spec, cfg) if s.layout == "list" else
                    [(image_root or _default_root(j), j) for j in s.files])
            for root, j in jobs:
                tars = s.image_tars.get(root, [])
                resolve = _Resolver(root, tar_index(tars) if tars else None)
                items = [(f"{j}#{i}", record_parts(rec, kind, fields, resolve))
                         for i, rec in enumerate(load_records(j, cfg))]
                if spill is None:
                    units += _chunks(items, kind, "json", len(units), url=j)
                    continue
                lines = [json.dumps(it).encode() + b"\n" for it in items]
                del items
                url = spill(spilled, b"".join(lines))
                spilled += 1
                pos = 0
                for a in range(0, len(lines), UNIT_RECORDS):
                    chunk = b"".join(lines[a:a + UNIT_RECORDS])
                    units.append(Unit(len(units), kind, "items", url=url, start=pos,
                                      length=len(chunk),
                                      digest=hashlib.sha256(chunk).hexdigest()[:16]))
                    pos += len(chunk)
                del lines
        if len(units) == before:
            raise PrepError(f"--src {s.spec}: no tars, json records or image+text pairs found")
    return units
