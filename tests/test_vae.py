"""The Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, streaming decode, loading errors, tiling.

Everything runs on a tiny config (base width 8) in float32 on CPU, from a `Wan2.1_VAE.pth` written in
upstream's layout.
"""
from __future__ import annotations

import re

import pytest
import torch

from worldstream.checkpoints.vae import load_vae
from worldstream.models.vae import VAEConfig, WanVAE, blend_tiles, tile_grid
from worldstream.testing import write_tiny_vae

CFG = VAEConfig.tiny()
# Tiling error bounds for the random tiny VAE below, from measurement (decode 0.319, encode 0.191) plus
# margin. Not representative of the trained VAE: see test_tiled_decode_and_encode_are_close_to_untiled.
TILED_DECODE_BOUND, TILED_ENCODE_BOUND = 0.45, 0.3


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    sd = write_tiny_vae(path, CFG, seed=0)
    return path, sd


@pytest.fixture(scope="module")
def vae(vae_file):
    return load_vae(vae_file[0], cfg=CFG)


@pytest.fixture(scope="module")
def video():
    g = torch.Generator().manual_seed(1)
    # smooth-ish content plus noise, in [-1, 1]
    base = torch.rand(1, 3, 9, 4, 6, generator=g) * 2 - 1
    v = torch.nn.functional.interpolate(base, size=(9, 32, 48), mode="trilinear")
    return (v + 0.1 * torch.randn(v.shape, generator=g)).clamp(-1, 1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- reference: diffusers, with weights renamed from upstream's layout -------------------------------

_RES = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
        "shortcut.": "conv_shortcut."}
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}


def _res_rename(rest: str) -> str:
    for a, b in _RES.items():
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest      # resample.1.* / time_conv.* keep their names


def upstream_to_diffusers_vae(sd: dict, cfg: VAEConfig) -> dict:
    """Rename upstream `Wan2.1_VAE.pth` keys to `AutoencoderKLWan`'s (written for this test from the two
    module trees; diffusers' own converter does the same for the full-size layout)."""
    # the decoder's flat `upsamples` list -> up_blocks.{stage}.resnets.{r} / up_blocks.{stage}.upsamplers.0
    dec_index = {}
    flat = 0
    for stage in range(len(cfg.dim_mult)):
        for r in range(cfg.num_res_blocks + 1):
            dec_index[flat] = f"up_blocks.{stage}.resnets.{r}."
            flat += 1
        if stage < len(cfg.dim_mult) - 1:
            dec_index[flat] = f"up_blocks.{stage}.upsamplers.0."
            flat += 1
    out = {}
    for key, v in sd.items():
        m = re.match(r"^(encoder|decoder)\.(\w+)\.(.*)$", key)
        if not m:
            new = {"conv1": "quant_conv", "conv2": "post_quant_conv"}[key.split(".")[0]] + key[5:]
        else:
            part, top, rest = m.groups()
            if top == "conv1":
                new = f"{part}.conv_in.{rest}"
            elif top == "head":
                idx, tail = rest.split(".", 1)
                new = f"{part}.{ {'0': 'norm_out', '2': 'conv_out'}[idx] }.{tail}"
            elif top == "middle":
                idx, tail = rest.split(".", 1)
                new = f"{part}.mid_block.{_MIDDLE[idx]}.{_res_rename(tail)}"
            elif top == "downsamples":
                idx, tail = rest.split(".", 1)
                new = f"encoder.down_blocks.{idx}.{_res_rename(tail)}"
            elif top == "upsamples":
                idx, tail = rest.split(".", 1)
                new = f"decoder.{dec_index[int(idx)]}{_res_rename(tail)}"
            else:
                raise KeyError(key)
        out[new] = v
    return out


@pytest.fixture(scope="module")
def reference(vae_file):
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan(
        base_dim=CFG.dim, z_dim=CFG.z_dim, dim_mult=list(CFG.dim_mult), num_res_blocks=CFG.num_res_blocks,
        temperal_downsample=list(CFG.temporal_downsample), latents_mean=list(CFG.latents_mean),
        latents_std=list(CFG.latents_std),
    )
    ref.load_state_dict(upstream_to_diffusers_vae(vae_file[1], CFG), strict=True)
    return ref.eval()


def _normalize(mu: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CFG.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(CFG.latents_std).view(1, -1, 1, 1, 1)
    return (mu - mean) / std


def test_encode_matches_diffusers(vae, reference, video):
    ours = vae.encode(video)
    assert ours.shape == (1, 16, 3, 4, 6)
    with torch.no_grad():
        theirs = _normalize(reference.encode(video).latent_dist.mean)
    err = rel_err(ours, theirs)
    print(f"encode rel err vs diffusers: {err:.2e}")
    assert err <= 1e-4


def test_decode_matches_diffusers(vae, reference, video):
    z = vae.encode(video)
    ours = vae.decode(z)
    assert ours.shape == video.shape
    # a parity test on saturated pixels would prove little: most must be inside (-1, 1)
    assert (ours.abs() < 0.99).float().mean() > 0.5
    mean = torch.tensor(CFG.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(CFG.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        theirs = reference.decode(z * std + mean).sample
    err = rel_err(ours, theirs)
    print(f"decode rel err vs diffusers: {err:.2e}")
    assert err <= 1e-4


def test_vae_structure_matches_full_size_param_count():
    with torch.device("meta"):
        full = WanVAE(VAEConfig())
    # Wan2.1_VAE.pth: 194 tensors, 126,892,531 parameters (~508 MB in float32)
    assert len(full.state_dict()) == 194
    assert sum(p.numel() for p in full.parameters()) == 126_892_531


# ---- streaming decode ------------------------------------------------------------------------------

def test_decode_frames_chunks_and_cat_equals_decode(vae):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 16, 3, 2, 3, generator=g)     # batch of 2, 3 latent frames
    chunks = list(vae.decode_frames(z))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert all(c.shape == (2, 3, c.shape[2], 16, 24) for c in chunks)
    assert all(c.abs().max() <= 1.0 for c in chunks)
    full = vae.decode(z)
    assert full.shape[2] == 4 * (3 - 1) + 1
    assert torch.equal(torch.cat(chunks, dim=2), full)


def test_causal_state_is_local_to_each_call(vae):
    g = torch.Generator().manual_seed(3)
    za, zb = torch.randn(2, 1, 16, 3, 2, 3, generator=g)
    alone_a, alone_b = vae.decode(za), vae.decode(zb)
    # two streams advanced in lockstep through the same module do not disturb each other
    ga, gb = vae.decode_frames(za), vae.decode_frames(zb)
    mixed_a, mixed_b = [], []
    for ca, cb in zip(ga, gb):
        mixed_a.append(ca)
        mixed_b.append(cb)
    assert torch.equal(torch.cat(mixed_a, 2), alone_a)
    assert torch.equal(torch.cat(mixed_b, 2), alone_b)
    assert not torch.equal(alone_a, alone_b)
    # and the frames of the first two latents do not depend on the third (causality)
    zc = za.clone()
    zc[:, :, 2:] = torch.randn(zc[:, :, 2:].shape, generator=g)
    assert torch.equal(vae.decode(zc)[:, :, :5], alone_a[:, :, :5])


def test_encode_rejects_bad_shapes(vae):
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        vae.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        vae.encode(torch.zeros(1, 3, 5, 16, 20))


# ---- loading errors --------------------------------------------------------------------------------

class NotATensor:
    pass


def test_load_rejects_non_tensor_pickles(tmp_path):
    bad = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], bad)
    with pytest.raises(ValueError, match=r"list\.pth.*flat state dict.*list"):
        load_vae(bad, cfg=CFG)

    bad = tmp_path / "str.pth"
    torch.save({"encoder.conv1.weight": "hello"}, bad)
    with pytest.raises(ValueError, match=r"str\.pth.*'encoder\.conv1\.weight' is a str"):
        load_vae(bad, cfg=CFG)

    bad = tmp_path / "object.pth"          # a pickled custom class: refused by weights_only loading
    torch.save({"x": NotATensor()}, bad)
    with pytest.raises(ValueError, match=r"object\.pth.*refused.*never runs code"):
        load_vae(bad, cfg=CFG)


def test_load_names_missing_and_misshapen_keys(tmp_path, vae_file):
    sd = dict(vae_file[1])
    del sd["decoder.middle.1.proj.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth: missing key 'decoder\.middle\.1\.proj\.weight'"):
        load_vae(tmp_path / "missing.pth", cfg=CFG)

    sd = dict(vae_file[1])
    sd["decoder.head.2.weight"] = torch.zeros(3, 16, 3, 3, 3)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth: key 'decoder\.head\.2\.weight' has shape "
                                         r"\(3, 16, 3, 3, 3\), expected \(3, 8, 3, 3, 3\)"):
        load_vae(tmp_path / "shape.pth", cfg=CFG)

    # a tiny file against the full-size config: the first key already disagrees
    with pytest.raises(ValueError, match=r"'encoder\.conv1\.weight' has shape \(8, 3, 3, 3, 3\), "
                                         r"expected \(96, 3, 3, 3, 3\)"):
        load_vae(vae_file[0], cfg=VAEConfig())
    # without a config, the width is read off the file
    assert load_vae(vae_file[0]).cfg == CFG


def test_load_places_and_casts(vae_file):
    m = load_vae(vae_file[0], dtype=torch.bfloat16, cfg=CFG)
    assert m.dtype == torch.bfloat16 and m.latents_mean.dtype == torch.float32
    assert not any(p.requires_grad for p in m.parameters())
    z = m.encode(torch.zeros(1, 3, 1, 16, 16))
    assert z.dtype == torch.float32 and z.shape == (1, 16, 1, 2, 2)


# ---- tiling ----------------------------------------------------------------------------------------

def test_blend_tiles_reassembles_a_consistent_image():
    # if every tile reports the true crop, blending must give back exactly the full image
    g = torch.Generator().manual_seed(4)
    full = torch.randn(1, 3, 2, 13 * 8, 21 * 8, generator=g)
    tiles, wsum = tile_grid((13, 21), (6, 8), overlap=2, scale=8)
    assert len(tiles) == 3 * 4
    crops = [full[..., t.out_rows, t.out_cols] for t in tiles]
    torch.testing.assert_close(blend_tiles(tiles, wsum, crops), full)
    # the same for encode's geometry (video pixels -> latent pixels)
    lat = torch.randn(1, 16, 2, 13, 21, generator=g)
    tiles, wsum = tile_grid((13 * 8, 21 * 8), (6 * 8, 8 * 8), overlap=2 * 8, scale=1 / 8)
    crops = [lat[..., t.out_rows, t.out_cols] for t in tiles]
    assert all(c.shape[-2:] == t.weight.shape for c, t in zip(crops, tiles))
    torch.testing.assert_close(blend_tiles(tiles, wsum, crops), lat)


def test_tiled_decode_and_encode_are_close_to_untiled(vae):
    # With random weights the error is large: the middle attention is global over each frame, and an
    # untrained net has no reason to be local. The bound only catches broken tiling (a misplaced or
    # mis-weighted tile gives errors ~1); the figure printed is not representative of the trained VAE.
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 16, 2, 6, 8, generator=g)
    full = vae.decode(z)
    # a tile at least as large as the image is a single tile: the untiled result
    assert len(tile_grid((6, 8), (6, 8), 2, 8)[0]) == 1
    tiled = vae.decode(z, tile=(4, 6), overlap=2)          # tile after tile
    assert tiled.shape == full.shape
    lockstep = torch.cat(list(vae.decode_frames(z, tile=(4, 6), overlap=2)), dim=2)
    torch.testing.assert_close(tiled, lockstep, rtol=0, atol=1e-6)
    err = rel_err(tiled, full)
    print(f"tiled decode (4x6 latent tiles, overlap 2, 6x8 latents) rel err vs untiled: {err:.3f}")
    assert 0 < err < TILED_DECODE_BOUND

    mu = vae.encode(full)
    tiled_mu = vae.encode(full, tile=(4, 6), overlap=2)
    err = rel_err(tiled_mu, mu)
    print(f"tiled encode (4x6 latent tiles, overlap 2, 6x8 latents) rel err vs untiled: {err:.3f}")
    assert 0 < err < TILED_ENCODE_BOUND
