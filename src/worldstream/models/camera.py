"""LingBot-World camera / action conditioning: poses on disk (or a keyboard string) -> the tensor the DiT's
camera branch reads, [C·64, lat_f, lat_h, lat_w] with C = 6 (Cam models) or 7 (Act models).

Facts from spec section 3 and upstream `wan/utils/cam_utils.py`, `wan/image2video.py`,
`wan/utils/wasd_ijkl_to_c2ws.py` (LingBot-World). The stages, each a public function so it can be
checked on its own:

1. `usable_frames`: keep min(frame_num, ((N−1)//4)·4 + 1) poses (a 4n+1 clip).
2. `interpolate_poses`: one pose per latent frame at linspace(0, N−1, lat_f); translation linear,
   rotation by Slerp (quaternion signs first made consecutive-positive).
3. `relative_framewise`: poses relative to the first, then each replaced by its delta from the previous
   latent frame; translations divided by the largest translation norm (when > 0).
4. `scale_intrinsics` + `ray_directions`: row 0 of the intrinsics, assumed to describe a 480×832 image,
   scaled to (height, width); unit ray per pixel centre (i + 0.5, j + 0.5) in camera space.
5. per latent frame: rays_d = d·Rᵀ; Cam: cat(translation, rays_d) (6 ch); Act: cat(rays_d, WASD of every
   4th video frame) (7 ch).
6. `fold`: every 8×8 pixel cell goes into channels, channel = c·64 + row_in_cell·8 + col_in_cell.

Upstream computes the poses after interpolation, the rays and the fold in float32; so does this module
(`camera_condition(..., pose_dtype=torch.float64)` keeps the pose step exact instead). The result is
float32; callers cast it to the model dtype (upstream: bf16).

Keyboard strings (`parse_action_string`, `trajectory_from_actions`): W/S forward/back and A/D left/right
move 0.05 per frame along the horizontal (y-flattened) forward/right axes; I/K pitch and J/L yaw 2° per
frame; a pitch step that would leave ±85° is dropped. The trajectory starts at identity and has one pose
more than there are key frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .configs import WAN_LATENTS

SRC_HEIGHT, SRC_WIDTH = 480, 832      # image size the intrinsics files describe (upstream assumption)
CELL = WAN_LATENTS.stride[1]          # VAE spatial stride: pixels per latent cell side
TEMPORAL_STRIDE = WAN_LATENTS.stride[0]   # VAE temporal stride: video frames per latent frame (after the first)

# Intrinsics used for keyboard-string trajectories, which come without a calibration file: row 0 of the
# real example `shared/data/camera/00/intrinsics.npy` (fx, fy, cx, cy of a 480×832 camera, ~79° horizontal
# field of view), so string-driven clips see the same camera as the example the model was shown with.
DEFAULT_INTRINSICS = np.array([502.9116, 503.10812, 415.77786, 239.77779], dtype=np.float32)

MOVE_SPEED = 0.05                     # translation units per key frame
ROTATE_SPEED_DEG = 2.0                # degrees per key frame
PITCH_LIMIT_DEG = 85.0
ACTION_KEYS = "wasdijkl"
WASD = "wasd"                         # column order of action.npy / the Act channels


# ----------------------------------------------------------------------------------------------------
# Frame counts

def usable_frames(num_poses: int, frame_num: int) -> int:
    """Video frames a pose file can drive: min(frame_num, ((N−1)//4)·4 + 1), always 4n+1 when frame_num is."""
    if num_poses < 1:
        raise ValueError(f"need at least one pose, got {num_poses}")
    if frame_num < 1:
        raise ValueError(f"frame_num must be >= 1, got {frame_num}")
    return min(int(frame_num), ((num_poses - 1) // TEMPORAL_STRIDE) * TEMPORAL_STRIDE + 1)


def latent_frames(frames: int) -> int:  # (WAN_LATENTS.latent_frames, for plain ints from files)
    """Latent frames of a `frames`-frame video: (F − 1)//4 + 1."""
    return (int(frames) - 1) // TEMPORAL_STRIDE + 1


def pad_to_4n_plus_1(n: int) -> int:
    """Smallest 4k+1 >= n."""
    if n < 1:
        raise ValueError(f"frame count must be >= 1, got {n}")
    return n + (-(n - 1)) % TEMPORAL_STRIDE


# ----------------------------------------------------------------------------------------------------
# Loading and validating an action directory

MAX_ROWS = 100_000       # rows of poses.npy / intrinsics.npy / action.npy (one per video frame is plenty)
MAX_KEY_FRAMES = 1025    # frames a keyboard string may spell out (64 s at 16 fps; = the longest clip)
_MAX_COUNT_DIGITS = 5    # a segment's frame count has at most this many digits


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int          # where the data starts


def read_npy_header(path: Path, max_rows: int = MAX_ROWS) -> NpyHeader:
    """The header of a .npy file, checked before any data is read: a numeric dtype (no pickles, no objects),
    at most `max_rows` rows, and exactly as many data bytes as the file holds. ValueError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except Exception as e:  # noqa: BLE001 - any failure to parse an untrusted header means a bad file
        raise ValueError(f"{path}: not a readable .npy array ({type(e).__name__}: {str(e)[:200]})") from None
    if dtype.kind not in "fiu" or dtype.itemsize > 8:
        raise ValueError(f"{path}: expected a numeric (float/int) array, found dtype {dtype}")
    if shape and shape[0] > max_rows:
        raise ValueError(f"{path}: {shape[0]} rows; at most {max_rows} are accepted")
    data = math.prod(shape) * dtype.itemsize
    if offset + data != size:
        raise ValueError(f"{path}: the header says {list(shape)} {dtype} ({data} bytes of data), but the file "
                         f"holds {size - offset} (truncated or corrupt)")
    return NpyHeader(tuple(shape), dtype, bool(fortran), offset)


def read_npy(path: Path, header: NpyHeader) -> np.ndarray:
    """The data of a .npy file whose header `read_npy_header` checked (a fresh, writable array)."""
    with open(path, "rb") as f:
        f.seek(header.offset)
        raw = f.read(math.prod(header.shape) * header.dtype.itemsize)
    arr = np.frombuffer(raw, dtype=header.dtype).reshape(header.shape, order="F" if header.fortran else "C")
    return arr.copy()


def _read_rows(path: Path, trailing: tuple[int, ...], what: str, min_rows: int = 1) -> np.ndarray:
    """A [N, *trailing] numeric array file with min_rows <= N <= MAX_ROWS, as float64."""
    header = read_npy_header(path)
    if len(header.shape) != 1 + len(trailing) or header.shape[1:] != trailing or header.shape[0] < min_rows:
        dims = ", ".join(["N", *map(str, trailing)])
        more = f" with N >= {min_rows}" if min_rows > 1 else ""
        raise ValueError(f"{path}: expected shape [{dims}] ({what}){more}, found {list(header.shape)}")
    return read_npy(path, header).astype(np.float64)


def load_intrinsics(path: str | Path) -> np.ndarray:
    """An intrinsics.npy file: [N, 4] (fx, fy, cx, cy of a 832x480 image), float64, checked."""
    path = Path(path)
    k = _read_rows(path, (4,), "fx, fy, cx, cy")
    _check_intrinsics(k, str(path))
    return k


def _check_poses(poses: np.ndarray, name: str = "poses") -> None:
    bad = ~np.isfinite(poses).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{name}: pose {int(np.argmax(bad))} has non-finite values (NaN/inf)")
    R = poses[:, :3, :3]
    err = np.abs(np.einsum("nji,njk->nik", R, R) - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(R)
    bad = (err > 1e-2) | (det <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}: pose {i} has no proper rotation in its top-left 3x3 "
                         f"(|RᵀR − I| = {err[i]:.3g}, det = {det[i]:.3g}); expected camera-to-world matrices")


def _check_intrinsics(k: np.ndarray, name: str = "intrinsics") -> None:
    bad = ~np.isfinite(k).all(axis=1)
    if bad.any():
        raise ValueError(f"{name}: row {int(np.argmax(bad))} has non-finite values")
    bad = (k[:, 0] <= 0) | (k[:, 1] <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}: row {i} has focal length fx={k[i, 0]}, fy={k[i, 1]}; both must be > 0 "
                         "(columns are fx, fy, cx, cy in pixels of a 480x832 image)")


def _check_actions(a: np.ndarray, name: str = "action") -> None:
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: has non-finite values")
    bad = (a < 0) | (a > 1)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{name}: value {a[i, j]} at frame {i}, key {WASD[j].upper()} is outside [0, 1]; "
                         "expected key states 0 (up) / 1 (pressed) in W, A, S, D column order")


def load_action_dir(path, mode: str = "cam") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read an upstream `--action_path` folder: (poses [N,4,4] float64, intrinsics [M,4] float64,
    actions [K,4] float32 for mode "act", else None).

    Files: `poses.npy` (camera-to-world, OpenCV axes), `intrinsics.npy` (fx, fy, cx, cy for a 480×832
    image; only row 0 is used later), and for "act" `action.npy` (W, A, S, D key states, K >= N rows).
    Shapes, dtypes, row counts (at most MAX_ROWS) and data sizes are checked from the .npy headers against the
    files before anything is loaded; pickled arrays are refused.
    """
    if mode not in ("cam", "act"):
        raise ValueError(f"mode must be 'cam' or 'act', got {mode!r}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"action directory {path} does not exist or is not a directory")
    needed = ["poses.npy", "intrinsics.npy"] + (["action.npy"] if mode == "act" else [])
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: missing {', '.join(missing)} (mode {mode!r} needs {', '.join(needed)})")

    poses = _read_rows(path / "poses.npy", (4, 4), "camera-to-world matrices")
    _check_poses(poses, str(path / "poses.npy"))
    intrinsics = load_intrinsics(path / "intrinsics.npy")
    actions = None
    if mode == "act":
        actions = _read_rows(path / "action.npy", (4,), "W, A, S, D", min_rows=len(poses)).astype(np.float32)
        _check_actions(actions, str(path / "action.npy"))
    return poses, intrinsics, actions


# ----------------------------------------------------------------------------------------------------
# Pose stages

def interpolate_poses(poses: np.ndarray, num: int) -> np.ndarray:
    """Resample N camera-to-world poses to `num` poses at frame positions linspace(0, N−1, num).

    Translation: piecewise linear. Rotation: Slerp between neighbouring source frames, after flipping
    quaternion signs so consecutive ones have a non-negative dot product. float64 in and out.
    """
    from scipy.spatial.transform import Rotation, Slerp

    poses = np.asarray(poses, dtype=np.float64)
    n = len(poses)
    out = np.zeros((num, 4, 4))
    out[:, 3, 3] = 1.0
    if n == 1:
        out[:, :3, :] = poses[0, :3, :]
        return out
    src = np.arange(n, dtype=np.float64)
    tgt = np.linspace(0, n - 1, num)
    out[:, :3, 3] = np.stack([np.interp(tgt, src, poses[:, k, 3]) for k in range(3)], axis=-1)
    quats = Rotation.from_matrix(poses[:, :3, :3]).as_quat()
    # Upstream's sign fix. scipy's Slerp already follows the shortest arc whatever the signs, so this does
    # not change the result; it is kept so the code reads like the spec.
    for i in range(1, n):
        if np.dot(quats[i], quats[i - 1]) < 0:
            quats[i] = -quats[i]
    out[:, :3, :3] = Slerp(src, Rotation.from_quat(quats))(tgt).as_matrix()
    return out


def se3_inverse(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms [..., 4, 4]: (Rᵀ, −Rᵀt)."""
    R_inv = T[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(T)
    out[..., :3, :3] = R_inv
    out[..., :3, 3:] = -(R_inv @ T[..., :3, 3:])
    out[..., 3, 3] = 1
    return out


def relative_framewise(c2w: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Per latent frame motion: P_i = C_0⁻¹·C_i (P_0 = I), then D_0 = I, D_i = P_{i−1}⁻¹·P_i;
    translations of D divided by max_i |t_i| when that is > 0. Works in the input's dtype."""
    rel = se3_inverse(c2w[:1]) @ c2w
    rel[0] = torch.eye(4, dtype=c2w.dtype)
    out = rel.clone()
    out[1:] = se3_inverse(rel[:-1]) @ rel[1:]
    if normalize:
        t = out[:, :3, 3]
        max_norm = t.norm(dim=-1).max()
        if max_norm > 0:
            out[:, :3, 3] = t / max_norm
    return out


# ----------------------------------------------------------------------------------------------------
# Rays and folding

def scale_intrinsics(k, height: int, width: int) -> torch.Tensor:
    """(fx, fy, cx, cy) of a 480×832 image rescaled to height×width (no crop), float32 [4]."""
    k = torch.as_tensor(np.asarray(k, dtype=np.float32).reshape(4))
    sx, sy = width / SRC_WIDTH, height / SRC_HEIGHT
    return torch.stack([k[0] * sx, k[1] * sy, k[2] * sx, k[3] * sy])


def ray_directions(k: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Unit viewing directions [height, width, 3] (float32, camera space) through pixel centres
    (col + 0.5, row + 0.5): normalize(((x − cx)/fx, (y − cy)/fy, 1))."""
    fx, fy, cx, cy = torch.as_tensor(k, dtype=torch.float32).reshape(4).unbind()
    x = torch.arange(width, dtype=torch.float32) + 0.5
    y = torch.arange(height, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(y, x, indexing="ij")
    d = torch.stack([(gx - cx) / fx, (gy - cy) / fy, torch.ones_like(gx)], dim=-1)
    return d / d.norm(dim=-1, keepdim=True)


def fold(x: torch.Tensor, cell: int = CELL) -> torch.Tensor:
    """[F, H, W, C] -> [C·cell², F, H/cell, W/cell]; channel c·cell² + r·cell + s holds pixel
    (row·cell + r, col·cell + s) of channel c (upstream: 'f (h c1) (w c2) c -> (c c1 c2) f h w')."""
    f, h, w, c = x.shape
    if h % cell or w % cell:
        raise ValueError(f"fold: height {h} and width {w} must be multiples of {cell}")
    x = x.reshape(f, h // cell, cell, w // cell, cell, c)
    return x.permute(5, 2, 4, 0, 1, 3).reshape(c * cell * cell, f, h // cell, w // cell)


# ----------------------------------------------------------------------------------------------------
# The whole conditioning tensor

def camera_condition(poses, intrinsics, frame_num: int, height: int, width: int, actions=None,
                     *, truncate: bool = True, pose_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Camera (6·64 = 384 ch) or action (7·64 = 448 ch) conditioning, float32 [C·64, lat_f, H/8, W/8].

    poses [N,4,4] camera-to-world; intrinsics [M,4] or [4] (row 0 used, for a 480×832 image);
    actions [K,4] WASD switches Act mode on (rows 0, 4, 8, … are used). With `truncate` (pose files)
    the clip is cut to `usable_frames(N, frame_num)` frames, so lat_f may be smaller than frame_num asks:
    read it from the result's shape[1]. Keyboard trajectories (N+1 poses for N = frame_num key frames)
    pass truncate=False: upstream interpolates all N+1 poses onto the (frame_num−1)//4 + 1 latent frames.

    `pose_dtype` is the precision of the relative-pose step. float32 (default) is what upstream does; it
    loses digits when the camera sits far from the world origin and moves little (the shared example, at
    ~166 units from the origin over 17 frames: up to 0.5% of the normalized translation). float64 gives
    the exact values. Both are of the order of the bf16 rounding (0.4%) the model input gets afterwards.
    """
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or len(poses) < 1:
        raise ValueError(f"poses: expected shape [N, 4, 4], found {list(poses.shape)}")
    _check_poses(poses)
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    if intrinsics.ndim == 1:
        intrinsics = intrinsics[None]
    if intrinsics.ndim != 2 or intrinsics.shape[1] != 4 or len(intrinsics) < 1:
        raise ValueError(f"intrinsics: expected shape [N, 4] or [4] (fx, fy, cx, cy), found {list(intrinsics.shape)}")
    _check_intrinsics(intrinsics[:1])
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % CELL:
            raise ValueError(f"{name} must be a positive multiple of {CELL}, got {v}")
    if frame_num < 1:
        raise ValueError(f"frame_num must be >= 1, got {frame_num}")

    if truncate:
        frames = usable_frames(len(poses), frame_num)
        poses = poses[:frames]
        lat_f = latent_frames(frames)
    else:
        lat_f = latent_frames(len(poses))
        if lat_f != latent_frames(frame_num):
            raise ValueError(f"{len(poses)} poses give {lat_f} latent frames but frame_num {frame_num} needs "
                             f"{latent_frames(frame_num)}")

    act = None
    if actions is not None:
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2 or actions.shape[1] != 4:
            raise ValueError(f"actions: expected shape [N, 4] (W, A, S, D), found {list(actions.shape)}")
        _check_actions(actions)
        act = torch.from_numpy(actions[: TEMPORAL_STRIDE * (lat_f - 1) + 1 : TEMPORAL_STRIDE].copy())
        if len(act) != lat_f:
            raise ValueError(f"actions: {len(actions)} rows, need at least {TEMPORAL_STRIDE * (lat_f - 1) + 1} "
                             f"(one per video frame) for {lat_f} latent frames")

    c2w = torch.from_numpy(interpolate_poses(poses, lat_f)).to(pose_dtype)
    rel = relative_framewise(c2w).float()
    return plucker_frames(rel, intrinsics[0], height, width, act)


def plucker_frames(rel: torch.Tensor, intrinsics, height: int, width: int, actions: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Per latent frame motions `rel` [n, 4, 4] (framewise, normalized: `relative_framewise`) -> the folded
    conditioning [C·64, n, H/8, W/8]: Cam cat(translation, rays_d), Act cat(rays_d, WASD `actions` [n, 4])."""
    rel = rel.float()
    dirs = ray_directions(scale_intrinsics(intrinsics, height, width), height, width)
    channels = 7 if actions is not None else 6
    out = torch.empty(channels * CELL * CELL, len(rel), height // CELL, width // CELL)
    for i in range(len(rel)):  # one latent frame at a time: peak memory is one frame's [H, W, C]
        rays_d = dirs @ rel[i, :3, :3].T
        if actions is not None:
            emb = torch.cat([rays_d, actions[i].expand(height, width, 4)], dim=-1)
        else:
            emb = torch.cat([rel[i, :3, 3].expand(height, width, 3), rays_d], dim=-1)
        out[:, i] = fold(emb[None])[:, 0]
    return out


# ----------------------------------------------------------------------------------------------------
# Keyboard strings

def _clip(text: str, limit: int = 40) -> str:
    """repr of `text`, cut for an error message."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def parse_action_string(action_string: str) -> list[frozenset[str]]:
    """"w-10,iw-15,none-10" -> one frozenset of pressed keys per frame (35 here).

    Segments are `<keys>-<frames>` separated by commas (full-width commas and whitespace are tolerated);
    keys are any of w a s d i j k l (case-insensitive) or `none`.
    """
    s = "".join(str(action_string).replace("，", ",").split())
    if not s:
        raise ValueError("action string is empty; expected e.g. 'w-10,iw-15,none-10'")
    parts: list[tuple[frozenset[str], int]] = []
    total = 0
    for part in s.split(","):
        if not part:
            raise ValueError(f"action string {_clip(action_string)} has an empty segment (check the commas)")
        keys, sep, count = part.rpartition("-")
        if not sep or not keys:
            raise ValueError(f"segment {_clip(part)}: expected <keys>-<frames>, e.g. 'w-10' or 'none-5'")
        digits = count.lstrip("0")
        if not (count.isascii() and count.isdigit()) or not digits:
            raise ValueError(f"segment {_clip(part)}: frame count {_clip(count, 20)} is not a positive integer")
        if len(digits) > _MAX_COUNT_DIGITS or total + int(digits) > MAX_KEY_FRAMES:
            raise ValueError(f"spells out more than {MAX_KEY_FRAMES} frames (the longest clip); "
                             f"segment {_clip(part)} goes past it")
        total += int(digits)
        keys = keys.lower()
        if keys == "none":
            pressed = frozenset()
        else:
            for k in keys:
                if k not in ACTION_KEYS:
                    raise ValueError(f"segment {_clip(part)}: unknown key {k!r}; allowed: w a s d i j k l, or "
                                     "'none'")
            pressed = frozenset(keys)
        parts.append((pressed, int(digits)))
    return [pressed for pressed, n in parts for _ in range(n)]   # expanded only once the total is known


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def _flat_unit(v: np.ndarray) -> np.ndarray:
    """v with its y (down) component dropped, scaled to ~unit length as upstream does (÷ (norm + 1e-6))."""
    flat = np.array([v[0], 0.0, v[2]])
    n = np.linalg.norm(flat)
    return flat / (n + 1e-6) if n > 0 else flat


def trajectory_from_actions(frame_keys: Sequence[Iterable[str]], num_frames: int | None = None) -> np.ndarray:
    """Integrate per-frame keys into camera-to-world poses [num_frames + 1, 4, 4] (float64, OpenCV axes).

    `num_frames` (default: len(frame_keys) padded to 4n+1) must be 4n+1 and >= len(frame_keys); extra frames
    press nothing. Pose 0 is the identity. Each frame: pitch (I up / K down, about the camera x axis,
    applied on the right) unless it would pass ±85°, yaw (J left / L right, about the world y axis,
    applied on the left), then W/S/A/D move 0.05 along the new forward / right axes flattened onto the
    horizontal plane.
    """
    frame_keys = [frozenset(str(k).lower() for k in keys) for keys in frame_keys]
    for i, keys in enumerate(frame_keys):
        for k in keys:
            if k not in ACTION_KEYS:
                raise ValueError(f"frame {i}: unknown key {k!r}; allowed: w a s d i j k l")
    if num_frames is None:
        num_frames = pad_to_4n_plus_1(max(len(frame_keys), 1))
    if num_frames < len(frame_keys):
        raise ValueError(f"{len(frame_keys)} key frames do not fit in num_frames={num_frames}")
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"num_frames must be 4n+1, got {num_frames}")
    frame_keys = frame_keys + [frozenset()] * (num_frames - len(frame_keys))

    pose, pitch = np.eye(4), 0.0
    out = [pose]
    for keys in frame_keys:
        pose, pitch = step_pose(pose, pitch, keys)
        out.append(pose)
    return np.stack(out)


def step_pose(pose: np.ndarray, pitch: float, keys: Iterable[str], look: tuple[float, float] = (0.0, 0.0)
              ) -> tuple[np.ndarray, float]:
    """One video frame of keyboard (and mouse) control: (pose [4, 4] camera-to-world, pitch in radians) after
    pressing `keys` for a frame, plus `look` = (yaw, pitch) degrees of mouse motion (right and up positive).

    Pitch (I up / K down, about the camera x axis, applied on the right) unless it would pass ±85°, yaw (J
    left / L right, about the world y axis, applied on the left), then W/S/A/D move 0.05 along the new
    forward / right axes flattened onto the horizontal plane."""
    keys = frozenset(keys)
    step, limit = np.deg2rad(ROTATE_SPEED_DEG), np.deg2rad(PITCH_LIMIT_DEG)
    d_pitch = step * (("i" in keys) - ("k" in keys)) + np.deg2rad(look[1])
    if -limit <= pitch + d_pitch <= limit:
        pitch += d_pitch
    else:
        d_pitch = 0.0
    d_yaw = step * (("l" in keys) - ("j" in keys)) + np.deg2rad(look[0])
    R = _rot_y(d_yaw) @ pose[:3, :3] @ _rot_x(d_pitch)
    forward, right = _flat_unit(R[:, 2]), _flat_unit(R[:, 0])
    move = np.zeros(3)
    move += MOVE_SPEED * forward * (("w" in keys) - ("s" in keys))
    move += MOVE_SPEED * right * (("d" in keys) - ("a" in keys))
    out = np.eye(4)
    out[:3, :3] = R
    out[:3, 3] = pose[:3, 3] + move
    return out, pitch


def action_string_condition(action_string: str, height: int, width: int, frame_num: int | None = None,
                            intrinsics=None) -> torch.Tensor:
    """Camera conditioning (6·64 ch, for a Cam model) from a keyboard string.

    frame_num (default: the string's length padded to 4n+1) must be 4n+1 and at least the string's
    length; intrinsics default to DEFAULT_INTRINSICS (a 480×832 camera).
    """
    keys = parse_action_string(action_string)
    if frame_num is None:
        frame_num = pad_to_4n_plus_1(len(keys))
    if frame_num < len(keys):
        raise ValueError(f"action string expands to {len(keys)} frames but frame_num is {frame_num}")
    poses = trajectory_from_actions(keys, frame_num)
    k = DEFAULT_INTRINSICS if intrinsics is None else intrinsics
    return camera_condition(poses, k, frame_num, height, width, truncate=False)
