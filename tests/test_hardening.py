"""Issue 14, as a hostile new user meets it: every bad input is refused up front with one `worldstream: error:`
line naming the culprit (exit code 2), no run is thrown away at the end (a failure after denoising keeps the
latents, `worldstream decode` finishes the video), and nothing is left behind by a kill.

Everything goes through the command line (`main`, or the real command in a subprocess where a signal, a
resource limit or a killed process is part of the story); the failures are real ones: a full disk is
RLIMIT_FSIZE (writes fail with EFBIG, as on a full file system), an unwritable folder is /proc, a kill is a kill.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from worldstream.cli import main
from worldstream.models.configs import get_config
from worldstream.pipelines.video import read_mp4
from worldstream.testing import demo_image, write_dit_dir, write_tiny_checkpoint

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    cam = write_tiny_checkpoint(root / "cam", "lingbot-cam-tiny")
    image = root / "first.png"
    demo_image(48, 32).save(image)
    actions = root / "actions"
    actions.mkdir()
    np.save(actions / "poses.npy", np.tile(np.eye(4, dtype=np.float32), (9, 1, 1)))
    np.save(actions / "intrinsics.npy", np.tile(np.float32([500, 500, 416, 240]), (9, 1)))
    return {"cam": cam, "image": image, "actions": actions, "root": root}


def gen(base, *extra, ckpt=None):
    return ["generate", "--ckpt_dir", str(ckpt or base["cam"]), "--prompt", "a forest path", "--image",
            str(base["image"]), "--size", "48*32", "--sample_steps", "2", "--frame_num", "5", "--no_prompt_cache",
            *extra]


def refused(args, capsys, *needles, code=2):
    """The command exits with `code` after one `worldstream: error:` line holding every needle, no traceback."""
    rc = main(args)
    out = capsys.readouterr()
    errors = [ln for ln in out.err.splitlines() if ln.startswith("worldstream: error:")]
    assert rc == code, out.err
    assert len(errors) == 1 and "Traceback" not in out.err, out.err
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    return errors[0], out.out


def copy_ckpt(base, tmp_path) -> Path:
    return Path(shutil.copytree(base["cam"], tmp_path / "ckpt"))


def cli_subprocess(*args, fsize: int | None = None, **kw) -> subprocess.CompletedProcess:
    """The real `worldstream` command in a fresh interpreter; `fsize` caps the size of every file it writes
    (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with EFBIG, as on a full disk)."""
    limit = (f"import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize})); ") if fsize else ""
    code = limit + "import sys; from worldstream.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- 1. late failures: checked before compute, or the latents are kept -------------------------------------

def _poison_safetensors(shard: Path, value: float) -> str:
    tensors = load_file(shard)
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[key].view(-1)[0] = value
    save_file(tensors, shard)
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_dit_weight_is_refused_while_loading(base, tmp_path, capsys, value):
    ckpt = copy_ckpt(base, tmp_path)
    shard = ckpt / "high_noise_model" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    key = _poison_safetensors(shard, value)
    line, out = refused(gen(base, "--save_file", "v.mp4", ckpt=ckpt), capsys, shard.name, key, "NaN or infinite")
    assert "time:" not in out and not Path("v.mp4").exists()


@pytest.mark.parametrize("name", ["Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"])
def test_nonfinite_vae_or_text_encoder_weight_is_refused(base, tmp_path, capsys, name):
    ckpt = copy_ckpt(base, tmp_path)
    sd = torch.load(ckpt / name, weights_only=True)
    key = sorted(sd)[0]
    sd[key].view(-1)[0] = float("nan")
    torch.save(sd, ckpt / name)
    refused(gen(base, "--save_file", "v.mp4", ckpt=ckpt), capsys, name, key, "NaN or infinite")
    assert not Path("v.mp4").exists()


def test_unwritable_target_is_refused_before_anything_runs(base, capsys):
    """/proc takes no new files, for root too (whom `os.access` would wave through)."""
    line, out = refused(gen(base, "--save_file", "/proc/worldstream-test.mp4"), capsys, "/proc",
                        "cannot write a file")
    assert "frames 48x32" not in out          # the job was never described: nothing was loaded or computed


@pytest.mark.parametrize("make,needle", [
    (lambda p: None, "is a folder"),                                  # a name ending in '/'
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.write_text("x") or None, None),                      # an existing file: replaced
])
def test_odd_save_file_paths(base, capsys, tmp_path, make, needle):
    target = tmp_path / "out.mp4"
    make(target)
    arg = str(target) + ("/" if needle == "is a folder" and not target.exists() else "")
    if needle is None:
        assert main(gen(base, "--save_file", arg)) == 0, capsys.readouterr().err
        assert read_mp4(target).shape[0] == 5
        return
    refused(gen(base, "--save_file", arg), capsys, "--save_file", needle)


def test_a_long_file_name_is_written(base, capsys, tmp_path):
    """A 250-byte name is valid, but its temp file's name used to pass the 255-byte limit at write time."""
    target = tmp_path / ("v" * 246 + ".mp4")
    assert main(gen(base, "--save_file", str(target))) == 0, capsys.readouterr().err
    assert read_mp4(target).shape[0] == 5 and hidden(tmp_path) == []


def test_full_disk_at_write_keeps_the_latents_and_decode_finishes(base, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "v.mp4"
    # 17 frames: latents 7.9 KB, the MP4 15.5 KB; files may grow to 10 KB, so the MP4's write fails mid-way
    r = cli_subprocess(*gen(base, "--save_file", str(target), "--frame_num", "17"), fsize=10_000, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("worldstream: error:")]
    assert "Traceback" not in r.stderr
    assert f"cannot write {target} (File too large)" in line and "worldstream decode --latents" in line
    kept = out / "v.latents.safetensors"
    assert str(kept) in line and not target.exists() and hidden(out) == []
    assert main(["decode", "--latents", str(kept)]) == 0, capsys.readouterr().err
    assert read_mp4(target).shape == (17, 32, 48, 3)


def test_a_diverging_run_stops_at_the_step(base, tmp_path, capsys):
    """Finite but absurd weights (1e30): the latents blow up at step 1, and the run stops there."""
    ckpt = copy_ckpt(base, tmp_path)
    for shard in (ckpt / "high_noise_model").glob("*.safetensors"):
        tensors = load_file(shard)
        if "head.head.weight" in tensors:
            tensors["head.head.weight"] = torch.full_like(tensors["head.head.weight"], 1e30)
            save_file(tensors, shard)
    line, out = refused(gen(base, "--save_file", "v.mp4", "--sample_steps", "20", ckpt=ckpt), capsys,
                        "of 20", "diverged")
    assert int(re.search(r"denoising step (\d+) of 20", line)[1]) <= 2      # not after the 20th
    assert "time:" not in out


def test_huge_guidance_is_refused(base, capsys):
    refused(gen(base, "--sample_guide_scale", "1e30"), capsys, "--sample_guide_scale", "between 0 and 100")
    refused(gen(base, "--sample_guide_scale", "5,1e9"), capsys, "--sample_guide_scale")


def test_an_unwritable_prompt_cache_is_a_warning(base, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    args = [a for a in gen(base, "--save_file", "v.mp4") if a != "--no_prompt_cache"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: prompt cache:" in err and "Traceback" not in err
    assert read_mp4("v.mp4").shape[0] == 5


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(base, capsys, monkeypatch):
    import worldstream.pipelines.tasks as tasks

    def broken(*a, **kw):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(tasks, "prepare", broken)
    line, _ = refused(gen(base), capsys, "unexpected RuntimeError: an internal bug", "--debug", code=1)
    assert main(gen(base, "--debug")) == 1
    assert "Traceback" in capsys.readouterr().err


def test_argparse_errors_are_one_line(base, capsys):
    refused(gen(base, "--frame_num", "lots"), capsys, "--frame_num", "invalid int value")


# ---- 2. upper bounds on every count and size ------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,needle", [
    ("--action_string", "w-100000000", "more than 1025 frames"),
    ("--action_string", "w-600,s-600", "more than 1025 frames"),
    ("--action_string", "w-" + "9" * 5000, "more than 1025 frames"),
    ("--frame_num", "1000000000", "from 1 to 1025"),
    ("--sample_steps", "1000000000", "from 1 to 1000"),
    ("--sample_shift", "1e300", "at most 100"),
])
def test_counts_from_the_user_are_bounded(base, capsys, flag, value, needle):
    refused(gen(base, flag, value), capsys, flag, needle)


def _npy(path: Path, shape: tuple, data: bytes = b"", dtype: str = "<f4") -> None:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data)


def test_npy_headers_are_checked_against_the_file(base, tmp_path, capsys):
    d = Path(shutil.copytree(base["actions"], tmp_path / "a"))
    _npy(d / "poses.npy", (10**9, 4, 4), b"\0" * 64)        # claims 64 GB of poses, holds 64 bytes
    refused(gen(base, "--action_path", str(d)), capsys, "poses.npy", "rows")
    _npy(d / "poses.npy", (9, 4, 4), b"\0" * 64)
    refused(gen(base, "--action_path", str(d)), capsys, "poses.npy", "truncated or corrupt")
    _npy(d / "poses.npy", (2**40, 0, 4))                     # huge but empty: rows still bounded
    refused(gen(base, "--action_path", str(d)), capsys, "poses.npy", "rows")
    shutil.copy(base["actions"] / "poses.npy", d / "poses.npy")
    _npy(d / "intrinsics.npy", (10**8, 4), b"\0" * 16)
    refused(gen(base, "--action_string", "w-4", "--action_path", str(d)), capsys, "intrinsics.npy", "rows")


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_image_pixels_are_bounded_before_decoding(base, tmp_path, capsys):
    big = tmp_path / "big.png"
    _png_header_only(big, 60000, 60000)                      # 3.6 billion pixels in a 60-byte file
    args = gen(base)
    args[args.index("--image") + 1] = str(big)
    refused(args, capsys, "big.png", "pixels")


# ---- 3. every file the loader reads gets the same care ------------------------------------------------------

@pytest.mark.parametrize("name", ["Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"])
@pytest.mark.parametrize("damage", ["empty", "text", "truncated", "pickled", "nested", "wrong_shape"])
def test_vae_and_text_encoder_files_get_the_dit_s_care(base, tmp_path, capsys, name, damage):
    import collections
    ckpt = copy_ckpt(base, tmp_path)
    f = ckpt / name
    sd = torch.load(f, weights_only=True)
    if damage == "empty":
        f.write_bytes(b"")
    elif damage == "text":
        f.write_text("hello")
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    elif damage == "pickled":
        torch.save({"weights": collections.OrderedDict(a=collections.Counter(x=1))}, f)
    elif damage == "nested":
        torch.save({"state_dict": sd}, f)
    else:
        key = sorted(sd)[0]
        sd[key] = torch.zeros(3, 3)
        torch.save(sd, f)
    line, out = refused(gen(base, ckpt=ckpt), capsys, name)
    assert "frames 48x32" not in out           # refused while checking the request, before anything is loaded


def test_deeply_nested_safetensors_header_is_refused(base, tmp_path, capsys):
    ckpt = copy_ckpt(base, tmp_path)
    shard = ckpt / "low_noise_model" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    header = b"[" * 100_000 + b"]" * 100_000
    shard.write_bytes(len(header).to_bytes(8, "little") + header)
    refused(gen(base, ckpt=ckpt), capsys, shard.name, "nested too deeply")


@pytest.mark.parametrize("field,value,needle", [
    ("text_len", 10**9, "text_len"), ("text_len", "512", "text_len"), ("eps", [1], "eps"),
    ("rope_max_seq_len", -1, "rope_max_seq_len"),
])
def test_config_json_values_are_checked(base, tmp_path, capsys, field, value, needle):
    ckpt = copy_ckpt(base, tmp_path)
    cfg_path = ckpt / "high_noise_model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    refused(gen(base, ckpt=ckpt), capsys, "config.json", needle)


def test_index_json_is_size_limited_and_nesting_checked(base, tmp_path, capsys):
    ckpt = copy_ckpt(base, tmp_path)
    index = ckpt / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("[" * 200_000 + "]" * 200_000)
    refused(gen(base, ckpt=ckpt), capsys, index.name, "nested too deeply")
    with open(index, "wb") as f:
        f.truncate(17 * 2**20)
    refused(gen(base, ckpt=ckpt), capsys, index.name, "too large")


# ---- 4. sizing that users plan hardware with -----------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    src = write_tiny_checkpoint(root / "src", "lingbot-cam-tiny")
    assert main(["convert", "--ckpt_dir", str(src), "--quant", "fp8", "--no_skip_first_last",
                 "--out", str(root / "fp8")]) == 0
    return root


def _block_line(out: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith("blocks:"))


def test_plan_of_a_converted_checkpoint_plans_its_stored_bytes(converted, capsys):
    from worldstream.runtime.quant import quantized_block_bytes
    cfg = get_config("lingbot-cam-tiny")
    assert main(["plan", "--ckpt_dir", str(converted / "fp8"), "--size", "48*32", "--frame_num", "5"]) == 0
    out = capsys.readouterr().out
    assert "weights fp8" in out
    fp8_mb = f"{quantized_block_bytes(cfg, 'fp8') / 1e6:.1f} MB"
    assert fp8_mb in _block_line(out), (fp8_mb, _block_line(out))
    assert main(["plan", "--ckpt_dir", str(converted / "src"), "--size", "48*32", "--frame_num", "5"]) == 0
    assert f"{quantized_block_bytes(cfg, None) / 1e6:.1f} MB" in _block_line(capsys.readouterr().out)


def test_info_fp8_column_is_what_convert_writes(converted, capsys):
    """`info`'s method (runtime.quant.converted_model_bytes) counted on a real conversion, then read off info."""
    from worldstream.runtime.quant import converted_model_bytes
    cfg = get_config("lingbot-cam-tiny")
    written = sum(t.nbytes for f in (converted / "fp8" / "high_noise_model").glob("*.safetensors")
                  for t in load_file(f).values())
    assert written == converted_model_bytes(cfg, "fp8", torch.float32, skip_first_last=False)
    assert main(["info"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("lingbot-cam "))
    bf16, fp8 = (float(v) for v in re.findall(r"([\d.]+) GB", row))
    assert 0.60 < fp8 / bf16 < 0.68, row           # LingBot blocks keep their camera layers in bf16: ~64%, not 50%


def test_plan_uses_generate_s_ram_default_and_help_says_so(capsys):
    assert main(["plan", "--variant", "lingbot-cam", "--vram", "8GB"]) == 0
    assert "80% of this machine's" in capsys.readouterr().out
    assert main(["generate", "--help"]) == 0
    assert "80% of this machine's RAM" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("flag,value", [("--pcie", "0"), ("--pcie", "-5"), ("--disk", "nan"), ("--pcie", "inf")])
def test_plan_bandwidths_are_checked(capsys, flag, value):
    refused(["plan", "--variant", "lingbot-cam", flag, value], capsys, flag)


def test_plan_sizes_are_bounded(capsys):
    refused(["plan", "--variant", "lingbot-cam", "--size", "160000*160000"], capsys, "--size")
    refused(["plan", "--variant", "lingbot-cam", "--frame_num", "100000001"], capsys, "--frame_num")


# ---- 5. killed runs leak nothing -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory):
    """A single DiT of 160 tiny blocks: `convert` logs a line per block, so a 4 KiB stderr pipe that the test
    stops reading holds the converter mid-way, whatever the machine's speed."""
    import dataclasses
    root = tmp_path_factory.mktemp("long")
    write_dit_dir(root / "src", dataclasses.replace(get_config("wan2.1-t2v-1.3b-tiny"), num_layers=160), seed=5)
    return root / "src"


def _convert_until_first_block(src: Path, out: Path):
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    code = "import sys; from worldstream.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "convert", "--ckpt_dir", str(src), "--quant", "int8",
                             "--out", str(out)], stderr=w, stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    os.close(w)
    err = os.fdopen(r, "r")
    for line in err:
        if " block " in line:
            break
    return proc, err


def test_sigterm_during_convert_is_ctrl_c(long_ckpt, tmp_path):
    proc, err = _convert_until_first_block(long_ckpt, tmp_path / "out")
    assert hidden(tmp_path) == [f".out.partial-{proc.pid}"]
    proc.send_signal(signal.SIGTERM)
    rest = err.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "worldstream: interrupted (SIGTERM); nothing written" in rest and "Traceback" not in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_convert_s_partial_folder_is_removed_by_the_next(long_ckpt, tmp_path, capsys):
    proc, err = _convert_until_first_block(long_ckpt, tmp_path / "out")
    proc.kill()
    proc.wait(timeout=120)
    err.close()
    assert hidden(tmp_path) == [f".out.partial-{proc.pid}"]          # SIGKILL: nothing could clean up
    assert main(["convert", "--ckpt_dir", str(long_ckpt), "--quant", "int8", "--out", str(tmp_path / "out")]) == 0
    assert f"a partial output left by process {proc.pid}, which is no longer running" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_mp4_write_s_temp_file_is_removed_by_the_next_run(base, tmp_path, capsys):
    out = tmp_path / "videos"
    code = ("import sys; from worldstream.files import atomic_write\n"
            "def write(tmp):\n    open(tmp, 'wb').write(b'half a video'); print('writing', flush=True); sys.stdin.read()\n"
            "atomic_write(sys.argv[1], write, suffix='.tmp.mp4')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out / "v.mp4")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.stdout.readline() == "writing\n"
    proc.kill()
    proc.wait(timeout=60)
    (left,) = hidden(out)
    assert f".partial-{proc.pid}-" in left
    assert main(gen(base, "--save_file", str(out / "v.mp4"))) == 0
    assert f"removed {out / left}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["v.mp4"]


def test_a_partial_output_whose_lock_is_held_is_kept(base, tmp_path, capsys):
    """A dead PID alone proves nothing (the writer may run in another PID namespace, or on another machine
    sharing the folder): a partial output whose lock is held stays."""
    out = tmp_path / "videos"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    partial = out / f".v.mp4.partial-{dead}-0123abcd.tmp.mp4"
    partial.write_bytes(b"in use")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
                               str(partial)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(gen(base, "--save_file", str(out / "v.mp4"))) == 0
        assert partial.exists() and "removed" not in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()


# ---- 6. inputs converted correctly, or refused ---------------------------------------------------------------

def test_16_bit_grayscale_png_keeps_its_tones(base, tmp_path):
    from PIL import Image

    from worldstream.pipelines.tasks import prepare
    ramp = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    job = prepare(base["cam"], "x", image=tmp_path / "gray16.png", size="48*32", frame_num=5)
    pixels = (job.image + 1) * 127.5                       # back to 0..255
    expected = torch.from_numpy(ramp / 257.0).float()
    assert (pixels - expected).abs().max() < 0.6           # a gray ramp, not an all-white frame


def test_images_without_a_white_level_are_refused(base, tmp_path, capsys):
    from PIL import Image
    Image.fromarray(np.zeros((32, 48), np.float32)).save(tmp_path / "depth.tiff")
    args = gen(base)
    args[args.index("--image") + 1] = str(tmp_path / "depth.tiff")
    refused(args, capsys, "depth.tiff", "32-bit floating-point")


def test_too_few_poses_for_an_explicit_frame_num_is_refused(base, tmp_path, capsys):
    d = Path(shutil.copytree(base["actions"], tmp_path / "one"))
    np.save(d / "poses.npy", np.eye(4, dtype=np.float32)[None])
    refused(gen(base, "--action_path", str(d), "--frame_num", "17"), capsys, "poses.npy", "1 pose(s)",
            "--frame_num 17")
