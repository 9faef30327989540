"""Step caching (pipelines/step_cache.py): a threshold of 0 gives exactly the uncached run; the skip decisions
are deterministic and respect the steps that are always computed; a skipped step runs no block and copies no
weight through the streaming engine, whose prefetch stays exact (no resync) across skips and the expert switch;
what it costs in accuracy on random weights is small and measured."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from worldstream.models.configs import get_config
from worldstream.pipelines.generate import format_report, run
from worldstream.pipelines.sampling import sample
from worldstream.pipelines.schedulers import FlowUniPC, expert_for
from worldstream.pipelines.step_cache import StepCache
from worldstream.pipelines.tasks import prepare
from worldstream.runtime.loading import CheckpointLoader
from worldstream.runtime.planner import Plan
from worldstream.runtime.runner import DiTRunner, Forward
from worldstream.checkpoints.dit import find_checkpoint
from worldstream.testing import write_dit_dir, write_tiny_checkpoint
from worldstream.testing.checkpoint import demo_image


@pytest.fixture(scope="module")
def lingbot(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lb") / "ckpt", "lingbot-cam-tiny", seed=1)


@functools.cache
def job_of(root: Path, steps: int = 16):
    return prepare(root, "a walk through a town", image=demo_image(64, 48), size="64*48", frame_num=9,
                   action_string="w-4,jw-4", steps=steps, seed=42)


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("batched", [True, False])
def test_threshold_zero_is_the_uncached_run_bit_for_bit(lingbot, batched):
    """0 and a threshold too small to ever skip (which keeps a residual at every step, the machinery of a
    caching run) both give the uncached run exactly."""
    job = job_of(lingbot)
    plain = run(job, device="cpu", progress=False, batched_guidance=batched)
    for threshold in (0.0, 1e-12):
        cached = run(job, device="cpu", progress=False, batched_guidance=batched, step_cache=threshold)
        assert torch.equal(cached.latents, plain.latents) and torch.equal(cached.frames, plain.frames)
        assert cached.report["step_cache"]["skipped"] == 0 and plain.report["step_cache"] is None
        assert cached.report["runner"]["cached_forwards"] == 0
        assert sum(d is not None for d in cached.report["step_cache"]["signals"]) > job.steps // 2


def test_threshold_for_a_number_of_skips(lingbot):
    """A run at threshold 0 records the signal per step; `threshold_for` turns it into the threshold that skips
    a given number of steps (approximately: skipping changes the latents the signal is computed from)."""
    from worldstream.pipelines.step_cache import threshold_for

    job = job_of(lingbot)
    seen = run(job, device="cpu", progress=False, step_cache=0.0).report["step_cache"]
    th = threshold_for(seen["signals"], set(seen["forced"]), 5)
    assert th is not None and th > 0
    got = run(job, device="cpu", progress=False, step_cache=th).report["step_cache"]["skipped"]
    assert 2 <= got <= 8, got
    assert threshold_for(seen["signals"], set(range(job.steps)), 1) is None   # everything forced: impossible


def test_skips_are_deterministic_and_reported(lingbot):
    job = job_of(lingbot)
    plain = run(job, device="cpu", progress=False)
    a = run(job, device="cpu", progress=False, step_cache=1.0)
    b = run(job, device="cpu", progress=False, step_cache=1.0)
    sa, sb = a.report["step_cache"], b.report["step_cache"]
    assert sa == sb and torch.equal(a.latents, b.latents)
    assert sa["skipped"] > 0 and sa["skipped"] + sa["computed"] == job.steps
    assert a.report["runner"]["cached_forwards"] == sa["skipped"]          # batched CFG: one forward a step
    # always computed: the warm-up, each expert's first two steps and its last step
    experts = [expert_for(t, job.boundary) for t in FlowUniPC(job.steps, job.shift).timesteps]
    first = [i for i in range(job.steps) if i == 0 or experts[i - 1] != experts[i]]
    last = [i for i in range(job.steps) if i == job.steps - 1 or experts[i + 1] != experts[i]]
    assert len(first) == 2                                                    # both experts ran
    assert not set(sa["skipped_steps"]) & {*first, *(i + 1 for i in first), *last, 0, 1}
    # no more than max_skips in a row
    run_len, longest = 0, 0
    for i in range(job.steps):
        run_len = run_len + 1 if i in sa["skipped_steps"] else 0
        longest = max(longest, run_len)
    assert longest <= StepCache(1.0).max_skips
    err = rel_err(a.latents, plain.latents)
    print(f"threshold 1.0: skipped {sa['skipped']} of {job.steps} steps, final latent rel. error {err:.4f}")
    assert 0 < err < 0.2
    assert f"skipped {sa['skipped']} of {job.steps} steps" in format_report(a)


def test_the_decision_is_a_function_of_what_the_loop_saw():
    """Same sequence of latents and velocities in, same decisions out; the forced steps are never skipped."""
    experts = ["high"] * 6 + ["low"] * 10

    def decisions():
        g = torch.Generator().manual_seed(0)
        cache = StepCache(0.5, max_skips=2, warmup=0.0)
        cache.start(experts)
        x = torch.randn(4, 3, 5, generator=g)
        for i in range(len(experts)):
            skip = cache.decide(i, x)
            v = x * 0.9 + 0.01 * torch.randn(4, 3, 5, generator=g)
            cache.done(i, x, v, skip)
            x = x - 0.02 * v
        return cache.skipped
    a = decisions()
    assert a == decisions() and a
    assert not set(a) & {0, 1, 5, 6, 7, 15}
    with pytest.raises(ValueError, match="threshold"):
        StepCache(-0.1)
    with pytest.raises(ValueError, match="threshold"):
        StepCache(float("nan"))


# ---- the runner: no forward, no weight transfer, exact prefetch -----------------------------------------------

class KeepTrace(DiTRunner):
    """The runner, keeping its engine's trace and counters when it frees everything at the end."""

    def close(self) -> None:
        if self.engine is not None:
            self.kept = (list(self.engine.trace), dict(self.engine.stats))
        super().close()


def stream_plan(n):
    return Plan(n_blocks=n, block_bytes=0, resident=[], prefetch=1, batched_guidance=True, chunk=None,
                ram_blocks=list(range(n)), disk_blocks=[], vram_peak=0, ram_peak=0, weights_in_ram=0,
                step_seconds=0, resident_step_seconds=0, block_compute_s=0, block_copy_s=0)


@pytest.fixture(scope="module")
def two_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    cfg = get_config("lingbot-cam-tiny")
    write_dit_dir(root / "high_noise_model", cfg, seed=1)
    write_dit_dir(root / "low_noise_model", cfg, seed=2)
    return find_checkpoint(root)


@pytest.mark.parametrize("batched", [True, False])
def test_a_skipped_step_runs_no_block_and_copies_no_weight(two_experts, batched):
    """Every block streams (2 GPU slots, the CPU stand-in of the engine). Computed forwards each copy and run the
    stack's blocks; cached forwards add nothing to the engine's trace; prefetch never resyncs, across skips and
    across the expert switch."""
    ckpt, cfg = two_experts, two_experts.config
    g = torch.Generator().manual_seed(3)
    f, h, w = 2, 4, 6
    noise = torch.randn(16, f, h, w, generator=g)
    y = torch.randn(20, f, h, w, generator=g)
    camera = torch.randn(1, 384, f, h, w, generator=g)
    ctx, null = torch.randn(5, cfg.text_dim, generator=g), torch.randn(3, cfg.text_dim, generator=g)
    sampler = FlowUniPC(20, 10.0)
    boundary = 0.947

    def go(cache):
        runner = KeepTrace(["high", "low"], CheckpointLoader(ckpt), "cpu", torch.float32, stream_plan(2),
                           keep_all=True, trace=True)
        out = sample(runner, noise, FlowUniPC(20, 10.0), ["high", "low"], boundary, (5.0, 5.0), ctx, null,
                     y=y, camera=camera, batched_guidance=batched, step_cache=cache)
        return out, runner

    _, plain = go(None)
    cache = StepCache(1.0)
    _, runner = go(cache)
    per_step = 1 if batched else 2
    trace, stats = runner.kept
    computes = [t for t in trace if t[0] == "compute"]
    copies = [t for t in trace if t[0] == "copy"]
    assert cache.skipped and runner.report["cached_forwards"] == per_step * len(cache.skipped)
    assert len(computes) == 2 * per_step * len(cache.computed)            # 2 streamed blocks per computed forward
    plain_trace, plain_stats = plain.kept
    plain_extra = sum(t[0] == "copy" for t in plain_trace) - sum(t[0] == "compute" for t in plain_trace)
    assert len(copies) - len(computes) == plain_extra <= 2   # beyond one copy per block run: the same as uncached
    assert stats["resyncs"] == plain_stats["resyncs"] == 0  # (the switch re-places the new expert; the end)
    assert runner.calls == plain.calls                        # the runner heard every forward of the schedule
    experts = [expert_for(t, boundary) for t in sampler.timesteps]
    assert experts.count("high") >= 3 and experts.count("low") >= 3
    skipped_experts = {experts[i] for i in cache.skipped}
    assert skipped_experts == {"high", "low"}                 # skips on both sides of the switch


def test_a_cached_forward_before_its_expert_computed_is_refused(two_experts):
    from worldstream.models.dit import StackCache

    runner = DiTRunner(["high", "low"], CheckpointLoader(two_experts), "cpu", torch.float32, None)
    runner.start([Forward("high", 1)])
    stack = StackCache()
    stack.reuse = True
    with pytest.raises(RuntimeError, match="cached forward"):
        runner("high", x=torch.zeros(1, 16, 2, 4, 6), t=torch.tensor([900.0]), context=torch.zeros(1, 5, 32),
               stack=stack)
