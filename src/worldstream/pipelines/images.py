"""The first frame's CLIP features for Wan2.1 I2V, computed where the text encoder is: the encoder is loaded,
used once and freed before the DiT loads, like umT5 (pipelines/prompts.py).

Placements: "gpu" (upstream: the tower in float16 on the device, then freed: ~1.3 GB of VRAM for a moment) or
"cpu" (`--clip_cpu`: float32 on the CPU, as upstream runs it there; only the [257, 1280] features move). Never
resident beside the DiT.
"""
from __future__ import annotations

import os

import torch

from ..checkpoints.clip import load_image_encoder


def encode_image(image: torch.Tensor, ckpt_dir: str | os.PathLike, placement: str = "gpu",
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """CLIP block-31 features [tokens, width] of `image` ([3, H, W] in [-1, 1], the original first frame),
    float32 on `device`. The encoder runs on `device` in float16 ("gpu" on a CUDA device) or on the CPU in
    float32 ("cpu", or any CPU run), and is freed before this returns."""
    if placement not in ("gpu", "cpu"):
        raise ValueError(f"placement must be 'gpu' or 'cpu', got {placement!r}")
    device = torch.device(device)
    home = device if placement == "gpu" else torch.device("cpu")
    dtype = torch.float16 if home.type == "cuda" else torch.float32
    encoder = load_image_encoder(ckpt_dir, home, dtype)
    try:
        features = encoder.encode(image)[0]
    finally:
        encoder.close()
    return features.to(device=device, dtype=torch.float32)
