"""Writing files so that a reader never sees half of one: the one atomic writer (result.json, reports, ...)."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a whole file or nothing: a reader (or a full disk) never leaves half a file behind. The
    temporary name is unique per process and thread, so concurrent writers of one path do not collide."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
