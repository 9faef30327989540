"""The attention seam: every attention call in the DiT goes through `attention(q, k, v)`.

q, k, v are [B, L, heads, head_dim] (the layout upstream's flash-attn call uses). The default backend is
`torch.nn.functional.scaled_dot_product_attention`, which runs on CPU and GPU (cuDNN / flash kernels on
Hopper). Other kernels (flash-attn, sage) plug in with `register_backend(name, fn)` and `set_backend(name)`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa}
_active = ["sdpa"]


def register_backend(name: str, fn: AttentionFn) -> None:
    _BACKENDS[name] = fn


def set_backend(name: str) -> None:
    if name not in _BACKENDS:
        raise KeyError(f"unknown attention backend {name!r}; registered: {', '.join(_BACKENDS)}")
    _active[0] = name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _BACKENDS[_active[0]](q, k, v)
