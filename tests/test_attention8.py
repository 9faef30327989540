"""8-bit attention (`worldstream.runtime.attention8`, the "8bit" attention backend).

On CPU: the float32 emulation (`reference`) against exact attention — its error is the documented cost of the
mode — plus its invariances and bad input. On a GPU with fp8 tensor cores: the Triton kernels against the
emulation (same quantized values, same arithmetic up to summation order) and against exact attention.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from worldstream.models import attention as attn_mod
from worldstream.models.configs import get_config
from worldstream.models.dit import WanDiT
from worldstream.runtime import attention8 as a8


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def exact(q, k, v):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (p @ v).transpose(1, 2)


def qkv(b, lq, lk, h, d, scale=1.0, seed=0, device="cpu"):
    """q, k with a per-channel offset (as projected activations have), v with one; scale sets how peaked the
    softmax is (1: scores of std ~1)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    q = (rn(b, lq, h, d) + 0.5 * rn(h, d)) * scale
    k = (rn(b, lk, h, d) + 0.5 * rn(h, d)) * scale
    v = rn(b, lk, h, d) + 0.3 * rn(h, d)
    return q.to(device), k.to(device), v.to(device)


# Relative error of the emulation vs exact float64 attention, [1, 2000, 4 heads, 128]. Measured (CPU):
# scale 0.5: 0.34%, 1: 0.51%, 2: 3.4% (sharper softmax: score errors matter more). bf16 inputs alone: 0.01-0.5%.
# The H100 figures at the 81-frame size are in BENCHMARKS.md.
EMULATION_BOUNDS = {0.5: 0.006, 1.0: 0.009, 2.0: 0.05}


@pytest.mark.parametrize("scale", sorted(EMULATION_BOUNDS))
def test_emulation_error_is_the_documented_one(scale):
    q, k, v = qkv(1, 2000, 2000, 4, 128, scale=scale)
    err = rel_err(a8.reference(q, k, v), exact(q, k, v))
    print(f"8-bit attention emulation, score scale {scale}: {err:.3%}")
    assert 1e-4 < err < EMULATION_BOUNDS[scale]


def test_quantized_operands_are_8_bit_with_fine_scales():
    q, k, v = qkv(2, 300, 260, 3, 64, seed=1)
    qq, sq, kq, sk, vq, sv = a8.quantize_reference(q, k, v)
    assert qq.dtype == kq.dtype == torch.int8 and vq.dtype == a8.FP8
    assert sq.shape == (2, 300, 3) and sk.shape == (2, 3, 3) and sv.shape == (2, 3, 64)
    # every (token, head) of q, every 128-key block of k, every channel of v uses its full range
    assert (qq.abs().amax(-1) == 127).all()
    kb = torch.nn.functional.pad(kq.abs(), (0, 0, 0, 0, 0, 3 * 128 - 260)).view(2, 3, 128, 3, 64)
    assert (kb.amax(dim=(2, 4)) == 127).all()
    assert (vq.float().abs().amax(1) == 448).all()


def test_key_smoothing_makes_a_shared_key_offset_free():
    """Adding one vector to every key changes no softmax; with the mean subtracted it changes the 8-bit result
    only by float rounding, and the error stays what it was (unsmoothed, an offset 20x the keys' spread would
    leave them a few int8 steps)."""
    q, k, v = qkv(1, 200, 200, 2, 64, seed=2)
    shifted = k + 20.0 * torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    base, moved = a8.reference(q, k, v), a8.reference(q, shifted, v)
    assert rel_err(moved, base) < 2e-3
    assert rel_err(moved, exact(q, shifted, v)) < 1.2 * rel_err(base, exact(q, k, v))


def test_cpu_falls_back_to_the_emulation_and_checks_shapes():
    q, k, v = qkv(1, 50, 70, 2, 64, seed=4)
    assert torch.equal(a8.attention8(q, k, v), a8.reference(q, k, v))
    with pytest.raises(ValueError, match="do not match"):
        a8.attention8(q, k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="do not match"):
        a8.attention8(q, k, v[:, :60])


@torch.no_grad()
def test_8bit_backend_in_a_tiny_dit():
    """The backend through the DiT's seam (self-attention only): close to SDPA, and really used."""
    cfg = get_config("wan2.2-i2v-a14b-tiny")
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 6, 10, generator=g)
    y = torch.randn(1, cfg.in_dim - 16, 3, 6, 10, generator=g)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    t = torch.tensor([500.0])
    base = model(x, t, ctx, y=y)
    model.set_attention("8bit")
    out = model(x, t, ctx, y=y)
    assert model.blocks[0].cross_attn.backend == "sdpa"     # self-attention only
    err = rel_err(out, base)
    print(f"tiny DiT with 8-bit self-attention: {err:.3%}")
    assert 1e-5 < err < 0.02


gpu = pytest.mark.skipif(not a8.available(), reason="needs a CUDA GPU with fp8 tensor cores and Triton")


@gpu
@pytest.mark.parametrize("shape", [(1, 3000, 3000, 4, 128), (2, 1000, 257, 3, 128), (1, 777, 777, 2, 64),
                                   (2, 128, 128, 2, 128)])
def test_kernel_matches_its_emulation_gpu(shape):
    b, lq, lk, h, d = shape
    q, k, v = (t.bfloat16() for t in qkv(b, lq, lk, h, d, seed=5, device="cuda"))
    qq, sq, kq, sk, vt, sv = a8.quantize(q, k, v)
    rq, rsq, rkq, rsk, rvq, rsv = a8.quantize_reference(q, k, v)
    assert torch.equal(qq, rq) and torch.equal(sq, rsq) and torch.equal(sv, rsv)
    assert torch.allclose(sk, rsk, rtol=1e-6)   # the float32 mean of k may differ in its last bits
    assert (kq.int() - rkq.int()).abs().max() <= 1
    assert torch.equal(vt[..., :lk].view(torch.uint8), rvq.view(torch.uint8).permute(0, 2, 3, 1))
    assert (vt[..., lk:].view(torch.uint8) == 0).all()
    out = a8.attention8(q, k, v)
    ref = a8.reference(q, k, v)
    # measured on an H100: 0.2-0.7% (p is rounded to fp8 against the running row maximum in the kernel,
    # the global one in the emulation; summation order)
    assert rel_err(out, ref) < 0.015
    assert rel_err(out, exact(q, k, v)) < 0.02


@gpu
def test_kernel_at_the_81_frame_length_gpu():
    """32,760 keys (not a multiple of the tile): rows of the output against exact attention."""
    q, k, v = (t.bfloat16() for t in qkv(1, 32760, 32760, 8, 128, seed=6, device="cuda"))
    out = a8.attention8(q, k, v)[:, :256]
    ref = F.scaled_dot_product_attention(q[:, :256].float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2)).transpose(1, 2)
    assert rel_err(out, ref) < 0.01    # measured on an H100: 0.28% (bf16 SDPA: 0.17%)


def test_prepared_keys_serve_query_chunks():
    """`prepare_attention` (the low-memory block): K and V prepared once, queries in chunks, the same output as
    one call (the emulation here; the kernels below on a GPU)."""
    from worldstream.models.attention import prepare_attention

    q, k, v = qkv(2, 300, 300, 3, 16, seed=8)
    attend = prepare_attention(k, v, "8bit")
    whole = a8.attention8(q, k, v)
    assert torch.equal(torch.cat([attend(q[:, s:s + 64]) for s in range(0, 300, 64)], 1), whole)


def test_registration_prepares_keys_once_and_leaves_the_cache_to_the_seam():
    """"8bit" is registered with its `prepare` (the low-memory block quantizes K / V once per layer, not once per
    query chunk, and may drop the bf16 K / V) and without handles_cache: it does not write the causal KV cache
    itself, so the seam updates the cache and calls it as fn(q, k, v) (a positional `prepare8` once landed in
    handles_cache: K / V were re-quantized for every query chunk, and a causal forward called
    attention8(q, k, v, kv=...))."""
    assert attn_mod._PREPARE.get("8bit") is a8.prepare8
    assert not attn_mod.writes_cache("8bit")


@gpu
def test_prepared_keys_serve_query_chunks_gpu():
    """On the GPU the prepared path quantizes K and V once and runs the same kernel per query chunk: each row
    is computed as in one call (per-token q scales, per-row online softmax), so the chunks should equal it bit
    for bit; the bound allows for a tile configuration the autotuner might pick differently per length."""
    q, k, v = (t.bfloat16() for t in qkv(2, 2048, 2048, 4, 128, seed=9, device="cuda"))
    attend = a8.prepare8(k, v)
    whole = a8.attention8(q, k, v)
    got = torch.cat([attend(q[:, s:s + 256].contiguous()) for s in range(0, 2048, 256)], 1)
    print(f"prepared, in 256-row chunks: bit-equal {torch.equal(got, whole)}, rel. error {rel_err(got, whole):.2e}")
    assert rel_err(got, whole) < 1e-3


def test_a_causal_student_runs_with_8bit_attention():
    """The 8-bit kernel attends over the causal KV cache like SDPA (the session writes the cache; the kernel
    does not claim to), and keeps its prepare step for the low-memory block. A keyword slip in its
    registration once marked it as writing the cache itself: every causal chunk with `--attention 8bit`
    raised a TypeError."""
    from worldstream.pipelines.realtime import RealtimeSession
    from worldstream.testing.random_models import random_inputs, random_runner, random_vae

    assert not attn_mod.writes_cache("8bit")
    cfg = get_config("lingbot-fast-v2-tiny")
    runs = {}
    for backend in ("8bit", "sdpa"):
        image, context = random_inputs(cfg, 32, 48)
        vae = random_vae("cpu", tiny=True)
        s = RealtimeSession(random_runner(cfg, torch.device("cpu"), torch.float32, attention=backend), cfg, vae,
                            vae, context, image, 32, 48, seed=1)
        runs[backend] = [s.step(keys="w").latents for _ in range(2)]
        s.close()
    for a, b in zip(runs["8bit"], runs["sdpa"]):   # the emulated 8-bit rounding, not another computation
        assert torch.isfinite(a).all() and 0 < rel_err(a, b) < 0.05
