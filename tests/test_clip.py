"""The CLIP image encoder of Wan2.1 I2V: upstream's file read through transformers' CLIPVisionModel equals a
reference written here from the spec (shared/spec/more-models.md, "Wan2.1 I2V 14B: the CLIP image encoder"),
and bad files are refused by name."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from worldstream.checkpoints.clip import CLIP_CHECKPOINT, check_image_encoder, load_image_encoder
from worldstream.checkpoints.tensors import CheckpointError
from worldstream.models.clip import ClipVisionConfig, preprocess
from worldstream.testing.clip import random_clip_state, write_tiny_clip


def reference_visual(state: dict, image: torch.Tensor, heads: int) -> torch.Tensor:
    """The spec's computation in float32, from upstream's key names: the [-1, 1] image resized bicubic
    (tensor interpolate, align_corners False, stretched) to the tower's size, to [0, 1], OpenAI mean/std; patch
    conv (no bias), class token, positions, pre-norm LayerNorm; pre-norm blocks (fused q/k/v, softmax attention
    scaled by 1/sqrt(head dim), exact GELU MLP); the output after the last block but one, no post-norm."""
    sd = {k: v.float() for k, v in state.items() if k.startswith("visual.")}
    patch = sd["visual.patch_embedding.weight"]
    width, p = patch.shape[0], patch.shape[-1]
    tokens = sd["visual.pos_embedding"].shape[1]
    size = int(math.isqrt(tokens - 1)) * p
    x = F.interpolate(image[None].float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.conv2d(x, patch, stride=p).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.cls_embedding"].expand(1, -1, -1), x], dim=1) + sd["visual.pos_embedding"]
    ln = lambda t, name: F.layer_norm(t, (width,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)
    x = ln(x, "visual.pre_norm")
    blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual.transformer."))
    d = width // heads
    for i in range(blocks - 1):
        b = f"visual.transformer.{i}."
        h = ln(x, b + "norm1")
        qkv = h @ sd[b + "attn.to_qkv.weight"].T + sd[b + "attn.to_qkv.bias"]
        q, k, v = qkv.view(1, -1, 3, heads, d).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
        att = att.transpose(1, 2).reshape(1, -1, width)
        x = x + att @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        h = ln(x, b + "norm2")
        h = F.gelu(h @ sd[b + "mlp.0.weight"].T + sd[b + "mlp.0.bias"])          # exact GELU
        x = x + h @ sd[b + "mlp.2.weight"].T + sd[b + "mlp.2.bias"]
    return x


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 40, 72, generator=g) * 2 - 1       # not square, not 224: stretched, not cropped


@pytest.mark.parametrize("cfg", [ClipVisionConfig.tiny(),
                                 ClipVisionConfig(image_size=224, patch_size=56, width=160, layers=3, heads=2)],
                         ids=["tiny", "head-width-80"])
def test_clip_matches_the_spec_reference(tmp_path, image, cfg):
    state = write_tiny_clip(tmp_path, seed=1, cfg=cfg)
    enc = load_image_encoder(tmp_path, "cpu", torch.float32)
    assert enc.cfg == cfg
    out = enc.encode(image)
    ref = reference_visual(state, image, cfg.heads)
    assert out.shape == (1, cfg.tokens, cfg.width) == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    enc.close()


def test_preprocessing_is_upstreams_tensor_resize():
    """Stretched to 224 x 224 by bicubic interpolation without antialiasing, [0, 1], OpenAI mean / std."""
    cfg = ClipVisionConfig.tiny()
    img = torch.linspace(-1, 1, 3 * 20 * 50).view(3, 20, 50)
    x = preprocess(img, cfg)
    assert x.shape == (1, 3, 224, 224)
    expect = F.interpolate(img[None], size=(224, 224), mode="bicubic", align_corners=False).mul(0.5).add(0.5)
    expect = (expect - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / \
        torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.equal(x, expect)


def test_last_block_and_text_tower_are_not_read(tmp_path, image):
    state = random_clip_state(seed=2)
    write_tiny_clip(tmp_path, state=state)
    a = load_image_encoder(tmp_path, "cpu", torch.float32).encode(image)
    for k in list(state):
        if k.startswith("visual.transformer.2.") or k.startswith("textual.") or k == "visual.head":
            state[k] = torch.full_like(state[k], 7.0)
    write_tiny_clip(tmp_path, state=state)
    b = load_image_encoder(tmp_path, "cpu", torch.float32).encode(image)
    assert torch.equal(a, b)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("visual.transformer.1.attn.to_qkv.weight"), "missing.*to_qkv"),
    (lambda s: s.update({"visual.transformer.0.mlp.2.weight": torch.zeros(5, 5)}), "mlp.2.weight"),
    (lambda s: s.update({"visual.pre_norm.weight": torch.full((32,), float("nan"), dtype=torch.float16)}),
     "NaN"),
    (lambda s: s.pop("visual.pos_embedding"), "pos_embedding"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("visual.")], "missing key 'visual.patch_embedding"),
])
def test_bad_clip_files_are_refused_by_name(tmp_path, damage, message):
    state = random_clip_state(seed=0)
    damage(state)
    write_tiny_clip(tmp_path, state=state)
    with pytest.raises(CheckpointError, match=message) as e:
        check_image_encoder(tmp_path)
        load_image_encoder(tmp_path, "cpu", torch.float32)
    assert CLIP_CHECKPOINT in str(e.value)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / CLIP_CHECKPOINT).write_bytes(b"not a pytorch file at all")
    with pytest.raises(CheckpointError, match=CLIP_CHECKPOINT):
        check_image_encoder(tmp_path)
