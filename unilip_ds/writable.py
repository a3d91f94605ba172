"""Can an output directory be written? Asked before anything starts (a run's
run.output_dir, an inference or evaluation command's --out), so a bad path is one line, not
a traceback after minutes of loading. No heavy imports: the commands call it first."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional


def unwritable(path: str | Path) -> Optional[str]:
    """Why a directory cannot be created or written here (None: it can). Probed by creating
    (and removing) a temporary entry in it or in its nearest existing parent, which also
    sees read-only mounts and ACLs that os.access misses; nothing is left behind."""
    p = Path(os.path.abspath(path))
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a directory" if probe != p else "it is a file, not a directory"
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=".unilip_probe-").cleanup()
    except OSError as exc:
        where = "in it" if probe == p else f"in {probe}"
        return f"cannot write {where} ({exc.strerror or type(exc).__name__})"
    return None
