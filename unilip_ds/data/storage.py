"""One opener for local paths, file:// and s3:// URLs, with bounded retry.

Readers: `open_shard(url, cfg)` returns a streaming binary file of a whole shard. A
transient failure in the middle of a read (connection refused/reset, 5xx, timeout, a
server restart) closes the connection, waits with exponential backoff, re-opens and
seeks back to the byte offset already delivered, so the caller sees an unbroken byte
stream. An outage longer than `cfg.io_retry_seconds` (counted from the last byte that
arrived) ends in one `StorageError` line naming the shard.

On s3:// every failure is retried inside that bound, 404 included: a restarting gateway
answers it for a moment before its filer is loaded. A request the server refuses (403:
a signature mismatch, an unknown access key, an expired token, access denied) fails at
once with one line: no retry changes credentials; so does a request botocore cannot sign
because the environment holds no credentials (NoCredentialsError), naming the variables.
A local path that does not exist or cannot be read fails at once too.

s3fs filesystems are created lazily, one per (process, endpoint, region), and never
shared across fork (s3fs holds an event loop thread and connection pool). Credentials
come only from the standard AWS environment variables, which botocore reads itself, so
they never pass through our config, logs or messages (`_redact` guards the last).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import shutil
import threading
import time
from typing import IO, Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Ranged GETs of this size: large enough for throughput, small enough that a retry after a
# mid-shard failure re-reads little.
READ_BLOCK = 8 << 20
# s3fs multipart upload part size for writers
WRITE_BLOCK = 16 << 20


class StorageError(IOError):
    """A shard or object could not be read or written; the message names it, one line."""


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def local_path(url: str) -> str:
    """file:///a/b and /a/b -> /a/b."""
    return url[len("file://"):] if url.startswith("file://") else url


def s3_key(url: str) -> str:
    """s3://bucket/key -> bucket/key (the form s3fs takes)."""
    return url[len("s3://"):]


def join(base: str, name: str) -> str:
    """Join a directory URL or path with a relative name, keeping the scheme."""
    if is_s3(base) or base.startswith("file://"):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


# ---------------------------------------------------------------------------- config

def _cfg_value(cfg: Any, name: str, default: Any) -> Any:
    value = getattr(cfg, name, None) if cfg is not None else None
    return default if value is None else value


def retry_seconds(cfg: Any) -> float:
    return float(_cfg_value(cfg, "io_retry_seconds", 60.0))


def _endpoint(cfg: Any) -> Optional[str]:
    return _cfg_value(cfg, "s3_endpoint", None) or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")


def _region(cfg: Any) -> Optional[str]:
    return _cfg_value(cfg, "s3_region", None) or os.environ.get("AWS_REGION") \
        or os.environ.get("AWS_DEFAULT_REGION")


def _redact(text: str) -> str:
    """Remove credential values from a message (belt and braces: botocore does not put
    secrets in its messages, but an access key id may appear in some servers' replies)."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def describe(exc: BaseException) -> str:
    """One line for an exception: its type and the first line of its message."""
    msg = str(exc).strip().splitlines()
    return _redact(f"{type(exc).__name__}: {msg[0]}" if msg and msg[0] else type(exc).__name__)


# ------------------------------------------------------------------------ filesystems

_FS_LOCK = threading.Lock()
_FS: Dict[Tuple[int, Optional[str], Optional[str]], Any] = {}
_INHERITED: List[Any] = []


def _after_fork_in_child() -> None:
    global _FS_LOCK
    _FS_LOCK = threading.Lock()  # a parent thread may have held it at fork time


os.register_at_fork(after_in_child=_after_fork_in_child)


def reset_filesystems() -> None:
    """Forget this process's S3 filesystems (after credentials or endpoint env changed)."""
    with _FS_LOCK:
        _FS.clear()


def s3_filesystem(cfg: Any = None):
    """The s3fs filesystem of this process for cfg's endpoint/region (created on first use).

    Keyed by os.getpid(): a DataLoader worker forked from a parent that already used S3
    gets its own filesystem instead of the parent's event loop and sockets.
    """
    key = (os.getpid(), _endpoint(cfg), _region(cfg))
    fs = _FS.get(key)
    if fs is not None:
        return fs
    with _FS_LOCK:
        fs = _FS.get(key)
        if fs is None:
            import s3fs

            client_kwargs: Dict[str, Any] = {}
            if key[2]:
                client_kwargs["region_name"] = key[2]
            fs = s3fs.S3FileSystem(
                endpoint_url=key[1], client_kwargs=client_kwargs,
                # our own retry loop owns the time bound; botocore's retries (~7 s of
                # outage, measured) would only hide failures inside one attempt
                config_kwargs={"connect_timeout": 5, "read_timeout": 30,
                               "retries": {"max_attempts": 2, "mode": "standard"}},
                default_block_size=READ_BLOCK, skip_instance_cache=True)
            fs.retries = 2  # s3fs's own retry of throttling/5xx per request (class attr)
            # filesystems inherited from a parent process: their event loop does not run
            # here, and letting them be collected runs s3fs's session finalizer on that
            # dead loop (it hangs); keep them referenced, unused, for the process's life
            for stale in [k for k in _FS if k[0] != key[0]]:
                _INHERITED.append(_FS.pop(stale))
            _FS[key] = fs
    return fs


def _io_error_types() -> Tuple[type, ...]:
    """Exception types that mean "the storage request failed" (all else is a bug)."""
    import asyncio

    types: List[type] = [OSError, asyncio.TimeoutError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions

        types += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types.append(aiohttp.ClientError)
    return tuple(types)


# S3 error codes of rejected credentials (authentication, not a server in trouble);
# "403" is what botocore reports for a HEAD request, whose answer has no body
AUTH_ERRORS = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
               "InvalidClientTokenId", "AuthorizationHeaderMalformed", "AccessDenied", "403")


def s3_error_code(exc: BaseException) -> Optional[str]:
    """The S3 error code behind an exception (s3fs wraps botocore's ClientError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
        if code:
            return str(code)
        exc = exc.__cause__ or exc.__context__
    return None


# botocore's "no credentials to sign with": nothing to retry, the environment lacks them
NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


def no_credentials(exc: BaseException) -> bool:
    """botocore found no (or incomplete) credentials; s3fs may wrap its exception."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in NO_CREDENTIALS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


CREDENTIALS_HELP = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE naming a profile of "
                    "~/.aws/credentials) in the environment of every process; the endpoint is data.s3_endpoint "
                    "or AWS_ENDPOINT_URL_S3")


def _permanent(url: str, exc: BaseException) -> bool:
    """I/O errors no retry can fix: a missing/unreadable local path, rejected S3
    credentials. Other S3 errors count as transient (see the module doc)."""
    if is_s3(url):
        return s3_error_code(exc) in AUTH_ERRORS or no_credentials(exc)
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


class _Backoff:
    """Exponential backoff with jitter inside a deadline that restarts on progress."""

    def __init__(self, url: str, what: str, budget: float):
        self.url, self.what, self.budget = url, what, budget
        self.attempts = 0
        self.progress()

    def progress(self) -> None:
        self.start = time.monotonic()
        self.attempts = 0

    def failed(self, exc: BaseException, offset: Optional[int] = None) -> None:
        """Sleep before the next attempt, or raise StorageError when out of time.
        Anything that is not a storage failure (a bug) propagates unchanged."""
        if not isinstance(exc, _io_error_types()):
            raise exc
        self.attempts += 1
        elapsed = time.monotonic() - self.start
        where = f" at byte {offset}" if offset else ""
        if is_s3(self.url) and no_credentials(exc):
            raise StorageError(f"{self.what} {self.url}: no S3 credentials found ({describe(exc)}); "
                               f"{CREDENTIALS_HELP}") from exc
        if is_s3(self.url) and _permanent(self.url, exc):
            raise StorageError(
                f"{self.what} {self.url}: the S3 server rejected the credentials "
                f"({s3_error_code(exc)}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "(or the profile) for this endpoint") from exc
        if _permanent(self.url, exc) or elapsed >= self.budget:
            raise StorageError(
                f"{self.what} {self.url}{where}: {describe(exc)} (gave up after "
                f"{self.attempts} attempt(s) in {elapsed:.1f}s; "
                f"data.io_retry_seconds={self.budget:g})") from exc
        delay = min(0.2 * 2 ** (self.attempts - 1), 5.0) * (0.5 + random.random())
        delay = min(delay, max(0.0, self.budget - elapsed))
        if self.attempts == 1:  # one log line per outage, not per attempt
            log.warning("%s %s%s: %s; retrying for up to %gs", self.what, self.url, where,
                        describe(exc), self.budget)
        time.sleep(delay)


def with_retry(fn: Callable[[], T], url: str, cfg: Any = None, what: str = "object") -> T:
    """Run fn() (one storage request about url), retrying failures within the bound."""
    backoff = _Backoff(url, what, retry_seconds(cfg))
    while True:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:  # classified in _Backoff.failed
            backoff.failed(exc)


# ---------------------------------------------------------------------------- reading

class ShardReader(io.RawIOBase):
    """Sequential reader of one object that survives connection loss (see module doc)."""

    def __init__(self, url: str, cfg: Any = None):
        super().__init__()
        self.url = url
        self._cfg = cfg
        self._pos = 0
        self._file: Optional[IO[bytes]] = None
        self._backoff = _Backoff(url, "shard", retry_seconds(cfg))
        self._call(lambda: None)  # open now, so a missing shard fails at open_shard()

    def _open(self) -> IO[bytes]:
        if is_s3(self.url):
            f = s3_filesystem(self._cfg).open(s3_key(self.url), "rb", block_size=READ_BLOCK,
                                              cache_type="readahead")
        else:
            f = open(local_path(self.url), "rb", buffering=0)
        if self._pos:
            f.seek(self._pos)
        return f

    def _drop(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def _call(self, op: Callable[[], T]) -> T:
        while True:
            try:
                if self._file is None:
                    self._file = self._open()
                out = op()
                self._backoff.progress()
                return out
            except StorageError:
                raise
            except Exception as exc:  # classified in _Backoff.failed
                self._drop()
                self._backoff.failed(exc, self._pos)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.closed:
            raise ValueError("read from a closed shard reader")

        def op() -> int:
            data = self._file.read(len(buf))  # type: ignore[union-attr]
            buf[:len(data)] = data
            return len(data)

        n = self._call(op)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._drop()
        super().close()


def open_shard(url: str, cfg: Any = None) -> BinaryIO:
    """A buffered streaming reader of a whole shard (local path, file:// or s3://).

    Raises StorageError (one line naming the shard) when the shard cannot be opened or
    read within cfg.io_retry_seconds.
    """
    return io.BufferedReader(ShardReader(url, cfg), buffer_size=1 << 20)  # type: ignore


def read_bytes(url: str, cfg: Any = None, start: int = 0, length: Optional[int] = None) -> bytes:
    """A whole object, or `length` bytes from `start` (small objects: manifests, ranges)."""
    if is_s3(url):
        end = None if length is None else start + length

        def fetch() -> bytes:
            return s3_filesystem(cfg).cat_file(s3_key(url), start=start or None, end=end)
    else:
        def fetch() -> bytes:
            with open(local_path(url), "rb") as f:
                f.seek(start)
                return f.read() if length is None else f.read(length)
    return with_retry(fetch, url, cfg)


# --------------------------------------------------------------------------- metadata

def exists(url: str, cfg: Any = None) -> bool:
    if is_s3(url):
        return with_retry(lambda: s3_filesystem(cfg).exists(s3_key(url)), url, cfg)
    return os.path.exists(local_path(url))


def isdir(url: str, cfg: Any = None) -> bool:
    if is_s3(url):
        return with_retry(lambda: s3_filesystem(cfg).isdir(s3_key(url).rstrip("/")), url, cfg)
    return os.path.isdir(local_path(url))


def size(url: str, cfg: Any = None) -> int:
    if is_s3(url):
        return int(with_retry(lambda: s3_filesystem(cfg).size(s3_key(url)), url, cfg))
    return os.path.getsize(local_path(url))


def list_files(url: str, cfg: Any = None, recursive: bool = False) -> List[str]:
    """Files (not directories) under a directory or s3 prefix, as full URLs, sorted."""
    if is_s3(url):
        fs = s3_filesystem(cfg)
        prefix = s3_key(url).rstrip("/")

        def ls() -> List[str]:
            fs.invalidate_cache(prefix)
            if recursive:
                return fs.find(prefix)
            return [e["name"] for e in fs.ls(prefix, detail=True) if e["type"] == "file"]
        return sorted("s3://" + p for p in with_retry(ls, url, cfg))
    root = local_path(url)
    scheme = "file://" if url.startswith("file://") else ""
    if recursive:
        out = [os.path.join(d, f) for d, _, fs_ in os.walk(root) for f in fs_]
    else:
        out = [e.path for e in os.scandir(root) if e.is_file()]
    return sorted(scheme + p for p in out)


def glob(pattern: str, cfg: Any = None) -> List[str]:
    if is_s3(pattern):
        fs = s3_filesystem(cfg)
        return sorted("s3://" + p for p in with_retry(lambda: fs.glob(s3_key(pattern)),
                                                      pattern, cfg))
    import glob as _glob

    scheme = "file://" if pattern.startswith("file://") else ""
    return sorted(scheme + p for p in _glob.glob(local_path(pattern)) if os.path.isfile(p))


# ---------------------------------------------------------------------------- writing

class _HashingWriter(io.RawIOBase):
    """Counts bytes and feeds a hash while passing writes through."""

    def __init__(self, f: IO[bytes], hasher: Any):
        super().__init__()
        self._f, self.hasher, self.nbytes = f, hasher, 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:  # tarfile asks where it is
        return self.nbytes

    def write(self, b) -> int:
        self._f.write(b)
        self.hasher.update(b)
        self.nbytes += len(b)
        return len(b)


@contextlib.contextmanager
def open_output(url: str, cfg: Any = None, hasher: Any = None) -> Iterator[Any]:
    """Write an object atomically: readers see the whole new object or the old one.

    Local: a temporary name in the same directory, fsync, os.replace. S3: a multipart
    upload that is only committed on success (and aborted on error). The yielded file has
    `.nbytes` and `.hasher` (if a hashlib object was given).
    """
    if is_s3(url):
        f = s3_filesystem(cfg).open(s3_key(url), "wb", block_size=WRITE_BLOCK)
        out = _HashingWriter(f, hasher or _NullHash())
        try:
            yield out
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # aborts the multipart upload: nothing becomes visible
            f.closed = True  # so its __del__ does not try to flush the discarded buffer
            raise
        try:
            f.close()
        except Exception as exc:
            raise StorageError(f"object {url}: upload failed: {describe(exc)}") from exc
        return
    path = local_path(url)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            out = _HashingWriter(f, hasher or _NullHash())
            yield out
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class _NullHash:
    def update(self, _b) -> None:
        pass


def write_bytes(url: str, data: bytes, cfg: Any = None) -> None:
    """Write a small object atomically (retried as a whole on transient S3 errors)."""
    def put() -> None:
        with open_output(url, cfg) as f:
            f.write(data)
    if is_s3(url):
        with_retry(put, url, cfg)
    else:
        put()


def remove(url: str, cfg: Any = None, recursive: bool = False) -> None:
    """Delete an object or (recursive) a directory/prefix; missing is not an error."""
    if is_s3(url):
        fs = s3_filesystem(cfg)
        key = s3_key(url).rstrip("/")

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(key, recursive=recursive)
        with_retry(rm, url, cfg)
        return
    path = local_path(url)
    if recursive and os.path.isdir(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
