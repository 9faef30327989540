"""LightX2V's 4-step students: the distilled sampler against a hand-written reference from the spec, students
detected from their folders and file names (bf16, scaled fp8 e4m3 and int8 single files in LightX2V's key
naming), run with their own defaults (4 steps, shift 5, no CFG), and the Wan2.2 two-expert form (2 + 2 steps)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from worldstream.checkpoints.dit import find_checkpoint
from worldstream.checkpoints.tensors import CheckpointError
from worldstream.models.configs import get_config
from worldstream.models.quant import quantize
from worldstream.pipelines.generate import make_sampler, run
from worldstream.pipelines.sampling import step_experts
from worldstream.pipelines.schedulers import FlowDistill
from worldstream.pipelines.tasks import GenerationError, prepare
from worldstream.runtime.runner import build_runner
from worldstream.testing import random_dit_state, write_dit_dir, write_tiny_checkpoint

PROMPT = "A cat walks across a sunny garden full of flowers."


def test_distilled_sampler_against_the_spec():
    """σ = linspace(1, 0, 1001) shifted by 5 at indices 1000 - t: 1, .9375, .8333, .625 (by hand: s·σ/(1+(s-1)σ)
    with σ = t/1000); the model sees σ·1000 as a float; x ← x − (σ − σ_next)·v, the last step x0 = x − σ·v."""
    s = FlowDistill()
    hand = [5 * (t / 1000) / (1 + 4 * (t / 1000)) for t in (1000, 750, 500, 250)]
    assert hand == pytest.approx([1.0, 0.9375, 0.8333333, 0.625], abs=1e-7)
    assert s.sigma_list == pytest.approx(hand, abs=1e-6)
    assert s.timesteps.dtype == torch.float32
    assert s.timesteps.tolist() == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    assert s.timesteps[2].item() != int(s.timesteps[2].item())       # not truncated

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 4, 6, generator=g)
    ref = x.double()
    for i in range(4):
        v = torch.randn(16, 3, 4, 6, generator=g)
        x = s.step(v, x)
        nxt = hand[i + 1] if i < 3 else 0.0
        ref = ref - (hand[i] - nxt) * v.double()
        assert torch.allclose(x.double(), ref, atol=1e-5)
    with pytest.raises(RuntimeError):
        s.step(v, x)


def test_two_experts_switch_at_the_boundary_step():
    s = FlowDistill(boundary_step=2)
    assert step_experts(s, ["high", "low"], 0.947) == ["high", "high", "low", "low"]
    assert step_experts(FlowDistill(), ["main"], None) == ["main"] * 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "wan21", "wan2.1-i2v-14b-tiny", seed=1)


@pytest.fixture(scope="module")
def image():
    from PIL import Image
    return Image.fromarray((np.random.RandomState(0).rand(32, 48, 3) * 255).astype(np.uint8))


def _student_repo(base, root):
    """A LightX2V student repository: the DiT in distill_models/distill_model.safetensors (upstream names, bf16),
    T5 / CLIP / VAE linked from the base checkpoint."""
    root.mkdir(parents=True)
    for f in base.iterdir():
        if f.name.startswith(("models_", "Wan2.1_VAE", "google")):
            (root / f.name).symlink_to(f)
    cfg = get_config("wan2.1-i2v-14b-tiny")
    sd = write_dit_dir(root / "distill_models", cfg, shards=1, dtype=torch.bfloat16, seed=5, stem="distill_model")
    (root / "distill_models" / "config.json").unlink()
    return root, sd


def lightx2v_quantized(sd: dict, fmt: str) -> dict:
    """What LightX2V's converter writes for a Wan DiT (`--quantized --linear_type fp8|int8`, not ComfyUI): every
    2-D weight under blocks.N.{self_attn,cross_attn,ffn} quantized per output row with `<name>.weight_scale`,
    everything else bf16."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if v.dim() == 2 and parts[0] == "blocks" and parts[2] in ("self_attn", "cross_attn", "ffn"):
            data, scale = quantize(v.float(), fmt)
            out[k], out[k + "_scale"] = data, scale
        else:
            out[k] = v.to(torch.bfloat16)
    return out


def test_distill_models_folder_is_a_student_with_its_defaults(base, tmp_path, image):
    root, _ = _student_repo(base, tmp_path / "student")
    ckpt = find_checkpoint(root)
    assert ckpt.student is not None and ckpt.student_source == "distill_models/" and ckpt.quant is None
    job = prepare(root, PROMPT, image=image, size="48*32", frame_num=5, seed=2)
    assert (job.solver, job.steps, job.shift, job.guide_scale) == ("distill", 4, 5.0, (1.0, 1.0))
    assert "4 distilled Euler steps at t = 1000/750/500/250" in job.describe()
    seen = []

    def factory(*a, **kw):
        r = build_runner(*a, **kw)

        class Spy:
            def __call__(self, expert, **inputs):
                seen.append((expert, inputs["x"].shape[0], inputs["t"].clone()))
                return r(expert, **inputs)

            def __getattr__(self, n):
                return getattr(r, n)
        return Spy()
    res = run(job, device="cpu", progress=False, runner_factory=factory)
    assert res.frames.shape == (5, 32, 48, 3)
    assert [b for _, b, _ in seen] == [1, 1, 1, 1]                        # no CFG: one batch-1 forward a step
    assert torch.cat([t for *_, t in seen]).tolist() == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    # the base sampler on demand
    job2 = prepare(root, PROMPT, image=image, size="48*32", frame_num=5, seed=2, solver="unipc", steps=2)
    assert (job2.solver, job2.steps, job2.guide_scale) == ("unipc", 2, (5.0, 5.0))
    with pytest.raises(GenerationError, match="runs its 4 steps"):
        prepare(root, PROMPT, image=image, size="48*32", steps=8)


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_lightx2v_single_files_fp8_int8(base, tmp_path, image, fmt):
    """LightX2V's single-file students (`wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors`,
    `..._int8_...`) given with --dit: the storage is read from the tensors (no config.json), the 8-bit weights
    load as stored, and the video stays close to the bf16 student's."""
    cfg = get_config("wan2.1-i2v-14b-tiny")
    sd = {k: v.to(torch.bfloat16) for k, v in random_dit_state(cfg, seed=5).items()}
    bf16 = tmp_path / "wan2.1_i2v_480p_lightx2v_4step.safetensors"
    save_file(sd, str(bf16))
    name = {"fp8": "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step.safetensors",
            "int8": "wan2.1_i2v_480p_int8_lightx2v_4step.safetensors"}[fmt]
    save_file(lightx2v_quantized(sd, fmt), str(tmp_path / name))
    ckpt = find_checkpoint(base, dit=[tmp_path / name])
    assert ckpt.student is not None and ckpt.quant.fmt == fmt and not ckpt.quant.skip_first_last
    kw = dict(image=image, size="48*32", frame_num=5, seed=2)
    a = run(prepare(base, PROMPT, dit=[bf16], **kw), device="cpu", progress=False)
    b = run(prepare(base, PROMPT, dit=[tmp_path / name], **kw), device="cpu", progress=False)
    err = ((a.latents - b.latents).norm() / a.latents.norm()).item()
    assert 0 < err < 0.1


def test_comfyui_scaled_fp8_is_refused_by_name(base, tmp_path):
    cfg = get_config("wan2.1-i2v-14b-tiny")
    sd = {k: v.to(torch.bfloat16) for k, v in random_dit_state(cfg, seed=5).items()}
    sd["blocks.0.ffn.0.scale_weight"] = torch.ones(1)
    sd["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path = tmp_path / "wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step_comfyui.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="ComfyUI"):
        find_checkpoint(base, dit=[path])


def test_wan22_students_two_files(tmp_path, image):
    """Wan2.2 A14B's students come as one file per expert; the sampler gives the first two steps to the
    high-noise expert (LightX2V's boundary_step_index 2)."""
    base = write_tiny_checkpoint(tmp_path / "wan22", "wan2.2-i2v-a14b-tiny", seed=1, shards=1)
    cfg = get_config("wan2.2-i2v-a14b-tiny")
    files = []
    for i, e in enumerate(("low", "high")):        # given in the "wrong" order: the names decide
        p = tmp_path / f"wan2.2_i2v_A14b_{e}_noise_lightx2v_4step.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in random_dit_state(cfg, seed=10 + i).items()}, str(p))
        files.append(p)
    ckpt = find_checkpoint(base, dit=files)
    assert ckpt.experts["high"].name.startswith("wan2.2_i2v_A14b_high") and ckpt.student.boundary_step == 2
    job = prepare(base, PROMPT, image=image, size="48*32", frame_num=5, seed=2, dit=files)
    assert step_experts(make_sampler(job), job.experts, job.boundary) == ["high", "high", "low", "low"]
    res = run(job, device="cpu", progress=False)
    assert res.report["expert_steps"] == {"high": 2, "low": 2}


def test_convert_a_single_file_student_to_fp8_stays_a_student(base, tmp_path, image):
    """Seed 002's recipe: the bf16 single-file student converted once (`worldstream convert --dit FILE --quant
    fp8`): OUT holds the base's T5 / CLIP / VAE and the student as its only DiT, marked as a student."""
    from worldstream import cli
    cfg = get_config("wan2.1-i2v-14b-tiny")
    sd = {k: v.to(torch.bfloat16) for k, v in random_dit_state(cfg, seed=5).items()}
    f = tmp_path / "wan2.1_i2v_480p_lightx2v_4step.safetensors"
    save_file(sd, str(f))
    out = tmp_path / "fp8"
    assert cli.main(["convert", "--ckpt_dir", str(base), "--dit", str(f), "--quant", "fp8", "--out", str(out)]) == 0
    assert not list(out.glob("diffusion_pytorch_model-*"))          # the base's own DiT is not carried over
    ckpt = find_checkpoint(out)
    assert ckpt.student is not None and ckpt.quant.fmt == "fp8"
    job = prepare(out, PROMPT, image=image, size="48*32", frame_num=5, seed=2)
    assert (job.solver, job.steps) == ("distill", 4)
    a = run(job, device="cpu", progress=False)
    b = run(prepare(base, PROMPT, image=image, size="48*32", frame_num=5, seed=2, dit=[f]), device="cpu",
            progress=False, quant="fp8")
    assert torch.equal(a.latents, b.latents)                        # converted == compressed while loading
