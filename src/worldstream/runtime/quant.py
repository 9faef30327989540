"""Compressed blocks as the engine sees them: their slab sizes, and compressing a loaded model in place.

The layer type and formats are models/quant.py; which weights a checkpoint stores compressed is
checkpoints/compressed.py. What is left for the runtime is bytes: how large a compressed block's slab is
(what crosses the bus and what the planner budgets), and a summary of an in-place compression.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..models.dit import Block
from ..models.quant import DEFAULT_SKIP, FORMATS, quantize_block_
from .slab import BlockLayout


@dataclass
class QuantSummary:
    fmt: str
    quantized_blocks: list[int]
    unquantized_blocks: list[int]
    quantized_linears: list[str] = field(default_factory=list)   # names inside one quantized block
    skipped_linears: list[str] = field(default_factory=list)     # nn.Linear names left as they were
    block_bytes_before: int = 0     # slab bytes (BlockLayout.of) of one quantized block before ...
    block_bytes_after: int = 0      # ... and after quantization

    @property
    def ratio(self) -> float:
        return self.block_bytes_after / self.block_bytes_before if self.block_bytes_before else 1.0


def quantize_blocks_(model: nn.Module, fmt: str, skip_first_last: bool = True,
                     skip: tuple[str, ...] = DEFAULT_SKIP) -> QuantSummary:
    """Compress the linears inside `model.blocks` in place (see models.quant.quantize_block_); nothing outside
    the blocks (embeddings, time projection, head) changes. With `skip_first_last` the first and last block stay
    whole: they are the most sensitive, and cost 2 of 40 blocks. Their slab layout then differs from the rest.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    n = len(model.blocks)
    keep = {0, n - 1} if skip_first_last else set()
    summary = QuantSummary(fmt, [i for i in range(n) if i not in keep], sorted(keep & set(range(n))))
    for i in summary.quantized_blocks:
        block = model.blocks[i]
        before = BlockLayout.of(block).nbytes
        names = quantize_block_(block, fmt, skip)
        if not summary.block_bytes_before:
            summary.block_bytes_before, summary.block_bytes_after = before, BlockLayout.of(block).nbytes
            summary.quantized_linears = names
            summary.skipped_linears = [name for name, m in block.named_modules() if type(m) is nn.Linear]
    if not summary.quantized_blocks and n:
        summary.block_bytes_before = summary.block_bytes_after = BlockLayout.of(model.blocks[0]).nbytes
    return summary


def quantized_block_bytes(cfg, fmt: str | None, dtype: torch.dtype = torch.bfloat16,
                          skip: tuple[str, ...] = DEFAULT_SKIP) -> int:
    """Slab bytes (BlockLayout.of, with its alignment) of one block of `cfg` stored in `dtype` with its linears
    in `fmt` (None: not quantized). Built on the meta device: nothing is allocated, so full-size configs are fine."""
    with torch.device("meta"):
        block = _block(cfg, dtype)
    if fmt is not None:
        quantize_block_(block, fmt, tuple(getattr(cfg, "quant_skip", ())) + tuple(skip))
    return BlockLayout.of(block).nbytes


def converted_model_bytes(cfg, fmt: str | None, dtype: torch.dtype = torch.bfloat16,
                          skip_first_last: bool = True) -> int:
    """Bytes of one expert's tensors as `worldstream convert` stores them from a `dtype` checkpoint (fmt None:
    not compressed): 8-bit linears with float32 scales inside the compressed blocks (all but the first and
    last with `skip_first_last`), everything else in `dtype`. One block is built on the meta device."""
    from ..checkpoints.compressed import QuantPolicy

    _, outside = cfg.weight_bytes(dtype.itemsize) if hasattr(cfg, "weight_bytes") else \
        (None, cfg.param_counts()[1] * dtype.itemsize)
    with torch.device("meta"):
        block = _block(cfg, dtype)
    whole = _state_bytes(block)
    compressed = len(QuantPolicy(fmt, skip_first_last).blocks(cfg.num_layers)) if fmt is not None else 0
    if compressed:
        quantize_block_(block, fmt, tuple(getattr(cfg, "quant_skip", ())) + DEFAULT_SKIP)
    return outside + compressed * _state_bytes(block) + (cfg.num_layers - compressed) * whole


def _block(cfg, dtype: torch.dtype) -> nn.Module:
    """One block of `cfg` in its stored dtypes (any family: the config builds it)."""
    return cfg.block_module(dtype) if hasattr(cfg, "block_module") else Block(cfg).to(dtype)


def _state_bytes(module: nn.Module) -> int:
    return sum(v.numel() * v.element_size() for v in module.state_dict().values())
