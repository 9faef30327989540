"""What the DiT is conditioned on besides text: the first frame (image-to-video), the camera / action
trajectory (LingBot-World), and the starting noise. Facts from spec sections 3-4 and upstream
`wan/image2video.py` (Wan2.2, LingBot-World).

Image-to-video (Wan2.2 I2V, LingBot-World):
  * the image goes to [-1, 1]; the output size keeps its aspect ratio within `max_area` pixels
    (`i2v_size`: lat_h = round(sqrt(max_area * h / w) // 8 // 2 * 2), lat_w likewise with w / h, then x 8);
  * it is resized to that size (bicubic, no antialiasing, like upstream's `F.interpolate`), put as frame 0
    of an F-frame clip whose other frames are zero, and VAE-encoded -> 16 x lat_f latents;
  * a 4 x lat_f mask is one on latent frame 0 (the image) and zero after;
  * y = cat(mask, latents): 20 channels the DiT concatenates to its 16 noisy channels (in_dim 36).

Camera (LingBot Cam) and action (LingBot Act) inputs come from an action folder (`poses.npy`,
`intrinsics.npy`, Act also `action.npy`) or from a keyboard string; `CameraInput` holds the loaded,
validated arrays and builds the DiT's conditioning tensor with `models.camera.camera_condition` once the
output size is known.

Noise is drawn on the CPU from a generator seeded once (float32, [16, lat_f, lat_h, lat_w]), so a seed gives
the same video on any device. (Upstream draws it on the GPU, so the same seed gives different noise there.)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..models import camera as cam
from ..models.configs import WAN_LATENTS, DiTConfig, LatentSpace


class GenerationError(ValueError):
    """Bad input for a generation. The message names the file, flag or value at fault."""


# ---------------------------------------------------------------------------------------------- frames

MAX_FRAMES = cam.MAX_KEY_FRAMES   # 1025 frames: 64 s at 16 fps, 257 latent frames (README "Limits")


def round_frames(frame_num: int, latents: LatentSpace = WAN_LATENTS) -> int:
    """The largest 4n+1 <= frame_num (what the VAE can produce: latent frame 0 is one video frame, every later
    latent four). Raises GenerationError for frame_num < 1 or > MAX_FRAMES."""
    if int(frame_num) != frame_num or not 1 <= frame_num <= MAX_FRAMES:
        raise GenerationError(f"--frame_num must be an integer from 1 to {MAX_FRAMES} (4n+1: 1, 5, 9, ..., 81), "
                              f"got {frame_num}")
    return latents.round_frames(int(frame_num))


# ---------------------------------------------------------------------------------------------- image

MAX_IMAGE_PIXELS = 8192 * 8192   # --image: width x height, read from the file's header before it is decoded
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ORIENTATION = 0x0112    # the EXIF tag


def read_image(path: str | os.PathLike, notice: Callable[[str], None] | None = None):
    """Open an image file as PIL RGB, fully decoded now (so a truncated file fails here, not later).

    Converted faithfully or refused: 16-bit images are scaled to 8 bits (not clipped to white), 32-bit integer
    and float images (no fixed white level) are refused, the EXIF orientation is applied; dropped transparency
    and extra animation frames are reported to `notice`. At most MAX_IMAGE_PIXELS pixels."""
    import warnings

    from PIL import Image

    path = Path(path)
    notice = notice or (lambda msg: None)
    if not path.is_file():
        raise GenerationError(f"--image {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise GenerationError(f"--image {path}: {w}x{h} is more than {MAX_IMAGE_PIXELS:,} pixels")
                if getattr(img, "n_frames", 1) > 1:
                    notice(f"--image {path} has {img.n_frames} frames; the first is used")
                img.load()
                return _to_rgb(img, path, notice)
    except GenerationError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:   # PIL's own, larger limit
        raise GenerationError(f"--image {path}: more than {MAX_IMAGE_PIXELS:,} pixels ({e})") from None
    except Exception as e:  # noqa: BLE001 - a decoder failing on an untrusted file, whatever it raises
        raise GenerationError(f"--image {path}: cannot read it as an image ({type(e).__name__}: {e})") from None


def _to_rgb(img, path: Path, notice: Callable[[str], None]):
    """A decoded PIL image -> RGB with 8 bits per channel, or GenerationError when that cannot be faithful."""
    from PIL import Image, ImageOps

    if img.mode in _SIXTEEN_BIT or (img.mode == "I" and img.format == "PNG"):   # 16-bit grayscale
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray((arr / 257.0).round().clip(0, 255).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        kind = "integer" if img.mode == "I" else "floating-point"
        raise GenerationError(f"--image {path}: a 32-bit {kind} image has no fixed white level; save it as an "
                              "8- or 16-bit image")
    if img.getexif().get(_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
        notice(f"--image {path}: turned upright by its EXIF orientation")
    if "A" in img.mode or "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            notice(f"--image {path} has transparent pixels; their stored colours are used (alpha is ignored, "
                   "as upstream)")
    return img.convert("RGB")


def image_to_tensor(img) -> torch.Tensor:
    """PIL RGB image -> float32 [3, H, W] in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255).sub_(0.5).div_(0.5)


def i2v_size(img_height: int, img_width: int, max_area: int, cfg: DiTConfig) -> tuple[int, int]:
    """Output (height, width) for an image-to-video run: the image's aspect ratio at about `max_area` pixels,
    both sides multiples of `cfg.pixel_multiple` (16 for Wan: upstream's formula, spec section 4).

    Kept float-for-float as upstream computes it, quirks included: a 480x832 image at max_area 832*480 gives
    464x832, because sqrt(399360 * 480 / 832) evaluates to 479.99999... and is floored."""
    aspect = img_height / img_width
    s, p = cfg.latents.stride[1], cfg.patch_size[1]
    lat_h = round(math.sqrt(max_area * aspect) // s // p * p)
    lat_w = round(math.sqrt(max_area / aspect) // s // p * p)
    if lat_h < p or lat_w < p:
        raise GenerationError(f"the image is {img_width}x{img_height}: its aspect ratio is too extreme for a "
                              f"{max_area}-pixel video (it would be {lat_w * s}x{lat_h * s})")
    return lat_h * s, lat_w * s


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, H0, W0] -> [3, height, width], bicubic without antialiasing (upstream's F.interpolate call)."""
    return F.interpolate(image[None].float(), size=(height, width), mode="bicubic")[0]


def first_frame_mask(lat_f: int, lat_h: int, lat_w: int, device=None) -> torch.Tensor:
    """[4, lat_f, lat_h, lat_w]: ones on latent frame 0 (the given image), zeros on the frames to generate.

    Upstream builds a per-video-frame mask (frame 0 repeated 4x, then one entry per frame) and folds every 4
    frames into channels; only latent frame 0 ends up non-zero, in all 4 channels."""
    mask = torch.zeros(4, lat_f, lat_h, lat_w, device=device)
    mask[:, 0] = 1.0
    return mask


@torch.no_grad()
def image_condition(vae, image: torch.Tensor, frames: int, tile: int | None = None) -> torch.Tensor:
    """y = cat(mask, VAE(image, 0, 0, ...)): [20, lat_f, H/8, W/8] float32 on the VAE's device.

    `image` [3, H, W] in [-1, 1] is already at the output size. The clip encoded is the image followed by
    frames - 1 black (zero) frames, as upstream does. `tile` (latent pixels): encode in overlapping spatial
    tiles (the VAE's working memory shrinks with the tile; approximate at tile borders, see models/vae.py)."""
    _, h, w = image.shape
    clip = torch.zeros(1, 3, frames, h, w, dtype=torch.float32)
    clip[0, :, 0] = image
    latents = vae.encode(clip, tile=None if tile is None else (tile, tile))[0].float()   # [16, lat_f, h/8, w/8]
    mask = first_frame_mask(latents.shape[1], latents.shape[2], latents.shape[3], device=latents.device)
    return torch.cat([mask, latents], dim=0)


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """randn(shape) float32 ([16, lat_f, lat_h, lat_w] for a Wan video) from a CPU generator seeded once."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- camera

@dataclass
class CameraInput:
    """Validated camera / action arrays; `condition(frames, h, w)` gives the DiT's camera tensor.

    poses [N, 4, 4] camera-to-world; intrinsics [M, 4] (row 0 used, for a 480x832 image); actions [K, 4] WASD
    switches Act mode on; `truncate` is True for pose files (the clip is cut to the poses available) and False
    for keyboard trajectories (N + 1 poses for N frames)."""
    poses: np.ndarray
    intrinsics: np.ndarray
    actions: np.ndarray | None
    truncate: bool
    source: str

    def frames(self, frame_num: int) -> int:
        """Frames this input can drive when frame_num are asked for (pose files may hold fewer)."""
        return cam.usable_frames(len(self.poses), frame_num) if self.truncate else frame_num

    def condition(self, frames: int, height: int, width: int) -> torch.Tensor:
        """float32 [C * 64, lat_f, height / 8, width / 8] with C = 6 (Cam) or 7 (Act); batch dim added."""
        c = cam.camera_condition(self.poses, self.intrinsics, frames, height, width, actions=self.actions,
                                 truncate=self.truncate)
        return c[None]


def _load_intrinsics(path: Path) -> np.ndarray:
    """intrinsics.npy alone (keyboard strings take only the calibration from an action folder)."""
    f = path / "intrinsics.npy"
    if not f.is_file():
        raise GenerationError(f"--action_path {path}: missing intrinsics.npy (with --action_string only the "
                              "intrinsics are read from it)")
    try:
        return cam.load_intrinsics(f)
    except ValueError as e:
        raise GenerationError(str(e)) from None


def camera_from_dir(path: str | os.PathLike, act: bool) -> CameraInput:
    """Load and validate an action folder: poses.npy + intrinsics.npy, and action.npy for an Act model."""
    path = Path(path)
    try:
        poses, intrinsics, actions = cam.load_action_dir(path, mode="act" if act else "cam")
    except (FileNotFoundError, ValueError) as e:
        raise GenerationError(f"--action_path: {e}") from None
    return CameraInput(poses, intrinsics, actions, truncate=True, source=str(path))


def action_string_frames(action_string: str) -> int:
    """Key frames a keyboard string spells out (before padding to 4n+1)."""
    try:
        return len(cam.parse_action_string(action_string))
    except ValueError as e:
        raise GenerationError(f"--action_string: {e}") from None


def camera_from_string(action_string: str, frames: int, act: bool,
                       action_path: str | os.PathLike | None = None) -> CameraInput:
    """A keyboard string (e.g. "w-10,iw-15,none-10") integrated into a trajectory of frames + 1 poses.

    Intrinsics: row 0 of `action_path/intrinsics.npy` if given, else `camera.DEFAULT_INTRINSICS`. For an Act
    model (our extension; upstream drives only Cam models from strings) the W/A/S/D keys of every frame also
    become the action channels, as `action.npy` would."""
    try:
        keys = cam.parse_action_string(action_string)
    except ValueError as e:
        raise GenerationError(f"--action_string: {e}") from None
    if len(keys) > frames:
        raise GenerationError(f"--action_string spells out {len(keys)} frames but the video has {frames}; "
                              f"drop --frame_num or give at least {cam.pad_to_4n_plus_1(len(keys))}")
    k = cam.DEFAULT_INTRINSICS[None].astype(np.float64) if action_path is None else _load_intrinsics(Path(action_path))
    poses = cam.trajectory_from_actions(keys, frames)
    actions = None
    if act:
        padded = keys + [frozenset()] * (frames - len(keys))
        actions = np.array([[float(c in pressed) for c in cam.WASD] for pressed in padded], dtype=np.float32)
    return CameraInput(poses, k, actions, truncate=False, source=f"--action_string {action_string!r}")
