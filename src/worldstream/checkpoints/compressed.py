"""What a compressed (fp8 / int8) DiT checkpoint looks like on disk, and how to read one into a model.

A folder written by `worldstream convert` is an ordinary checkpoint whose config.json carries a
`"quantization"` entry (`QuantPolicy`). In it, every nn.Linear inside the blocks that the policy compresses is
stored as two tensors (models/quant.py defines the formats):

    blocks.{i}.<linear>.weight        float8_e4m3fn or int8, [out, in]
    blocks.{i}.<linear>.weight_scale  float32, [out, 1] (per channel) or [out, ceil(in / 128)] ("fp8-block")

Every other tensor keeps its dtype. With `skip_first_last` the first and last blocks are stored whole (their
slab layout then differs from the compressed blocks', so the engine must keep them resident: `pinned`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..models.configs import DiTConfig
from ..models.dit import Block, WanDiT
from ..models.quant import DEFAULT_SKIP, FORMATS, quantizable_linears, quantize, quantize_block_


@dataclass(frozen=True)
class QuantPolicy:
    """Which weights of a DiT are compressed, and how: stored as a converted checkpoint's config.json
    `"quantization"` entry, and given to the runner for quantize-on-load.

    Every nn.Linear inside `model.blocks` whose name contains none of `skip` is stored as 8-bit `weight` +
    float32 `weight_scale`; with `skip_first_last` the first and last blocks stay whole (their slab layout then
    differs, so they must stay resident on the GPU: `pinned`). Nothing outside the blocks is compressed.
    """
    fmt: str
    skip_first_last: bool = True
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown weight format {self.fmt!r}; known: {', '.join(FORMATS)}")

    def blocks(self, n: int) -> list[int]:
        """Indices of the compressed blocks of an n-block stack."""
        keep = {0, n - 1} if self.skip_first_last else set()
        return [i for i in range(n) if i not in keep]

    def pinned(self, n: int) -> tuple[int, ...]:
        """Blocks left whole (another slab layout): the planner must keep them resident."""
        return tuple(sorted(set(range(n)) - set(self.blocks(n))))

    def to_json(self) -> dict:
        return {"fmt": self.fmt, "skip_first_last": self.skip_first_last, "skip": list(self.skip)}

    @classmethod
    def from_json(cls, d, where: str = "config.json") -> "QuantPolicy":
        """Parse a `"quantization"` entry; ValueError naming `where` and the bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: 'quantization' must be an object, got {d!r}")
        fmt, sfl, skip = d.get("fmt"), d.get("skip_first_last", True), d.get("skip", list(DEFAULT_SKIP))
        if fmt not in FORMATS:
            raise ValueError(f"{where}: quantization fmt {fmt!r} is not one of {', '.join(FORMATS)}")
        if not isinstance(sfl, bool):
            raise ValueError(f"{where}: quantization skip_first_last must be true or false, got {sfl!r}")
        if not isinstance(skip, list) or not all(isinstance(s, str) and s for s in skip):
            raise ValueError(f"{where}: quantization skip must be a list of non-empty strings, got {skip!r}")
        return cls(fmt, sfl, tuple(skip))


def as_policy(quant) -> QuantPolicy | None:
    """None | a format name ("fp8", "fp8-block", "int8": default policy) | a QuantPolicy -> QuantPolicy | None."""
    if quant is None or isinstance(quant, QuantPolicy):
        return quant
    return QuantPolicy(quant)


@functools.lru_cache(maxsize=64)
def _linear_names(cfg: DiTConfig, skip: tuple[str, ...]) -> frozenset[str]:
    with torch.device("meta"):
        return frozenset(quantizable_linears(Block(cfg), skip))


def quantized_keys(cfg: DiTConfig, policy: QuantPolicy) -> set[str]:
    """Upstream keys `blocks.{i}.{linear}.weight` that `policy` stores in 8 bits (each with a `..._scale`)."""
    names = _linear_names(cfg, tuple(policy.skip))
    return {f"blocks.{i}.{name}.weight" for i in policy.blocks(cfg.num_layers) for name in names}


def quantized_model(cfg: DiTConfig, dtype: torch.dtype, policy: QuantPolicy | None) -> WanDiT:
    """WanDiT(cfg) on the meta device in `dtype` with the policy's QLinears in place: the expected keys, shapes
    and dtypes of a compressed expert (validation) and the skeleton the loaders fill."""
    with torch.device("meta"):
        model = WanDiT(cfg).to(dtype)
        if policy is not None:
            for i in policy.blocks(cfg.num_layers):
                quantize_block_(model.blocks[i], policy.fmt, tuple(policy.skip))
    return model


def stored_as_is(model: torch.nn.Module) -> set[str]:
    """Keys of `model` whose tensors keep their stored dtype when loaded: 8-bit weights and their scales."""
    return {k for k, v in model.state_dict().items()
            if v.dtype in (torch.float8_e4m3fn, torch.int8) or k.endswith(".weight_scale")}


def quantize_stream(tensors, keys: set[str], fmt: str):
    """(key, tensor) pairs -> the same with every key in `keys` replaced by (key, 8-bit data) and
    (key + "_scale", float32 scale). One tensor at a time: nothing else is held."""
    for key, t in tensors:
        if key in keys:
            data, scale = quantize(t, fmt)
            yield key, data
            yield key + "_scale", scale
        else:
            yield key, t
