"""Writing files so that a failure (or Ctrl-C) never leaves a half-written one behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """A temp file path next to `path` to write to, for as long as the block runs (a stream of frames, say);
    renamed over `path` when the block ends normally (atomic on one file system), removed on any failure,
    `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600; the result gets ordinary file permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """`write(tmp_path)` into a temp file next to `path`, then rename it over `path` (see `atomic_path`)."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return Path(path)
