"""CUDA graphs of a causal student's chunk forward: the same kernels, launched by one call.

A chunk forward of the v2 1.3B student at 480x832 is ~1,200 small kernels; on an H200 the host issuing them
one by one takes longer than the GPU runs them (0.13 s per forward against a FLOP floor of 0.045 s:
BENCHMARKS.md, "Real time"). A CUDA graph records the kernels of one forward once and replays them with one
launch. What a graph needs is that every replay is the same work on the same addresses, so a forward is split
where that stops being true:

    eager, every call   model.begin_chunk     which cache slots the chunk's frames write (host-side ints)
                        model.prepare         patch and time embeddings, the camera features, and the RoPE
                                              angles of the chunk's absolute frame positions (they change
                                              from chunk to chunk; the graph reads them from a fixed buffer)
    graph, replayed     the blocks + the head on fixed input buffers; the KV cache's buffers and the prompt's
                        cross-attention K / V are the session's own tensors, at fixed addresses

The blocks' work depends on the chunk only through values in those buffers, and on the cache's write pattern
(which slots the chunk writes, how many it attends to): with a ring of R slots and chunks of n frames there
are R / gcd(R, n) patterns once the window is full (3 for window 9 / sink 3 / chunk 4), and one graph is
captured per pattern, after that pattern has run once eagerly (which compiles the fused kernels). A replay
runs the very kernels the eager forward runs, in the same order, on the same values: the result is the eager
result, bit for bit (tests/test_graphs.py on a GPU; on the CPU this class runs the forward eagerly).

Not graphed (the forward runs eagerly, same numbers): the CPU (where the split forward runs eagerly, so
its equality with `WanDiT.forward` is tested there); streamed or low-memory (`set_chunk`) blocks
(their hooks move weights or split work on the host); the step cache; a prompt whose cross-attention K / V
are not computed yet (the first forward after a prompt change computes them). A capture that fails (an op
that syncs with the host, say) turns graphs off for the session with a warning: nothing but speed is lost.

Memory: the graphs share one pool; a pattern's activations are allocated once and reused by every replay.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


MAX_GRAPHS = 16        # graphs kept (a window of 18 / sink 6 / chunk 3 needs 4; each prompt and session anew)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict              # name -> static tensor (or tuple of them), copied into before every replay
    output: torch.Tensor      # the head's output of the last replay


class ChunkGraphs:
    """Graphs of one causal model's chunk forwards, per cache write pattern (module docstring). Call it as the
    model: `graphs(model, x=..., t=..., context=..., y=..., camera=..., cache=..., cross=..., start_frame=...)`.
    Owned by a session's runner: the graphs hold the addresses of that session's KV cache."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: set[tuple] = set()        # patterns run eagerly once (the kernels compiled, the warm-up)
        self.pool = None
        # forwards: replayed graphs, split and run eagerly (first of a pattern, or the CPU), whole (not graphable)
        self.stats = {"replays": 0, "split": 0, "whole": 0, "captures": 0}

    def __call__(self, model, x, t, context, y=None, clip=None, camera=None, cache=None, cross=None,
                 start_frame=None, stack=None) -> torch.Tensor:
        if cache is None or stack is not None or not self._graphable(model, cross):
            self.stats["whole"] += 1
            return model(x, t, context, y=y, clip=clip, camera=camera, cache=cache, cross=cross,
                         start_frame=start_frame, stack=stack)
        model.begin_chunk(x, cache, cross, start_frame)
        tokens, kwargs, (e, grid) = model.prepare(x, t, context, y=y, clip=clip, camera=camera,
                                                  start_frame=start_frame, cross=cross)
        values = dict(tokens=tokens, e=e, **{k: v for k, v in kwargs.items() if k != "context"})
        key = (tuple(cache._writes), cache._visible, grid, _signature(values), _addresses(cross, cache))
        g = self.graphs.get(key)
        if g is None and key in self.seen and self.enabled:
            if len(self.graphs) >= MAX_GRAPHS:           # prompts or sessions come and go: start over
                self.reset()
            g = self._capture(model, key, values, kwargs["context"], cache, cross, grid)
        if g is None:
            self.seen.add(key)
            self.stats["split"] += 1
            return _blocks_and_head(model, values, kwargs["context"], cache, cross, grid)
        _copy_into(g.inputs, values)
        g.graph.replay()
        self.stats["replays"] += 1
        return g.output.clone()

    def reset(self) -> None:
        """Forget every graph and its pool (a key holds the addresses a graph reads: stale ones never match)."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None

    # ---- pieces ---------------------------------------------------------------------------------------------
    def _graphable(self, model, cross) -> bool:
        """Whether this forward can be split as a graph needs (on the CPU the split runs eagerly)."""
        if cross is None or cross.context is None or any(kv is None for kv in cross.kv):
            return False
        if any(getattr(b, "chunk", None) is not None for b in model.blocks):
            return False                                   # the low-memory block splits work on the host
        if any(b._forward_pre_hooks or b._forward_hooks for b in model.blocks):
            return False                                   # streamed blocks: the engine's hooks move weights
        return True

    def _capture(self, model, key, values, context, cache, cross, grid) -> _Graph | None:
        static = _clone_structure(values)
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):                  # warm-up off the capture (cuBLAS / cuDNN set-up);
                _blocks_and_head(model, static, context, cache, cross, grid)   # it rewrites the same slots
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):   # (the server's
                # other threads may touch CUDA meanwhile: only this thread's work is captured)
                output = _blocks_and_head(model, static, context, cache, cross, grid)
        except Exception as e:  # noqa: BLE001 - any capture failure: the same forward, eagerly, from now on
            warnings.warn(f"worldstream: CUDA graphs off for this session ({type(e).__name__}: {e}); "
                          "the forwards run eagerly (same numbers)", stacklevel=3)
            self.enabled = False
            torch.cuda.synchronize(self.device)
            return None
        g = self.graphs[key] = _Graph(graph, static, output)
        self.stats["captures"] += 1
        return g


def _blocks_and_head(model, values: dict, context, cache, cross, grid) -> torch.Tensor:
    """What `WanDiT.forward` does after `prepare`, on the given inputs (the part a graph records)."""
    kwargs = {k: v for k, v in values.items() if k not in ("tokens", "e")}
    kwargs["context"] = context
    x = values["tokens"]
    for block, block_kwargs in model.layers(kwargs, cache, cross):
        x = block(x, **block_kwargs)
    return model.finish(x, values["e"], grid)


def _addresses(cross, cache) -> tuple:
    """Where the tensors a graph reads in place live: the prompt's context and cross K / V, the KV cache."""
    return (cross.context.data_ptr(), tuple(t.data_ptr() for kv in cross.kv for t in kv),
            tuple(t.data_ptr() for t in cache.k + cache.v))


def _signature(values: dict) -> tuple:
    out = []
    for k, v in sorted(values.items()):
        parts = v if isinstance(v, tuple) else (v,)
        out.append((k, tuple((tuple(p.shape), p.dtype) if isinstance(p, torch.Tensor) else repr(p) for p in parts)))
    return tuple(out)


def _clone_structure(values: dict) -> dict:
    def one(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, tuple):
            return tuple(one(p) for p in v)
        return v
    return {k: one(v) for k, v in values.items()}


def _copy_into(static: dict, values: dict) -> None:
    for k, v in values.items():
        s = static[k]
        if isinstance(v, torch.Tensor):
            s.copy_(v)
        elif isinstance(v, tuple):
            for a, b in zip(s, v):
                if isinstance(b, torch.Tensor):
                    a.copy_(b)
