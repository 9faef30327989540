"""The low-memory block (`WanDiT.set_chunk`): the same numbers as the plain block, bit for bit on the CPU, for
every branch a block has (camera, image cross-attention, per-token timesteps, bf16 tokens into block 0,
compressed linears, the 8-bit attention's emulation, the causal KV cache), and a lower activation peak.

The peak is measured by tracing the live tensors of a forward on the meta device (`testing/memory.py`): no
arithmetic, so it runs at LingBot's full size (dim 5120, 32,760 tokens) in a second or two, and the planner's
activation model (models/configs.py) is checked against what the code really keeps alive."""
from __future__ import annotations

import copy

import pytest
import torch

from worldstream.models.configs import get_config
from worldstream.models.dit import Block, WanDiT, rope_grid, rope_table
from worldstream.runtime import attention8  # noqa: F401  (registers "8bit")
from worldstream.testing.memory import LiveBytes

from test_dit import FRAMES, LAT_H, LAT_W, build, make_inputs


def block_inputs(cfg, batch: int, tokens_grid=(3, 4, 5), seed: int = 0, per_token: bool = False,
                 dtype=torch.float32):
    """Inputs of one block: x, e0, rot, context (+ camera features, image context where the config has them)."""
    g = torch.Generator().manual_seed(seed)
    f, h, w = tokens_grid
    L = f * h * w
    x = torch.randn(batch, L, cfg.dim, generator=g).to(dtype)
    e0 = torch.randn(batch, L if per_token else 1, 6, cfg.dim, generator=g) * 0.3
    rot = rope_grid(rope_table(cfg), f, h, w)
    kw = dict(e0=e0, rot=rot, context=torch.randn(batch, cfg.text_len, cfg.dim, generator=g).to(dtype))
    if cfg.has_camera:
        kw["cam"] = torch.randn(1, L, cfg.dim, generator=g).to(dtype)
    if cfg.has_image_branch:
        kw["context_img"] = torch.randn(batch, cfg.image_tokens, cfg.dim, generator=g).to(dtype)
    return x, kw


def random_block(cfg, seed: int = 0, dtype=torch.float32) -> Block:
    torch.manual_seed(seed)
    block = Block(cfg).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return block.to(dtype)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["lingbot-cam-tiny", "wan2.1-i2v-14b-tiny", "wan2.2-i2v-a14b-tiny"])
@pytest.mark.parametrize("batch,chunk,per_token", [(2, 8, False), (1, 16, True), (2, 60, False), (2, 7, True)])
def test_chunked_block_equals_plain_block_bit_for_bit(variant, batch, chunk, per_token):
    cfg = get_config(variant)
    plain = random_block(cfg, seed=1)
    chunked = copy.deepcopy(plain)
    chunked.chunk = chunk
    x, kw = block_inputs(cfg, batch, per_token=per_token, seed=2)
    want = plain(x.clone(), **kw)
    stream = x.clone()
    got = chunked(stream, **kw)
    assert got.data_ptr() == stream.data_ptr()          # the float32 stream was updated in place
    assert torch.equal(got, want)


@torch.no_grad()
def test_chunked_block_zero_with_bf16_tokens_rounds_its_first_norm_like_the_plain_block():
    """Block 0 gets the bf16 patch embedding: the plain block's first norm rounds to bf16. The low-memory
    forward hands it a float32 copy with norm_dtype=bf16: the same result; the caller's bf16 x is untouched."""
    cfg = get_config("lingbot-cam-tiny")
    plain = random_block(cfg, seed=3, dtype=torch.bfloat16)
    chunked = copy.deepcopy(plain)
    chunked.chunk = 12
    x, kw = block_inputs(cfg, 2, seed=4, dtype=torch.bfloat16)
    want = plain(x, **kw)
    keep = x.clone()
    assert torch.equal(chunked(x.float(), **kw, norm_dtype=torch.bfloat16), want)
    assert torch.equal(chunked(x, **kw), want) and torch.equal(x, keep)   # a bf16 x is copied, not changed


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "8bit"])
@pytest.mark.parametrize("quant", [None, "int8"])
def test_whole_model_chunked_equals_plain(backend, quant):
    """Through `WanDiT.forward` (the float32 stream made before block 0), compressed linears and the 8-bit
    attention's emulation (K / V prepared once for all query chunks) included."""
    from worldstream.models.quant import quantize_block_

    cfg = get_config("lingbot-cam-tiny")
    model = build(cfg, seed=5)
    if quant:
        for block in model.blocks:
            quantize_block_(block, quant)
    model.set_attention(backend)
    inp = make_inputs(cfg, seed=6)
    want = model(**inp)
    model.set_chunk(10)
    assert torch.equal(model(**inp), want)
    model.set_chunk(None)
    assert torch.equal(model(**inp), want)


@torch.no_grad()
def test_step_cache_residual_through_the_low_memory_forward():
    """The low-memory forward keeps the same residual for step caching, and reusing it gives the same output."""
    from worldstream.models.dit import StackCache

    cfg = get_config("lingbot-cam-tiny")
    model = build(cfg, seed=9)
    inp = make_inputs(cfg, seed=10)
    later = {**inp, "t": torch.tensor([700.0, 700.0])}
    outs = {}
    for chunk in (None, 10):
        model.set_chunk(chunk)
        stack = StackCache()
        computed = model(**inp, stack=stack)
        stack.reuse = True
        outs[chunk] = (computed, stack.residual.clone(), model(**later, stack=stack))
    assert all(torch.equal(a, b) for a, b in zip(outs[None], outs[10]))
    assert torch.equal(outs[None][0], model(**inp))          # keeping the residual changes nothing


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa", "8bit"])
def test_causal_chunks_through_the_kv_cache_equal_plain(backend):
    """The causal model: each chunk's keys / values go into the cache, its queries attend to what it holds
    (the 8-bit kernel too: the seam writes the cache for it, and the low-memory block prepares K / V once)."""
    from worldstream.models.kv_cache import CrossKV, KVCache

    cfg = get_config("lingbot-fast-tiny")
    model = build(cfg, seed=7)
    model.set_attention(backend)
    inp = make_inputs(cfg, seed=8, batch=1)
    t = torch.tensor([500.0])
    frame_tokens = (LAT_H // 2) * (LAT_W // 2)
    outs = {}
    for chunk in (None, 9):
        model.set_chunk(chunk)
        cache = KVCache.empty(cfg.num_layers, 1, frame_tokens, cfg.num_heads, cfg.head_dim, torch.float32, "cpu",
                              max_frames=FRAMES)
        cross = CrossKV(cfg.num_layers)
        outs[chunk] = [model(inp["x"][:, :, s:s + 1], t, inp["context"], y=inp["y"][:, :, s:s + 1],
                             camera=inp["camera"][:, :, s:s + 1], cache=cache, cross=cross, start_frame=s)
                       for s in range(FRAMES)]
    assert all(torch.equal(a, b) for a, b in zip(outs[None], outs[9]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa", "8bit"])
@torch.no_grad()
def test_chunked_block_on_the_gpu_full_width(backend):
    """A full-width LingBot block in bf16 with the compiled elementwise kernels, 9 frames, CFG batch: the
    low-memory block against the plain one. Not bit for bit on CUDA (cuBLAS picks kernels by row count; the
    in-place gated residual is one addcmul_): measured error to be recorded here on the first GPU run; bf16
    noise is ~0.3%."""
    from worldstream.runtime.attention8 import available

    if backend == "8bit" and not available():
        pytest.skip("8-bit attention needs fp8 tensor cores")
    cfg = get_config("lingbot-cam")
    torch.manual_seed(0)
    with torch.device("cuda"):
        plain = Block(cfg).to(torch.bfloat16).eval()
    for name, p in plain.named_parameters():
        p.data.normal_(0, 0.02).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    plain.modulation.data.normal_(0, cfg.dim ** -0.5)
    plain.self_attn.backend = backend
    chunked = copy.deepcopy(plain)
    chunked.chunk = 2048
    x, kw = block_inputs(cfg, 2, tokens_grid=(3, 30, 52), dtype=torch.bfloat16)
    x, kw = x.cuda().float(), {k: tuple(t.cuda() for t in v) if isinstance(v, tuple) else v.cuda()
                                for k, v in kw.items()}
    kw["e0"] = kw["e0"] * 0.1
    want = plain(x.clone(), **kw)
    got = chunked(x.clone(), **kw)
    err = ((got - want).double().norm() / (want - x).double().norm()).item()   # relative to the block's update
    print(f"{backend}: chunked vs plain block on CUDA, update rel. error {err:.2e}")
    assert err < 1e-2


def test_grad_mode_runs_the_plain_block():
    """Training keeps autograd: the in-place low-memory path is only taken without it."""
    cfg = get_config("lingbot-cam-tiny")
    block = random_block(cfg)
    block.chunk = 8
    x, kw = block_inputs(cfg, 2)
    x.requires_grad_(True)
    block(x, **kw).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- memory: traced on the meta device --------------------------------------------------------------------

def _shape(*ts):
    return torch.broadcast_shapes(*(t.shape for t in ts))


def traced_peak(cfg, batch: int, tokens_grid, chunk: int | None, camera: bool = True) -> int:
    """Peak bytes of tensors alive during one full forward of a 2-block model, weights excluded, as on a GPU:
    attention allocates its output (flash / cuDNN, no score matrix), and the compiled elementwise kernels of
    models/dit.py (`fused`) allocate only their outputs (eagerly, their float32 temporaries would count)."""
    import worldstream.models.dit as dit
    from worldstream.models import attention as attn_mod

    f, h, w = tokens_grid
    with torch.device("meta"):
        model = WanDiT(cfg).to(torch.bfloat16).eval()
        model.blocks = model.blocks[:2]
    model.set_chunk(chunk)
    attn_mod.register_backend("meta", lambda q, k, v: torch.empty_like(q))
    model.set_attention("meta", "meta")
    compiled = dict(
        modulate=lambda x, sh, sc, eps, dtype, nd, fuse=True: x.new_empty(_shape(x, sh, sc), dtype=dtype),
        gate_residual=lambda x, y, g, fuse=True: x.new_empty(_shape(x, y, g), dtype=torch.float32),
        rms_norm=lambda x, wt, eps, fuse=True: torch.empty_like(x),
        rope=lambda x, c, s, dtype, fuse=True: x.new_empty(x.shape, dtype=dtype),
        modulate_rows=lambda x, sh, sc, b, s, n, eps, dtype, nd, fuse=True: x.new_empty((1, n, x.shape[-1]),
                                                                                       dtype=dtype),
        rope_rows=lambda x, c, s, start, dtype, fuse=True: x.new_empty(x.shape, dtype=dtype))
    saved = {name: getattr(dit, name) for name in compiled}
    inp = dict(x=torch.empty(batch, 16, f, 2 * h, 2 * w, device="meta"),
               y=torch.empty(batch, cfg.in_dim - 16, f, 2 * h, 2 * w, device="meta"),
               t=torch.empty(batch, device="meta"),
               context=torch.empty(batch, cfg.text_len, cfg.text_dim, device="meta"))
    if camera and cfg.has_camera:
        inp["camera"] = torch.empty(1, cfg.control_in // 4, f, 2 * h, 2 * w, device="meta", dtype=torch.bfloat16)
    try:
        for name, fn in compiled.items():
            setattr(dit, name, fn)
        with torch.no_grad(), LiveBytes() as live:
            model(**inp)
    finally:
        for name, fn in saved.items():
            setattr(dit, name, fn)
        attn_mod._BACKENDS.pop("meta", None)
    return live.peak


@pytest.mark.parametrize("batch", [1, 2])
def test_planner_activation_model_covers_the_traced_peak_at_full_size(batch):
    """LingBot Cam at 81 frames 480x832 (32,760 tokens): the activation model used by the planner is an upper
    bound of the traced peak for the plain and the chunked block, and within 15% of it (it is a model, not a
    loose guess). The chunked block needs under half of the plain block's activations (measured: 1.87 vs 3.85
    GB for one sample, 3.22 vs 7.34 GB for the CFG batch)."""
    from worldstream.runtime.planner import SEQ_CHUNK

    cfg = get_config("lingbot-cam")
    grid = (21, 30, 52)
    L = 21 * 30 * 52
    plain = traced_peak(cfg, batch, grid, None)
    chunked = traced_peak(cfg, batch, grid, SEQ_CHUNK)
    model_plain = cfg.activation_bytes(L, batch) / 1.1        # the model before its allocator margin
    model_chunked = cfg.activation_bytes(L, batch, SEQ_CHUNK) / 1.1
    print(f"batch {batch}: traced plain {plain / 1e9:.2f} GB (model {model_plain / 1e9:.2f}), "
          f"chunked {chunked / 1e9:.2f} GB (model {model_chunked / 1e9:.2f})")
    assert chunked < 0.5 * plain
    for traced, modelled in ((plain, model_plain), (chunked, model_chunked)):
        assert traced <= modelled <= 1.15 * traced
