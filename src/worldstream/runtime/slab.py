"""Block slabs: all parameters of one block packed into one contiguous byte buffer.

Every block of a stack has the same `BlockLayout` (names, shapes, dtypes, byte offsets). A block then crosses
the bus as one copy of `layout.nbytes` bytes, and its parameters on the GPU are views into a slot buffer.
Each tensor starts on a 512-byte boundary, like the CUDA caching allocator's blocks, so kernels see the same
alignment as for resident weights (cuBLAS may pick kernels by alignment; streamed must equal resident).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .memory import align

ALIGN = 512


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BlockLayout:
    entries: tuple[Entry, ...]
    nbytes: int

    @classmethod
    def of(cls, block: nn.Module) -> "BlockLayout":
        entries, off = [], 0
        for name, p in block.named_parameters():
            nbytes = p.numel() * p.element_size()
            entries.append(Entry(name, tuple(p.shape), p.dtype, off, nbytes))
            off = align(off + nbytes, ALIGN)
        return cls(tuple(entries), off)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of every parameter inside a uint8 buffer laid out by this layout."""
        return {e.name: buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries}

    def pack(self, block: nn.Module, buf: torch.Tensor) -> None:
        """Copy a block's parameters into `buf` (which may live on another device)."""
        views = self.views(buf)
        for name, p in block.named_parameters():
            views[name].copy_(p.detach())
