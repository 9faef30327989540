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

from ..files import atomic_path

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
    out = torch.empty(video.shape[1:] + (3,), dtype=torch.uint8)
    for f in range(0, video.shape[1], 8):   # 8 frames at a time: float temporaries of 8 frames, not of the clip
        x = ((video[:, f:f + 8].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out[f:f + 8] = x.permute(1, 2, 3, 0).cpu()
    return out


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
    with Mp4Stream(path, fps, crf) as out:
        out.write(frames)
    return Path(path)


class Mp4Stream:
    """An MP4 written as frames arrive (`write` uint8 [F, H, W, 3] batches), appearing atomically when the
    `with` block ends normally; on any failure nothing is left behind. Frame size is fixed by the first batch."""

    def __init__(self, path: str | os.PathLike, fps: int = FPS, crf: int = CRF):
        self.path, self.fps, self.crf = Path(path), fps, crf
        self.frames = 0

    def __enter__(self) -> "Mp4Stream":
        import av

        self._tmp = atomic_path(self.path, suffix=".tmp.mp4")
        tmp = self._tmp.__enter__()
        try:
            self._container = av.open(tmp, mode="w", format="mp4")
        except BaseException as e:
            self._tmp.__exit__(type(e), e, e.__traceback__)
            raise
        self._stream = None
        return self

    def write(self, frames) -> None:
        import av

        if isinstance(frames, torch.Tensor):
            frames = frames.cpu().numpy()
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        frames = _even(frames)
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=Fraction(int(self.fps), 1))
            self._stream.width, self._stream.height = frames.shape[2], frames.shape[1]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf)}
        elif (frames.shape[1], frames.shape[2]) != (self._stream.height, self._stream.width):
            raise ValueError(f"frames of {frames.shape[2]}x{frames.shape[1]} in a {self._stream.width}x"
                             f"{self._stream.height} video")
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self.frames += len(frames)

    def __exit__(self, kind, value, tb) -> bool:
        try:
            if kind is None:
                if self._stream is None:
                    raise ValueError("no frames were written")
                for packet in self._stream.encode():   # flush the encoder
                    self._container.mux(packet)
            self._container.close()
        except BaseException as e:
            self._tmp.__exit__(type(e), e, e.__traceback__)
            raise
        return bool(self._tmp.__exit__(kind, value, tb))


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
