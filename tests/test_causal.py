"""The causal DiT and its KV cache (models/kv_cache.py).

1. Chunk by chunk through the cache == one forward over all frames with the block-causal mask (each chunk sees
   itself and the earlier frames the cache holds), for a global cache and for a window with a sink.
2. The ring + sink cache == upstream's clone-shift cache (written here from the spec) for every eviction: the
   same frames are attended, with the same attention output.
3. RoPE angles for any frame position (the stream has no end) equal the table's where both exist.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from worldstream.models.attention import register_backend
from worldstream.models.configs import get_config
from worldstream.models.dit import WanDiT, rope_frames, rope_table
from worldstream.models.kv_cache import CrossKV, KVCache

F_TOKENS = 6        # tokens per latent frame: lat 4 x 6 -> 2 x 3 after the 1x2x2 patch


def tiny_causal(layers=3, seed=0):
    cfg = dataclasses.replace(get_config("lingbot-fast-tiny"), num_layers=layers)
    torch.manual_seed(seed)
    model = WanDiT(cfg).eval()
    for p in model.parameters():     # modulation and the rest at a scale where every part matters
        p.data.normal_(0, 0.3 if p.dim() < 2 else 0.6 / math.sqrt(p.shape[-1]))
    return model


def inputs(cfg, frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, w = 4, 6
    return dict(x=torch.randn(1, 16, frames, h, w, generator=g), y=torch.randn(1, 20, frames, h, w, generator=g),
                context=torch.randn(1, 5, cfg.text_dim, generator=g),
                camera=torch.randn(1, cfg.control_in // 4, frames, h, w, generator=g))


def held_frames(q_frame: int, chunk: int, window: int | None, sink: int) -> set[int]:
    """Frames a query in frame `q_frame` attends to (spec: the cache after its chunk was written)."""
    end = (q_frame // chunk + 1) * chunk
    if window is None or end <= window:
        return set(range(end))
    return set(range(sink)) | set(range(end - (window - sink), end))


@pytest.fixture
def masked_backend():
    """SDPA with a mask from frame membership: registered as a kernel, so the model itself runs unchanged."""
    state = {}

    def fn(q, k, v):
        mask = state["mask"]
        if q.shape[1] != k.shape[1]:           # cross-attention: no mask
            mask = None
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    register_backend("test-masked", fn)
    return state


@pytest.mark.parametrize("chunk,window,sink", [(3, None, 0), (2, 5, 1), (2, 6, 2), (3, 9, 3)])
@torch.no_grad()
def test_chunked_causal_forward_equals_one_masked_forward(masked_backend, chunk, window, sink):
    model = tiny_causal()
    cfg = model.cfg
    frames = 4 * chunk
    inp = inputs(cfg, frames)
    t = torch.tensor([0.0])
    # reference: all frames at once, each query frame sees the frames its chunk would hold
    allowed = torch.zeros(frames * F_TOKENS, frames * F_TOKENS, dtype=torch.bool)
    for qf in range(frames):
        for kf in held_frames(qf, chunk, window, sink):
            allowed[qf * F_TOKENS:(qf + 1) * F_TOKENS, kf * F_TOKENS:(kf + 1) * F_TOKENS] = True
    masked_backend["mask"] = allowed
    model.set_attention("test-masked")
    ref = model(inp["x"], t, inp["context"], y=inp["y"], camera=inp["camera"])
    model.set_attention("sdpa")
    # chunk by chunk through the cache; each chunk written twice (as a denoising step and its refresh do)
    cache = KVCache.empty(cfg.num_layers, 1, F_TOKENS, cfg.num_heads, cfg.head_dim, torch.float32, "cpu",
                          window=window, sink=sink, max_frames=frames)
    cross = CrossKV(cfg.num_layers)
    outs = []
    for s in range(0, frames, chunk):
        part = {k: v[:, :, s:s + chunk] for k, v in inp.items() if k != "context"}
        for _ in range(2):
            out = model(part["x"], t, inp["context"], y=part["y"], camera=part["camera"], cache=cache,
                        cross=cross, start_frame=s)
        outs.append(out)
    got = torch.cat(outs, dim=2)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()
    assert cache.held == (frames if window is None else min(frames, window))


def clone_shift_reference(window, sink, chunk, steps, heads=2, dim=4, seed=0):
    """Upstream's cache, from the spec: a buffer of `window` frames; when a chunk would overflow it, the
    oldest frames after the sink are dropped and the rest copied left; the chunk is appended."""
    g = torch.Generator().manual_seed(seed)
    buf_k, buf_v, frames = [], [], []
    ring = KVCache.empty(1, 1, 1, heads, dim, torch.float64, "cpu", window=window, sink=sink)
    for c in range(steps):
        start = c * chunk
        k, v = (torch.randn(1, chunk, heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
        q = torch.randn(1, chunk, heads, dim, generator=g, dtype=torch.float64)
        overflow = len(frames) + chunk - window
        if overflow > 0:        # clone-shift: keep the sink, drop the oldest after it
            keep = list(range(sink)) + list(range(sink + overflow, len(frames)))
            frames, buf_k, buf_v = [frames[i] for i in keep], [buf_k[i] for i in keep], [buf_v[i] for i in keep]
        frames += list(range(start, start + chunk))
        buf_k += list(k.unbind(1))
        buf_v += list(v.unbind(1))
        ref_k, ref_v = torch.stack(buf_k, 1), torch.stack(buf_v, 1)
        ring.begin_chunk(start, chunk)
        got_k, got_v = ring.update(0, k, v)
        yield frames, (q, ref_k, ref_v), (got_k, got_v)


@pytest.mark.parametrize("window,sink,chunk", [(10, 3, 4), (18, 6, 4), (9, 0, 3), (7, 1, 3), (8, 4, 4)])
def test_ring_with_sink_equals_clone_shift_for_every_eviction(window, sink, chunk):
    attend = torch.nn.functional.scaled_dot_product_attention
    for step, (frames, (q, rk, rv), (gk, gv)) in enumerate(clone_shift_reference(window, sink, chunk, 12)):
        assert gk.shape == rk.shape, step
        # same keys (as sets of rows), and the same attention output for the chunk's queries
        assert sorted(map(tuple, gk[0].flatten(1).tolist())) == sorted(map(tuple, rk[0].flatten(1).tolist()))
        ref = attend(q.transpose(1, 2), rk.transpose(1, 2), rv.transpose(1, 2))
        got = attend(q.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2))
        assert torch.allclose(got, ref, atol=1e-12), step
        if step == 3 and (window, sink, chunk) == (10, 3, 4):
            assert frames == [0, 1, 2, 9, 10, 11, 12, 13, 14, 15]     # the spec's example


def test_cache_refuses_what_upstream_cannot_do():
    with pytest.raises(ValueError, match="window >= sink \\+ chunk"):
        KVCache.empty(1, 1, 1, 1, 1, torch.float32, "cpu", window=6, sink=3).begin_chunk(0, 4)
    c = KVCache.empty(1, 1, 1, 1, 1, torch.float32, "cpu", max_frames=6)
    c.begin_chunk(0, 3)
    c.begin_chunk(3, 3)
    with pytest.raises(ValueError, match="give a window"):
        c.begin_chunk(6, 3)
    with pytest.raises(ValueError, match="does not continue"):
        c.begin_chunk(0, 2)


def test_rope_for_any_position_matches_the_table():
    cfg = get_config("lingbot-fast")
    table = rope_table(cfg)[0]
    assert torch.equal(rope_frames(cfg, 1000, 24), table[1000:1024])
    far = rope_frames(cfg, 10_000_000, 3)          # beyond upstream's 1024 positions: still defined
    assert torch.isfinite(far).all() and far.shape == (3, cfg.rope_split[0] // 2)
