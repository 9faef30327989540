"""Correctness of `WanDiT`, the one DiT behind every variant (model-core acceptance).

What is checked, all in float32 on CPU with tiny configs and random weights:
1. parameter and state-dict key counts of every full-size variant (meta device), against counts derived
   by hand from the module definitions in shared/spec/wan-architecture.md;
2. parity with diffusers' `WanTransformer3DModel` (an independent implementation) for Wan2.1 T2V,
   Wan2.1 I2V and Wan2.2, with one timestep per sample and one per token;
3. the LingBot-World camera path against a functional reference written here from the spec
   (sections 2-3), using only torch ops on the upstream-named state dict;
4. the attention seam (`register_backend` / `set_backend`);
5. errors on bad input.

Weights are drawn normal(0, 0.2) (norm weights 1 + normal(0, 0.2), so q/k keep unit scale and the
attention is far from uniform): upstream's init (zero head, zero biases) would hide mistakes.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from worldstream.models import attention as attn_mod
from worldstream.models.attention import register_backend
from worldstream.models.configs import DiTConfig, get_config
from worldstream.models.dit import WanDiT
from worldstream.checkpoints.keymap import diffusers_config, upstream_to_diffusers

# Latent grid used throughout: 3 latent frames of 6 x 10 (non-square) -> 3 x 3 x 5 = 45 tokens.
FRAMES, LAT_H, LAT_W = 3, 6, 10
TOKENS = FRAMES * (LAT_H // 2) * (LAT_W // 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter normal(0, 0.2); weights of norms 1 + normal(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            v = torch.randn(p.shape, generator=g) * 0.2
            if "norm" in name and name.endswith("weight"):
                v += 1.0
            p.copy_(v)
    return model


def build(cfg: DiTConfig, seed: int = 0) -> WanDiT:
    return randomize_(WanDiT(cfg), seed).eval()


def make_inputs(cfg: DiTConfig, seed: int, batch: int = 2, ctx_len: int | None = None) -> dict:
    """x (16 ch), y (the rest of in_dim, if any), t = (999, 437), a text context shorter than text_len,
    CLIP features for the image branch and a camera map for LingBot."""
    g = torch.Generator().manual_seed(seed)
    ctx_len = ctx_len if ctx_len is not None else cfg.text_len - 5
    inp = dict(
        x=torch.randn(batch, cfg.out_dim, FRAMES, LAT_H, LAT_W, generator=g),
        t=torch.tensor([999.0, 437.0][:batch]),
        context=torch.randn(batch, ctx_len, cfg.text_dim, generator=g),
    )
    if cfg.in_dim > cfg.out_dim:
        inp["y"] = torch.randn(batch, cfg.in_dim - cfg.out_dim, FRAMES, LAT_H, LAT_W, generator=g)
    if cfg.has_image_branch:
        inp["clip"] = torch.randn(batch, cfg.image_tokens, cfg.image_dim, generator=g)
    if cfg.has_camera:
        inp["camera"] = torch.randn(batch, cfg.control_dim * 64, FRAMES, LAT_H, LAT_W, generator=g)
    return inp


# ---- 1. parameter and key counts -------------------------------------------------------------------
#
# D = dim, Fd = ffn_dim, T = text_dim (4096), I = in_dim; every Linear has a bias.
# One block: self_attn q,k,v,o 4(D^2+D) + norm_q,norm_k 2D; cross_attn the same 4(D^2+D) + 2D;
#   norm3 (affine) 2D; ffn D*Fd + Fd + Fd*D + D; modulation 6D
#   -> 8D^2 + 2*D*Fd + 21D + Fd.   (A14B: 351,394,304, as the spec says.)
#   Wan2.1 I2V adds k_img, v_img 2(D^2+D) and norm_k_img D -> + 2D^2 + 3D.
#   LingBot adds cam_injector_layer1/2, cam_scale_layer, cam_shift_layer -> + 4(D^2+D).
# Outside the blocks: patch_embedding 4*I*D + D; text_embedding T*D + D + D^2 + D;
#   time_embedding 256*D + D + D^2 + D; time_projection 6D^2 + 6D; head 64D + 64 + modulation 2D
#   -> 8D^2 + (4I + T + 256 + 64 + 13)D + 64.   (A14B, I = 36: 233,129,024.)
#   Wan2.1 I2V adds img_emb: LayerNorm(1280) 2560, Linear(1280,1280) 1280^2+1280, Linear(1280,D) 1280D+D,
#   LayerNorm(D) 2D.  LingBot adds patch_embedding_wancamctrl (control_dim*256)*D + D and
#   c2ws_hidden_states_layer1/2 2(D^2+D).
# Worked out:
#   Wan2.1 T2V 1.3B (D 1536, Fd 8960, 30 blocks, I 16): 30*46,440,704 + 25,775,680        = 1,418,996,800
#   Wan2.1 T2V 14B  (D 5120, Fd 13824, 40 blocks, I 16): 40*351,394,304 + 232,719,424     = 14,288,491,584
#   Wan2.1 I2V 14B  (I 36, image branch): 40*403,838,464 + 233,129,024 + 8,211,200         = 16,394,878,784
#   Wan2.2 expert   (I 36): 40*351,394,304 + 233,129,024                                   = 14,288,901,184
#   LingBot Cam     (control 6): 40*456,272,384 + 233,129,024 + 60,308,480                 = 18,544,332,864
#   LingBot Act     (control 7): Cam + 256*5120                                            = 18,545,643,584
# Keys: a block has 27 (q,k,v,o x2 twice + 2 norms twice, norm3 2, ffn 4, modulation 1); the top 15
#   (patch 2, text 4, time 4, projection 2, head 2 + modulation 1). Wan2.1 I2V: +5 per block, +8 img_emb.
#   LingBot: +8 per block, +6 top.
EXPECTED = {
    # name: (parameters, state-dict keys)
    "wan2.1-t2v-1.3b": (1_418_996_800, 30 * 27 + 15),
    "wan2.1-t2v-14b": (14_288_491_584, 40 * 27 + 15),
    "wan2.1-i2v-14b": (16_394_878_784, 40 * 32 + 15 + 8),
    "wan2.2-i2v-a14b": (14_288_901_184, 1_095),
    "lingbot-cam": (18_544_332_864, 1_421),
    "lingbot-act": (18_545_643_584, 1_421),
    "lingbot-fast": (18_544_332_864, 1_421),
}


def derived_params(cfg: DiTConfig) -> int:
    """The hand derivation above as a formula (checked against the worked numbers, then the model)."""
    D, Fd, T, I = cfg.dim, cfg.ffn_dim, cfg.text_dim, cfg.in_dim
    block = 8 * D * D + 2 * D * Fd + 21 * D + Fd
    top = 8 * D * D + (4 * I + T + 256 + 64 + 13) * D + 64
    if cfg.has_image_branch:
        block += 2 * D * D + 3 * D
        c = cfg.image_dim
        top += 2 * c + c * c + c + c * D + D + 2 * D
    if cfg.has_camera:
        block += 4 * (D * D + D)
        top += cfg.control_dim * 256 * D + D + 2 * (D * D + D)
    return cfg.num_layers * block + top


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_and_key_counts(name):
    cfg = get_config(name)
    with torch.device("meta"):
        model = WanDiT(cfg)
    n_params, n_keys = EXPECTED[name]
    assert derived_params(cfg) == n_params
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(model.state_dict()) == n_keys


# ---- 2. parity with diffusers ----------------------------------------------------------------------

def diffusers_twin(model: WanDiT):
    """diffusers' WanTransformer3DModel with our weights (keys converted by keymap)."""
    from diffusers import WanTransformer3DModel

    kwargs = {k: v for k, v in diffusers_config(model.cfg).items() if not k.startswith("_")}
    ref = WanTransformer3DModel(**kwargs).eval()
    sd = {upstream_to_diffusers(k): v for k, v in model.state_dict().items()}
    ref.load_state_dict(sd, strict=True)
    return ref


def diffusers_forward(ref, cfg: DiTConfig, inp: dict, t: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers does not pad the text context; give it ours zero-padded to text_len as upstream does."""
    x = torch.cat([inp["x"], inp["y"]], 1) if "y" in inp else inp["x"]
    ctx = F.pad(inp["context"], (0, 0, 0, cfg.text_len - inp["context"].shape[1]))
    return ref(x, inp["t"] if t is None else t, ctx, encoder_hidden_states_image=inp.get("clip"),
               return_dict=False)[0]


PARITY_CFGS = {
    "wan2.1-t2v-tiny": lambda: get_config("wan2.1-t2v-14b-tiny"),
    # diffusers splits the I2V context as (all but the last 512 tokens) = image, so text_len must be 512.
    "wan2.1-i2v-tiny": lambda: dataclasses.replace(get_config("wan2.1-i2v-14b-tiny"), text_len=512),
    "wan2.2-tiny": lambda: get_config("wan2.2-i2v-a14b-tiny"),
}


@pytest.mark.parametrize("variant", sorted(PARITY_CFGS))
@torch.no_grad()
def test_parity_with_diffusers(variant):
    """Same weights, same inputs (batch 2, t = 999 / 437, 3 x 6 x 10 latents, text shorter than text_len).

    Measured ||ours - diffusers|| / ||diffusers||: 4.7e-6 (t2v), 4.1e-6 (i2v), 4.6e-6 (wan2.2). diffusers
    computes the sinusoid in float32 (angles up to ~999 rad) and RoPE with real cos/sin, so the match is
    not bitwise. For scale: a RoPE with rows and columns transposed gives 0.12, no RoPE 0.12.
    """
    cfg = PARITY_CFGS[variant]()
    model = build(cfg, seed=1)
    ref = diffusers_twin(model)
    inp = make_inputs(cfg, seed=2)
    ours = model(**inp)
    theirs = diffusers_forward(ref, cfg, inp)
    assert ours.shape == theirs.shape == (2, cfg.out_dim, FRAMES, LAT_H, LAT_W)
    err = rel_err(ours, theirs)
    print(f"{variant}: rel err vs diffusers {err:.2e}")
    assert err <= 1e-4
    # Non-vacuity: the two samples' timesteps matter far beyond the tolerance.
    swapped = model(**{**inp, "t": inp["t"].flip(0)})
    assert rel_err(swapped, ours) > 1e-2


@torch.no_grad()
def test_per_token_timesteps():
    """t of shape [B, L] (Wan2.2 / LingBot's per-token form).

    All tokens equal: the [B] result (bitwise, see test_per_token_timesteps_bitwise). Against diffusers given the same 2-D timestep: measured 3.4e-6
    (constant per row) and 2.6e-6 (varying per token: first latent frame at t = 0, as Wan2.2 TI2V does).
    """
    cfg = get_config("wan2.2-i2v-a14b-tiny")
    model = build(cfg, seed=3)
    ref = diffusers_twin(model)
    inp = make_inputs(cfg, seed=4)
    t2 = inp["t"][:, None].expand(-1, TOKENS).contiguous()
    out1 = model(**inp)
    out2 = model(**{**inp, "t": t2})
    err = rel_err(out2, out1)
    print(f"t [B, L] vs t [B]: rel err {err:.2e}")
    assert err <= 1e-6
    err = rel_err(out2, diffusers_forward(ref, cfg, inp, t=t2))
    print(f"per-token t (constant): rel err vs diffusers {err:.2e}")
    assert err <= 1e-4

    tv = t2.clone()
    tv[:, : TOKENS // FRAMES] = 0.0  # first latent frame clean
    outv = model(**{**inp, "t": tv})
    err = rel_err(outv, diffusers_forward(ref, cfg, inp, t=tv))
    print(f"per-token t (varying): rel err vs diffusers {err:.2e}")
    assert err <= 1e-4
    assert rel_err(outv, out2) > 1e-2  # the varying timesteps did change the result (measured 0.77)


@torch.no_grad()
def test_per_token_timesteps_bitwise():
    """t [B, L] with every token equal is exactly t [B]: embed_time collapses it to one row per sample."""
    cfg = get_config("wan2.2-i2v-a14b-tiny")
    model = build(cfg, seed=3)
    inp = make_inputs(cfg, seed=4)
    t2 = inp["t"][:, None].expand(-1, TOKENS).contiguous()
    assert torch.equal(model(**inp), model(**{**inp, "t": t2}))


# ---- 3. LingBot camera path against a reference written from the spec ------------------------------

def reference_lingbot(sd: dict, cfg: DiTConfig, x, t, context, y, camera) -> torch.Tensor:
    """A functional LingBot-World DiT forward, from shared/spec/wan-architecture.md sections 2-3.

    `sd` holds upstream-named tensors. Follows upstream's arithmetic where it differs from WanDiT's:
    the timestep is expanded per token, the sinusoid and RoPE are computed in float64 (complex128).
    """
    D, H = cfg.dim, cfg.num_heads
    d = D // H
    eps = cfg.eps

    def lin(v, name):
        return v @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(v, prefix=None):
        w = sd[prefix + ".weight"] if prefix else None
        b = sd[prefix + ".bias"] if prefix else None
        return F.layer_norm(v, (D,), w, b, eps)

    def rms(v, name):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * sd[name]

    # patch embedding; tokens in (f, h, w) order
    v = F.conv3d(torch.cat([x, y], 1), sd["patch_embedding.weight"], sd["patch_embedding.bias"],
                 stride=cfg.patch_size)
    B, _, f, h, w = v.shape
    L = f * h * w
    v = v.flatten(2).transpose(1, 2)

    # time: one timestep per token, sinusoid cat(cos, sin) in float64
    half = cfg.freq_dim // 2
    tt = t.to(torch.float64)[:, None].expand(B, L)
    ang = tt[..., None] * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    sinus = torch.cat([ang.cos(), ang.sin()], -1).float()
    e = lin(F.silu(lin(sinus, "time_embedding.0")), "time_embedding.2")        # [B, L, D]
    e0 = lin(F.silu(e), "time_projection.1").view(B, L, 6, D)

    # text, zero-padded to text_len before the embedding
    ctx = torch.cat([context, context.new_zeros(B, cfg.text_len - context.shape[1], context.shape[2])], 1)
    ctx = lin(F.gelu(lin(ctx, "text_embedding.0"), approximate="tanh"), "text_embedding.2")

    # camera: (c, f, h, w) map -> tokens with features in (c, 1, 2, 2) order
    cb, cc = camera.shape[:2]
    cam = camera.reshape(cb, cc, f, 1, h, 2, w, 2)
    cam = torch.einsum("bcfphqwr->bfhwcpqr", cam).reshape(cb, L, cc * 4)
    cam = lin(cam, "patch_embedding_wancamctrl")
    cam = cam + lin(F.silu(lin(cam, "c2ws_hidden_states_layer1")), "c2ws_hidden_states_layer2")

    # RoPE: head dims split (d - 4(d//6), 2(d//6), 2(d//6)) over (frame, row, column), complex128
    pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    pos = pos.reshape(L, 3).to(torch.float64)
    splits = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    angles = torch.cat([pos[:, i:i + 1] * (1.0 / 10000.0 ** (torch.arange(0, n, 2, dtype=torch.float64) / n))
                        for i, n in enumerate(splits)], -1)                      # [L, d/2]
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]           # [L, 1, d/2]

    def rope(q):  # q [B, L, H, d]
        qc = torch.view_as_complex(q.double().reshape(B, L, H, d // 2, 2))
        return torch.view_as_real(qc * rot).reshape(B, L, H, d).float()

    def attend(q, k, vv):  # [B, Lq|Lk, H, d] -> [B, Lq, D]
        q, k, vv = (a.transpose(1, 2) for a in (q, k, vv))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return (p @ vv).transpose(1, 2).reshape(B, -1, D)

    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (sd[p + "modulation"] + e0).unbind(2)
        # self-attention
        a = ln(v) * (1 + scale_sa) + shift_sa
        q = rms(lin(a, p + "self_attn.q"), p + "self_attn.norm_q.weight").view(B, L, H, d)
        k = rms(lin(a, p + "self_attn.k"), p + "self_attn.norm_k.weight").view(B, L, H, d)
        vv = lin(a, p + "self_attn.v").view(B, L, H, d)
        v = v + lin(attend(rope(q), rope(k), vv), p + "self_attn.o") * gate_sa
        # camera injection
        hc = lin(F.silu(lin(cam, p + "cam_injector_layer1")), p + "cam_injector_layer2") + cam
        v = (1 + lin(hc, p + "cam_scale_layer")) * v + lin(hc, p + "cam_shift_layer")
        # cross-attention
        a = ln(v, p + "norm3")
        q = rms(lin(a, p + "cross_attn.q"), p + "cross_attn.norm_q.weight").view(B, L, H, d)
        k = rms(lin(ctx, p + "cross_attn.k"), p + "cross_attn.norm_k.weight").view(B, -1, H, d)
        vv = lin(ctx, p + "cross_attn.v").view(B, -1, H, d)
        v = v + lin(attend(q, k, vv), p + "cross_attn.o")
        # ffn
        a = ln(v) * (1 + scale_ff) + shift_ff
        v = v + lin(F.gelu(lin(a, p + "ffn.0"), approximate="tanh"), p + "ffn.2") * gate_ff

    shift, scale = (sd["head.modulation"] + e[:, :, None]).unbind(2)
    out = lin(ln(v) * (1 + scale) + shift, "head.head")                       # [B, L, 4 * out_dim]
    out = out.reshape(B, f, h, w, 1, 2, 2, cfg.out_dim)
    return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(B, cfg.out_dim, f, h * 2, w * 2)


@pytest.mark.parametrize("name", ["lingbot-cam-tiny", "lingbot-act-tiny"])
@torch.no_grad()
def test_lingbot_matches_spec_reference(name):
    """WanDiT vs the reference above (measured rel err 4.6e-7 cam, 5.2e-7 act: float32 rounding)."""
    cfg = get_config(name)
    model = build(cfg, seed=5)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    inp = make_inputs(cfg, seed=6)
    ours = model(**inp)
    ref = reference_lingbot(sd, cfg, **inp)
    err = rel_err(ours, ref)
    print(f"{name}: rel err vs spec reference {err:.2e}")
    assert err <= 1e-5
    # Non-vacuity: the camera changes the output far beyond the tolerance (measured 1.2).
    no_cam = model(**{k: v for k, v in inp.items() if k != "camera"})
    assert rel_err(no_cam, ours) > 1e-2


@torch.no_grad()
def test_camera_batch_of_one_broadcasts():
    """A camera map of batch 1 serves both samples (CFG's cond/uncond): bitwise the same as repeating it."""
    cfg = get_config("lingbot-cam-tiny")
    model = build(cfg, seed=7)
    inp = make_inputs(cfg, seed=8)
    cam1 = inp["camera"][:1]
    out_b = model(**{**inp, "camera": cam1})
    out_r = model(**{**inp, "camera": cam1.expand(2, -1, -1, -1, -1).contiguous()})
    assert torch.equal(out_b, out_r)
    ref = reference_lingbot({k: v.float() for k, v in model.state_dict().items()}, cfg, **{**inp, "camera": cam1})
    assert rel_err(out_b, ref) <= 1e-5


# ---- 4. attention seam -----------------------------------------------------------------------------

def plain_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v on [B, L, heads, d] tensors."""
    q, k, v = (a.transpose(1, 2).float() for a in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("name, calls_per_block", [("wan2.2-i2v-a14b-tiny", 2), ("lingbot-cam-tiny", 2),
                                                    ("wan2.1-i2v-14b-tiny", 3)])
@torch.no_grad()
def test_attention_backend_routes_every_call(name, calls_per_block):
    cfg = get_config(name)
    model = build(cfg, seed=9)
    inp = make_inputs(cfg, seed=10)
    base = model(**inp)

    calls = []

    def counting(q, k, v):
        calls.append((q.shape, k.shape))
        return plain_attention(q, k, v)

    register_backend("test-counting", counting)
    model.set_attention("test-counting", "test-counting")
    out = model(**inp)
    model.set_attention("sdpa", "sdpa")

    assert len(calls) == calls_per_block * cfg.num_layers
    assert rel_err(out, base) <= 1e-5
    # self-attention sees all video tokens as keys; cross-attention the text (and CLIP) tokens
    key_lens = sorted({k[1] for _, k in calls})
    expected = {TOKENS, cfg.text_len} | ({cfg.image_tokens} if cfg.has_image_branch else set())
    assert set(key_lens) == expected

    # a backend that gets it wrong must show: the seam really carries the output
    register_backend("test-zero", lambda q, k, v: torch.zeros_like(q))
    model.set_attention("test-zero", "test-zero")
    assert rel_err(model(**inp), base) > 1e-2


@torch.no_grad()
def test_set_attention_defaults_to_self_attention_only_and_is_per_model():
    """`set_attention(name)` changes self-attention of that model only: its cross-attention stays SDPA, and
    another model in the same process is untouched (no process-wide switch)."""
    cfg = get_config("wan2.2-i2v-a14b-tiny")
    model, other = build(cfg, seed=9), build(cfg, seed=9)
    inp = make_inputs(cfg, seed=10)
    calls = []
    register_backend("test-self", lambda q, k, v: calls.append(k.shape[1]) or plain_attention(q, k, v))
    model.set_attention("test-self")
    model(**inp)
    assert calls == [TOKENS] * cfg.num_layers
    calls.clear()
    other(**inp)
    assert calls == []


def test_unknown_backend_raises(monkeypatch):
    model = build(get_config("wan2.2-i2v-a14b-tiny"), seed=9)
    with pytest.raises(KeyError, match="no-such-backend"):
        model.set_attention("no-such-backend")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"sdpa"}
    # a kernel that registers itself from outside the model code is named with where it comes from
    monkeypatch.setattr(attn_mod, "_BACKENDS", {"sdpa": attn_mod.sdpa})
    with pytest.raises(KeyError, match="worldstream.runtime.attention8"):
        model.set_attention("8bit")


# ---- 5. bad input ----------------------------------------------------------------------------------

@torch.no_grad()
def test_wrong_channel_count_names_expected():
    cfg = get_config("wan2.2-i2v-a14b-tiny")
    model = build(cfg)
    inp = make_inputs(cfg, seed=11)
    del inp["y"]  # 16 channels instead of 36
    with pytest.raises(ValueError, match="36"):
        model(**inp)


@torch.no_grad()
def test_camera_on_model_without_camera_layers_raises():
    cfg = get_config("wan2.2-i2v-a14b-tiny")
    model = build(cfg)
    inp = make_inputs(cfg, seed=12)
    inp["camera"] = torch.randn(2, 6 * 64, FRAMES, LAT_H, LAT_W)
    with pytest.raises(ValueError, match="camera"):
        model(**inp)


@torch.no_grad()
def test_text_longer_than_text_len_raises():
    cfg = get_config("wan2.1-t2v-14b-tiny")
    model = build(cfg)
    inp = make_inputs(cfg, seed=13, ctx_len=cfg.text_len + 1)
    with pytest.raises(ValueError, match=str(cfg.text_len)):
        model(**inp)


@pytest.mark.parametrize("variant", ["wan2.1-i2v-14b-tiny", "lingbot-cam-tiny", "wan2.2-i2v-a14b-tiny"])
def test_low_memory_block_gives_the_same_velocity(variant):
    """set_chunk (long clips on small GPUs) on the image-conditioned models too (CLIP tokens, per-sample
    timesteps): keys / values of every token, then queries, camera, cross-attention and FFN chunk by chunk,
    give the whole-sequence result."""
    from worldstream.testing import random_dit_state
    cfg = get_config(variant)
    m = WanDiT(cfg)
    m.load_state_dict(random_dit_state(cfg, 1))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 16, 3, 8, 12, generator=g), torch.randn(2, 20, 3, 8, 12, generator=g)
    kw = dict(y=y)
    if cfg.has_image_branch:
        kw["clip"] = torch.randn(2, 5, 32, generator=g)
    if cfg.has_camera:
        kw["camera"] = torch.randn(1, cfg.control_dim * 64, 3, 8, 12, generator=g)
    t, ctx = torch.tensor([900.0, 300.0]), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        whole = m(x, t, ctx, **kw)
        m.set_chunk(29)                  # 72 tokens: chunks of 29, 29, 14
        chunked = m(x, t, ctx, **kw)
    assert torch.allclose(chunked, whole, atol=1e-5, rtol=0)
