"""The attention seam: every attention call in the DiT goes through `attention(q, k, v, backend)`.

q, k, v are [B, L, heads, head_dim] (the layout upstream's flash-attn call uses). Which kernel runs is chosen
per attention module (`SelfAttention.backend`, `CrossAttention.backend`; `WanDiT.set_attention` sets them for
one model), never process-wide: two models in one process may use different kernels.

Kernels are looked up by name in a registry. "sdpa" (`torch.nn.functional.scaled_dot_product_attention`: CPU
and GPU, cuDNN / flash kernels on Hopper) is built in; other kernels register themselves from outside the
model code with `register_backend(name, fn)` — runtime/attention8.py adds "8bit" (int8 Q·Kᵀ, fp8 P·V Triton
kernels) when it is imported.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Where kernels that are not built in come from, for the error message when one is asked for unregistered.
_PROVIDERS = {"8bit": "worldstream.runtime.attention8"}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa}


def register_backend(name: str, fn: AttentionFn) -> None:
    """Make kernel `fn(q, k, v) -> out` available as `name` (same layout as `sdpa`)."""
    _BACKENDS[name] = fn


def get_backend(name: str) -> AttentionFn:
    """The registered kernel `name`; KeyError naming the registered ones (and where a known one comes from)."""
    if name not in _BACKENDS:
        hint = f" (import {_PROVIDERS[name]} to register it)" if name in _PROVIDERS else ""
        raise KeyError(f"unknown attention backend {name!r}{hint}; registered: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    return get_backend(backend)(q, k, v)
