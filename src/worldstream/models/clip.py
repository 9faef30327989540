"""The CLIP image encoder Wan2.1 I2V conditions on: the ViT-H/14 visual tower of upstream's
`open-clip-xlm-roberta-large-vit-huge-14`, its preprocessing, and the features the DiT reads.

What upstream does (shared/spec/more-models.md, `wan/modules/clip.py` `CLIPModel.visual`):

1. the first frame, [3, H, W] in [-1, 1] at its original size (not the video size), is resized to 224 x 224
   with `F.interpolate(mode="bicubic", align_corners=False)`: a tensor resize (no antialiasing), the aspect
   ratio stretched, nothing cropped;
2. mapped to [0, 1] (x * 0.5 + 0.5) and normalised with the OpenAI CLIP mean / std;
3. run through the visual tower (patch 14, class token, 257 positions, pre-norm LayerNorm, pre-norm blocks with
   exact GELU MLPs) up to the output of block 31 of 32 (`use_31_block`): [1, 257, 1280]. No post-norm, no head.
   Upstream computes it in float16 on a GPU (float32 on the CPU).

The network is transformers' `CLIPVisionModel` with `num_hidden_layers = 31`: its last hidden state (which
transformers returns before `post_layernorm`) is exactly the block-31 output, and block 32 is never computed.
Reading upstream's `.pth` (fused q/k/v, `mlp.0` / `mlp.2` names) into it is checkpoints/clip.py; where it runs
(GPU then freed, or CPU) is pipelines/images.py.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MEAN = (0.48145466, 0.4578275, 0.40821073)     # OpenAI CLIP normalisation (upstream's T.Normalize)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipVisionConfig:
    """Shape of the visual tower. Defaults: ViT-H/14 as shipped with Wan2.1 I2V (632 M parameters)."""
    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32              # blocks in the file; the features are those after block `layers - 1`
    heads: int = 16               # not stored in the weights: ViT-H/14 has 16 heads of 80
    mlp_ratio: int = 4
    eps: float = 1e-5

    @property
    def tokens(self) -> int:
        """Class token + patches: 257 for ViT-H/14 at 224 px."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def used_layers(self) -> int:
        """Blocks computed: all but the last (upstream's `use_31_block`)."""
        return self.layers - 1

    @classmethod
    def tiny(cls) -> "ClipVisionConfig":
        """Toy tower for CPU tests: width 32 (= the tiny DiTs' image_dim), 2x2 patches of 112 px at the same
        224 px input (so preprocessing is upstream's), 5 tokens (= the tiny DiTs' image_tokens)."""
        return cls(image_size=224, patch_size=112, width=32, layers=3, heads=4)

    def to_hf(self):
        """The transformers `CLIPVisionConfig` computing blocks 1..layers-1 (exact GELU, eps 1e-5)."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.width, intermediate_size=self.width * self.mlp_ratio,
            num_hidden_layers=self.used_layers, num_attention_heads=self.heads, image_size=self.image_size,
            patch_size=self.patch_size, hidden_act="gelu", layer_norm_eps=self.eps, attention_dropout=0.0,
            num_channels=3, attn_implementation="sdpa")


def preprocess(image: torch.Tensor, cfg: ClipVisionConfig) -> torch.Tensor:
    """[3, H, W] (or [B, 3, H, W]) in [-1, 1] -> [B, 3, S, S] normalised CLIP input, float32, exactly as
    upstream: bicubic tensor resize to S x S (stretched, no crop, no antialias), to [0, 1], (x - mean) / std."""
    x = image[None] if image.dim() == 3 else image
    x = F.interpolate(x.float(), size=(cfg.image_size, cfg.image_size), mode="bicubic", align_corners=False)
    x = x.mul(0.5).add(0.5)
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageEncoder:
    """A loaded CLIP visual tower: `encode(image)` -> features [B, tokens, width] in the model's dtype."""

    def __init__(self, model: nn.Module, cfg: ClipVisionConfig):
        self.model = model
        self.cfg = cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image [3, H, W] or [B, 3, H, W] in [-1, 1], any size -> block-(layers-1) features."""
        x = preprocess(image.to(self.device), self.cfg).to(self.dtype)
        return self.model(pixel_values=x).last_hidden_state

    def close(self) -> None:
        """Free the weights (device memory included)."""
        if self.model is not None:
            self.model.to("meta")
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
