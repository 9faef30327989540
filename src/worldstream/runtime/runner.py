"""DiT experts on the device under a plan: load, place, run, switch.

`build_runner(ckpt, device, dtype, workload, vram, ram)` plans placement (planner.plan), loads each expert's
weights tensor by tensor straight into their final homes (non-block weights and resident blocks on the device,
streamed blocks into pinned host slabs: no second host copy) and returns a `DiTRunner`:
`runner(expert, **dit_inputs)` runs a forward; `runner.expect(expert)` says which expert the next forward uses.

Two experts (Wan2.2 / LingBot high- and low-noise) share one slot ring. If the RAM budget holds both, both stay
loaded and the switch only moves resident blocks (and the streamed ones are already prefetched); otherwise only the
active expert is held and the switch reads the other from disk into the same slabs (`report["switch_s"]`).

Compressed weights (runtime/quant.py): `build_runner(..., quant="fp8")` quantizes each block linear as its tensor
is read (one tensor at a time: no bf16 copy of the model is ever held), and a checkpoint written by `worldstream
convert` is loaded as stored. Either way a compressed block is just 8-bit Parameters + float32 scales in its slab;
blocks the policy leaves whole (first / last) have another slab layout and stay resident on the device.
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
from .memory import host_ram_bytes, peak_rss_bytes, pinned_empty, unpin
from .planner import Plan, PlanError, Workload, plan
from .slab import BlockLayout
from .disk import DiskTier, block_parts, placeholder, read_blocks
from .quant import QuantPolicy, as_policy, quantize_stream, quantized_block_bytes, quantized_keys, quantized_model
from .streaming import RamSource, StreamEngine, place, unplace

Loader = Callable[..., tuple[WanDiT, dict[int, object]]]


def resolve_quant(ckpt, quant) -> tuple[QuantPolicy | None, bool]:
    """(the policy the expert weights end up in, whether they are quantized while loading). A converted
    checkpoint is used as stored; asking it for another format is an error (convert from the original)."""
    stored = getattr(ckpt, "quant", None)
    wanted = as_policy(quant)
    if stored is not None:
        if wanted is not None and wanted.fmt != stored.fmt:
            raise ValueError(f"{ckpt.root}: the checkpoint is already compressed to {stored.fmt}; cannot load it "
                             f"as {wanted.fmt} (drop --quant, or convert the original checkpoint)")
        return stored, False
    return wanted, wanted is not None


def checkpoint_loader(ckpt, quant: QuantPolicy | str | None = None) -> Loader:
    """Load an expert of a `loader.Checkpoint`: resident blocks and non-block weights to `device`, streamed
    blocks into pinned slabs (RAM tier) or left in the shards for the disk tier, one tensor at a time.

    `quant`: compress the block linears while loading (a format name or a QuantPolicy); a converted checkpoint
    (`ckpt.quant`) is read as stored. The returned loader's `.quant` is the policy in effect."""
    from ..models.loader import index_model_dir, iter_tensors, validate

    policy, on_load = resolve_quant(ckpt, quant)

    def load(name: str, streamed: set, device, dtype, disk: set = frozenset(), tier: DiskTier | None = None,
             slabs: list | None = None):
        model_dir = Path(ckpt.experts[name])
        locations = index_model_dir(model_dir)
        validate(ckpt.config, locations, model_dir, None if on_load else policy)
        if disk and on_load:
            raise ValueError(f"blocks {sorted(disk)} would be read from the shards on disk, but --quant "
                             f"{policy.fmt} compresses while loading and the disk tier streams stored bytes: "
                             f"convert once (`worldstream convert --quant {policy.fmt}`) or raise --ram")
        _check_streamable(ckpt.config, policy, set(streamed))
        block_of = {k: int(k.split(".")[1]) for k in locations if k.startswith("blocks.")}
        # streamed blocks stored as safetensors byte ranges are read straight into their slabs (below)
        in_pth = {block_of.get(k) for k, loc in locations.items() if loc.offset < 0}
        direct = set() if on_load else set(streamed) - in_pth
        read = {k: v for k, v in locations.items() if block_of.get(k) not in disk | direct}
        tensors = iter_tensors(read, None if policy else dtype, "cpu")
        if on_load:
            tensors = quantize_stream(tensors, quantized_keys(ckpt.config, policy), policy.fmt)
        model, sources = _assemble(ckpt.config, tensors, streamed - direct, device, dtype, policy)
        if direct:
            sources.update(_read_streamed(model, locations, sorted(direct), slabs if slabs is not None else []))
        for i in disk:
            sources[i] = tier.source(locations, f"blocks.{i}.")
            for mod in model.blocks[i].modules():
                for pname, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[pname] = nn.Parameter(placeholder(p.shape, p.dtype), requires_grad=False)
        return model, sources
    load.quant = policy
    return load


def random_loader(cfg: DiTConfig, seed: int = 0, quant: QuantPolicy | str | None = None) -> Loader:
    """Random weights of the right shapes (benchmarks with no checkpoint): generated on the device, block
    linears compressed per `quant` as they are made."""
    policy = as_policy(quant)

    def load(name: str, streamed: set, device, dtype, disk: set = frozenset(), tier=None, slabs=None):
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
        made = tensors()
        if policy is not None:
            made = quantize_stream(made, quantized_keys(cfg, policy), policy.fmt)
        return _assemble(cfg, made, streamed, device, dtype, policy)
    load.quant = policy
    return load


def _check_streamable(cfg, policy: QuantPolicy | None, streamed: set) -> None:
    if policy is not None and streamed & set(policy.pinned(cfg.num_layers)):
        raise ValueError(f"blocks {sorted(streamed & set(policy.pinned(cfg.num_layers)))} are stored whole "
                         "(another slab layout than the compressed blocks) and must stay resident")


def _assemble(cfg, tensors, streamed: set, device, dtype,
              policy: QuantPolicy | None = None) -> tuple[WanDiT, dict[int, object]]:
    """Fill a meta skeleton (with the policy's QLinears) from (key, tensor) pairs: each tensor is converted to
    its parameter's dtype (8-bit weights and float32 scales keep theirs) and goes straight to its home."""
    model = quantized_model(cfg, dtype, policy).eval()
    _check_streamable(cfg, policy, streamed)
    layouts: dict[int, BlockLayout] = {}
    slabs: dict[int, torch.Tensor] = {}
    views: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors:
        module_name, _, pname = key.rpartition(".")
        module = model.get_submodule(module_name)
        t = t.to(module._parameters[pname].dtype)
        parts = key.split(".")
        if parts[0] == "blocks" and int(parts[1]) in streamed:
            i = int(parts[1])
            if i not in slabs:
                layouts[i] = BlockLayout.of(model.blocks[i])
                slabs[i] = pinned_empty(layouts[i].nbytes)
                views[i] = layouts[i].views(slabs[i])
            dst = views[i][".".join(parts[2:])]
            dst.copy_(t)
            t = dst
        else:
            t = t.to(device)
        module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    return model, {i: RamSource(b) for i, b in slabs.items()}


def _read_streamed(model: WanDiT, locations: dict, blocks: list[int], reuse: list[torch.Tensor]) -> dict:
    """Streamed blocks of `model` (a meta skeleton there) read from their safetensors byte ranges straight into
    pinned slabs, several blocks at a time in threads: no staging copy, no memory map. Slabs in `reuse` (the
    previous expert's, at a switch: same layout, already pinned) are filled before new ones are allocated."""
    jobs, sources = [], {}
    for i in blocks:
        layout = BlockLayout.of(model.blocks[i])
        slab = reuse.pop() if reuse and reuse[-1].numel() == layout.nbytes else pinned_empty(layout.nbytes)
        jobs.append((block_parts(layout, locations, f"blocks.{i}."), slab))
        for pname, view in layout.views(slab).items():
            module_name, _, leaf = pname.rpartition(".")
            model.blocks[i].get_submodule(module_name)._parameters[leaf] = nn.Parameter(view, requires_grad=False)
        sources[i] = RamSource(slab)
    read_blocks(jobs)
    return sources


def stream_layout(cfg: DiTConfig, dtype, policy: QuantPolicy | None) -> BlockLayout:
    """The slab layout of the streamed blocks (compressed ones when quantized)."""
    model = quantized_model(cfg, dtype, policy)
    streamable = policy.blocks(cfg.num_layers) if policy is not None else [0]
    return BlockLayout.of(model.blocks[streamable[0] if streamable else 0])


class DiTRunner:
    def __init__(self, names: list[str], loader: Loader, device, dtype, plan_: Plan | None,
                 keep_all: bool = True, ffn_chunk: int | None = None, cfg: DiTConfig | None = None,
                 quant: QuantPolicy | None = None):
        self.names, self.loader = names, loader
        self.quant = quant if quant is not None else getattr(loader, "quant", None)
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


    def _load(self, name: str, reuse: list | None = None) -> None:
        t0 = time.perf_counter()
        n = self.plan.n_blocks if self.plan else None
        streamed = set(self.plan.ram_blocks) if self.plan else set()
        disk = set(self.plan.disk_blocks) if self.plan else set()
        if disk and self.tier is None:
            self.tier = DiskTier(stream_layout(self.plan_cfg, self.dtype, self.quant), ring=self.plan.prefetch + 2)
        model, sources = self.loader(name, streamed, self.device, self.dtype, disk=disk, tier=self.tier,
                                     slabs=reuse)
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
        reuse: list[torch.Tensor] = []
        if self.active is not None and self.active in self.placed:
            old = self.active
            model, sources = self.loaded[old]
            unplace(model, sources, self.engine, self.placed.pop(old))
            all_resident = self.plan is None or len(self.plan.resident) == self.plan.n_blocks
            if not self.keep_all or all_resident:   # experts run high then low: free the device and RAM
                del self.loaded[old]
                # the old expert's pinned slabs take the new expert's blocks (same layout): no re-pinning
                reuse = [src.take() for src in sources.values() if isinstance(src, RamSource)]
                del sources
                model.to("meta")
        if name not in self.loaded:
            self._load(name, reuse)
        for buf in reuse:      # slabs the new expert did not take
            unpin(buf)
        model, sources = self.loaded[name]
        resident = self.plan.resident if self.plan else list(range(len(model.blocks)))
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
            pinned = list(self.quant.pinned(self.plan.n_blocks)) if self.quant is not None else []
            model, sources = self.loader(name, set(range(self.plan.n_blocks)) - set(pinned), self.device,
                                         self.dtype)
            model.set_ffn_chunk(self.ffn_chunk)
            self.loaded[name] = (model, sources)
            _, self.placed[name] = place(model, self.device, sources, pinned, self.plan.prefetch,
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
        self.engine, self.placed[name] = place(model, self.device, sources, self.plan.resident, self.plan.prefetch,
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
                 loader: Loader | None = None, progress=None, quant: QuantPolicy | str | None = None) -> DiTRunner:
    """Plan and build a runner for `ckpt` (a loader.Checkpoint, or anything with `.config` and `.experts`).

    `quant` ("fp8" | "fp8-block" | "int8" | a QuantPolicy): compress the block linears while loading; the plan
    then streams compressed blocks and keeps the whole first/last blocks resident. A converted checkpoint
    (`ckpt.quant`) is planned the same way without asking."""
    device = torch.device(device)
    cfg = ckpt.config
    names = list(ckpt.experts)
    try:
        policy, on_load = resolve_quant(ckpt, quant)
    except ValueError as e:
        raise PlanError(str(e)) from None
    loader = loader or checkpoint_loader(ckpt, policy)
    workload = replace(workload, experts=len(names))
    if device.type != "cuda":
        return DiTRunner(names, loader, device, dtype, None, quant=policy)
    budget = vram if vram is not None else torch.cuda.mem_get_info(device)[0]
    if ram is None:   # no budget given: what the machine has, less room for the OS and the rest of the run
        ram = 0.8 * host_ram_bytes()
    extra = {}
    if policy is not None:
        extra = dict(block_bytes=quantized_block_bytes(cfg, policy.fmt, dtype, tuple(policy.skip)),
                     pinned_resident=policy.pinned(cfg.num_layers))
    p = plan(cfg, workload, budget, ram, bytes_per_param=torch.finfo(dtype).bits / 8, **extra)
    if on_load and p.disk_blocks:
        raise PlanError(f"--ram {ram / 1e9:.1f}GB holds {len(p.ram_blocks)} of the {len(p.streamed)} streamed "
                        f"blocks even compressed; the rest would stream from disk, which needs the compressed "
                        f"checkpoint on disk: run `worldstream convert --ckpt_dir {ckpt.root} --quant {policy.fmt} "
                        f"--out DIR` once and generate from DIR, or raise --ram")
    one_expert = p.weights_in_ram
    keep_all = ram is None or 2 * one_expert + 4e9 <= ram
    return DiTRunner(names, loader, device, dtype, p, keep_all=keep_all, ffn_chunk=p.ffn_chunk, cfg=cfg,
                     quant=policy)
