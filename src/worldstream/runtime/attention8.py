"""8-bit attention for Ada / Hopper: Q·Kᵀ on the int8 tensor cores, P·V on the fp8 ones, fine-grained scales.

At 81 frames a Wan block attends over 32,760 tokens and bf16 attention is about half of its time, so fp8 weights
alone cannot make a block much faster (BENCHMARKS.md). This backend quantizes the attention operands too,
never per tensor:

  Q   int8, one scale per (token, head): amax over the head channels / 127, rounded to nearest. int8 rather
      than fp8: for Gaussian-like values a uniform 8-bit grid is ~5x more precise than e4m3's 3 mantissa bits,
      the int8 tensor cores are as fast, and the scores are exact int32 dot products.
  K   first smoothed: the mean over the tokens is subtracted (per head and channel). Every score of a query row
      then changes by the same constant q·mean(k), which softmax ignores, so exact attention is unchanged, while
      the per-channel offset that dominates K's range is gone. Then int8 with one scale per (head, block of 128
      tokens): a key tile's scale is one number, so scaling a score costs one multiply-add with the exp.
  P   the softmax numerators 2^(s - rowmax) * 256 lie in [0, 256]; they are rounded to fp8 (values below ~8e-6
      of the row's largest flush to zero). The row sums use the unrounded values.
  V   fp8, one scale per (head, channel) over all tokens (a per-token scale cannot be taken out of the sum over
      tokens); stored transposed, [B, H, D, L], the layout the fp8 tensor cores want for P·V.
P·V is accumulated per key tile in the tensor cores and added to a float32 accumulator outside them (Hopper's fp8
MMA accumulates with reduced precision; a running sum over 32k keys kept inside it lost ~20% on flat
attention). The output is bf16.

`reference(q, k, v)` computes the same roundings with plain torch ops in float32 on any device (the tests'
yardstick); `attention8(q, k, v)` runs the Triton kernels on CUDA GPUs with fp8 tensor cores (compute capability
8.9+; `available()`), and `reference` elsewhere. Layouts follow models/attention.py: q [B, Lq, H, D], k and v
[B, Lk, H, D]; the kernel takes D = 64 or 128.

Importing this module registers `attention8` as the attention backend "8bit" (models/attention.py); a model
uses it once told to (`WanDiT.set_attention("8bit")`).
"""
from __future__ import annotations

import functools
import math

import torch

from ..models.attention import register_backend

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
KEY_BLOCK = 128      # keys per K scale; also the kernel's key tile
P_SCALE = 256.0      # softmax numerators are rounded to fp8 as p * 256 (a power of two: exact)
LOG2E = 1.4426950408889634


# ---- the quantization, in torch (the reference) -----------------------------------------------------------------

def quantize_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(int8 q [B,Lq,H,D], q scales [B,Lq,H], int8 k [B,Lk,H,D], k scales [B,H,ceil(Lk/128)],
    fp8 v [B,Lk,H,D], v scales [B,H,D]); scales float32. Computed in float32."""
    q32, k32, v32 = q.float(), k.float(), v.float()
    sq = q32.abs().amax(-1).clamp_min(1e-30) * (1 / INT8_MAX)
    qq = (q32 / sq[..., None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    k32 = k32 - k32.mean(1, keepdim=True)
    b, lk, h, d = k.shape
    nblk = -(-lk // KEY_BLOCK)
    padded = torch.nn.functional.pad(k32.abs(), (0, 0, 0, 0, 0, nblk * KEY_BLOCK - lk))
    sk = padded.view(b, nblk, KEY_BLOCK, h, d).amax(dim=(2, 4)).transpose(1, 2).clamp_min(1e-30) * (1 / INT8_MAX)
    sk_tok = sk.repeat_interleave(KEY_BLOCK, dim=2)[:, :, :lk].transpose(1, 2)       # [B, Lk, H]
    kq = (k32 / sk_tok[..., None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    sv = v32.abs().amax(1).clamp_min(1e-30) * (1 / FP8_MAX)
    vq = (v32 / sv[:, None]).to(FP8)
    return qq, sq, kq, sk, vq, sv


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in float32 torch ops (any device): [B, Lq, H, D] in q's dtype."""
    qq, sq, kq, sk, vq, sv = quantize_reference(q, k, v)
    lk, d = k.shape[1], q.shape[-1]
    dots = qq.float().transpose(1, 2) @ kq.float().permute(0, 2, 3, 1)   # [B, H, Lq, Lk], exact (< 2^24)
    sk_tok = sk.repeat_interleave(KEY_BLOCK, dim=2)[:, :, :lk]
    s = dots * (sq.transpose(1, 2)[..., None] * (LOG2E / math.sqrt(d))) * sk_tok[:, :, None, :]   # log2 units
    p = torch.exp2(s - s.amax(-1, keepdim=True)) * P_SCALE
    p8 = p.to(FP8).float()
    out = (p8 @ vq.float().transpose(1, 2)) / p.sum(-1, keepdim=True) * sv[:, :, None, :]
    return out.transpose(1, 2).to(q.dtype)


# ---- the kernels -------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def available(device_index: int = 0) -> bool:
    """True when the Triton kernels can run: Triton importable and a GPU with fp8 tensor cores (sm89+)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def quantize_rows(X, MEAN, OUT, SCALE, H, L, sxb, sxl, sxh, ssb, ssh, ssl,
                      D: tl.constexpr, ROWS: tl.constexpr, PER_BLOCK: tl.constexpr, HAS_MEAN: tl.constexpr):
        """int8 of x [B, L, H, D] (minus MEAN [B, H, D]): one scale per row, or per ROWS-row block (PER_BLOCK)."""
        pid, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, D)
        offs = b * sxb + h * sxh + rows[:, None] * sxl + cols[None, :]
        ok = rows[:, None] < L
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_MEAN:
            x = tl.where(ok, x - tl.load(MEAN + bh * D + cols)[None, :], 0.0)
        if PER_BLOCK:
            scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-30) * (1.0 / 127.0)
            xq = tl.math.div_rn(x, scale)
            tl.store(SCALE + b * ssb + h * ssh + pid * ssl, scale)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-30) * (1.0 / 127.0)
            xq = tl.math.div_rn(x, scale[:, None])
            tl.store(SCALE + b * ssb + h * ssh + rows * ssl, scale, mask=rows < L)
        xq = tl.minimum(tl.maximum(libdevice.rint(xq), -127.0), 127.0)
        tl.store(OUT + offs, xq.to(tl.int8), mask=ok)

    @triton.jit
    def quantize_v(V, SV, OUT, H, L, svb, svl, svh, sob, soh, sod,
                   D: tl.constexpr, ROWS: tl.constexpr):
        """fp8 of v [B, L, H, D] / SV [B, H, D], written transposed to OUT [B, H, D, Lpad] (zeros past L)."""
        pid, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, D)
        v = tl.load(V + b * svb + h * svh + rows[:, None] * svl + cols[None, :], mask=rows[:, None] < L, other=0.0)
        vq = tl.math.div_rn(v.to(tl.float32), tl.load(SV + bh * D + cols)[None, :]).to(tl.float8e4nv)
        tl.store(OUT + b * sob + h * soh + cols[:, None] * sod + rows[None, :], tl.trans(vq))

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in [(64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 4, 2), (64, 64, 4, 3),
                                    (64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                                    (128, 128, 8, 3), (128, 128, 4, 3)]]

    @triton.jit
    def _tile(acc, l_i, m_i, q, c, k_ptrs, v_ptrs, SK, start_n, LK, stride_kl,
              BLOCK_N: tl.constexpr, MASK: tl.constexpr):
        if MASK:
            cols = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptrs + start_n * stride_kl, mask=cols[None, :] < LK, other=0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kl)                    # [D, N]
        s = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)            # exact dot products of the int8 values
        a = c * tl.load(SK + start_n // 128)                            # [M]: score scale in log2 units
        if MASK:
            s = tl.where(cols[None, :] < LK, s, float("-inf"))
        m_new = tl.maximum(m_i, a * tl.max(s, 1))                       # a > 0: max commutes with the scale
        p = tl.math.exp2(s * a[:, None] - (m_new - 8.0)[:, None])       # 2^(score - max) * 256
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + start_n)                                   # [N, D], tokens contiguous
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)     # two-level accumulation
        return acc, l_i, m_new

    @triton.autotune(configs=configs, key=["LQ", "LK", "HEAD_DIM"])
    @triton.jit
    def attend(Q, K, Vt, SQ, SK, SV, O, H, LQ, LK, qk_scale,
               sqb, sql, sqh, skb, skl, skh, svb, svh, svd, ssqb, ssql, ssqh, sskb, sskh,
               sob, sol, soh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        in_q = offs_m < LQ
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=in_q[:, None], other=0)
        c = tl.load(SQ + b * ssqb + h * ssqh + offs_m * ssql, mask=in_q, other=0.0) * qk_scale
        k_ptrs = K + b * skb + h * skh + offs_n[None, :] * skl + offs_d[:, None]
        v_ptrs = Vt + b * svb + h * svh + offs_d[None, :] * svd + offs_n[:, None]
        sk = SK + b * sskb + h * sskh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        n_full = (LK // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, c, k_ptrs, v_ptrs, sk, start_n, LK, skl, BLOCK_N, False)
        if n_full < LK:
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, c, k_ptrs, v_ptrs, sk, n_full, LK, skl, BLOCK_N, True)
        out = acc / l_i[:, None] * tl.load(SV + bh * HEAD_DIM + offs_d)[None, :]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=in_q[:, None])

    return quantize_rows, quantize_v, attend


def quantize_q(q: torch.Tensor):
    """int8 q [B, Lq, H, D] and its scales [B, Lq, H] (CUDA), as `quantize_reference` rounds them."""
    quantize_rows = _kernels()[0]
    b, lq, h, d = q.shape
    qq = torch.empty(q.shape, dtype=torch.int8, device=q.device)
    sq = torch.empty(b, lq, h, dtype=torch.float32, device=q.device)
    quantize_rows[(-(-lq // 64), b * h)](q, q, qq, sq, h, lq, q.stride(0), q.stride(1), q.stride(2),
                                          sq.stride(0), sq.stride(2), sq.stride(1), D=d, ROWS=64,
                                          PER_BLOCK=False, HAS_MEAN=False)
    return qq, sq


def quantize_kv(k: torch.Tensor, v: torch.Tensor):
    """int8 k, k scales [B, H, ceil(Lk/128)], fp8 vᵀ [B, H, D, Lk padded to 128], v scales [B, H, D] (CUDA)."""
    quantize_rows, quantize_v, _ = _kernels()
    b, lk, h, d = k.shape
    nblk = -(-lk // KEY_BLOCK)
    mean = k.mean(1, dtype=torch.float32).contiguous()                   # [B, H, D]
    kq = torch.empty(k.shape, dtype=torch.int8, device=k.device)
    sk = torch.empty(b, h, nblk, dtype=torch.float32, device=k.device)
    quantize_rows[(nblk, b * h)](k, mean, kq, sk, h, lk, k.stride(0), k.stride(1), k.stride(2),
                                 sk.stride(0), sk.stride(1), sk.stride(2), D=d, ROWS=KEY_BLOCK,
                                 PER_BLOCK=True, HAS_MEAN=True)
    sv = (torch.linalg.vector_norm(v, ord=math.inf, dim=1, dtype=torch.float32).clamp_min(1e-30)
          * (1 / FP8_MAX)).contiguous()                                 # [B, H, D]
    vt = torch.empty(b, h, d, nblk * KEY_BLOCK, dtype=FP8, device=v.device)
    quantize_v[(nblk, b * h)](v, sv, vt, h, lk, v.stride(0), v.stride(1), v.stride(2),
                              vt.stride(0), vt.stride(1), vt.stride(2), D=d, ROWS=KEY_BLOCK)
    return kq, sk, vt, sv


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The kernel's operands (CUDA): int8 q, q scales [B, Lq, H], int8 k, k scales [B, H, ceil(Lk/128)],
    fp8 vᵀ [B, H, D, Lk padded to 128], v scales [B, H, D]. The same roundings as `quantize_reference`
    (IEEE divisions, round half to even); only the float32 mean of k may differ in its last bits."""
    return (*quantize_q(q), *quantize_kv(k, v))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    b, lq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"8-bit attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "do not match ([B, L, H, D] each, same B, H, D)")


def _use_kernel(t: torch.Tensor) -> bool:
    return (t.shape[-1] in (64, 128) and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)
            and available(t.device.index or 0))


def _attend(q: torch.Tensor, kv: tuple, lk: int) -> torch.Tensor:
    """The attention kernel on quantized K / V (`quantize_kv`'s output) for queries q (bf16 / fp16)."""
    kq, sk, vt, sv = kv
    b, lq, h, d = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    qq, sq = quantize_q(q)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    attend = _kernels()[2]
    grid = lambda meta: (-(-lq // meta["BLOCK_M"]), b * h)   # noqa: E731
    attend[grid](qq, kq, vt, sq, sk, sv, out, h, lq, lk, LOG2E / math.sqrt(d),
                 qq.stride(0), qq.stride(1), qq.stride(2), kq.stride(0), kq.stride(1), kq.stride(2),
                 vt.stride(0), vt.stride(1), vt.stride(2), sq.stride(0), sq.stride(1), sq.stride(2),
                 sk.stride(0), sk.stride(1), out.stride(0), out.stride(1), out.stride(2),
                 HEAD_DIM=d)
    return out


def attention8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v with 8-bit operands (see the module docstring); [B, Lq, H, D] in q's dtype.

    Runs the Triton kernels where `available()` (bf16 / fp16 inputs, D = 64 or 128), else `reference`."""
    _check(q, k, v)
    if not _use_kernel(q):
        return reference(q, k, v)
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    return _attend(q, quantize_kv(k, v), k.shape[1])


def prepare8(k: torch.Tensor, v: torch.Tensor):
    """`attend(q)` = `attention8(q, k, v)` with K and V quantized once (models/attention.py
    `prepare_attention`): the query chunks of the low-memory block share them, and the bf16 K / V can be
    dropped once this returns (the kernel path keeps only the 8-bit copies, half their bytes)."""
    if not _use_kernel(k):
        return lambda q: attention8(q, k, v)
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    kv, lk, shape = quantize_kv(k, v), k.shape[1], k.shape

    def attend(q: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != shape[0] or q.shape[2:] != shape[2:] or not _use_kernel(q):
            raise ValueError(f"8-bit attention: queries {tuple(q.shape)} do not fit the prepared keys "
                             f"{tuple(shape)} (same B, H, D; bf16 / fp16 on the GPU)")
        return _attend(q, kv, lk)
    return attend


register_backend("8bit", attention8, prepare=prepare8)   # (by keyword: the third parameter is handles_cache)
