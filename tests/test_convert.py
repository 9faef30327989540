"""Compressed checkpoints end to end: `worldstream convert` (one file per block, streaming, all or nothing),
loading them (load_dit, the runner's RAM and disk tiers), quantize-on-load giving the same weights, and
`generate --quant` / a converted checkpoint through the whole pipeline. CPU: the dequantize path runs."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from worldstream.cli import main
from worldstream.models.configs import get_config
from worldstream.checkpoints.dit import CheckpointError, find_checkpoint, index_model_dir, load_dit
from worldstream.runtime.convert import NON_BLOCK_FILE, block_file, convert
from worldstream.runtime.planner import Plan
from worldstream.models.quant import QLinear
from worldstream.runtime.loading import CheckpointLoader
from worldstream.runtime.runner import DiTRunner, Forward, build_runner
from worldstream.testing import demo_image, write_dit_checkpoint, write_dit_dir, write_tiny_checkpoint

# Relative error of a whole tiny DiT's output vs float32 (random weights of std 0.2, every block compressed);
# the same bounds as tests/test_quant.py's E2E_BOUNDS (measured there: fp8 4.3%, int8 0.88%).
BOUNDS = {"fp8": 0.08, "int8": 0.015}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_plan(n, resident, ram, disk, prefetch=1):
    return Plan(n_blocks=n, block_bytes=0, resident=resident, prefetch=prefetch, batched_guidance=True,
                chunk=None, ram_blocks=ram, disk_blocks=disk, vram_peak=0, ram_peak=0, weights_in_ram=0,
                step_seconds=0, resident_step_seconds=0, block_compute_s=0, block_copy_s=0)


def inputs(cfg, camera=True):
    g = torch.Generator().manual_seed(0)
    f, h, w = 2, 4, 6
    kw = dict(x=torch.randn(2, 16, f, h, w, generator=g), t=torch.tensor([950.0, 300.0]),
              context=torch.randn(2, 5, cfg.text_dim, generator=g))
    if cfg.in_dim > 16:
        kw["y"] = torch.randn(2, cfg.in_dim - 16, f, h, w, generator=g)
    if camera and cfg.has_camera:
        kw["camera"] = torch.randn(1, cfg.control_in // 4, f, h, w, generator=g)
    return kw


@pytest.fixture(scope="module")
def cam(tmp_path_factory):
    """A tiny LingBot-Cam DiT (fp32, 2 blocks) and its int8 / fp8 conversions with every block compressed."""
    root = tmp_path_factory.mktemp("cam")
    write_dit_checkpoint(root / "src", "lingbot-cam-tiny")
    for fmt in BOUNDS:
        convert(root / "src", root / fmt, fmt, skip_first_last=False, log=None)
    return root


@pytest.mark.parametrize("fmt", list(BOUNDS))
def test_converted_cam_loads_and_stays_close(cam, fmt):
    src, out = find_checkpoint(cam / "src"), find_checkpoint(cam / fmt)
    assert out.config == src.config and out.quant.fmt == fmt and not out.quant.skip_first_last
    names = sorted(p.name for p in out.experts["high"].iterdir())
    assert names == sorted([block_file(0), block_file(1), NON_BLOCK_FILE, "config.json",
                            "diffusion_pytorch_model.safetensors.index.json"])
    inp = inputs(src.config)
    for name in ("high", "low"):
        ref = load_dit(src.experts[name], torch.float32, cfg=src.config)
        q = load_dit(out.experts[name], torch.float32, cfg=out.config)
        qlin = q.blocks[1].self_attn.q
        assert isinstance(qlin, QLinear) and qlin.weight.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[fmt]
        assert type(q.blocks[1].cam_injector_layer1) is torch.nn.Linear      # camera layers stay whole
        with torch.no_grad():
            err = rel_err(q(**inp), ref(**inp))
        assert 1e-4 < err < BOUNDS[fmt], (name, err)


@pytest.mark.parametrize("resident,ram,disk", [([1], [0], []), ([0], [], [1]), ([], [0], [1])])
def test_runner_reads_converted_checkpoint_from_ram_and_disk(cam, resident, ram, disk):
    ckpt = find_checkpoint(cam / "int8")
    inp = inputs(ckpt.config)
    with torch.no_grad():
        ref = {n: load_dit(d, torch.float32, cfg=ckpt.config)(**inp) for n, d in ckpt.experts.items()}
    runner = DiTRunner(["high", "low"], CheckpointLoader(ckpt), "cpu", torch.float32,
                       make_plan(2, resident, ram, disk), keep_all=True)
    order = ["high", "high", "low", "low"]
    runner.start(Forward(name, 2) for name in order)
    for k, name in enumerate(order):
        assert torch.equal(runner(name, **inp), ref[name]), (k, name)
        if disk and k == 2:
            assert runner.tier.stats["reads"] > 0
    runner.close()


def test_quantize_on_load_equals_convert_then_load(cam):
    src, out = find_checkpoint(cam / "src"), find_checkpoint(cam / "int8")
    on_load = CheckpointLoader(src, out.quant).load("low", set(), "cpu", torch.float32)[0].state_dict()
    converted = CheckpointLoader(out).load("low", set(), "cpu", torch.float32)[0].state_dict()
    assert on_load.keys() == converted.keys() and any(k.endswith("weight_scale") for k in on_load)
    for k in on_load:
        assert on_load[k].dtype == converted[k].dtype and torch.equal(on_load[k], converted[k]), k


def test_block_files_are_about_half_of_bf16(tmp_path):
    write_dit_checkpoint(tmp_path / "src", "wan2.2-i2v-a14b-tiny", dtype=torch.bfloat16)
    convert(tmp_path / "src", tmp_path / "out", "fp8", skip_first_last=False, log=None)
    locs = index_model_dir(tmp_path / "src" / "high_noise_model")
    for i in range(2):
        before = sum(loc.nbytes for k, loc in locs.items() if k.startswith(f"blocks.{i}."))
        after = (tmp_path / "out" / "high_noise_model" / block_file(i)).stat().st_size
        assert 0.45 < after / before < 0.62, (i, after / before)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A single-expert DiT with 4 blocks (LingBot-Cam shapes), converted with the default policy (first and
    last blocks whole)."""
    root = tmp_path_factory.mktemp("deep")
    cfg = dataclasses.replace(get_config("wan2.1-t2v-1.3b-tiny"), num_layers=4)
    write_dit_dir(root / "src", cfg, seed=3)
    convert(root / "src", root / "int8", "int8", log=None)
    return root


def test_whole_first_last_blocks_stay_resident_while_compressed_blocks_stream(deep):
    src, out = find_checkpoint(deep / "src"), find_checkpoint(deep / "int8")
    assert out.quant.skip_first_last and out.quant.pinned(4) == (0, 3)
    inp = inputs(out.config)
    with torch.no_grad():
        ref = load_dit(out.experts["main"], torch.float32, cfg=out.config)(**inp)
        exact = load_dit(src.experts["main"], torch.float32, cfg=src.config)(**inp)
    assert type(load_dit(out.experts["main"], torch.float32, cfg=out.config).blocks[0].ffn[0]) is torch.nn.Linear
    assert rel_err(ref, exact) < BOUNDS["int8"]
    for loader, plan_ in [(CheckpointLoader(out), make_plan(4, [0, 3], [1], [2])),
                          (CheckpointLoader(src, "int8"), make_plan(4, [0, 3], [1, 2], []))]:
        runner = DiTRunner(["main"], loader, "cpu", torch.float32, plan_)
        runner.start([Forward("main", 2)] * 3)
        for _ in range(2):
            assert torch.equal(runner("main", **inp), ref)
        assert runner.engine.stats["copies"] > 0
        runner.close()
    # the compressed blocks cannot share slots with the whole ones, and quantize-on-load cannot use the disk tier
    for loader, plan_, message in [(CheckpointLoader(out), make_plan(4, [1, 2], [0, 3], []), "must stay resident"),
                                   (CheckpointLoader(src, "int8"), make_plan(4, [0, 3], [1], [2]),
                                    "worldstream convert")]:
        runner = DiTRunner(["main"], loader, "cpu", torch.float32, plan_)
        runner.start([Forward("main", 2)])
        with pytest.raises(ValueError, match=message):
            runner("main", **inp)


def test_a_full_disk_during_conversion_leaves_nothing(tmp_path):
    """A real full disk, not a mocked OSError: the command runs with RLIMIT_FSIZE, so writing a file past 16 KB
    fails with EFBIG inside safetensors (which raises its own SafetensorError, not OSError) mid-way through
    the conversion. The CLI names the file and the reason in one line and leaves no OUT and no partial folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_dit_checkpoint(tmp_path / "src", "lingbot-cam-tiny")
    out = tmp_path / "dst"
    out.mkdir()
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000)); "
            "from worldstream.cli import main; sys.exit(main(sys.argv[1:]))")
    src_dir = Path(__file__).resolve().parent.parent / "src"
    r = subprocess.run([sys.executable, "-c", code, "convert", "--ckpt_dir", str(tmp_path / "src"), "--quant",
                        "int8", "--out", str(out / "int8")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(src_dir)})
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("worldstream: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "File too large" in errors[0] and ".int8.partial-" in errors[0] and "was not written" in errors[0]
    assert list(out.iterdir()) == []                     # no OUT, no temporary folder


def test_convert_refuses_what_it_cannot_do(tmp_path):
    write_dit_checkpoint(tmp_path / "src", "lingbot-cam-tiny")
    with pytest.raises(ValueError, match="already exists"):
        convert(tmp_path / "src", tmp_path / "src", "int8", log=None)
    with pytest.raises(CheckpointError, match="already compressed"):
        convert(tmp_path / "src", tmp_path / "a", "int8", log=None)
        convert(tmp_path / "a", tmp_path / "b", "int8", log=None)


def test_convert_checks_the_room_before_converting(tmp_path, monkeypatch, capsys):
    """The free space is the operating system's answer (stubbed here: no small file system to fill); what is
    tested is that convert asks first and refuses before writing anything."""
    import collections
    import shutil
    write_dit_checkpoint(tmp_path / "src", "lingbot-cam-tiny")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert main(["convert", "--ckpt_dir", str(tmp_path / "src"), "--quant", "int8",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_config_names_a_bad_quantization_entry(cam, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(cam / "int8", bad)
    cfg_path = bad / "low_noise_model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization"]["fmt"] = "nf4"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="low_noise_model.*nf4"):
        find_checkpoint(bad)


def test_cli_convert_reports_bad_input(tmp_path, capsys):
    assert main(["convert", "--ckpt_dir", str(tmp_path / "nope"), "--quant", "int8",
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_dit_checkpoint(tmp_path / "src", "lingbot-cam-tiny")
    assert main(["convert", "--ckpt_dir", str(tmp_path / "src"), "--quant", "nf4",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "worldstream: error:" in err and "nf4" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_generate_quant_and_converted_checkpoint_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = write_tiny_checkpoint(tmp_path / "wan22", "wan2.2-i2v-a14b-tiny")
    demo_image(48, 32).save(tmp_path / "first.png")
    args = ["--prompt", "a red car", "--image", str(tmp_path / "first.png"), "--size", "48*32",
            "--sample_steps", "2", "--frame_num", "5", "--no_prompt_cache", "--device", "cpu"]
    assert main(["generate", "--ckpt_dir", str(root), "--quant", "int8", "--save_file",
                 str(tmp_path / "a.mp4"), *args]) == 0, capsys.readouterr().err
    assert (tmp_path / "a.mp4").stat().st_size > 0
    # the same path with every block compressed (the tiny model has only its first and last blocks): the
    # runner that generate builds holds int8 QLinears, and the video stays close to the float32 one
    from worldstream.checkpoints.compressed import QuantPolicy
    from worldstream.pipelines.generate import run
    from worldstream.pipelines.tasks import prepare
    job = prepare(root, "a red car", image=demo_image(48, 32), size="48*32", frame_num=5, steps=2, seed=1)
    built = []

    def factory(*a, **kw):
        built.append(build_runner(*a, **kw))
        return built[-1]

    plain = run(job, device="cpu", progress=False)
    quant = run(job, device="cpu", progress=False, quant=QuantPolicy("int8", skip_first_last=False),
                runner_factory=factory)
    assert built[0].quant.fmt == "int8" and built[0].calls
    assert 0 < rel_err(quant.latents, plain.latents) < 0.05
    assert main(["convert", "--ckpt_dir", str(root), "--quant", "fp8", "--no_skip_first_last",
                 "--out", str(tmp_path / "fp8")]) == 0
    out = tmp_path / "fp8"
    for companion in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):   # linked, not rewritten
        assert (out / companion).stat().st_ino == (root / companion).stat().st_ino
    assert main(["generate", "--ckpt_dir", str(out), "--save_file", str(tmp_path / "b.mp4"), *args]) == 0
    assert (tmp_path / "b.mp4").stat().st_size > 0
    # asking a compressed checkpoint for another format is refused clearly
    assert main(["generate", "--ckpt_dir", str(out), "--quant", "int8", "--save_file", str(tmp_path / "c.mp4"),
                 *args]) == 2
    assert "already compressed to fp8" in capsys.readouterr().err


def test_build_runner_on_cpu_quantizes_on_load(cam):
    from worldstream.runtime.planner import Workload
    src = find_checkpoint(cam / "src")
    runner = build_runner(src, "cpu", torch.float32, Workload(), quant="int8")
    assert runner.quant.fmt == "int8"
    runner.start([Forward("high", 2)] * 2)
    out = runner("high", **inputs(src.config))
    assert type(runner.experts["high"].model.blocks[1].ffn[0]) is torch.nn.Linear   # default: first/last whole
    assert torch.isfinite(out).all()
    runner.close()
