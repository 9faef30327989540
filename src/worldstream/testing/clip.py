"""A tiny `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` in upstream's layout: the whole-CLIP state dict
(`visual.*` with upstream's names: fused `attn.to_qkv`, `mlp.0` / `mlp.2`, `cls_embedding`, `pos_embedding`,
`pre_norm`, `post_norm`, `head`), plus a few `textual.*` tensors and `log_scale`, as the real file has a text tower
next to the image one that Wan never reads. float16, like the real file."""
from __future__ import annotations

import os

import torch

from ..checkpoints.clip import CLIP_CHECKPOINT, visual_shapes
from ..files import atomic_write
from ..models.clip import ClipVisionConfig


def random_clip_state(cfg: ClipVisionConfig | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Upstream-named random weights: LayerNorm gains around 1, linears ~1/sqrt(fan_in), embeddings O(1)."""
    cfg = cfg or ClipVisionConfig.tiny()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in visual_shapes(cfg).items():
        if "norm" in key and key.endswith("weight"):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif key in ("visual.cls_embedding", "visual.pos_embedding"):
            t = torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] if len(shape) == 2 else shape[1] * shape[2] * shape[3]
            t = torch.randn(shape, generator=g) / fan_in ** 0.5
        state[key] = t.to(dtype)
    state["visual.head"] = torch.randn(cfg.width, 16, generator=g).to(dtype)
    state["textual.token_embedding.weight"] = torch.randn(64, 16, generator=g).to(dtype)   # never read
    state["textual.head.0.weight"] = torch.randn(16, 16, generator=g).to(dtype)
    state["log_scale"] = torch.tensor(4.6052).to(dtype)
    return state


def write_tiny_clip(ckpt_root: str | os.PathLike, seed: int = 0, cfg: ClipVisionConfig | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Write the tiny CLIP file into `ckpt_root` (atomically); return its state dict."""
    state = state if state is not None else random_clip_state(cfg, seed)
    atomic_write(os.path.join(ckpt_root, CLIP_CHECKPOINT), lambda tmp: torch.save(state, tmp))
    return state
