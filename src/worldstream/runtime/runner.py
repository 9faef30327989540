"""DiT experts on the device under a plan: load, place, run, switch.

`build_runner(ckpt, device, dtype, workload, vram, ram)` plans placement (planner.plan), loads each expert's
weights tensor by tensor straight into their final homes (non-block weights and resident blocks on the device,
streamed blocks into pinned host slabs: no second host copy) and returns a `DiTRunner`:
`runner(expert, **dit_inputs)` runs a forward; `runner.expect(expert)` says which expert the next forward uses.

Two experts (Wan2.2 / LingBot high- and low-noise) share one slot ring. If the RAM budget holds both, both stay
loaded and the switch only moves resident blocks (and the streamed ones are already prefetched); otherwise only the
active expert is held and the switch reads the other from disk into the same slabs (`report["switch_s"]`).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..models.configs import DiTConfig
from ..models.dit import WanDiT
from .memory import peak_rss_bytes, pinned_empty
from .planner import Plan, Workload, plan
from .slab import BlockLayout
from .disk import DiskTier, placeholder
from .streaming import RamSource, StreamEngine, place, unplace

Loader = Callable[..., tuple[WanDiT, dict[int, object]]]


def checkpoint_loader(ckpt) -> Loader:
    """Load an expert of a `loader.Checkpoint`: resident blocks and non-block weights to `device`, streamed
    blocks into pinned slabs (RAM tier) or left in the shards for the disk tier, one tensor at a time."""
    from ..models.loader import index_model_dir, iter_tensors, validate

    def load(name: str, streamed: set, device, dtype, disk: set = frozenset(), tier: DiskTier | None = None):
        model_dir = Path(ckpt.experts[name])
        locations = index_model_dir(model_dir)
        validate(ckpt.config, locations, model_dir)
        on_disk = {k for k in locations if k.startswith("blocks.") and int(k.split(".")[1]) in disk}
        read = {k: v for k, v in locations.items() if k not in on_disk}
        model, sources = _assemble(ckpt.config, iter_tensors(read, dtype, "cpu"), streamed, device, dtype)
        for i in disk:
            sources[i] = tier.source(locations, f"blocks.{i}.")
            for mod in model.blocks[i].modules():
                for pname, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[pname] = nn.Parameter(placeholder(p.shape, p.dtype), requires_grad=False)
        return model, sources
    return load


def random_loader(cfg: DiTConfig, seed: int = 0) -> Loader:
    """Random weights of the right shapes (benchmarks with no checkpoint): generated on the device."""
    def load(name: str, streamed: set, device, dtype, disk: set = frozenset(), tier=None):
        if disk:
            raise ValueError("random weights have no files to stream from disk; raise the RAM budget")
        with torch.device("meta"):
            model = WanDiT(cfg)
        g = torch.Generator(device=device).manual_seed(seed + (name == "low"))

        def tensors():
            for key, p in model.named_parameters():
                t = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
                t = 1 + 0.02 * t if ("norm" in key and key.endswith("weight")) else (
                    t / cfg.dim**0.5 if "modulation" in key else 0.02 * t)
                yield key, t.to(dtype)
        return _assemble(cfg, tensors(), streamed, device, dtype)
    return load


def _assemble(cfg, tensors, streamed: set, device, dtype) -> tuple[WanDiT, dict[int, object]]:
    with torch.device("meta"):
        model = WanDiT(cfg).to(dtype)
    layout = BlockLayout.of(model.blocks[0])
    slabs: dict[int, torch.Tensor] = {}
    views: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors:
        module_name, _, pname = key.rpartition(".")
        parts = key.split(".")
        if parts[0] == "blocks" and int(parts[1]) in streamed:
            i = int(parts[1])
            if i not in slabs:
                slabs[i] = pinned_empty(layout.nbytes)
                views[i] = layout.views(slabs[i])
            dst = views[i][".".join(parts[2:])]
            dst.copy_(t)
            t = dst
        else:
            t = t.to(device)
        model.get_submodule(module_name)._parameters[pname] = nn.Parameter(t, requires_grad=False)
    return model.eval(), {i: RamSource(b) for i, b in slabs.items()}


class DiTRunner:
    def __init__(self, names: list[str], loader: Loader, device, dtype, plan_: Plan | None,
                 keep_all: bool = True, ffn_chunk: int | None = None, cfg: DiTConfig | None = None):
        self.names, self.loader = names, loader
        self.plan_cfg = cfg
        self.tier: DiskTier | None = None
        self.device, self.dtype = torch.device(device), dtype
        self.plan = plan_
        self.keep_all = keep_all
        self.ffn_chunk = ffn_chunk
        self.cfg_batched = plan_.cfg_batched if plan_ is not None else True
        self.loaded: dict[str, tuple[WanDiT, dict]] = {}
        self.placed: dict[str, object] = {}
        self.engine: StreamEngine | None = None
        self.active: str | None = None
        self.previous: str | None = None
        self.preplaced: set[str] = set()
        self.calls: list[str] = []
        self.report: dict = {"switch_s": 0.0, "load_s": 0.0}

    @property
    def resident(self) -> list[int]:
        if self.plan is None:
            return list(range(10**6))
        return self.plan.resident

    def _load(self, name: str) -> None:
        t0 = time.perf_counter()
        n = self.plan.n_blocks if self.plan else None
        streamed = set(self.plan.ram_blocks) if self.plan else set()
        disk = set(self.plan.disk_blocks) if self.plan else set()
        if disk and self.tier is None:
            with torch.device("meta"):
                layout = BlockLayout.of(WanDiT(self.plan_cfg).to(self.dtype).blocks[0])
            self.tier = DiskTier(layout, ring=self.plan.prefetch + 2)
        model, sources = self.loader(name, streamed, self.device, self.dtype, disk=disk, tier=self.tier)
        model.set_ffn_chunk(self.ffn_chunk)
        self.loaded[name] = (model, sources)
        self.report["load_s"] += time.perf_counter() - t0
        assert n is None or n == len(model.blocks)

    def _activate(self, name: str) -> WanDiT:
        if name == self.active:
            return self.loaded[name][0]
        if name in self.preplaced:      # attached, fully streamed, its first blocks already prefetched
            self.previous, self.active = self.active, name
            return self.loaded[name][0]
        t0 = time.perf_counter()
        if self.active is not None and self.active in self.placed:
            old = self.active
            model, sources = self.loaded[old]
            unplace(model, sources, self.engine, self.placed.pop(old))
            all_resident = self.plan is None or len(self.plan.resident) == self.plan.n_blocks
            if not self.keep_all or all_resident:   # experts run high then low: free the device and RAM
                del self.loaded[old]
                model.to("meta")
        if name not in self.loaded:
            self._load(name)
        model, sources = self.loaded[name]
        resident = self.resident if self.plan else list(range(len(model.blocks)))
        resident = [i for i in resident if i < len(model.blocks)]
        self.engine, handle = place(model, self.device, sources, resident,
                                    self.plan.prefetch if self.plan else 1, engine=self.engine, name=name)
        self.placed[name] = handle
        if self.active is not None:
            self.report["switch_s"] += time.perf_counter() - t0
        self.active = name
        return model

    def expect(self, name: str) -> None:
        """The next forward runs `name`. Across an expert switch (RAM permitting, no disk tier) the next expert is
        attached to the engine now, fully streamed, so its first blocks load during this expert's last blocks;
        after its first forward it gets the plan's resident blocks and the old expert is freed."""
        if self.engine is None:
            return
        if (name not in self.placed and name != self.active and self.active is not None and self.keep_all
                and self.plan is not None and not self.plan.disk_blocks):
            t0 = time.perf_counter()
            model, sources = self.loader(name, set(range(self.plan.n_blocks)), self.device, self.dtype)
            model.set_ffn_chunk(self.ffn_chunk)
            self.loaded[name] = (model, sources)
            _, self.placed[name] = place(model, self.device, sources, [], self.plan.prefetch,
                                         engine=self.engine, name=name)
            self.preplaced.add(name)
            self.report["load_s"] += time.perf_counter() - t0
        if self.placed.get(name) is not None:
            self.engine.expect(self.placed[name])

    def _promote(self, name: str) -> None:
        """After a pre-placed expert's first forward: drop the previous expert, give `name` its resident blocks."""
        t0 = time.perf_counter()
        self.preplaced.discard(name)
        if self.previous in self.placed:
            old_model, old_sources = self.loaded.pop(self.previous)
            unplace(old_model, old_sources, self.engine, self.placed.pop(self.previous))
            old_model.to("meta")
        model, sources = self.loaded[name]
        unplace(model, sources, self.engine, self.placed.pop(name))
        self.engine, self.placed[name] = place(model, self.device, sources, self.resident, self.plan.prefetch,
                                               engine=self.engine, name=name)
        self.report["switch_s"] += time.perf_counter() - t0

    @torch.no_grad()
    def __call__(self, expert: str, **inputs) -> torch.Tensor:
        model = self._activate(expert)
        self.calls.append(expert)
        out = model(**inputs)
        if expert in self.preplaced:
            self._promote(expert)
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.release()
        if self.tier is not None:
            self.tier.close()
        if self.device.type == "cuda":
            self.report["peak_vram"] = torch.cuda.max_memory_allocated(self.device)
        self.report["peak_rss"] = peak_rss_bytes()
        self.loaded.clear()
        self.placed.clear()


def build_runner(ckpt, device, dtype, workload: Workload, vram: float | None = None, ram: float | None = None,
                 loader: Loader | None = None, progress=None) -> DiTRunner:
    """Plan and build a runner for `ckpt` (a loader.Checkpoint, or anything with `.config` and `.experts`)."""
    device = torch.device(device)
    cfg = ckpt.config
    names = list(ckpt.experts)
    loader = loader or checkpoint_loader(ckpt)
    workload = replace(workload, experts=len(names))
    if device.type != "cuda":
        return DiTRunner(names, loader, device, dtype, None)
    budget = vram if vram is not None else torch.cuda.mem_get_info(device)[0]
    p = plan(cfg, workload, budget, ram, bytes_per_param=torch.finfo(dtype).bits / 8)
    one_expert = p.weights_in_ram
    keep_all = ram is None or 2 * one_expert + 4e9 <= ram
    return DiTRunner(names, loader, device, dtype, p, keep_all=keep_all, ffn_chunk=p.ffn_chunk, cfg=cfg)
