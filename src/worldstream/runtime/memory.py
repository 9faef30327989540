"""Host memory: page-locked buffers pinned in place, slabs shared by the processes of a machine, sizes, and
process memory readings.

`torch.empty(..., pin_memory=True)` goes through PyTorch's caching host allocator, which rounds every request up
to a power of two (a 0.9 GB block slab would take 1 GB, a 36 GB arena 64 GB). worldstream instead allocates
ordinary host memory of the exact size and page-locks it in place with `cudaHostRegister`: one copy, exact size,
DMA-able at full PCIe speed.

Where the block slabs of streamed weights come from is a `HostMemory`: this process's own memory (the default),
or, when several processes of one machine run the same model (sequence parallelism, runtime/parallel.py), a
`SharedHostMemory`: one copy of every slab in files of a shared-memory folder (/dev/shm), written by one
process and mapped by all, each of them page-locking its own mapping. Host RAM then holds the weights once,
not once per GPU.
"""
from __future__ import annotations

import os
import re
import resource
import warnings
from typing import Callable

import torch

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float | None) -> int | None:
    """'8GB' -> 8e9, '24GiB' -> 24*2^30, 1.5e9 -> 1500000000; None stays None."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a size from {text!r}; write e.g. 8GB, 12GiB or 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.1f} MB"


def align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def pin_in_place(buf: torch.Tensor) -> bool:
    """Page-lock the host memory of `buf` where it is (`cudaHostRegister`); False without CUDA or on failure.
    Undo with `unpin` before the memory goes away."""
    nbytes = buf.numel() * buf.element_size()
    if not torch.cuda.is_available() or nbytes == 0:
        return False
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0))
    except (AttributeError, RuntimeError):
        err = -1
    if err != 0:
        return False
    _REGISTERED.add(buf.data_ptr())
    return True


def pinned_empty(nbytes: int) -> torch.Tensor:
    """An exact-size uint8 host tensor, page-locked in place when CUDA is available (else plain memory)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if torch.cuda.is_available() and nbytes > 0 and not pin_in_place(buf):
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)   # the caching allocator, not unpinned
    return buf


def unpin(buf: torch.Tensor) -> None:
    """Undo `pinned_empty`'s page-locking (before the memory is freed, so the address can be pinned again)."""
    ptr = buf.data_ptr()
    if ptr in _REGISTERED:
        _REGISTERED.discard(ptr)
        torch.cuda.cudart().cudaHostUnregister(ptr)


_REGISTERED: set[int] = set()


def empty_host_cache() -> None:
    """Give back to the system what PyTorch's caching host allocator keeps of freed pinned tensors. It keeps
    them for reuse otherwise: slabs made with `pin_memory=True` (`pinned_empty`'s fallback where page-locking
    in place fails) would stay in the process's RSS after their owner is gone. A no-op before CUDA is used."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    fn = (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
          or getattr(torch._C, "_accelerator_emptyHostCache", None) or getattr(torch._C, "_host_emptyCache", None))
    if fn is not None:
        fn()


def release_file_pages(tensors) -> int:
    """Drop from this process's resident set the pages of those CPU `tensors` that are memory-mapped from a file
    (a `.pth` read with mmap: `checkpoints.tensors.read_pth`). Their data stays: `madvise(MADV_DONTNEED)` on a
    file mapping only unmaps the pages, which are read again (from the page cache or the file) if touched.
    Tensors in anonymous memory are left alone, and so must be any file-mapped tensor written in place (a
    private mapping would forget the writes). Returns the bytes released; Linux only (elsewhere 0).

    Why: a tensor copied out of a memory-mapped file keeps the pages it was read from in the process's RSS as
    long as anything else of that file is mapped; packing an 11 GB umt5 into pinned slabs would otherwise
    count it twice."""
    import ctypes
    import mmap

    try:
        with open("/proc/self/maps") as f:
            maps = [line.split(maxsplit=5) for line in f]
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    files = sorted((int(a, 16), int(b, 16)) for a, b in (m[0].split("-") for m in maps
                                                           if len(m) == 6 and m[4] != "0" and m[5].startswith("/")))
    page, released = mmap.PAGESIZE, 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        if not any(a <= lo and hi <= b for a, b in files):
            continue
        start, end = -(-lo // page) * page, hi // page * page   # whole pages inside the tensor only
        if end > start and madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4) == 0:   # DONTNEED
            released += end - start
    return released


# ---- where block slabs come from ------------------------------------------------------------------------------

class HostMemory:
    """Block slabs in this process's own page-locked memory (`pinned_empty`). The loaders ask for every slab of
    a load between `begin()` and `end()`; `fills` says whether this process writes the slabs' bytes."""
    fills = True

    def slab(self, nbytes: int) -> torch.Tensor:
        return pinned_empty(nbytes)

    def begin(self) -> None:
        """A load starts (slabs handed over from a previous load may be refilled)."""

    def end(self, error: BaseException | None = None) -> None:
        """The load is done (or failed with `error`, raised here)."""
        if error is not None:
            raise error

    def key(self, buf: torch.Tensor) -> object:
        """What identifies a slab's memory (for checks): its address here."""
        return buf.data_ptr()


SHM_DIR = "/dev/shm"
SHM_PREFIX = "worldstream-"


def shm_dir() -> str:
    """The shared-memory folder for shared slabs: $WORLDSTREAM_SHM_DIR, else /dev/shm."""
    return os.environ.get("WORLDSTREAM_SHM_DIR", SHM_DIR)


def sweep_stale_shm(directory: str | None = None) -> list[str]:
    """Unlink shared slab files left by runs whose first process is gone (killed between making a slab and the
    end of its load, the one window in which a file exists); files of live runs are kept. Returns the removed."""
    directory = directory or shm_dir()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = re.fullmatch(re.escape(SHM_PREFIX) + r"(\d+)-[0-9a-f]+-\d+", name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shm_free_bytes(directory: str | None = None) -> int:
    st = os.statvfs(directory or shm_dir())
    return st.f_bavail * st.f_frsize


class SharedHostMemory(HostMemory):
    """Block slabs that all processes of a machine share: one copy in RAM, however many GPUs read it.

    Slab k of a run is the file `<directory>/worldstream-<tag>-<k>`, mapped shared (`torch.from_file`) by every
    process, each of which page-locks its own mapping (`cudaHostRegister`, the same call as for private slabs;
    pages are locked once, whoever maps them). Every process makes the same slab requests in the same order
    (they run the same schedule with the same plan), so the k-th request of each maps the same file.

    Only the `writer` (local rank 0) writes the bytes (`fills`); the others read nothing from disk for
    streamed blocks. `sync(error)` makes all processes meet and raises, in every process, the first error any
    of them had: `begin()` (before a load: nobody still copies from slabs that are about to be refilled) and
    `end()` (after it: every byte is written and every process has mapped every file) call it. After `end()` the
    files are unlinked: the mappings keep the memory until the last process lets go, and nothing is left in
    the folder after the run, even if it dies. Space is reserved when a slab is made (`posix_fallocate`), so
    a full /dev/shm is an error at load time, never a SIGBUS mid-run."""

    def __init__(self, tag: str, writer: bool, sync: Callable[[BaseException | None], None],
                 directory: str | None = None):
        self.directory = directory or shm_dir()
        self.tag, self.writer, self.sync = tag, writer, sync
        self.fills = writer
        self.count = 0                       # slabs made so far (the next file's number)
        self.nbytes = 0                      # bytes of every slab made so far
        self._unlink: list[str] = []
        self._warned = False

    def path(self, k: int) -> str:
        return os.path.join(self.directory, f"{SHM_PREFIX}{self.tag}-{k}")

    def slab(self, nbytes: int) -> torch.Tensor:
        path = self.path(self.count)
        self.count += 1
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._unlink.append(path)
        try:
            os.posix_fallocate(fd, 0, nbytes)     # idempotent: whoever comes first reserves the pages
        except OSError as e:
            raise OSError(e.errno, f"{path}: cannot reserve {fmt_bytes(nbytes)} of shared memory for a weight "
                          f"slab ({e.strerror}); {self.directory} has {fmt_bytes(shm_free_bytes(self.directory))} "
                          "free (docker: --shm-size; or set WORLDSTREAM_SHM_DIR to a larger tmpfs)") from None
        finally:
            os.close(fd)
        buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        if torch.cuda.is_available() and not pin_in_place(buf) and not self._warned:
            self._warned = True
            warnings.warn("worldstream: shared weight slabs could not be page-locked (cudaHostRegister failed); "
                          "copies from them run at pageable speed")
        self.nbytes += nbytes
        return buf

    def begin(self) -> None:
        self.sync(None)

    def end(self, error: BaseException | None = None) -> None:
        try:
            self.sync(error)          # raises the first error of any process
        finally:
            self.release_files()
        if error is not None:
            raise error

    def release_files(self) -> None:
        """Unlink the files made so far (their mappings stay valid). Every process may call it."""
        for path in self._unlink:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._unlink = []

    def key(self, buf: torch.Tensor) -> object:
        """(device, inode) of the file the slab maps: the same in every process that shares it."""
        return mapping_of(buf.data_ptr())


def mapping_of(address: int) -> tuple[str, int, str] | None:
    """(device, inode, path) of the file mapped at `address` in this process (/proc/self/maps), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= address < hi:
                inode = int(fields[4])
                return (fields[3], inode, fields[5].strip() if len(fields) > 5 else "") if inode else None
    return None


def smaps_of(address: int) -> dict[str, int]:
    """The /proc/self/smaps counters (bytes) of the mapping that holds `address`: Rss, Pss, Shared_*, ..."""
    out: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                if inside:
                    break
                inside = lo <= address < hi
            elif inside and line.rstrip().endswith("kB"):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    return out


def pss_bytes() -> int:
    """Proportional set size of this process: private pages, plus shared pages divided by their sharers (the
    sum over the processes of a machine counts a shared slab once)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss_bytes()


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_host_memory() -> bool:
    """Give freed heap memory back to the OS (glibc's malloc_trim; elsewhere a no-op returning False).

    A long-running process whose threads come and go (the web server: two per session) otherwise keeps the
    freed blocks of their malloc arenas, and its RSS creeps up session after session although nothing leaks."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def host_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
