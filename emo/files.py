"""Temporary files that become outputs: created beside their target, with normal permissions.

``tempfile.mkstemp`` creates files readable by their owner only (0600); renamed into place
they would keep that, and a studio's delivery folder would hold videos nobody else can
read. Files made here get the usual 0666 minus the process umask, like any other file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


FILE_MODE = 0o666 & ~_umask()  # read once at import, before worker threads start


def temp_beside(target: Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """(open descriptor, path) of a new empty file next to ``target``, mode ``FILE_MODE``."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=suffix)
    os.fchmod(fd, FILE_MODE)
    return fd, Path(name)
