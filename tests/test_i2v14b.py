"""Wan2.1 I2V 14B end to end on a tiny checkpoint in the real layout (DiT at the root, umt5, VAE and the CLIP
file next to it): upstream's defaults per size, the CLIP features of the first frame reaching both CFG passes
through img_emb and the image cross-attention, and a checkpoint without its CLIP file refused by name."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from worldstream import cli
from worldstream.checkpoints.clip import CLIP_CHECKPOINT
from worldstream.pipelines.generate import run
from worldstream.pipelines.images import encode_image
from worldstream.pipelines.tasks import GenerationError, prepare
from worldstream.runtime.runner import build_runner
from worldstream.testing import write_tiny_checkpoint

PROMPT = "A red car drives through the rainy city streets at night."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("i2v14b") / "ckpt", "wan2.1-i2v-14b-tiny", seed=1)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    y, x = np.mgrid[0:36, 0:64]
    img = np.stack([x * 4, y * 7, ((x // 8 + y // 8) % 2) * 200], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "first.png"
    Image.fromarray(img).save(path)
    return path


class Recorder:
    def __init__(self, inner):
        self.inner, self.forwards = inner, []

    def __call__(self, expert, **inputs):
        self.forwards.append((expert, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}))
        return self.inner(expert, **inputs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("size, shift", [("832*480", 3.0), ("480*832", 3.0), ("1280*720", 5.0), ("64*48", 5.0)])
def test_upstream_defaults_per_size(ckpt, image_file, size, shift):
    job = prepare(ckpt, PROMPT, image=image_file, size=size)
    assert (job.task, job.steps, job.shift, job.guide_scale, job.solver) == ("i2v-14B", 40, shift, (5.0, 5.0),
                                                                            "unipc")
    assert job.needs_clip and job.boundary is None and job.experts == ["main"]


def test_i2v_14b_end_to_end(ckpt, image_file):
    box = {}

    def factory(*a, **kw):
        box["r"] = Recorder(build_runner(*a, **kw))
        return box["r"]
    job = prepare(ckpt, PROMPT, task="i2v-14B", image=image_file, size="64*48", frame_num=5, steps=2, seed=3)
    res = run(job, device="cpu", progress=False, runner_factory=factory)
    assert res.frames.shape == (5, 32, 64, 3)                       # 64x36 image at 64*48 pixels: 64x32
    assert list(res.timings)[:4] == ["load", "text encode", "CLIP encode", "VAE encode"]
    clip = encode_image(job.image, ckpt, "cpu", "cpu")
    assert clip.shape == (5, 32)                                    # the tiny tower: 2x2 patches + class token
    forwards = box["r"].forwards
    assert len(forwards) == 2                                       # batched CFG, 2 steps
    for _, inputs in forwards:
        assert inputs["clip"].shape == (2, 5, 32)                   # cond and uncond both see the image
        assert torch.equal(inputs["clip"][0], clip) and torch.equal(inputs["clip"][1], clip)
        assert inputs["y"].shape[1] == 20                           # mask + VAE latents, as Wan2.2 / LingBot

    # the image branch matters: other CLIP features, another video
    from worldstream.pipelines import generate as gen
    orig = gen.encode_image
    try:
        gen.encode_image = lambda *a, **k: orig(*a, **k) * 0
        other = run(job, device="cpu", progress=False)
    finally:
        gen.encode_image = orig
    assert not torch.equal(other.latents, res.latents)


def test_clip_on_the_cpu_gives_the_same_video(ckpt, image_file):
    job = prepare(ckpt, PROMPT, image=image_file, size="64*48", frame_num=5, steps=1, seed=3)
    a = run(job, device="cpu", progress=False)
    b = run(job, device="cpu", progress=False, clip_cpu=True)
    assert torch.equal(a.latents, b.latents)


def test_missing_or_bad_clip_file_is_refused_by_name(tmp_path, image_file):
    root = write_tiny_checkpoint(tmp_path / "c", "wan2.1-i2v-14b-tiny", seed=1)
    (root / CLIP_CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(GenerationError, match=CLIP_CHECKPOINT):
        prepare(root, PROMPT, image=image_file, size="64*48")
    (root / CLIP_CHECKPOINT).unlink()
    with pytest.raises(GenerationError, match=f"missing {CLIP_CHECKPOINT}"):
        prepare(root, PROMPT, image=image_file, size="64*48")


def test_cli_task_i2v_14b(ckpt, image_file, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = cli.main(["generate", "--task", "i2v-14B", "--ckpt_dir", str(ckpt), "--image", str(image_file),
                   "--prompt", PROMPT, "--size", "64*48", "--frame_num", "5", "--sample_steps", "1",
                   "--device", "cpu", "--save_file", str(out), "--no_prompt_cache", "--base_seed", "1"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert out.is_file() and "CLIP encode" in text.out
    rc = cli.main(["generate", "--task", "t2v-14B", "--ckpt_dir", str(ckpt), "--image", str(image_file),
                   "--prompt", PROMPT, "--device", "cpu"])
    assert rc == 2 and "does not match" in capsys.readouterr().err
