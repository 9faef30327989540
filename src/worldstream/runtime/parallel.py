"""Ulysses sequence parallelism over the GPUs of one machine: one process per GPU, launched by torchrun,
talking through torch.distributed (NCCL between GPUs; gloo on the CPU, and for the processes' small talk).

    torchrun --nproc_per_node 4 -m worldstream generate ... --ulysses 4

How one DiT forward runs on N processes (`SequenceParallel.forward`, applied from outside the model):

  * every process embeds the whole input (patches, time, text: cheap) and keeps its N-th of the tokens, in
    (frame, row, column) order: `WanDiT.prepare(tokens=...)` gives it their RoPE angles, camera features and
    per-token time embeddings;
  * every block runs on the process's tokens. Self-attention is the one place that needs all of them: the
    attention backend "ulysses.../<kernel>" (registered by `attention()`) exchanges, in one all-to-all, q / k / v
    [B, L/N, H, D] for [B, L, H/N, D] (every token, the process's heads), runs the kernel, and exchanges the
    output back. A causal model's KV cache sits between the two: the backend handles the cache
    (models/attention.py), so each process writes the keys / values of ITS heads for every token of the chunk
    into its own cache, which therefore holds H/N heads (a 1/N of the memory);
  * cross-attention, FFN, modulation and camera layers work token by token: they run on the shard unchanged;
  * the head runs on the shard too and its output (out_dim x patch = 64 values a token, not dim = 5120) is
    all-gathered. Every process then holds the whole velocity and runs the sampler itself: the inputs are the
    same everywhere (prompt embedding and first-frame latents are computed once, by rank 0, and broadcast;
    noise and camera are computed on the CPU), so the processes stay in step without further talk.

Needs: the heads divisible by N (40 heads: 2, 4, 5, 8 GPUs) and the tokens of a forward divisible by N; both are
checked before anything is loaded (`check`), with one error in every process.

Every process holds all weights (resident on its GPU, or streamed); streamed blocks' pinned host slabs are
shared by the processes (runtime/memory.py `SharedHostMemory`: one copy in /dev/shm, written by local rank 0).
"""
from __future__ import annotations

import itertools
import os
import pickle
import secrets
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from ..models.attention import get_backend, register_backend
from .memory import HostMemory, SharedHostMemory, sweep_stale_shm

T = TypeVar("T")

CONTROL_TIMEOUT = timedelta(hours=2)    # gloo: one process may load or encode for long while the others wait
DATA_TIMEOUT = timedelta(minutes=30)    # NCCL: collectives inside forwards, the processes are in step there
MOST_GPUS = 8                           # one machine
_IDS = itertools.count(1)


class ParallelError(ValueError):
    """A request sequence parallelism cannot serve (launch, world size, heads, tokens)."""


# ---- checks ----------------------------------------------------------------------------------------------------

def world_sizes(heads: int, most: int = MOST_GPUS) -> list[int]:
    """The process counts that share `heads` attention heads evenly (up to one machine's GPUs)."""
    return [n for n in range(2, most + 1) if heads % n == 0]


def check_heads(name: str, heads: int, world: int, flag: str = "--ulysses") -> None:
    if world > 1 and heads % world:
        sizes = ", ".join(map(str, world_sizes(heads))) or "none"
        raise ParallelError(f"{flag} {world}: {name} has {heads} attention heads, which {world} processes cannot "
                            f"split evenly (Ulysses gives each process heads / N of them); use {sizes}")


def check_tokens(tokens: int, world: int, what: str = "a forward", flag: str = "--ulysses") -> None:
    if world > 1 and tokens % world:
        raise ParallelError(f"{flag} {world}: {what} has {tokens} tokens, which {world} processes cannot split "
                            f"evenly; choose a size or frame count whose token count (latent frames x latent "
                            f"height / 2 x latent width / 2) is a multiple of {world}")


def check(cfg, tokens: int, world: int, what: str = "a forward", flag: str = "--ulysses") -> None:
    """Everything a model and a token count must satisfy to run on `world` processes (ParallelError if not)."""
    check_heads(cfg.name, cfg.num_heads, world, flag)
    check_tokens(tokens, world, what, flag)


def launch_env() -> dict[str, int]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE as torchrun sets them (1-process defaults otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return dict(rank=int(os.environ.get("RANK", "0")), world=world,
                local_rank=int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def check_launch(ulysses: int | None, env: dict[str, int] | None = None) -> int:
    """The Ulysses degree to run with, from `--ulysses` and how the processes were started (ParallelError
    naming the fix when they disagree). 1: one process, no parallelism."""
    env = env or launch_env()
    world = env["world"]
    n = 1 if ulysses is None else int(ulysses)
    if n < 1:
        raise ParallelError(f"--ulysses {n}: must be at least 1")
    if n == 1 and world > 1:
        raise ParallelError(f"this is one of {world} processes (torchrun --nproc_per_node {world}), but --ulysses "
                            f"is {n}: pass --ulysses {world} to split the work, or start one process")
    if n > 1 and world == 1:
        raise ParallelError(f"--ulysses {n} runs {n} processes, one per GPU: launch with "
                            f"`torchrun --nproc_per_node {n} -m worldstream ... --ulysses {n}`")
    if n != world:
        raise ParallelError(f"--ulysses {n}, but torchrun started {world} processes; they must match")
    if env["local_world"] != world:
        raise ParallelError(f"--ulysses runs on the GPUs of one machine; this job spans "
                            f"{world // max(1, env['local_world'])} machines")
    return n


# ---- the process group -------------------------------------------------------------------------------------------

class SequenceParallel:
    """This process's place in a Ulysses group: `rank` of `world`, its `device`, the data group (NCCL / gloo)
    and a gloo control group for objects and meetings. Build with `SequenceParallel.launch`."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device, group=None, control=None,
                 tag: str = "solo"):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = torch.device(device)
        self.group, self.control = group, control
        self.tag = tag                               # names this run's shared files
        self.id = next(_IDS)                         # names this group's attention backends
        self._backends: dict[str, str] = {}
        self._memory: HostMemory | None = None

    @classmethod
    def launch(cls, world: int, device_type: str = "cuda") -> "SequenceParallel":
        """Join the job torchrun started (MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK in the
        environment): on CUDA, this process takes cuda:LOCAL_RANK and NCCL; on the CPU, gloo."""
        env = launch_env()
        check_launch(world, env)
        rank, local_rank = env["rank"], env["local_rank"]
        cuda = device_type == "cuda"
        if cuda:
            if torch.cuda.device_count() < env["local_world"]:
                raise ParallelError(f"--ulysses {world}: this machine has {torch.cuda.device_count()} CUDA "
                                    f"device(s), one per process is needed")
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            if cuda:
                dist.init_process_group("nccl", timeout=DATA_TIMEOUT, device_id=device)
            else:
                dist.init_process_group("gloo", timeout=CONTROL_TIMEOUT)
        group = dist.group.WORLD
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if cuda else group
        if local_rank == 0:
            sweep_stale_shm()         # slab files of runs killed mid-load (the only time a file exists)
        box = [f"{os.getpid()}-{secrets.token_hex(4)}" if rank == 0 else None]   # names this run's slab files
        dist.broadcast_object_list(box, src=0, group=control)
        return cls(rank, world, local_rank, device, group, control, tag=box[0])

    @property
    def first(self) -> bool:
        """Rank 0: the process that encodes the prompt, decodes, writes and reports."""
        return self.rank == 0

    def close(self) -> None:
        """Leave the group together (a process tearing down gloo while a peer still talks to it may abort)."""
        if dist.is_initialized():
            dist.barrier(group=self.control)
            dist.destroy_process_group()

    # ---- the processes agree --------------------------------------------------------------------------------
    def gather(self, obj) -> list:
        """`obj` of every process, in rank order (pickled, over the control group)."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def agree(self, error: BaseException | None = None) -> None:
        """A meeting of all processes after work each did on its own: if any of them failed, every process
        raises (its own error, or else the one of the lowest failing rank), so they fail together."""
        errors = self.gather(_portable(error) if error is not None else None)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise error if error is not None else first

    def everyone(self, fn: Callable[[], T]) -> T:
        """`fn()` in every process; if it fails in any, it fails in all (`agree`)."""
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - handed to every process
            self.agree(e)
            raise
        self.agree(None)
        return result

    def from_first(self, fn: Callable[[], T]) -> T:
        """`fn()` run by rank 0 only, its result (tensors moved to the CPU, inside tuples / lists / dicts)
        sent to every other process; an error in it is raised by all of them."""
        error = None
        if self.first:
            try:
                result = fn()
                payload = ("ok", _to_cpu(result))
            except Exception as e:  # noqa: BLE001 - handed to every process
                error, payload = e, ("error", _portable(e))
        box = [payload if self.first else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        kind, value = box[0]
        if kind == "error":
            raise error if error is not None else value
        return result if self.first else value

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every process's `t` (same shape and dtype, on `device`), over the data group."""
        dist.broadcast(t, src=0, group=self.group)
        return t

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    # ---- host memory ------------------------------------------------------------------------------------------
    @property
    def host_memory(self) -> HostMemory:
        """Where streamed blocks' slabs come from: shared by the processes, filled by local rank 0."""
        if self._memory is None:
            self._memory = HostMemory() if self.world == 1 else \
                SharedHostMemory(self.tag, writer=self.local_rank == 0, sync=self.agree)
        return self._memory

    # ---- Ulysses ------------------------------------------------------------------------------------------------
    def attention(self, inner: str = "sdpa") -> str:
        """The registered name of the Ulysses self-attention backend around kernel `inner` for this group."""
        if inner not in self._backends:
            kernel = get_backend(inner)
            name = f"ulysses{self.world}#{self.id}/{inner}"

            def ulysses(q, k, v, kv=None):
                q, k, v = self.scatter_heads(q, k, v)
                if kv is not None:      # this process's heads, every token of the chunk, into its cache
                    k, v = kv.update(k, v)
                return self.gather_heads(kernel(q, k, v))
            register_backend(name, ulysses, handles_cache=True)
            self._backends[inner] = name
        return self._backends[inner]

    def scatter_heads(self, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, L/N, H, D] tensors (this process's tokens, every head) -> [B, L, H/N, D] (every token, this
        process's heads), all of them in one all-to-all."""
        n = self.world
        b, part, h, d = ts[0].shape
        if h % n:
            raise ParallelError(f"{h} attention heads cannot be split over {n} processes")
        x = torch.stack(ts).view(len(ts), b, part, n, h // n, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        out = torch.empty_like(x)                    # [n, T, B, L/N, H/N, D]: block j goes to process j
        dist.all_to_all_single(out, x, group=self.group)
        # out[j]: process j's tokens, my heads -> tokens in rank order
        out = out.permute(1, 2, 0, 3, 4, 5).reshape(len(ts), b, n * part, h // n, d)
        return tuple(out.unbind(0))

    def gather_heads(self, o: torch.Tensor) -> torch.Tensor:
        """[B, L, H/N, D] (every token, my heads) -> [B, L/N, H, D] (my tokens, every head): one all-to-all."""
        n = self.world
        b, tokens, hn, d = o.shape
        x = o.reshape(b, n, tokens // n, hn, d).permute(1, 0, 2, 3, 4).contiguous()   # [n, B, L/N, H/N, D]
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        # out[j]: my tokens, process j's heads -> heads in rank order
        return out.permute(1, 2, 0, 3, 4).reshape(b, tokens // n, n * hn, d)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L/N, C] of every process -> [B, L, C] in rank order, in every process."""
        out = torch.empty((self.world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather(out, x.contiguous(), self.group)      # rank after rank along the first dimension
        return out.view(self.world, *x.shape).transpose(0, 1).reshape(x.shape[0], -1, *x.shape[2:])

    def tokens(self, model, x: torch.Tensor) -> tuple[int, slice]:
        """Tokens of a forward on latents `x` [B, C, F, H, W], and this process's range of them."""
        pt, ph, pw = model.cfg.patch_size
        total = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        check(model.cfg, total, self.world)
        part = total // self.world
        return total, slice(self.rank * part, (self.rank + 1) * part)

    def forward(self, model, x, t, context, y=None, clip=None, camera=None, cache=None, cross=None,
                start_frame: int | None = None, stack=None) -> torch.Tensor:
        """`model(x, t, context, ...)` (a WanDiT), computed by all processes together: the same result in
        every one of them. The model's self-attention must be `attention()`'s backend; a causal `cache` holds
        this process's heads (models.kv_cache.KVCache.empty with num_heads // world). `stack` (step caching,
        models.dit.StackCache) keeps this process's tokens' residual."""
        _, mine = self.tokens(model, x)
        model.begin_chunk(x, cache, cross, start_frame)
        h, kwargs, (e, grid) = model.prepare(x, t, context, y=y, clip=clip, camera=camera, start_frame=start_frame,
                                             cross=cross, tokens=mine)
        if stack is not None and stack.reuse:
            h = stack.reused(h)
        else:
            out = h
            if stack is None:
                h = None   # (out is then the only reference: the tokens go once the first block has run)
            for block, block_kwargs in model.layers(kwargs, cache, cross):
                out = block(out, **block_kwargs)
            if stack is not None:
                stack.keep(out, h)
            h = out
        return model.unpatchify(self.gather_tokens(model.head(h, e)), grid)

    def kv_heads(self, heads: int) -> int:
        """Heads of the causal KV cache each process holds."""
        check_heads("the model", heads, self.world)
        return heads // self.world


def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """`out` [N * x.shape[0], ...] <- x of every process, one after the other (all_gather_single in newer
    torch, all_gather_into_tensor before)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (to be raised in another process), else a RuntimeError saying it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")
