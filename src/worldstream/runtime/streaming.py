"""Block streaming: run a stack of blocks larger than the GPU at close to resident speed.

How it works (shared/spec/streaming-engine.md, "Lessons"):
- Each streamed block's parameters live in one contiguous host slab (pinned, see memory.py / slab.py).
- The GPU holds a ring of `prefetch + 1` preallocated slots, each one block's bytes. A dedicated copy stream fills
  slot `j % slots` with streamed block j by ONE async copy, then records `ready[slot]`. Compute waits on
  `ready[slot]`, runs the block with its parameters re-pointed (`p.data = view`) into the slot, and records
  `free[slot]`; the copy that next reuses the slot waits on `free[slot]`. Both waits are GPU-side: the host never
  synchronizes, nothing is allocated, no weight ever goes back to the host, no `empty_cache()`.
- The copy cursor runs ahead over the *future execution order*, not just this forward: the last blocks of a forward
  prefetch the first blocks of the next one, and `expect(model)` makes them come from the next expert (Wan2.2 /
  LingBot switch from the high-noise to the low-noise expert once). If the prediction was wrong, the engine notices
  at the next block, drops the queue and reloads (still correct, only slower).
- Blocks chosen resident keep their parameters on the GPU and are skipped by the cursor.
The engine attaches to any `nn.ModuleList` of same-shaped blocks via forward hooks, so the model code is unchanged.
On a CPU device the same schedule runs with synchronous copies (for tests).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .memory import pinned_empty, release_file_pages, unpin
from .slab import BlockLayout


class _NoEvent:  # CPU stand-ins: copies are synchronous there
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class RamSource:
    """A block's bytes held in a pinned host slab."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf

    def acquire(self) -> torch.Tensor:
        return self.buf

    def release(self, copied_event) -> None:
        pass

    def take(self) -> torch.Tensor:
        """Hand the (still pinned) slab to a new owner, e.g. the next expert's block at an expert switch."""
        buf, self.buf = self.buf, None
        return buf

    def __del__(self):   # the slab's page-locking ends with its owner (views keep plain memory alive)
        if self.buf is not None:
            unpin(self.buf)


@dataclass
class Streamed:
    """One model's block stack attached to an engine."""
    name: str
    blocks: nn.ModuleList
    resident: frozenset[int]
    order: list[int]                      # streamed block indices, execution order
    sources: dict[int, object]            # block index -> RamSource / DiskSource
    params: dict[int, dict[str, nn.Parameter]] = field(default_factory=dict)
    host_views: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    hooks: list = field(default_factory=list)


class StreamEngine:
    """A ring of GPU slots shared by one or more block stacks with the same layout."""

    def __init__(self, layout: BlockLayout, device: torch.device | str, prefetch: int = 1, trace: bool = False):
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        self.layout = layout
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.n_slots = prefetch + 1
        cuda = self.device.type == "cuda"
        self.slots = [torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device) for _ in range(self.n_slots)]
        self.slot_views = [layout.views(s) for s in self.slots]
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.ready = [torch.cuda.Event() if cuda else _NoEvent() for _ in range(self.n_slots)]
        self.free = [torch.cuda.Event() if cuda else _NoEvent() for _ in range(self.n_slots)]
        self.models: list[Streamed] = []
        self.queue: deque[tuple[Streamed, int, int]] = deque()   # (model, block, slot) copies in flight
        self.cursor: tuple[Streamed, int] | None = None           # next item to issue: (model, position in order)
        self.next_model: Streamed | None = None
        self._rr = 0
        self._active: dict[int, int] = {}                         # id(block) -> slot while it computes
        self.trace: list[tuple] | None = [] if trace else None
        self.stats = {"copies": 0, "bytes": 0, "resyncs": 0}

    # ---- attaching ---------------------------------------------------------------------------------------
    def attach(self, blocks: nn.ModuleList, resident: set[int], sources: dict[int, object], name: str = "model") -> Streamed:
        """Stream `blocks`: indices in `resident` must already be on the device; every other block gets its
        bytes from `sources[i]` (RamSource / DiskSource) and its parameters become views into a slot while it runs."""
        order = [i for i in range(len(blocks)) if i not in resident]
        missing = [i for i in order if i not in sources]
        if missing:
            raise ValueError(f"streamed blocks {missing} of {name} have no host source")
        m = Streamed(name, blocks, frozenset(resident), order, dict(sources))
        for i in order:
            if BlockLayout.of(blocks[i]) != self.layout:
                raise ValueError(f"block {i} of {name} does not match the engine's slot layout")
            m.params[i] = dict(blocks[i].named_parameters())
            m.host_views[i] = {n: p.data for n, p in m.params[i].items()}
            m.hooks.append(blocks[i].register_forward_pre_hook(self._make_pre(m, i)))
            m.hooks.append(blocks[i].register_forward_hook(self._make_post(m, i)))
        self.models.append(m)
        return m

    def detach(self, m: Streamed) -> None:
        for h in m.hooks:
            h.remove()
        self.models.remove(m)
        self.queue = deque(q for q in self.queue if q[0] is not m)
        if self.cursor is not None and self.cursor[0] is m:
            self.cursor = None
        if self.next_model is m:   # else the detached stack (and its host slabs) would stay referenced
            self.next_model = None

    def expect(self, m: Streamed | None) -> None:
        """The forward after the current one runs `m` (prefetch across the expert switch)."""
        self.next_model = m

    # ---- the cursor over future execution order ------------------------------------------------------------
    def _resolve(self, pos: tuple[Streamed, int]) -> tuple[Streamed, int]:
        """Past the end of a forward, the next forward's model is decided when the copy is issued (not when
        the cursor got there), so an `expect()` made in between is honoured."""
        m, k = pos
        if k < len(m.order):
            return m, k
        return (self.next_model if self.next_model is not None else m), 0

    def _advance(self, pos: tuple[Streamed, int]) -> tuple[Streamed, int]:
        m, k = self._resolve(pos)
        return m, k + 1

    def _issue(self) -> None:
        self.cursor = self._resolve(self.cursor)
        m, k = self.cursor
        block = m.order[k]
        slot = self._rr
        self._rr = (self._rr + 1) % self.n_slots
        src = m.sources[block]
        host = src.acquire()
        if self.copy_stream is not None:
            self.copy_stream.wait_event(self.free[slot])
            with torch.cuda.stream(self.copy_stream):
                self.slots[slot].copy_(host, non_blocking=True)
                self.ready[slot].record(self.copy_stream)
                src.release(self.ready[slot])
        else:
            self.slots[slot].copy_(host)
            src.release(self.ready[slot])
        self.queue.append((m, block, slot))
        self.cursor = self._advance(self.cursor)
        self._read_ahead()
        self.stats["copies"] += 1
        self.stats["bytes"] += self.layout.nbytes
        if self.trace is not None:
            self.trace.append(("copy", m.name, block, slot))

    def _read_ahead(self, depth: int = 4) -> None:
        """Tell sources that can read ahead (the disk tier) which blocks come next."""
        pos = self.cursor
        for _ in range(depth):
            m, k = pos = self._resolve(pos)
            hint = getattr(m.sources[m.order[k]], "prefetch", None)
            if hint is None:
                return
            hint()
            pos = self._advance(pos)

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _make_pre(self, m: Streamed, i: int):
        def pre(module, args):
            if not self.queue or self.queue[0][0] is not m or self.queue[0][1] != i:
                self._resync(m, i)
            _, _, slot = self.queue.popleft()
            while len(self.queue) < self.prefetch:
                self._issue()
            if self.copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
            for name, p in m.params[i].items():
                p.data = self.slot_views[slot][name]
            self._active[id(module)] = slot
            if self.trace is not None:
                self.trace.append(("compute", m.name, i, slot))
        return pre

    def _make_post(self, m: Streamed, i: int):
        def post(module, args, output):
            slot = self._active.pop(id(module))
            if self.copy_stream is not None:
                self.free[slot].record(torch.cuda.current_stream(self.device))
            for name, p in m.params[i].items():
                p.data = m.host_views[i][name]
        return post

    def _resync(self, m: Streamed, i: int) -> None:
        """The block about to run is not the head of the queue: drop the queue and restart the cursor here."""
        if self.queue:
            self.stats["resyncs"] += 1
        self.queue.clear()
        for src in {id(s): s for mm in self.models for s in mm.sources.values()}.values():
            reset = getattr(src, "reset", None)
            if reset:
                reset()
        self.cursor = (m, m.order.index(i))
        self._issue()

    def release(self) -> None:
        """Wait for copies in flight (end of generation) and forget the queue."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self.queue.clear()
        self.cursor = None


# ---- building a streamed model ------------------------------------------------------------------------------

def host_slabs_from_blocks(blocks: nn.ModuleList, indices, layout: BlockLayout) -> dict[int, RamSource]:
    """Pack blocks' parameters into pinned slabs and re-point the parameters at them (no second host copy).

    Parameters may currently be on any device (e.g. random weights built on the GPU for benchmarks): each is
    copied into its slab and the original storage is released; the pages of parameters memory-mapped from a
    file (umt5's `.pth`) leave the process's resident set block by block (`release_file_pages`), so that the
    host holds each block once, not in the file mapping and in its slab.
    """
    sources = {}
    for i in indices:
        old = [p.data for p in blocks[i].parameters()]
        buf = pinned_empty(layout.nbytes)
        layout.pack(blocks[i], buf)
        views = layout.views(buf)
        for name, p in blocks[i].named_parameters():
            p.data = views[name]
        release_file_pages(old)
        del old
        sources[i] = RamSource(buf)
    return sources


def spread_resident(n_blocks: int, n_resident: int) -> list[int]:
    """`n_resident` block indices spread evenly through the stack (not a prefix): the copy engine keeps
    working while resident blocks compute, so even spacing gives the most transfer time per streamed run."""
    n_resident = max(0, min(n_blocks, n_resident))
    if n_resident == 0:
        return []
    if n_resident == n_blocks:
        return list(range(n_blocks))
    step = n_blocks / n_resident
    return sorted({int(step * (k + 0.5)) for k in range(n_resident)})


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Every parameter and buffer of `model` that does not belong to `blocks`, moved to `device`."""
    inside = {id(m) for m in blocks.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m._parameters.values():
            if p is not None:
                p.data = p.data.to(device)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(device)


def place(model: nn.Module, blocks: nn.ModuleList, device, sources: dict[int, object], resident: list[int],
          prefetch: int, engine: StreamEngine | None = None, name: str = "model",
          trace: bool = False) -> tuple[StreamEngine | None, Streamed | None]:
    """Put `model` on `device` under a plan, streaming its block stack `blocks` (any `nn.ModuleList` of
    same-shaped blocks inside it: the DiT's `blocks`, the text encoder's `encoder.block`).

    Everything of `model` outside `blocks` and the `resident` blocks get device copies of their bytes; the
    other blocks stream from `sources` (block -> RamSource / DiskSource). Streamed blocks share one slab
    layout; resident ones may have their own (e.g. uncompressed first/last blocks of a compressed model).
    Pass an existing `engine` to share its slots with another stack of the same layout (the second expert).
    Undo with `unplace`."""
    _move_outside(model, blocks, device)
    for i in resident:
        if i in sources:   # device copy of the host bytes; the host slab stays the block's home
            buf = sources[i].acquire().to(device)
            sources[i].release(None)
            for pname, view in BlockLayout.of(blocks[i]).views(buf).items():   # its own layout: a resident
                blocks[i].get_parameter(pname).data = view                    # block may differ (bf16 ends)
        else:
            blocks[i].to(device)
    streamed = [i for i in range(len(blocks)) if i not in set(resident)]
    if not streamed:
        return engine, None
    engine = engine or StreamEngine(BlockLayout.of(blocks[streamed[0]]), device, prefetch=prefetch, trace=trace)
    handle = engine.attach(blocks, set(resident), {i: s for i, s in sources.items() if i not in set(resident)},
                           name=name)
    return engine, handle


def unplace(blocks: nn.ModuleList, sources: dict[int, object], engine: StreamEngine | None,
            handle: Streamed | None) -> None:
    """Detach from the engine and point resident blocks back at their host slabs (device copies are freed)."""
    if engine is not None and handle is not None:
        engine.release()
        engine.detach(handle)
    for i, src in sources.items():
        if isinstance(src, RamSource) and src.buf is not None:
            for pname, view in BlockLayout.of(blocks[i]).views(src.buf).items():
                blocks[i].get_parameter(pname).data = view
