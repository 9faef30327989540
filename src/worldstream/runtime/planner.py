"""The planner: from the model, the workload and the machine, decide what stays on the GPU and what streams.

`plan(config, workload, vram_budget, ram_budget, hardware)` returns a `Plan`: which blocks stay resident (spread
evenly), the prefetch depth (slots = prefetch + 1), whether CFG's cond/uncond run batched, which host tier each
streamed block comes from (pinned RAM or the user's safetensors shards on disk), and its predictions: peak VRAM,
peak host RAM, seconds per denoising step. A budget that cannot work raises `PlanError` saying what is needed.

Seconds per step come from simulating the schedule the engine runs (copy engine and compute stream as two
servers with the slot dependencies), with block compute time from the model's cost model and transfer time
from the measured pinned bandwidth. The constants below were measured on an H100 PCIe-Gen5 host
(BENCHMARKS.md); pass a `Hardware` measured on your machine for yours.

Several GPUs of one machine (`gpus`, Ulysses sequence parallelism: runtime/parallel.py): the plan is made for
one of them, each holding every weight (resident or streamed) and computing 1/gpus of the tokens, with two
all-to-alls per block (q/k/v in, the attention output back) at `Hardware.p2p_bw`; the KV cache is split by
heads. Host RAM is the machine's: the streamed blocks' slabs are held once (shared memory), each process adds
its own overhead and disk-tier ring.

The planner knows no model family. It asks the config (`StackModel`: models/configs.py for Wan) for the
block count, parameters per block and outside the blocks, tokens of a clip, FLOPs and elementwise bytes of one
block forward and the activation peak of a forward. A new family plans by giving its config these methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .memory import fmt_bytes
from .streaming import spread_resident


class StackModel(Protocol):
    """What the planner needs of a model: a stack of `num_layers` same-shaped blocks and its cost model."""
    name: str
    num_layers: int

    def param_counts(self) -> tuple[int, int]: ...                        # (per block, outside the blocks)
    def tokens(self, frames: int, height: int, width: int) -> int: ...
    def block_flops(self, tokens: int, batch: int, keys: int | None = None) -> tuple[float, float]: ...
    def block_elementwise_bytes(self, tokens: int, batch: int) -> float: ...
    def activation_bytes(self, tokens: int, batch: int, ffn_chunk: int | None = None,
                         block_chunk: int | None = None) -> float: ...


class PlanError(ValueError):
    pass


HEADROOM = 0.04   # fraction of the VRAM budget kept free for the allocator
FFN_CHUNK = 8192   # tokens per FFN chunk when the plan needs the memory (WanDiT.set_ffn_chunk)
BLOCK_CHUNK = 8192  # tokens per whole-block chunk when even that is not enough (WanDiT.set_block_chunk)
BLOCK_CHUNK_COST = 1.02   # its extra modulate pass and per-chunk image keys, as a share of the block's time


@dataclass(frozen=True)
class Hardware:
    name: str = "H100 80GB (PCIe Gen5)"
    pcie_bw: float = 53e9            # pinned host->device bytes/s
    disk_bw: float = 1.5e9           # sequential read bytes/s
    matmul_flops: float = 700e12     # bf16 GEMM at DiT shapes
    attn_flops: float = 500e12       # SDPA at DiT shapes
    hbm_bw: float = 2.6e12           # elementwise traffic
    block_overhead_s: float = 1e-3   # launches and small kernels per block
    vram_reserve: float = 0.8e9      # allocator slack, cuBLAS workspaces, compiled-kernel scratch
    host_overhead: float = 2.5e9     # process RSS before weights: torch, CUDA libraries
    # GPU-to-GPU all-to-all bus bandwidth per GPU (NVLink). NOT measured yet: an assumed figure for H100 / H200
    # NVLink 4 (450 GB/s per direction on paper, ~2/3 of it reached by NCCL all-to-all).
    p2p_bw: float = 300e9
    collective_latency_s: float = 30e-6


@dataclass(frozen=True)
class Workload:
    """One forward's work: a clip of `frames` video frames (a causal model: one chunk), its self-attention
    over `keys` tokens (None: the clip's own; a causal model: the KV cache's window), and `cache_bytes` of VRAM
    that lives beside the weights (the KV cache)."""
    frames: int = 81
    height: int = 480
    width: int = 832
    guidance: bool = True            # classifier-free guidance: cond + uncond per step
    experts: int = 1                 # 2 for Wan2.2 / LingBot (high + low noise)
    keys: int | None = None
    cache_bytes: float = 0.0


@dataclass
class Plan:
    n_blocks: int
    block_bytes: int
    resident: list[int]
    prefetch: int
    batched_guidance: bool           # CFG's cond + uncond as one batch-2 forward (else two forwards)
    ffn_chunk: int | None
    ram_blocks: list[int]
    disk_blocks: list[int]
    vram_peak: float
    ram_peak: float
    weights_in_ram: float
    step_seconds: float
    resident_step_seconds: float
    block_compute_s: float
    block_copy_s: float
    notes: list[str] = field(default_factory=list)
    block_chunk: int | None = None   # tokens per whole-block chunk (WanDiT.set_block_chunk), None: whole clip
    guided: bool = True              # the workload has CFG (two passes a step)
    gpus: int = 1                    # sequence-parallel processes (this plan is one GPU's)
    comm_s: float = 0.0              # all-to-all seconds per block (included in block_compute_s)
    tokens: int = 0                  # tokens of one forward, and this GPU's share of them
    local_tokens: int = 0
    process_ram: float = 0.0         # host RAM of one process before any weights
    shared_weights: float = 0.0      # streamed weights held once for every process (pinned RAM tier)

    @property
    def slots(self) -> int:
        return self.prefetch + 1 if self.streamed else 0

    @property
    def streamed(self) -> list[int]:
        return [i for i in range(self.n_blocks) if i not in set(self.resident)]

    def describe(self) -> str:
        lines = [
            f"blocks: {self.n_blocks} of {fmt_bytes(self.block_bytes)}; resident {len(self.resident)}"
            f" {self.resident if len(self.resident) < self.n_blocks else '(all)'}",
            f"streamed: {len(self.streamed)} blocks through {self.slots} GPU slots (prefetch depth {self.prefetch})",
            f"host tiers: {len(self.ram_blocks)} blocks pinned in RAM, {len(self.disk_blocks)} read from disk",
            ("CFG: " + ('cond+uncond batched in one forward' if self.batched_guidance else
                        'cond and uncond as two forwards') if self.guided else "no CFG: one forward a step")
            + (f"; FFN in chunks of {self.ffn_chunk} tokens" if self.ffn_chunk else "")
            + (f"; blocks in chunks of {self.block_chunk} tokens" if self.block_chunk else ""),
            f"block compute {self.block_compute_s * 1e3:.1f} ms vs copy {self.block_copy_s * 1e3:.1f} ms",
            f"predicted: {self.step_seconds:.2f} s/step (resident would be {self.resident_step_seconds:.2f} s),"
            f" peak VRAM {fmt_bytes(self.vram_peak)}, peak host RAM {fmt_bytes(self.ram_peak)}"
            f" ({fmt_bytes(self.weights_in_ram)} of it weights)",
        ]
        if self.gpus > 1:
            lines.insert(0, f"Ulysses over {self.gpus} GPUs: each computes {self.local_tokens} of the {self.tokens} "
                            f"tokens and holds every weight; all-to-all {self.comm_s * 1e3:.1f} ms per block "
                            f"(in the block time); the figures below are per GPU, host RAM is the machine's")
            lines.append(f"host RAM: {fmt_bytes(self.shared_weights)} of streamed weights held once in shared "
                         f"memory for all {self.gpus} processes, plus {fmt_bytes(self.process_ram)} per process")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


# ---- costs ---------------------------------------------------------------------------------------------------

def block_seconds(cfg: StackModel, tokens: int, batch: int, hw: Hardware, keys: int | None = None) -> float:
    """One block forward: matmuls and attention at their measured rates, elementwise traffic at HBM speed."""
    mm, attn = cfg.block_flops(tokens, batch, keys)
    elementwise = cfg.block_elementwise_bytes(tokens, batch)
    return mm / hw.matmul_flops + attn / hw.attn_flops + elementwise / hw.hbm_bw + hw.block_overhead_s


def comm_seconds(cfg, local_tokens: int, batch: int, gpus: int, hw: Hardware, bytes_per_value: float = 2.0
                 ) -> float:
    """One block's Ulysses all-to-alls on one GPU: q, k, v out and the attention output back, each sending
    (gpus - 1) / gpus of [batch, local_tokens, dim]."""
    if gpus <= 1:
        return 0.0
    sent = 4 * batch * local_tokens * cfg.dim * bytes_per_value * (gpus - 1) / gpus
    return sent / hw.p2p_bw + 2 * hw.collective_latency_s


# ---- the schedule ----------------------------------------------------------------------------------------------

def simulate(n_blocks: int, resident: set[int], prefetch: int, compute_s: float, copy_s: float,
             forwards: int = 3) -> float:
    """Seconds of the last of `forwards` back-to-back forwards under the engine's schedule.

    Two servers: the copy engine takes streamed blocks in execution order (wrapping into the next forward);
    copy j may start when copy j-1 is done and the block that used its slot (streamed item j - slots) has
    finished computing. Block b computes after block b-1 and, if streamed, after its copy."""
    slots = prefetch + 1
    copy_end: list[float] = []
    comp_end_streamed: list[float] = []
    t = 0.0
    starts = []
    for _ in range(forwards):
        starts.append(t)
        for b in range(n_blocks):
            if b in resident:
                t += compute_s
                continue
            j = len(copy_end)
            start = max(copy_end[-1] if copy_end else 0.0,
                        comp_end_streamed[j - slots] if j - slots >= 0 else 0.0)
            copy_end.append(start + copy_s)
            t = max(t, copy_end[j]) + compute_s
            comp_end_streamed.append(t)
    return t - starts[-1]


# ---- the plan ------------------------------------------------------------------------------------------------

def plan(cfg: StackModel, workload: Workload, vram_budget: float | None, ram_budget: float | None = None,
         hardware: Hardware | None = None, bytes_per_param: float = 2.0, max_prefetch: int = 4,
         block_bytes: int | None = None, pinned_resident: tuple[int, ...] = (), gpus: int = 1) -> Plan:
    """`block_bytes` overrides the streamed size of a block (compressed weights, runtime/quant.py);
    `pinned_resident` blocks must stay resident (e.g. uncompressed first/last blocks). `gpus`: plan one of
    that many GPUs sharing each forward by Ulysses sequence parallelism (`vram_budget` is per GPU,
    `ram_budget` the machine's)."""
    hw = hardware or Hardware()
    per_block, non_block = cfg.param_counts()
    block_bytes = block_bytes or int(per_block * bytes_per_param)
    n = cfg.num_layers
    gpus = max(1, int(gpus))
    L_all = cfg.tokens(workload.frames, workload.height, workload.width)
    L = -(-L_all // gpus)                           # this GPU's tokens
    keys = workload.keys if workload.keys is not None else (L_all if gpus > 1 else None)
    fixed = non_block * 2 + hw.vram_reserve + workload.cache_bytes / gpus    # the cache is split by heads
    budget = float("inf") if vram_budget is None else vram_budget * (1 - HEADROOM)

    options = [True, False] if workload.guidance else [False]
    best: Plan | None = None
    needs = []
    modes = [(None, None), (FFN_CHUNK, None)] + ([(None, BLOCK_CHUNK)] if L > BLOCK_CHUNK else [])
    for batched, (chunk, bchunk) in [(b, m) for b in options for m in modes]:
        batch = 2 if batched else 1
        forwards = 2 if (workload.guidance and not batched) else 1
        act = cfg.activation_bytes(L, batch, chunk, bchunk) if bchunk else cfg.activation_bytes(L, batch, chunk)
        comm = comm_seconds(cfg, L, batch, gpus, hw, bytes_per_param)
        if gpus > 1:   # all-to-all send / receive buffers of q, k, v and the output
            act += 8 * batch * L * cfg.dim * bytes_per_param
        comp = block_seconds(cfg, L, batch, hw, keys) * (BLOCK_CHUNK_COST if bchunk else 1.0) + comm
        copy = block_bytes / hw.pcie_bw
        resident_step = forwards * n * comp
        for prefetch in range(1, max_prefetch + 1):
            slots = prefetch + 1
            room = budget - fixed - act - slots * block_bytes - len(pinned_resident) * per_block * 2
            if room < 0:
                needs.append(fixed + act + slots * block_bytes + len(pinned_resident) * per_block * 2)
                continue
            r_max = n if room >= n * block_bytes else int(room // block_bytes) + len(pinned_resident)

            def schedule(r):
                res = sorted(set(spread_resident(n, r - len(pinned_resident))) | set(pinned_resident))
                return res, (resident_step if len(res) == n else
                             forwards * simulate(n, set(res), prefetch, comp, copy))
            # The fewest resident blocks that reach (within 1%) the best time: VRAM left free is headroom
            # for the allocator; filling the card with blocks that cannot speed anything up only costs.
            # (When every block fits, nothing streams: no bus traffic at all.)
            _, fastest = schedule(r_max)
            r = r_max if r_max >= n else next(
                r for r in range(len(pinned_resident), r_max + 1) if schedule(r)[1] <= fastest * 1.01)
            resident, step = schedule(r)
            stream = len(resident) < n
            vram = fixed + act + (len(resident) + (slots if stream else 0)) * block_bytes
            cand = Plan(n, block_bytes, resident, prefetch, batched, chunk, [], [], vram, 0.0, 0.0, step,
                        resident_step, comp, copy, block_chunk=bchunk, guided=workload.guidance, gpus=gpus,
                        comm_s=comm, tokens=L_all, local_tokens=L, process_ram=hw.host_overhead)
            _assign_host_tiers(cand, cfg, workload, ram_budget, hw)   # a disk-bound plan may lose its lead
            step = cand.step_seconds
            if best is None or step < best.step_seconds * 0.995 or (
                    step <= best.step_seconds * 1.005 and vram < best.vram_peak):
                best = cand
            if not stream:
                break
    if best is None:
        least = (cfg.activation_bytes(L, 1, None, BLOCK_CHUNK) if L > BLOCK_CHUNK
                 else cfg.activation_bytes(L, 1, FFN_CHUNK))
        pinned = (f", {len(pinned_resident)} whole (uncompressed) blocks that must stay resident "
                  f"{fmt_bytes(len(pinned_resident) * per_block * 2)}" if pinned_resident else "")
        raise PlanError(
            f"{cfg.name} at {workload.frames} frames {workload.width}x{workload.height} needs at least "
            f"{fmt_bytes(min(needs) / (1 - HEADROOM))} of VRAM (non-block weights {fmt_bytes(non_block * 2)}, "
            f"activations {fmt_bytes(least)}, two block slots {fmt_bytes(2 * block_bytes)}{pinned}); the budget "
            f"is {fmt_bytes(vram_budget)}. Use fewer frames, a smaller size, or compressed weights"
            + (" for every block (`convert --no_skip_first_last`)" if pinned_resident else "")
            + (f" (per GPU, with {L} of the {L_all} tokens on each of {gpus} GPUs)." if gpus > 1 else "."))

    return best


def _assign_host_tiers(p: Plan, cfg: StackModel, workload: Workload, ram_budget: float | None,
                       hw: Hardware) -> None:
    streamed = p.streamed
    g = p.gpus          # processes on the machine: the streamed weights once (shared), the rest per process
    ram_for_weights = float("inf") if ram_budget is None else ram_budget - g * hw.host_overhead
    ring = 0
    if len(streamed) * p.block_bytes <= ram_for_weights:
        p.ram_blocks = streamed
    else:
        ring = g * (p.prefetch + 2) * p.block_bytes
        fit = max(0, int((ram_for_weights - ring) // p.block_bytes))
        if ram_budget is not None and ram_for_weights - ring < 0:
            raise PlanError(f"host RAM budget {fmt_bytes(ram_budget)} cannot hold even the disk tier's read ring "
                            f"({fmt_bytes(ring)}) plus the process{'es' if g > 1 else ''} "
                            f"({fmt_bytes(g * hw.host_overhead)})")
        keep = set(spread_resident(len(streamed), fit))
        p.ram_blocks = [b for k, b in enumerate(streamed) if k in keep]
        p.disk_blocks = [b for k, b in enumerate(streamed) if k not in keep]
        disk_s = p.block_bytes / hw.disk_bw
        forwards = 1 if (p.batched_guidance or not workload.guidance) else 2
        disk_step = forwards * len(p.disk_blocks) * disk_s
        if disk_step > p.step_seconds:
            p.step_seconds = disk_step
            p.notes.append(f"disk-bound: {len(p.disk_blocks)} blocks per forward read at "
                           f"{hw.disk_bw / 1e9:.1f} GB/s; more RAM or compressed weights would help")
    p.shared_weights = len(p.ram_blocks) * p.block_bytes if g > 1 else 0.0
    p.weights_in_ram = len(p.ram_blocks) * p.block_bytes + ring
    p.ram_peak = p.weights_in_ram + g * hw.host_overhead
    if g > 1 and p.disk_blocks:
        p.notes.append(f"each of the {g} processes reads the disk-tier blocks itself (the page cache serves "
                       "the later readers)")
    if workload.experts == 2:
        p.notes.append("two experts: only the active expert is held close to the GPU; the other waits on disk")
