"""Loading DiT experts straight into their homes under a plan: non-block weights and resident blocks on the
device, streamed blocks in pinned host slabs (no second host copy), disk-tier blocks left in the shards.

A loader is a small object with `.quant` (the compression policy in effect) and `.load(name, streamed, device,
dtype, disk, tier, slabs, memory) -> (model, sources)`, where `sources` maps each host-held block to its
RamSource / DiskSource. Streamed blocks' slabs come from `memory` (runtime/memory.py: this process's pinned
memory, or slabs shared by the processes of a machine, which only one of them fills), always requested in
ascending block order so that every process asks for the same slabs in the same order. `CheckpointLoader` reads a checkpoint's files one tensor at a time (compressing block linears on
the way with `quant`); `RandomLoader` makes random weights of the right shapes (benchmarks).

Compressed weights: a compressed block is 8-bit Parameters + float32 scales in its slab; blocks the policy
leaves whole (first / last) have another slab layout and must stay resident on the device.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoints.lora import LoraSpec, expert_deltas, merge_stream
from ..checkpoints.compressed import QuantPolicy, as_policy, quantize_stream, quantized_keys, quantized_model
from ..checkpoints.dit import index_model_dir, validate
from ..checkpoints.tensors import iter_tensors
from ..models.configs import DiTConfig
from ..models.dit import WanDiT
from .disk import DiskTier, block_parts, placeholder, read_blocks
from .memory import HostMemory
from .slab import BlockLayout
from .streaming import RamSource


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


class CheckpointLoader:
    """Loads an expert of a `checkpoints.dit.Checkpoint`: resident blocks and non-block weights to `device`,
    streamed blocks into pinned slabs (RAM tier) or left in the shards for the disk tier, one tensor at a time.

    `quant`: compress the block linears while loading (a format name or a QuantPolicy); a converted checkpoint
    (`ckpt.quant`) is read as stored. `.quant` is the policy in effect. `loras`: LoRA files merged into each
    tensor they touch as it streams past, before compression (checkpoints/lora.py); blocks they touch are read
    through that stream rather than straight into their slabs, and cannot be left to the disk tier."""

    def __init__(self, ckpt, quant: QuantPolicy | str | None = None, loras: list[LoraSpec] | tuple = ()):
        self.ckpt = ckpt
        self.cfg = ckpt.config
        self.quant, self.on_load = resolve_quant(ckpt, quant)
        self.loras = list(loras)

    def load(self, name: str, streamed: set, device, dtype, disk: set = frozenset(), tier: DiskTier | None = None,
             slabs: list | None = None, memory: HostMemory | None = None) -> tuple[WanDiT, dict[int, object]]:
        """Expert `name` with blocks `streamed` in host slabs from `memory` (`disk` of them left on disk for
        `tier`); slabs in `slabs` (a previous expert's, same layout, already pinned) are filled before new ones
        are allocated. When `memory` does not fill its slabs (another process does), streamed blocks are not
        read at all."""
        ckpt, policy, on_load = self.ckpt, self.quant, self.on_load
        memory = memory or HostMemory()
        model_dir = Path(ckpt.experts[name])
        locations = index_model_dir(model_dir)
        validate(ckpt.config, locations, model_dir, None if on_load else policy)
        if disk and on_load:
            raise ValueError(f"blocks {sorted(disk)} would be read from the shards on disk, but --quant "
                             f"{policy.fmt} compresses while loading and the disk tier streams stored bytes: "
                             f"convert once (`worldstream convert --quant {policy.fmt}`) or raise --ram")
        _check_streamable(ckpt.config, policy, set(streamed))
        block_of = {k: int(k.split(".")[1]) for k in locations if k.startswith("blocks.")}
        deltas = expert_deltas(self.loras, ckpt.config, name) if self.loras else {}
        merged = {block_of[k] for k in deltas if k in block_of}
        if disk & merged:
            raise ValueError(f"blocks {sorted(disk & merged)} would be read from the shards on disk, but --lora "
                             "merges into them while loading and the disk tier streams stored bytes: write a "
                             "merged checkpoint once (`worldstream convert --lora FILE --quant fp8`) or raise --ram")
        # streamed blocks stored as safetensors byte ranges are read straight into their slabs (below)
        in_pth = {block_of.get(k) for k, loc in locations.items() if loc.offset < 0}
        direct = set() if on_load else set(streamed) - in_pth - merged
        skip = disk | direct | (set() if memory.fills else set(streamed))   # blocks not read tensor by tensor
        read = {k: v for k, v in locations.items() if block_of.get(k) not in skip}
        # with LoRAs, tensors are merged in their stored precision and rounded once (by _assemble)
        tensors = iter_tensors(read, None if (policy or deltas) else dtype, "cpu")
        if deltas:
            tensors = merge_stream(tensors, deltas)
        if on_load:
            tensors = quantize_stream(tensors, quantized_keys(ckpt.config, policy), policy.fmt)
        model, sources = _assemble(ckpt.config, tensors, streamed - direct, device, dtype, policy, memory)
        if direct:
            sources.update(_read_streamed(model, locations, sorted(direct), slabs if slabs is not None else [],
                                          memory))
        for i in disk:
            sources[i] = tier.source(locations, f"blocks.{i}.")
            for mod in model.blocks[i].modules():
                for pname, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[pname] = nn.Parameter(placeholder(p.shape, p.dtype), requires_grad=False)
        return model, sources


class RandomLoader:
    """Random weights of the right shapes (benchmarks with no checkpoint): generated on the device, block
    linears compressed per `quant` as they are made."""

    def __init__(self, cfg: DiTConfig, seed: int = 0, quant: QuantPolicy | str | None = None):
        self.cfg, self.seed, self.quant = cfg, seed, as_policy(quant)

    def load(self, name: str, streamed: set, device, dtype, disk: set = frozenset(), tier=None, slabs=None,
             memory: HostMemory | None = None) -> tuple[WanDiT, dict[int, object]]:
        """Every tensor is generated in every process, also those of streamed blocks another process writes into
        shared slabs: the generator's sequence, hence every weight, is then the same in all of them."""
        cfg, seed, policy = self.cfg, self.seed, self.quant
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
        return _assemble(cfg, made, streamed, device, dtype, policy, memory)


def _check_streamable(cfg, policy: QuantPolicy | None, streamed: set) -> None:
    if policy is not None and streamed & set(policy.pinned(cfg.num_layers)):
        raise ValueError(f"blocks {sorted(streamed & set(policy.pinned(cfg.num_layers)))} are stored whole "
                         "(another slab layout than the compressed blocks) and must stay resident")


def _assemble(cfg, tensors, streamed: set, device, dtype, policy: QuantPolicy | None = None,
              memory: HostMemory | None = None) -> tuple[WanDiT, dict[int, object]]:
    """Fill a meta skeleton (with the policy's QLinears) from (key, tensor) pairs: each tensor is converted to
    its parameter's dtype (8-bit weights and float32 scales keep theirs) and goes straight to its home.

    Streamed blocks get their slabs from `memory` first, in ascending block order, and their parameters become
    views into them; their tensors are copied in only if `memory.fills` (else another process writes them)."""
    memory = memory or HostMemory()
    model = quantized_model(cfg, dtype, policy).eval()
    _check_streamable(cfg, policy, streamed)
    views: dict[int, dict[str, torch.Tensor]] = {}
    sources: dict[int, object] = {}
    for i in sorted(streamed):
        layout = BlockLayout.of(model.blocks[i])
        slab = memory.slab(layout.nbytes)
        views[i] = layout.views(slab)
        _point_at(model.blocks[i], views[i])
        sources[i] = RamSource(slab)
    for key, t in tensors:
        module_name, _, pname = key.rpartition(".")
        module = model.get_submodule(module_name)
        parts = key.split(".")
        if parts[0] == "blocks" and int(parts[1]) in streamed:
            if memory.fills:
                views[int(parts[1])][".".join(parts[2:])].copy_(t)
            continue
        t = t.to(module._parameters[pname].dtype).to(device)
        module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    return model, sources


def _point_at(block: nn.Module, views: dict[str, torch.Tensor]) -> None:
    """Make the block's parameters the given views (of its slab)."""
    for pname, view in views.items():
        module_name, _, leaf = pname.rpartition(".")
        block.get_submodule(module_name)._parameters[leaf] = nn.Parameter(view, requires_grad=False)


def _read_streamed(model: WanDiT, locations: dict, blocks: list[int], reuse: list[torch.Tensor],
                   memory: HostMemory | None = None) -> dict:
    """Streamed blocks of `model` (a meta skeleton there) read from their safetensors byte ranges straight into
    pinned slabs, several blocks at a time in threads: no staging copy, no memory map. Slabs in `reuse` (the
    previous expert's, at a switch: same layout, already pinned) are filled before new ones are allocated.
    Nothing is read when `memory` does not fill its slabs (another process does)."""
    memory = memory or HostMemory()
    jobs, sources = [], {}
    for i in blocks:
        layout = BlockLayout.of(model.blocks[i])
        slab = reuse.pop() if reuse and reuse[-1].numel() == layout.nbytes else memory.slab(layout.nbytes)
        jobs.append((block_parts(layout, locations, f"blocks.{i}."), slab))
        _point_at(model.blocks[i], layout.views(slab))
        sources[i] = RamSource(slab)
    if memory.fills:
        read_blocks(jobs)
    return sources


def stream_layout(cfg: DiTConfig, dtype, policy: QuantPolicy | None) -> BlockLayout:
    """The slab layout of the streamed blocks (compressed ones when quantized)."""
    model = quantized_model(cfg, dtype, policy)
    streamable = policy.blocks(cfg.num_layers) if policy is not None else [0]
    return BlockLayout.of(model.blocks[streamable[0] if streamable else 0])
