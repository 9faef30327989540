"""The small world model shipped in the package (assets/tiny_world): the real upstream layout, loadable by the
ordinary loaders, within the size budget, and a short generation on a held-out scene that is closer to the
ground truth than copying the first frame. (Training it is not run here: train/world.py, on a GPU.)"""
import json

import pytest
import torch

from worldstream.checkpoints.dit import INDEX_NAME, find_checkpoint
from worldstream.checkpoints.t5 import T5_CHECKPOINT, T5_TOKENIZER
from worldstream.checkpoints.tensors import read_safetensors_header
from worldstream.checkpoints.vae import VAE_FILE, load_vae
from worldstream.pipelines.tasks import check_checkpoint
from worldstream.testing.world import WORLD_CHECKPOINT, WorldModel, psnr, ssim
from worldstream.world import render_clip

ROOT = WORLD_CHECKPOINT


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: a CPU shared with other processes makes torch's multi-threaded ops stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shipped_checkpoint_has_the_upstream_layout_and_fits_30_mb():
    files = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file())
    shards = [f for f in files if f.startswith("diffusion_pytorch_model-")]
    assert shards == ["diffusion_pytorch_model-00001-of-00002.safetensors",
                      "diffusion_pytorch_model-00002-of-00002.safetensors"]
    for f in ("config.json", INDEX_NAME, VAE_FILE, T5_CHECKPOINT, f"{T5_TOKENIZER}/tokenizer_config.json"):
        assert f in files, f
    assert sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file()) <= 30e6
    index = json.loads((ROOT / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert {loc.dtype for s in shards for loc in read_safetensors_header(ROOT / s).values()} == {torch.float16}
    config = json.loads((ROOT / "config.json").read_text())
    assert (config["_class_name"], config["dim"], config["num_layers"], config["control_type"]) == \
        ("WanModel", 256, 8, "cam")


def test_shipped_checkpoint_loads_as_lingbot_cam_world():
    ckpt = check_checkpoint(ROOT)                       # what `worldstream generate --ckpt_dir` checks
    assert ckpt.config.name == "lingbot-cam-world" and list(ckpt.experts) == ["main"]
    assert ckpt.layout == "upstream" and ckpt.config.control_dim == 6 and ckpt.config.in_dim == 36
    vae = load_vae(ROOT / VAE_FILE)
    assert vae.cfg.dim == 16 and vae.cfg.latent_space == ckpt.config.latents   # 16 channels, 4x8x8
    model = WorldModel.load(ROOT)
    params = sum(p.numel() for p in model.dit.parameters())
    assert 10e6 <= params <= 30e6
    assert find_checkpoint(ROOT).config.trained_size == (160, 96)


def test_short_generation_beats_copying_the_first_frame():
    """A held-out scene (seed 1,000,007), walking forward while turning left for 16 frames: the generated
    frames 1-16 are closer to the rendered truth than frame 0 repeated (measured: 20.0 vs 16.3 dB)."""
    clip = render_clip(1_000_007, 17, 96, 160, actions="jw-16")
    truth = clip["frames"].transpose(0, 1)[None]                                   # [1, 3, F, H, W]
    model = WorldModel.load(ROOT)
    gen = model.generate(truth[:, :, 0], [clip["poses"]], [clip["prompt"]], [1_000_007], steps=10, frames=17)
    assert gen.shape == truth.shape
    a, b = gen.transpose(1, 2), truth.transpose(1, 2)
    copy = truth[:, :, :1].expand_as(truth).transpose(1, 2)
    gen_psnr, copy_psnr = psnr(a, b)[0, 1:].mean().item(), psnr(copy, b)[0, 1:].mean().item()
    assert gen_psnr > copy_psnr + 1.5, (gen_psnr, copy_psnr)
    assert ssim(a, b)[0, 1:].mean() > ssim(copy, b)[0, 1:].mean()


def test_metrics():
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    assert torch.isinf(psnr(x, x)).logical_not().all() and (psnr(x, x) > 100).all()
    assert torch.allclose(psnr(x, x + 0.2), torch.full((2,), 10 * torch.log10(torch.tensor(4 / 0.04))))
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert (ssim(x, x.flip(-1)) < 0.5).all()


def test_guidance_mixes_the_prompt_and_the_empty_prompt():
    """`generate(guide=g)`: v = v("") + g (v(prompt) - v("")). With g = 0 only the empty prompt's velocity is
    left, so the video is the one generated from the prompt "" without guidance; g = 1 is no guidance at all;
    any other g gives a third video."""
    clip = render_clip(1_000_011, 5, 96, 160, actions="w-4")
    first = clip["frames"].transpose(0, 1)[None][:, :, 0]
    model = WorldModel.load(ROOT)
    run = lambda prompt, guide: model.generate(first, [clip["poses"]], [prompt], [7], steps=2, frames=5,  # noqa: E731
                                               guide=guide)
    plain, empty = run(clip["prompt"], 1.0), run("", 1.0)
    torch.testing.assert_close(run(clip["prompt"], 0.0), empty, atol=1e-5, rtol=1e-5)
    assert (plain - empty).abs().max() > 1e-3                 # the prompt matters, so the test can tell
    strong = run(clip["prompt"], 3.0)
    assert (strong - plain).abs().max() > 1e-3 and (strong - empty).abs().max() > 1e-3
