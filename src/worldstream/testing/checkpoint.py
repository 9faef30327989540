"""A complete tiny checkpoint folder (DiT + VAE + umt5 + tokenizer) in the real layout, and the built-in demo.

`write_tiny_checkpoint(root, "lingbot-cam-tiny")` gives a folder `worldstream generate --ckpt_dir root` accepts
exactly like a downloaded one:

    root/high_noise_model/, root/low_noise_model/    (or the DiT at root for Wan2.1, lingbot_world_fast/, ...)
    root/Wan2.1_VAE.pth
    root/models_t5_umt5-xxl-enc-bf16.pth
    root/google/umt5-xxl/                            (tokenizer)
    root/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth   (Wan2.1 I2V only: the CLIP image encoder)

All weights are random, so the videos they make show that the machinery runs end to end, not a world.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..checkpoints.vae import VAE_FILE
from ..models.configs import get_config
from .clip import write_tiny_clip
from .dit import write_dit_checkpoint
from .text import write_tiny_text_encoder
from .vae import write_tiny_vae


# The built-in demo: LingBot-World Cam (two experts, camera layers) at toy width, driven by a keyboard string.
DEMO_VARIANT = "lingbot-cam-tiny"
DEMO_PROMPT = "The camera moves forward through a dark forest path."
DEMO_ACTION_STRING = "w-8,jw-8"          # 8 frames forward, 8 frames forward while turning left: 17 frames
DEMO_WIDTH, DEMO_HEIGHT = 112, 64        # multiples of 16 (VAE 8x and DiT 2x patches)


def write_tiny_checkpoint(root: str | os.PathLike, variant: str = DEMO_VARIANT, layout: str = "upstream",
                          seed: int = 0, shards: int = 2) -> Path:
    """Write every part of a checkpoint folder for a `*-tiny` variant into `root`; return `root`.

    The DiT comes from `write_dit_checkpoint` (upstream or diffusers layout, `shards` safetensors per expert),
    the VAE and umt5 encoder are their tiny versions (umt5 width 32 = the tiny DiTs' text_dim).
    """
    if not variant.endswith("-tiny"):
        raise ValueError(f"write_tiny_checkpoint writes toy-size models only; got {variant!r} "
                         "(use a '<variant>-tiny' name)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_dit_checkpoint(root, variant, layout=layout, seed=seed, shards=shards)
    write_tiny_vae(root / VAE_FILE, seed=seed)
    write_tiny_text_encoder(root, seed=seed)
    if get_config(variant).has_image_branch:
        write_tiny_clip(root, seed=seed)
    return root


def write_demo_checkpoint(root: str | os.PathLike) -> Path:
    """The demo's tiny LingBot-Cam checkpoint (random weights, fixed seed) in `root`."""
    return write_tiny_checkpoint(root, DEMO_VARIANT, seed=0)


def demo_image(width: int = DEMO_WIDTH, height: int = DEMO_HEIGHT):
    """A synthetic first frame (PIL RGB): sky gradient, a sun, green ground with stripes towards the horizon.

    Deterministic and generated here, so the demo needs no file; the structure makes the VAE round trip of
    frame 0 visible in the output video.
    """
    from PIL import Image

    y = np.linspace(0.0, 1.0, height)[:, None]
    x = np.linspace(0.0, 1.0, width)[None, :]
    horizon = 0.55
    sky = np.stack(np.broadcast_arrays(0.35 + 0.4 * y, 0.55 + 0.35 * y, 0.95 + 0 * x), -1)
    depth = np.clip((y - horizon) / (1 - horizon), 1e-3, 1)
    stripes = 0.5 + 0.5 * np.sign(np.sin((x - 0.5) / depth * 12.0))
    ground = np.stack(np.broadcast_arrays(0.15 + 0.1 * stripes, 0.45 + 0.2 * stripes, 0.1 + 0 * x), -1)
    img = np.where((y < horizon)[..., None], sky, ground)
    sun = ((x - 0.75) ** 2 * (width / height) ** 2 + (y - 0.22) ** 2) < 0.012
    img[sun] = (1.0, 0.9, 0.4)
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), "RGB")
