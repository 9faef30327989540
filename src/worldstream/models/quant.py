"""Compressed weights for the DiT's block linears: fp8 (e4m3) or int8, with float32 scales.

Why: a streamed block crosses the PCIe bus every forward; storing its big matrices in 8 bits halves the bytes
(shared/spec/streaming-engine.md, lesson 3). Everything here is a plain tensor: a `QLinear` holds its 8-bit
weight and its float32 scales as ordinary `nn.Parameter`s, so `BlockLayout.of(block)` packs them into a block
slab and the streaming engine pins, copies and views them like any other parameter.

Formats (`fmt`), all symmetric (no zero point), weights [out, in] = [N, K]:
  "fp8"        float8_e4m3fn, one scale per output row: scale = amax(row) / 448.       scale [N, 1]
  "fp8-block"  float8_e4m3fn, one scale per (row, block of 128 input columns).          scale [N, ceil(K/128)]
               If K is not a multiple of 128 the last block is simply narrower.
  "int8"       int8, one scale per output row: scale = amax(row) / 127, round to nearest (ties to even).
A row (or block) of zeros gets scale 1/qmax and zero data, so nothing divides by zero.

`QLinear.forward` has two paths:
  * dequantize: rebuild the weight in `compute_dtype` (exactly `(data.float() * scale).to(compute_dtype)`) and
    call `F.linear`. Works everywhere; costs one elementwise pass over the weight per call.
  * fp8 matmul: for "fp8" on CUDA GPUs of compute capability >= 8.9 (Ada, Hopper) with bf16 compute, the
    activations are quantized per token (one float32 scale per row: amax / 448 rounded up to a power of two)
    and `torch._scaled_mm` multiplies fp8 x fp8 with row-wise scales. Activations are never quantized per tensor
    (reported to make Wan video blocky).
Per-layer options (attributes of each QLinear, set for a whole model with `set_matmul_options`; never
process-wide): `scaled_mm = False` forces the dequantize path; `compile_quantizer` runs the activation quantizer
through torch.compile on CUDA (one fused kernel, same bits as eager; falls back to eager with a warning if
compiling fails); `fast_accum` (on) lets cuBLAS use fp8 fast accumulation. benchmarks/quant_accuracy.py
measures what each costs and buys.

This module is the layer type and its number formats; which weights of a checkpoint are stored compressed
(the policy in a converted checkpoint's config.json) is checkpoints/compressed.py.

Caution: `Module.to(dtype)` treats float8 as a floating dtype and would cast the fp8 weights; convert the model's
dtype before quantizing (moving between devices is fine). `QLinear.forward` raises if it finds its weight recast.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0          # largest finite float8_e4m3fn
INT8_MAX = 127.0         # symmetric: -127..127 (-128 unused)
BLOCK = 128              # input columns per scale in "fp8-block"

FORMATS = {"fp8": FP8, "fp8-block": FP8, "int8": torch.int8}
_QMAX = {"fp8": FP8_MAX, "fp8-block": FP8_MAX, "int8": INT8_MAX}


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")


def scale_groups(in_features: int, fmt: str) -> int:
    """Scale columns per output row: 1 for per-channel formats, ceil(K / 128) for "fp8-block"."""
    _check_fmt(fmt)
    return math.ceil(in_features / BLOCK) if fmt == "fp8-block" else 1


def _scale_(w: torch.Tensor, scale: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """In place: w [N, K] *= scale (or /= scale), scale [N, G] broadcast over its blocks of BLOCK columns
    (G == 1: the whole row). The last block may be narrower than BLOCK. Returns w."""
    op = torch.Tensor.div_ if inverse else torch.Tensor.mul_
    k, groups = w.shape[1], scale.shape[1]
    if groups == 1:
        return op(w, scale)
    full = k // BLOCK
    if full:
        op(w[:, :full * BLOCK].unflatten(1, (full, BLOCK)), scale[:, :full, None])
    if k % BLOCK:
        op(w[:, full * BLOCK:], scale[:, full:])
    return w


def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] (any float dtype, any device) -> (data [N, K] fp8/int8, scale [N, G] float32).

    `dequantize(data, scale, fmt)` gives the weight back up to the format's rounding.
    """
    _check_fmt(fmt)
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    n, k = w.shape
    w32 = w.detach().float()
    groups = scale_groups(k, fmt)
    if groups == 1:
        amax = w32.abs().amax(dim=1, keepdim=True)
    else:
        padded = F.pad(w32.abs(), (0, groups * BLOCK - k))
        amax = padded.view(n, groups, BLOCK).amax(dim=2)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(f"cannot quantize a weight of shape {tuple(w.shape)} holding inf or NaN")
    qmax = _QMAX[fmt]
    scale = torch.where(amax > 0, amax, torch.ones_like(amax)) / qmax   # zero row/block: data 0, scale 1/qmax
    q = _scale_(w32.clone(), scale, inverse=True)
    if fmt == "int8":
        data = q.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        data = q.clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return data, scale


def dequantize(data: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(data [N, K], scale [N, G]) -> weight [N, K] in `dtype`, equal to `(data.float() * scale).to(dtype)`.

    The 8-bit values are exact in bf16/fp16/fp32, and the in-place multiply by the float32 scale computes in
    float32 and rounds once, so no float32 copy of the whole weight is made.
    """
    _check_fmt(fmt)
    if data.dtype != FORMATS[fmt]:
        raise ValueError(f"format {fmt!r} stores {FORMATS[fmt]}, got data of dtype {data.dtype}")
    if data.dim() != 2:
        raise ValueError(f"dequantize expects 2-D data [out, in], got shape {tuple(data.shape)}")
    n, k = data.shape
    if tuple(scale.shape) != (n, scale_groups(k, fmt)) or scale.dtype != torch.float32:
        raise ValueError(f"format {fmt!r} with data [{n}, {k}] needs float32 scales of shape "
                         f"[{n}, {scale_groups(k, fmt)}], got {scale.dtype} {tuple(scale.shape)}")
    return _scale_(data.to(dtype), scale)


@functools.lru_cache(maxsize=None)
def _has_fp8_matmul(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


class _CompiledOnCuda:
    """`fn(x, compile=True)` through torch.compile (built once, dynamic shapes) for CUDA inputs when `compile`;
    if compiling fails: a warning, and eager from then on (the same values). `.failed` says which happened."""

    def __init__(self, fn):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, x: torch.Tensor, compile: bool = True):
        if compile and x.is_cuda and not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(x)
            except Exception as exc:   # no triton / compiler trouble: eager gives the same bits
                warnings.warn(f"torch.compile of {self.fn.__name__} failed ({exc!r}); using eager")
                self.failed = True
        return self.fn(x)


def _quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True, dtype=torch.float32)
    ratio = FP8_MAX / amax.clamp(min=2.0**-100)                       # a normal float32
    inv = (ratio.view(torch.int32) & 0x7F800000).view(torch.float32)  # keep the exponent: largest 2^n <= ratio
    mult = inv.to(x.dtype) if x.dtype in (torch.bfloat16, torch.float32) else inv   # exact: a power of two
    return (x * mult).to(FP8), inv.reciprocal()


def _gelu_quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_rows_fp8(F.gelu(x, approximate="tanh"))


_act_quantizer = _CompiledOnCuda(_quantize_rows_fp8)
_gelu_act_quantizer = _CompiledOnCuda(_gelu_quantize_rows_fp8)


def quantize_rows_fp8(x: torch.Tensor, compile: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (fp8 [M, K], float32 scale [M, 1]), one scale per row (token).

    The scale is amax / 448 rounded up to a power of two (so the row's largest value lands in [224, 448]): then
    x / scale is exact in bf16 and the only rounding is the one to fp8, in a bf16 multiply and a cast, with no
    float32 copy of the activations. fp8 keeps its relative precision over that range, so this costs nothing
    in accuracy. Zero rows get a finite scale and zero data. Compiled on CUDA when `compile`.
    """
    return _act_quantizer(x, compile)


def gelu_quantize_rows_fp8(x: torch.Tensor, compile: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_fp8(gelu_tanh(x))` in one pass on CUDA (the FFN's hidden activations are the largest
    tensor of a block; this saves writing and re-reading them in bf16). Same values as the two steps."""
    return _gelu_act_quantizer(x, compile)


class Fp8Rows(NamedTuple):
    """Activations quantized once for several fp8 matmuls (self-attention's q, k, v read the same input):
    `data` [M, K] fp8 and `scale` [M, 1] float32 from `quantize_rows_fp8`; `shape` is their leading shape."""
    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple


class QLinear(nn.Module):
    """A Linear whose weight is stored in 8 bits (`weight`: fp8/int8, `weight_scale`: float32, both frozen).

    `bias` stays in `compute_dtype` (the dtype of the Linear it replaced: bf16 on GPU, fp32 for CPU tests),
    which is also the dtype inputs should arrive in and outputs come out in.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "fp8",
                 compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        _check_fmt(fmt)
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        self._compute_dtype = compute_dtype
        groups = scale_groups(in_features, fmt)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FORMATS[fmt], device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, groups, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.scaled_mm = True          # False: the dequantize path even where fp8 matmuls exist
        self.fast_accum = True         # cuBLAS fp8 fast accumulation: ~20% faster GEMMs; on an H100 it changed block
                                       # outputs far less than the fp8 rounding itself (benchmarks/quant_accuracy.py)
        self.compile_quantizer = True  # the per-token activation quantizer through torch.compile on CUDA

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> "QLinear":
        """Quantize an nn.Linear (on its device). On the meta device only the shapes are made (for sizing)."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, fmt=fmt,
                compute_dtype=w.dtype, device=w.device)
        if w.is_meta:
            return q
        data, scale = quantize(w, fmt)
        with torch.no_grad():
            q.weight.copy_(data)
            q.weight_scale.copy_(scale)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, self.fmt, self.compute_dtype)

    def to_linear(self) -> nn.Linear:
        """An nn.Linear in `compute_dtype` holding the dequantized weight (same device)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.compute_dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def uses_scaled_mm(self, x: torch.Tensor) -> bool:
        """Whether forward(x) takes the fp8 x fp8 matmul (see the module docstring for the conditions)."""
        return (self.scaled_mm and self.fmt == "fp8" and x.is_cuda and self.compute_dtype == torch.bfloat16
                and self.in_features % 16 == 0 and self.out_features % 16 == 0 and x.numel() > 0
                and _has_fp8_matmul(x.device.index if x.device.index is not None else torch.cuda.current_device()))

    @staticmethod
    def prepare_input(x: torch.Tensor, layers, gelu: bool = False):
        """The input of several `layers` that all read `x` (after the tanh GELU if `gelu`): quantized once
        (an `Fp8Rows`) when every one of them takes the fp8 matmul, else the plain tensor."""
        if all(isinstance(layer, QLinear) and layer.uses_scaled_mm(x) for layer in layers):
            rows, compile = x.reshape(-1, x.shape[-1]), layers[0].compile_quantizer
            data, scale = gelu_quantize_rows_fp8(rows, compile) if gelu else quantize_rows_fp8(rows, compile)
            return Fp8Rows(data, scale, tuple(x.shape[:-1]))
        return F.gelu(x, approximate="tanh") if gelu else x

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if self.weight.dtype != FORMATS[self.fmt]:
            raise RuntimeError(f"QLinear({self.fmt}) weight was recast to {self.weight.dtype} (Module.to(dtype)?); "
                               "set the model's dtype before quantizing")
        if isinstance(x, Fp8Rows):
            xq, x_scale, lead = x
        else:
            x = x.to(self.compute_dtype)
            if not self.uses_scaled_mm(x):
                return F.linear(x, self.dequantized_weight(), self.bias)
            xq, x_scale = quantize_rows_fp8(x.reshape(-1, self.in_features), self.compile_quantizer)
            lead = x.shape[:-1]
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.view(1, -1),
                             bias=self.bias, out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fmt={self.fmt}, compute_dtype={self.compute_dtype}")


def set_matmul_options(model: nn.Module, scaled_mm: bool | None = None, fast_accum: bool | None = None,
                       compile_quantizer: bool | None = None) -> None:
    """Set the options of every QLinear in `model` (None leaves an option as it is)."""
    for m in model.modules():
        if isinstance(m, QLinear):
            for name, value in (("scaled_mm", scaled_mm), ("fast_accum", fast_accum),
                                ("compile_quantizer", compile_quantizer)):
                if value is not None:
                    setattr(m, name, bool(value))


# ---- which linears of a block get compressed -------------------------------------------------------------------

DEFAULT_SKIP = ("cam_",)   # LingBot's camera layers (cam_injector_layer1/2, cam_scale_layer, cam_shift_layer)


def quantizable_linears(block: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[str]:
    """Qualified names of the nn.Linear layers of `block` whose name contains none of `skip` (substrings)."""
    return [name for name, m in block.named_modules()
            if type(m) is nn.Linear and not any(pattern in name for pattern in skip)]


def quantize_block_(block: nn.Module, fmt: str, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[str]:
    """Replace every nn.Linear of one block whose qualified name contains none of `skip` (substrings) by a
    QLinear. Returns the names replaced. Norms, modulation and anything that is not an nn.Linear stay as they are."""
    _check_fmt(fmt)
    names = quantizable_linears(block, skip)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent), child, QLinear.from_linear(block.get_submodule(name), fmt))
    return names
