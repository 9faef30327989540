"""The Wan / LingBot-World diffusion transformer, one implementation for every variant.

Parameter names are upstream's (`blocks.{i}.self_attn.q.weight`, ...), so an upstream state dict loads as is.

Precision follows upstream's layout (shared/spec/wan-architecture.md section 2): parameters are stored in one
dtype (bf16 on GPU, fp32 for CPU tests); matmuls run in that dtype; the time embedding, modulation, norms,
residual stream and head run in float32. Upstream gets the same numbers from `autocast(bf16)` around the
model and `autocast(float32)` regions inside; here the casts are written out, so no autocast is needed.

One deliberate difference: RoPE is applied in float32 (cos/sin computed in float64, then rounded) rather than
complex128. Its result is cast to bf16 for attention either way; the float32 rounding is ~1e-7 relative, far
below that cast.

Speed: the float32 residual stream makes the elementwise work (norms, modulation, RoPE, gated residuals) a
large share of a block's time at long sequences. The small functions marked `@fused` are that work; on CUDA they
are compiled with torch.compile (one kernel each instead of 3-6 passes over [B, L, dim] in float32), keeping
every explicit cast (`emulate_precision_casts`). Whether they are compiled is a per-model choice
(`WanDiT.set_fuse`), not a process-wide switch.

Per-model state set from outside: `set_attention` (the attention kernel of the self- and cross-attention
modules, models/attention.py), `set_fuse`, `set_chunk` (the low-memory block, below). Nothing that changes from
call to call is kept on the modules (the RoPE table is a cache of constants): the step cache's residual
(`StackCache`) is passed to `WanDiT.forward` as data.

Low-memory block (`set_chunk(tokens)`, chosen by the planner when a budget needs it): the block runs over the
sequence `tokens` rows at a time, sample by sample. Self-attention first computes every token's keys and values
chunk by chunk (the modulated input only ever exists for one chunk), then attends query chunk by query chunk,
projecting each chunk's output and adding it into the float32 residual stream in place; camera, cross-attention
and FFN do the same. What stays alive across a block is the residual stream, K and V (or the 8-bit kernel's
quantized copies) and the camera features, instead of the whole-sequence modulated input, Q, K, V, rotated
copies, attention output and two residual streams of the plain block. Same per-token math: on the CPU the
chunked block equals the plain block bit for bit (tests/test_chunked_block.py); on CUDA the matmul kernels
cuBLAS picks for fewer rows and the in-place gated residual may round differently in the last bits.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, get_backend, prepare_attention, writes_cache
from .configs import DiTConfig


def fused(fn):
    """`fn(*args, fuse=True)`: run `fn` compiled (torch.compile, dynamic shapes) on CUDA tensors when `fuse`,
    eagerly otherwise.

    Arguments are made contiguous (views at different storage offsets would each compile anew); if compiling
    fails (no Triton, a recompile limit), the function runs eagerly from then on."""
    compiled = []

    def call(*args, fuse: bool = True):
        if fuse and args[0].is_cuda and compiled != [None]:
            if not compiled:
                import torch._dynamo.config as dynamo_config
                import torch._inductor.config as inductor_config
                if hasattr(inductor_config, "emulate_precision_casts"):
                    inductor_config.emulate_precision_casts = True
                dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
                compiled.append(torch.compile(fn, dynamic=True))
            args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
            try:
                return compiled[0](*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: same math, eagerly
                import warnings
                warnings.warn(f"worldstream: {fn.__name__} runs eagerly ({type(e).__name__}: {e})")
                compiled[:] = [None]
        return fn(*args)
    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


def _modulate(x, shift, scale, eps: float, dtype: torch.dtype, norm_dtype: torch.dtype):
    n = F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(norm_dtype).float()
    return (n * (1 + scale) + shift).to(dtype)


@fused
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, dtype: torch.dtype,
             norm_dtype: torch.dtype):
    """LayerNorm (no affine, float32, rounded to `norm_dtype`: the dtype the residual stream had, as upstream's
    `.type_as(x)`) * (1 + scale) + shift, cast to `dtype`."""
    return _modulate(x, shift, scale, eps, dtype, norm_dtype)


def _rows(m: torch.Tensor, b: int, start: int, n: int) -> torch.Tensor:
    """Sample b, rows start..start+n of a per-sample ([B or 1, 1, ...]) or per-token ([B or 1, L, ...]) tensor."""
    m = m[b:b + 1] if m.shape[0] > 1 else m
    return m if m.shape[1] == 1 else m[:, start:start + n]


@fused
def modulate_rows(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, b: int, start: int, n: int, eps: float,
                  dtype: torch.dtype, norm_dtype: torch.dtype):
    """`modulate` of sample b, tokens start..start+n of the residual stream x (the low-memory block). The whole
    stream goes in and the slicing happens inside, so the compiled kernel sees the same tensor every call (a view
    at another storage offset could cost a recompile) and reads the rows in place (no copy)."""
    return _modulate(_rows(x, b, start, n), _rows(shift, b, start, n), _rows(scale, b, start, n), eps, dtype,
                     norm_dtype)


@fused
def gate_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate in float32 (the residual stream)."""
    return x + y.float() * gate


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rope(x, cos, sin, dtype: torch.dtype):
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(dtype)


@fused
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rotate consecutive pairs of x [B, L, H, D] by angles with cos/sin [L, 1, D/2], in float32; cast to dtype."""
    return _rope(x, cos, sin, dtype)


@fused
def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """`rope` of x [B, n, H, D] holding tokens start..start+n: the angles' rows are taken inside (see
    `modulate_rows`)."""
    n = x.shape[1]
    return _rope(x, cos[start:start + n], sin[start:start + n], dtype)


class Linear32(nn.Linear):
    """A Linear computed in float32 whatever the stored dtype (upstream's autocast(float32) regions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(x.float(), self.weight.float(), bias)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: its weight's, or a compressed layer's declared `compute_dtype`."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype


def linear(layer: nn.Linear, x) -> torch.Tensor:
    """A Linear computed in the dtype its weight is stored in (upstream's bf16 autocast). `x` may also be
    what `shared_input` prepared for a compressed layer."""
    return layer(x.to(compute_dtype(layer)) if isinstance(x, torch.Tensor) else x)


def shared_input(x: torch.Tensor, layers, gelu: bool = False):
    """`x` (after the tanh GELU if `gelu`) as the input of `layers`, which all read it. A compressed layer type
    may prepare it once for all of them (runtime/quant.py's QLinear quantizes the activations once instead of
    per layer, fused with the GELU); plain Linears get the tensor."""
    prepare = getattr(layers[0], "prepare_input", None)
    if prepare is not None:
        return prepare(x, layers, gelu)
    return F.gelu(x, approximate="tanh") if gelu else x


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, result cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the whole width: normalized in float32, cast back, then scaled (upstream WanRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fuse = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, fuse=self.fuse)


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """cat(cos, sin) of t * 10000^(-i/half), computed in float64, returned as float32."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def rope_table(cfg: DiTConfig, device=None) -> list[torch.Tensor]:
    """Per axis (frame, row, column): rotation angles [max_len, n/2] with frequencies 1/10000^(2i/n), float64."""
    tables = []
    for n in cfg.rope_split:
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, n, 2, dtype=torch.float64) / n)
        tables.append(torch.outer(torch.arange(cfg.rope_max_len, dtype=torch.float64), inv).to(device))
    return tables


def rope_frames(cfg: DiTConfig, start: int, f: int, device=None) -> torch.Tensor:
    """Frame-axis rotation angles [f, n/2] for absolute frame positions start .. start+f-1, float64, computed
    for any position (the causal model runs without end; upstream's 1024-position table would run out).
    Bit-identical to the rows of `rope_table` where both exist."""
    n = cfg.rope_split[0]
    inv = 1.0 / torch.pow(10000.0, torch.arange(0, n, 2, dtype=torch.float64) / n)
    return torch.outer(torch.arange(start, start + f, dtype=torch.float64), inv).to(device)


def rope_grid(tables: list[torch.Tensor], f: int, h: int, w: int, frame_angles: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the angles of every token of an f x h x w grid, tokens in (f, h, w) order: [L, 1, head_dim/2].
    Frames are at positions 0..f-1, or have the angles `frame_angles` [f, n/2] (`rope_frames`)."""
    tf, th, tw = tables
    tf = tf[:f] if frame_angles is None else frame_angles
    angles = torch.cat([
        tf.view(f, 1, 1, -1).expand(f, h, w, -1),
        th[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        tw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    return torch.cos(angles).float(), torch.sin(angles).float()


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.backend = "sdpa"     # attention kernel (models/attention.py)
        self.fuse = True

    def forward(self, x: torch.Tensor, rot: torch.Tensor, kv=None) -> torch.Tensor:
        """`kv` (causal model: a models.kv_cache.LayerKV): the chunk's keys / values, after RoPE, go into the
        cache; the queries attend to every frame the cache holds (the attention seam writes it:
        models/attention.py)."""
        x = shared_input(x.to(compute_dtype(self.q)), (self.q, self.k, self.v))  # one cast (or quantization)
        q = self.queries(x, rot)
        k, v = self.keys_values(x, rot)
        return self.out(attention(q, k, v, self.backend, kv))

    # the pieces, also run chunk by chunk by the low-memory block (`x`: the modulated input, or what
    # `shared_input` made of it; `start`: x holds tokens start.. of the rotation table `rot`)
    def queries(self, x, rot, start: int | None = None) -> torch.Tensor:
        q = self.norm_q(linear(self.q, x)).unflatten(-1, (self.num_heads, -1))
        return self._rope(q, rot, start, compute_dtype(self.v))

    def keys_values(self, x, rot, start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(linear(self.k, x)).unflatten(-1, (self.num_heads, -1))
        v = linear(self.v, x).unflatten(-1, (self.num_heads, -1))
        return self._rope(k, rot, start, v.dtype), v

    def _rope(self, x, rot, start, dtype):
        if start is None:
            return rope(x, *rot, dtype, fuse=self.fuse)
        return rope_rows(x, *rot, start, dtype, fuse=self.fuse)

    def out(self, attended: torch.Tensor) -> torch.Tensor:
        return linear(self.o, attended.flatten(2))


class CrossAttention(nn.Module):
    """Attention from video tokens to the text context (and, for Wan2.1 I2V, to the CLIP image tokens)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        if cfg.has_image_branch:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.backend = "sdpa"     # attention kernel (models/attention.py)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None,
                kv=None) -> torch.Tensor:
        """`kv` (a models.kv_cache.LayerCrossKV): the context's keys / values, computed once and reused."""
        return self.attend(x, self.context_kv(context, context_img, kv))

    def context_kv(self, context: torch.Tensor, context_img: torch.Tensor | None, kv=None) -> tuple:
        """Keys and values of the text context (from `kv` when it holds them) and of the image tokens."""
        heads = (self.num_heads, -1)
        cached = kv.get() if kv is not None else None
        if cached is None:
            context = context.to(compute_dtype(self.k))
            cached = (self.norm_k(linear(self.k, context)).unflatten(-1, heads),
                      linear(self.v, context).unflatten(-1, heads))
            if kv is not None:
                kv.put(cached)
        img = None
        if context_img is not None:
            img = (self.norm_k_img(linear(self.k_img, context_img)).unflatten(-1, heads),
                   linear(self.v_img, context_img).unflatten(-1, heads))
        return cached, img

    def attend(self, x: torch.Tensor, kvs: tuple, batch: slice = slice(None)) -> torch.Tensor:
        """The attention of video tokens x to `context_kv`'s keys / values (of the samples `batch`)."""
        (k, v), img = kvs

        def pick(t):   # a batch-1 context serves every sample
            return t if t.shape[0] == 1 else t[batch]
        x = x.to(compute_dtype(self.q))
        q = self.norm_q(linear(self.q, x)).unflatten(-1, (self.num_heads, -1))
        out = attention(q, pick(k), pick(v), self.backend)
        if img is not None:
            out = out + attention(q, pick(img[0]), pick(img[1]), self.backend)
        return linear(self.o, out.flatten(2))


class CameraInjector(nn.Module):
    """LingBot-World: per-block scale and shift of the residual stream from the camera features."""

    def __init__(self, dim: int):
        super().__init__()
        self.cam_injector_layer1 = nn.Linear(dim, dim)
        self.cam_injector_layer2 = nn.Linear(dim, dim)
        self.cam_scale_layer = nn.Linear(dim, dim)
        self.cam_shift_layer = nn.Linear(dim, dim)


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm32(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm32(dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm32(dim, eps=cfg.eps, elementwise_affine=False)
        # (ffn[1] names the activation; `_ffn` applies it through shared_input, fused with fp8 quantization)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.chunk: int | None = None       # tokens per chunk of the low-memory block, set by WanDiT.set_chunk
        self.fuse = True                    # compiled elementwise kernels on CUDA, set by WanDiT.set_fuse
        self.has_camera = cfg.has_camera
        if cfg.has_camera:  # upstream keeps these four directly on the block
            for name, layer in CameraInjector(dim).named_children():
                self.add_module(name, layer)

    def forward(self, x, e0, rot, context, context_img=None, cam=None, kv=None, cross_kv=None, norm_dtype=None):
        """x [B, L, dim]; e0 [B, 1 or L, 6, dim] float32; cam [B or 1, L, dim] or None; kv / cross_kv: this
        layer's views of the causal model's caches (models/kv_cache.py), or None. `norm_dtype`: the dtype the
        first norm rounds to (default x's; the low-memory forward hands block 0 a float32 copy of bf16 tokens).

        With `chunk` set (and autograd off) the low-memory path runs: a float32 `x` is updated IN PLACE and
        returned (another dtype is first copied to float32, leaving the caller's tensor alone)."""
        mods = (self.modulation.float() + e0).unbind(2)
        if self.chunk is not None and not torch.is_grad_enabled():
            return self._forward_chunked(x, mods, rot, context, context_img, cam, kv, cross_kv, norm_dtype)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods

        fuse = self.fuse
        y = self.self_attn(modulate(x, shift_sa, scale_sa, self.norm1.eps, compute_dtype(self.self_attn.q),
                                    norm_dtype or x.dtype, fuse=fuse), rot, kv)
        x = gate_residual(x, y, gate_sa, fuse=fuse)
        del y   # (what the block no longer needs goes now, not when it returns)

        if cam is not None:
            h = linear(self.cam_injector_layer2, F.silu(linear(self.cam_injector_layer1, cam))) + cam
            x = (1.0 + linear(self.cam_scale_layer, h)) * x + linear(self.cam_shift_layer, h)
            del h

        x = x + self.cross_attn(self.norm3(x), context, context_img, cross_kv)
        return gate_residual(x, self._ffn(x, shift_ff, scale_ff), gate_ff, fuse=fuse)

    def _ffn(self, x, shift, scale):
        return self._ffn_of(modulate(x, shift, scale, self.norm2.eps, compute_dtype(self.ffn[0]), x.dtype,
                                     fuse=self.fuse))

    def _ffn_of(self, h):
        """The FFN of its modulated input."""
        h = linear(self.ffn[0], h)
        return linear(self.ffn[2], shared_input(h.to(compute_dtype(self.ffn[2])), (self.ffn[2],), gelu=True))

    def _forward_chunked(self, x, mods, rot, context, context_img, cam, kv, cross_kv, norm_dtype):
        """The low-memory block (module docstring): the same math as `forward`, `chunk` tokens of one sample at
        a time, the float32 residual stream `x` updated in place."""
        # per-sample modulation as tensors of their own (views at other storage offsets could each compile anew)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (m.clone() if m.shape[1] == 1 else m
                                                                    for m in mods)
        fuse, sa = self.fuse, self.self_attn
        norm_dtype = norm_dtype or x.dtype
        if x.dtype != torch.float32:
            x = x.float()
        n_batch, length = x.shape[:2]
        # (sample, start, rows): x[b, rows] is contiguous, and one sample's chunk is a GEMM of `chunk` rows
        pieces = [(b, s, slice(s, min(s + self.chunk, length)))
                  for s in range(0, length, self.chunk) for b in range(n_batch)]

        def mod_sa(b, s, r):
            return modulate_rows(x, shift_sa, scale_sa, b, s, r.stop - s, self.norm1.eps, compute_dtype(sa.q),
                                 norm_dtype, fuse=fuse)

        # self-attention: every token's keys and values, chunk by chunk
        keys = values = None
        for b, s, r in pieces:
            k, v = sa.keys_values(shared_input(mod_sa(b, s, r), (sa.k, sa.v)), rot, s)
            if keys is None:
                keys = k.new_empty((n_batch, length, *k.shape[2:]))
                values = v.new_empty((n_batch, length, *v.shape[2:]))
            keys[b:b + 1, r], values[b:b + 1, r] = k, v
            del k, v
        if kv is not None:
            if writes_cache(sa.backend):
                raise ValueError(f"the low-memory block cannot run attention kernel {sa.backend!r}, which writes "
                                 "the causal cache itself (sequence parallelism); leave chunk unset")
            keys, values = kv.update(keys, values)
        attend = [prepare_attention(keys[b:b + 1], values[b:b + 1], sa.backend) for b in range(n_batch)]
        del keys, values   # (an 8-bit kernel keeps only its quantized copies)
        for b, s, r in pieces:
            q = sa.queries(shared_input(mod_sa(b, s, r), (sa.q,)), rot, s)
            _gated_residual_(x[b:b + 1, r], sa.out(attend[b](q)), _rows(gate_sa, b, s, r.stop - s), fuse)
            del q
        del attend

        if cam is not None:   # camera features per chunk (batch 1 serves every sample), the update in place
            for s in range(0, length, self.chunk):
                r = slice(s, min(s + self.chunk, length))
                c = cam[:, r]
                h = linear(self.cam_injector_layer2, F.silu(linear(self.cam_injector_layer1, c))) + c
                scale, shift = 1.0 + linear(self.cam_scale_layer, h), linear(self.cam_shift_layer, h)
                for b in range(n_batch):
                    i = b if cam.shape[0] > 1 else 0
                    x[b:b + 1, r].mul_(scale[i:i + 1]).add_(shift[i:i + 1])

        kvs = self.cross_attn.context_kv(context, context_img, cross_kv)
        for b, s, r in pieces:
            x[b:b + 1, r].add_(self.cross_attn.attend(self.norm3(x[b:b + 1, r]), kvs, slice(b, b + 1)))
        del kvs

        for b, s, r in pieces:
            n = r.stop - s
            h = modulate_rows(x, shift_ff, scale_ff, b, s, n, self.norm2.eps, compute_dtype(self.ffn[0]),
                              torch.float32, fuse=fuse)
            _gated_residual_(x[b:b + 1, r], self._ffn_of(h), _rows(gate_ff, b, s, n), fuse)
        return x


def _gated_residual_(xr: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, fuse: bool) -> None:
    """xr += y * gate in place (xr: rows of the float32 residual stream). On CUDA with compiled kernels one
    addcmul_ (no temporary); elsewhere `gate_residual`'s eager arithmetic, so that the CPU result equals the
    plain block's bit for bit."""
    if fuse and xr.is_cuda:
        xr.addcmul_(y, gate)
    else:
        xr.copy_(gate_residual(xr, y, gate, fuse=False))


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = Linear32(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.chunk: int | None = None       # tokens per chunk (the low-memory forward), set by WanDiT.set_chunk

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unbind(2)
        if self.chunk is None or torch.is_grad_enabled():
            return self.head(self.norm(x.float()) * (1 + scale) + shift)
        # its float32 temporaries would be the forward's largest tensors: sample by sample, chunk by chunk
        out = x.new_empty((*x.shape[:2], self.head.out_features), dtype=torch.float32)
        for s in range(0, x.shape[1], self.chunk):
            r = slice(s, s + self.chunk)
            for b in range(x.shape[0]):
                sh, sc = (m[b:b + 1] if m.shape[0] > 1 else m for m in (shift, scale))
                sh, sc = (m if m.shape[1] == 1 else m[:, r] for m in (sh, sc))
                out[b:b + 1, r] = self.head(self.norm(x[b:b + 1, r].float()) * (1 + sc) + sh)
        return out


class ImageEmbedding(nn.Module):
    """Wan2.1 I2V: CLIP penultimate features [B, 257, 1280] -> context tokens (upstream img_emb.proj)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm32(in_dim, eps=1e-5), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, dim), LayerNorm32(dim, eps=1e-5))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        ln0, fc1, act, fc2, ln1 = self.proj   # LayerNorms in float32, the MLP in the compute dtype
        return ln1(linear(fc2, act(linear(fc1, ln0(clip.float())))).float())


class WanDiT(nn.Module):
    """forward(x, t, context, y=None, clip=None, camera=None) -> velocity [B, out_dim, F, H, W] float32.

    x: noisy latents [B, 16, F, H, W]; y: conditioning [B, 20, F, H, W] (I2V: mask + image latents);
    t: timesteps [B] (one per sample) or [B, L] (one per token); context: text embeddings
    [B, <=text_len, text_dim] (zero-padded to text_len here, as upstream does); clip: CLIP features
    [B, 257, image_dim] (Wan2.1 I2V); camera: folded camera rays [B or 1, control_dim*64, F, H, W]
    (LingBot; a batch of 1 serves every sample, e.g. CFG's cond and uncond).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(Linear32(cfg.freq_dim, dim), nn.SiLU(), Linear32(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear32(dim, 6 * dim))
        if cfg.has_image_branch:
            self.img_emb = ImageEmbedding(cfg.image_dim, dim)
        if cfg.has_camera:
            self.patch_embedding_wancamctrl = nn.Linear(cfg.control_in, dim)
            self.c2ws_hidden_states_layer1 = nn.Linear(dim, dim)
            self.c2ws_hidden_states_layer2 = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self._rope: list[torch.Tensor] | None = None

    # ---- pieces of the forward, in order -------------------------------------------------------------
    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] or [B, L] -> e [B, 1 or L, dim], e0 [B, 1 or L, 6, dim], both float32.

        One timestep per sample stays one row per sample (broadcast over tokens): the same numbers as
        upstream's per-token expansion without a [B, L, 6, dim] float32 tensor.
        """
        if t.dim() == 2 and bool((t == t[:, :1]).all()):
            t = t[:, 0]   # upstream's per-token form with one value per sample: one row (one host sync)
        if t.dim() == 1:
            t = t[:, None]
        e = self.time_embedding(sinusoid(t, self.cfg.freq_dim))
        e0 = self.time_projection(e).unflatten(-1, (6, self.cfg.dim))
        return e, e0

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        pad = self.cfg.text_len - context.shape[1]
        if pad < 0:
            raise ValueError(f"text context has {context.shape[1]} tokens; the model takes at most {self.cfg.text_len}")
        context = F.pad(context, (0, 0, 0, pad))
        return self.text_embedding(context.to(compute_dtype(self.text_embedding[0])))

    def embed_camera(self, camera: torch.Tensor, tokens: slice | None = None) -> torch.Tensor:
        """Fold each 1x2x2 latent patch of the camera map into one token's features, then embed (only the
        tokens in `tokens`, if given)."""
        pt, ph, pw = self.cfg.patch_size
        b, c, f, h, w = camera.shape
        folded = (camera.view(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
                  .permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw))
        if tokens is not None:
            folded = folded[:, tokens]
        c0 = linear(self.patch_embedding_wancamctrl, folded)
        return c0 + linear(self.c2ws_hidden_states_layer2, F.silu(linear(self.c2ws_hidden_states_layer1, c0)))

    def rope_angles(self, f: int, h: int, w: int, device, start_frame: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotations of an f x h x w token grid; with `start_frame`, its frames sit at absolute positions
        start_frame.. (computed for any position: a causal stream has no end)."""
        if self._rope is None or self._rope[0].device != torch.device(device):
            self._rope = rope_table(self.cfg, device)
        frames = None if start_frame is None else rope_frames(self.cfg, start_frame, f, device)
        return rope_grid(self._rope, f, h, w, frames)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        pt, ph, pw = self.cfg.patch_size
        f, h, w = grid
        b, c = x.shape[0], self.cfg.out_dim
        x = x.view(b, f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, f * pt, h * ph, w * pw)

    def prepare(self, x, t, context, y=None, clip=None, camera=None, start_frame=None, cross=None,
                tokens: slice | None = None):
        """Everything before the blocks: returns (tokens, block kwargs, head inputs). Causal chunks: frames at
        absolute positions from `start_frame`; the embedded text kept in `cross` (models.kv_cache.CrossKV).

        `tokens` (a range of the clip's tokens in (frame, row, column) order): only those tokens, with their
        own RoPE angles, camera features and per-token time embeddings; the blocks then run on that part of
        the sequence (sequence parallelism: runtime/parallel.py gives each process its part)."""
        cfg = self.cfg
        if y is not None:
            x = torch.cat([x, y], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"{cfg.name} takes {cfg.in_dim} input channels (latents + conditioning), got {x.shape[1]}")
        wdt = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(wdt))
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        e, e0 = self.embed_time(t)
        rot = self.rope_angles(*grid, device=x.device, start_frame=start_frame)
        if tokens is not None:
            x = x[:, tokens]
            rot = tuple(r[tokens] for r in rot)
            e, e0 = (a if a.shape[1] == 1 else a[:, tokens] for a in (e, e0))
        if cross is None:
            text = self.embed_text(context)
        else:
            if cross.context is None:
                cross.context = self.embed_text(context)
            text = cross.context
        kwargs = dict(e0=e0, rot=rot, context=text)
        if cfg.has_image_branch:
            if clip is None:
                raise ValueError(f"{cfg.name} needs CLIP image features (clip=...)")
            kwargs["context_img"] = self.img_emb(clip)
        if camera is not None:
            if not cfg.has_camera:
                raise ValueError(f"{cfg.name} has no camera layers; camera input given")
            kwargs["cam"] = self.embed_camera(camera.to(wdt), tokens)
        return x, kwargs, (e, grid)

    def set_chunk(self, tokens: int | None) -> None:
        """Run every block as the low-memory block (module docstring) over `tokens` rows of one sample at a time;
        None: the plain block."""
        if tokens is not None and tokens < 1:
            raise ValueError(f"chunk must be at least one token, got {tokens}")
        for block in self.blocks:
            block.chunk = tokens
        self.head.chunk = tokens

    def set_attention(self, self_attention: str = "sdpa", cross_attention: str = "sdpa") -> None:
        """The attention kernels of this model by registered name (models/attention.py). "8bit" pays off for
        self-attention at long sequences; for cross-attention (512 context tokens) quantizing every query
        costs more than the attention itself."""
        get_backend(self_attention), get_backend(cross_attention)   # unknown names fail here, not mid-run
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.backend = self_attention
            elif isinstance(m, CrossAttention):
                m.backend = cross_attention

    def set_fuse(self, fuse: bool) -> None:
        """Compile the float32 elementwise work on CUDA (True, default) or run it eagerly (same math)."""
        for m in self.modules():
            if hasattr(m, "fuse"):
                m.fuse = bool(fuse)

    def finish(self, x: torch.Tensor, e: torch.Tensor, grid) -> torch.Tensor:
        return self.unpatchify(self.head(x, e), grid)

    def forward(self, x, t, context, y=None, clip=None, camera=None, cache=None, cross=None,
                start_frame: int | None = None, stack: "StackCache | None" = None) -> torch.Tensor:
        """The velocity of the whole clip; or, for the causal model (`cache` given: models.kv_cache.KVCache),
        of one chunk of latent frames starting at latent frame `start_frame`: the chunk's keys / values are
        written into `cache` and its queries attend to every frame held, and the prompt's cross-attention keys /
        values come from `cross` (a CrossKV; computed from `context` on the first forward of a prompt).

        `stack` (step caching, pipelines/step_cache.py): with `stack.reuse` the blocks are skipped and the
        residual the stack added at the last computed step is added to this step's tokens (the embeddings and
        the head still run, at this step's timestep); otherwise the blocks run and their residual (output -
        input, float32) is kept in `stack.residual` for the steps that follow."""
        self.begin_chunk(x, cache, cross, start_frame)
        tokens, kwargs, (e, grid) = self.prepare(x, t, context, y=y, clip=clip, camera=camera,
                                                 start_frame=start_frame, cross=cross)
        if stack is not None and stack.reuse:
            return self.finish(stack.reused(tokens), e, grid)
        x = tokens
        if self.blocks[0].chunk is not None and not torch.is_grad_enabled():
            # the low-memory blocks update one float32 stream in place: make it here, so that the tokens can go
            # (block 0 rounds its first norm to the tokens' dtype, as the plain block does); a float32 copy when
            # the step cache still needs the tokens
            x = tokens.to(torch.float32, copy=stack is not None)
            kwargs["norm_dtype"] = tokens.dtype
        if stack is None:
            del tokens   # (x is then the only reference: the bf16 tokens go once the first block has run)
        for block, block_kwargs in self.layers(kwargs, cache, cross):
            x = block(x, **block_kwargs)
        if stack is not None:
            stack.keep(x, tokens)
        return self.finish(x, e, grid)

    def begin_chunk(self, x: torch.Tensor, cache=None, cross=None, start_frame: int | None = None) -> None:
        """Causal model: tell `cache` which frames the latents `x` [B, C, F, H, W] are (a no-op without one)."""
        if cache is not None:
            if start_frame is None or cross is None:
                raise ValueError("a forward with a KV cache needs start_frame and cross")
            cache.begin_chunk(start_frame, x.shape[2] // self.cfg.patch_size[0])

    def layers(self, kwargs: dict, cache=None, cross=None):
        """Each block with its kwargs, in order: `prepare`'s block kwargs with this layer's cache views; a
        `norm_dtype` in kwargs goes to the first block only (see `forward`). The caller runs
        `x = block(x, **kw)` itself, so that no frame but its own holds a block's input."""
        for i, block in enumerate(self.blocks):
            if cache is not None:
                kwargs.update(kv=cache.layer(i), cross_kv=cross.layer(i))
            yield block, kwargs
            kwargs.pop("norm_dtype", None)


class StackCache:
    """The block stack's residual for step caching, passed to `WanDiT.forward` per call (data, not model state).

    `reuse`: the next forward skips the blocks and adds `residual` to its tokens. A computed forward stores
    output - input of the stack (float32, [B, L, dim]) into the same buffer."""

    def __init__(self):
        self.residual: torch.Tensor | None = None
        self.reuse = False

    def reused(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the stack would have made of `tokens` [B, L, dim], by the kept residual."""
        r = self.residual
        if r is None or r.shape != tokens.shape:
            raise ValueError(f"step cache: no residual of shape {list(tokens.shape)} to reuse "
                             f"(have {None if r is None else list(r.shape)}); compute this step")
        return tokens + r

    def keep(self, out: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.residual is not None and self.residual.shape == out.shape and self.residual.device == out.device:
            torch.sub(out, tokens, out=self.residual)
        else:
            self.residual = None   # (the old buffer goes before the new one is made)
            self.residual = out - tokens

    def clear(self) -> None:
        self.residual, self.reuse = None, False
