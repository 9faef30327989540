"""The Wan2.1 video VAE (used by every Wan / LingBot-World variant), in plain PyTorch.

Facts from shared/spec/wan-architecture.md section 6 and upstream `wan/modules/vae2_1.py`:

* A causal 3D conv encoder/decoder: base width 96, latent z 16, stage multipliers (1, 2, 4, 4), two residual
  blocks per encoder stage (three per decoder stage), one single-head attention in each middle block.
  Compression is 4x in time and 8x8 in space: F = 4k + 1 frames of HxW become k + 1 latents of H/8 x W/8.
* Causal convs pad only in front (2 frames for a 3-tap kernel). The video is processed in chunks (encode:
  the first frame alone, then 4 frames at a time; decode: one latent at a time); each conv keeps the last 2
  frames of its input as the "past" of the next chunk, so chunked == one causal pass over the whole video
  while activation memory stays at chunk size.
* Time down/upsampling treats the first frame specially: the encoder passes it through its temporal
  stride-2 conv untouched, and the decoder does not double it (1 output frame for the first latent, then 4
  per latent). The decoder's temporal conv never sees that first frame: its history starts empty.
* RMS norm = L2-normalize over channels * sqrt(C) * gamma.
* `encode` returns the posterior mean normalized with 16 fixed per-channel constants, (mu - mean) / std,
  the space the DiT works in; `decode` undoes it. Decoded pixels are clamped to [-1, 1].

Parameter names are upstream's (`encoder.downsamples.0.residual.2.weight`, ...), so `Wan2.1_VAE.pth` (a
plain state dict) loads as is. Those names come from upstream's `nn.Sequential` containers; we keep the
containers and unpack them by name in `forward`.

The causal "past" of every conv lives in a `dict` created per call (`Stream`), never on the module, so one
VAE can serve interleaved calls and nothing leaks from one video into the next.

Spatial tiling (`tile=` on encode/decode) is ours, not upstream's: it is for GPUs too small for a full
frame. It is approximate: near tile borders the convs see zero padding instead of the neighbouring pixels,
so overlapping tiles are blended with linear ramps to hide the seams. tests/test_vae.py measures the error.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import LatentSpace

# Per-channel statistics of the latent space (upstream `Wan2_1_VAE.__init__`).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

FIRST_CHUNK = 1      # encoder: the first frame alone, then chunks of one latent frame's worth (time stride)


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96                                   # base width
    z_dim: int = 16                                 # latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)        # width multipliers per stage
    num_res_blocks: int = 2                         # per encoder stage (decoder: one more)
    temporal_downsample: tuple[bool, ...] = (False, True, True)   # per encoder stage transition
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    @classmethod
    def tiny(cls, dim: int = 8) -> "VAEConfig":
        """Same structure (and latent constants), toy width: fast on CPU."""
        return replace(cls(), dim=dim)

    @property
    def latent_space(self) -> LatentSpace:
        """The latent grid this VAE makes: z_dim channels; time stride 2 per temporal downsample, space
        stride 2 per stage transition (the Wan2.1 VAE: 4 x 8 x 8)."""
        return LatentSpace(self.z_dim, (2 ** sum(self.temporal_downsample), 2 ** (len(self.dim_mult) - 1),
                                        2 ** (len(self.dim_mult) - 1)))

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one flag per stage transition "
                             f"({len(self.dim_mult) - 1}), got {self.temporal_downsample}")
        if sum(self.temporal_downsample) != 2 or len(self.dim_mult) != 4:
            raise ValueError("the Wan2.1 VAE compresses 4x in time and 8x in space: dim_mult needs 4 stages "
                             "and temporal_downsample exactly two True flags")
        if not (len(self.latents_mean) == len(self.latents_std) == self.z_dim):
            raise ValueError(f"latents_mean/std need z_dim={self.z_dim} values")


# Per-call causal state: module -> the frames it remembers from earlier chunks.
Stream = dict


# ---- building blocks ---------------------------------------------------------------------------------

def _frames_as_images(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame: [B,C,T,H,W] -> [(B T),C,H,W] -> fn -> [B,C',T,H',W']."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """A 3D conv that pads time only in front (2*p frames), and carries its last input frames across chunks.

    With a `stream`, the frames this conv saw at the end of the previous chunk stand in for (part of) the
    front zero padding, so processing a video chunk by chunk gives the same result as one causal pass.
    Spatial padding is ordinary zero padding.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel, stride=1, padding=0):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self.past_frames = 2 * pt           # frames of history the kernel reaches back
        self.spatial_pad = (pw, pw, ph, ph)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        front = self.past_frames
        if front and stream is not None:
            past = stream.get(self)
            if past is not None:
                x = torch.cat([past, x], dim=2)
                front -= past.shape[2]
            stream[self] = x[:, :, -self.past_frames:].detach().clone()
        x = F.pad(x, self.spatial_pad + (front, 0))
        if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() and _ONEDNN:
            # inference on the CPU: oneDNN's 3D convolution, called directly; PyTorch's dispatcher sends float32
            # conv3d to its generic `slow_conv3d` kernel here, 3-5x slower (BENCHMARKS.md, "live server")
            return torch.mkldnn_convolution(x.contiguous(), self.weight, self.bias, self.padding, self.stride,
                                            self.dilation, self.groups)
        return super().forward(x)


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma, over dim 1. `gamma` has shape (C,1,1[,1]) like upstream."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in float32 (a sum of squares over hundreds of channels is too coarse in bf16)
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1x1 conv on the skip path when widths differ.

    Upstream layout: `residual` = [norm, silu, conv, norm, silu, dropout, conv] (params at 0, 2, 3, 6).
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, 3), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), stream)
        h = conv2(F.silu(norm2(h)), stream)
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2)  # [N,3,HW,C]
        q, k, v = qkv.unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)                                # [N,HW,C]
        return self.proj(out.transpose(-1, -2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        return x + _frames_as_images(self._attend, x)


class Downsample(nn.Module):
    """Halve H and W (zero-pad right/bottom by 1, 3x3 conv stride 2); `temporal`: also halve time.

    The temporal half is a 3-tap stride-2 conv with no padding over the frame sequence, except that the very
    first frame passes through unchanged; across chunks the last frame of the previous chunk is prepended.
    Over a whole video: out = [x_0, conv(x_0, x_1, x_2), conv(x_2, x_3, x_4), ...].
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if temporal:
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.temporal = temporal

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        x = _frames_as_images(self.resample, x)
        if not self.temporal:
            return x
        last = stream.get(self)
        stream[self] = x[:, :, -1:].detach().clone()
        if last is None:                    # first chunk (the first frame): passes through
            return x
        return self.time_conv(torch.cat([last, x], dim=2))


class Upsample(nn.Module):
    """Double H and W (nearest, then 3x3 conv to half the width); `temporal`: also double time.

    The temporal half is a causal 3-tap conv to 2x the channels, read as two frames per input frame
    (first half of the channels = the earlier frame). The first frame is not doubled, and the conv's history
    starts after it: for frame t >= 1 it sees (x_{t-2}, x_{t-1}, x_t) with x_0 replaced by zeros.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
            nn.Conv2d(dim, dim // 2, 3, padding=1),
        )
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        self.temporal = temporal

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        if self.temporal:
            if self in stream:
                b, c, t, h, w = x.shape
                pairs = self.time_conv(x, stream).reshape(b, 2, c, t, h, w)
                x = torch.stack([pairs[:, 0], pairs[:, 1]], dim=3).reshape(b, c, 2 * t, h, w)
            else:                           # first chunk: not doubled, and kept out of time_conv's history
                stream[self] = True
        return _frames_as_images(self.resample, x)


def _head(dim: int, out_dim: int) -> nn.Sequential:
    """norm -> silu -> causal 3x3x3 conv (upstream `head`: params at 0 and 2)."""
    return nn.Sequential(RMSNorm(dim, 3), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def _run_head(head: nn.Sequential, x: torch.Tensor, stream: Stream) -> torch.Tensor:
    norm, _, conv = head
    return conv(F.silu(norm(x)), stream)


class Encoder(nn.Module):
    """video [B,3,T,H,W] -> [B,out_dim,T',H/8,W/8]: stem conv, 4 stages (the first 3 end in a downsample),
    middle (res, attention, res), head."""

    def __init__(self, cfg: VAEConfig, out_dim: int):
        super().__init__()
        widths = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for stage, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(w_in, w_out))
                w_in = w_out
            if stage < len(cfg.dim_mult) - 1:
                blocks.append(Downsample(w_out, temporal=cfg.temporal_downsample[stage]))
        self.downsamples = nn.ModuleList(blocks)
        top = widths[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = _head(top, out_dim)

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        x = self.conv1(x, stream)
        for block in (*self.downsamples, *self.middle):
            x = block(x, stream)
        return _run_head(self.head, x, stream)


class Decoder(nn.Module):
    """latents [B,z,T,h,w] -> video [B,3,T',8h,8w]: stem conv, middle, 4 stages of (num_res_blocks + 1)
    residual blocks (the first 3 end in an upsample that also halves the width), head."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        top = widths[0]
        self.conv1 = CausalConv3d(cfg.z_dim, top, 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        blocks: list[nn.Module] = []
        for stage, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            if stage > 0:
                w_in //= 2                  # the previous Upsample's conv halved the width
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(w_in, w_out))
                w_in = w_out
            if stage < len(cfg.dim_mult) - 1:
                blocks.append(Upsample(w_out, temporal=temporal_upsample[stage]))
        self.upsamples = nn.ModuleList(blocks)
        self.head = _head(widths[-1], 3)

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        x = self.conv1(x, stream)
        for block in (*self.middle, *self.upsamples):
            x = block(x, stream)
        return _run_head(self.head, x, stream)


# ---- spatial tiling ----------------------------------------------------------------------------------

def _tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) spans of length `tile` covering [0, size), consecutive ones overlapping by >= overlap."""
    if tile >= size:
        return [(0, size)]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, s + tile) for s in starts]


def _ramp_weights(span: tuple[int, int], size: int, ramp: int) -> torch.Tensor:
    """1D blend weight of one tile: linear ramps of `ramp` pixels on sides that have a neighbour, else 1.

    Weights stay > 0, so the normalized sum never divides by zero."""
    start, end = span
    w = torch.ones(end - start)
    n = min(ramp, end - start)
    if n > 0:
        up = torch.arange(1, n + 1, dtype=torch.float32) / (n + 1)
        if start > 0:
            w[:n] = torch.minimum(w[:n], up)
        if end < size:
            w[-n:] = torch.minimum(w[-n:], up.flip(0))
    return w


@dataclass
class Tile:
    """One spatial tile: where it reads (input pixels), where it writes (output pixels), with what weight."""
    rows: slice
    cols: slice
    out_rows: slice
    out_cols: slice
    weight: torch.Tensor        # [out h, out w], float32


def tile_grid(size: tuple[int, int], tile: tuple[int, int], overlap: int, scale: int | float
              ) -> tuple[list[Tile], torch.Tensor]:
    """Overlapping tiles of `tile` input pixels covering `size`, and the sum of their output weights.

    `scale` maps input to output pixels: 8 for decode (latent -> video), 1/8 for encode (video -> latent; tile
    corners must then fall on multiples of 8). Blending = sum_i(w_i * out_i) / sum_i(w_i), w_i a product of
    linear ramps over the overlaps (`overlap` input pixels): consecutive tiles cross-fade."""
    H, W = round(size[0] * scale), round(size[1] * scale)
    ramp = round(overlap * scale)
    tiles, wsum = [], torch.zeros(H, W)
    for y0, y1 in _tile_spans(size[0], tile[0], overlap):
        for x0, x1 in _tile_spans(size[1], tile[1], overlap):
            ys = (round(y0 * scale), round(y1 * scale))
            xs = (round(x0 * scale), round(x1 * scale))
            w = torch.outer(_ramp_weights(ys, H, ramp), _ramp_weights(xs, W, ramp))
            tiles.append(Tile(slice(y0, y1), slice(x0, x1), slice(*ys), slice(*xs), w))
            wsum[ys[0]:ys[1], xs[0]:xs[1]] += w
    return tiles, wsum


def blend_tiles(tiles: list[Tile], wsum: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    """Weighted average of per-tile outputs [..., h_i, w_i] into one [..., H, W] (on the outputs' device)."""
    ref = outputs[0]
    acc = ref.new_zeros(*ref.shape[:-2], *wsum.shape)
    for t, out in zip(tiles, outputs):
        acc[..., t.out_rows, t.out_cols] += out * t.weight.to(acc)
    return acc / wsum.to(acc)


# ---- the VAE -----------------------------------------------------------------------------------------

class WanVAE(nn.Module):
    """Wan2.1 VAE. Runs where its parameters are, in their dtype (upstream uses float32); inputs are moved
    there, results come back there as float32."""

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        self.encoder = Encoder(cfg, out_dim=2 * cfg.z_dim)          # -> (mean, log-variance)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # 1x1x1 on the posterior
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)          # 1x1x1 before the decoder
        self.decoder = Decoder(cfg)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def _apply(self, fn, *args, **kwargs):
        # keep the normalization constants in float32 whatever dtype the weights are cast to
        super()._apply(fn, *args, **kwargs)
        self.latents_mean = self.latents_mean.float()
        self.latents_std = self.latents_std.float()
        return self

    # -- encode --

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tile: tuple[int, int] | None = None, overlap: int = 4
               ) -> torch.Tensor:
        """video [B,3,F,H,W] in [-1,1], F = 4k+1, H and W multiples of 8
        -> normalized latents [B,z,k+1,H/8,W/8] (float32, on the VAE's device).

        `tile=(th, tw)` (in latent pixels) encodes overlapping spatial tiles one after another and blends
        them (approximate, see the module doc); `overlap` is in latent pixels.
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects video [B,3,F,H,W], got shape {tuple(video.shape)}")
        _, _, f, h, w = video.shape
        st, ss, _ = self.cfg.latent_space.stride
        if f % st != 1:
            raise ValueError(f"encode needs {st}k+1 frames (1, {st + 1}, {2 * st + 1}, ...), got {f}")
        if h % ss or w % ss:
            raise ValueError(f"encode needs height and width divisible by {ss}, got {h}x{w}")
        x = video.to(self.device, self.dtype)
        if tile is None:
            mu = self.encode_mean(x)
        else:
            # the grid is laid out in video pixels (tile and overlap are given in latent pixels, x8)
            tiles, wsum = tile_grid((h, w), (tile[0] * ss, tile[1] * ss), overlap * ss, 1 / ss)
            outs = [self.encode_mean(x[..., t.rows, t.cols]) for t in tiles]
            mu = blend_tiles(tiles, wsum, outs)
        return (mu - self.latents_mean) / self.latents_std

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The raw posterior mean (before normalization), float32: the first frame alone, then chunks of 4,
        through one causal stream."""
        stream: Stream = {}
        f = x.shape[2]
        chunk = self.cfg.latent_space.stride[0]
        bounds = [(0, FIRST_CHUNK)] + [(s, s + chunk) for s in range(FIRST_CHUNK, f, chunk)]
        h = torch.cat([self.encoder(x[:, :, a:b], stream) for a, b in bounds], dim=2)
        mu, _log_var = self.conv1(h).chunk(2, dim=1)
        return mu.float()

    @torch.no_grad()
    def encode_chunk(self, video: torch.Tensor, state: Stream) -> tuple[torch.Tensor, Stream]:
        """Frames [B,3,f,H,W] in [-1,1] continuing the encoding stream `state` (a fresh one: `{}`) ->
        (normalized latents [B,z,n,H/8,W/8] float32, the state). The first call takes the first frame alone
        (f = 1), later calls whole latent frames (f = 4k): chunk after chunk equals one `encode`."""
        st = self.cfg.latent_space.stride[0]
        first = "encoder_frames" not in state
        if (first and video.shape[2] != FIRST_CHUNK) or (not first and video.shape[2] % st):
            raise ValueError(f"encode_chunk takes the first frame alone, then multiples of {st} frames; got "
                             f"{video.shape[2]} frames {'first' if first else 'later'}")
        x = video.to(self.device, self.dtype)
        state["encoder_frames"] = state.get("encoder_frames", 0) + video.shape[2]
        chunks = [x] if first else [x[:, :, s:s + st] for s in range(0, x.shape[2], st)]
        h = torch.cat([self.encoder(c, state) for c in chunks], dim=2)
        mu, _log_var = self.conv1(h).chunk(2, dim=1)
        return (mu.float() - self.latents_mean) / self.latents_std, state

    # -- decode --

    @torch.no_grad()
    def decode_frames(self, latents: torch.Tensor, tile: tuple[int, int] | None = None, overlap: int = 4
                      ) -> Iterator[torch.Tensor]:
        """Yield decoded frames as they are produced: [B,3,1,H,W] for the first latent, then [B,3,4,H,W]
        per latent (H, W = 8x the latent size), clamped to [-1,1], float32, on the VAE's device.

        `latents` [B,z,T,h,w] are normalized (what `encode` returns). With `tile=(th, tw)` (latent pixels)
        every overlapping spatial tile keeps its own causal stream and all tiles advance one latent per step:
        activations are tile-sized, but the causal history (2 frames per conv) of every tile stays resident,
        so memory drops only ~25% (measured); `decode(tile=...)` saves far more but yields nothing early.
        """
        x = self._decoder_input(latents)
        if tile is None:
            for chunk in self._decode_stream(x):
                yield chunk.float().clamp_(-1, 1)
            return
        tiles, wsum = tile_grid(tuple(x.shape[-2:]), tile, overlap, self.cfg.latent_space.stride[1])
        streams = [self._decode_stream(x[..., t.rows, t.cols]) for t in tiles]
        for _ in range(x.shape[2]):
            yield blend_tiles(tiles, wsum, [next(s).float() for s in streams]).clamp_(-1, 1)

    def decoder_state(self) -> Stream:
        """A fresh decoding stream's causal state (for `decode_chunk`)."""
        return {}

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: Stream) -> tuple[torch.Tensor, Stream]:
        """Normalized latents [B,z,t,h,w] continuing the stream `state` -> (frames [B,3,n,8h,8w] in [-1,1],
        float32, on the VAE's device; the state). n = 4t, or 4t - 3 when the chunk starts the stream. The state
        (each conv's last input frames) is updated in place and returned: chunk after chunk equals one decode."""
        x = self._decoder_input(latents)
        out = [self.decoder(x[:, :, t:t + 1], state) for t in range(x.shape[2])]
        return torch.cat(out, dim=2).float().clamp_(-1, 1), state

    def _decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the normalization, then the 1x1x1 `conv2`: what the decoder consumes, one frame at a time."""
        if latents.dim() != 5 or latents.shape[1] != self.cfg.z_dim or latents.shape[2] < 1:
            raise ValueError(f"decode expects latents [B,{self.cfg.z_dim},T>=1,h,w], got {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32) * self.latents_std + self.latents_mean
        return self.conv2(z.to(self.dtype))

    def _decode_stream(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decoder over one latent frame at a time, sharing one causal stream (local to this generator)."""
        stream: Stream = {}
        for t in range(x.shape[2]):
            yield self.decoder(x[:, :, t:t + 1], stream)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: tuple[int, int] | None = None, overlap: int = 4,
               out_device: torch.device | str | None = None) -> torch.Tensor:
        """Normalized latents [B,z,T,h,w] -> video [B,3,4(T-1)+1,8h,8w] in [-1,1], float32, on `out_device`
        (default: the VAE's device).

        Untiled, this is the concatenation of `decode_frames`, each chunk moved to `out_device` as soon as it
        is decoded. Tiled, the tiles are decoded one after another, each through all latent frames, and
        blended into the output on `out_device`: same numbers as `decode_frames(tile=...)`, but GPU memory
        scales with the tile, not the frame (the causal history of only one tile is alive at a time).
        """
        if tile is None:
            return torch.cat([c.to(out_device) if out_device is not None else c
                              for c in self.decode_frames(latents)], dim=2)
        x = self._decoder_input(latents)
        b, _, t, h, w = x.shape
        st, ss, _ = self.cfg.latent_space.stride
        tiles, wsum = tile_grid((h, w), tile, overlap, ss)
        out_device = out_device if out_device is not None else self.device
        out = torch.zeros(b, 3, st * (t - 1) + 1, h * ss, w * ss, device=out_device)
        for tl in tiles:
            weight = tl.weight.to(self.device)
            frame = 0
            for chunk in self._decode_stream(x[..., tl.rows, tl.cols]):
                n = chunk.shape[2]
                out[:, :, frame:frame + n, tl.out_rows, tl.out_cols] += (chunk.float() * weight).to(out_device)
                frame += n
        return out.div_(wsum.to(out_device)).clamp_(-1, 1)
