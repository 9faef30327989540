"""The tiny decoder (models/tiny_decoder.py) and its file (checkpoints/tiny_decoder.py): streaming equals
whole-clip decoding, causality, frame counts and sizes equal to the Wan VAE decoder's, the state left as
given, and the loader's checks (round trip, wrong keys / shapes / format refused before any tensor is read)."""
from __future__ import annotations

import json

import pytest
import torch

from worldstream.checkpoints import tiny_decoder as ckpt
from worldstream.checkpoints.tensors import CheckpointError
from worldstream.models.tiny_decoder import TinyDecoder, TinyDecoderConfig, macs_per_frame
from worldstream.models.vae import VAEConfig, WanVAE

CFG = TinyDecoderConfig.micro()


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return randomize(TinyDecoder(CFG), 0)


def latents(t: int, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 16, t, 3, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("split", [(1, 1, 1, 1, 1), (1, 4), (3, 2), (2, 2, 1)])
def test_chunked_equals_whole(model, split):
    z = latents(sum(split))
    whole = model.decode(z)
    state, parts, start = model.decoder_state(), [], 0
    for n in split:
        frames, state = model.decode_chunk(z[:, :, start:start + n], state)
        parts.append(frames)
        start += n
    chunked = torch.cat(parts, dim=2)
    assert chunked.shape == whole.shape
    assert whole.std() > 0.05                      # the random decoder's output is not flat
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert state.frames_in == 5 and state.frames_out == 20


def test_causal_and_state_untouched(model):
    z = latents(4)
    state0 = model.decoder_state()
    a, state1 = model.decode_chunk(z[:, :, :2], state0)
    assert all(m is None for m in state0.memory)                       # the given state is not changed
    later = z.clone()
    later[:, :, 3] += 5
    b1, _ = model.decode_chunk(z[:, :, 2:], state1)
    b2, _ = model.decode_chunk(later[:, :, 2:], state1)               # same state, forked
    frames_of_latent2 = 4
    torch.testing.assert_close(b1[:, :, :frames_of_latent2], b2[:, :, :frames_of_latent2])
    assert not torch.allclose(b1[:, :, frames_of_latent2:], b2[:, :, frames_of_latent2:])
    torch.testing.assert_close(model.decode(z)[:, :, :a.shape[2]], a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [1, 2, 3])
def test_frames_and_size_match_the_vae(model, t):
    z = latents(t, b=1)
    vae = WanVAE(VAEConfig.tiny(4)).eval()
    ref = vae.decode(z)
    out = model.decode(z)
    assert out.shape == ref.shape == (1, 3, 4 * (t - 1) + 1, 24, 32)
    assert out.dtype == torch.float32 and out.min() >= -1 and out.max() <= 1


def test_bad_input_and_state(model):
    with pytest.raises(ValueError, match="latents"):
        model.decode_chunk(torch.zeros(1, 8, 1, 3, 4), model.decoder_state())
    _, state = model.decode_chunk(latents(1, b=1), model.decoder_state())
    with pytest.raises(ValueError, match="state does not fit"):
        model.decode_chunk(latents(1, b=1)[..., :2, :], state)
    with pytest.raises(ValueError, match="decoder_state"):
        model.decode_chunk(latents(1), {})


def test_default_config_cost_and_size():
    cfg = TinyDecoderConfig()
    n = sum(p.numel() for p in TinyDecoder(cfg).parameters())
    assert 2 * n < 3e6                                      # float16 file < 3 MB
    assert 0.2e9 < macs_per_frame(cfg, 96, 160) < 0.5e9     # the budget the CPU speed was measured at
    assert cfg.space_upscale == 8 and cfg.t_upscale == 4 and cfg.frames_to_trim == 3


# ---- the file ------------------------------------------------------------------------------------------

def test_round_trip(model, tmp_path):
    path = tmp_path / ckpt.DECODER_FILE
    ckpt.save_tiny_decoder(model, path)
    loaded = ckpt.load_tiny_decoder(path, latent_channels=16)
    assert loaded.cfg == CFG and not any(p.requires_grad for p in loaded.parameters())
    z = latents(3)
    ref = TinyDecoder(CFG).eval()
    ref.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    torch.testing.assert_close(loaded.decode(z), ref.decode(z))


def _write(path, tensors, meta):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=meta)


def _good(model):
    return ({k: v.half().contiguous() for k, v in model.state_dict().items()},
            {"format": ckpt.FORMAT, "config": json.dumps(CFG.to_json())})


def test_rejects_bad_files(model, tmp_path, monkeypatch):
    # nothing is read before the header checks pass
    monkeypatch.setattr(ckpt, "iter_tensors", lambda *a, **k: pytest.fail("tensors read before validation"))
    tensors, meta = _good(model)
    cases = {
        "renamed": ({("layers.99.weight" if k == "layers.1.weight" else k): v for k, v in tensors.items()}, meta,
                    "missing keys"),
        "extra": ({**tensors, "extra.weight": torch.zeros(2)}, meta, "unexpected keys"),
        "shape": ({k: (v[:1] if k == "layers.1.weight" else v) for k, v in tensors.items()}, meta, "wrong shapes"),
        "format": (tensors, {"config": meta["config"]}, "not a tiny decoder file"),
        "config": (tensors, {**meta, "config": json.dumps({"widths": [8, 8]})}, "bad decoder config"),
        "ints": ({k: (v.to(torch.int16) if k == "layers.1.bias" else v) for k, v in tensors.items()}, meta,
                 "expected floats"),
    }
    for name, (t, m, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        _write(path, t, m)
        with pytest.raises(CheckpointError, match=message):
            ckpt.load_tiny_decoder(path)
    pth = tmp_path / "decoder.pth"
    torch.save(tensors, pth)
    with pytest.raises(CheckpointError, match="safetensors files only"):
        ckpt.load_tiny_decoder(pth)
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.load_tiny_decoder(tmp_path / "absent.safetensors")


def test_rejects_other_latent_channels(model, tmp_path):
    path = tmp_path / ckpt.DECODER_FILE
    ckpt.save_tiny_decoder(model, path)
    with pytest.raises(CheckpointError, match="16-channel latents"):
        ckpt.load_tiny_decoder(path, latent_channels=48)


# ---- the --decoder option --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny causal student folder (v2 layout, 112x64) with a random micro decoder beside its VAE."""
    from worldstream.testing import write_tiny_checkpoint
    from worldstream.testing.checkpoint import demo_image
    tmp = tmp_path_factory.mktemp("toy")
    root = write_tiny_checkpoint(tmp / "toy", "lingbot-fast-v2-tiny", seed=0)
    ckpt.save_tiny_decoder(randomize(TinyDecoder(CFG), 2), root / ckpt.DECODER_FILE)
    demo_image().save(tmp / "first.png")
    return root, tmp / "first.png"


def test_stream_session_decodes_with_the_tiny_decoder(toy):
    from worldstream.pipelines.stream import open_session, prepare_stream
    root, image = toy
    request = prepare_stream(root, "a walk", image=str(image), action_string="w-10,jw-6")
    session = open_session(request, device="cpu", prompt_cache=None, decoder="tiny")
    try:
        assert isinstance(session.decoder, TinyDecoder) and session.decoder.cfg == CFG
        reference = ckpt.load_tiny_decoder(root / ckpt.DECODER_FILE)
        state = reference.decoder_state()
        for n in (13, 16):                          # the first chunk of 4 latents: 13 frames, then 16
            chunk = session.step()
            assert chunk.frames.shape == (3, n, 64, 112)
            expected, state = reference.decode_chunk(chunk.latents[None], state)
            torch.testing.assert_close(chunk.frames, expected[0])
            assert chunk.frames.std() > 0.01
    finally:
        session.close()


def test_stream_command_with_tiny_decoder_and_its_refusals(toy, tmp_path, capsys):
    import shutil

    from worldstream.cli import main
    from worldstream.pipelines.video import mp4_info
    root, image = toy
    args = ["stream", "--image", str(image), "--prompt", "a walk", "--device", "cpu", "--no_prompt_cache",
            "--action_string", "w-10,jw-6"]
    out = tmp_path / "walk.mp4"
    assert main([*args, "--ckpt_dir", str(root), "--decoder", "tiny", "--save_file", str(out)]) == 0, \
        capsys.readouterr().err
    info = mp4_info(out)
    assert info["frames"] == 29 and (info["width"], info["height"]) == (112, 64)
    capsys.readouterr()
    bare = tmp_path / "bare"
    shutil.copytree(root, bare)
    (bare / ckpt.DECODER_FILE).unlink()
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    tensors, meta = _good(TinyDecoder(CFG))
    tensors["layers.1.weight"] = tensors["layers.1.weight"][:, :4].contiguous()
    _write(bad / ckpt.DECODER_FILE, tensors, meta)
    for folder, extra, culprit in [(bare, [], "no decoder.safetensors"), (bad, [], "wrong shapes"),
                                   (root, ["--vae", "tiny", "--taehv", "x.pth"], "choose one")]:
        target = tmp_path / "bad.mp4"
        assert main([*args, "--ckpt_dir", str(folder), "--decoder", "tiny", "--save_file", str(target), *extra]) == 2
        err = capsys.readouterr().err
        assert culprit in err and "Traceback" not in err, err
        assert not target.exists()


def test_serve_engine_takes_the_option(toy):
    from worldstream.serve.engine import Engine
    root, image = toy
    engine = Engine.load(root, prompt="a walk", image=str(image), device="cpu", decoder="tiny")
    try:
        assert isinstance(engine.student.decoder, TinyDecoder)
        session = engine.open_session()
        assert session.decoder is engine.student.decoder
        assert session.step().frames.shape == (3, 13, 64, 112)
    finally:
        engine.close()


def test_built_in_student_folder_carries_the_decoder(tmp_path, model):
    from worldstream.testing.world import WORLD_STUDENT, student_checkpoint
    student = tmp_path / "student"
    student.mkdir()
    (student / "transformers").symlink_to(WORLD_STUDENT / "transformers", target_is_directory=True)
    assert not (student_checkpoint(tmp_path / "without", student) / ckpt.DECODER_FILE).exists()
    ckpt.save_tiny_decoder(model, student / ckpt.DECODER_FILE)
    folder = student_checkpoint(tmp_path / "with", student)
    assert ckpt.read_decoder_config(folder / ckpt.DECODER_FILE) == CFG


# ---- the shipped decoder ------------------------------------------------------------------------------------

def test_the_shipped_student_decoder_is_trained_and_beats_the_vae_decoder_on_a_held_out_world():
    """The built-in student's decoder.safetensors (assets/tiny_world_fast) is valid for the student's latents
    and trained: on a held-out rendered world, decoding the VAE's latents gives the truth back better than the
    VAE's own decoder does (the GPU evaluation: 25.8 vs 23.0 dB over 32 worlds), and far better than chance."""
    from worldstream.checkpoints.vae import VAE_FILE, load_vae
    from worldstream.testing.world import WORLD_CHECKPOINT, WORLD_STUDENT, psnr
    from worldstream.world.scene import render_clip

    path = WORLD_STUDENT / ckpt.DECODER_FILE
    assert path.is_file(), f"{path} is not shipped"
    vae = load_vae(WORLD_CHECKPOINT / VAE_FILE, device="cpu")
    decoder = ckpt.load_tiny_decoder(path, latent_channels=vae.cfg.latent_space.channels)
    clip = render_clip(1_000_007, 9, 96, 160)                    # a held-out seed (training used < 1,000,000)
    truth = clip["frames"].transpose(0, 1)[None].float()         # [1, 3, 9, 96, 160] in [-1, 1]
    with torch.no_grad():
        z = vae.encode(truth)
        tiny, ref = decoder.decode(z).float(), vae.decode(z).float()
    assert tiny.shape == ref.shape == truth.shape
    tiny_db = psnr(tiny[0].transpose(0, 1), truth[0].transpose(0, 1)).mean().item()
    vae_db = psnr(ref[0].transpose(0, 1), truth[0].transpose(0, 1)).mean().item()
    assert tiny_db > 20 and tiny_db > vae_db - 0.5, (tiny_db, vae_db)
