"""Host memory: page-locked buffers pinned in place, sizes, and process memory readings.

`torch.empty(..., pin_memory=True)` goes through PyTorch's caching host allocator, which rounds every request up
to a power of two (a 0.9 GB block slab would take 1 GB, a 36 GB arena 64 GB). worldstream instead allocates
ordinary host memory of the exact size and page-locks it in place with `cudaHostRegister`: one copy, exact size,
DMA-able at full PCIe speed.
"""
from __future__ import annotations

import os
import re
import resource

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


def pinned_empty(nbytes: int) -> torch.Tensor:
    """An exact-size uint8 host tensor, page-locked in place when CUDA is available (else plain memory)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if torch.cuda.is_available() and nbytes > 0:
        try:
            err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0))
        except (AttributeError, RuntimeError):
            err = -1
        if err != 0:  # fall back to the caching allocator rather than run unpinned
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        _REGISTERED.add(buf.data_ptr())
    return buf


def unpin(buf: torch.Tensor) -> None:
    """Undo `pinned_empty`'s page-locking (before the memory is freed, so the address can be pinned again)."""
    ptr = buf.data_ptr()
    if ptr in _REGISTERED:
        _REGISTERED.discard(ptr)
        torch.cuda.cudart().cudaHostUnregister(ptr)


_REGISTERED: set[int] = set()


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
