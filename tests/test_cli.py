"""`worldstream generate` / `worldstream demo`: bad input gets one clear error line and exit code 2 before
anything is loaded; frame counts are rounded to 4n+1 with a notice; the demo writes a playable MP4."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worldstream.cli import main
from worldstream.pipelines.tasks import GenerationError, _parse_size
from worldstream.pipelines.video import mp4_info, read_mp4
from worldstream.testing import demo_image, write_tiny_checkpoint

DATA = Path("/work/shared/data/camera/00")
needs_data = pytest.mark.skipif(not (DATA / "poses.npy").is_file(), reason="shared example trajectory missing")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Prompt cache and default outputs/ inside the test's temp folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Tiny LingBot-Cam and Wan2.1 T2V checkpoints, a first-frame image and a valid action folder."""
    root = tmp_path_factory.mktemp("cli")
    cam = write_tiny_checkpoint(root / "cam", "lingbot-cam-tiny")
    t2v = write_tiny_checkpoint(root / "t2v", "wan2.1-t2v-1.3b-tiny")
    image = root / "first.png"
    demo_image(48, 32).save(image)
    actions = root / "actions"
    actions.mkdir()
    rng = np.random.default_rng(0)
    np.save(actions / "poses.npy", np.tile(np.eye(4, dtype=np.float32), (9, 1, 1)) +
            np.pad(rng.normal(size=(9, 3, 1)).astype(np.float32), ((0, 0), (0, 1), (3, 0))))
    np.save(actions / "intrinsics.npy", np.tile(np.float32([500, 500, 416, 240]), (9, 1)))
    return {"cam": cam, "t2v": t2v, "image": image, "actions": actions, "root": root}


def cam_args(base, *extra, ckpt=None):
    return ["generate", "--ckpt_dir", str(ckpt or base["cam"]), "--prompt", "a forest path",
            "--image", str(base["image"]), "--size", "48*32", "--sample_steps", "2", "--no_prompt_cache", *extra]


def fails(args, capsys, *needles):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("worldstream: error: "), err
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert "Traceback" not in err
    return line


# ---- checkpoint folder -----------------------------------------------------------------------------------

def broken_copy(base, tmp_path, remove: str) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base["cam"], ckpt)
    target = ckpt / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return ckpt


def test_missing_checkpoint_folder(base, capsys, tmp_path):
    fails(cam_args(base, ckpt=tmp_path / "nowhere"), capsys, "nowhere", "no such folder")


@pytest.mark.parametrize("remove,needle", [
    ("high_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002"),
    ("low_noise_model", "low_noise_model/"),
    ("Wan2.1_VAE.pth", "Wan2.1_VAE.pth"),
    ("models_t5_umt5-xxl-enc-bf16.pth", "models_t5_umt5-xxl-enc-bf16.pth"),
    ("google/umt5-xxl", "google/umt5-xxl/"),
])
def test_missing_checkpoint_part_is_named(base, capsys, tmp_path, remove, needle):
    fails(cam_args(base, ckpt=broken_copy(base, tmp_path, remove)), capsys, needle)


def test_wan21_i2v_without_its_clip_file_is_refused(capsys, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "i2v", "wan2.1-i2v-14b-tiny")
    (ckpt / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth").unlink()
    fails(["generate", "--ckpt_dir", str(ckpt), "--prompt", "x", "--image", "x.png"], capsys,
          "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "CLIP image encoder")


def test_task_must_match_the_checkpoint(base, capsys):
    fails(cam_args(base, "--task", "t2v-1.3B"), capsys, "--task t2v-1.3B", "lingbot-cam-tiny", "i2v-A14B")
    fails(cam_args(base, "--task", "t2v-A14B"), capsys, "t2v-A14B", "not supported yet")


# ---- inputs ---------------------------------------------------------------------------------------------------

def test_image_problems(base, capsys, tmp_path):
    args = cam_args(base)
    i = args.index("--image")
    fails(args[:i + 1] + [str(tmp_path / "missing.png")] + args[i + 2:], capsys, "missing.png", "no such file")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    fails(args[:i + 1] + [str(bad)] + args[i + 2:], capsys, "notes.png", "cannot read it as an image")
    fails(args[:i] + args[i + 2:], capsys, "--image is required")
    fails(["generate", "--ckpt_dir", str(base["t2v"]), "--prompt", "x", "--image", str(base["image"])], capsys,
          "takes no --image")


def test_size_problems(base, capsys):
    fails(cam_args(base, "--size", "50*32"), capsys, "--size 50*32", "multiples of 16")
    with pytest.raises(GenerationError, match=r"--size 640\*360 is not supported for i2v-A14B; supported: "
                                              r"720\*1280, 1280\*720, 480\*832, 832\*480"):
        _parse_size("640*360", "i2v-A14B", tiny=False)
    with pytest.raises(GenerationError, match="not supported for t2v-1.3B"):
        _parse_size("1280*720", "t2v-1.3B", tiny=False)
    assert _parse_size("1280*720", "i2v-A14B", tiny=False) == (1280, 720)


def test_bad_flag_values(base, capsys):
    fails(cam_args(base, "--frame_num", "0"), capsys, "--frame_num", "4n+1")
    fails(cam_args(base, "--vram", "lots"), capsys, "--vram", "lots")
    fails(cam_args(base, "--sample_steps", "0"), capsys, "--sample_steps")
    fails(cam_args(base, "--step_cache", "-0.1"), capsys, "--step_cache", "threshold from 0")
    fails(cam_args(base, "--step_cache", "nan"), capsys, "--step_cache")
    fails(cam_args(base, "--device", "cuda:7") if not _cuda() else cam_args(base, "--device", "tpu"), capsys,
          "--device")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def action_copy(base, tmp_path) -> Path:
    d = tmp_path / "actions"
    shutil.copytree(base["actions"], d)
    return d


def test_action_folder_problems(base, capsys, tmp_path):
    d = action_copy(base, tmp_path)
    (d / "intrinsics.npy").unlink()
    fails(cam_args(base, "--action_path", str(d)), capsys, "missing intrinsics.npy")

    d = action_copy(base, tmp_path / "b")
    np.save(d / "poses.npy", np.zeros((9, 3, 4), np.float32))
    fails(cam_args(base, "--action_path", str(d)), capsys, "poses.npy", "[N, 4, 4]", "[9, 3, 4]")

    d = action_copy(base, tmp_path / "c")
    poses = np.load(d / "poses.npy")
    poses[4, 0, 3] = np.nan
    np.save(d / "poses.npy", poses)
    fails(cam_args(base, "--action_path", str(d)), capsys, "poses.npy", "pose 4", "non-finite")

    d = action_copy(base, tmp_path / "d")
    k = np.load(d / "intrinsics.npy")
    k[0, 0] = 0
    np.save(d / "intrinsics.npy", k)
    fails(cam_args(base, "--action_path", str(d)), capsys, "intrinsics.npy", "focal length")

    fails(cam_args(base, "--action_path", str(tmp_path / "none")), capsys, "none", "does not exist")


def test_action_string_problems(base, capsys, tmp_path):
    fails(cam_args(base, "--action_string", "w-3,x-2"), capsys, "--action_string", "unknown key 'x'")
    fails(cam_args(base, "--action_string", "w-9", "--frame_num", "5"), capsys, "9 frames", "5")
    fails(["generate", "--ckpt_dir", str(base["t2v"]), "--prompt", "x", "--action_string", "w-4"], capsys,
          "--action_string", "no camera")


def test_no_traceback_from_the_real_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "worldstream.cli", "generate", "--ckpt_dir",
                          str(tmp_path / "absent"), "--prompt", "x"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == f"worldstream: error: --ckpt_dir {tmp_path / 'absent'}: no such folder"


# ---- runs ---------------------------------------------------------------------------------------------------

def test_frame_num_rounds_down_with_notice(base, capsys):
    code = main(cam_args(base, "--frame_num", "10", "--action_path", str(base["actions"]),
                         "--save_file", "out/ten.mp4"))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "note: --frame_num 10 is not 4n+1; generating 9 frames" in out.out
    assert "time: load" in out.out and "denoise" in out.out and "peak host RAM" in out.out
    assert read_mp4("out/ten.mp4").shape == (9, 32, 48, 3)
    assert sorted(p.name for p in Path("out").iterdir()) == ["ten.mp4"]


def test_t2v_command(base, capsys):
    code = main(["generate", "--task", "t2v-1.3B", "--ckpt_dir", str(base["t2v"]), "--prompt", "a red car",
                 "--size", "48*32", "--frame_num", "5", "--sample_steps", "2", "--base_seed", "3",
                 "--offload_model", "true", "--convert_model_dtype", "--t5_cpu", "--vae_cpu", "--vram", "8GB",
                 "--save_file", "t2v.mp4"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert read_mp4("t2v.mp4").shape == (5, 32, 48, 3)


def test_step_cache_flag_reports_its_skips(base, capsys):
    code = main(cam_args(base, "--frame_num", "9", "--sample_steps", "12", "--step_cache", "1.0",
                         "--save_file", "cached.mp4"))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "step cache (threshold 1): skipped " in out.out and " of 12 steps" in out.out
    assert read_mp4("cached.mp4").shape[0] == 9


def test_demo_writes_mp4(capsys):
    """`make demo` runs the shipped world model (here a short clip with few steps, to stay fast)."""
    assert main(["demo", "--action_string", "w-2,j-2", "--sample_steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "lingbot-cam-world" in out and "wrote outputs/demo.mp4" in out
    info = mp4_info("outputs/demo.mp4")
    assert (info["codec"], info["pix_fmt"], info["frames"], info["width"], info["height"], info["fps"]) == \
        ("h264", "yuv420p", 5, 160, 96, 16.0)
