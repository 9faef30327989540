"""Reading the Wan2.1 VAE from its upstream file (`Wan2.1_VAE.pth`, a plain state dict), safely.

The file is read with `weights_only=True` (memory-mapped when it is a zip-format checkpoint), its config is
read off its tensors (`vae_config`: the base width from the first conv; the real file has 96), and its keys
and shapes are checked against the model built on the meta device before any weights are allocated.
"""
from __future__ import annotations

import functools
import os

import torch

from ..models.vae import VAEConfig, WanVAE
from .tensors import CheckpointError, check_finite, read_pth

VAE_FILE = "Wan2.1_VAE.pth"   # inside a Wan / LingBot-World checkpoint folder


@functools.lru_cache(maxsize=8)
def _expected_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """key -> shape of WanVAE(cfg), built once on the meta device."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanVAE(cfg).state_dict().items()}


def check_vae_state_dict(sd: object, model: WanVAE, source: str) -> None:
    """Raise ValueError (naming `source` and the key) unless `sd` is a flat str -> floating Tensor dict with
    exactly `model`'s keys and shapes. `model` may live on the meta device: nothing is allocated."""
    check_vae_shapes(sd, model.cfg, source)


def check_vae_shapes(sd: object, cfg: VAEConfig, source: str) -> None:
    """`check_vae_state_dict` against WanVAE(cfg) (its shapes built once per config)."""
    if not isinstance(sd, dict):
        raise ValueError(f"{source}: expected a flat state dict (str -> Tensor), got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ValueError(f"{source}: state dict key {k!r} is not a string")
        if not isinstance(v, torch.Tensor):
            hint = " (nested dict: is this a training checkpoint rather than the VAE weights?)" \
                if isinstance(v, dict) else ""
            raise ValueError(f"{source}: key {k!r} holds {type(v).__name__}, expected a Tensor{hint}")
        if not v.is_floating_point():
            raise ValueError(f"{source}: key {k!r} has dtype {v.dtype}, expected a floating point tensor")
    expected = _expected_shapes(cfg)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise ValueError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all; "
                         f"is this the Wan2.1 VAE with this config?)")
    if unexpected:
        raise ValueError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{source}: key {k!r} has shape {tuple(sd[k].shape)}, expected {shape}")


def vae_config(sd: dict, source: str) -> VAEConfig:
    """The VAE config of a Wan2.1 VAE state dict: its base width from the first conv (96 for the real file;
    toy VAEs less). ValueError naming `source` if there is no such conv."""
    w = sd.get("encoder.conv1.weight") if isinstance(sd, dict) else None
    if not isinstance(w, torch.Tensor) or w.dim() != 5:
        raise ValueError(f"{source}: no 5-D 'encoder.conv1.weight'; is this the Wan2.1 VAE?")
    return VAEConfig(dim=int(w.shape[0]))


def read_vae_file(path: str | os.PathLike) -> tuple[dict, VAEConfig]:
    """(state dict, config) of a `Wan2.1_VAE.pth`, read safely (memory-mapped: no weights are read yet) and its
    keys and shapes checked against the model built on the meta device; CheckpointError naming the file."""
    path = os.fspath(path)
    sd = read_pth(path)
    try:
        cfg = vae_config(sd, path)
        check_vae_shapes(sd, cfg, path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return sd, cfg


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             cfg: VAEConfig | None = None) -> WanVAE:
    """Load upstream's `Wan2.1_VAE.pth` (a plain state dict) into a `WanVAE` on `device` in `dtype`.

    The file is read with `weights_only=True` (memory-mapped when it is a zip-format checkpoint), then its
    keys and shapes are checked against the model built on the meta device before any weights are
    allocated, and every tensor is checked finite. `cfg` defaults to the one read off the file (`vae_config`).
    Upstream runs the VAE in float32; bf16 saves memory at some cost in accuracy. A file that cannot be used
    raises CheckpointError (a ValueError) naming it."""
    path = os.fspath(path)
    sd, found = read_vae_file(path)
    cfg = cfg or found
    with torch.device("meta"):
        model = WanVAE(cfg)
    try:
        check_vae_shapes(sd, cfg, path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for k, v in sd.items():
        check_finite(v, f"{path}: tensor {k!r}")
    model.load_state_dict(sd, assign=True)
    # the latent constants are not in the file (non-persistent buffers): rebuild them off the meta device
    model.latents_mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    model.latents_std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
