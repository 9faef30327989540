"""DiT experts on the device under a plan, driven by the schedule of forwards the sampler will make.

The runner is told, not steered. `build_runner(ckpt, device, dtype, workload, vram, ram)` plans placement
(planner.plan; a budget that cannot work fails here, before anything is loaded). The sampler then hands it the
whole forward schedule up front, `runner.start(schedule)`: which expert runs each forward and on how many
samples, in order (a real-time session's schedule is "4 denoise + 1 refresh per chunk" repeated without end;
the runner only ever reads one forward ahead). Each `runner(expert, **dit_inputs)` is the next forward of the
schedule. From the schedule alone the runner

  * loads the first expert when its first forward comes (loaders.py: weights straight into their homes);
  * before a forward whose successor uses another expert, stages that expert: attached to the engine fully
    streamed, so its first blocks are copied in during this forward's last blocks (RAM permitting, no disk
    tier); after its first forward it gets the plan's resident blocks and the old expert is freed;
  * without RAM for both experts, frees the old expert at the switch and reads the new one from its files into
    the old one's pinned slabs;
  * frees everything once a finite schedule is done.

Step caching (pipelines/step_cache.py): a forward whose inputs carry a `stack` marked `reuse` is a cached
forward. It runs on the active expert without its block stack (embeddings and head only), so the engine copies
nothing for it; the first forward of an expert is never cached (the step cache computes it). The blocks the
engine prefetched at the end of the last computed forward stay queued for the next computed one, which the step
cache makes a forward of the same expert (it never skips an expert's last step); a cached forward that did
precede another expert would still be correct (the engine resyncs), only slower. `report["cached_forwards"]`
counts them.

Each expert is one `Expert` record whose `state` says where its weights are: "unloaded", "loaded" (held in host
memory, not on the device), "placed" (on the device under the plan: resident blocks there, the rest streamed)
or "staged" (placed fully streamed ahead of its first forward).

With sequence parallelism (`parallel`: a runtime.parallel.SequenceParallel, one runner per process) every
forward runs on the process's share of the tokens (`parallel.forward`), self-attention through the Ulysses
backend, and the streamed blocks' host slabs are shared by the processes of the machine (one copy, written by
local rank 0): every load is a meeting point of all processes. The processes run the same schedule, so they
load, switch and free in the same order.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator

import torch

from ..models.dit import WanDiT
from . import attention8  # noqa: F401  (registers the "8bit" attention backend)
from .disk import DiskTier
from .graphs import ChunkGraphs
from .loading import CheckpointLoader, resolve_quant, stream_layout
from .memory import HostMemory, empty_host_cache, host_ram_bytes, peak_rss_bytes, pss_bytes, shm_dir, shm_free_bytes, unpin
from ..checkpoints.compressed import QuantPolicy
from .planner import Hardware, Plan, PlanError, Workload, plan
from .quant import quantized_block_bytes
from .streaming import RamSource, StreamEngine, Streamed, place, unplace


@dataclass(frozen=True)
class Forward:
    """One DiT forward of a schedule: which expert runs it, on how many samples."""
    expert: str
    batch: int = 1


class Schedule:
    """The forwards a run makes, in order, possibly without end; read one at a time with one of look-ahead."""

    def __init__(self, forwards: Iterable[Forward]):
        self._forwards: Iterator[Forward] = iter(forwards)
        self._next = next(self._forwards, None)
        self.done = 0

    def peek(self) -> Forward | None:
        """The forward that comes next (None once a finite schedule is used up)."""
        return self._next

    def pop(self) -> Forward:
        if self._next is None:
            raise RuntimeError(f"the schedule ended after {self.done} forwards; one more was asked for")
        current, self._next = self._next, next(self._forwards, None)
        self.done += 1
        return current

    @classmethod
    def repeat(cls, forwards: list[Forward]) -> "Schedule":
        """`forwards` over and over (a real-time chunk loop)."""
        return cls(itertools.cycle(forwards))


@dataclass
class Expert:
    """One DiT expert and where its weights are (`state`: "unloaded" | "loaded" | "placed" | "staged")."""
    name: str
    state: str = "unloaded"
    model: WanDiT | None = None
    sources: dict[int, object] = field(default_factory=dict)   # host-held block -> RamSource / DiskSource
    handle: Streamed | None = None                              # its stack on the engine (None: all resident)

    def take_slabs(self) -> list[torch.Tensor]:
        """Hand over this expert's pinned block slabs (for the next expert to fill) and forget its weights."""
        slabs = [src.take() for src in self.sources.values() if isinstance(src, RamSource)]
        self.forget()
        return slabs

    def forget(self) -> None:
        """Drop the weights: device copies freed, host slabs unpinned and freed with their sources."""
        if self.model is not None:
            self.model.to("meta")
        self.model, self.sources, self.handle, self.state = None, {}, None, "unloaded"


class DiTRunner:
    def __init__(self, names: list[str], loader, device, dtype, plan_: Plan | None, keep_all: bool = True,
                 chunk: int | None = None, attention: str = "sdpa", fuse: bool = True, trace: bool = False,
                 parallel=None, graphs: bool = False):
        if parallel is not None and chunk is not None:
            raise PlanError("the low-memory block (a clip too long for the VRAM budget) does not combine with "
                            "sequence parallelism yet: raise --vram, or use fewer frames")
        self.parallel = parallel                 # runtime.parallel.SequenceParallel, or None (one process)
        self.memory: HostMemory = parallel.host_memory if parallel is not None else HostMemory()
        self.experts = {name: Expert(name) for name in names}
        self.loader = loader
        self.quant = getattr(loader, "quant", None)
        self.device, self.dtype = torch.device(device), dtype
        self.plan = plan_
        self.keep_all = keep_all                 # RAM holds both experts (else one, the other read at the switch)
        self.chunk, self.attention, self.fuse = chunk, attention, fuse
        # causal chunk forwards of resident weights replayed as CUDA graphs (runtime/graphs.py; same numbers)
        self.graphs = ChunkGraphs(self.device) if graphs and parallel is None else None
        self.trace = trace                       # the engine records its copies and computes (tests)
        self.batched_guidance = plan_.batched_guidance if plan_ is not None else True
        self.engine: StreamEngine | None = None
        self.tier: DiskTier | None = None
        self.schedule: Schedule | None = None
        self.active: str | None = None
        self.calls: list[str] = []
        self.report: dict = {"switch_s": 0.0, "load_s": 0.0, "cached_forwards": 0}

    # ---- the schedule ------------------------------------------------------------------------------------------
    def start(self, schedule: Schedule | Iterable[Forward]) -> None:
        """The forwards to come. Nothing is loaded yet: the first forward loads its expert."""
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(schedule)

    @torch.no_grad()
    def __call__(self, expert: str, **inputs) -> torch.Tensor:
        """The next forward of the schedule (`expert` must be the one it names) on `inputs`."""
        if self.schedule is None:
            raise RuntimeError("DiTRunner: call start(schedule) before the first forward")
        planned = self.schedule.pop()
        if planned.expert != expert:
            raise RuntimeError(f"forward {self.schedule.done} runs {expert!r} but the schedule says "
                               f"{planned.expert!r}")
        stack = inputs.get("stack")
        if stack is not None and stack.reuse:         # cached: no block runs, nothing is copied
            if expert != self.active or self.experts[expert].state == "staged":
                raise RuntimeError(f"forward {self.schedule.done}: a cached forward of {expert!r} before that "
                                   "expert has computed one (the step cache computes each expert's first steps)")
            self.report["cached_forwards"] += 1
            model = self.experts[expert].model
        else:
            model = self._activate(expert)
        self._look_ahead(self.schedule.peek())
        self.calls.append(expert)
        if self.parallel is not None:
            out = self.parallel.forward(model, **inputs)
        elif self.graphs is not None:
            out = self.graphs(model, **inputs)
        else:
            out = model(**inputs)
        if self.experts[expert].state == "staged":
            self._settle(expert)
        if self.schedule.peek() is None:
            self.close()
        return out

    # ---- where the weights go --------------------------------------------------------------------------------
    @property
    def _prefetch(self) -> int:
        return self.plan.prefetch if self.plan else 1

    def _load(self, e: Expert, streamed: set, disk: set = frozenset(), slabs: list | None = None) -> None:
        t0 = time.perf_counter()
        if disk and self.tier is None:
            self.tier = DiskTier(stream_layout(self.loader.cfg, self.dtype, self.quant), ring=self.plan.prefetch + 2)
        extra = {} if self.parallel is None else {"memory": self.memory}
        self.memory.begin()
        error = None
        try:
            e.model, e.sources = self.loader.load(e.name, streamed, self.device, self.dtype, disk=disk,
                                                  tier=self.tier, slabs=slabs, **extra)
        except Exception as x:  # noqa: BLE001 - shared slabs: every process learns of it and fails with it
            error = x
        self.memory.end(error)
        if self.parallel is not None:
            self._check_same_slabs(e)
        e.model.set_chunk(self.chunk)
        e.model.set_attention(self.attention if self.parallel is None else self.parallel.attention(self.attention))
        e.model.set_fuse(self.fuse)
        self.report["load_s"] += time.perf_counter() - t0

    def _check_same_slabs(self, e: Expert) -> None:
        """Shared slabs: every process must hold block i in the same slab (same schedule, same requests)."""
        mine = sorted((i, self.memory.key(src.buf)) for i, src in e.sources.items() if isinstance(src, RamSource))
        if len({repr(m) for m in self.parallel.gather(mine)}) != 1:
            raise RuntimeError(f"expert {e.name}: the processes hold its streamed blocks in different shared slabs "
                               "(they did not make the same loads in the same order)")

    def _place(self, e: Expert, resident: list[int], state: str) -> None:
        self.engine, e.handle = place(e.model, e.model.blocks, self.device, e.sources, resident, self._prefetch,
                                      engine=self.engine, name=e.name, trace=self.trace)
        e.state = state

    def _unplace(self, e: Expert) -> None:
        unplace(e.model.blocks, e.sources, self.engine, e.handle)
        e.handle = None

    def _activate(self, name: str) -> WanDiT:
        """Make `name` the expert on the device (loading it, and letting the previous one go, if needed)."""
        e = self.experts[name]
        if name == self.active:
            return e.model
        if e.state == "staged":                    # attached fully streamed; its first blocks already on the way
            self.active = name
            return e.model
        t0 = time.perf_counter()
        slabs: list[torch.Tensor] = []
        if self.active is not None:
            old = self.experts[self.active]
            self._unplace(old)
            all_resident = self.plan is None or len(self.plan.resident) == self.plan.n_blocks
            if not self.keep_all or all_resident:  # experts run high then low: free the device and RAM
                slabs = old.take_slabs()           # the new expert fills the old one's pinned slabs
            else:
                old.state = "loaded"
        if e.model is None:
            streamed = set(self.plan.ram_blocks) if self.plan else set()
            disk = set(self.plan.disk_blocks) if self.plan else set()
            self._load(e, streamed, disk, slabs)
        for buf in slabs:                          # slabs the new expert did not take
            unpin(buf)
        self._place(e, self.plan.resident if self.plan else list(range(len(e.model.blocks))), "placed")
        if self.active is not None:
            self.report["switch_s"] += time.perf_counter() - t0
        self.active = name
        return e.model

    def _look_ahead(self, nxt: Forward | None) -> None:
        """Before a forward: tell the engine which stack the forward after it runs, staging that expert first
        when it is another one (RAM for both, no disk tier), so prefetch crosses the switch."""
        if nxt is None or self.engine is None:
            return
        e = self.experts[nxt.expert]
        if (e.state == "unloaded" and nxt.expert != self.active and self.keep_all and self.plan is not None
                and not self.plan.disk_blocks):
            pinned = list(self.quant.pinned(self.plan.n_blocks)) if self.quant is not None else []
            self._load(e, set(range(self.plan.n_blocks)) - set(pinned))
            t0 = time.perf_counter()
            self._place(e, pinned, "staged")
            self.report["load_s"] += time.perf_counter() - t0
        if e.handle is not None:
            self.engine.expect(e.handle)

    def _settle(self, name: str) -> None:
        """After a staged expert's first forward: free every other expert, give `name` its resident blocks."""
        t0 = time.perf_counter()
        for other in self.experts.values():
            if other.name != name and other.model is not None:
                self._unplace(other)
                other.forget()
        e = self.experts[name]
        self._unplace(e)
        self._place(e, self.plan.resident, "placed")
        self.report["switch_s"] += time.perf_counter() - t0

    def close(self) -> None:
        """Wait for copies in flight, free every expert and the disk tier; record peak memory. Idempotent."""
        if self.engine is not None:
            self.engine.release()
            for e in self.experts.values():      # the engine's hooks on the blocks and its hold on their stacks
                if e.handle is not None:         # are reference cycles: cut them, or the host slabs wait for
                    self.engine.detach(e.handle)  # Python's cyclic collector (not run by a VAE decode)
        if self.tier is not None:
            self.tier.close()
            self.tier = None
        if self.graphs is not None:
            self.report["graphs"] = dict(self.graphs.stats)
            self.graphs.reset()
        if self.device.type == "cuda":
            self.report["peak_vram"] = torch.cuda.max_memory_allocated(self.device)
        if self.parallel is not None and "pss" not in self.report:   # before the weights go: shared pages
            self.report["pss"] = pss_bytes()                         # count once over the processes
            self.report["shared_slabs"] = getattr(self.memory, "nbytes", 0)
        self.report["peak_rss"] = peak_rss_bytes()
        for e in self.experts.values():
            e.model, e.sources, e.handle, e.state = None, {}, None, "unloaded"   # (weights freed with them)
        self.engine, self.active = None, None
        empty_host_cache()   # (the host RAM of the slabs goes back to the system before the VAE decode)


RAM_SHARE = 0.8    # without --ram: this share of the machine's RAM (room for the OS and the rest of the run)


def default_ram() -> float:
    """The host RAM budget when none is given: RAM_SHARE of what the machine has."""
    return RAM_SHARE * host_ram_bytes()


def plan_run(cfg, workload: Workload, vram: float | None, ram: float | None, dtype: torch.dtype,
             policy: QuantPolicy | None, hardware: Hardware | None = None, attention: str = "sdpa",
             gpus: int = 1) -> Plan:
    """The plan `generate` runs under: block bytes of `dtype` or of the compression `policy` (whose whole
    first / last blocks stay resident), priced as it runs: "fp8" blocks with bf16 compute take fp8 matmuls,
    other compressed blocks are dequantized; `attention` "8bit" is taken where it is faster. `worldstream plan`
    calls this too, so it predicts what generate does."""
    extra = {}
    if policy is not None:
        blocks = tuple(policy.blocks(cfg.num_layers))
        fp8 = policy.fmt == "fp8" and dtype == torch.bfloat16          # models/quant.py QLinear.uses_scaled_mm
        extra = dict(block_bytes=quantized_block_bytes(cfg, policy.fmt, dtype, tuple(policy.skip)),
                     pinned_resident=policy.pinned(cfg.num_layers),
                     fp8_blocks=blocks if fp8 else (), dequantized_blocks=() if fp8 else blocks)
    return plan(cfg, workload, vram, ram, hardware, bytes_per_param=torch.finfo(dtype).bits / 8,
                attention=attention, gpus=gpus, **extra)


def build_runner(ckpt, device, dtype, workload: Workload, vram: float | None = None, ram: float | None = None,
                 loader=None, quant=None, attention: str = "sdpa", fuse: bool = True, loras=(),
                 parallel=None, graphs: bool = False) -> DiTRunner:
    """Plan and build a runner for `ckpt` (a checkpoints.dit.Checkpoint, or anything with `.config`,
    `.experts` and `.quant`).

    `quant` ("fp8" | "fp8-block" | "int8" | a QuantPolicy): compress the block linears while loading; the plan
    then streams compressed blocks and keeps the whole first/last blocks resident. A converted checkpoint
    (`ckpt.quant`) is planned the same way without asking. `attention` / `fuse`: the DiT's attention kernel and
    compiled elementwise work (per model: models/dit.py); on a GPU "8bit" runs where the plan finds it faster
    (`plan.attention`). `workload.step_cache`: the plan budgets the step cache's residuals. `loras`: LoRA
    files merged into the weights while they load (checkpoints/lora.py); the blocks they touch cannot be left
    to the disk tier. `parallel` (runtime.parallel.SequenceParallel): this process is one of several that
    share each forward; the plan is made for one of `parallel.world` GPUs and the RAM budget is the machine's
    (the streamed weights are held once, in shared memory)."""
    device = torch.device(device)
    cfg = ckpt.config
    names = list(ckpt.experts)
    try:
        policy, on_load = resolve_quant(ckpt, quant)
    except ValueError as e:
        raise PlanError(str(e)) from None
    loader = loader or CheckpointLoader(ckpt, policy, loras)
    workload = replace(workload, experts=len(names))
    if device.type != "cuda":
        return DiTRunner(names, loader, device, dtype, None, attention=attention, fuse=fuse, parallel=parallel,
                         graphs=graphs)
    budget = vram if vram is not None else torch.cuda.mem_get_info(device)[0]
    ram = ram if ram is not None else default_ram()
    gpus = parallel.world if parallel is not None else 1
    p = plan_run(cfg, workload, budget, ram, dtype, policy, attention=attention, gpus=gpus)
    if loras and p.disk_blocks:
        raise PlanError(f"--ram {ram / 1e9:.1f}GB holds {len(p.ram_blocks)} of the {len(p.streamed)} streamed "
                        f"blocks; the rest would stream from disk, but --lora merges into the weights while they "
                        f"load: write a merged checkpoint once (`worldstream convert --ckpt_dir {ckpt.root} "
                        f"--lora FILE --quant fp8 --out DIR`) and generate from DIR, or raise --ram")
    if on_load and p.disk_blocks:
        raise PlanError(f"--ram {ram / 1e9:.1f}GB holds {len(p.ram_blocks)} of the {len(p.streamed)} streamed "
                        f"blocks even compressed; the rest would stream from disk, which needs the compressed "
                        f"checkpoint on disk: run `worldstream convert --ckpt_dir {ckpt.root} --quant {policy.fmt} "
                        f"--out DIR` once and generate from DIR, or raise --ram")
    keep_all = 2 * p.weights_in_ram + 4e9 + (gpus - 1) * p.process_ram <= ram
    if parallel is not None and gpus > 1 and p.shared_weights > 0:
        staged = p.n_blocks * p.block_bytes if keep_all and len(names) == 2 else 0   # the next expert, whole
        need = p.shared_weights + staged
        free = shm_free_bytes()
        if free < need:
            raise PlanError(f"the {gpus} processes share one host copy of the streamed weights in {shm_dir()}, "
                            f"which needs {need / 1e9:.1f} GB; it has {free / 1e9:.1f} GB free (docker: "
                            f"--shm-size; or set WORLDSTREAM_SHM_DIR to a larger tmpfs, or raise --vram)")
    return DiTRunner(names, loader, device, dtype, p, keep_all=keep_all, chunk=p.chunk,
                     attention=p.attention, fuse=fuse, parallel=parallel, graphs=graphs)
