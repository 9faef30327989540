"""LoRA: kohya and diffusers naming merged into the DiT as it loads (merged model == base + scale·(alpha/r)·up·down),
before compression (a quantized block holds the merged weights), mismatched files refused with a clear error, and
LightX2V's step-distill LoRA turning the base Wan2.1 I2V into the 4-step sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from worldstream.checkpoints import keymap
from worldstream.checkpoints.dit import find_checkpoint, load_dit
from worldstream.checkpoints.lora import LoraSpec, parse_lora_arg
from worldstream.models.quant import quantize
from worldstream.pipelines.tasks import GenerationError, prepare
from worldstream.runtime.loading import CheckpointLoader
from worldstream.testing import write_tiny_checkpoint

PROMPT = "A dog runs along the beach chasing a ball."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lora") / "wan21", "wan2.1-i2v-14b-tiny", seed=1)


@pytest.fixture(scope="module")
def image():
    from PIL import Image
    return Image.fromarray((np.random.RandomState(0).rand(32, 48, 3) * 255).astype(np.uint8))


def lora_pair(out_f, in_f, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_f, generator=g) * 0.1, torch.randn(out_f, rank, generator=g) * 0.1


def load(base, loras=(), quant=None):
    ckpt = find_checkpoint(base)
    model, _ = CheckpointLoader(ckpt, quant, [parse_lora_arg(x) if isinstance(x, str) else x for x in loras]) \
        .load("main", set(), "cpu", torch.float32)
    return model.state_dict()


def test_kohya_and_diffusers_naming_merge_exactly(base, tmp_path):
    sd0 = load(base)
    targets = {  # model key -> (file naming)
        "blocks.0.self_attn.q.weight": "kohya-dotted",
        "blocks.1.cross_attn.k_img.weight": "kohya-flat",
        "blocks.1.ffn.2.weight": "diffusers",
        "blocks.0.cross_attn.o.weight": "peft-upstream",
    }
    file, expect = {}, {}
    for i, (key, style) in enumerate(targets.items()):
        out_f, in_f = sd0[key].shape
        down, up = lora_pair(out_f, in_f, 4, i)
        layer = key.removesuffix(".weight")
        if style == "kohya-dotted":        # lora_down / lora_up / alpha, upstream names, diffusion_model. prefix
            file |= {f"diffusion_model.{layer}.lora_down.weight": down, f"diffusion_model.{layer}.lora_up.weight": up,
                     f"diffusion_model.{layer}.alpha": torch.tensor(8.0)}
            factor = 8.0 / 4
        elif style == "kohya-flat":
            flat = "lora_unet_" + layer.replace(".", "_")
            file |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": torch.tensor(2.0)}
            factor = 2.0 / 4
        elif style == "diffusers":         # lora_A / lora_B, diffusers layer names, transformer. prefix, no alpha
            d = keymap.upstream_to_diffusers(key).removesuffix(".weight")
            file |= {f"transformer.{d}.lora_A.weight": down, f"transformer.{d}.lora_B.weight": up}
            factor = 1.0
        else:
            file |= {f"{layer}.lora_A.weight": down, f"{layer}.lora_B.weight": up}
            factor = 1.0
        expect[key] = (up @ down) * factor
    path = tmp_path / "style.safetensors"
    save_file({k: v.contiguous() for k, v in file.items()}, str(path))
    sd = load(base, [f"{path}:0.75"])
    for key, v in sd.items():
        if key in expect:
            assert torch.allclose(v, sd0[key] + 0.75 * expect[key], atol=1e-6, rtol=0), key
        else:
            assert torch.equal(v, sd0[key]), key


def test_diff_and_bias_diff_and_two_loras_in_order(base, tmp_path):
    sd0 = load(base)
    w = "blocks.1.norm3.weight"
    b = "blocks.0.self_attn.q.bias"
    d1 = torch.randn(sd0[w].shape) * 0.1
    d2 = torch.randn(sd0[b].shape) * 0.1
    p1 = tmp_path / "d.safetensors"
    save_file({"diffusion_model.blocks.1.norm3.diff": d1, "diffusion_model.blocks.0.self_attn.q.diff_b": d2}, str(p1))
    down, up = lora_pair(*sd0["blocks.0.self_attn.q.weight"].shape, 2, 9)
    p2 = tmp_path / "l.safetensors"
    save_file({"blocks.0.self_attn.q.lora_down.weight": down, "blocks.0.self_attn.q.lora_up.weight": up}, str(p2))
    sd = load(base, [f"{p1}:2", str(p2)])
    assert torch.allclose(sd[w], sd0[w] + 2 * d1, atol=1e-6)
    assert torch.allclose(sd[b], sd0[b] + 2 * d2, atol=1e-6)
    assert torch.allclose(sd["blocks.0.self_attn.q.weight"], sd0["blocks.0.self_attn.q.weight"] + up @ down, atol=1e-6)


def test_merged_before_compression(base, tmp_path):
    """With --quant the block linears are quantized from the merged weight: the 8-bit data and scales are
    those of quantize(base + delta)."""
    sd0 = load(base)
    key = "blocks.0.ffn.0.weight"
    down, up = lora_pair(*sd0[key].shape, 4, 3)
    path = tmp_path / "q.safetensors"
    save_file({"blocks.0.ffn.0.lora_down.weight": down, "blocks.0.ffn.0.lora_up.weight": up}, str(path))
    from worldstream.checkpoints.compressed import QuantPolicy
    sd = load(base, [str(path)], quant=QuantPolicy("int8", skip_first_last=False))
    data, scale = quantize(sd0[key] + up @ down, "int8")
    assert torch.equal(sd[key], data) and torch.allclose(sd[key + "_scale"], scale)
    plain = load(base, [], quant=QuantPolicy("int8", skip_first_last=False))
    assert not torch.equal(plain[key], sd[key])


@pytest.mark.parametrize("make, message", [
    (lambda: {"blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 10),
              "blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 4)}, "does not make the \\[64, 64\\]"),
    (lambda: {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 64),
              "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(64, 4)}, "not a LoRA for"),
    (lambda: {"blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 64),
              "blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 4),
              "blocks.7.self_attn.q.lora_down.weight": torch.zeros(4, 64)}, "name no layer"),
    (lambda: {"blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 64)}, "without its pair"),
])
def test_mismatched_lora_is_rejected(base, tmp_path, image, make, message):
    path = tmp_path / "bad.safetensors"
    save_file(make(), str(path))
    with pytest.raises(GenerationError, match=message) as e:
        prepare(base, PROMPT, image=image, size="48*32", loras=[str(path)])
    assert str(path) in str(e.value) and "wan2.1-i2v-14b-tiny" in str(e.value) or "does not make" in str(e.value)


def test_lora_args(tmp_path):
    p = tmp_path / "wan2.2_i2v_A14b_high_noise_lora_rank64_lightx2v_4step.safetensors"
    p.write_bytes(b"")
    assert parse_lora_arg(f"{p}:0.5") == LoraSpec(p, 0.5, "high")
    assert parse_lora_arg(f"low={p}") == LoraSpec(p, 1.0, "low")
    with pytest.raises(ValueError, match="no such LoRA"):
        parse_lora_arg(str(tmp_path / "missing.safetensors:1"))
    with pytest.raises(ValueError, match="finite"):
        parse_lora_arg(f"{p}:inf")


def test_step_distill_lora_gives_the_student_defaults(base, tmp_path, image):
    """LightX2V's rank-64 CFG / step-distill LoRA on the base I2V 14B: the same sampler as the distilled
    checkpoint (4 steps at t = 1000/750/500/250, shift 5, no CFG), and the run merges it."""
    sd0 = load(base)
    key = "blocks.0.self_attn.k.weight"
    down, up = lora_pair(*sd0[key].shape, 4, 5)
    path = tmp_path / "Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors"
    save_file({f"diffusion_model.blocks.0.self_attn.k.lora_down.weight": down,
               f"diffusion_model.blocks.0.self_attn.k.lora_up.weight": up,
               f"diffusion_model.blocks.0.self_attn.k.alpha": torch.tensor(4.0)}, str(path))
    job = prepare(base, PROMPT, image=image, size="48*32", frame_num=5, seed=1, loras=[str(path)])
    assert (job.solver, job.steps, job.shift, job.guide_scale) == ("distill", 4, 5.0, (1.0, 1.0))
    assert "LoRA Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors x1" in job.describe()
    from worldstream.pipelines.generate import run
    a = run(job, device="cpu", progress=False)
    plain = prepare(base, PROMPT, image=image, size="48*32", frame_num=5, seed=1, solver="distill")
    b = run(plain, device="cpu", progress=False)
    assert not torch.equal(a.latents, b.latents)


def test_lora_on_a_compressed_checkpoint_is_refused(base, tmp_path, image):
    from worldstream.runtime.convert import convert
    out = tmp_path / "fp8"
    convert(base, out, "int8", skip_first_last=False, log=lambda m: None)
    sd0 = load(base)
    down, up = lora_pair(*sd0["blocks.0.ffn.0.weight"].shape, 2, 1)
    path = tmp_path / "x.safetensors"
    save_file({"blocks.0.ffn.0.lora_down.weight": down, "blocks.0.ffn.0.lora_up.weight": up}, str(path))
    with pytest.raises(GenerationError, match="merged before compression"):
        prepare(out, PROMPT, image=image, size="48*32", loras=[str(path)])
