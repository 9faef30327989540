"""TAEHV `taew2_1`: the tiny autoencoder for Wan2.1 latents (madebyollin/taehv, MIT), in plain PyTorch.

A cheap stand-in for the Wan2.1 VAE (`vae.py`) for previews and real-time streaming: ~11.3 M parameters
instead of ~127 M, 2D convs only, causal over time through "memory blocks".

Facts from upstream `taehv.py` (madebyollin/taehv) and its README:

* Everything is 2D: a video is a batch of frames. Time is mixed only by
  - `MemBlock(x, past) = ReLU(body(cat[x, past]) + skip(x))` with body = conv3x3(2C->C), ReLU, conv3x3, ReLU,
    conv3x3 and skip = identity (a bias-free 1x1 conv if the widths differed, which they never do here);
    `past` is the block's *input* at the previous time step, zeros at t = 0;
  - `TPool(C, s)` (encoder): s consecutive frames stacked along channels (earlier frame first), then a
    bias-free 1x1 conv sC -> C;
  - `TGrow(C, s)` (decoder): a bias-free 1x1 conv C -> sC whose output is split into s frames (first channel
    block = earlier frame). Stride 1 is still a learned 1x1 conv (it holds weights in `taew2_1.pth`).
* Decoder (`decoder.{i}`, upstream's `nn.Sequential` indices): 0 Clamp (tanh(x/3)*3), 1 conv 16->256,
  2 ReLU, then three stages [3 MemBlocks, nearest Upsample x2, TGrow, bias-free conv to the next width]
  with widths 256 -> 128 -> 64 -> 64 and TGrow strides (1, 2, 2) (`decoder_time_upscale=(False, True,
  True)`), then 21 ReLU, 22 conv 64->3. Output [0, 1] (clamped).
* Encoder (`encoder.{i}`): 0 conv 3->64, 1 ReLU, three stages [TPool(64, s), bias-free stride-2 conv,
  3 MemBlocks] with TPool strides (2, 2, 1) (`encoder_time_downscale=(True, True, False)`), 17 conv 64->16.
  Its input is padded at the end with copies of the last frame to a multiple of 4 frames.
* Time x4, space x8. k+1 latents decode to 4(k+1) frames; upstream drops the first `frames_to_trim =
  t_upscale - 1 = 3`, so the first latent yields 1 frame and every later one 4: F = 4k+1, as Wan.
* No latent scaling: TAEHV takes exactly the latents the Wan DiT works with (the Wan VAE's *normalized*
  latents, (mu - mean) / std). Upstream's diffusers wrapper sets latents_mean = 0, latents_std = 1.
* Upstream works in NTCHW with pixels in [0, 1]; its streaming wrapper keeps a per-block memory list (the
  last input of every MemBlock, the pending frames of every TPool) and skips the first 3 decoded frames.

What is ours:

* Layout and range match `WanVAE`: latents [B, 16, T, h, w] (NCTHW), video [B, 3, F, H, W] in [-1, 1]
  (decoder output = 2 * clamp(taehv, 0, 1) - 1; encoder input = (video + 1) / 2), results float32.
* The causal state is data: `decoder_state()` / `encoder_state()` give a fresh `TAEHVState`, and
  `decode_chunk(latents, state) -> (frames, new_state)` (likewise `encode_chunk`) never mutates the module
  or the state it was given, so a stream can be forked or rolled back by keeping an old state. Within a
  chunk all frames are processed in parallel (upstream's "parallel" mode); across chunks the state carries
  the memory (upstream's "sequential" mode). Any split of a clip into chunks gives the same frames.
* Trimming happens only at the very start of a stream (counted in raw decoder frames in the state).

This module reads no files; `checkpoints.taehv.load_taehv` builds it from `taew2_1.pth`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

N_MEMBLOCKS = 3   # MemBlocks per stage (encoder and decoder)


@dataclass(frozen=True)
class TAEHVConfig:
    latent_channels: int = 16                                   # Wan2.1 z
    image_channels: int = 3
    patch_size: int = 1                                         # pixel (un)shuffle at the ends; 1 for taew2_1
    encoder_width: int = 64
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
    decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True)

    @classmethod
    def tiny(cls) -> "TAEHVConfig":
        """Same structure, toy widths: fast on CPU (tests)."""
        return cls(encoder_width=8, decoder_widths=(16, 12, 8, 8))

    def __post_init__(self):
        if len(self.decoder_widths) != 4:
            raise ValueError(f"decoder_widths needs 4 values, got {self.decoder_widths}")
        for name in ("encoder_time_downscale", "decoder_time_upscale", "decoder_space_upscale"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs one flag per stage (3), got {getattr(self, name)}")
        if min(self.latent_channels, self.image_channels, self.patch_size, self.encoder_width,
               *self.decoder_widths) < 1:
            raise ValueError(f"widths and sizes must be positive: {self}")

    @property
    def t_downscale(self) -> int:
        return 2 ** sum(bool(f) for f in self.encoder_time_downscale)

    @property
    def t_upscale(self) -> int:
        return 2 ** sum(bool(f) for f in self.decoder_time_upscale)

    @property
    def frames_to_trim(self) -> int:
        """Raw decoder frames dropped at the start of a stream (3 for taew2_1)."""
        return self.t_upscale - 1

    @property
    def space_upscale(self) -> int:
        return 2 ** sum(bool(f) for f in self.decoder_space_upscale) * self.patch_size

    @property
    def space_downscale(self) -> int:
        return 8 * self.patch_size     # three stride-2 convs


# ---- building blocks (parameter names as upstream) -----------------------------------------------------

def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """ReLU(body(cat[x, past]) + skip(x)); `past` is this block's input one time step earlier."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        # not in-place: the inputs are kept as the next chunk's `past`
        self.conv = nn.Sequential(_conv(2 * n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """`stride` consecutive frames (stacked along channels, earlier first) -> one frame, 1x1 conv."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape                       # frames of one group are adjacent
        return self.conv(x.reshape(nt // self.stride, self.stride * c, h, w))


class TGrow(nn.Module):
    """One frame -> `stride` frames: 1x1 conv to stride*C channels, split in order (earlier first)."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, c, h, w = x.shape
        return self.conv(x).reshape(nt * self.stride, c, h, w)


def build_encoder(cfg: TAEHVConfig) -> nn.Sequential:
    w = cfg.encoder_width
    layers: list[nn.Module] = [_conv(cfg.image_channels * cfg.patch_size ** 2, w), nn.ReLU()]
    for down in cfg.encoder_time_downscale:
        layers += [TPool(w, 2 if down else 1), _conv(w, w, stride=2, bias=False)]
        layers += [MemBlock(w, w) for _ in range(N_MEMBLOCKS)]
    layers.append(_conv(w, cfg.latent_channels))
    return nn.Sequential(*layers)


def build_decoder(cfg: TAEHVConfig) -> nn.Sequential:
    n_f = cfg.decoder_widths
    layers: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, n_f[0]), nn.ReLU()]
    for i, (t_up, s_up) in enumerate(zip(cfg.decoder_time_upscale, cfg.decoder_space_upscale)):
        layers += [MemBlock(n_f[i], n_f[i]) for _ in range(N_MEMBLOCKS)]
        layers += [nn.Upsample(scale_factor=2 if s_up else 1, mode="nearest"), TGrow(n_f[i], 2 if t_up else 1),
                   _conv(n_f[i], n_f[i + 1], bias=False)]
    layers += [nn.ReLU(), _conv(n_f[3], cfg.image_channels * cfg.patch_size ** 2)]
    return nn.Sequential(*layers)


# ---- causal state -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TAEHVState:
    """Causal state of one encoder or decoder stream. Treat as opaque and immutable.

    memory[i] belongs to layer i of the encoder/decoder: for a MemBlock the last frame it was given
    ([B, C, H, W]), for a TPool the frames waiting for a full group ([B, P, C, H, W]); None otherwise or
    before the first frame. `frames_in` / `frames_out` count input frames and raw (untrimmed) output frames;
    `last_input` is the encoder's last preprocessed input frame (for end-of-stream padding)."""
    role: str                                      # "encoder" | "decoder"
    memory: tuple = field(default=())
    frames_in: int = 0
    frames_out: int = 0
    last_input: torch.Tensor | None = None


def _run_chunk(seq: nn.Sequential, x: torch.Tensor, batch: int, memory: tuple) -> tuple[torch.Tensor, tuple]:
    """Apply `seq` to frames x [(B T), C, H, W] (batch-major), carrying `memory` (see TAEHVState).
    Returns the output frames [(B T'), C', H', W'] and the new memory (the input tuple is not mutated)."""
    mem = list(memory)
    for i, layer in enumerate(seq):
        nt, c, h, w = x.shape
        t = nt // batch
        if isinstance(layer, MemBlock):
            if t == 0:
                x = layer(x, x)                    # empty: only shapes matter
                continue
            cur = x.reshape(batch, t, c, h, w)
            prev = mem[i] if mem[i] is not None else x.new_zeros(batch, c, h, w)
            if tuple(prev.shape) != (batch, c, h, w):
                raise ValueError(f"stream state does not fit this input: layer {i} remembers a frame of shape "
                                 f"{tuple(prev.shape)}, the input gives {(batch, c, h, w)} "
                                 "(batch size or resolution changed mid-stream?)")
            past = torch.cat([prev.unsqueeze(1), cur[:, :-1]], dim=1).reshape(nt, c, h, w)
            mem[i] = cur[:, -1]
            x = layer(x, past)
        elif isinstance(layer, TPool):
            cur = x.reshape(batch, t, c, h, w)
            if mem[i] is not None:
                if (mem[i].shape[0], *mem[i].shape[2:]) != (batch, c, h, w):
                    raise ValueError(f"stream state does not fit this input at layer {i} "
                                     "(batch size or resolution changed mid-stream?)")
                cur = torch.cat([mem[i], cur], dim=1)
            usable = cur.shape[1] // layer.stride * layer.stride
            mem[i] = cur[:, usable:] if usable < cur.shape[1] else None
            x = layer(cur[:, :usable].reshape(batch * usable, c, h, w))
        else:
            x = layer(x)
    return x, tuple(mem)


# ---- the model --------------------------------------------------------------------------------------

class TAEHV(nn.Module):
    """TAEHV / taew2_1. Runs where its parameters are, in their dtype; inputs are moved there, results come
    back there as float32. Parameter names are upstream's (`encoder.3.weight`, `decoder.4.conv.2.bias`, ...)
    so `taew2_1.pth` loads as is."""

    def __init__(self, cfg: TAEHVConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TAEHVConfig()
        self.encoder = build_encoder(cfg)
        self.decoder = build_decoder(cfg)

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    # -- decode --

    def decoder_state(self) -> TAEHVState:
        """A fresh decoder stream (no memory, nothing trimmed yet)."""
        return TAEHVState("decoder", (None,) * len(self.decoder))

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: TAEHVState) -> tuple[torch.Tensor, TAEHVState]:
        """Latents [B, z, t, h, w] (the DiT's normalized latents, no scaling) continuing the stream `state`
        -> (frames [B, 3, n, H, W] in [-1, 1] float32, new state), H, W = 8h, 8w.

        n = 4t, minus 3 if this chunk starts the stream (1 frame for the first latent, then 4 per latent).
        `state` is not modified; keep it to re-decode from the same point."""
        cfg = self.cfg
        if latents.dim() != 5 or latents.shape[1] != cfg.latent_channels:
            raise ValueError(f"decode expects latents [B,{cfg.latent_channels},t,h,w], got {tuple(latents.shape)}")
        if state.role != "decoder" or len(state.memory) != len(self.decoder):
            raise ValueError("decode_chunk needs a state from decoder_state() of this model")
        b, z, t, h, w = latents.shape
        x = latents.to(self.device, self.dtype).transpose(1, 2).reshape(b * t, z, h, w)
        y, memory = _run_chunk(self.decoder, x, b, state.memory)
        raw = y.shape[0] // b
        y = y.reshape(b, raw, *y.shape[1:]).transpose(1, 2)          # NCTHW
        trim = min(raw, max(0, cfg.frames_to_trim - state.frames_out))
        y = y[:, :, trim:].float()
        if cfg.patch_size > 1:
            y = F.pixel_shuffle(y.transpose(1, 2), cfg.patch_size).transpose(1, 2)
        frames = y.clamp(0, 1).mul(2).sub(1)
        return frames, replace(state, memory=memory, frames_in=state.frames_in + t,
                               frames_out=state.frames_out + raw)

    def decode_frames(self, latents: torch.Tensor, chunk_size: int = 1) -> Iterator[torch.Tensor]:
        """Yield decoded frames `chunk_size` latents at a time through one stream: with chunk_size = 1,
        [B,3,1,H,W] for the first latent, then [B,3,4,H,W] per latent (like `WanVAE.decode_frames`)."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        state = self.decoder_state()
        for s in range(0, latents.shape[2], chunk_size):
            frames, state = self.decode_chunk(latents[:, :, s:s + chunk_size], state)
            yield frames

    def decode(self, latents: torch.Tensor, chunk_size: int | None = 4) -> torch.Tensor:
        """Normalized latents [B,16,T,h,w] -> video [B,3,4(T-1)+1,8h,8w] in [-1,1], float32.

        The concatenation of `decode_chunk` over chunks of `chunk_size` latents (None: all at once); the
        result does not depend on chunk_size, the activation memory does."""
        if latents.dim() != 5 or latents.shape[2] < 1:
            raise ValueError(f"decode expects latents [B,{self.cfg.latent_channels},T>=1,h,w], "
                             f"got {tuple(latents.shape)}")
        return torch.cat(list(self.decode_frames(latents, chunk_size or latents.shape[2])), dim=2)

    # -- encode --

    def encoder_state(self) -> TAEHVState:
        """A fresh encoder stream."""
        return TAEHVState("encoder", (None,) * len(self.encoder))

    @torch.no_grad()
    def encode_chunk(self, video: torch.Tensor, state: TAEHVState) -> tuple[torch.Tensor, TAEHVState]:
        """Frames [B, 3, f, H, W] in [-1, 1] continuing the stream `state` -> (latents [B, 16, n, H/8, W/8]
        float32, new state). Frames are pooled in groups of 4: a latent comes out once its 4th frame is in,
        partial groups wait in the state (`encode_flush` pads them at the end of the stream)."""
        cfg = self.cfg
        if video.dim() != 5 or video.shape[1] != cfg.image_channels:
            raise ValueError(f"encode expects video [B,{cfg.image_channels},F,H,W], got {tuple(video.shape)}")
        if state.role != "encoder" or len(state.memory) != len(self.encoder):
            raise ValueError("encode_chunk needs a state from encoder_state() of this model")
        b, c, f, h, w = video.shape
        if h % cfg.space_downscale or w % cfg.space_downscale:
            raise ValueError(f"encode needs height and width divisible by {cfg.space_downscale}, got {h}x{w}")
        x = video.to(self.device, torch.float32).transpose(1, 2).add(1).div(2)   # [B,F,3,H,W] in [0, 1]
        if cfg.patch_size > 1:
            x = F.pixel_unshuffle(x, cfg.patch_size)
        return self._encode_frames(x.to(self.dtype), state)

    def _encode_frames(self, x: torch.Tensor, state: TAEHVState) -> tuple[torch.Tensor, TAEHVState]:
        """Encoder on preprocessed frames x [B, f, C, H, W] (upstream's NTCHW, [0, 1], model dtype)."""
        b, f = x.shape[:2]
        last = x[:, -1] if f > 0 else state.last_input
        y, memory = _run_chunk(self.encoder, x.reshape(b * f, *x.shape[2:]), b, state.memory)
        n = y.shape[0] // b
        lat = y.reshape(b, n, *y.shape[1:]).transpose(1, 2).float()
        return lat, replace(state, memory=memory, frames_in=state.frames_in + f,
                            frames_out=state.frames_out + n, last_input=last)

    @torch.no_grad()
    def encode_flush(self, state: TAEHVState) -> tuple[torch.Tensor | None, TAEHVState]:
        """End of stream: pad the pending frames with copies of the last frame to a full group of 4 (as
        upstream pads the end of a clip) and return the remaining latents (None if there were none)."""
        if state.role != "encoder" or len(state.memory) != len(self.encoder):
            raise ValueError("encode_flush needs a state from encoder_state() of this model")
        pad = -state.frames_in % self.cfg.t_downscale
        if pad == 0 or state.last_input is None:
            return None, state
        frames = state.last_input.unsqueeze(1).expand(-1, pad, -1, -1, -1)
        return self._encode_frames(frames, state)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B,3,F,H,W] in [-1,1], H, W multiples of 8 -> latents [B,16,ceil(F/4),H/8,W/8] in the DiT's
        space (F = 4k+1 gives k+1 latents, as the Wan VAE). The end is padded with the last frame."""
        if video.dim() != 5 or video.shape[2] < 1:
            raise ValueError(f"encode expects video [B,3,F>=1,H,W], got {tuple(video.shape)}")
        lat, state = self.encode_chunk(video, self.encoder_state())
        rest, _ = self.encode_flush(state)
        return lat if rest is None else torch.cat([lat, rest], dim=2)
