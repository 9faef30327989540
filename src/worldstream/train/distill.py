"""Distil the small world model (`lingbot-cam-world`, 30 steps, bidirectional) into a causal 4-step student
(`lingbot-fast-world`, models/configs.py) that streams chunk by chunk with a KV cache.

    worldstream train distill --out runs/distill --minutes 8                    # on a GPU
    worldstream train distill --out runs/distill --resume runs/distill --minutes 4   # carry on
    worldstream train distill --out runs/cpu --minutes 2 --preset cpu           # a quick look on a CPU

The recipe (shared/spec/realtime.md, "Distillation"; Self-Forcing's DMD), in the order `run` performs it:

1. **Conditions**: seeded procedural clips (train/world.py `render_pool`: scene, keyboard trajectory, prompt)
   encoded as the teacher saw them in training (`encode_pool`, `camera_maps`, the umT5 prompt table). Only the
   first frame, the camera and the prompt are used for training; the rest of each clip is unused.
2. **ODE pairs**: the teacher's sampler (Euler on the flow ODE, `ode_steps` steps at the teacher's shift, with
   CFG when `guide` > 1) from seeded noise; kept: x_t at the student's 4 timesteps and the final x0.
3. **ODE regression**: the causal student, chunk by chunk (the previous chunks' clean x0 in its KV cache, as
   the refresh leaves them at inference; no gradient through them), predicts x0 from x_t at a random one of its
   timesteps per chunk; loss MSE(x0_pred, x0_teacher).
4. **DMD with self forcing**: per generator step the student rolls out a whole clip chunk by chunk on its own
   outputs (each chunk: its steps from fresh noise with re-noising, stopping at one random exit step for the
   rollout; the refresh at t = 0 puts the chunk into the KV cache), gradient only through the exit step's
   forward. Then, at a score timestep σ (uniform in [0.02, 0.98] after the shift warp) and fresh noise:
       x̂_real = frozen teacher (CFG `guide`),  x̂_fake = critic (bidirectional, initialised from the teacher)
       g = (x̂_fake − x̂_real) / mean|x − x̂_real|,  loss = 0.5·MSE(x, stopgrad(x − g))
   The critic learns the student's outputs with the flow-matching loss (v = noise − x0), `critic_steps` critic
   updates per generator update (each on a fresh rollout without gradient). AdamW β (0, 0.999), weight decay 0.01.
   EMA of the student (what ships).

Each loss term can be switched off (`ode`, `dmd`, `critic`), which is how the tests show what each one updates.

State (`--out`): `state.json` (phase, steps, loss history, events), `models-*.safetensors` (student, EMA,
critic, and on one process their AdamW moments, float32, files of at most 16 MiB), `pairs-*.safetensors` (the
ODE pairs), `student_ode.safetensors` (the EMA student as the ODE phase left it, float16, to compare).
`--resume` continues exactly (random draws are seeded from the step counters).
Checkpoints every `save_minutes` and at the end; `--minutes` is the run's wall-clock budget: every phase stops
in time to save and export. `--export DIR` writes the EMA student in the causal layout the real-time loader
reads (`DIR/transformers/`: config.json + float16 shards + index); `curves.json` / `curves.png` (matplotlib when
installed) go to `--out`.

Several processes (`torchrun --nproc_per_node N -m worldstream train distill ...`): the student, its EMA and the
critic are sharded with FSDP (`torch.distributed.fsdp.fully_shard`), the frozen teacher is replicated; each
process draws its own samples (seeded by rank) and FSDP averages the gradients. Rank 0 writes; the optimizer's
moments are not saved in that mode (a resume restarts them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write
from ..models.configs import DiTConfig, get_config
from ..models.dit import WanDiT
from ..models.kv_cache import CrossKV
from ..pipelines.schedulers import CausalSchedule
from . import world as tw

STUDENT = "lingbot-fast-world"
MAX_FILE_BYTES = tw.MAX_FILE_BYTES


# ---------------------------------------------------------------------------------------------- settings

@dataclass
class DistillConfig:
    teacher: str = ""                   # the teacher's checkpoint folder (default: the shipped tiny world)
    student: str = STUDENT              # the student's variant (a causal config with `realtime`)
    seed: int = 0
    minutes: float = 8.0                # wall-clock budget of this run (all phases)
    save_minutes: float = 2.0
    # conditions
    height: int = tw.HEIGHT
    width: int = tw.WIDTH
    frames: int = tw.FRAMES
    pool_start: int = 200_000           # scene seeds (the teacher trained on seeds < 100,000; eval uses 1,000,000+)
    pool_clips: int = 512
    pool_seconds: float = 40.0
    # ODE pairs + regression
    ode: bool = True
    ode_pairs: int = 1024
    ode_steps: int = 48
    ode_iters: int = 4000
    ode_share: float = 0.4              # at most this share of the budget for pairs + regression
    ode_batch: int = 32
    ode_lr: float = 1e-4
    # DMD
    dmd: bool = True                    # the generator's DMD loss
    critic: bool = True                 # the critic's flow-matching loss
    dmd_iters: int = 100_000            # generator steps (the budget usually ends the run first)
    dmd_batch: int = 16
    critic_steps: int = 5               # critic updates per generator update
    gen_lr: float = 5e-5                # (Self-Forcing at 1.3B: 2e-6 / 4e-7; a 8 M model takes larger steps)
    critic_lr: float = 2e-5
    guide: float = 1.0                  # CFG of the real score (the shipped teacher was trained without it)
    score_shift: float = 3.0            # shift warp of the score timestep (the teacher's sampling shift)
    score_min: float = 0.02
    score_max: float = 0.98
    ema: float = 0.99
    weight_decay: float = 0.01
    grad_clip: float = 10.0


PRESETS = {
    # ~8 minutes of an H200: 512 clips, 1024 pairs, ODE regression (40 % of the time) then DMD to the end
    "gpu": {},
    # a 2-core CPU in ~2 minutes: shows the whole pipeline, not a good student
    "cpu": dict(pool_clips=2, pool_seconds=10.0, ode_pairs=4, ode_steps=8, ode_iters=20, ode_batch=2,
                dmd_batch=1, critic_steps=1, ode_share=0.6),
}


# ---------------------------------------------------------------------------------------------- data

@dataclass
class Conditions:
    """Per clip: the first frame's conditioning y [N, 20, F, h, w] (mask + latents of [image, zeros]), the camera
    maps [N, 384, F, h, w], the prompt row of `table` [P, text_len, text_dim], the ground truth x0 (unused by
    the losses), and the unconditional (empty prompt) row for CFG."""
    y: torch.Tensor
    camera: torch.Tensor
    prompt: torch.Tensor
    table: torch.Tensor
    uncond: torch.Tensor
    x0: torch.Tensor
    first: torch.Tensor                 # the first frames, float [N, 3, H, W] in [-1, 1]

    def batch(self, idx: torch.Tensor) -> dict:
        return dict(y=self.y[idx], camera=self.camera[idx], context=self.table[self.prompt[idx]])

    def __len__(self) -> int:
        return len(self.y)


def build_conditions(c: DistillConfig, teacher, device, log=print) -> Conditions:
    """Render the clip pool and encode it with the teacher's VAE and umT5 exactly as train/world.py did."""
    s = tw.Settings(height=c.height, width=c.width, frames=c.frames, pool_start=c.pool_start,
                    pool_clips=c.pool_clips, pool_seconds=c.pool_seconds)
    cfg = teacher.config
    from ..world import scene as world
    seeds = range(c.pool_start, c.pool_start + c.pool_clips)
    prompts = sorted({world.make_scene(seed).describe() for seed in seeds}) + [""]
    prompts, table = tw.prompt_table(teacher.root, cfg.text_len, prompts)
    pool = tw.render_pool(s, prompts, device, log=log)
    x0, cond = tw.encode_pool(teacher.vae, pool.frames, flip=False)
    b, _, f, h, w = x0.shape
    y = torch.cat([tw.first_frame_mask(b, f, h, w, x0.device), cond], dim=1)
    camera = tw.camera_maps(pool.rel.to(device), tw.ray_dirs(c.height, c.width, device))
    first = tw.to_video(pool.frames[:, :1])[:, :, 0]
    return Conditions(y, camera, pool.prompt.to(device), table.to(device), table[-1].to(device), x0, first)


# ---------------------------------------------------------------------------------------------- the causal forward

class RolloutKV:
    """The KV cache of a training rollout: per layer the keys / values of the finished chunks, and a chunk's
    own appended to them (a new tensor, nothing written in place, so gradients flow through the chunk's own
    keys). Only a forward run inside `commit()` (the refresh at t = 0) adds its chunk for later chunks.
    The same interface as models/kv_cache.KVCache (begin_chunk, layer(i).update), global (no window): a
    training clip is within the student's window."""

    def __init__(self, layers: int):
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        self.frames = 0
        self._commit = False
        self._start = 0

    def begin_chunk(self, start: int, n: int) -> None:
        if start != self.frames:
            raise ValueError(f"chunk at frame {start}: the rollout cache holds frames 0..{self.frames - 1}")
        self._start, self._n = start, n

    def commit(self):
        cache = self

        class _Commit:
            def __enter__(self):
                cache._commit = True

            def __exit__(self, *exc):
                cache._commit = False
                cache.frames = cache._start + cache._n
        return _Commit()

    def layer(self, i: int) -> "_LayerKV":
        return _LayerKV(self, i)

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.k[i], self.v[i]
        full_k = k if pk is None else torch.cat([pk, k], dim=1)
        full_v = v if pv is None else torch.cat([pv, v], dim=1)
        if self._commit:
            self.k[i], self.v[i] = full_k, full_v
        return full_k, full_v


class _LayerKV:
    def __init__(self, cache: RolloutKV, i: int):
        self.cache, self.i = cache, i

    def update(self, k, v):
        return self.cache.update(self.i, k, v)


def chunk_forward(student: WanDiT, x: torch.Tensor, t: torch.Tensor, cond: dict, kv: RolloutKV, start: int
                  ) -> torch.Tensor:
    """The student's velocity for the chunk x [B, 16, n, h, w] at latent frames start.., attending to `kv`."""
    n = x.shape[2]
    return student(x, t, cond["context"], y=cond["y"][:, :, start:start + n].contiguous(),
                   camera=cond["camera"][:, :, start:start + n].contiguous(), cache=kv,
                   cross=CrossKV(student.cfg.num_layers), start_frame=start)


def refresh(student: WanDiT, x0: torch.Tensor, cond: dict, kv: RolloutKV, start: int) -> None:
    """The refresh forward at t = 0: the clean chunk's keys / values go into the cache (its output unused)."""
    with kv.commit():
        chunk_forward(student, x0, torch.zeros(len(x0), device=x0.device), cond, kv, start)


def x0_of(model: WanDiT, xt: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: torch.Tensor | None = None,
          guide: float = 1.0) -> torch.Tensor:
    """A bidirectional model's x0 prediction x − σ·v on a whole clip (σ [B]); CFG with the empty prompt."""
    v = model(xt, sigma * 1000, cond["context"], y=cond["y"], camera=cond["camera"]).float()
    if guide != 1.0:
        ctx = uncond[None].expand_as(cond["context"])
        vu = model(xt, sigma * 1000, ctx, y=cond["y"], camera=cond["camera"]).float()
        v = vu + guide * (v - vu)
    return xt - sigma.view(-1, 1, 1, 1, 1) * v


# ---------------------------------------------------------------------------------------------- the trainer

class Distiller:
    def __init__(self, c: DistillConfig, out: Path, device, teacher, resume: Path | None = None, log=print):
        self.c, self.out, self.log = c, Path(out), log
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rank, self.world = _rank_world()
        self.teacher = teacher                      # testing.world.WorldModel (frozen; float32 weights)
        self.teacher.dit.requires_grad_(False).eval()
        self.scfg: DiTConfig = get_config(c.student)
        if self.scfg.realtime is None:
            raise ValueError(f"{c.student} is not a causal student (no realtime settings)")
        self.rt = self.scfg.realtime
        self.schedule = CausalSchedule(self.rt.step_indices, self.rt.shift)
        self.student = student_from_teacher(self.scfg, teacher.dit).to(self.device)
        self.ema = student_from_teacher(self.scfg, teacher.dit).to(self.device).requires_grad_(False)
        self.critic = WanDiT(teacher.config).to(self.device)
        self.critic.load_state_dict(teacher.dit.state_dict())
        for m in (self.student, self.ema, self.critic):
            m.set_fuse(False)
        self.state = {"config": asdict(c), "phase": "ode", "ode_steps": 0, "dmd_steps": 0, "critic_steps": 0,
                      "ode_loss": [], "dmd_loss": [], "critic_loss": [], "events": [], "seconds": 0.0}
        self.pairs: dict[str, torch.Tensor] | None = None
        moments = None
        if resume is not None:
            moments = self._resume(Path(resume))
        if self.world > 1:
            from torch.distributed.fsdp import fully_shard
            for m in (self.student, self.ema, self.critic):
                for block in m.blocks:
                    fully_shard(block)
                fully_shard(m)
        betas = (0.0, 0.999)
        self.opt_ode = torch.optim.AdamW(self.student.parameters(), lr=c.ode_lr, betas=(0.9, 0.999),
                                         weight_decay=c.weight_decay)
        self.opt_gen = torch.optim.AdamW(self.student.parameters(), lr=c.gen_lr, betas=betas,
                                         weight_decay=c.weight_decay)
        self.opt_critic = torch.optim.AdamW(self.critic.parameters(), lr=c.critic_lr, betas=betas,
                                            weight_decay=c.weight_decay)
        if moments:
            for name, opt in self._optimizers().items():
                _load_moments(opt, {k[len(name) + 1:]: v for k, v in moments.items() if k.startswith(name + ".")})
        self.last_save = time.perf_counter()

    # ---- the recipe ----------------------------------------------------------------------------------------
    def run(self, data: Conditions, budget_s: float) -> None:
        """ODE pairs → ODE regression → DMD, each stopping when its step count or the budget is reached."""
        t0 = time.perf_counter()
        end = t0 + budget_s
        c = self.c
        if self.state["phase"] == "ode":
            if c.ode:
                ode_end = min(end, t0 + c.ode_share * budget_s)
                if self.pairs is None:
                    self.pairs = self.make_ode_pairs(data, ode_end)
                    self.save()
                bar = tw.Bar("ode", ode_end - time.perf_counter())
                last = 0.0                    # (a step that would end past the budget is not started)
                while self._agree(self.state["ode_steps"] < c.ode_iters and time.perf_counter() + last < ode_end):
                    t_step = time.perf_counter()
                    loss = self.ode_step(data)
                    last = time.perf_counter() - t_step
                    self._record("ode_loss", self.state["ode_steps"], loss, t0)
                    bar.update(self.state["ode_steps"], f"x0 mse {loss:.4f}")
                    self._maybe_save()
                bar.close()
                self.event(f"ODE regression: {self.state['ode_steps']} steps")
            self.state["phase"] = "dmd"       # (the ODE phase ends at its step count or its share of the budget)
            self.snapshot("student_ode.safetensors")
        if self.state["phase"] == "dmd":
            bar = tw.Bar("dmd", end - time.perf_counter())
            last = 0.0
            while self._agree(self.state["dmd_steps"] < c.dmd_iters and time.perf_counter() + last < end):
                t_step = time.perf_counter()
                critic = [self.critic_step(data) for _ in range(c.critic_steps)]
                gen = self.generator_step(data)
                last = time.perf_counter() - t_step
                self._record("critic_loss", self.state["dmd_steps"], float(np.mean(critic)), t0)
                self._record("dmd_loss", self.state["dmd_steps"], gen, t0)
                bar.update(self.state["dmd_steps"], f"dmd {gen:.4f} critic {np.mean(critic):.4f}")
                self._maybe_save()
            bar.close()
            self.event(f"DMD: {self.state['dmd_steps']} generator steps, {self.state['critic_steps']} critic steps")
        self.state["seconds"] += time.perf_counter() - t0

    # ---- 2. ODE pairs -------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_ode_pairs(self, data: Conditions, deadline: float) -> dict[str, torch.Tensor]:
        """Teacher trajectories (Euler on the flow ODE, `ode_steps` steps at the teacher's shift plus the
        student's σs, CFG `guide`): x_t at the student's σs [P, K, 16, F, h, w], x0 [P, 16, F, h, w], clip index."""
        c, teacher = self.c, self.teacher.dit
        shift = self.teacher.config.sampling.shift
        u = torch.linspace(1, 0, c.ode_steps + 1, dtype=torch.float64)[:-1]
        grid = sorted(set((shift * u / (1 + (shift - 1) * u)).tolist()) | set(self.schedule.sigma_x0),
                      reverse=True) + [0.0]
        want = {s: k for k, s in enumerate(self.schedule.sigma_x0)}
        g = torch.Generator(self.device).manual_seed(c.seed * 1000 + 7 + self.rank)
        clips = torch.randint(len(data), (c.ode_pairs,), generator=g, device=self.device)
        xs, x0s, done = [], [], 0
        bar = tw.Bar("ode pairs", deadline - time.perf_counter())
        for i in range(0, c.ode_pairs, c.ode_batch):
            idx = clips[i:i + c.ode_batch]
            cond = data.batch(idx)
            x = torch.randn(data.x0[idx].shape, generator=g, device=self.device)
            kept = [None] * len(want)
            for s, s_next in zip(grid[:-1], grid[1:]):
                if s in want:
                    kept[want[s]] = x.clone()
                sig = torch.full((len(x),), s, device=self.device)
                with self.autocast():
                    x0 = x0_of(teacher, x, sig, cond, data.uncond, c.guide)
                v = (x - x0) / s
                x = x + (s_next - s) * v
            xs.append(torch.stack(kept, dim=1))
            x0s.append(x)
            done += len(idx)
            bar.update(done, f"{done}/{c.ode_pairs} pairs")
            if time.perf_counter() > deadline:
                break
        bar.close()
        self.event(f"ODE pairs: {done} teacher trajectories of {len(grid) - 1} Euler steps")
        return {"xt": torch.cat(xs), "x0": torch.cat(x0s), "clip": clips[:done]}

    # ---- 3. ODE regression ----------------------------------------------------------------------------------
    def ode_step(self, data: Conditions) -> float:
        c, s = self.c, self.schedule
        g = self._generator("ode", self.state["ode_steps"])
        n = len(self.pairs["x0"])
        pick = torch.randint(n, (c.ode_batch,), generator=g, device=self.device)
        cond = data.batch(self.pairs["clip"][pick])
        xt, x0 = self.pairs["xt"][pick], self.pairs["x0"][pick]
        b, chunk = len(pick), self.rt.chunk
        kv = RolloutKV(self.scfg.num_layers)
        loss = 0.0
        chunks = range(0, x0.shape[2], chunk)
        with self.autocast():
            for start in chunks:
                k = torch.randint(len(s), (b,), generator=g, device=self.device)
                x = xt[torch.arange(b), k][:, :, start:start + chunk]
                sigma = torch.tensor(s.sigma_x0, device=self.device)[k].view(b, 1, 1, 1, 1)
                t = torch.tensor(s.timesteps, dtype=torch.float32, device=self.device)[k]
                v = chunk_forward(self.student, x, t, cond, kv, start).float()
                loss = loss + F.mse_loss(x - sigma * v, x0[:, :, start:start + chunk])
                if start + chunk < x0.shape[2]:
                    with torch.no_grad():      # the context carries no gradient (as in the DMD rollouts)
                        refresh(self.student, x0[:, :, start:start + chunk], cond, kv, start)
        loss = loss / len(chunks)
        self._update(self.opt_ode, self.student, loss, enabled=c.ode)
        self.state["ode_steps"] += 1
        self._ema()
        return loss.item()

    # ---- 4. DMD ---------------------------------------------------------------------------------------------
    def rollout(self, cond: dict, g: torch.Generator, exit_step: int, grad: bool) -> torch.Tensor:
        """Self forcing: the student generates the clip chunk by chunk from its own outputs; each chunk runs its
        steps up to `exit_step` (re-noising in between) and only that forward carries gradients (`grad`)."""
        s, chunk = self.schedule, self.rt.chunk
        f = cond["y"].shape[2]
        b = len(cond["y"])
        shape = (b, self.scfg.latents.channels, chunk, *cond["y"].shape[3:])
        kv = RolloutKV(self.scfg.num_layers)
        out = []
        for start in range(0, f, chunk):
            x = torch.randn(shape, generator=g, device=self.device)
            for k in range(exit_step + 1):
                t = torch.full((b,), float(s.timesteps[k]), device=self.device)
                with torch.set_grad_enabled(grad and k == exit_step), self.autocast():
                    x0 = x - s.sigma_x0[k] * chunk_forward(self.student, x, t, cond, kv, start).float()
                if k < exit_step:
                    x = s.renoise(x0.detach(), torch.randn(shape, generator=g, device=self.device),
                                  s.sigma_noise[k + 1])
            out.append(x0)
            if start + chunk < f:
                with torch.no_grad(), self.autocast():
                    refresh(self.student, x0.detach(), cond, kv, start)
        return torch.cat(out, dim=2)

    def _score_sigma(self, b: int, g: torch.Generator) -> torch.Tensor:
        c = self.c
        u = c.score_min + (c.score_max - c.score_min) * torch.rand(b, generator=g, device=self.device)
        return c.score_shift * u / (1 + (c.score_shift - 1) * u)

    def _sample(self, data: Conditions, g: torch.Generator, b: int) -> dict:
        return data.batch(torch.randint(len(data), (b,), generator=g, device=self.device))

    def generator_step(self, data: Conditions) -> float:
        """One DMD update of the student on a self-forcing rollout."""
        c = self.c
        g = self._generator("gen", self.state["dmd_steps"])
        cond = self._sample(data, g, c.dmd_batch)
        x = self.rollout(cond, g, self._exit_step("gen"), grad=True)
        sigma = self._score_sigma(len(x), g)
        noise = torch.randn(x.shape, generator=g, device=self.device)
        with torch.no_grad(), self.autocast():
            sg = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - sg) * x.detach() + sg * noise
            real = x0_of(self.teacher.dit, xt, sigma, cond, data.uncond, c.guide)
            fake = x0_of(self.critic, xt, sigma, cond)
            norm = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1e-6)
            grad = torch.nan_to_num((fake - real) / norm)
        loss = 0.5 * F.mse_loss(x.float(), (x.detach() - grad).float())
        self._update(self.opt_gen, self.student, loss, enabled=c.dmd)
        self.state["dmd_steps"] += 1
        self._ema()
        return loss.item()

    def critic_step(self, data: Conditions) -> float:
        """One flow-matching update of the critic on a fresh rollout of the student (no gradient into it)."""
        c = self.c
        g = self._generator("critic", self.state["critic_steps"])
        cond = self._sample(data, g, c.dmd_batch)
        with torch.no_grad():
            x = self.rollout(cond, g, self._exit_step("critic"), grad=False).float()
        sigma = self._score_sigma(len(x), g)
        noise = torch.randn(x.shape, generator=g, device=self.device)
        sg = sigma.view(-1, 1, 1, 1, 1)
        with self.autocast():
            v = self.critic((1 - sg) * x + sg * noise, sigma * 1000, cond["context"], y=cond["y"],
                            camera=cond["camera"]).float()
        loss = F.mse_loss(v, noise - x)
        self._update(self.opt_critic, self.critic, loss, enabled=c.critic)
        self.state["critic_steps"] += 1
        return loss.item()

    # ---- pieces -----------------------------------------------------------------------------------------------
    def _update(self, opt, model, loss: torch.Tensor, enabled: bool) -> None:
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} ({self.state['phase']} phase)")
        if not enabled:                     # the term is switched off: nothing is updated by it
            return
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.c.grad_clip)
        opt.step()

    @torch.no_grad()
    def _ema(self) -> None:
        n = self.state["ode_steps"] + self.state["dmd_steps"]
        decay = min(self.c.ema, (1 + n) / (10 + n))
        torch._foreach_lerp_(_local(self.ema.parameters()), _local(self.student.parameters()), 1 - decay)

    def _generator(self, what: str, step: int, shared: bool = False) -> torch.Generator:
        """The random draws of one step, seeded by the step counter (so a resumed run repeats them) and, unless
        `shared`, by the process (each process its own samples)."""
        salt = {"ode": 1, "gen": 2, "critic": 3}[what]
        return torch.Generator(self.device).manual_seed(((self.c.seed * 7 + salt) * 1_000_003 + step) * 64
                                                        + (63 if shared else self.rank))

    def _exit_step(self, what: str) -> int:
        """The rollout's random exit step, the same in every process (their forwards must match under FSDP)."""
        step = self.state["dmd_steps" if what == "gen" else "critic_steps"]
        g = self._generator(what, step, shared=True)
        return int(torch.randint(len(self.schedule), (1,), generator=g, device=self.device).item())

    def _agree(self, go: bool) -> bool:
        """Every process continues only while all of them would (time budgets end on different steps)."""
        if self.world == 1:
            return go
        import torch.distributed as dist
        flag = torch.tensor([1 if go else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def _record(self, key: str, step: int, loss: float, t0: float) -> None:
        self.state[key].append([step, round(loss, 6), round(self.state["seconds"] + time.perf_counter() - t0, 2)])

    def event(self, msg: str) -> None:
        self.state["events"].append(msg)
        if self.rank == 0:
            self.log(msg)

    def _optimizers(self) -> dict:
        return {"opt_ode": self.opt_ode, "opt_gen": self.opt_gen, "opt_critic": self.opt_critic}

    # ---- state ------------------------------------------------------------------------------------------------
    def model_states(self) -> dict[str, torch.Tensor]:
        """Every trained tensor, full (gathered from the shards under FSDP), float32, on the CPU."""
        out = {}
        for name, m in (("student", self.student), ("ema", self.ema), ("critic", self.critic)):
            out.update({f"{name}.{k}": v for k, v in _full_state(m).items()})
        return out

    def save(self) -> None:
        t0 = time.perf_counter()
        tensors = self.model_states()
        if self.world == 1:
            for name, opt in self._optimizers().items():
                tensors.update({f"{name}.{k}": v for k, v in _moments(opt).items()})
        if self.rank == 0:
            tw.save_tensors(self.out, "models", tensors)
            if self.pairs is not None and not list(self.out.glob("pairs*.safetensors")):
                tw.save_tensors(self.out, "pairs", self.pairs)
            atomic_write(self.out / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(self.state, indent=1)))
            write_curves(self.state, self.out)
            self.log(f"saved state to {self.out} ({time.perf_counter() - t0:.1f} s)")
        self.last_save = time.perf_counter()

    def snapshot(self, name: str) -> None:
        """The EMA student as it is now, float16, one safetensors file in `--out` (to compare phases)."""
        from safetensors.torch import save_file
        sd = {k[len("ema."):]: v.half().contiguous() for k, v in self.model_states().items() if k.startswith("ema.")}
        if self.rank == 0:
            atomic_write(self.out / name, lambda tmp: save_file(sd, tmp))

    def _maybe_save(self) -> None:
        if self._agree(time.perf_counter() - self.last_save > 60 * self.c.save_minutes):
            self.save()

    def _resume(self, folder: Path) -> dict[str, torch.Tensor]:
        if not (folder / "state.json").is_file():
            raise FileNotFoundError(f"--resume {folder}: no state.json")
        saved = json.loads((folder / "state.json").read_text())
        saved["config"] = asdict(self.c)
        self.state.update(saved)
        tensors = tw.load_tensors(folder, "models")
        for name, m in (("student", self.student), ("ema", self.ema), ("critic", self.critic)):
            m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        pairs = tw.load_tensors(folder, "pairs")
        self.pairs = {k: v.to(self.device) for k, v in pairs.items()} or None
        self.log(f"resumed from {folder}: phase {self.state['phase']}, ODE {self.state['ode_steps']} steps, "
                 f"DMD {self.state['dmd_steps']} steps")
        return {k: v.to(self.device) for k, v in tensors.items() if k.startswith("opt_")}

    def export(self, folder: str | os.PathLike) -> Path:
        """The EMA student in the causal layout `worldstream stream` loads: folder/transformers/."""
        state = {k[len("ema."):]: v for k, v in self.model_states().items() if k.startswith("ema.")}
        if self.rank == 0:
            export_student(folder, self.scfg, state)
        return Path(folder)


def student_from_teacher(cfg: DiTConfig, teacher: WanDiT) -> WanDiT:
    """The student initialised from the teacher: every tensor outside the blocks, and `cfg.num_layers` of the
    teacher's blocks evenly spaced (the first and the last kept)."""
    student = WanDiT(cfg)
    n, m = teacher.cfg.num_layers, cfg.num_layers
    pick = [round(i * (n - 1) / max(m - 1, 1)) for i in range(m)]
    sd = {}
    for k, v in teacher.state_dict().items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            for j, src in enumerate(pick):
                if src == i:
                    sd[f"blocks.{j}." + k.split(".", 2)[2]] = v.detach().clone()
        else:
            sd[k] = v.detach().clone()
    student.load_state_dict(sd)
    return student


def export_student(folder: str | os.PathLike, cfg: DiTConfig, state: dict[str, torch.Tensor]) -> Path:
    from ..testing.dit import write_dit_dir   # (testing sits below train)
    rt = cfg.realtime
    d = Path(folder) / "transformers"
    write_dit_dir(d, cfg, shards=2, dtype=torch.float16, state={k: v.float() for k, v in state.items()},
                  class_name="WanModelFast", extra_config={"num_frames_per_block": rt.chunk,
                                                           "local_attn_size": rt.window, "sink_size": rt.sink})
    return d


# ---------------------------------------------------------------------------------------------- helpers

def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local(params) -> list[torch.Tensor]:
    """Parameters as local tensors (an FSDP shard's own part)."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if any(hasattr(p, "to_local") for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def _moments(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(p for group in opt.param_groups for p in group["params"]):
        for k, v in opt.state.get(p, {}).items():
            out[f"{i}.{k}"] = v.detach().float().cpu().reshape(1 if k == "step" else -1)
    return out


def _load_moments(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    for i, p in enumerate(p for group in opt.param_groups for p in group["params"]):
        st = {}
        for k in ("step", "exp_avg", "exp_avg_sq"):
            v = tensors.get(f"{i}.{k}")
            if v is not None:
                st[k] = v.reshape(()) if k == "step" else v.reshape(p.shape).to(p.device, p.dtype)
        if st:
            opt.state[p] = st


def write_curves(state: dict, folder: Path) -> None:
    """curves.json (the loss histories) and, with matplotlib, curves.png."""
    curves = {k: state.get(k, []) for k in ("ode_loss", "dmd_loss", "critic_loss")}
    atomic_write(folder / "curves.json", lambda tmp: Path(tmp).write_text(json.dumps(curves)))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.4))
    for a, (key, title) in zip(ax, [("ode_loss", "ODE regression: MSE of x0"),
                                    ("dmd_loss", "DMD generator loss"),
                                    ("critic_loss", "critic flow-matching loss")]):
        pts = np.array(curves[key] or [[0, np.nan, 0]], dtype=float)
        a.plot(pts[:, 0], pts[:, 1], lw=0.8)
        a.set(title=title, xlabel="step", yscale="log" if np.nanmin(pts[:, 1]) > 0 else "linear")
        a.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(folder / "curves.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- entry

def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="worldstream train distill", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", required=True, help="folder for the training state, curves and log")
    a("--resume", help="state folder to continue from (may equal --out)")
    a("--export", help="write the EMA student here at the end (DIR/transformers/, the causal layout)")
    a("--preset", choices=sorted(PRESETS), default="gpu", help="sizes for a GPU (default) or a quick CPU run")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in fields(DistillConfig):
        if f.type in ("bool", bool):
            a(f"--{f.name}", type=lambda v: v.lower() in ("1", "true", "yes", "on"), default=None,
              metavar="on|off", help=f"(default {f.default})")
        else:
            a(f"--{f.name}", type=type(f.default), default=None, help=f"(default {f.default}; preset may change it)")
    return p


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    kw = dict(PRESETS[args.preset])
    kw.update({f.name: getattr(args, f.name) for f in fields(DistillConfig) if getattr(args, f.name) is not None})
    c = DistillConfig(**kw)
    if not c.teacher:
        from ..testing.world import WORLD_CHECKPOINT
        c.teacher = str(WORLD_CHECKPOINT)
    check_config(c, args.resume)
    return c


def check_config(c: DistillConfig, resume=None) -> None:
    """Bad input fails here, in one line, before anything is loaded or rendered."""
    from ..pipelines.conditioning import GenerationError   # (pipelines sits below train)
    try:
        cfg = get_config(c.student)
    except KeyError as e:
        raise GenerationError(f"--student: {e.args[0]}") from None
    if cfg.realtime is None:
        raise GenerationError(f"--student {c.student}: not a causal student (no chunk loop settings)")
    lat = cfg.latents.latent_frames(c.frames)
    if (c.frames - 1) % cfg.latents.stride[0] or lat % cfg.realtime.chunk or lat < 2 * cfg.realtime.chunk:
        raise GenerationError(f"--frames {c.frames}: needs 4k + 1 frames making at least two whole chunks of "
                              f"{cfg.realtime.chunk} latent frames (e.g. 21 or 33)")
    if c.minutes <= 0 or c.pool_clips < 1 or c.ode_batch < 1 or c.dmd_batch < 1 or c.critic_steps < 0:
        raise GenerationError("--minutes, --pool_clips, --ode_batch, --dmd_batch must be positive, "
                              "--critic_steps >= 0")
    if resume is not None and not (Path(resume) / "state.json").is_file():
        raise GenerationError(f"--resume {resume}: no state.json there (not a distillation state folder)")


def distill(c: DistillConfig, out: str | os.PathLike, device="cpu", resume=None, export=None, log=print
            ) -> Distiller:
    """The whole run: conditions, then the recipe within `c.minutes`, then the state, curves and export."""
    from ..testing.world import WorldModel   # (testing sits below train)
    t_start = time.perf_counter()
    budget = 60 * c.minutes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(c.seed)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    teacher = WorldModel.load(c.teacher, device, dtype=torch.float32)
    data = build_conditions(c, teacher, device, log=log)
    d = Distiller(c, out, device, teacher, resume=Path(resume) if resume else None, log=log)
    if d.rank == 0:
        log(f"config: {asdict(c)}; {d.world} process(es)")
        log(f"student {d.scfg.name}: {sum(p.numel() for p in d.student.parameters()):,} parameters "
            f"(per process); teacher {teacher.config.name}; schedule t = {d.schedule.timesteps}")
    reserve = 15.0 + 0.02 * budget                        # the final save and export
    d.run(data, max(0.0, budget - (time.perf_counter() - t_start) - reserve))
    d.save()
    if export:
        d.export(export)
        if d.rank == 0:
            log(f"exported the EMA student to {Path(export) / 'transformers'}")
    if d.rank == 0:
        log(f"done in {time.perf_counter() - t_start:.0f} s")
    return d


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    args = args or build_parser().parse_args(argv)
    c = config_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = _rank_world()[0]
    logf = open(out / "train.log", "a") if rank == 0 else None

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if logf:
            logf.write(line + "\n")
            logf.flush()

    try:
        distill(c, out, device, resume=args.resume, export=args.export, log=log)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
