"""End-to-end generation on tiny checkpoints in the real layout: T2V, I2V, camera, action, keyboard strings,
the expert switch, CFG batching, determinism, and the MP4 written and decoded back.

The runner is wrapped by `Recorder`, which only records what the pipeline hands the DiT (expert, inputs,
`expect` calls) and passes everything through to the real `runtime.runner` runner.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from worldstream.models import camera as cam
from worldstream.checkpoints.vae import load_vae
from worldstream.models.configs import get_config
from worldstream.models.vae import VAEConfig
from worldstream.pipelines import video
from worldstream.pipelines.conditioning import first_frame_mask, i2v_size, initial_noise
from worldstream.pipelines.generate import run
from worldstream.pipelines.tasks import NEGATIVE_PROMPT, GenerationError, prepare
from worldstream.pipelines.schedulers import FlowUniPC
from worldstream.runtime.runner import build_runner
from worldstream.testing import write_tiny_checkpoint

DATA = Path("/work/shared/data/camera/00")
needs_data = pytest.mark.skipif(not (DATA / "poses.npy").is_file(), reason="shared example trajectory missing")
PROMPT = "A red car drives through the rainy city streets at night."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")

    @functools.cache
    def get(variant: str, layout: str = "upstream") -> Path:
        return write_tiny_checkpoint(root / f"{variant}-{layout}", variant, layout=layout, seed=1)
    return get


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A 48x32 RGB image with structure (gradients + a square), saved as PNG."""
    from PIL import Image

    y, x = np.mgrid[0:32, 0:48]
    img = np.stack([x * 5, y * 7, ((x // 8 + y // 8) % 2) * 200], -1).astype(np.uint8)
    img[8:20, 10:24] = (250, 250, 30)
    path = tmp_path_factory.mktemp("img") / "first.png"
    Image.fromarray(img).save(path)
    return path


class Recorder:
    """Passes calls through to the real runner, keeping the expert of each forward, its inputs and the
    schedule it was given. Everything else (report, batched_guidance, calls, close) is the real runner's."""

    def __init__(self, inner):
        self.inner = inner
        self.forwards: list[tuple[str, dict]] = []
        self.schedule: list = []

    def __call__(self, expert, **inputs):
        self.forwards.append((expert, {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                                       for k, v in inputs.items()}))
        return self.inner(expert, **inputs)

    def start(self, schedule):
        self.schedule = list(schedule)
        self.inner.start(self.schedule)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def recording():
    box = {}

    def factory(*args, **kwargs):
        box["runner"] = Recorder(build_runner(*args, **kwargs))
        return box["runner"]
    return factory, box


def generate(ckpt_dir, runner_factory=None, batched_guidance=None, **kw):
    job = prepare(ckpt_dir, kw.pop("prompt", PROMPT), **kw)
    return run(job, device="cpu", progress=False, runner_factory=runner_factory, batched_guidance=batched_guidance)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------- T2V

def test_t2v_wan21_end_to_end_writes_mp4(ckpt, tmp_path):
    factory, box = recording()
    res = generate(ckpt("wan2.1-t2v-1.3b-tiny", "diffusers"), runner_factory=factory, size="48*32",
                   frame_num=5, steps=3, seed=1)
    assert res.frames.shape == (5, 32, 48, 3) and res.frames.dtype == torch.uint8
    assert res.latents.shape == (16, 2, 4, 6)
    assert set(res.timings) == {"load", "text encode", "denoise", "VAE decode"}   # T2V: no VAE encode

    rec = box["runner"]
    assert [e for e, _ in rec.forwards] == ["main"] * 3
    first = rec.forwards[0][1]
    assert first["y"] is None and first["camera"] is None
    assert first["x"].shape == (2, 16, 2, 4, 6) and torch.equal(first["x"][0], first["x"][1])
    ctx = first["context"]
    assert ctx.shape[0] == 2 and ctx.shape[2] == 32 and not torch.equal(ctx[0], ctx[1])   # cond, uncond
    assert torch.equal(first["x"][0], initial_noise(1, (16, 2, 4, 6)))                          # seeded CPU noise

    path = video.write_mp4(res.frames, tmp_path / "out" / "t2v.mp4")
    info = video.mp4_info(path)
    assert (info["codec"], info["pix_fmt"], info["fps"]) == ("h264", "yuv420p", 16.0)
    back = video.read_mp4(path)
    assert back.shape == (5, 32, 48, 3)
    assert [p.name for p in path.parent.iterdir()] == ["t2v.mp4"]                          # no temp left


def test_same_seed_same_video(ckpt):
    kw = dict(size="48*32", frame_num=5, steps=2)
    a = generate(ckpt("wan2.1-t2v-1.3b-tiny", "diffusers"), seed=7, **kw)
    b = generate(ckpt("wan2.1-t2v-1.3b-tiny", "diffusers"), seed=7, **kw)
    c = generate(ckpt("wan2.1-t2v-1.3b-tiny", "diffusers"), seed=8, **kw)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
    assert not torch.equal(a.latents, c.latents)


def test_tiled_vae_decode_same_video_shape_close_frames(ckpt):
    """--vae_tile: the same latents decoded in 4x4-latent-pixel tiles: same frames out, values close."""
    kw = dict(size="64*48", frame_num=5, steps=2, seed=3)
    job = prepare(ckpt("wan2.1-t2v-1.3b-tiny", "diffusers"), PROMPT, **kw)
    plain = run(job, device="cpu", progress=False)
    tiled = run(job, device="cpu", progress=False, vae_tile=4)
    assert torch.equal(plain.latents, tiled.latents)
    assert tiled.frames.shape == plain.frames.shape == (5, 48, 64, 3)
    diff = (tiled.frames.float() - plain.frames.float()).abs().mean().item()
    assert 0 < diff < 64   # approximate at tile borders (random tiny VAE), never garbage


def test_8bit_attention_for_one_run(ckpt):
    """--attention 8bit: the denoising uses the 8-bit self-attention (its float32 emulation on the CPU), close to
    SDPA's latents; the choice belongs to that run's model, not to the process."""
    job = prepare(ckpt("wan2.1-t2v-1.3b-tiny", "diffusers"), PROMPT, size="48*32", frame_num=5, steps=2, seed=3)
    plain = run(job, device="cpu", progress=False)
    eight = run(job, device="cpu", progress=False, attention="8bit")
    again = run(job, device="cpu", progress=False)
    assert torch.equal(again.latents, plain.latents)
    err = ((eight.latents - plain.latents).norm() / plain.latents.norm()).item()
    assert 0 < err < 0.05   # measured 2.0% (random tiny model, 2 steps)


# ---------------------------------------------------------------------------------------------- I2V

def test_i2v_wan22_image_condition_and_expert_switch(ckpt, image_file):
    """Wan2.2 boundary 0.9, 4 steps at shift 5: t = 999, 937 (high), 833, 624 (low)."""
    root = ckpt("wan2.2-i2v-a14b-tiny")
    factory, box = recording()
    res = generate(root, runner_factory=factory, image=image_file, size="48*32", frame_num=5, steps=4, seed=3)
    assert res.frames.shape == (5, 32, 48, 3)
    assert "VAE encode" in res.timings
    rec = box["runner"]

    # the expert switch: high for t >= 900, then low; the runner hears the whole schedule before the first forward
    assert [e for e, _ in rec.forwards] == ["high", "high", "low", "low"]
    assert [(f.expert, f.batch) for f in rec.schedule] == [("high", 2), ("high", 2), ("low", 2), ("low", 2)]
    assert rec.inner.calls == ["high", "high", "low", "low"]
    assert res.report["expert_steps"] == {"high": 2, "low": 2}
    assert [int(f["t"][0]) for _, f in rec.forwards] == FlowUniPC(4, 5.0).timesteps.tolist()

    # y = cat(mask, VAE(image resized bicubic, then zero frames)), the same for cond and uncond
    from PIL import Image
    img = torch.from_numpy(np.asarray(Image.open(image_file).convert("RGB")).copy()).permute(2, 0, 1)
    img = img.float() / 255 * 2 - 1
    clip = torch.zeros(1, 3, 5, 32, 48)
    clip[0, :, 0] = F.interpolate(img[None], size=(32, 48), mode="bicubic")[0]
    vae = load_vae(root / "Wan2.1_VAE.pth", cfg=VAEConfig.tiny())
    expect_lat = vae.encode(clip)[0]
    y = rec.forwards[0][1]["y"]
    assert y.shape == (2, 20, 2, 4, 6) and torch.equal(y[0], y[1])
    mask = torch.zeros(4, 2, 4, 6)
    mask[:, 0] = 1
    assert torch.equal(y[0, :4], mask)
    torch.testing.assert_close(y[0, 4:], expect_lat, rtol=1e-5, atol=1e-5)


def test_first_frame_mask_matches_upstream_construction():
    """Upstream: ones per video frame, frames 1.. zeroed, frame 0 repeated 4x, folded 4 frames -> channels."""
    frames, lh, lw = 17, 3, 5
    m = torch.ones(1, frames, lh, lw)
    m[:, 1:] = 0
    m = torch.cat([m[:, :1].repeat_interleave(4, dim=1), m[:, 1:]], dim=1)
    m = m.view(1, m.shape[1] // 4, 4, lh, lw).transpose(1, 2)[0]
    assert torch.equal(first_frame_mask(5, lh, lw), m)


@pytest.mark.parametrize("img_hw,area,out_hw", [
    ((480, 832), 1280 * 720, (720, 1248)),       # aspect kept, sides rounded down to multiples of 16
    ((720, 1280), 1280 * 720, (720, 1280)),
    ((480, 832), 832 * 480, (464, 832)),         # upstream's float formula: sqrt(...) = 479.99999 -> 464
    ((832, 480), 832 * 480, (832, 480)),
    ((1000, 1000), 1280 * 720, (960, 960)),
])
def test_i2v_size(img_hw, area, out_hw):
    h, w = i2v_size(*img_hw, area, get_config("wan2.2-i2v-a14b"))
    assert (h, w) == out_hw and h % 16 == 0 and w % 16 == 0 and h * w <= area


# ---------------------------------------------------------------------------------------------- LingBot

def _action_dir(tmp_path: Path, n: int, act: bool = False) -> Path:
    d = tmp_path / "actions"
    d.mkdir()
    for name in ["poses", "intrinsics"] + (["action"] if act else []):
        np.save(d / f"{name}.npy", np.load(DATA / f"{name}.npy")[:n])
    return d


@needs_data
def test_lingbot_cam_action_path(ckpt, image_file, tmp_path):
    d = _action_dir(tmp_path, 11)                  # 11 poses drive 9 frames (4n+1)
    notes = []
    factory, box = recording()
    job = prepare(ckpt("lingbot-cam-tiny"), PROMPT, image=image_file, size="48*32", action_path=d, steps=3,
                  notice=notes.append)
    assert job.frames == 9 and job.seed == 42 and job.steps == 3 and job.guide_scale == (5.0, 5.0)
    assert any("11 poses drive 9 frames" in n for n in notes)
    res = run(job, device="cpu", progress=False, runner_factory=factory)
    assert res.frames.shape == (9, 32, 48, 3)
    f = box["runner"].forwards[0][1]
    expect_cam = cam.camera_condition(np.load(d / "poses.npy"), np.load(d / "intrinsics.npy"), 9, 32, 48)
    assert f["camera"].shape == (1, 384, 3, 4, 6) and f["x"].shape[0] == 2     # camera batch 1 serves CFG's 2
    torch.testing.assert_close(f["camera"][0], expect_cam)


@needs_data
def test_lingbot_act_action_path(ckpt, image_file, tmp_path):
    d = _action_dir(tmp_path, 9, act=True)
    factory, box = recording()
    res = generate(ckpt("lingbot-act-tiny"), runner_factory=factory, image=image_file, size="48*32",
                   action_path=d, frame_num=9, steps=2)
    assert res.frames.shape == (9, 32, 48, 3)
    f = box["runner"].forwards[0][1]
    expect_cam = cam.camera_condition(np.load(d / "poses.npy"), np.load(d / "intrinsics.npy"), 9, 32, 48,
                                      actions=np.load(d / "action.npy"))
    assert f["camera"].shape == (1, 448, 3, 4, 6)
    torch.testing.assert_close(f["camera"][0], expect_cam)


def test_action_string_drives_camera(ckpt, image_file):
    root = ckpt("lingbot-cam-tiny")
    factory, box = recording()
    fwd = generate(root, runner_factory=factory, image=image_file, size="48*32", action_string="w-3,jd-2",
                   steps=1)
    assert fwd.frames.shape == (5, 32, 48, 3)          # 5 key frames: already 4n+1
    got = box["runner"].forwards[0][1]["camera"][0]
    torch.testing.assert_close(got, cam.action_string_condition("w-3,jd-2", 32, 48, 5))
    back = generate(root, image=image_file, size="48*32", action_string="s-3,ka-2", steps=1)
    assert not torch.equal(fwd.latents, back.latents)   # the trajectory reaches the video


@needs_data
def test_batched_cfg_equals_two_forwards(ckpt, image_file, tmp_path):
    d = _action_dir(tmp_path, 9)
    kw = dict(image=image_file, size="48*32", action_path=d, steps=3)
    f1, box1 = recording()
    f2, box2 = recording()
    one = generate(ckpt("lingbot-cam-tiny"), runner_factory=f1, batched_guidance=True, **kw)
    two = generate(ckpt("lingbot-cam-tiny"), runner_factory=f2, batched_guidance=False, **kw)
    assert [f["x"].shape[0] for _, f in box1["runner"].forwards] == [2] * 3
    assert [f["x"].shape[0] for _, f in box2["runner"].forwards] == [1] * 6
    ctx = [f["context"][0] for _, f in box2["runner"].forwards[:2]]      # cond, then uncond
    ctx_b = box1["runner"].forwards[0][1]["context"]
    torch.testing.assert_close(ctx_b[0, :len(ctx[0])], ctx[0])
    torch.testing.assert_close(ctx_b[1, :len(ctx[1])], ctx[1])
    assert rel_err(one.latents, two.latents) <= 1e-5


def test_guide_scale_one_runs_conditional_only(ckpt):
    factory, box = recording()
    res = generate(ckpt("wan2.1-t2v-1.3b-tiny", "diffusers"), runner_factory=factory, size="48*32",
                   frame_num=5, steps=2, guide_scale=1.0)
    assert [f["x"].shape[0] for _, f in box["runner"].forwards] == [1, 1]
    assert res.frames.shape[0] == 5


def test_defaults_and_negative_prompt(ckpt, image_file):
    job = prepare(ckpt("wan2.2-i2v-a14b-tiny"), PROMPT, image=image_file)
    assert (job.steps, job.shift, job.guide_scale, job.boundary, job.frames) == (40, 5.0, (3.5, 3.5), 0.9, 81)
    assert job.negative_prompt == NEGATIVE_PROMPT and job.negative_prompt.startswith("色调艳丽")
    job = prepare(ckpt("lingbot-cam-tiny"), PROMPT, image=image_file, action_string="w-8,jw-8")
    assert (job.steps, job.shift, job.boundary, job.seed, job.frames) == (70, 10.0, 0.947, 42, 17)
    with pytest.raises(GenerationError, match="text-to-video: it takes no --image"):
        prepare(ckpt("wan2.1-t2v-1.3b-tiny", "diffusers"), PROMPT, image=image_file)


# ---------------------------------------------------------------------------------------------- MP4

def test_mp4_odd_size_is_padded_even(tmp_path):
    frames = torch.randint(0, 256, (3, 33, 47, 3), dtype=torch.uint8)
    back = video.read_mp4(video.write_mp4(frames, tmp_path / "odd.mp4"))
    assert back.shape == (3, 34, 48, 3)


def test_mp4_interrupted_leaves_nothing(tmp_path, monkeypatch):
    import av

    dest = tmp_path / "v.mp4"
    dest.write_bytes(b"previous video")
    real = av.VideoFrame.from_ndarray
    count = [0]

    def interrupt_on_third(*args, **kwargs):
        count[0] += 1
        if count[0] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        video.write_mp4(np.zeros((5, 16, 16, 3), np.uint8), dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"] and dest.read_bytes() == b"previous video"


def test_nan_video_is_refused():
    with pytest.raises(ValueError, match="non-finite"):
        video.to_uint8_frames(torch.full((3, 1, 8, 8), float("nan")))
