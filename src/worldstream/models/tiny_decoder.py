"""A tiny causal video decoder for small worlds: the tiny world VAE's latents -> RGB frames, cheap enough for a
2-core CPU to stream in real time.

The idea is TAEHV's (madebyollin/taehv; our port of its `taew2_1` is `taehv.py`): every conv is 2D, a video is
a batch of frames, and time is mixed only by memory blocks, each of which sees its own input at the previous
time step beside the current one. The time axis is grown by 1x1 convs that turn one frame into two. What this
module changes is the cost: the widths taper with resolution, the blocks are lighter (two 3x3 convs instead of
three) and the last factor of 2 in space is a sub-pixel conv (pixel shuffle), so no 3x3 conv ever runs at the
full output resolution. At 160x96 the default config costs 0.33 GMAC per output frame (1.3 M parameters).

Layout (defaults; `h, w` = latent size, T = latent frames):

    soft clamp tanh(z/3)*3 -> conv 16->128 -> ReLU                                  T,  h x w
    stage 0: 2 memory blocks (128) -> nearest x2 -> conv 128->64                       T,  2h x 2w
    stage 1: 2 memory blocks (64)  -> nearest x2 -> grow time x2 -> conv 64->32        2T, 4h x 4w
    stage 2: 2 memory blocks (32)  -> grow time x2 -> ReLU -> conv 32->32 -> ReLU
             -> conv 32->12 -> pixel shuffle x2                                        4T, 8h x 8w, 3 channels

    memory block(x, past) = ReLU(x + conv(ReLU(conv(cat[x, past]))))    past = the block's input one step
                                                                        earlier (zeros at the stream's start)
    grow time x2: 1x1 conv C -> 2C, read as two frames (the first C channels are the earlier frame)

Time is x4 and space x8, as the Wan VAE. Like TAEHV, the first latent decodes to 4 frames of which the first 3
are dropped, so T latents give 4(T-1)+1 frames: the Wan VAE decoder's count, frame for frame. The input is
the latents the DiT works with (the VAE's normalized latents); the output is RGB in [-1, 1], float32.

State is data: `decoder_state()` gives a fresh `TinyDecoderState`, `decode_chunk(latents, state)` returns the
frames and a new state and changes neither the module nor the state it was given. Within a chunk all frames
run in parallel; across chunks the state carries each memory block's last input. Any split of a clip into
chunks gives the same frames as decoding it whole (up to float rounding of batched convs).

The weights file (`decoder.safetensors`) is read by `checkpoints/tiny_decoder.py`; this module reads no files.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TinyDecoderConfig:
    latent_channels: int = 16                               # the VAE's z
    widths: tuple[int, ...] = (128, 64, 32)                 # per stage: latent, 2x and 4x its resolution
    blocks: tuple[int, ...] = (2, 2, 2)                     # memory blocks per stage
    time_upscale: tuple[bool, ...] = (False, True, True)    # after each stage: twice the frames
    head_width: int = 32                                    # the conv before the sub-pixel output conv
    image_channels: int = 3

    @classmethod
    def micro(cls) -> "TinyDecoderConfig":
        """Same structure, toy widths (tests)."""
        return cls(widths=(8, 8, 8), blocks=(1, 1, 1), head_width=8)

    def __post_init__(self):
        n = len(self.widths)
        if n < 1 or len(self.blocks) != n or len(self.time_upscale) != n:
            raise ValueError(f"widths, blocks and time_upscale need one entry per stage: {self}")
        if min(self.latent_channels, self.image_channels, self.head_width, *self.widths) < 1 or min(self.blocks) < 0:
            raise ValueError(f"widths must be positive and block counts >= 0: {self}")

    @property
    def t_upscale(self) -> int:
        return 2 ** sum(bool(f) for f in self.time_upscale)

    @property
    def space_upscale(self) -> int:
        return 2 ** len(self.widths)          # x2 between stages, x2 in the sub-pixel head

    @property
    def frames_to_trim(self) -> int:
        """Raw frames dropped at the start of a stream (3 for time x4): the first latent gives one frame."""
        return self.t_upscale - 1

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "TinyDecoderConfig":
        names = set(cls.__dataclass_fields__)
        if not isinstance(d, dict) or set(d) - names:
            raise ValueError(f"not a tiny decoder config: {d!r}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---- layers ---------------------------------------------------------------------------------------------

def _conv3(n_in: int, n_out: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1)


class SoftClamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Memory(nn.Module):
    """ReLU(x + conv(ReLU(conv(cat[x, past])))): `past` is this block's input one time step earlier."""

    def __init__(self, width: int):
        super().__init__()
        self.mix = _conv3(2 * width, width)
        self.out = _conv3(width, width)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.out(F.relu(self.mix(torch.cat([x, past], dim=1)))))


class GrowTime(nn.Module):
    """One frame -> two: 1x1 conv to 2C channels, the first C the earlier frame."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, 2 * width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        return self.conv(x).reshape(nt * 2, c, h, w)


def build_layers(cfg: TinyDecoderConfig) -> nn.Sequential:
    """The decoder as one sequence of per-frame layers (`Memory` blocks are the only ones with a state)."""
    w = cfg.widths
    layers: list[nn.Module] = [SoftClamp(), _conv3(cfg.latent_channels, w[0]), nn.ReLU()]
    for i, width in enumerate(w):
        layers += [Memory(width) for _ in range(cfg.blocks[i])]
        last = i == len(w) - 1
        if not last:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        if cfg.time_upscale[i]:
            layers.append(GrowTime(width))
        if not last:
            layers.append(_conv3(width, w[i + 1]))
    layers += [nn.ReLU(), _conv3(w[-1], cfg.head_width), nn.ReLU(),
               _conv3(cfg.head_width, cfg.image_channels * 4), nn.PixelShuffle(2)]
    return nn.Sequential(*layers)


# ---- state ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinyDecoderState:
    """One decoding stream. `memory[i]`: the last frame layer i (a `Memory` block) was given, [B, C, H, W], or
    None (other layers, or before the first frame). `frames_out`: raw frames produced so far (for the trim).
    Treat as opaque and immutable."""
    memory: tuple = field(default=())
    frames_in: int = 0
    frames_out: int = 0


def run_layers(layers: nn.Sequential, x: torch.Tensor, batch: int, memory: tuple) -> tuple[torch.Tensor, tuple]:
    """Frames x [(B T), C, H, W] (batch-major) through `layers` continuing `memory` -> (frames out, new memory).
    Differentiable (the trainer runs whole clips through it); the memory given is not mutated."""
    mem = list(memory)
    for i, layer in enumerate(layers):
        if isinstance(layer, Memory):
            nt, c, h, w = x.shape
            t = nt // batch
            cur = x.reshape(batch, t, c, h, w)
            prev = mem[i]
            if prev is None:
                prev = x.new_zeros(batch, 1, c, h, w)
            elif tuple(prev.shape) != (batch, 1, c, h, w):
                raise ValueError(f"decoder state does not fit this input: layer {i} remembers {tuple(prev.shape)}, "
                                 f"the input needs {(batch, 1, c, h, w)} (batch or size changed mid-stream?)")
            past = torch.cat([prev.to(x.dtype), cur[:, :-1]], dim=1).reshape(nt, c, h, w)
            mem[i] = cur[:, -1:]
            x = layer(x, past)
        else:
            x = layer(x)
    return x, tuple(mem)


# ---- the model ------------------------------------------------------------------------------------------

class TinyDecoder(nn.Module):
    """Runs where its parameters are, in their dtype; results come back float32 on that device."""

    def __init__(self, cfg: TinyDecoderConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TinyDecoderConfig()
        self.layers = build_layers(cfg)

    @property
    def device(self) -> torch.device:
        return self.layers[1].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[1].weight.dtype

    def decoder_state(self) -> TinyDecoderState:
        """A fresh stream: no memory, nothing trimmed yet."""
        return TinyDecoderState((None,) * len(self.layers))

    def _check(self, latents: torch.Tensor, state: TinyDecoderState) -> None:
        z = self.cfg.latent_channels
        if latents.dim() != 5 or latents.shape[1] != z:
            raise ValueError(f"decode expects latents [B,{z},t,h,w], got {tuple(latents.shape)}")
        if not isinstance(state, TinyDecoderState) or len(state.memory) != len(self.layers):
            raise ValueError("decode_chunk needs a state from this decoder's decoder_state()")

    def forward_chunk(self, latents: torch.Tensor, state: TinyDecoderState
                      ) -> tuple[torch.Tensor, TinyDecoderState]:
        """`decode_chunk` without no_grad or clamping: frames [B, 3, n, 8h, 8w] (float32, unclamped) and the new
        state. For training."""
        self._check(latents, state)
        b, z, t, h, w = latents.shape
        x = latents.to(self.device, self.dtype).transpose(1, 2).reshape(b * t, z, h, w)
        y, memory = run_layers(self.layers, x, b, state.memory)
        raw = y.shape[0] // b
        y = y.reshape(b, raw, *y.shape[1:]).transpose(1, 2)
        trim = min(raw, max(0, self.cfg.frames_to_trim - state.frames_out))
        return y[:, :, trim:].float(), replace(state, memory=memory, frames_in=state.frames_in + t,
                                               frames_out=state.frames_out + raw)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """A whole clip from a fresh stream, differentiable: [B, z, T, h, w] -> [B, 3, 4(T-1)+1, 8h, 8w]
        (unclamped)."""
        return self.forward_chunk(latents, self.decoder_state())[0]

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: TinyDecoderState
                     ) -> tuple[torch.Tensor, TinyDecoderState]:
        """Latents [B, z, t, h, w] continuing `state` -> (frames [B, 3, n, 8h, 8w] in [-1, 1] float32, new
        state); n = 4t, or 4t - 3 when the chunk starts the stream. `state` is not modified."""
        frames, state = self.forward_chunk(latents, state)
        return frames.clamp_(-1, 1), state

    def decode_frames(self, latents: torch.Tensor, chunk_size: int = 1) -> Iterator[torch.Tensor]:
        """Decoded frames, `chunk_size` latents at a time through one stream."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        state = self.decoder_state()
        for s in range(0, latents.shape[2], chunk_size):
            frames, state = self.decode_chunk(latents[:, :, s:s + chunk_size], state)
            yield frames

    def decode(self, latents: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Latents [B, z, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1], float32 (as `WanVAE.decode`)."""
        if latents.dim() != 5 or latents.shape[2] < 1:
            raise ValueError(f"decode expects latents [B,{self.cfg.latent_channels},T>=1,h,w], "
                             f"got {tuple(latents.shape)}")
        return torch.cat(list(self.decode_frames(latents, chunk_size or latents.shape[2])), dim=2)


def macs_per_frame(cfg: TinyDecoderConfig, height: int, width: int) -> float:
    """Multiply-adds of the convs per output frame at height x width (the first chunk's 3 trimmed frames aside)."""
    s = cfg.space_upscale
    px = (height // s) * (width // s)          # latent pixels
    rate = 1 / cfg.t_upscale                   # frames computed per output frame at the current layer
    total = 0.0
    for layer in build_layers(cfg):
        if isinstance(layer, nn.Upsample):
            px *= 4
        elif isinstance(layer, GrowTime):
            total += layer.conv.weight.numel() * px * rate
            rate *= 2
        elif isinstance(layer, Memory):
            total += (layer.mix.weight.numel() + layer.out.weight.numel()) * px * rate
        elif isinstance(layer, nn.Conv2d):
            total += layer.weight.numel() * px * rate
    return total
