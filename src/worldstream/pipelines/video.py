"""MP4 output: decoded video -> H.264 (yuv420p) through PyAV, written atomically; and reading one back.

Wan and LingBot-World videos are 16 fps. H.264 in yuv420p subsamples chroma 2x2, so both frame sides must be
even: an odd side is padded by repeating its last row / column (nothing is cropped). Our generation sizes are
multiples of 16, so in practice no padding happens.

The file appears only when it is complete: frames are encoded into a temp file in the destination folder, which
is then renamed over the destination (`os.replace`, atomic on one file system). On any failure, Ctrl-C included,
the temp file is removed and no MP4 (and no partial MP4) is left behind.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write

FPS = 16
CRF = 18   # x264 constant-quality setting: visually lossless for most content, ~1-3 MB per 5 s of 480p


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """Video [3, F, H, W] in [-1, 1] (any float dtype/device) -> uint8 [F, H, W, 3] on the CPU, rounded.

    Values outside [-1, 1] are clamped (the VAE already clamps); NaN raises instead of becoming black.
    """
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, F, H, W], got shape {tuple(video.shape)}")
    if not torch.isfinite(video).all():
        raise ValueError("the video has non-finite values (NaN/inf); refusing to write it")
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu()


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad an odd height / width by repeating the last row / column (yuv420p needs even sides)."""
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


def write_mp4(frames, path: str | os.PathLike, fps: int = FPS, crf: int = CRF) -> Path:
    """Encode uint8 frames [F, H, W, 3] (numpy or torch, RGB) as H.264 yuv420p MP4 at `path`, atomically.

    Creates the parent folder if needed. Returns the path written.
    """
    import av

    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames [F, H, W, 3] with F >= 1, got {frames.dtype} {list(frames.shape)}")
    frames = _even(frames)
    path = Path(path)
    def encode(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for rgb in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():   # flush the encoder
                container.mux(packet)

    atomic_write(path, encode, suffix=".tmp.mp4")
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file: uint8 [F, H, W, 3] RGB."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames)


def mp4_info(path: str | os.PathLike) -> dict:
    """Codec, pixel format, size, frame rate and frame count of a video file's first video stream."""
    import av

    with av.open(str(path)) as container:
        s = container.streams.video[0]
        frames = sum(1 for _ in container.demux(s) if _.size)
        return {"codec": s.codec_context.name, "pix_fmt": s.codec_context.pix_fmt, "width": s.codec_context.width,
                "height": s.codec_context.height, "fps": float(s.average_rate or s.base_rate or 0),
                "frames": frames}
