"""The planner: from the model, the workload and the machine, decide what stays on the GPU and what streams.

`plan(config, workload, vram_budget, ram_budget, hardware)` returns a `Plan`: which blocks stay resident (spread
evenly), the prefetch depth (slots = prefetch + 1), whether CFG's cond/uncond run batched, which host tier each
streamed block comes from (pinned RAM or the user's safetensors shards on disk), and its predictions: peak VRAM,
peak host RAM, seconds per denoising step. A budget that cannot work raises `PlanError` saying what is needed.

Seconds per step come from simulating the schedule the engine runs (copy engine and compute stream as two
servers with the slot dependencies), with block compute time from the model's cost model and transfer time
from the measured pinned bandwidth. The constants below were measured on an H100 PCIe-Gen5 host
(BENCHMARKS.md); pass a `Hardware` measured on your machine for yours.

What runs is what is priced: blocks whose linears are fp8 (`fp8_blocks`: compressed "fp8" blocks on a GPU with
fp8 tensor cores) run those matmuls at `fp8_matmul_flops` and pay the per-token activation quantization, while
the camera layers and the bf16 blocks kept whole run at bf16 speed; other 8-bit formats are dequantized to
bf16 (one more pass over the weight). Asked for 8-bit attention, the plan takes it only where the model predicts
it faster than SDPA (it quantizes Q, K and V first, which does not pay at short lengths: at 9 frames it loses),
and says which it chose (`Plan.attention`). When the plain block's activations do not fit, the plan runs the
low-memory block (`Plan.chunk`: models/dit.py `set_chunk`) at a small price per chunk.

Several GPUs of one machine (`gpus`, Ulysses sequence parallelism: runtime/parallel.py): the plan is made for
one of them, each holding every weight (resident or streamed) and computing 1/gpus of the tokens, with two
all-to-alls per block (q/k/v in, the attention output back) at `Hardware.p2p_bw`; the KV cache is split by
heads. Host RAM is the machine's: the streamed blocks' slabs are held once (shared memory), each process adds
its own overhead and disk-tier ring. The low-memory block is
not combined with several GPUs (each already holds 1/gpus of the activations).

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
    def block_work(self, tokens: int, batch: int, keys: int | None = None): ...   # models.configs.BlockWork
    def activation_bytes(self, tokens: int, batch: int, chunk: int | None = None, attention: str = "sdpa",
                         fp8: bool = False, keep_tokens: bool = False) -> float: ...
    def step_cache_bytes(self, tokens: int, batch: int) -> float: ...
    # Optional (defaults in `weights`, `capabilities`): weight_bytes(bytes_per_param) -> (block bytes, bytes
    # outside the blocks) when some weights keep another dtype (Kandinsky's float32 modulation);
    # `batched_guidance` False when cond and uncond cannot share one forward; `low_memory_block` False when the
    # model has no chunked block (WanDiT.set_chunk).


def weights(cfg: StackModel, bytes_per_param: float) -> tuple[int, int]:
    """(bytes of one block, bytes outside the blocks) of `cfg` stored at `bytes_per_param`."""
    if hasattr(cfg, "weight_bytes"):
        return cfg.weight_bytes(bytes_per_param)
    per_block, outside = cfg.param_counts()
    return int(per_block * bytes_per_param), int(outside * bytes_per_param)


def capabilities(cfg: StackModel) -> tuple[bool, bool]:
    """(cond + uncond can run as one batch-2 forward, the low-memory block exists)."""
    return getattr(cfg, "batched_guidance", True), getattr(cfg, "low_memory_block", True)


class PlanError(ValueError):
    pass


HEADROOM = 0.04   # fraction of the VRAM budget kept free for the allocator
SEQ_CHUNKS = (8192, 4096)   # tokens per chunk of the low-memory block (WanDiT.set_chunk), when the plan needs
                            # the memory: the larger (fewer, larger GEMMs) where it fits
SEQ_CHUNK = SEQ_CHUNKS[-1]


@dataclass(frozen=True)
class Hardware:
    """A GPU machine as the planner prices it. The defaults are an H100 80GB HBM3 on PCIe Gen5, calibrated on the
    runs in BENCHMARKS.md (an H200 measured the same step times there: its extra memory bandwidth only touches
    the elementwise share). The fp8 and 8-bit attention constants were fitted to the resident fp8 steps of
    benchmarks/results/offload_quant.json (run D) and checked on every fp8 row of the offload results
    (tests/test_planner_calibration.py)."""
    name: str = "H100 80GB (PCIe Gen5)"
    pcie_bw: float = 53e9            # pinned host->device bytes/s
    disk_bw: float = 1.5e9           # sequential read bytes/s
    matmul_flops: float = 700e12     # bf16 GEMM at DiT shapes
    attn_flops: float = 500e12       # SDPA at DiT shapes
    hbm_bw: float = 2.6e12           # elementwise traffic
    block_overhead_s: float = 1e-3   # launches and small kernels per block
    fp8: bool = True                 # fp8 tensor cores (Ada / Hopper): fp8 matmuls and the 8-bit attention kernel
    fp8_matmul_flops: float = 1100e12  # fp8 x fp8 GEMM (torch._scaled_mm, fast accumulation) at DiT shapes
    fp8_quant_bytes: float = 3.0     # traffic per activation element quantized per token for an fp8 matmul
    attn8_flops: float = 625e12      # the 8-bit attention kernel (runtime/attention8.py), on the same scale as
                                     # attn_flops (measured 698 vs 577 TFLOPS for SDPA at 81 frames)
    attn8_quant_bytes: float = 5.5   # traffic per q / k / v element it quantizes first (2.1 ms at 81 frames)
    attn8_overhead_s: float = 0.26e-3  # per call: its quantize kernels and K's mean (why it loses at 9 frames)
    chunk_overhead_s: float = 3.6e-3  # per chunk of the low-memory block (per sample). Measured on the H200
                                      # (2026-12-02): 3.8 ms (fp8 + 8-bit attention, one sample) and 7.8 ms
                                      # (bf16, CFG batched) at 81 frames; 0.2 ms was a guess. Not understood
                                      # yet (benchmarks/chunked_block_profile.py): the lower figure, which
                                      # already makes the planner prefer two plain forwards at 8 GB
    vram_reserve: float = 0.8e9      # allocator slack, cuBLAS workspaces, compiled-kernel scratch
    host_overhead: float = 3.0e9     # process RSS besides the weights: torch, CUDA libraries (2.72 GB measured
                                     # in seed 002 on the H200, torch 2.11 + CUDA 13; 2.5 GB was under)
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
    step_cache: bool = False         # step caching keeps the stack's residual between steps (and its input)


@dataclass
class Plan:
    n_blocks: int
    block_bytes: int
    resident: list[int]
    prefetch: int
    batched_guidance: bool           # CFG's cond + uncond as one batch-2 forward (else two forwards)
    chunk: int | None                # tokens per chunk of the low-memory block (None: the plain block)
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
    attention: str = "sdpa"          # the self-attention kernel the plan runs
    fp8_blocks: tuple[int, ...] = ()  # blocks whose linears run fp8 matmuls
    step_cache_bytes: float = 0.0    # VRAM the step cache keeps between steps (in vram_peak)
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
            ("CFG: " + ("cond+uncond batched in one forward" if self.batched_guidance
                        else "cond and uncond as two forwards") if self.guided else "no CFG: one forward a step")
            + (f"; low-memory blocks in chunks of {self.chunk} tokens" if self.chunk else ""),
            f"compute: {'fp8' if self.fp8_blocks else 'bf16'} matmuls"
            + (f" in {len(self.fp8_blocks)} blocks (the others bf16)" if 0 < len(self.fp8_blocks) < self.n_blocks
               else "") + f", {'8-bit' if self.attention == '8bit' else 'SDPA'} self-attention"
            + (f"; step cache {fmt_bytes(self.step_cache_bytes)}" if self.step_cache_bytes else ""),
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

def block_seconds(cfg: StackModel, tokens: int, batch: int, hw: Hardware, keys: int | None = None,
                  fp8: bool = False, attention: str = "sdpa", chunk: int | None = None,
                  dequantize: bool = False) -> float:
    """One block forward: matmuls and attention at their rates (fp8 linears, 8-bit self-attention where told),
    elementwise traffic at HBM speed, a fixed overhead, and the low-memory block's price per chunk (its second
    pass over the modulated input for the queries, K / V copied into place, the launches of each chunk)."""
    w = cfg.block_work(tokens, batch, keys)
    t = w.camera_flops / hw.matmul_flops + w.cross_attn_flops / hw.attn_flops
    t += w.elementwise_bytes / hw.hbm_bw + hw.block_overhead_s
    if fp8:
        t += w.linear_flops / hw.fp8_matmul_flops + w.act_quant_elems * hw.fp8_quant_bytes / hw.hbm_bw
    else:
        t += w.linear_flops / hw.matmul_flops
        if dequantize:   # the 8-bit weight rebuilt in bf16 per call: read 1 byte, write 2, per parameter
            per_block, _ = cfg.param_counts()
            t += 3 * per_block / hw.hbm_bw
    if attention == "8bit":
        t += _attn8_seconds(w, hw)
    else:
        t += w.self_attn_flops / hw.attn_flops
    if chunk is not None:
        n_chunks = batch * -(-tokens // chunk)
        t += n_chunks * hw.chunk_overhead_s + w.chunk_bytes / hw.hbm_bw
    return t


def attention_for(cfg: StackModel, tokens: int, batch: int, hw: Hardware, keys: int | None = None,
                  asked: str = "sdpa") -> str:
    """The self-attention kernel to run: "8bit" when it was asked for, the GPU has fp8 tensor cores and the
    model predicts it faster than SDPA at this length (its quantization of Q, K, V is paid once per call, the
    tensor-core speed-up grows with the length); else "sdpa"."""
    if asked != "8bit" or not hw.fp8:
        return "sdpa"
    w = cfg.block_work(tokens, batch, keys)
    return "8bit" if _attn8_seconds(w, hw) < w.self_attn_flops / hw.attn_flops else "sdpa"


def _attn8_seconds(w, hw: Hardware) -> float:
    return w.self_attn_flops / hw.attn8_flops + w.qkv_elems * hw.attn8_quant_bytes / hw.hbm_bw + hw.attn8_overhead_s


def block_times(cfg: StackModel, tokens: int, batch: int, hw: Hardware, keys: int | None, fp8_blocks,
                dequantized_blocks, attention: str, chunk: int | None) -> list[float]:
    """`block_seconds` of every block of the stack (fp8 blocks and the others differ)."""
    return [block_seconds(cfg, tokens, batch, hw, keys, fp8=i in fp8_blocks, attention=attention, chunk=chunk,
                          dequantize=i in dequantized_blocks) for i in range(cfg.num_layers)]


def step_seconds(cfg: StackModel, workload: Workload, hardware: Hardware, *, batched: bool, resident, prefetch: int,
                 block_bytes: int, fp8_blocks=(), attention: str = "sdpa", chunk: int | None = None) -> float:
    """The predicted seconds of one denoising step under a given placement (what `plan` computes for each
    candidate; also how a measured configuration is checked against the model: tests/test_planner_calibration.py).
    `attention` as asked ("8bit": where it is faster)."""
    L = cfg.tokens(workload.frames, workload.height, workload.width)
    batch = 2 if batched and workload.guidance else 1
    forwards = 2 if (workload.guidance and not batched) else 1
    fp8_set = set(fp8_blocks) if hardware.fp8 else set()
    kernel = attention_for(cfg, L, batch, hardware, workload.keys, attention)
    times = block_times(cfg, L, batch, hardware, workload.keys, fp8_set, set(fp8_blocks) - fp8_set, kernel, chunk)
    if len(set(resident)) == cfg.num_layers:
        return forwards * sum(times)
    return forwards * simulate(cfg.num_layers, set(resident), prefetch, times, block_bytes / hardware.pcie_bw)


def comm_seconds(cfg, local_tokens: int, batch: int, gpus: int, hw: Hardware, bytes_per_value: float = 2.0
                 ) -> float:
    """One block's Ulysses all-to-alls on one GPU: q, k, v out and the attention output back, each sending
    (gpus - 1) / gpus of [batch, local_tokens, dim]."""
    if gpus <= 1:
        return 0.0
    sent = 4 * batch * local_tokens * cfg.dim * bytes_per_value * (gpus - 1) / gpus
    return sent / hw.p2p_bw + 2 * hw.collective_latency_s


# ---- the schedule ----------------------------------------------------------------------------------------------

def simulate(n_blocks: int, resident: set[int], prefetch: int, compute_s, copy_s: float,
             forwards: int = 3) -> float:
    """Seconds of the last of `forwards` back-to-back forwards under the engine's schedule.

    Two servers: the copy engine takes streamed blocks in execution order (wrapping into the next forward);
    copy j may start when copy j-1 is done and the block that used its slot (streamed item j - slots) has
    finished computing. Block b computes after block b-1 and, if streamed, after its copy. `compute_s`: one
    time for every block, or a list of one per block."""
    times = list(compute_s) if isinstance(compute_s, (list, tuple)) else [compute_s] * n_blocks
    slots = prefetch + 1
    copy_end: list[float] = []
    comp_end_streamed: list[float] = []
    t = 0.0
    starts = []
    for _ in range(forwards):
        starts.append(t)
        for b in range(n_blocks):
            if b in resident:
                t += times[b]
                continue
            j = len(copy_end)
            start = max(copy_end[-1] if copy_end else 0.0,
                        comp_end_streamed[j - slots] if j - slots >= 0 else 0.0)
            copy_end.append(start + copy_s)
            t = max(t, copy_end[j]) + times[b]
            comp_end_streamed.append(t)
    return t - starts[-1]


# ---- the plan ------------------------------------------------------------------------------------------------

def plan(cfg: StackModel, workload: Workload, vram_budget: float | None, ram_budget: float | None = None,
         hardware: Hardware | None = None, bytes_per_param: float = 2.0, max_prefetch: int = 4,
         block_bytes: int | None = None, pinned_resident: tuple[int, ...] = (), fp8_blocks: tuple[int, ...] = (),
         dequantized_blocks: tuple[int, ...] = (), attention: str = "sdpa", gpus: int = 1) -> Plan:
    """`block_bytes` overrides the streamed size of a block (compressed weights, runtime/quant.py);
    `pinned_resident` blocks must stay resident (e.g. uncompressed first/last blocks); `fp8_blocks` run fp8
    matmuls, `dequantized_blocks` rebuild bf16 weights per call (other 8-bit formats, or no fp8 tensor cores);
    `attention` "8bit" allows the 8-bit self-attention where it is faster. `gpus`: plan one of that many GPUs
    sharing each forward by Ulysses sequence parallelism (`vram_budget` is per GPU, `ram_budget` the
    machine's)."""
    hw = hardware or Hardware()
    per_block, non_block = cfg.param_counts()
    block_bytes = block_bytes or weights(cfg, bytes_per_param)[0]
    outside_bytes = weights(cfg, 2.0)[1]
    can_batch, can_chunk = capabilities(cfg)
    n = cfg.num_layers
    gpus = max(1, int(gpus))
    L_all = cfg.tokens(workload.frames, workload.height, workload.width)
    L = -(-L_all // gpus)                           # this GPU's tokens
    keys = workload.keys if workload.keys is not None else (L_all if gpus > 1 else None)
    fp8_set = set(fp8_blocks) if hw.fp8 else set()
    deq_set = set(dequantized_blocks) | (set(fp8_blocks) - fp8_set)
    fixed = outside_bytes + hw.vram_reserve + workload.cache_bytes / gpus    # the cache is split by heads
    budget = float("inf") if vram_budget is None else vram_budget * (1 - HEADROOM)

    options = ([True, False] if can_batch else [False]) if workload.guidance else [False]
    best: Plan | None = None
    needs = []
    chunks = (None,) if gpus > 1 or not can_chunk else (None, *SEQ_CHUNKS)   # (the low-memory block runs on one GPU only)
    for batched, chunk in [(b, c) for b in options for c in chunks]:
        batch = 2 if batched else 1
        forwards = 2 if (workload.guidance and not batched) else 1
        kernel = attention_for(cfg, L, batch, hw, keys, attention)
        act = cfg.activation_bytes(L, batch, chunk, kernel, bool(fp8_set), workload.step_cache)
        if gpus > 1:   # all-to-all send / receive buffers of q, k, v and the output
            act += 8 * batch * L * cfg.dim * bytes_per_param
        cache = cfg.step_cache_bytes(L, 2 if workload.guidance else 1) if workload.step_cache else 0.0
        comm = comm_seconds(cfg, L, batch, gpus, hw, bytes_per_param)
        times = [t + comm for t in block_times(cfg, L, batch, hw, keys, fp8_set, deq_set, kernel, chunk)]
        comp = sum(times) / n
        copy = block_bytes / hw.pcie_bw
        resident_step = forwards * sum(times)
        for prefetch in range(1, max_prefetch + 1):
            slots = prefetch + 1
            pinned_bytes = len(pinned_resident) * per_block * 2
            room = budget - fixed - cache - act - slots * block_bytes - pinned_bytes
            if room < 0:
                needs.append(fixed + cache + act + slots * block_bytes + pinned_bytes)
                continue
            r_max = n if room >= n * block_bytes else int(room // block_bytes) + len(pinned_resident)

            def schedule(r):
                res = sorted(set(spread_resident(n, r - len(pinned_resident))) | set(pinned_resident))
                return res, (resident_step if len(res) == n else
                             forwards * simulate(n, set(res), prefetch, times, copy))
            # The fewest resident blocks that reach (within 1%) the best time: VRAM left free is headroom
            # for the allocator; filling the card with blocks that cannot speed anything up only costs.
            # (When every block fits, nothing streams: no bus traffic at all.)
            _, fastest = schedule(r_max)
            r = r_max if r_max >= n else next(
                r for r in range(len(pinned_resident), r_max + 1) if schedule(r)[1] <= fastest * 1.01)
            resident, step = schedule(r)
            stream = len(resident) < n
            vram = fixed + cache + act + (len(resident) + (slots if stream else 0)) * block_bytes
            cand = Plan(n, block_bytes, resident, prefetch, batched, chunk, [], [], vram, 0.0, 0.0, step,
                        resident_step, comp, copy, attention=kernel, fp8_blocks=tuple(sorted(fp8_set)),
                        step_cache_bytes=cache, guided=workload.guidance, gpus=gpus, comm_s=comm, tokens=L_all,
                        local_tokens=L, process_ram=hw.host_overhead)
            if attention == "8bit" and kernel != "8bit":
                cand.notes.append("8-bit attention would be slower than SDPA at this length: SDPA runs" if hw.fp8
                                  else "8-bit attention needs fp8 tensor cores: SDPA runs")
            _assign_host_tiers(cand, cfg, workload, ram_budget, hw)   # a disk-bound plan may lose its lead
            step = cand.step_seconds
            if best is None or step < best.step_seconds * 0.995 or (
                    step <= best.step_seconds * 1.005 and vram < best.vram_peak):
                best = cand
            if not stream:
                break
    if best is None:
        kernel = attention_for(cfg, L, 1, hw, keys, attention)
        act = cfg.activation_bytes(L, 1, SEQ_CHUNK if gpus == 1 and can_chunk else None, kernel, bool(fp8_set),
                                   workload.step_cache)
        pinned = (f", {len(pinned_resident)} whole (uncompressed) blocks that must stay resident "
                  f"{fmt_bytes(len(pinned_resident) * per_block * 2)}" if pinned_resident else "")
        raise PlanError(
            f"{cfg.name} at {workload.frames} frames {workload.width}x{workload.height} needs at least "
            f"{fmt_bytes(min(needs) / (1 - HEADROOM))} of VRAM (non-block weights {fmt_bytes(outside_bytes)}, "
            f"activations {fmt_bytes(act)}, two block slots {fmt_bytes(2 * block_bytes)}{pinned}"
            + (f", the step cache {fmt_bytes(cfg.step_cache_bytes(L, 2 if workload.guidance else 1))}"
               if workload.step_cache else "")
            + f"); the budget is {fmt_bytes(vram_budget)}. Use fewer frames, a smaller size, or compressed weights"
            + (" for every block (`convert --no_skip_first_last`)" if pinned_resident else "")
            + (", or no step cache" if workload.step_cache else "")
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
