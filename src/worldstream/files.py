"""Writing files so that a failure, Ctrl-C or SIGTERM never leaves a half-written one behind, and cleaning up
after the processes that could not clean up after themselves (SIGKILL, power loss).

Everything worldstream writes is first written under a hidden name that carries the writer's process id,
`.NAME.partial-PID...` (a file, or `convert`'s folder), while the writer holds an exclusive lock (flock) on it,
and then renamed over NAME. A partial output is stale, and `remove_stale_partials` removes it, only when both
prove its writer dead: no process PID runs on this machine, and nothing holds its lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d{1,10})(?:-[0-9a-f]{8})?(?P<suffix>\.[A-Za-z0-9.]+)?$")
_NAME_BYTES = 120   # of the final name kept in a temp file's name (file names are limited to 255 bytes)


def partial_file_name(name: str, suffix: str = "") -> str:
    """Hidden temp name for a file being written as `name`: `.NAME.partial-PID-RANDOM{suffix}`."""
    short = os.fsencode(name)[:_NAME_BYTES].decode(errors="ignore")
    return f".{short}.partial-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def partial_dir_name(name: str) -> str:
    """Hidden temp name for a folder being written as `name`: `.NAME.partial-PID`."""
    return f".{name}.partial-{os.getpid()}"


def lock(path: str | os.PathLike) -> int:
    """Hold an exclusive lock on `path` (a file or a folder) until the returned descriptor is closed; the
    kernel releases it when the process dies, however it dies."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """A locked temp file path next to `path` to write to for as long as the block runs (a stream of frames,
    say); renamed over `path` when the block ends normally (atomic on one file system), removed on any failure,
    `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / partial_file_name(path.name, suffix)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield str(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # created 0600; the result gets ordinary file permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """`write(tmp_path)` into a locked temp file next to `path`, then rename it over `path` (`atomic_path`)."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)
    return Path(path)


def probe_write(folder: str | os.PathLike, name: str) -> None:
    """Create and remove the temp file that writing `name` in `folder` will create: raises the OSError that the
    real write would meet (read-only or unwritable folder, name too long, ...), before any work is done."""
    tmp = Path(folder) / partial_file_name(name, ".probe")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    os.unlink(tmp)


def _running(pid: int) -> bool:
    """Whether process `pid` exists on this machine (unknown counts as running: nothing is removed)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir())


def remove_stale_partials(folder: str | os.PathLike, notice: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the partial outputs (`.NAME.partial-PID...` files and folders) in `folder` whose writers are
    provably dead: process PID does not exist and nothing holds the lock. Each removal is reported to
    `notice`. Returns what was removed; a folder that cannot be listed is skipped."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _PARTIAL.match(entry.name)
        if m is None or not (entry.is_file(follow_symlinks=False) or entry.is_dir(follow_symlinks=False)):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _running(pid):
            continue
        path = Path(entry.path)
        try:
            fd = lock(path)
        except OSError:
            continue   # held (a writer on another machine or in another PID namespace), or gone already
        try:
            size = _size(path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            continue   # not ours to remove after all (permissions): leave it
        finally:
            os.close(fd)
        removed.append(path)
        if notice:
            notice(f"removed {path} ({size / 1e6:.1f} MB), a partial output left by process {pid}, which is "
                   "no longer running")
    return removed
