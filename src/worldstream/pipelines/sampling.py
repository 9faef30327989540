"""The bidirectional denoising loop: experts, classifier-free guidance, the sampler.

    runner.start(forward_schedule(experts per step, ...))      # the runner hears every forward up front
    for each timestep t:
        expert = "high" while t >= boundary * 1000, else "low" (one model: its only expert; the distilled
                 students: "high" for the steps before their boundary step)
        v = v_uncond + g * (v_cond - v_uncond)                  # g per expert; g == 1: v_cond alone
        x = sampler.step(v, x)

Classifier-free guidance runs cond and uncond as ONE forward of batch 2 by default (latents repeated, contexts
stacked, camera batch 1), so each weight crosses the bus once per step; the runner's plan may ask for two
forwards instead (less activation memory). Same math either way.

With a step cache (pipelines/step_cache.py) each step is first decided: computed (the blocks run and leave
their residual) or skipped (the forwards reuse it: embeddings and head only, no block, no weight transfer). The
runner still hears every forward of the schedule up front; a skipped step's forwards reach it marked as cached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..runtime.runner import Forward
from .conditioning import GenerationError
from .progress import Progress
from .schedulers import expert_for
from .step_cache import StepCache


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, n - t.shape[0]))


def _expert_of(t, experts: list[str], boundary: float | None) -> str:
    return expert_for(t, boundary) if len(experts) == 2 else experts[0]


def step_experts(sampler, experts: list[str], boundary: float | None) -> list[str]:
    """The expert of every step: the only one; or, for two, the sampler's own rule when it has one (the
    distilled students switch at a step index) else "high" while t >= boundary * 1000."""
    rule = getattr(sampler, "expert", None)
    if len(experts) == 2 and rule is not None and getattr(sampler, "boundary_step", None) is not None:
        return [rule(i) for i in range(len(sampler.timesteps))]
    return [_expert_of(t, experts, boundary) for t in sampler.timesteps]


def _scale_of(expert: str, guide_scale: tuple[float, float]) -> float:
    return guide_scale[1] if expert == "high" else guide_scale[0]


def forward_schedule(per_step: list[str], guide_scale: tuple[float, float], batched: bool) -> list[Forward]:
    """Every DiT forward of the run, in order: per step one batch-2 forward (guided, batched), two batch-1
    forwards (guided, not batched) or one batch-1 forward (scale 1), on that step's expert (`per_step`)."""
    out = []
    for e in per_step:
        if _scale_of(e, guide_scale) == 1.0:
            out.append(Forward(e, 1))
        else:
            out += [Forward(e, 2)] if batched else [Forward(e, 1), Forward(e, 1)]
    return out


def branches(scale: float, batched: bool) -> int:
    """Forwards per step: 1 (no guidance, or cond + uncond batched) or 2."""
    return 1 if scale == 1.0 or batched else 2


def guided_velocity(runner, expert: str, x: torch.Tensor, t: torch.Tensor, scale: float, context: torch.Tensor,
                    context_null: torch.Tensor, y: torch.Tensor | None, camera: torch.Tensor | None,
                    batched: bool, clip: torch.Tensor | None = None, stacks: list | None = None) -> torch.Tensor:
    """v_uncond + scale * (v_cond - v_uncond) at latents x [16, F, H, W] and timestep t (0-dim).

    batched: one forward of batch 2 (x repeated, contexts zero-padded to a common length and stacked, camera
    batch 1); else two batch-1 forwards. The DiT zero-pads every context to text_len itself, so padding here
    changes nothing. scale == 1: only the conditional forward. `clip` (Wan2.1 I2V: CLIP features [257, 1280])
    goes with both passes, as upstream gives `clip_fea` to the conditional and the unconditional forward.
    `stacks`: the step cache's residual buffers, one per forward (`branches`).
    """
    kw = [{"camera": camera} for _ in range(branches(scale, batched))]
    for i, k in enumerate(kw):
        if clip is not None:
            k["clip"] = clip[None]
        if stacks is not None and stacks[i] is not None:
            k["stack"] = stacks[i]
    if scale == 1.0:
        return runner(expert, x=x[None], t=t.reshape(1), context=context[None],
                      y=None if y is None else y[None], **kw[0])[0]
    if batched:
        n = max(context.shape[0], context_null.shape[0])
        ctx = torch.stack([_pad_rows(context, n), _pad_rows(context_null, n)])
        if clip is not None:
            kw[0]["clip"] = clip[None].expand(2, *clip.shape)
        out = runner(expert, x=x[None].expand(2, *x.shape), t=t.reshape(1).expand(2), context=ctx,
                     y=None if y is None else y[None].expand(2, *y.shape), **kw[0])
        v_cond, v_uncond = out[0], out[1]
    else:
        yy = None if y is None else y[None]
        v_cond = runner(expert, x=x[None], t=t.reshape(1), context=context[None], y=yy, **kw[0])[0]
        v_uncond = runner(expert, x=x[None], t=t.reshape(1), context=context_null[None], y=yy, **kw[1])[0]
    return v_uncond + scale * (v_cond - v_uncond)


def sample(runner, noise: torch.Tensor, sampler, experts: list[str], boundary: float | None,
           guide_scale: tuple[float, float], context: torch.Tensor, context_null: torch.Tensor,
           y: torch.Tensor | None = None, camera: torch.Tensor | None = None, batched_guidance: bool = True,
           progress: Progress | None = None, log: list | None = None, clip: torch.Tensor | None = None,
           step_cache: StepCache | None = None) -> torch.Tensor:
    """Run the whole schedule from `noise` [16, F, H, W] (float32, on the device) and return the latents.

    Step t uses expert_for(t, boundary) ("high" / "low") with guide_scale[1] / [0]; a single model uses
    experts[0] and guide_scale[0]. `log`, if given, receives (step, expert) per step. Latents that turn NaN/inf
    stop the loop at that step (GenerationError) instead of after the last one. `step_cache`: decide per step
    whether the blocks run (its `skipped` / `computed` lists say what happened).
    """
    per_step = step_experts(sampler, experts, boundary)
    runner.start(forward_schedule(per_step, guide_scale, batched_guidance))
    if step_cache is not None:
        step_cache.start(per_step)
    x = noise
    for i, t in enumerate(sampler.timesteps):
        e = per_step[i]
        scale = _scale_of(e, guide_scale)
        stacks, skip = None, False
        if step_cache is not None:
            stacks = step_cache.stacks(e, branches(scale, batched_guidance))
            skip = step_cache.decide(i, x)
        v = guided_velocity(runner, e, x, t.to(x.device), scale, context, context_null, y, camera,
                            batched_guidance, clip, stacks)
        if step_cache is not None:
            step_cache.done(i, x, v, skip)
        x = sampler.step(v.float(), x)
        if not torch.isfinite(x).all():   # stop now rather than finish a run whose video will be NaN
            raise GenerationError(
                f"the latents became NaN/inf at denoising step {i + 1} of {len(sampler.timesteps)} ({e} expert, "
                f"guide scale {_scale_of(e, guide_scale)}): the sampling diverged, so the run stopped there; "
                "lower --sample_guide_scale or --sample_shift, or use --dtype fp32")
        if log is not None:
            log.append((i, e))
        if progress is not None:
            note = f"({e})" if len(experts) == 2 else ""
            if step_cache is not None:
                note = (note + f" cached {len(step_cache.skipped)}").strip()
            progress.update(note=note)
    return x
