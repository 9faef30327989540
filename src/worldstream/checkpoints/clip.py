"""Reading upstream's CLIP file (`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` of a Wan2.1 I2V
checkpoint) into models.clip's image encoder: the `visual.*` tensors only (the xlm-roberta text tower and its
tokenizer folder are never read: Wan uses the image side alone).

The `.pth` is opened with the safe reader (`weights_only=True`, memory-mapped: nothing of the 4.8 GB file is read
until a tensor is used), every `visual.*` key the tower needs is checked for presence and shape against the
layout inferred from the file before anything is allocated, the model is built on the meta device and each
tensor is copied (finite-checked) to its device and dtype one at a time. Upstream fuses q / k / v into one
`attn.to_qkv` [3*width, width] (q, k, v in that order along the output rows) and names the MLP `mlp.0` /
`mlp.2`; `upstream_to_hf` maps each name onto transformers' `CLIPVisionModel` (names below its vision tower).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..models.clip import ClipVisionConfig, ImageEncoder
from .tensors import CheckpointError, check_finite, read_pth

CLIP_CHECKPOINT = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"   # next to the DiT of Wan2.1 I2V
PREFIX = "visual."
TINY_HEAD_DIM = 8           # the project's toy towers (models.clip.ClipVisionConfig.tiny)
VIT_H_HEAD_DIM = 80         # ViT-H/14: 16 heads of 80
_BLOCK_RE = re.compile(r"visual\.transformer\.(\d+)\.(.+)")


def visual_shapes(cfg: ClipVisionConfig) -> dict[str, tuple[int, ...]]:
    """Every `visual.*` key of upstream's VisionTransformer (pool 'token', pre-norm) and its shape."""
    w, p, hidden = cfg.width, cfg.patch_size, cfg.width * cfg.mlp_ratio
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embedding.weight": (w, 3, p, p),
        "visual.cls_embedding": (1, 1, w),
        "visual.pos_embedding": (1, cfg.tokens, w),
        "visual.pre_norm.weight": (w,), "visual.pre_norm.bias": (w,),
        "visual.post_norm.weight": (w,), "visual.post_norm.bias": (w,),
    }
    for i in range(cfg.layers):
        b = f"visual.transformer.{i}."
        shapes.update({
            b + "norm1.weight": (w,), b + "norm1.bias": (w,),
            b + "attn.to_qkv.weight": (3 * w, w), b + "attn.to_qkv.bias": (3 * w,),
            b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
            b + "norm2.weight": (w,), b + "norm2.bias": (w,),
            b + "mlp.0.weight": (hidden, w), b + "mlp.0.bias": (hidden,),
            b + "mlp.2.weight": (w, hidden), b + "mlp.2.bias": (w,),
        })
    return shapes


def used_keys(cfg: ClipVisionConfig) -> list[str]:
    """The keys the encoder reads: everything of the tower but the last block, the post-norm (kept for
    transformers' pooled output, never used by Wan) included, the `head` projection excluded."""
    last = f"visual.transformer.{cfg.layers - 1}."
    return [k for k in visual_shapes(cfg) if not k.startswith(last)]


_BLOCK_MAP = {
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
    "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2",
}


def upstream_to_hf(key: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """transformers names (and tensors) for one upstream `visual.*` key: the fused q/k/v splits into three."""
    top = {
        "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",
        "visual.pre_norm.weight": "pre_layrnorm.weight",
        "visual.pre_norm.bias": "pre_layrnorm.bias",
        "visual.post_norm.weight": "post_layernorm.weight",
        "visual.post_norm.bias": "post_layernorm.bias",
    }
    if key in top:
        return [(top[key], t)]
    if key == "visual.cls_embedding":
        return [("embeddings.class_embedding", t.reshape(-1))]
    if key == "visual.pos_embedding":
        return [("embeddings.position_embedding.weight", t.reshape(t.shape[-2], t.shape[-1]))]
    m = _BLOCK_RE.fullmatch(key)
    if m is None:
        raise KeyError(f"not a CLIP visual key: {key!r}")
    i, rest = m.groups()
    base = f"encoder.layers.{i}."
    module, _, leaf = rest.rpartition(".")
    if module == "attn.to_qkv":
        q, k, v = t.chunk(3, dim=0)
        return [(f"{base}self_attn.{n}_proj.{leaf}", part) for n, part in zip("qkv", (q, k, v))]
    if module in _BLOCK_MAP:
        return [(f"{base}{_BLOCK_MAP[module]}.{leaf}", t)]
    raise KeyError(f"not a CLIP visual key: {key!r}")


def infer_config(state: dict[str, torch.Tensor], source: str) -> ClipVisionConfig:
    """The tower's shape from its tensors (heads are not stored: ViT-H/14's head width 80, the toy towers' 8)."""
    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r}; not upstream's CLIP "
                                  f"({CLIP_CHECKPOINT}: its visual tower is what Wan2.1 I2V needs)")
        s = tuple(state[key].shape)
        if len(s) != ndim:
            raise CheckpointError(f"{source}: {key!r} has shape {list(s)}, expected {ndim} dimensions")
        return s

    width, _, patch, patch_w = shape("visual.patch_embedding.weight", 4)
    tokens = shape("visual.pos_embedding", 3)[1]
    side = math.isqrt(max(tokens - 1, 0))
    if patch != patch_w or side * side != tokens - 1 or side == 0:
        raise CheckpointError(f"{source}: 'visual.pos_embedding' holds {tokens} positions and the patches are "
                              f"{patch}x{patch_w}: not a square grid plus a class token")
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_RE.fullmatch(k))}
    if not blocks or max(blocks) >= 1024:
        raise CheckpointError(f"{source}: no usable 'visual.transformer.<i>.' blocks")
    if blocks != set(range(max(blocks) + 1)) or len(blocks) < 2:
        raise CheckpointError(f"{source}: visual blocks are not 0..{max(blocks)} (found {len(blocks)}); "
                              "the encoder needs every block up to the last but one")
    head_dim = VIT_H_HEAD_DIM if width % VIT_H_HEAD_DIM == 0 else TINY_HEAD_DIM
    if width % head_dim:
        raise CheckpointError(f"{source}: visual width {width} is not a multiple of a known head width")
    hidden = shape("visual.transformer.0.mlp.0.weight", 2)[0]
    if hidden % width:
        raise CheckpointError(f"{source}: MLP width {hidden} is not a multiple of the width {width}")
    return ClipVisionConfig(image_size=side * patch, patch_size=patch, width=width, layers=len(blocks),
                            heads=width // head_dim, mlp_ratio=hidden // width)


def validate_state(state: dict[str, torch.Tensor], cfg: ClipVisionConfig, source: str) -> None:
    """CheckpointError naming `source` and the keys unless every `visual.*` key of the tower is there with its
    shape and a floating dtype (other top-level parts, the text tower, are ignored)."""
    expected = visual_shapes(cfg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k.startswith(PREFIX) and k not in expected and k != "visual.head"]
    if missing or unexpected:
        raise CheckpointError(f"{source}: the visual tower does not match a {cfg.layers}-block ViT of width "
                              f"{cfg.width}; missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k, s in expected.items():
        t = state[k]
        if tuple(t.shape) != s:
            raise CheckpointError(f"{source}: {k!r} has shape {list(t.shape)}, expected {list(s)}")
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: {k!r} has dtype {t.dtype}, expected a floating point tensor")


def clip_file(ckpt_dir: str | os.PathLike) -> Path:
    return Path(ckpt_dir) / CLIP_CHECKPOINT


def check_image_encoder(ckpt_dir: str | os.PathLike) -> ClipVisionConfig:
    """The CLIP file of a checkpoint folder checked without reading its weights (memory-mapped; keys and
    shapes only): its config, or CheckpointError naming the file."""
    path = clip_file(ckpt_dir)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the CLIP image encoder Wan2.1 I2V needs)")
    state = read_pth(path)
    cfg = infer_config(state, str(path))
    validate_state(state, cfg, str(path))
    return cfg


def load_image_encoder(ckpt_dir: str | os.PathLike, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float16) -> ImageEncoder:
    """The visual tower of `CLIP_CHECKPOINT` in `ckpt_dir` on `device` in `dtype`, tensor by tensor."""
    from transformers import CLIPVisionModel

    path = clip_file(ckpt_dir)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the CLIP image encoder Wan2.1 I2V needs)")
    state = read_pth(path)
    cfg = infer_config(state, str(path))
    validate_state(state, cfg, str(path))
    with torch.device("meta"):
        model = CLIPVisionModel(cfg.to_hf())
    device = torch.device(device)
    tower = getattr(model, "vision_model", model)     # transformers < 5 nests the tower one level deeper
    for key in used_keys(cfg):
        t = check_finite(state[key], f"{path}: tensor {key!r}")
        for name, part in upstream_to_hf(key, t):
            owner, _, leaf = name.rpartition(".")
            module = tower.get_submodule(owner)
            if leaf not in module._parameters:
                raise RuntimeError(f"CLIPVisionModel has no parameter {name!r}")
            module._parameters[leaf] = nn.Parameter(part.to(device=device, dtype=dtype).contiguous(),
                                                    requires_grad=False)
    emb = tower.embeddings
    emb.position_ids = torch.arange(cfg.tokens, device=device).expand((1, -1))
    del state
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + \
               [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"{path}: parameters left unloaded: {leftover[:5]}")
    return ImageEncoder(model.eval().requires_grad_(False), cfg)
