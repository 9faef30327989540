"""The attention seam: every attention call in the DiT goes through `attention(q, k, v, backend, kv=None)`.

q, k, v are [B, L, heads, head_dim] (the layout upstream's flash-attn call uses). Which kernel runs is chosen
per attention module (`SelfAttention.backend`, `CrossAttention.backend`; `WanDiT.set_attention` sets them for
one model), never process-wide: two models in one process may use different kernels.

Kernels are looked up by name in a registry. "sdpa" (`torch.nn.functional.scaled_dot_product_attention`: CPU
and GPU, cuDNN / flash kernels on Hopper) is built in; other kernels register themselves from outside the
model code with `register_backend(name, fn)` — runtime/attention8.py adds "8bit" (int8 Q·Kᵀ, fp8 P·V Triton
kernels) when it is imported.

The causal model's self-attention also hands over its layer's KV cache view (`kv`, models/kv_cache.py LayerKV).
A plain kernel never sees it: the chunk's keys / values are written into the cache first and the kernel attends
to everything the cache holds (`kv.update(k, v)`, then `fn(q, k, v)`). A kernel registered with
`handles_cache=True` is called as `fn(q, k, v, kv=kv)` and writes the cache itself, when it likes: Ulysses
sequence parallelism (runtime/parallel.py) first exchanges heads for tokens between the processes, then
writes the keys / values of its own heads, for every token of the chunk, into its process's cache.

Long sequences can be attended query chunk by query chunk (models/dit.py's low-memory block):
`prepare_attention(k, v, backend)` returns `attend(q)`, equal to `attention(q, k, v, backend)` for any rows of
the queries. A kernel that transforms K and V before attending (the 8-bit one quantizes them) registers a
`prepare` function with it, so that work is done once per layer rather than once per query chunk, and the
caller can drop its K and V while the chunks run.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Attend = Callable[[torch.Tensor], torch.Tensor]
PrepareFn = Callable[[torch.Tensor, torch.Tensor], Attend]

# Where kernels that are not built in come from, for the error message when one is asked for unregistered.
_PROVIDERS = {"8bit": "worldstream.runtime.attention8"}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa}
_HANDLES_CACHE: set[str] = set()     # kernels called with kv= (they write the causal cache themselves)
_PREPARE: dict[str, PrepareFn] = {}


def register_backend(name: str, fn: AttentionFn, handles_cache: bool = False,
                     prepare: PrepareFn | None = None) -> None:
    """Make kernel `fn(q, k, v) -> out` available as `name` (same layout as `sdpa`). With `handles_cache`,
    causal self-attention calls it as `fn(q, k, v, kv=layer_kv)` and it must write the cache itself.
    `prepare(k, v)`, if given, returns `attend(q)` computing `fn(q, k, v)` from K and V transformed once (see
    `prepare_attention`)."""
    _BACKENDS[name] = fn
    if handles_cache:
        _HANDLES_CACHE.add(name)
    else:
        _HANDLES_CACHE.discard(name)
    if prepare is None:
        _PREPARE.pop(name, None)
    else:
        _PREPARE[name] = prepare


def get_backend(name: str) -> AttentionFn:
    """The registered kernel `name`; KeyError naming the registered ones (and where a known one comes from)."""
    if name not in _BACKENDS:
        hint = f" (import {_PROVIDERS[name]} to register it)" if name in _PROVIDERS else ""
        raise KeyError(f"unknown attention backend {name!r}{hint}; registered: {', '.join(_BACKENDS)}")
    return _BACKENDS[name]


def writes_cache(name: str) -> bool:
    """Whether kernel `name` was registered with handles_cache (it writes the causal KV cache itself)."""
    return name in _HANDLES_CACHE


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", kv=None) -> torch.Tensor:
    """Attention of q to k / v with the kernel `backend`. `kv`: the causal self-attention's layer cache view:
    the chunk's k / v go into it and q attends to every key it holds (see the module docstring)."""
    fn = get_backend(backend)
    if kv is None:
        return fn(q, k, v)
    if backend in _HANDLES_CACHE:
        return fn(q, k, v, kv=kv)
    k, v = kv.update(k, v)
    return fn(q, k, v)


def prepare_attention(k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> Attend:
    """`attend(q)` = `attention(q, k, v, backend)` for queries q [B, Lq, H, D] (any rows of them: the low-memory
    block attends chunk by chunk). Whatever the kernel derives from K and V is computed here, once; `attend`
    holds what it needs, so the caller may drop `k` and `v`."""
    fn = get_backend(backend)
    prepare = _PREPARE.get(backend)
    if prepare is not None:
        return prepare(k, v)
    return lambda q: fn(q, k, v)
