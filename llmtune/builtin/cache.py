"""llmtune's cache of built-in models and data (``$LLMTUNE_HOME``): each entry built once, atomically.

An entry is a folder that is complete when its marker file exists; it is built in a temp folder beside
it under a file lock (two processes building at once: the second waits, then reuses the first's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

MARKER = "llmtune-build.json"  # written last inside the temp folder, so its presence means "complete"
Log = Callable[[str], None] | None


def llmtune_home() -> Path:
    """Root of llmtune's cache: ``$LLMTUNE_HOME`` if set, else ``~/.cache/llmtune``."""
    env = os.environ.get("LLMTUNE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmtune"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` across processes (flock on POSIX, msvcrt on Windows, via `filelock`); a
    second process blocks here until the first is done. The lock file itself is left in place: deleting it
    while another process waits on it would let a third take a fresh lock beside the waiter's."""
    with FileLock(str(path)):
        yield


def ensure_built(name: str, build: Callable[[Path, Callable[[str], None]], dict[str, Any]], log: Log,
                 home: Path | None = None, what: str = "", why: str = "") -> Path:
    """``home/name`` (default home: `llmtune_home`), built by ``build(tmp_folder, log)`` the first time.

    ``build`` returns facts for the marker file (sizes, sources, seconds); ``why`` says what is built and
    why, so a first run that spends minutes here says so."""
    say = log or (lambda _msg: None)
    home = Path(home) if home is not None else llmtune_home()
    final = home / name
    if (final / MARKER).is_file():
        return final
    home.mkdir(parents=True, exist_ok=True)
    with file_lock(home / f".{name}.lock"):
        if (final / MARKER).is_file():  # another process built it while we waited
            return final
        say(f"[llmtune] building {what or name} in {final} (one-time; later runs reuse it)"
            + (f": {why}" if why else ""))
        started = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=home))
        try:
            info = build(tmp, say)
            marker = {"name": name, **info, "build_seconds": round(time.time() - started, 1)}
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            # mkdtemp and safetensors make private (0700/0600) entries; the cache is shared like ~/.cache
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, f.stat().st_mode | 0o444)
            if final.exists():  # a half-copied or foreign folder without the marker
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"[llmtune] built {what or name} in {time.time() - started:.1f}s")
    return final
