"""A tiny `Wan2.1_VAE.pth`: upstream's file layout (a plain state dict, upstream key names), toy width."""
from __future__ import annotations

import os

import torch

from ..files import atomic_write
from ..models.vae import VAEConfig, WanVAE


def tiny_vae_state_dict(cfg: VAEConfig | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights that exercise every parameter: norm gains around 1 (not all ones), small random biases,
    and every conv/projection random with variance ~1/fan_in, including the attention output projection that
    upstream initializes to zero. Keeps activations O(1) so decoded pixels are mostly not clamped."""
    cfg = cfg or VAEConfig.tiny()
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in WanVAE(cfg).state_dict().items():
        if name.endswith("gamma"):
            t = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
        elif name.endswith("bias"):
            t = 0.05 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = p[0].numel()
            t = torch.randn(p.shape, generator=gen) / fan_in ** 0.5
        sd[name] = t.float().contiguous()
    return sd


def write_tiny_vae(path: str | os.PathLike, cfg: VAEConfig | None = None, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Write a tiny `Wan2.1_VAE.pth` (`torch.save` of the state dict) atomically; return the state dict."""
    sd = tiny_vae_state_dict(cfg, seed)
    atomic_write(path, lambda tmp: torch.save(sd, tmp))
    return sd
