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
                     quant: QuantPolicy | str | None = None) -> tuple[nn.Module, dict[int, RamSource]]:
    """(transformer, block -> RamSource of each streamed visual block). `tensors`: (key, tensor) pairs to use
    instead of the checkpoint's files (random weights for benchmarks). `quant`: compress the linears of the
    policy's visual blocks while loading (their modulation stays float32)."""
    cfg = ckpt.config
    policy = as_policy(quant)
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
    for i in sorted(streamed):
        layout = BlockLayout.of(blocks[i])
        slab = memory.slab(layout.nbytes)
        views[i] = layout.views(slab)
        for pname, view in views[i].items():
            module_name, _, leaf = pname.rpartition(".")
            blocks[i].get_submodule(module_name)._parameters[leaf] = nn.Parameter(view, requires_grad=False)
        sources[i] = RamSource(slab)
    if tensors is None:
        tensors = iter_tensors(transformer_locations(ckpt), None, "cpu")   # validated, read one at a time
    if policy is not None:                               # from the stored precision, one tensor at a time
        tensors = quantize_stream(tensors, keys, policy.fmt)
    prefix = "visual_transformer_blocks."
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

    def close(self) -> None:
        if self.engine is not None:
            self.engine.release()
            if self.handle is not None:
                self.engine.detach(self.handle)
        self.model.to("meta")
        self.sources.clear()


def place_transformer(ckpt: KandinskyCheckpoint, device, dtype: torch.dtype, workload: Workload,
                      vram: float | None = None, ram: float | None = None, resident: list[int] | None = None,
                      prefetch: int = 1, plan_: Plan | None = None, tensors=None,
                      quant: QuantPolicy | str | None = None) -> PlacedTransformer:
    """Plan (on a GPU: budgets as `generate` takes them), load and place the transformer. `resident` /
    `prefetch` force a placement instead (tests: streaming on the CPU). `quant`: a format name or a
    QuantPolicy (visual-block linears compressed while loading; the plan prices their compressed bytes)."""
    from .runner import default_ram, plan_run

    device = torch.device(device)
    cfg = ckpt.config
    n = cfg.num_layers
    policy = as_policy(quant)
    if resident is None and plan_ is None and device.type == "cuda":
        budget = vram if vram is not None else torch.cuda.mem_get_info(device)[0]
        plan_ = plan_run(cfg, replace(workload, experts=1), budget, ram if ram is not None else default_ram(),
                         dtype, policy)
        if plan_.disk_blocks:
            raise PlanError(f"--ram holds {len(plan_.ram_blocks)} of the {len(plan_.streamed)} streamed Kandinsky "
                            "blocks; the disk tier is not wired for this family yet: raise --ram")
    if plan_ is not None:
        resident, prefetch = list(plan_.resident), plan_.prefetch
    resident = list(range(n)) if resident is None else resident
    streamed = set(range(n)) - set(resident)
    model, sources = load_transformer(ckpt, device, dtype, streamed, tensors=tensors, quant=policy)
    engine, handle = place(model, model.visual_transformer_blocks, device, sources, resident, prefetch,
                           name=cfg.name)
    return PlacedTransformer(model, engine, handle, plan_, sources)
