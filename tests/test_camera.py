"""LingBot camera / action conditioning vs an independent numpy reference written from spec section 3."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from worldstream.models import camera as cam

DATA = Path("/work/shared/data/camera/00")
needs_data = pytest.mark.skipif(not (DATA / "poses.npy").is_file(), reason="shared example trajectory missing")


# ---------------------------------------------------------------------------------------------------
# Independent reference (numpy float64, own quaternion math, np.linalg.inv, strided-slice fold)

def mat2quat(R):
    """(w, x, y, z) of a rotation matrix (Shepperd's method), unit length."""
    tr = np.trace(R)
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = math.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2]) * 2
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] > R[2, 2]:
        s = math.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2]) * 2
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1]) * 2
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    return q / np.linalg.norm(q)


def quat2mat(q):
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def slerp(q0, q1, t):
    d = float(np.clip(np.dot(q0, q1), -1, 1))
    theta = math.acos(d)
    if theta < 1e-9:
        return q0
    return (math.sin((1 - t) * theta) * q0 + math.sin(t * theta) * q1) / math.sin(theta)


def ref_interp(poses, num):
    n = len(poses)
    quats = [mat2quat(p[:3, :3]) for p in poses]
    for i in range(1, n):
        if np.dot(quats[i], quats[i - 1]) < 0:
            quats[i] = -quats[i]
    out = []
    for x in np.linspace(0, n - 1, num):
        i = min(int(math.floor(x)), n - 2)
        a = x - i
        T = np.eye(4)
        T[:3, :3] = quat2mat(slerp(quats[i], quats[i + 1], a))
        T[:3, 3] = (1 - a) * poses[i, :3, 3] + a * poses[i + 1, :3, 3]
        out.append(T)
    return np.stack(out)


def ref_relative(c2w, normalize=True):
    rel = [np.eye(4)] + [np.linalg.inv(c2w[0]) @ c for c in c2w[1:]]
    d = np.stack([np.eye(4)] + [np.linalg.inv(rel[i - 1]) @ rel[i] for i in range(1, len(rel))])
    if normalize:
        m = np.linalg.norm(d[:, :3, 3], axis=-1).max()
        if m > 0:
            d[:, :3, 3] /= m
    return d


def ref_dirs(k, h, w):
    fx, fy, cx, cy = k[0] * w / 832, k[1] * h / 480, k[2] * w / 832, k[3] * h / 480
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    d = np.stack([(xs - cx) / fx, (ys - cy) / fy, np.ones_like(xs)], axis=-1)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def ref_fold(emb):
    f, h, w, c = emb.shape
    out = np.zeros((c * 64, f, h // 8, w // 8))
    for ch in range(c):
        for r in range(8):
            for s in range(8):
                out[ch * 64 + r * 8 + s] = emb[:, r::8, s::8, ch]
    return out


def ref_condition(poses, k, frame_num, h, w, actions=None, truncate=True):
    frames = min(frame_num, (len(poses) - 1) // 4 * 4 + 1) if truncate else len(poses)
    poses = poses[:frames]
    lat = (frames - 1) // 4 + 1
    d = ref_relative(ref_interp(poses, lat))
    dirs = ref_dirs(k[0], h, w)
    embs = []
    for i in range(lat):
        rays_d = dirs @ d[i, :3, :3].T
        if actions is not None:
            extra = np.broadcast_to(actions[4 * i], (h, w, 4))
            embs.append(np.concatenate([rays_d, extra], -1))
        else:
            embs.append(np.concatenate([np.broadcast_to(d[i, :3, 3], (h, w, 3)), rays_d], -1))
    return ref_fold(np.stack(embs))


def rot_z(deg):
    a = math.radians(deg)
    T = np.eye(4)
    T[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return T


def random_rigid(n, seed):
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    T = np.tile(np.eye(4), (n, 1, 1))
    T[:, :3, :3] = Rotation.random(n, random_state=seed).as_matrix()
    T[:, :3, 3] = rng.normal(size=(n, 3)) * 3
    return T


@pytest.fixture(scope="module")
def real():
    return cam.load_action_dir(DATA, mode="act")


# ---------------------------------------------------------------------------------------------------
# Loading

@needs_data
def test_load_real_dir(real):
    poses, k, a = real
    assert poses.shape == (961, 4, 4) and poses.dtype == np.float64
    assert k.shape == (961, 4) and a.shape == (961, 4) and a.dtype == np.float32
    assert np.array_equal(poses, np.load(DATA / "poses.npy").astype(np.float64))
    p2, k2, a2 = cam.load_action_dir(DATA)  # cam mode: no action
    assert a2 is None and np.array_equal(p2, poses) and np.array_equal(k2, k)


# ---------------------------------------------------------------------------------------------------
# Stages

def test_frame_counts():
    assert cam.usable_frames(961, 81) == 81
    assert cam.usable_frames(10, 81) == 9
    assert cam.usable_frames(12, 81) == 9
    assert cam.usable_frames(13, 81) == 13
    assert cam.usable_frames(1, 81) == 1
    assert cam.latent_frames(81) == 21 and cam.latent_frames(17) == 5 and cam.latent_frames(1) == 1
    assert [cam.pad_to_4n_plus_1(n) for n in (1, 2, 5, 6, 35, 37)] == [1, 5, 5, 9, 37, 37]


def test_interpolate_random_poses_vs_reference():
    poses = random_rigid(10, seed=0)
    # make neighbours close enough for an unambiguous shortest path
    poses[:, :3, :3] = np.stack([quat2mat(mat2quat(poses[0, :3, :3]) + 0.2 * i * np.array([0, 1, 0.5, -0.3]))
                                 for i in range(10)])
    out = cam.interpolate_poses(poses, 7)  # linspace(0, 9, 7): mostly between source frames
    np.testing.assert_allclose(out, ref_interp(poses, 7), atol=1e-9)
    # at source frames the poses come back unchanged
    np.testing.assert_allclose(cam.interpolate_poses(poses, 10), poses, atol=1e-9)


def test_interpolate_hand_values_shortest_arc():
    # z-rotations 170° then 340°: their canonical quaternions have a negative dot product (w = cos 85° vs
    # −cos 170°); interpolation must take the 170° arc, so the midpoint is 255°, not 75°.
    poses = np.stack([rot_z(170), rot_z(340)])
    poses[1, :3, 3] = [2.0, -4.0, 6.0]
    mid = cam.interpolate_poses(poses, 3)[1]
    np.testing.assert_allclose(mid[:3, :3], rot_z(255)[:3, :3], atol=1e-12)
    np.testing.assert_allclose(mid[:3, 3], [1.0, -2.0, 3.0], atol=1e-12)


@needs_data
def test_interpolate_real_vs_reference(real):
    poses = real[0][:37]
    out = cam.interpolate_poses(poses, 9)
    np.testing.assert_allclose(out, ref_interp(poses, 9), atol=2e-6)
    # 37 poses -> 10 targets at non-integer positions (the keyboard-trajectory case)
    np.testing.assert_allclose(cam.interpolate_poses(poses, 10), ref_interp(poses, 10), atol=2e-6)


def test_relative_framewise_vs_reference():
    poses = random_rigid(6, seed=1)
    out = cam.relative_framewise(torch.from_numpy(poses)).numpy()
    np.testing.assert_allclose(out, ref_relative(poses), atol=1e-12)
    assert np.array_equal(out[0], np.eye(4))
    assert math.isclose(np.linalg.norm(out[:, :3, 3], axis=-1).max(), 1.0, rel_tol=1e-12)
    # unnormalized deltas compose back to the trajectory: C0 · D1 · D2 · … = C_i
    raw = cam.relative_framewise(torch.from_numpy(poses), normalize=False).numpy()
    acc = poses[0]
    for i in range(1, 6):
        acc = acc @ raw[i]
        np.testing.assert_allclose(acc, poses[i], atol=1e-10)


def test_relative_framewise_static_camera_has_zero_translation():
    poses = np.tile(random_rigid(1, seed=2), (4, 1, 1))
    out = cam.relative_framewise(torch.from_numpy(poses).float())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.eye(4).expand(4, 4, 4), atol=1e-6, rtol=0)


@needs_data
def test_relative_framewise_real_vs_reference(real):
    c2w = cam.interpolate_poses(real[0][:81], 21)
    out = cam.relative_framewise(torch.from_numpy(c2w).float()).numpy()
    np.testing.assert_allclose(out, ref_relative(c2w), atol=5e-5)


def test_ray_directions():
    k = cam.scale_intrinsics([500.0, 500.0, 416.0, 240.0], 48, 104)
    torch.testing.assert_close(k, torch.tensor([62.5, 50.0, 52.0, 24.0]))
    d = cam.ray_directions(k, 48, 104)
    assert d.shape == (48, 104, 3) and d.dtype == torch.float32
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(48, 104))
    np.testing.assert_allclose(d.numpy(), ref_dirs(np.array([500.0, 500.0, 416.0, 240.0]), 48, 104), atol=1e-6)
    # the principal point (52, 24) lies on the corner between pixels (23, 51) and (24, 52): symmetric rays
    torch.testing.assert_close(d[23, 51] * torch.tensor([-1, -1, 1]), d[24, 52])
    assert (d[..., 2] > 0).all()


def test_fold_layout():
    x = torch.randn(3, 16, 24, 5)
    out = cam.fold(x)
    assert out.shape == (5 * 64, 3, 2, 3)
    np.testing.assert_array_equal(out.numpy(), ref_fold(x.numpy()))
    # one element by hand: channel c=2, cell offset (r=3, s=6), latent frame 1, cell (1, 2)
    assert out[2 * 64 + 3 * 8 + 6, 1, 1, 2] == x[1, 1 * 8 + 3, 2 * 8 + 6, 2]
    with pytest.raises(ValueError, match="multiples of 8"):
        cam.fold(torch.zeros(1, 12, 16, 1))


# ---------------------------------------------------------------------------------------------------
# Whole conditioning tensor

@needs_data
@pytest.mark.parametrize("frame_num,h,w", [(17, 48, 64), (81, 32, 48)])
def test_camera_condition_vs_reference(real, frame_num, h, w):
    poses, k, _ = real
    out = cam.camera_condition(poses, k, frame_num, h, w, pose_dtype=torch.float64)
    lat = (frame_num - 1) // 4 + 1
    assert out.shape == (384, lat, h // 8, w // 8) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref_condition(poses, k, frame_num, h, w), atol=1e-5)
    # rays_d occupy channels 192..383 and are unit vectors per pixel
    rays = out[192:].reshape(3, 64, lat, h // 8, w // 8)
    torch.testing.assert_close(rays.norm(dim=0), torch.ones(64, lat, h // 8, w // 8))
    # translation channels: latent frame 0 has none, and the largest per-frame norm is 1
    t = out[:192:64, :, 0, 0]
    assert torch.equal(t[:, 0], torch.zeros(3))
    assert abs(t.norm(dim=0).max().item() - 1) < 1e-6


@needs_data
def test_float32_pose_step_like_upstream(real):
    """Default: relative poses in float32 as upstream. The camera sits ~166 units from the origin and moves
    ~2e-3 per latent frame over 17 frames, so float32 cancellation shows in the normalized translation."""
    poses, k, _ = real
    out32 = cam.camera_condition(poses, k, 17, 16, 16)
    out64 = cam.camera_condition(poses, k, 17, 16, 16, pose_dtype=torch.float64)
    c2w = torch.from_numpy(cam.interpolate_poses(poses[:17], 5)).float()
    rel = cam.relative_framewise(c2w)
    assert torch.equal(out32[:192:64, :, 0, 0], rel[:, :3, 3].T)  # translation channels = float32 stage output
    diff = (out32 - out64).abs()
    assert diff[192:].max() < 1e-5          # rotations barely affected
    assert 1e-4 < diff[:192].max() < 1e-2   # translations: visible but small float32 error
    # over 81 frames the motion is large and the two agree closely
    torch.testing.assert_close(cam.camera_condition(poses, k, 81, 16, 16),
                               cam.camera_condition(poses, k, 81, 16, 16, pose_dtype=torch.float64),
                               atol=5e-5, rtol=0)


@needs_data
def test_act_condition_vs_reference(real):
    poses, k, a = real
    out = cam.camera_condition(poses, k, 17, 48, 64, actions=a)
    assert out.shape == (448, 5, 6, 8)
    np.testing.assert_allclose(out.numpy(), ref_condition(poses, k, 17, 48, 64, actions=a), atol=1e-5)
    # WASD channels are constant per latent frame and hold action rows 0, 4, 8, 12, 16
    wasd = out[192:].reshape(4, 64, 5, 6, 8)
    for i in range(5):
        assert torch.equal(wasd[:, :, i], torch.from_numpy(a[4 * i]).view(4, 1, 1, 1).expand(4, 64, 6, 8))
    # the rays_d part equals the Cam tensor's rays_d part
    torch.testing.assert_close(out[:192], cam.camera_condition(poses, k, 17, 48, 64)[192:])


@needs_data
def test_full_size_shape(real):
    poses, k, _ = real
    out = cam.camera_condition(poses[:17], k, 81, 480, 832)  # 17 poses -> the clip is cut to 17 frames
    assert out.shape == (384, 5, 60, 104)
    assert torch.isfinite(out).all()


@needs_data
def test_truncation_to_available_poses(real):
    poses, k, _ = real
    out = cam.camera_condition(poses[:12], k, 81, 16, 16)  # 12 poses -> 9 frames -> 3 latent frames
    assert out.shape[1] == 3
    torch.testing.assert_close(out, cam.camera_condition(poses[:9], k, 9, 16, 16))


def test_only_intrinsics_row_zero_is_used():
    poses = random_rigid(9, seed=5)
    k = np.array([[500.0, 480.0, 410.0, 250.0], [900.0, 900.0, 1.0, 1.0]])
    torch.testing.assert_close(cam.camera_condition(poses, k, 9, 16, 24),
                               cam.camera_condition(poses, k[0], 9, 16, 24))


# ---------------------------------------------------------------------------------------------------
# Keyboard strings

def test_parse_action_string():
    frames = cam.parse_action_string("w-10,iw-15,none-10")
    assert len(frames) == 35
    assert frames[0] == {"w"} and frames[9] == {"w"}
    assert frames[10] == {"i", "w"} and frames[24] == {"i", "w"}
    assert frames[25] == set() and frames[34] == set()
    assert cam.parse_action_string(" W-2 ， jl-1 ") == [{"w"}, {"w"}, {"j", "l"}]


@pytest.mark.parametrize("bad,match", [
    ("w-10,x-3", "unknown key 'x'"),
    ("wq-2", "unknown key 'q'"),
    ("w-0", "positive integer"),
    ("w-abc", "positive integer"),
    ("w10", "expected <keys>-<frames>"),
    ("w-2,,s-1", "empty segment"),
    ("  ", "empty"),
])
def test_parse_action_string_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        cam.parse_action_string(bad)


def test_trajectory_basics():
    keys = cam.parse_action_string("w-10,iw-15,none-10")
    poses = cam.trajectory_from_actions(keys)
    assert poses.shape == (38, 4, 4)  # 35 key frames padded to 37, plus the starting pose
    assert np.array_equal(poses[0], np.eye(4))
    np.testing.assert_allclose(poses[:, 3], np.tile([0, 0, 0, 1.0], (38, 1)))
    # flattened forward: looking up does not lift the camera, it keeps moving horizontally
    np.testing.assert_allclose(poses[:, 1, 3], 0, atol=1e-12)
    step = 0.05 / (1 + 1e-6)  # upstream divides by (norm + 1e-6)
    np.testing.assert_allclose(poses[10, :3, 3], [0, 0, 10 * step], atol=1e-12)
    np.testing.assert_allclose(poses[25, 2, 3], 25 * step, atol=1e-9)
    np.testing.assert_allclose(poses[26:, :3, 3], np.tile(poses[25, :3, 3], (12, 1)))  # no keys: no motion
    # 15 frames of I: 30° pitch up (OpenCV y points down, so the forward axis gets y = −sin 30°)
    np.testing.assert_allclose(poses[25, :3, 2], [0, -0.5, math.sqrt(3) / 2], atol=1e-12)


def test_trajectory_directions():
    P = lambda s: cam.trajectory_from_actions(cam.parse_action_string(s))  # noqa: E731
    step = 0.05 / (1 + 1e-6)
    np.testing.assert_allclose(P("d-1")[-1, :3, 3], [step, 0, 0], atol=1e-12)
    np.testing.assert_allclose(P("a-1")[-1, :3, 3], [-step, 0, 0], atol=1e-12)
    np.testing.assert_allclose(P("s-1")[-1, :3, 3], [0, 0, -step], atol=1e-12)
    # L for 45 frames = 90° yaw to the right: forward becomes +x, then W moves along +x
    p = P("l-45,w-4")
    np.testing.assert_allclose(p[-1, :3, 2], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(p[-1, :3, 3], [4 * step, 0, 0], atol=1e-9)
    np.testing.assert_allclose(P("j-45")[-1, :3, 2], [-1, 0, 0], atol=1e-12)


def test_trajectory_pitch_limit():
    def pitch_deg(pose):
        return math.degrees(math.asin(-pose[1, 2]))  # forward axis y = −sin(pitch)

    assert math.isclose(pitch_deg(cam.trajectory_from_actions(cam.parse_action_string("i-60"))[-1]), 84, abs_tol=1e-9)
    assert math.isclose(pitch_deg(cam.trajectory_from_actions(cam.parse_action_string("k-60"))[-1]), -84, abs_tol=1e-9)
    assert math.isclose(pitch_deg(cam.trajectory_from_actions(cam.parse_action_string("i-60,k-1"))[-1]), 82,
                        abs_tol=1e-9)


def test_trajectory_errors():
    with pytest.raises(ValueError, match="unknown key 'x'"):
        cam.trajectory_from_actions([{"w"}, {"x"}])
    with pytest.raises(ValueError, match="4n\\+1"):
        cam.trajectory_from_actions([{"w"}], num_frames=4)
    with pytest.raises(ValueError, match="do not fit"):
        cam.trajectory_from_actions([{"w"}] * 6, num_frames=5)
    assert cam.trajectory_from_actions([{"w"}] * 2, num_frames=9).shape == (10, 4, 4)


def test_action_string_condition_vs_reference():
    out = cam.action_string_condition("w-10,iw-15,none-10", 32, 48)
    assert out.shape == (384, 10, 4, 6)
    poses = cam.trajectory_from_actions(cam.parse_action_string("w-10,iw-15,none-10"))
    ref = ref_condition(poses, cam.DEFAULT_INTRINSICS[None].astype(np.float64), 37, 32, 48, truncate=False)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4)
    with pytest.raises(ValueError, match="35 frames but frame_num is 33"):
        cam.action_string_condition("w-10,iw-15,none-10", 32, 48, frame_num=33)


@needs_data
def test_default_intrinsics_are_example_row0():
    np.testing.assert_array_equal(cam.DEFAULT_INTRINSICS, np.load(DATA / "intrinsics.npy")[0])


# ---------------------------------------------------------------------------------------------------
# Bad input

@pytest.fixture
def small_dir(tmp_path):
    d = tmp_path / "act"
    d.mkdir()
    p = random_rigid(9, seed=3).astype(np.float32)
    np.save(d / "poses.npy", p)
    np.save(d / "intrinsics.npy", np.tile(cam.DEFAULT_INTRINSICS, (9, 1)))
    np.save(d / "action.npy", np.eye(4, dtype=np.int32)[np.arange(9) % 4])
    return d


def test_small_dir_loads(small_dir):
    poses, k, a = cam.load_action_dir(small_dir, "act")
    assert poses.shape == (9, 4, 4) and a.shape == (9, 4)
    assert cam.camera_condition(poses, k, 9, 16, 16, actions=a).shape == (448, 3, 2, 2)


@pytest.mark.parametrize("name,value,match", [
    ("poses.npy", np.zeros((9, 3, 4), np.float32), r"expected shape \[N, 4, 4\].*found \[9, 3, 4\]"),
    ("poses.npy", np.zeros((0, 4, 4), np.float32), r"found \[0, 4, 4\]"),
    ("intrinsics.npy", np.zeros((9, 3), np.float32), r"expected shape \[N, 4\].*found \[9, 3\]"),
    ("intrinsics.npy", np.tile([0.0, 500, 416, 240], (9, 1)), "focal length"),
    ("intrinsics.npy", np.tile([500.0, -5, 416, 240], (9, 1)), "focal length"),
    ("intrinsics.npy", np.tile([np.nan, 500, 416, 240], (9, 1)), "non-finite"),
    ("action.npy", np.zeros((9, 5), np.float32), r"expected shape \[N, 4\].*found \[9, 5\]"),
    ("action.npy", np.zeros((8, 4), np.float32), r"N >= 9.*found \[8, 4\]"),
    ("action.npy", np.full((9, 4), 2.0, np.float32), r"outside \[0, 1\]"),
    ("action.npy", np.full((9, 4), np.inf, np.float32), "non-finite"),
    ("action.npy", np.array(["w"] * 36).reshape(9, 4), "numeric"),
])
def test_bad_files(small_dir, name, value, match):
    np.save(small_dir / name, value)
    with pytest.raises(ValueError, match=match) as e:
        cam.load_action_dir(small_dir, "act")
    assert name in str(e.value)


def test_non_finite_and_improper_poses(small_dir):
    p = np.load(small_dir / "poses.npy")
    p[4, 0, 3] = np.nan
    np.save(small_dir / "poses.npy", p)
    with pytest.raises(ValueError, match="pose 4 has non-finite"):
        cam.load_action_dir(small_dir)
    p[4, 0, 3] = 0
    p[6, :3, :3] *= 3  # scaled, not a rotation
    np.save(small_dir / "poses.npy", p)
    with pytest.raises(ValueError, match="pose 6 has no proper rotation"):
        cam.load_action_dir(small_dir)


def test_missing_files(small_dir, tmp_path):
    (small_dir / "action.npy").unlink()
    cam.load_action_dir(small_dir, "cam")  # not needed for cam
    with pytest.raises(FileNotFoundError, match="missing action.npy"):
        cam.load_action_dir(small_dir, "act")
    (small_dir / "intrinsics.npy").unlink()
    (small_dir / "poses.npy").unlink()
    with pytest.raises(FileNotFoundError, match="missing poses.npy, intrinsics.npy"):
        cam.load_action_dir(small_dir, "cam")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cam.load_action_dir(tmp_path / "nope")
    with pytest.raises(ValueError, match="mode"):
        cam.load_action_dir(small_dir, "both")


def test_pickled_array_refused(small_dir):
    np.save(small_dir / "poses.npy", np.empty((9, 4, 4), dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="numeric"):
        cam.load_action_dir(small_dir)


def test_truncated_file(small_dir):
    raw = (small_dir / "poses.npy").read_bytes()
    (small_dir / "poses.npy").write_bytes(raw[:-40])
    with pytest.raises(ValueError, match="poses.npy"):
        cam.load_action_dir(small_dir)


def test_camera_condition_bad_args(small_dir):
    poses, k, a = cam.load_action_dir(small_dir, "act")
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        cam.camera_condition(poses, k, 9, 20, 16)
    with pytest.raises(ValueError, match="width"):
        cam.camera_condition(poses, k, 9, 16, 0)
    with pytest.raises(ValueError, match="need at least 9"):
        cam.camera_condition(poses, k, 9, 16, 16, actions=a[:5])
    with pytest.raises(ValueError, match=r"poses: expected shape \[N, 4, 4\]"):
        cam.camera_condition(poses[:, :3], k, 9, 16, 16)
    with pytest.raises(ValueError, match="focal length"):
        cam.camera_condition(poses, [0, 1, 2, 3], 9, 16, 16)
    with pytest.raises(ValueError, match="latent frames"):
        cam.camera_condition(poses, k, 17, 16, 16, truncate=False)
