"""The tiny decoder's file, `decoder.safetensors` (models/tiny_decoder.py): writing it, and reading it safely.

The file is a flat safetensors state dict (float16 as trained and shipped) whose `__metadata__` holds
`format = worldstream-tiny-decoder` and the `TinyDecoderConfig` as JSON. Reading parses the header only,
builds the model on the meta device from that config and checks every key and shape against it before any
tensor is read; each tensor is checked finite as it is read. Anything else fails with a CheckpointError (a
ValueError) naming the file and the first offending keys. Safetensors only: no pickles.
"""
from __future__ import annotations

import json
import os

import torch

from ..files import atomic_write
from ..models.tiny_decoder import TinyDecoder, TinyDecoderConfig
from .tensors import (CheckpointError, check_keys_and_shapes, iter_tensors, read_safetensors_header,
                      read_safetensors_metadata)

DECODER_FILE = "decoder.safetensors"      # next to the VAE in a checkpoint folder
FORMAT = "worldstream-tiny-decoder"


def save_tiny_decoder(model: TinyDecoder, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                      extra: dict[str, str] | None = None) -> None:
    """Write `model` to `path` (atomically) in `dtype`, its config in the metadata (and `extra` strings)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(model.cfg.to_json()), **(extra or {})}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))


def read_decoder_config(path: str | os.PathLike) -> TinyDecoderConfig:
    """The config of a decoder file, checked against its tensors (header only: nothing is allocated)."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: the tiny decoder is read from safetensors files only")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    meta = read_safetensors_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tiny decoder file (metadata format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        cfg = TinyDecoderConfig.from_json(json.loads(meta.get("config", "")))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad decoder config in the metadata: {e}") from None
    locations = read_safetensors_header(path)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in TinyDecoder(cfg).state_dict().items()}
    check_keys_and_shapes({k: loc.shape for k, loc in locations.items()}, expected, path)
    notfloat = [k for k, loc in locations.items() if not loc.dtype.is_floating_point]
    if notfloat:
        raise CheckpointError(f"{path}: key {notfloat[0]!r} is {locations[notfloat[0]].dtype}, expected floats")
    return cfg


def load_tiny_decoder(path: str | os.PathLike, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, latent_channels: int | None = None) -> TinyDecoder:
    """An eval-mode, frozen `TinyDecoder` from `path` on `device` in `dtype`, validated first
    (`read_decoder_config`); `latent_channels`, when given, must match the decoder's input."""
    path = os.fspath(path)
    cfg = read_decoder_config(path)
    if latent_channels is not None and cfg.latent_channels != latent_channels:
        raise CheckpointError(f"{path}: decodes {cfg.latent_channels}-channel latents, this model makes "
                              f"{latent_channels}")
    with torch.device("meta"):
        model = TinyDecoder(cfg)
    sd = dict(iter_tensors(read_safetensors_header(path), dtype=torch.float32))
    model.load_state_dict(sd, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
