"""Files a reader never sees half-written: write beside the target, flush to disk, then rename over it."""
from __future__ import annotations

import contextlib
import os


def write_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write `text` to `path` all at once (its folder is made if missing); `mode`: the file's permissions."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
