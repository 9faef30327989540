"""Step caching: skip the DiT's block stack at denoising steps where its output would change little, and reuse the
residual it added at the last computed step (the TeaCache / MagCache / EasyCache family; this is worldstream's
own rule, in the spirit of EasyCache's runtime-adaptive one: no calibration per model).

What is reused. A computed step keeps what the block stack added to its input tokens (output - input, float32;
models/dit.py `StackCache`). A skipped step still embeds its own latents and timestep and runs the head, but
adds that kept residual instead of running the blocks: no block forward and no weight transfer (the streaming
engine never sees it). Classifier-free guidance keeps one residual per branch (one batch-2 tensor when the two
run batched).

When to skip, decided before block 0 of each step from numbers the loop already has (the latents x_i going in
and the guided velocity v of computed steps), all in float64 so that the same run makes the same decisions:

    k      = mean|v_a - v_b| / mean|x_a - x_b|     over the last two computed steps a, b of this expert: how much
                                                    the output moves per unit of input movement
    d_i    = k * mean|x_i - x_{i-1}| / mean|v_a|    the predicted relative change of the output at step i
    acc   += d_i;  skip while acc < threshold (and at most `max_skips` steps in a row); a computed step resets acc

Always computed: the first `warmup` share of the run's steps, the first two steps of each expert (k needs two of
its own; the other expert's residual means nothing to it), the last step of each expert (the last step fixes
the details; and then the forward after any skipped one belongs to the same expert, so the blocks the engine
prefetched for it at the end of the last computed forward are the ones the next computed forward needs), and
every step when `threshold` is 0 (the output is then exactly the uncached run's).

`threshold` is the accumulated relative output change allowed before the stack runs again: 0 never skips,
larger skips more. Measured costs are in README.md ("Step caching"). With 0 nothing is kept either (there is
nothing to reuse): the run is the uncached one, and the cache only records its signal `d_i` per step
(`signals`), from which `threshold_for` finds the threshold that would skip a given number of steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..models.dit import StackCache

MAX_THRESHOLD = 10.0


@dataclass
class StepCache:
    threshold: float
    max_skips: int = 3            # skipped steps in a row, at most
    warmup: float = 0.1           # this share of the first steps is always computed
    max_total: int | None = None  # skipped steps in a run, at most (benchmarks: "skip N steps")
    skipped: list[int] = field(default_factory=list)
    computed: list[int] = field(default_factory=list)
    signals: list = field(default_factory=list)   # d_i per step (None where it cannot be computed yet)

    def __post_init__(self):
        if not (math.isfinite(self.threshold) and 0 <= self.threshold <= MAX_THRESHOLD):
            raise ValueError(f"step cache threshold must be from 0 to {MAX_THRESHOLD:g}, got {self.threshold}")
        self._forced: set[int] = set()
        self._expert_of: list[str] = []
        self._stacks: dict[str, list[StackCache]] = {}
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []   # (x, v) of this expert's computed steps
        self._x_prev: torch.Tensor | None = None
        self._acc = 0.0
        self._run = 0

    # ---- the run -------------------------------------------------------------------------------------------------
    def start(self, experts_per_step: list[str]) -> None:
        """A new run whose step i uses expert `experts_per_step[i]`."""
        n = len(experts_per_step)
        self._expert_of = list(experts_per_step)
        forced = set(range(min(n, math.ceil(self.warmup * n))))
        for i, e in enumerate(experts_per_step):
            if i == 0 or experts_per_step[i - 1] != e:
                forced |= {i, i + 1}
            if i == n - 1 or experts_per_step[i + 1] != e:
                forced.add(i)
        self._forced = {i for i in forced if i < n}
        self._stacks, self._history, self._x_prev = {}, [], None
        self._acc, self._run = 0.0, 0
        self.skipped, self.computed, self.signals = [], [], []

    @property
    def forced(self) -> set[int]:
        """The steps of the current run that are always computed."""
        return set(self._forced)

    def stacks(self, expert: str, branches: int) -> list[StackCache | None]:
        """The residual buffers of `expert`'s forwards (one per CFG branch forward); another expert's are freed
        (its residuals mean nothing to this one). Threshold 0: None (nothing will be reused, nothing is kept)."""
        if self.threshold == 0:
            return [None] * branches
        for other in [e for e in self._stacks if e != expert]:
            for s in self._stacks.pop(other):
                s.clear()
        have = self._stacks.setdefault(expert, [])
        while len(have) < branches:
            have.append(StackCache())
        return have[:branches]

    def decide(self, i: int, x: torch.Tensor) -> bool:
        """Whether step i (latents `x` going in) reuses the last residual instead of running the blocks."""
        expert = self._expert_of[i]
        if i > 0 and self._expert_of[i - 1] != expert:
            self._history = []                    # a new expert: its own two computed steps first
        x = x.detach().double()
        skip, signal = False, None
        if len(self._history) >= 2 and self._x_prev is not None:
            (xa, va), (xb, vb) = self._history[-1], self._history[-2]
            dx = (xa - xb).abs().mean().item()
            out = va.abs().mean().item()
            if dx > 0 and out > 0:
                signal = (va - vb).abs().mean().item() / dx * (x - self._x_prev).abs().mean().item() / out
        self.signals.append(signal)
        if i not in self._forced and self.threshold > 0 and signal is not None:
            self._acc += signal
            skip = self._acc < self.threshold and self._run < self.max_skips
            if self.max_total is not None and len(self.skipped) >= self.max_total:
                skip = False
        if not skip:
            self._acc = 0.0
        for s in self._stacks.get(expert, []):
            s.reuse = skip
        self._x_prev = x
        return skip

    def done(self, i: int, x: torch.Tensor, v: torch.Tensor, skipped: bool) -> None:
        """After step i: its input latents and the guided velocity it used."""
        if skipped:
            self.skipped.append(i)
            self._run += 1
            return
        self.computed.append(i)
        self._run = 0
        self._history = (self._history + [(x.detach().double(), v.detach().double())])[-2:]

    def finish(self) -> dict:
        """Free the residuals; what the run did."""
        for stacks in self._stacks.values():
            for s in stacks:
                s.clear()
        self._stacks, self._history, self._x_prev = {}, [], None
        return {"threshold": self.threshold, "skipped_steps": list(self.skipped),
                "skipped": len(self.skipped), "computed": len(self.computed)}


def threshold_for(signals: list, forced: set[int], skips: int, max_skips: int = 3) -> float | None:
    """The smallest threshold under which the rule would skip at least `skips` steps of a run whose per-step
    signals were `signals` (recorded by a run at threshold 0) and whose always-computed steps are `forced`; None
    if no threshold reaches it. Approximate for the cached run: its skips change its latents, hence its signals
    (the benchmark reports the skips the cached run really made)."""
    def count(threshold: float) -> int:
        acc, run, n = 0.0, 0, 0
        for i, d in enumerate(signals):
            skip = False
            if i not in forced and d is not None:
                acc += d
                skip = acc < threshold and run < max_skips
            if skip:
                n, run = n + 1, run + 1
            else:
                acc, run = 0.0, 0
        return n
    lo, hi = 0.0, max([d for d in signals if d is not None] or [0.0]) * (max_skips + 1) + 1e-9
    if count(hi) < skips:
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < skips else (lo, mid)
    return hi
