"""Procedural world renderer: determinism, scene layout, and that the camera moves the picture the way the
OpenCV pose convention says it should (W: the world comes closer, J: the image slides right, I: more sky).
Small images on CPU; the whole file takes a few seconds."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from worldstream.models import camera as cam
from worldstream.world import action_keys, intersect_boxes, make_scene, random_actions, render, render_clip
from worldstream.world.scene import BOX_DISTANCE, GROUND_Y, NUM_BOXES, SEGMENT_FRAMES

H, W = 96, 160          # render size for the motion tests
SMALL_H, SMALL_W = 48, 80


def trajectory(keys: str, num_frames: int | None = None) -> np.ndarray:
    return cam.trajectory_from_actions(cam.parse_action_string(keys), num_frames)


def with_boxes(scene, box_min=(), box_max=()):
    """The scene with its boxes replaced (none by default)."""
    lo = torch.tensor(box_min, dtype=torch.float32).reshape(-1, 3)
    hi = torch.tensor(box_max, dtype=torch.float32).reshape(-1, 3)
    return dataclasses.replace(scene, box_min=lo, box_max=hi, box_color=torch.full_like(lo, 0.5))


def intrinsics(height=H, width=W):
    return cam.scale_intrinsics(cam.DEFAULT_INTRINSICS, height, width).tolist()


def best_shift(a: torch.Tensor, b: torch.Tensor, dys, dxs, margin: int = 8) -> tuple[int, int]:
    """(dy, dx) minimising the mean |b(y + dy, x + dx) − a(y, x)| over a's interior: how far content in
    image a [3, h, w] moved to reach image b. A brute-force cross-correlation."""
    h, w = a.shape[-2:]
    best, arg = math.inf, None
    for dy in dys:
        for dx in dxs:
            ref = a[:, margin:h - margin, margin:w - margin]
            moved = b[:, margin + dy:h - margin + dy, margin + dx:w - margin + dx]
            err = (moved - ref).abs().mean().item()
            if err < best:
                best, arg = err, (dy, dx)
    return arg


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Render on one CPU thread: these images are small, and a shared CPU (another process busy) makes
    torch's multi-threaded small ops stall in OpenMP barriers, 10x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# Clips: shapes, range, determinism

@pytest.fixture(scope="module")
def clip():
    return render_clip(3, num_frames=9, height=SMALL_H, width=SMALL_W)


def test_clip_shapes_and_range(clip):
    assert clip["frames"].shape == (9, 3, SMALL_H, SMALL_W) and clip["frames"].dtype == torch.float32
    assert torch.isfinite(clip["frames"]).all()
    assert clip["frames"].min() >= -1 and clip["frames"].max() <= 1
    assert clip["frames"].std() > 0.1                                   # not a blank image
    assert clip["poses"].shape == (10, 4, 4)                            # num_frames + 1: the full trajectory
    np.testing.assert_array_equal(clip["poses"], cam.trajectory_from_actions(clip["actions"], 9))
    assert torch.equal(clip["intrinsics"], torch.from_numpy(cam.DEFAULT_INTRINSICS))
    assert len(clip["actions"]) == 9 and clip["wasd"].shape == (9, 4)
    assert isinstance(clip["prompt"], str) and clip["prompt"].startswith("a ")


def test_same_seed_same_clip(clip):
    again = render_clip(3, num_frames=9, height=SMALL_H, width=SMALL_W)
    assert torch.equal(again["frames"], clip["frames"])
    np.testing.assert_array_equal(again["poses"], clip["poses"])
    assert again["actions"] == clip["actions"] and again["prompt"] == clip["prompt"]


def test_different_seeds_different_worlds():
    a, b = make_scene(0), make_scene(1)
    assert a.box_min.shape != b.box_min.shape or not torch.equal(a.box_min, b.box_min)
    assert not torch.equal(a.sky_zenith, b.sky_zenith)
    fa, fb = (render(s, np.eye(4), height=SMALL_H, width=SMALL_W) for s in (a, b))
    assert (fa - fb).abs().mean() > 0.05


def test_clip_frames_follow_the_given_actions():
    out = render_clip(0, num_frames=5, height=24, width=40, actions="w-2,j-2")
    assert out["actions"] == [frozenset("w")] * 2 + [frozenset("j")] * 2 + [frozenset()]
    assert out["wasd"][:, 0].tolist() == [1, 1, 0, 0, 0]
    expected = render(make_scene(0), out["poses"][:5], cam.DEFAULT_INTRINSICS, 24, 40)
    assert torch.equal(out["frames"], expected)


def test_prompt_picks_time_of_day_and_ground():
    assert make_scene(5, "a village at night").time_of_day == "night"
    scene = make_scene(5, "Sunset over the desert")
    assert (scene.time_of_day, scene.ground_style) == ("dusk", "sand")
    assert "dusk" in scene.describe() and "sandy" in scene.describe()
    assert make_scene(5, "a foggy morning").describe().startswith("a foggy dawn")
    assert make_scene(5, "overcast noon on the grass, grey blocks").describe().startswith(
        "a cloudy noon grassy field with grey")
    # The prompt changes only what it names: the box layout still comes from the seed.
    assert torch.equal(make_scene(5, "noon").box_min, make_scene(5, "dawn").box_min)


# ----------------------------------------------------------------------------------------------------
# Scene layout and geometry

@pytest.mark.parametrize("seed", range(8))
def test_boxes_stand_on_the_ground_around_the_start(seed):
    scene = make_scene(seed)
    lo, hi = scene.box_min, scene.box_max
    assert NUM_BOXES[0] <= len(lo) <= NUM_BOXES[1]
    assert (hi > lo).all() and torch.all(hi[:, 1] == GROUND_Y)
    # Each footprint's circumscribed circle lies 3..40 from the start (x, z) = (0, 0) ...
    centre, size = (lo + hi)[:, [0, 2]] / 2, (hi - lo)[:, [0, 2]]
    circle = centre.norm(dim=-1) - size.norm(dim=-1) / 2
    assert circle.min() >= BOX_DISTANCE[0] - 1e-4 and circle.max() <= BOX_DISTANCE[1] + 1e-4
    # ... so no box comes nearer than 3: the nearest point of each footprint.
    gap = torch.stack([lo[:, 0].clamp(min=0) - hi[:, 0].clamp(max=0), lo[:, 2].clamp(min=0) - hi[:, 2].clamp(max=0)])
    assert gap.norm(dim=0).min() >= BOX_DISTANCE[0] - 1e-4


def test_intersect_boxes_slab_method():
    lo, hi = torch.tensor([[-1.0, -1.0, 4.0]]), torch.tensor([[1.0, 1.0, 6.0]])
    origins = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0], [3.0, 0.0, 5.0]])
    dirs = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    t, index, normal = intersect_boxes(origins, dirs, lo, hi)
    assert t.tolist() == [4.0, math.inf, math.inf, 2.0]                 # hit, miss, inside (unseen), side hit
    assert index.tolist() == [0, -1, -1, 0]
    assert normal.tolist() == [[0, 0, -1], [0, 0, 0], [0, 0, 0], [1, 0, 0]]


def test_render_accepts_numpy_and_torch_poses():
    scene, poses = make_scene(2), trajectory("wl-4", 5)[:5]
    a = render(scene, poses, height=24, width=40)
    b = render(scene, torch.from_numpy(poses), height=24, width=40)
    assert torch.equal(a, b) and a.shape == (5, 3, 24, 40)


# ----------------------------------------------------------------------------------------------------
# Camera motion seen in the pictures

def test_sky_above_the_horizon_ground_below():
    scene = with_boxes(make_scene(4))
    _, depth = render(scene, np.eye(4), height=H, width=W, supersample=1, return_depth=True)
    cy = intrinsics()[3]
    rows = torch.arange(H) + 0.5
    assert torch.isinf(depth[0, rows < cy]).all()                       # looking level: sky above cy ...
    assert torch.isfinite(depth[0, rows > cy]).all()                    # ... ground below
    # Ground distance along the centre column matches the plane y = GROUND_Y seen from height 0.
    r = H - 1
    fy = intrinsics()[1]
    slope = (r + 0.5 - cy) / fy
    expected = GROUND_Y / slope * math.sqrt(1 + slope ** 2 + ((W // 2 + 0.5 - intrinsics()[2]) / intrinsics()[0]) ** 2)
    assert depth[0, r, W // 2].item() == pytest.approx(expected, rel=1e-4)


def test_pitch_up_shows_more_sky():
    poses = trajectory("i-8", 9)
    _, depth = render(with_boxes(make_scene(4)), poses[[0, 8]], height=H, width=W, supersample=1, return_depth=True)
    sky = torch.isinf(depth).float().mean(dim=(1, 2))
    fx, fy, cx, cy = intrinsics()
    horizon_row = cy + fy * math.tan(math.radians(8 * cam.ROTATE_SPEED_DEG))
    assert sky[0].item() == pytest.approx(round(cy) / H, abs=0.02)
    assert sky[1].item() == pytest.approx(round(horizon_row) / H, abs=0.02)
    # With boxes in the way too, and pitching down shows less.
    _, depth = render(make_scene(4), trajectory("i-8,k-16", 25)[[0, 8, 24]], height=H, width=W, return_depth=True)
    sky = torch.isinf(depth).float().mean(dim=(1, 2))
    assert sky[1] > sky[0] > sky[2]


def test_walking_forward_box_in_front_grows():
    scene = make_scene(6)
    # A 1-wide, 2.5-tall box straight ahead; its top is above the camera, so only the front face shows.
    front, half, top = 5.5, 0.5, GROUND_Y - 2.5
    box = with_boxes(scene, [-half, top, front], [half, GROUND_Y, front + 1])
    poses = trajectory("w-16", 17)[[0, 16]]
    _, with_box = render(box, poses, height=H, width=W, supersample=1, return_depth=True)
    _, without = render(with_boxes(scene), poses, height=H, width=W, supersample=1, return_depth=True)
    mask = with_box < without - 1e-4                                     # pixels where the box is seen
    fx, fy, cx, cy = intrinsics()
    areas = []
    for i in range(2):
        z = front - poses[i][2, 3]                                      # depth of the front face
        expected_area = (2 * half * fx / z) * ((GROUND_Y - top) * fy / z)
        areas.append(mask[i].sum().item())
        assert areas[-1] == pytest.approx(expected_area, rel=0.1)
        # Its centre is where the projection of the face centre says.
        rows, cols = mask[i].nonzero().float().T + 0.5
        assert cols.mean().item() == pytest.approx(cx, abs=1.0)
        assert rows.mean().item() == pytest.approx(cy + fy * (GROUND_Y + top) / 2 / z, abs=1.0)
    z0, z1 = front, front - poses[1][2, 3]
    assert areas[1] / areas[0] == pytest.approx((z0 / z1) ** 2, rel=0.1)


def test_walking_forward_ground_moves_down_and_out_sky_stays():
    scene = with_boxes(make_scene(0))
    frames = render(scene, trajectory("w-8", 9)[[0, 8]], height=H, width=W)
    cx, cy = intrinsics()[2], intrinsics()[3]
    above = int(cy) - 1                                                 # rows fully above the horizon
    assert torch.equal(frames[0, :, :above], frames[1, :, :above])      # the sky is infinitely far
    assert (frames[0, :, int(cy) + 1:] - frames[1, :, int(cy) + 1:]).abs().mean() > 0.01
    low = slice(int(cy) + H // 6, H)                                    # ground well below the horizon
    left, right = slice(0, int(cx)), slice(int(cx), W)
    dy_l, dx_l = best_shift(frames[0, :, low, left], frames[1, :, low, left], range(-2, 9), range(-8, 9))
    dy_r, dx_r = best_shift(frames[0, :, low, right], frames[1, :, low, right], range(-2, 9), range(-8, 9))
    assert dy_l > 0 and dy_r > 0                                        # downward ...
    assert dx_l < 0 < dx_r                                              # ... and outward


@pytest.mark.parametrize("key,sign", [("j", +1), ("l", -1)])
def test_turning_shifts_the_image(key, sign):
    """J (yaw left) slides the picture right by about fx·tan(2°) per frame; L slides it left."""
    frames = render(make_scene(1), trajectory(f"{key}-3", 5)[:4], height=H, width=W)
    expected = intrinsics()[0] * math.tan(math.radians(cam.ROTATE_SPEED_DEG))
    for i in range(3):
        dy, dx = best_shift(frames[i], frames[i + 1], [0], range(-8, 9))
        assert dx * sign > 0 and abs(abs(dx) - expected) <= 1


# ----------------------------------------------------------------------------------------------------
# Resolution and supersampling

def test_supersampling_is_the_average_of_the_finer_image():
    scene, poses = make_scene(2), trajectory("w-4", 5)[[0, 4]]
    fine = render(scene, poses, height=H, width=W, supersample=1)
    coarse = render(scene, poses, height=SMALL_H, width=SMALL_W, supersample=2)
    torch.testing.assert_close(coarse, torch.nn.functional.avg_pool2d(fine, 2), atol=1e-5, rtol=0)


def test_two_resolutions_agree_after_downsampling():
    scene, poses = make_scene(2), trajectory("jw-6", 9)[[0, 8]]
    fine = render(scene, poses, height=H, width=W)
    coarse = render(scene, poses, height=SMALL_H, width=SMALL_W)
    assert (torch.nn.functional.avg_pool2d(fine, 2) - coarse).abs().mean() < 0.03


# ----------------------------------------------------------------------------------------------------
# Random keyboard schedules

def test_random_actions():
    a = random_actions(11, 401)
    assert a == random_actions(11, 401) and a != random_actions(12, 401)
    assert len(a) == 401 and all(keys <= set("wasdijkl") for keys in a)
    segments = [int(part.rpartition("-")[2]) for part in action_keys(a).split(",")]
    assert sum(segments) == 401 and max(segments) <= 2 * SEGMENT_FRAMES[1]  # equal neighbours may merge
    assert np.mean(["w" in keys for keys in a]) > 0.4                    # mostly walking forward
    assert np.mean([bool(keys & {"j", "l"}) for keys in a]) > 0.15       # and turning
    pitch = np.cumsum([("i" in keys) - ("k" in keys) for keys in a])
    assert np.abs(pitch).max() <= 10
    poses = cam.trajectory_from_actions(a, 401)                          # drives the camera code as is
    assert poses.shape == (402, 4, 4)
