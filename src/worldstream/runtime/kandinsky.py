"""Kandinsky 5's transformer into its homes under a plan, its `visual_transformer_blocks` streamed by the engine.

The transformer is diffusers' `Kandinsky5Transformer3DModel`, built on `meta` and filled one tensor at a time
from the checkpoint's validated shards (checkpoints/kandinsky.py): the streamed visual blocks straight into
pinned slabs (runtime/slab.py), everything else (text blocks, embeddings, RoPE tables, head, resident blocks) to
the device. diffusers' `_keep_in_fp32_modules` (time embeddings, every modulation) stay float32, the rest takes
the run's dtype, as `from_pretrained(torch_dtype=...)` would do. Then `place` (runtime/streaming.py) attaches
the stack to the engine: the same door as the Wan DiT's blocks and the umT5 encoder's.

Compressed weights (`--quant fp8|fp8-block|int8`, a checkpoints/compressed.py QuantPolicy): the linears of the
policy's visual blocks become QLinears (models/quant.py) on `meta` and their weights are quantized one tensor at
a time as they are read, before they reach their slab or the device; each block's float32 `visual_modulation`
stays as it is (`KandinskyConfig.quant_skip`), and so does everything outside the visual blocks. With
`skip_first_last` (the default) the first and last blocks stay whole and therefore resident.

Blocks the RAM budget cannot hold (the plan's `disk_blocks`) are not read at load time: the disk tier
(runtime/disk.py) reads their byte ranges from the transformer's safetensors shards on every step, converting
the stored dtype on the way, as for the Wan DiT. It streams the stored bytes, so it cannot serve blocks
compressed while loading.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from ..checkpoints.compressed import QuantPolicy, as_policy, quantize_stream
from ..checkpoints.kandinsky import KandinskyCheckpoint, transformer_locations
from ..checkpoints.tensors import iter_tensors
from ..models.kandinsky import FP32_MODULES, KandinskyConfig
from ..models.quant import quantize_block_
from .disk import DiskTier, placeholder
from .memory import HostMemory
from .planner import Plan, PlanError, Workload
from .slab import BlockLayout
from .streaming import RamSource, StreamEngine, Streamed, place


def keeps_fp32(key: str) -> bool:
    """diffusers' rule for `_keep_in_fp32_modules`: a module name among the key's dotted parts."""
    parts = key.split(".")
    return any(m in parts for m in FP32_MODULES)


def skeleton(cfg: KandinskyConfig):
    """The transformer on `meta`, with its small computed tables (RoPE, time frequencies) real, on the CPU."""
    from diffusers import Kandinsky5Transformer3DModel
    from diffusers.models.transformers import transformer_kandinsky as tk

    with torch.device("meta"):
        model = Kandinsky5Transformer3DModel(**cfg.diffusers_config())
    model.text_rope_embeddings = tk.Kandinsky5RoPE1D(cfg.head_dim)
    model.visual_rope_embeddings = tk.Kandinsky5RoPE3D(tuple(cfg.axes_dims))
    model.time_embeddings.freqs = tk.get_freqs(cfg.model_dim // 2, model.time_embeddings.max_period)
    return model.eval().requires_grad_(False)


def quantized_keys(cfg: KandinskyConfig, policy: QuantPolicy, model: nn.Module) -> set[str]:
    """Checkpoint keys `visual_transformer_blocks.{i}.{linear}.weight` that `policy` stores in 8 bits."""
    names = [n for n, m in model.visual_transformer_blocks[0].named_modules() if type(m) is nn.Linear
             and not any(pattern in n for pattern in quant_skip(cfg, policy))]
    return {f"visual_transformer_blocks.{i}.{n}.weight" for i in policy.blocks(cfg.num_layers) for n in names}


def quant_skip(cfg: KandinskyConfig, policy: QuantPolicy) -> tuple[str, ...]:
    return tuple(cfg.quant_skip) + tuple(policy.skip)


def load_transformer(ckpt: KandinskyCheckpoint, device, dtype: torch.dtype, streamed: set = frozenset(),
                     memory: HostMemory | None = None, tensors=None,
                     quant: QuantPolicy | str | None = None, disk: set = frozenset(),
                     tier: DiskTier | None = None) -> tuple[nn.Module, dict[int, object]]:
    """(transformer, block -> RamSource / DiskSource of each streamed visual block). `tensors`: (key, tensor)
    pairs to use instead of the checkpoint's files (random weights for benchmarks). `quant`: compress the linears
    of the policy's visual blocks while loading (their modulation stays float32). `disk`: streamed blocks left
    in the shards, read by `tier` on every forward (nothing of them is read now)."""
    cfg = ckpt.config
    policy = as_policy(quant)
    disk = set(disk)
    if disk - set(streamed):
        raise ValueError(f"disk-tier blocks {sorted(disk - set(streamed))} must be streamed ones")
    if disk and (policy is not None or tensors is not None or tier is None):
        why = (f"--quant {policy.fmt} compresses while loading and the disk tier streams the stored bytes"
               if policy is not None else "random weights have no files to read from" if tensors is not None
               else "no disk tier was given")
        raise PlanError(f"--ram holds {len(set(streamed) - disk)} of the {len(set(streamed))} streamed Kandinsky "
                        f"blocks and the rest cannot come from disk ({why}): raise --ram")
    memory = memory or HostMemory()
    model = skeleton(cfg)
    blocks = model.visual_transformer_blocks
    for name, p in list(model.named_parameters()):      # the run's dtypes, still on meta
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(
            torch.empty(p.shape, dtype=torch.float32 if keeps_fp32(name) else dtype, device="meta"),
            requires_grad=False)
    if policy is not None:
        pinned = set(policy.pinned(cfg.num_layers)) & set(streamed)
        if pinned:
            raise PlanError(f"Kandinsky blocks {sorted(pinned)} stay whole under --quant {policy.fmt} (another "
                            "slab layout than the compressed blocks) and must be resident")
        keys = quantized_keys(cfg, policy, model)
        for i in policy.blocks(cfg.num_layers):          # QLinears (compute dtype: the run's) on meta
            quantize_block_(blocks[i], policy.fmt, quant_skip(cfg, policy))
    views: dict[int, dict[str, torch.Tensor]] = {}
    sources: dict[int, RamSource] = {}
    for i in sorted(set(streamed) - disk):
        layout = BlockLayout.of(blocks[i])
        slab = memory.slab(layout.nbytes)
        views[i] = layout.views(slab)
        for pname, view in views[i].items():
            module_name, _, leaf = pname.rpartition(".")
            blocks[i].get_submodule(module_name)._parameters[leaf] = nn.Parameter(view, requires_grad=False)
        sources[i] = RamSource(slab)
    prefix = "visual_transformer_blocks."
    if tensors is None:
        locations = transformer_locations(ckpt)          # validated
        read = {k: v for k, v in locations.items()
                if not (k.startswith(prefix) and int(k[len(prefix):].split(".", 1)[0]) in disk)}
        tensors = iter_tensors(read, None, "cpu")         # one at a time
        for i in sorted(disk):                            # byte ranges in the shards, read every forward
            sources[i] = tier.source(locations, f"{prefix}{i}.")
            for mod in blocks[i].modules():
                for pname, p in list(mod._parameters.items()):
                    if p is not None:
                        mod._parameters[pname] = nn.Parameter(placeholder(p.shape, p.dtype), requires_grad=False)
    if policy is not None:                               # from the stored precision, one tensor at a time
        tensors = quantize_stream(tensors, keys, policy.fmt)
    for key, t in tensors:
        if key.startswith(prefix):
            i, rest = key[len(prefix):].split(".", 1)
            if int(i) in streamed:
                views[int(i)][rest].copy_(t)
                continue
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name)
        target = module._parameters[leaf].dtype
        module._parameters[leaf] = nn.Parameter(t.to(device=device, dtype=target), requires_grad=False)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    assert not left, f"not loaded: {left[:3]}"
    return model, sources


@dataclass
class PlacedTransformer:
    model: nn.Module
    engine: StreamEngine | None
    handle: Streamed | None
    plan: Plan | None
    sources: dict
    tier: DiskTier | None = None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.release()
            if self.handle is not None:
                self.engine.detach(self.handle)
        if self.tier is not None:
            self.tier.close()
            self.tier = None
        self.model.to("meta")
        self.sources.clear()


def place_transformer(ckpt: KandinskyCheckpoint, device, dtype: torch.dtype, workload: Workload,
                      vram: float | None = None, ram: float | None = None, resident: list[int] | None = None,
                      prefetch: int = 1, plan_: Plan | None = None, tensors=None, disk: list[int] = (),
                      quant: QuantPolicy | str | None = None) -> PlacedTransformer:
    """Plan (on a GPU: budgets as `generate` takes them), load and place the transformer. `resident` /
    `prefetch` (and `disk`: streamed blocks read from the shards) force a placement instead (tests: streaming
    on the CPU); `plan_` gives one. `quant`: a format name or a QuantPolicy (visual-block linears compressed
    while loading; the plan prices their compressed bytes)."""
    from .runner import default_ram, plan_run

    device = torch.device(device)
    cfg = ckpt.config
    n = cfg.num_layers
    policy = as_policy(quant)
    if resident is None and plan_ is None and device.type == "cuda":
        budget = vram if vram is not None else torch.cuda.mem_get_info(device)[0]
        plan_ = plan_run(cfg, replace(workload, experts=1), budget, ram if ram is not None else default_ram(),
                         dtype, policy)
    if plan_ is not None:
        resident, prefetch, disk = list(plan_.resident), plan_.prefetch, list(plan_.disk_blocks)
    resident = list(range(n)) if resident is None else resident
    streamed = set(range(n)) - set(resident)
    tier = None
    if disk and policy is None and tensors is None:
        with torch.device("meta"):
            layout = BlockLayout.of(cfg.block_module(dtype))     # the streamed blocks' slab layout
        tier = DiskTier(layout, ring=prefetch + 2)
    try:
        model, sources = load_transformer(ckpt, device, dtype, streamed, tensors=tensors, quant=policy,
                                          disk=set(disk), tier=tier)
        engine, handle = place(model, model.visual_transformer_blocks, device, sources, resident, prefetch,
                               name=cfg.name)
    except BaseException:
        if tier is not None:
            tier.close()
        raise
    return PlacedTransformer(model, engine, handle, plan_, sources, tier)
