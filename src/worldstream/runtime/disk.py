"""The disk tier: stream blocks straight from the user's safetensors shards when they do not fit in RAM.

No conversion step: each streamed block's tensors are read at their byte ranges (loader.TensorLocation) from the
original shard files by worker threads into a small ring of pinned buffers laid out like the GPU slots; the
engine then copies a filled buffer to its slot in one transfer. Reads run ahead of the engine's copy cursor
(`prefetch` hints), a ring buffer is refilled only after the GPU copy out of it has finished (a CUDA event the
worker waits on, off the hot loop), and tensors stored in another dtype (fp32 shards) are converted on the way.
"""
from __future__ import annotations

import math
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..checkpoints.tensors import check_finite
from .memory import pinned_empty, unpin
from .slab import BlockLayout


class DiskSource:
    """One block's tensors in the shards: (slab offset, TensorLocation, layout dtype) per parameter."""

    def __init__(self, tier: "DiskTier", parts: list[tuple[int, object, torch.dtype]]):
        self.tier, self.parts = tier, parts

    def acquire(self) -> torch.Tensor:
        return self.tier.acquire(self)

    def release(self, copied_event) -> None:
        self.tier.release(self)

    def prefetch(self) -> None:
        self.tier.prefetch(self)

    def reset(self) -> None:
        self.tier.reset()


class DiskTier:
    def __init__(self, layout: BlockLayout, ring: int = 3, workers: int = 4):
        if ring < 2:
            raise ValueError("the disk ring needs at least 2 buffers")
        self.layout = layout
        self.buffers = [pinned_empty(layout.nbytes) for _ in range(ring)]
        cuda = torch.cuda.is_available()
        self.copied = [torch.cuda.Event() if cuda else None for _ in range(ring)]
        self.free: deque[int] = deque(range(ring))
        self.inflight: dict[int, tuple[int, Future]] = {}    # id(source) -> (buffer, read)
        self.current: int | None = None
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="worldstream-disk")
        self._fds: dict[str, int] = {}
        self._checked: set[int] = set()     # blocks whose weights were checked finite (on their first read)
        self.stats = {"reads": 0, "bytes": 0}

    def source(self, locations: dict[str, object], prefix: str) -> DiskSource:
        """The block whose tensors are `locations[prefix + name]` for every name of the layout."""
        return DiskSource(self, block_parts(self.layout, locations, prefix))

    # ---- engine side (main thread) ----------------------------------------------------------------------------
    def prefetch(self, src: DiskSource) -> None:
        if id(src) in self.inflight or not self.free:
            return
        r = self.free.popleft()
        self.inflight[id(src)] = (r, self.pool.submit(self._read, src, r))

    def acquire(self, src: DiskSource) -> torch.Tensor:
        if id(src) not in self.inflight:
            if not self.free:       # the ring holds other blocks than the one needed: a wrong guess
                self.reset()
            self.prefetch(src)
        r, fut = self.inflight.pop(id(src))
        fut.result()
        self.current = r
        return self.buffers[r]

    def release(self, src: DiskSource) -> None:
        """Called on the copy stream right after the copy out of the acquired buffer was enqueued."""
        r, self.current = self.current, None
        if self.copied[r] is not None:
            self.copied[r].record()
        self.free.append(r)

    def reset(self) -> None:
        for r, fut in self.inflight.values():
            fut.result()
            self.free.append(r)
        self.inflight.clear()

    # ---- worker side --------------------------------------------------------------------------------------------
    def _fd(self, path) -> int:
        path = str(path)
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _read(self, src: DiskSource, r: int) -> None:
        if self.copied[r] is not None:
            self.copied[r].synchronize()       # the last GPU copy out of this buffer has finished
        self.stats["bytes"] += read_parts(src.parts, self.buffers[r], self._fd)
        self.stats["reads"] += 1
        if id(src) not in self._checked:
            check_parts_finite(src.parts, self.buffers[r])
            self._checked.add(id(src))

    def close(self) -> None:
        self.reset()
        self.pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for b in self.buffers:
            unpin(b)


def block_parts(layout: BlockLayout, locations: dict[str, object], prefix: str) -> list[tuple[int, object, torch.dtype]]:
    """(slab offset, TensorLocation, layout dtype) for every parameter of a block laid out by `layout`, whose
    tensors are `locations[prefix + name]` (safetensors byte ranges of the right shapes)."""
    parts = []
    for e in layout.entries:
        loc = locations[prefix + e.name]
        if loc.offset < 0:
            raise ValueError(f"{loc.file}: the disk tier reads safetensors byte ranges; convert .pth first")
        if tuple(loc.shape) != e.shape:
            raise ValueError(f"{loc.file}: {loc.key} has shape {tuple(loc.shape)}, expected {e.shape}")
        parts.append((e.offset, loc, e.dtype))
    return parts


def read_parts(parts, slab: torch.Tensor, fd_of) -> int:
    """Read a block's tensors (`block_parts`) into its uint8 slab: with pread straight into place where the stored
    dtype is the layout's, through a converted temporary otherwise. `fd_of(path)` gives an open descriptor.
    Returns the bytes read. Releases the GIL while reading, so blocks can be read by parallel threads."""
    buf, n = slab.numpy(), 0
    for offset, loc, dtype in parts:
        fd = fd_of(loc.file)
        if loc.dtype == dtype:
            _pread_into(fd, memoryview(buf[offset:offset + loc.nbytes]), loc.offset)
        else:
            tmp = np.empty(loc.nbytes, dtype=np.uint8)
            _pread_into(fd, memoryview(tmp), loc.offset)
            t = torch.from_numpy(tmp).view(loc.dtype).to(dtype)
            buf[offset:offset + t.numel() * t.element_size()] = t.reshape(-1).view(torch.uint8).numpy()
        n += loc.nbytes
    return n


def check_parts_finite(parts, slab: torch.Tensor) -> None:
    """CheckpointError naming the file and key of the first tensor of a read block (`block_parts` in its
    slab) that holds NaN / inf."""
    for offset, loc, dtype in parts:
        n = math.prod(loc.shape) * dtype.itemsize
        check_finite(slab[offset:offset + n].view(dtype), f"{loc.file}: tensor {loc.key!r}")


def read_blocks(jobs: list[tuple[list, torch.Tensor]], workers: int = 8) -> int:
    """Read several blocks ((parts, slab) pairs) in parallel threads, each file opened once, and check their
    weights finite; bytes read."""
    fds: dict[str, int] = {}
    lock = threading.Lock()

    def fd_of(path) -> int:
        with lock:
            if str(path) not in fds:
                fds[str(path)] = os.open(path, os.O_RDONLY)
            return fds[str(path)]

    try:
        with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
            def read(job) -> int:
                n = read_parts(job[0], job[1], fd_of)
                check_parts_finite(job[0], job[1])
                return n
            return sum(pool.map(read, jobs))
    finally:
        for fd in fds.values():
            os.close(fd)


def _pread_into(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at byte {offset + done} (file truncated or changed while streaming)")
        done += n


def placeholder(shape, dtype) -> torch.Tensor:
    """A host stand-in for a parameter whose bytes live on disk: right shape and dtype, no memory."""
    return torch.zeros(1, dtype=dtype).expand(shape)
