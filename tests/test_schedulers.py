"""Flow samplers vs diffusers' UniPC (flow-sigma mode) and vs values derived by hand from the spec formulas."""
import math
import warnings

import numpy as np
import pytest
import torch

from worldstream.pipelines.schedulers import (
    SIGMA_MAX,
    FlowEuler,
    FlowUniPC,
    expert_for,
    flow_schedule,
)

CONFIGS = [(70, 10.0), (20, 10.0), (40, 5.0), (4, 3.0), (2, 5.0), (1, 5.0)]


def diffusers_unipc(steps, shift):
    """diffusers' UniPC in flow mode, fed upstream's unshifted sigmas (its own default starts at 1.0)."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
        lower_order_final=True, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=shift, final_sigmas_type="zero",
    )
    sched.set_timesteps(sigmas=np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1])
    sched.set_begin_index(0)
    return sched


def hand_timestep(i, steps, shift):
    """t_i from the formulas: σ = σmax·(1 − i/steps), σ' = sσ/(1 + (s−1)σ), t = trunc(1000σ')."""
    sigma = SIGMA_MAX * (1 - i / steps)
    return int(1000 * shift * sigma / (1 + (shift - 1) * sigma))


@pytest.mark.parametrize("steps,shift", CONFIGS)
def test_schedule_matches_diffusers(steps, shift):
    ours = FlowUniPC(steps, shift)
    ref = diffusers_unipc(steps, shift)
    assert ours.sigmas.dtype == torch.float32 and ours.timesteps.dtype == torch.int64
    assert ours.sigmas.shape == (steps + 1,) and ours.timesteps.shape == (steps,)
    assert ours.sigmas[-1] == 0
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ref.timesteps)


def test_sigma_max_is_float32_of_0999():
    assert SIGMA_MAX == float(np.float32(0.999))
    assert SIGMA_MAX != 0.999  # upstream's value carries float32 rounding


@pytest.mark.parametrize("steps,shift", [(70, 10.0), (20, 10.0), (40, 5.0)])
def test_timesteps_by_hand(steps, shift):
    ts = FlowUniPC(steps, shift).timesteps.tolist()
    for i in range(steps):
        assert ts[i] == hand_timestep(i, steps, shift), i
    # truncation, not rounding: the first σ' is 0.99990… (shift 10) / 0.99980… (shift 5), both -> 999
    assert ts[0] == 999
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_first_timesteps_literal():
    # Computed by hand from the formulas above (70 steps shift 10: σ1 = 0.999·69/70 = 0.98473 ->
    # 9.8473 / 9.86257 = 0.99845 -> 998).
    assert FlowUniPC(70, 10.0).timesteps[:4].tolist() == [999, 998, 996, 995]
    assert FlowUniPC(20, 10.0).timesteps[:4].tolist() == [999, 994, 988, 982]
    assert FlowUniPC(40, 5.0).timesteps[:4].tolist() == [999, 994, 989, 983]


@pytest.mark.parametrize("steps,shift,boundary,high,low", [
    (70, 10.0, 0.947, 26, 44),   # LingBot Base
    (20, 10.0, 0.947, 8, 12),    # LingBot Act examples
    (40, 5.0, 0.900, 15, 25),    # Wan2.2 I2V A14B
])
def test_expert_split(steps, shift, boundary, high, low):
    ts = FlowUniPC(steps, shift).timesteps
    experts = [expert_for(t, boundary) for t in ts]
    assert experts.count("high") == high and experts.count("low") == low
    # high-noise steps come first, then low-noise ones, with no switching back
    assert experts == ["high"] * high + ["low"] * low
    # the same split counted from the hand formulas
    hand = [hand_timestep(i, steps, shift) >= boundary * 1000 for i in range(steps)]
    assert sum(hand) == high


def test_expert_for_boundary_inclusive():
    assert expert_for(947, 0.947) == "high"
    assert expert_for(946, 0.947) == "low"
    assert expert_for(torch.tensor(900), 0.9) == "high"
    assert expert_for(torch.tensor(899, dtype=torch.int64), 0.9) == "low"


@pytest.mark.parametrize("steps,shift", CONFIGS)
def test_unipc_matches_diffusers_random_v(steps, shift):
    ours, ref = FlowUniPC(steps, shift), diffusers_unipc(steps, shift)
    g = torch.Generator().manual_seed(steps)
    vs = [torch.randn(1, 4, 2, 3, 5, generator=g) for _ in range(steps)]
    x0 = torch.randn(1, 4, 2, 3, 5, generator=g)
    x, xd = x0.clone(), x0.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t, v in zip(ours.timesteps, vs):
            x = ours.step(v, x)
            xd = ref.step(v, t, xd, return_dict=False)[0]
            assert torch.equal(x, xd), int(t)
    assert x.dtype == torch.float32


@pytest.mark.parametrize("steps,shift", [(70, 10.0), (20, 10.0), (40, 5.0)])
def test_unipc_matches_diffusers_linear_field(steps, shift):
    """A toy linear velocity field v = A·x + b: the whole trajectory agrees to the last bit."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6, 6, generator=g) * 0.3
    b = torch.randn(6, 1, generator=g)
    field = lambda x: (A @ x[0] + b)[None]  # noqa: E731  x: [1, 6, n]
    ours, ref = FlowUniPC(steps, shift), diffusers_unipc(steps, shift)
    x = xd = torch.randn(1, 6, 8, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in ours.timesteps:
            x = ours.step(field(x), x)
            xd = ref.step(field(xd), t, xd, return_dict=False)[0]
    assert torch.equal(x, xd)


def test_unipc_last_step_returns_x0_prediction():
    s = FlowUniPC(3, 5.0)
    x = torch.randn(2, 5)
    for _ in range(2):
        x = s.step(torch.randn(2, 5), x)
    v = torch.randn(2, 5)
    # last step: the corrector refines x, then the order-1 predictor to σ = 0 returns
    # x0 = x − σ·v computed from the *uncorrected* x
    out = s.step(v, x)
    torch.testing.assert_close(out, x - s.sigmas[2] * v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [FlowEuler, FlowUniPC])
def test_constant_velocity_integrated_exactly(cls):
    """On the straight path x_σ = (1−σ)·x0 + σ·n the velocity n − x0 is constant: both samplers stay on it."""
    g = torch.Generator().manual_seed(3)
    x0, n = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    s = cls(12, 5.0)
    x = (1 - s.sigmas[0]) * x0 + s.sigmas[0] * n
    for i in range(12):
        x = s.step(n - x0, x)
        expect = (1 - s.sigmas[i + 1]) * x0 + s.sigmas[i + 1] * n
        torch.testing.assert_close(x, expect, rtol=0, atol=2e-5)
    torch.testing.assert_close(x, x0, rtol=0, atol=2e-5)


def test_euler_update_formula():
    s = FlowEuler(4, 3.0)
    x, v = torch.randn(5), torch.randn(5)
    out = s.step(v, x)
    sig = s.sigmas.double()
    torch.testing.assert_close(out.double(), x.double() + (sig[1] - sig[0]) * v.double(), rtol=0, atol=1e-6)
    assert torch.equal(s.timesteps, FlowUniPC(4, 3.0).timesteps)
    assert torch.equal(s.sigmas, FlowUniPC(4, 3.0).sigmas)


@pytest.mark.parametrize("steps,shift", [(20, 1.0), (40, 5.0)])
def test_unipc_more_accurate_than_euler_on_gaussian_data(steps, shift):
    """Data x0 ~ N(μ, s²): the exact ODE keeps z fixed in x_σ = (1−σ)μ + sqrt((1−σ)²s² + σ²)·z.

    Compare both samplers against it at σ_{N−1} (the step before the final jump to the posterior mean).
    """
    mu, sd = 0.7, 0.5

    def exact(z, sigma):
        return (1 - sigma) * mu + math.sqrt((1 - sigma) ** 2 * sd * sd + sigma ** 2) * z

    def velocity(x, sigma):  # E[n − x0 | x_σ]
        var = (1 - sigma) ** 2 * sd * sd + sigma ** 2
        r = x - (1 - sigma) * mu
        return sigma / var * r - (mu + (1 - sigma) * sd * sd / var * r)

    z = torch.linspace(-2, 2, 11, dtype=torch.float64)
    errors = {}
    for cls in (FlowEuler, FlowUniPC):
        s = cls(steps, shift)
        sig = [float(v) for v in s.sigmas]
        x = exact(z, sig[0])
        for i in range(steps - 1):
            x = s.step(velocity(x, sig[i]), x)
        errors[cls] = (x - exact(z, sig[steps - 1])).abs().max().item()
    assert errors[FlowUniPC] * 2 < errors[FlowEuler], errors


def test_reset_and_overrun():
    s = FlowUniPC(5, 5.0)
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(4, generator=g) for _ in range(5)]
    x_init = torch.randn(4, generator=g)

    def run():
        x = x_init
        for v in vs:
            x = s.step(v, x)
        return x

    first = run()
    with pytest.raises(RuntimeError, match="reset"):
        s.step(vs[0], first)
    s.reset()
    assert torch.equal(run(), first)


@pytest.mark.parametrize("steps,shift", [(0, 5.0), (-3, 5.0), (2.5, 5.0), (10, 0.0)])
def test_bad_schedule_args(steps, shift):
    with pytest.raises(ValueError):
        flow_schedule(steps, shift)
