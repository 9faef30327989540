"""The causal model's memory: self-attention keys / values of the frames seen so far, and the prompt's
cross-attention keys / values. Both are data a session owns and passes to every forward; no module keeps them.

Self-attention cache (`KVCache`), per layer K and V buffers [B, slots, heads, head_dim] of `capacity` latent
frames. Keys are stored after RoPE, at their absolute frame positions, as upstream does. A chunk of n frames
starting at frame s is written into the slots of its frames, then the chunk's queries attend to every frame
held (its own included: bidirectional inside a chunk, causal across chunks). Which frames are held:

  * global (window None, upstream v1): every frame since the start; capacity bounds the length.
  * window W with sink S (upstream v2: W = 18, S = 6): frames 0..S-1 forever, then the latest W - S frames.
    Upstream evicts by copying the whole buffer left (clone-shift) when a new chunk would overflow it. Here
    the W - S recent slots are a ring: frame f >= S lives in slot S + (f - S) mod (W - S), so a new chunk
    overwrites exactly the frames upstream would have dropped, and nothing is copied. Attention ignores the
    order of keys, so the result is upstream's (up to the summation order of the softmax).
    Needs W >= S + n, so that a chunk never evicts its own frames or the sink (upstream's sink survives only
    then as well).

Every forward of a chunk (4 denoising steps, then the refresh at t = 0) writes the same slots: the last
write, the refresh's, is what later chunks attend to.

Memory (14B class, 480x832: 1,560 tokens per latent frame, 40 layers): 1.28 GB per frame held in bf16.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Self-attention K / V of one stream (see the module docstring). Build with `KVCache.empty`."""
    k: list[torch.Tensor]            # per layer [B, capacity * frame_tokens, H, D]
    v: list[torch.Tensor]
    frame_tokens: int                # tokens per latent frame (lat_h * lat_w / patch)
    capacity: int                    # latent frames the buffers hold
    sink: int = 0                    # frames kept forever (window mode)
    window: int | None = None        # frames held (sink included); None: global, up to `capacity`
    frames: int = 0                  # frames written so far: the next chunk normally starts here
    # the chunk being written: where its tokens go, and how many slots its queries see
    _writes: list[tuple[int, int, int]] = field(default_factory=list)   # (slot token, chunk token, tokens)
    _visible: int = 0

    @classmethod
    def empty(cls, layers: int, batch: int, frame_tokens: int, heads: int, head_dim: int, dtype, device,
              window: int | None = None, sink: int = 0, max_frames: int | None = None) -> "KVCache":
        """Buffers for `window` frames (or `max_frames` with a global cache), allocated once."""
        if window is None:
            if max_frames is None:
                raise ValueError("a global cache (no window) needs max_frames: its buffers are allocated up front")
            capacity = max_frames
        else:
            if not 0 <= sink < window:
                raise ValueError(f"the sink ({sink} frames) must be smaller than the window ({window})")
            capacity = window
        shape = (batch, capacity * frame_tokens, heads, head_dim)
        k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        return cls(k, v, frame_tokens, capacity, sink, window)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def held(self) -> int:
        """Frames currently held (what the window fill in a status line reports)."""
        return min(self.frames, self.capacity)

    def slot(self, frame: int) -> int:
        """The buffer slot of latent frame `frame`."""
        if self.window is None or frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % (self.window - self.sink)

    def begin_chunk(self, start: int, n: int) -> None:
        """The next forwards write frames start .. start+n-1 (a new chunk at `self.frames`, or the same chunk
        again for its next denoising step or its refresh)."""
        if start > self.frames or start + n < self.frames:
            raise ValueError(f"chunk of frames {start}..{start + n - 1} does not continue a cache holding "
                             f"frames up to {self.frames - 1}")
        if self.window is None:
            if start + n > self.capacity:
                raise ValueError(f"the global KV cache holds {self.capacity} frames; frame {start + n - 1} does "
                                 "not fit (give a window to run without end)")
        elif n > self.window - self.sink:
            raise ValueError(f"a chunk of {n} frames does not fit the window of {self.window} frames with a sink "
                             f"of {self.sink} (needs window >= sink + chunk)")
        ft = self.frame_tokens
        writes: list[tuple[int, int, int]] = []
        for f in range(start, start + n):            # runs of consecutive slots
            s = self.slot(f) * ft
            if writes and writes[-1][0] + writes[-1][2] == s:
                writes[-1] = (writes[-1][0], writes[-1][1], writes[-1][2] + ft)
            else:
                writes.append((s, (f - start) * ft, ft))
        self._writes = writes
        self.frames = max(self.frames, start + n)
        self._visible = min(self.frames, self.capacity) * ft

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the chunk's keys / values [B, n * frame_tokens, H, D] of `layer`; return every key / value the
        chunk attends to (views of the buffers, no copy)."""
        kb, vb = self.k[layer], self.v[layer]
        for slot, src, count in self._writes:
            kb[:, slot:slot + count] = k[:, src:src + count]
            vb[:, slot:slot + count] = v[:, src:src + count]
        return kb[:, :self._visible], vb[:, :self._visible]

    def layer(self, i: int) -> "LayerKV":
        return LayerKV(self, i)

    def reset(self) -> None:
        """Forget every frame (the buffers stay allocated)."""
        self.frames, self._writes, self._visible = 0, [], 0


@dataclass(frozen=True)
class LayerKV:
    """One layer's view of a KVCache: what a block's self-attention is handed."""
    cache: KVCache
    index: int

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.index, k, v)


@dataclass
class CrossKV:
    """The prompt's cross-attention keys / values per layer, computed at the first forward that needs them
    and reused by every later forward (and chunk) until the prompt changes (`reset`)."""
    layers: int
    context: torch.Tensor | None = None                  # embedded text [B, text_len, dim]
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)

    def __post_init__(self):
        if not self.kv:
            self.kv = [None] * self.layers

    def reset(self) -> None:
        self.context, self.kv = None, [None] * self.layers

    def layer(self, i: int) -> "LayerCrossKV":
        return LayerCrossKV(self, i)


@dataclass(frozen=True)
class LayerCrossKV:
    cache: CrossKV
    index: int

    def get(self):
        return self.cache.kv[self.index]

    def put(self, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.cache.kv[self.index] = kv
