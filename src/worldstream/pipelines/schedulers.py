"""Flow-matching samplers used by Wan / LingBot-World: UniPC (order 2, bh2) and plain Euler.

The model is trained on x_σ = (1 − σ)·x0 + σ·noise and predicts the flow velocity v = noise − x0, so
x0 = x − σ·v. Both samplers walk the same schedule (spec section 4, upstream
`wan/utils/fm_solvers_unipc.py` as set up by `wan/image2video.py`):

    σ_i   = linspace(σ_max, 0, steps + 1)[:-1]       σ_max = float32(0.999), computed in float64
    σ_i'  = s·σ_i / (1 + (s − 1)·σ_i)                 shift s, still float64
    t_i   = int64(σ_i' · 1000)                        truncated, not rounded
    sigmas = float32([σ_0', …, σ_{steps−1}', 0])

The UniPC update reproduces upstream's arithmetic: every scalar (σ, λ = log α − log σ, h, B(h), ρ) is a
0-dim float32 tensor combined in the same order, and the sample is kept in its own dtype (float32
upstream). Only the schedule itself is built in float64.

Usage::

    sched = FlowUniPC(num_steps=70, shift=10.0)
    for t in sched.timesteps:
        model = experts[expert_for(t, boundary=0.947)]
        x = sched.step(model(x, t), x)
"""
from __future__ import annotations

import numpy as np
import torch

# Upstream builds σ_max as float32(1 − 1/1000) from its 1000-step training table (0.9990000128746033).
SIGMA_MAX = float(np.float32(1.0 - 1.0 / 1000))


def flow_schedule(num_steps: int, shift: float, num_train_timesteps: int = 1000,
                  sigma_max: float = SIGMA_MAX) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas float32 [num_steps + 1] ending in 0, timesteps int64 [num_steps]) of the shifted flow schedule."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    sigmas = np.linspace(sigma_max, 0.0, int(num_steps) + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)  # truncation toward zero
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return torch.from_numpy(sigmas), timesteps


def expert_for(t, boundary: float, num_train_timesteps: int = 1000) -> str:
    """Which Wan2.2 / LingBot expert denoises timestep `t`: "high" if t >= boundary·1000, else "low".

    Same comparison as upstream (`t.item() >= boundary * num_train_timesteps`), so with LingBot's
    boundary 0.947 the 70-step schedule gives 26 high-noise + 44 low-noise steps, and Wan2.2's 0.9 with
    40 steps gives 15 + 25.
    """
    t = t.item() if isinstance(t, torch.Tensor) else t
    return "high" if t >= boundary * num_train_timesteps else "low"


class _FlowSampler:
    """Schedule plus a step counter shared by the samplers below."""

    def __init__(self, num_steps: int, shift: float, num_train_timesteps: int = 1000):
        self.num_steps = int(num_steps)
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps
        self.sigmas, self.timesteps = flow_schedule(num_steps, shift, num_train_timesteps)
        self.reset()

    def reset(self) -> None:
        """Forget all history; the next `step` is step 0 again."""
        self.step_index = 0

    def _check_step(self) -> int:
        if self.step_index >= self.num_steps:
            raise RuntimeError(f"{type(self).__name__}: all {self.num_steps} steps are done; "
                               "call reset() to start over")
        return self.step_index


class FlowEuler(_FlowSampler):
    """First-order flow sampler: x_next = x + (σ_next − σ)·v. Integrates a constant velocity exactly."""

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self._check_step()
        dt = self.sigmas[i + 1] - self.sigmas[i]  # 0-dim float32
        self.step_index += 1
        return (x + dt * v).to(x.dtype)


class FlowUniPC(_FlowSampler):
    """UniPC multistep flow sampler: order 2, B(h) = expm1(h) ("bh2"), data (x0) prediction.

    Each call takes the velocity predicted at the current sample and returns the next sample:
      1. x0 = x − σ_i·v (the "model output" UniPC works with);
      2. from step 1 on, the UniC corrector first refines x using this new x0 (and the previous one);
      3. the UniP predictor moves the (corrected) x to σ_{i+1}: order 1 on the first step (warm-up)
         and the last step (lower_order_final), order 2 in between.
    The last step goes to σ = 0 and returns x0 itself.
    """

    order = 2

    def reset(self) -> None:
        super().reset()
        self._x0_prev: torch.Tensor | None = None   # x0 of the previous step (m_{i-1})
        self._x0_last: torch.Tensor | None = None   # x0 of the latest step (m_i)
        self._x_last: torch.Tensor | None = None     # sample the previous predictor started from
        self._order_last = 0                         # order the previous predictor used
        self._steps_seen = 0                         # warm-up counter (lower_order_nums upstream)

    def _lambda(self, i: int) -> torch.Tensor:
        """λ_i = log α_i − log σ_i with α = 1 − σ (0-dim float32; +inf at σ = 0)."""
        sigma = self.sigmas[i]
        return torch.log(1 - sigma) - torch.log(sigma)

    def _coefficients(self, i_from: int, i_to: int):
        """(σ_to/σ_from, α_to, h·φ1 = expm1(−h), B(h) = expm1(−h)) for a step σ_from → σ_to."""
        sigma_to, sigma_from = self.sigmas[i_to], self.sigmas[i_from]
        alpha_to = 1 - sigma_to
        hh = -(self._lambda(i_to) - self._lambda(i_from))
        h_phi_1 = torch.expm1(hh)
        return sigma_to / sigma_from, alpha_to, hh, h_phi_1, torch.expm1(hh)

    def _rk(self, i_prev: int, i_from: int, i_to: int) -> torch.Tensor:
        """r = (λ_prev − λ_from) / h: where the older x0 sits relative to the current step length."""
        h = self._lambda(i_to) - self._lambda(i_from)
        return (self._lambda(i_prev) - self._lambda(i_from)) / h

    def _predict(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniP: move x from σ_i to σ_{i+1} using m_i (and m_{i−1} for order 2)."""
        ratio, alpha_t, _, h_phi_1, b_h = self._coefficients(i, i + 1)
        m0 = self._x0_last
        x_t = ratio * x - alpha_t * h_phi_1 * m0
        if order == 2:
            rk = self._rk(i - 1, i, i + 1)
            d1 = (self._x0_prev - m0) / rk
            rho = torch.tensor(0.5, dtype=x.dtype)  # upstream's simplified order-2 ρ_p
            x_t = x_t - alpha_t * b_h * (rho * d1)
        return x_t.to(x.dtype)

    def _correct(self, x0_new: torch.Tensor, i: int) -> torch.Tensor:
        """UniC: redo the last predictor step (σ_{i−1} → σ_i) with the new x0 at σ_i as an extra node."""
        order = self._order_last
        x = self._x_last
        ratio, alpha_t, hh, h_phi_1, b_h = self._coefficients(i - 1, i)
        m0 = self._x0_last
        x_t = ratio * x - alpha_t * h_phi_1 * m0
        d1_t = x0_new - m0
        if order == 1:
            rho_c = torch.tensor([0.5], dtype=x.dtype)
            corr = 0
        else:  # order 2: solve [[1, 1], [r, 1]] ρ = b for the two weights
            rk = self._rk(i - 2, i - 1, i)
            d1 = (self._x0_prev - m0) / rk
            h_phi_k = h_phi_1 / hh - 1
            b1 = h_phi_k * 1 / b_h
            h_phi_k = h_phi_k / hh - 1 / 2
            b2 = h_phi_k * 2 / b_h
            rks = torch.tensor([rk, 1.0])
            R = torch.stack([torch.ones_like(rks), rks])
            rho_c = torch.linalg.solve(R, torch.tensor([b1, b2])).to(x.dtype)
            corr = rho_c[0] * d1
        x_t = x_t - alpha_t * b_h * (corr + rho_c[-1] * d1_t)
        return x_t.to(x.dtype)

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One sampler step: velocity `v` predicted at sample `x` (σ = sigmas[step_index]) -> next sample."""
        i = self._check_step()
        x0 = x - self.sigmas[i] * v
        if i > 0 and self._x_last is not None:
            x = self._correct(x0, i)
        self._x0_prev, self._x0_last = self._x0_last, x0
        order = min(self.order, self.num_steps - i, self._steps_seen + 1)
        self._x_last, self._order_last = x, order
        x_next = self._predict(x, i, order)
        self._steps_seen = min(self._steps_seen + 1, self.order)
        self.step_index += 1
        return x_next


class FlowDistill:
    """LightX2V's step-distilled students (WanStepDistillScheduler; shared/spec/more-models.md): `timesteps`
    (1000, 750, 500, 250) index the 1000-step table

        σ = linspace(1, 0, 1001)[:-1]  (float32)     σ' = s·σ / (1 + (s − 1)·σ)  (float32, shift s = 5)
        σ_k = σ'[1000 − t_k],  model timestep = σ_k · 1000  (a float: 1000, 937.5, 833.33, 625; not truncated)

    and each step is deterministic Euler on the velocity, in upstream's order of roundings (float32, σ as
    Python floats): x0 = x − σ_k·v, then x = x0 + σ_{k+1}·v (= x − (σ_k − σ_{k+1})·v); the last step returns x0.
    No CFG, no re-noise. Two experts: steps before `boundary_step` use the high-noise expert."""

    def __init__(self, timesteps=(1000, 750, 500, 250), shift: float = 5.0, boundary_step: int | None = None,
                 num_train_timesteps: int = 1000):
        steps = tuple(int(t) for t in timesteps)
        if not steps or any(not 0 < t <= num_train_timesteps for t in steps):
            raise ValueError(f"distill timesteps {timesteps} must lie in 1..{num_train_timesteps}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        table = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
        table = shift * table / (1 + (shift - 1) * table)
        idx = [num_train_timesteps - t for t in steps]
        self.step_list = steps
        self.shift = float(shift)
        self.boundary_step = boundary_step
        self.num_steps = len(steps)
        self.sigma_list = [float(table[i]) for i in idx]                 # σ_k as upstream's .item()
        self.timesteps = (table * num_train_timesteps)[idx]              # float32 [steps]
        self.sigmas = torch.tensor(self.sigma_list + [0.0], dtype=torch.float32)
        self.reset()

    def reset(self) -> None:
        self.step_index = 0

    def expert(self, i: int) -> str:
        """The expert of step i for a two-expert model."""
        return "high" if self.boundary_step is not None and i < self.boundary_step else "low"

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        if i >= self.num_steps:
            raise RuntimeError(f"FlowDistill: all {self.num_steps} steps are done; call reset() to start over")
        v = v.to(torch.float32)
        out = x.to(torch.float32) - self.sigma_list[i] * v
        if i < self.num_steps - 1:
            out = out + v * self.sigma_list[i + 1]
        self.step_index += 1
        return out.to(x.dtype)


class CausalSchedule:
    """The few-step sampler of the causal students (spec realtime.md, upstream image2video_fast.py).

    The model sees the timesteps `t_k = timesteps[index_k]` of the 1000-step flow schedule with `shift`
    (int64-truncated, as in `flow_schedule`). Each step predicts v at x_t and takes x0 = x_t − σ·v (in float64,
    returned as float32); every step but the last re-noises x0 to the next timestep, x = (1 − σ')·x0 + σ'·ε.
    Upstream looks σ up twice, differently, and both are reproduced:
      * for x0, the first index of the 1000-step table holding t (argmin |timesteps − t|): `sigma_x0`;
      * for the re-noise, the scheduler's `index_for_timestep`, which takes the second index when t repeats
        in the table (it does near t = 1000 at shift 10): `sigma_noise`. They differ by ~1e-4..1e-3.
    """

    def __init__(self, step_indices: tuple[int, ...], shift: float, num_train_timesteps: int = 1000):
        sigmas, timesteps = flow_schedule(num_train_timesteps, shift, num_train_timesteps)
        self.indices = tuple(int(i) for i in step_indices)
        if not self.indices or any(not 0 <= i < num_train_timesteps for i in self.indices):
            raise ValueError(f"step indices {step_indices} must lie in 0..{num_train_timesteps - 1}")
        self.shift = float(shift)
        self.timesteps = [int(timesteps[i]) for i in self.indices]
        self.sigma_x0, self.sigma_noise = [], []
        for t in self.timesteps:
            where = (timesteps == t).nonzero().flatten().tolist()
            self.sigma_x0.append(float(sigmas[where[0]]))
            self.sigma_noise.append(float(sigmas[where[1] if len(where) > 1 else where[0]]))

    def __len__(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def x0(x_t: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
        """x0 = x_t − σ·v, computed in float64, returned as float32."""
        return (x_t.double() - torch.tensor(sigma, dtype=torch.float32).double() * v.double()).float()

    @staticmethod
    def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """(1 − σ)·x0 + σ·ε in float32 (upstream's add_noise)."""
        s = torch.tensor(sigma, dtype=torch.float32)
        return (1 - s) * x0.float() + s * noise.float()
