"""TAEHV (taew2_1): the module against a straightforward reference written here, streaming == whole-clip,
frame counts, output range, loading (round trip, rejections), and the full-size parameter counts.

The reference below is built from the architecture facts only (madebyollin/taehv `taehv.py`): it walks
the layers by their upstream state-dict names with functional ops and loops over time explicitly, one frame
at a time, never sharing code with `worldstream.models.taehv`.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from worldstream.checkpoints.taehv import load_taehv
from worldstream.models.taehv import TAEHV, TAEHVConfig

CFG = TAEHVConfig.tiny()


def random_state(model: TAEHV, seed: int) -> dict:
    """He-scaled random weights with small biases; the last conv's bias sits mid-range so that the [0, 1]
    clamp of the output does not swallow the signal."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("weight"):
            sd[k] = torch.randn(v.shape, generator=g) / math.sqrt(v[0].numel())
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
    sd["decoder.22.bias"] = torch.full_like(sd["decoder.22.bias"], 0.5)
    return sd


@pytest.fixture(scope="module")
def weights():
    return random_state(TAEHV(CFG), seed=0)


@pytest.fixture(scope="module")
def model(weights):
    m = TAEHV(CFG).eval()
    m.load_state_dict(weights)
    return m


@pytest.fixture(scope="module")
def latents():
    return torch.randn(2, 16, 5, 4, 6, generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- reference (per frame, per time step; NTCHW-free: lists of [B, C, H, W] frames) -------------------

def _conv(sd, name, x, stride=1):
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd.get(f"{name}.bias"), stride=stride, padding=w.shape[-1] // 2)


def _memblocks(sd, prefix, first, frames):
    """Three MemBlocks at layers first..first+2: y_t = relu(body(cat[x_t, x_{t-1}]) + x_t), x_{-1} = 0."""
    for i in range(first, first + 3):
        out, past = [], torch.zeros_like(frames[0])
        for x in frames:
            h = _conv(sd, f"{prefix}.{i}.conv.0", torch.cat([x, past], 1)).relu()
            h = _conv(sd, f"{prefix}.{i}.conv.2", h).relu()
            h = _conv(sd, f"{prefix}.{i}.conv.4", h)
            out.append((h + x).relu())
            past = x
        frames = out
    return frames


def reference_decode(sd, cfg, latents):
    """[B,16,T,h,w] -> [B,3,4T-3,8h,8w] in [-1, 1]."""
    frames = [latents[:, :, t] for t in range(latents.shape[2])]
    frames = [_conv(sd, "decoder.1", torch.tanh(x / 3) * 3).relu() for x in frames]
    for stage, (mb, tgrow, proj) in enumerate(((3, 7, 8), (9, 13, 14), (15, 19, 20))):
        frames = _memblocks(sd, "decoder", mb, frames)
        frames = [F.interpolate(x, scale_factor=2, mode="nearest") for x in frames]
        grown = []
        for x in frames:                                       # 1x1 conv, then channel blocks = frames
            y = F.conv2d(x, sd[f"decoder.{tgrow}.conv.weight"])
            s = 2 if cfg.decoder_time_upscale[stage] else 1
            grown += list(y.chunk(s, dim=1))
        frames = [_conv(sd, f"decoder.{proj}", x) for x in grown]
    frames = [_conv(sd, "decoder.22", x.relu()).clamp(0, 1) for x in frames]
    frames = frames[3:]                                        # 4T raw frames -> 4T-3
    return torch.stack(frames, 2) * 2 - 1


def reference_encode(sd, cfg, video):
    """[B,3,F,H,W] in [-1,1] -> [B,16,ceil(F/4),H/8,W/8]; the end padded with the last frame."""
    frames = [(video[:, :, t] + 1) / 2 for t in range(video.shape[2])]
    frames += [frames[-1]] * (-len(frames) % 4)
    frames = [_conv(sd, "encoder.0", x).relu() for x in frames]
    for stage, (tpool, down, mb) in enumerate(((2, 3, 4), (7, 8, 9), (12, 13, 14))):
        s = 2 if cfg.encoder_time_downscale[stage] else 1
        frames = [F.conv2d(torch.cat(frames[t:t + s], 1), sd[f"encoder.{tpool}.conv.weight"])
                  for t in range(0, len(frames), s)]
        frames = [_conv(sd, f"encoder.{down}", x, stride=2) for x in frames]
        frames = _memblocks(sd, "encoder", mb, frames)
    return torch.stack([_conv(sd, "encoder.17", x) for x in frames], 2)


# ---- decode ----------------------------------------------------------------------------------------

def test_decode_matches_reference(model, weights, latents):
    out = model.decode(latents, chunk_size=None)
    ref = reference_decode(weights, CFG, latents)
    assert out.shape == ref.shape == (2, 3, 17, 32, 48)
    assert out.dtype == torch.float32
    assert ref.std() > 0.2 and (ref.abs() < 1).float().mean() > 0.5     # the test has signal
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_chunked_decode_equals_whole(model, latents, chunk_size):
    whole = model.decode(latents, chunk_size=None)
    chunked = model.decode(latents, chunk_size=chunk_size)
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max().item() <= 1e-6


def test_streaming_state_is_data(model, latents):
    """decode_chunk returns a new state and leaves the given one (and the module) untouched: re-decoding
    from an old state gives the same frames; frame counts 1, then 4 per latent."""
    s0 = model.decoder_state()
    f0, s1 = model.decode_chunk(latents[:, :, :1], s0)
    f1, s2 = model.decode_chunk(latents[:, :, 1:3], s1)
    f1_again, _ = model.decode_chunk(latents[:, :, 1:3], s1)
    f0_again, _ = model.decode_chunk(latents[:, :, :1], s0)
    assert f0.shape[2] == 1 and f1.shape[2] == 8
    assert torch.equal(f1, f1_again) and torch.equal(f0, f0_again)
    assert all(m is None for m in s0.memory) and s0.frames_out == 0
    assert s2.frames_in == 3 and s2.frames_out == 12
    rest, _ = model.decode_chunk(latents[:, :, 3:], s2)
    whole = model.decode(latents, chunk_size=None)
    assert (torch.cat([f0, f1, rest], 2) - whole).abs().max().item() <= 1e-6
    empty, s3 = model.decode_chunk(latents[:, :, :0], s2)
    assert empty.shape[2] == 0 and s3.frames_out == s2.frames_out
    # the trim happens once per stream: a fresh stream trims again
    assert model.decode_chunk(latents[:, :, :2], model.decoder_state())[0].shape[2] == 5


def test_state_mismatch_is_rejected(model, latents):
    _, state = model.decode_chunk(latents[:, :, :1], model.decoder_state())
    with pytest.raises(ValueError, match="mid-stream"):
        model.decode_chunk(latents[:1, :, 1:2], state)
    with pytest.raises(ValueError, match="decoder_state"):
        model.decode_chunk(latents, model.encoder_state())


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_frame_counts_and_range(model, k):
    lat = torch.randn(1, 16, k + 1, 2, 3) * 3
    out = model.decode(lat)
    assert out.shape == (1, 3, 4 * k + 1, 16, 24)
    assert out.min() >= -1 and out.max() <= 1
    assert list(f.shape[2] for f in model.decode_frames(lat)) == [1] + [4] * k


# ---- encode ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [1, 5, 8, 9])
def test_encode_matches_reference(model, weights, frames):
    video = torch.rand(2, 3, frames, 16, 24, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    out = model.encode(video)
    ref = reference_encode(weights, CFG, video)
    assert out.shape == ref.shape == (2, 16, -(-frames // 4), 2, 3)
    assert rel_err(out, ref) <= 1e-5


def test_streaming_encode_equals_whole(model):
    video = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    whole = model.encode(video)
    state, got = model.encoder_state(), []
    for a, b in ((0, 1), (1, 4), (4, 7), (7, 9)):            # ragged chunks, not aligned to groups of 4
        lat, state = model.encode_chunk(video[:, :, a:b], state)
        got.append(lat)
    assert [g.shape[2] for g in got] == [0, 1, 0, 1]
    rest, state = model.encode_flush(state)
    got.append(rest)
    assert (torch.cat(got, 2) - whole).abs().max().item() <= 1e-6


# ---- loading ---------------------------------------------------------------------------------------

def test_load_round_trip(tmp_path, model, weights, latents):
    path = tmp_path / "taew2_1.pth"
    torch.save(weights, path)
    loaded = load_taehv(path)
    assert loaded.cfg == CFG
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.decode(latents), model.decode(latents))

    from safetensors.torch import save_file
    st = tmp_path / "taew2_1.safetensors"
    save_file({k: v.half() for k, v in weights.items()}, st)
    half = load_taehv(st, dtype=torch.float32)
    assert half.cfg == CFG and half.dtype == torch.float32
    assert rel_err(half.decode(latents), model.decode(latents)) < 1e-2


def test_load_infers_full_size_config(tmp_path):
    with torch.device("meta"):
        full = TAEHV(TAEHVConfig())
    sd = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in full.state_dict().items()}
    torch.save(sd, tmp_path / "taew2_1.pth")
    assert load_taehv(tmp_path / "taew2_1.pth").cfg == TAEHVConfig()


@pytest.mark.parametrize("damage", ["shape", "missing", "extra"])
def test_load_rejects_bad_files(tmp_path, weights, damage):
    sd = dict(weights)
    if damage == "shape":
        sd["decoder.4.conv.2.weight"] = torch.zeros(3, 3, 3, 3)
        pattern = r"bad\.pth.*decoder\.4\.conv\.2\.weight"
    elif damage == "missing":
        del sd["encoder.9.conv.4.bias"]
        pattern = r"bad\.pth.*missing.*encoder\.9\.conv\.4\.bias"
    else:
        sd["decoder.23.weight"] = torch.zeros(1)
        pattern = r"bad\.pth.*unexpected.*decoder\.23\.weight"
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=pattern):
        load_taehv(tmp_path / "bad.pth")


class NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_refuses_arbitrary_pickles(tmp_path, weights, capsys):
    path = tmp_path / "evil.pth"
    torch.save({**weights, "x": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"evil\.pth.*refused"):
        load_taehv(path)
    assert "must never run" not in capsys.readouterr().out
    # plain non-tensor values pass weights_only but are still not weights
    torch.save({**weights, "step": 3}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd\.pth.*'step' is a int"):
        load_taehv(tmp_path / "odd.pth")


# ---- size ------------------------------------------------------------------------------------------

def _expected_counts() -> tuple[int, int]:
    """Parameter counts of upstream's taew2_1 architecture, from its layer list (3x3 convs with bias unless
    marked, MemBlock = conv(2C->C) + 2 conv(C->C) with bias, identity skip)."""
    def conv3(i, o, bias=True):
        return 9 * i * o + (o if bias else 0)

    def mem(c):
        return conv3(2 * c, c) + 2 * conv3(c, c)

    enc = conv3(3, 64) + conv3(64, 16)
    for s in (2, 2, 1):                                  # TPool(64, s), stride-2 conv (no bias), 3 MemBlocks
        enc += 64 * s * 64 + conv3(64, 64, bias=False) + 3 * mem(64)
    n_f = (256, 128, 64, 64)
    dec = conv3(16, 256) + conv3(64, 3)
    for i, s in enumerate((1, 2, 2)):                    # 3 MemBlocks, TGrow(n_f, s), conv (no bias)
        dec += 3 * mem(n_f[i]) + n_f[i] * s * n_f[i] + conv3(n_f[i], n_f[i + 1], bias=False)
    return enc, dec


def test_full_size_parameter_counts():
    with torch.device("meta"):
        full = TAEHV(TAEHVConfig())
    enc = sum(p.numel() for p in full.encoder.parameters())
    dec = sum(p.numel() for p in full.decoder.parameters())
    assert (enc, dec) == _expected_counts() == (1_470_928, 9_844_611)     # ~1.47 M + ~9.84 M = 11.3 M
    sd = full.state_dict()
    assert len(sd) == 128
    for key, shape in {"decoder.1.weight": (256, 16, 3, 3), "decoder.3.conv.0.weight": (256, 512, 3, 3),
                       "decoder.7.conv.weight": (256, 256, 1, 1), "decoder.13.conv.weight": (256, 128, 1, 1),
                       "decoder.20.weight": (64, 64, 3, 3), "decoder.22.weight": (3, 64, 3, 3),
                       "encoder.2.conv.weight": (64, 128, 1, 1), "encoder.12.conv.weight": (64, 64, 1, 1),
                       "encoder.3.weight": (64, 64, 3, 3), "encoder.17.weight": (16, 64, 3, 3)}.items():
        assert tuple(sd[key].shape) == shape, key
    assert "decoder.8.bias" not in sd and "encoder.3.bias" not in sd and "decoder.3.skip.weight" not in sd
