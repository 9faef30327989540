"""The attention seam: every attention call in the DiT goes through `attention(q, k, v, kind)`.

q, k, v are [B, L, heads, head_dim] (the layout upstream's flash-attn call uses); `kind` is "self" (video tokens
to video tokens) or "cross" (video tokens to the text / image context). Each kind has its backend:

  "sdpa"  `torch.nn.functional.scaled_dot_product_attention` (default for both): CPU and GPU (cuDNN / flash
          kernels on Hopper).
  "8bit"  runtime/attention8.py: int8 Q·Kᵀ and fp8 P·V in Triton kernels on sm89+ (their float32 emulation
          elsewhere). Worth it for self-attention at long sequences; for cross-attention (512 context tokens)
          quantizing all the queries costs more than the attention itself, so `set_backend` leaves "cross"
          alone unless asked.
Other kernels plug in with `register_backend(name, fn)`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
KINDS = ("self", "cross")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from ..runtime.attention8 import attention8 as fn   # Triton is imported only when this backend runs
    return fn(q, k, v)


_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa, "8bit": attention8}
_active = {"self": "sdpa", "cross": "sdpa"}


def register_backend(name: str, fn: AttentionFn) -> None:
    _BACKENDS[name] = fn


def set_backend(name: str, kinds: tuple[str, ...] = ("self",)) -> None:
    """Use backend `name` for the attention `kinds` ("self", "cross")."""
    if name not in _BACKENDS:
        raise KeyError(f"unknown attention backend {name!r}; registered: {', '.join(_BACKENDS)}")
    for kind in kinds:
        if kind not in KINDS:
            raise KeyError(f"unknown attention kind {kind!r}; one of {', '.join(KINDS)}")
        _active[kind] = name


def get_backend(kind: str = "self") -> str:
    return _active[kind]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str = "self") -> torch.Tensor:
    return _BACKENDS[_active[kind]](q, k, v)


@contextlib.contextmanager
def backend(name: str | None, kinds: tuple[str, ...] = ("self",)) -> Iterator[None]:
    """`with backend("8bit"):` use `name` for `kinds` inside the block, then restore (None: no change)."""
    before = {kind: _active[kind] for kind in KINDS}
    if name is not None:
        set_backend(name, kinds)
    try:
        yield
    finally:
        _active.update(before)
