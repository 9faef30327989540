"""Ulysses sequence parallelism (runtime/parallel.py) on the CPU: 2 and 4 gloo processes, tiny models.

1. The DiT split over the processes gives the single-process output (float32, <= 1e-5 relative): the
   bidirectional two-expert LingBot Cam through the runner (CFG batch, camera, per-sample and per-token
   timesteps), and the causal student chunk by chunk through RealtimeSession (each process holding its heads'
   KV cache, a window that wraps). Rank 0 alone decodes; every process ends with the same latents.
2. Streamed weights: the host slabs of all processes map the same /dev/shm files (one copy: the processes'
   proportional set sizes add up to one slab, each process page-locks and reads all of it), refilled in place
   at the expert switch, and no file is left behind.
3. Launch: `torchrun --nproc_per_node 2 -m worldstream generate ... --ulysses 2` writes the single-process
   video (rank 0 writes and reports, once); a bad world size or launch is refused with one error line.

Each world size is one spawn of processes that runs every scenario (process start-up is the cost here).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldstream.checkpoints.dit import find_checkpoint, load_dit
from worldstream.checkpoints.vae import VAE_FILE, load_vae
from worldstream.cli import main
from worldstream.models.attention import attention, register_backend
from worldstream.models.configs import get_config
from worldstream.models.dit import WanDiT
from worldstream.models.kv_cache import KVCache
from worldstream.pipelines.realtime import RealtimeSession
from worldstream.pipelines.video import read_mp4
from worldstream.runtime.loading import CheckpointLoader
from worldstream.runtime.memory import SharedHostMemory, mapping_of, smaps_of, sweep_stale_shm
from worldstream.runtime.parallel import (ParallelError, check, check_heads, check_launch, world_sizes)
from worldstream.runtime.planner import Plan, Workload, plan
from worldstream.runtime.runner import DiTRunner, Forward, build_runner
from worldstream.testing import demo_image, write_dit_dir, write_tiny_checkpoint
from worldstream.testing.parallel import run_in_processes

SRC = Path(__file__).resolve().parent.parent / "src"
H, W = 32, 48                     # causal: 2 x 3 tokens per latent frame, 24 per chunk of 4
CHUNKS = 3
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# ---- what every process (and the single-process reference) computes ------------------------------------------

def dit_inputs(cfg, per_token: bool = False) -> dict:
    g = torch.Generator().manual_seed(0)
    f, h, w = 3, 4, 8                                      # 3 x 2 x 4 = 24 tokens
    t = torch.tensor([950.0, 950.0])
    if per_token:
        t = (torch.rand(2, f * h * w // 4, generator=g) * 1000).round()
    return dict(x=torch.randn(2, 16, f, h, w, generator=g), y=torch.randn(2, 20, f, h, w, generator=g), t=t,
                context=torch.randn(2, 5, cfg.text_dim, generator=g),
                camera=torch.randn(1, cfg.control_in // 4, f, h, w, generator=g))


def make_plan(n, resident, ram) -> Plan:
    return Plan(n_blocks=n, block_bytes=0, resident=resident, prefetch=1, batched_guidance=True, chunk=None,
                ram_blocks=ram, disk_blocks=[], vram_peak=0, ram_peak=0, weights_in_ram=0, step_seconds=0,
                resident_step_seconds=0, block_compute_s=0, block_copy_s=0)


def open_session(root: Path, runner, first: bool) -> RealtimeSession:
    ckpt = find_checkpoint(root)
    vae = load_vae(root / VAE_FILE) if first else None
    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, H, W, generator=g) * 2 - 1
    context = torch.randn(4, ckpt.config.text_dim, generator=g)
    return RealtimeSession(runner, ckpt.config, vae, vae, context, image, H, W, window=8, sink=2)


def run_chunks(session: RealtimeSession) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    keys = ["w", "wj", "d"]
    out = []
    for c in range(CHUNKS):
        chunk = session.step(keys=set(keys[c]), look=(2.0, 1.0) if c == 1 else None)
        out.append((chunk.latents.clone(), chunk.frames))
    session.close()
    return out


def slab_facts(expert) -> list[dict]:
    facts = []
    for i, src in sorted(expert.sources.items()):
        ptr = src.buf.data_ptr()
        dev, inode, path = mapping_of(ptr)
        sm = smaps_of(ptr)
        facts.append(dict(block=i, file=(dev, inode), path=path, bytes=src.buf.numel(), rss=sm["Rss"],
                          pss=sm["Pss"], size=sm["Size"]))
    return facts


def in_every_process(sp, paths: dict) -> dict:
    """All scenarios, run by each process of the group."""
    out: dict = {"rank": sp.rank}
    cam = find_checkpoint(paths["cam"])
    cfg = cam.config

    # 1. bidirectional DiT, two experts, resident, through the runner
    runner = build_runner(cam, "cpu", torch.float32, Workload(guidance=True), parallel=sp)
    runner.start([Forward("high", 2), Forward("low", 2), Forward("low", 2)])
    out["dit"] = [runner("high", **dit_inputs(cfg)), runner("low", **dit_inputs(cfg)),
                  runner("low", **dit_inputs(cfg, per_token=True))]

    # 2. streamed blocks in shared slabs; RAM for one expert: the switch refills the same slabs
    runner = DiTRunner(["high", "low"], CheckpointLoader(cam), "cpu", torch.float32, make_plan(2, [], [0, 1]),
                       keep_all=False, parallel=sp)
    runner.start([Forward("high", 2), Forward("low", 2), Forward("low", 2)])
    out["streamed"] = [runner("high", **dit_inputs(cfg))]
    out["high_slabs"] = slab_facts(runner.experts["high"])
    out["streamed"].append(runner("low", **dit_inputs(cfg)))
    out["low_slabs"] = slab_facts(runner.experts["low"])
    out["fills"] = runner.memory.fills
    out["left_in_shm"] = glob.glob(runner.memory.path(0).rsplit("-", 1)[0] + "-*")
    sp.barrier()         # every process has measured its mappings before any lets go of its slabs (close frees
    runner.close()       # them at once: a sharer gone early would raise the others' PSS)

    # 3. the causal student, chunk by chunk
    fast = find_checkpoint(paths["fast"])
    runner = build_runner(fast, "cpu", torch.float32, Workload(guidance=False), parallel=sp)
    session = open_session(paths["fast"], runner, sp.first)
    out["cache_heads"] = session.cache.k[0].shape[2]
    out["chunks"] = run_chunks(session)
    return out


# ---- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    cfg = get_config("lingbot-cam-tiny")
    write_dit_dir(root / "cam" / "high_noise_model", cfg, seed=1)
    write_dit_dir(root / "cam" / "low_noise_model", cfg, seed=2)
    write_tiny_checkpoint(root / "fast", "lingbot-fast-v2-tiny", seed=3)
    return {"cam": root / "cam", "fast": root / "fast"}


@pytest.fixture(scope="module")
def reference(paths):
    cam = find_checkpoint(paths["cam"])
    cfg = cam.config
    with torch.no_grad():
        plain = {n: load_dit(d, dtype=torch.float32, cfg=cfg) for n, d in cam.experts.items()}
        dit = [plain["high"](**dit_inputs(cfg)), plain["low"](**dit_inputs(cfg)),
               plain["low"](**dit_inputs(cfg, per_token=True))]
    fast = find_checkpoint(paths["fast"])
    runner = build_runner(fast, "cpu", torch.float32, Workload(guidance=False))
    return {"dit": dit, "chunks": run_chunks(open_session(paths["fast"], runner, True))}


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request, paths):
    return run_in_processes(in_every_process, request.param, paths)


# ---- 1. same output ---------------------------------------------------------------------------------------------

def test_bidirectional_dit_equals_one_process(ranks, reference):
    for r in ranks:
        for got, want in zip(r["dit"], reference["dit"]):
            assert got.shape == want.shape and rel(got, want) <= TOL
        assert all(torch.equal(a, b) for a, b in zip(r["dit"], ranks[0]["dit"]))   # the same in every process


def test_causal_chunks_equal_one_process(ranks, reference):
    world = len(ranks)
    for r in ranks:
        assert r["cache_heads"] == get_config("lingbot-fast-v2-tiny").num_heads // world   # its heads' cache
        for k, ((lat, frames), (ref_lat, ref_frames)) in enumerate(zip(r["chunks"], reference["chunks"])):
            assert rel(lat, ref_lat) <= TOL, (r["rank"], k)
            if r["rank"] == 0:
                assert frames.shape == ref_frames.shape and rel(frames, ref_frames) <= TOL
            else:
                assert frames is None             # rank 0 alone holds the VAE and decodes


# ---- 2. one host copy ---------------------------------------------------------------------------------------------

def test_streamed_weights_live_once_in_shared_memory(ranks, reference):
    world = len(ranks)
    for r in ranks:
        for got, want in zip(r["streamed"], [reference["dit"][0], reference["dit"][1]]):
            assert rel(got, want) <= TOL
        assert r["fills"] == (r["rank"] == 0)                          # local rank 0 writes, the others map
        assert r["left_in_shm"] == []                                   # unlinked once every process mapped
        assert {s["file"] for s in r["low_slabs"]} == {s["file"] for s in r["high_slabs"]}   # refilled in place
        assert all(s["path"].endswith("(deleted)") and "/worldstream-" in s["path"] for s in r["low_slabs"])
    for k, slab in enumerate(ranks[0]["low_slabs"]):
        facts = [r["low_slabs"][k] for r in ranks]
        assert len({f["file"] for f in facts}) == 1                     # the same file in every process
        assert all(f["rss"] == f["size"] >= f["bytes"] for f in facts)  # each process touched all of it ...
        total_pss = sum(f["pss"] for f in facts)
        assert abs(total_pss - slab["size"]) <= 4096 * world            # ... yet together they hold one copy
        assert sum(f["rss"] for f in facts) == world * slab["size"]


def test_shared_slabs_one_process_view(tmp_path):
    """Two holders of the same tag (what two processes do) map one file; only the writer writes; the files go
    at the end of the load; a failed load is raised after the meeting."""
    met = []
    writer = SharedHostMemory("t1", writer=True, sync=met.append, directory=str(tmp_path))
    reader = SharedHostMemory("t1", writer=False, sync=met.append, directory=str(tmp_path))
    a, b = writer.slab(10000), reader.slab(10000)
    a[:5] = torch.arange(1, 6, dtype=torch.uint8)
    assert mapping_of(a.data_ptr())[:2] == mapping_of(b.data_ptr())[:2] and b[:5].tolist() == [1, 2, 3, 4, 5]
    assert (writer.fills, reader.fills) == (True, False)
    writer.end(), reader.end()
    assert met == [None, None] and list(tmp_path.iterdir()) == []
    a[5] = 9
    assert b[5] == 9                                                   # still one memory after the unlink
    boom = []
    failing = SharedHostMemory("t2", writer=True, sync=boom.append, directory=str(tmp_path))
    with pytest.raises(ValueError):
        failing.end(ValueError("loading failed"))                      # an error is raised after the meeting
    assert len(boom) == 1 and isinstance(boom[0], ValueError)


def test_slab_files_of_dead_runs_are_swept(tmp_path):
    import subprocess as sp
    dead = sp.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"worldstream-{int(dead.stdout)}-ab12cd34-0"
    live = tmp_path / f"worldstream-{os.getpid()}-ab12cd34-0"
    other = tmp_path / "worldstream-notes.txt"
    for f in (stale, live, other):
        f.write_bytes(b"x")
    assert sweep_stale_shm(str(tmp_path)) == [stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


# ---- pieces, in one process -----------------------------------------------------------------------------------------

def test_prepare_keeps_one_range_of_tokens():
    """`prepare(tokens=...)` gives exactly the slice of the whole clip's tokens, RoPE angles, per-token time
    embeddings and camera features (what each process computes on)."""
    torch.manual_seed(0)
    model = WanDiT(get_config("lingbot-cam-tiny")).eval()
    inp = dit_inputs(model.cfg, per_token=True)
    with torch.no_grad():
        x, kw, (e, grid) = model.prepare(**inp)
        part = slice(6, 18)
        xs, kws, (es, grid_s) = model.prepare(**inp, tokens=part)
    assert grid_s == grid and torch.equal(xs, x[:, part]) and torch.equal(es, e[:, part])
    assert torch.equal(kws["e0"], kw["e0"][:, part]) and torch.equal(kws["context"], kw["context"])
    assert all(torch.equal(a, b[part]) for a, b in zip(kws["rot"], kw["rot"]))
    assert torch.allclose(kws["cam"], kw["cam"][:, part], rtol=0, atol=1e-6)


def test_a_backend_that_handles_the_cache_writes_it_itself():
    cache = KVCache.empty(1, 1, frame_tokens=2, heads=2, head_dim=4, dtype=torch.float32, device="cpu",
                          max_frames=2)
    cache.k[0].zero_(), cache.v[0].zero_()
    cache.begin_chunk(0, 1)
    q = k = v = torch.randn(1, 2, 2, 4)
    seen = {}

    def kernel(q, k, v, kv=None):
        seen["kv"] = kv
        return q
    register_backend("test-cache-kernel", kernel, handles_cache=True)
    attention(q, k, v, "test-cache-kernel", kv=cache.layer(0))
    assert seen["kv"].index == 0 and not cache.k[0].any()              # handed the cache, the seam wrote nothing
    out = attention(q, k, v, "sdpa", kv=cache.layer(0))                # plain kernel: update, then attend
    assert torch.equal(cache.k[0][:, :2], k) and out.shape == q.shape


def test_world_sizes_and_their_errors():
    assert world_sizes(40) == [2, 4, 5, 8]
    with pytest.raises(ParallelError, match=r"40 attention heads.*use 2, 4, 5, 8"):
        check_heads("lingbot-cam", 40, 3)
    with pytest.raises(ParallelError, match="45 tokens"):
        check(get_config("lingbot-cam-tiny"), 45, 2)
    check(get_config("lingbot-cam"), get_config("lingbot-cam").tokens(81, 480, 832), 8)    # 32,760 tokens
    env = dict(rank=0, world=1, local_rank=0, local_world=1)
    assert check_launch(None, env) == 1 and check_launch(1, env) == 1
    with pytest.raises(ParallelError, match="torchrun --nproc_per_node 2"):
        check_launch(2, env)
    with pytest.raises(ParallelError, match="pass --ulysses 4"):
        check_launch(None, dict(env, world=4, local_world=4))
    with pytest.raises(ParallelError, match="must match"):
        check_launch(2, dict(env, world=4, local_world=4))
    with pytest.raises(ParallelError, match="one machine"):
        check_launch(4, dict(env, world=4, local_world=2))


def test_plan_for_several_gpus():
    cfg = get_config("lingbot-cam")
    one = plan(cfg, Workload(frames=81), 24e9, 200e9)
    two = plan(cfg, Workload(frames=81), 24e9, 200e9, gpus=2)
    four = plan(cfg, Workload(frames=81), 24e9, 200e9, gpus=4)
    assert (two.tokens, two.local_tokens, four.local_tokens) == (32760, 16380, 8190)
    assert one.step_seconds / 2 < two.step_seconds < one.step_seconds / 1.85       # all-to-all costs a little
    assert one.step_seconds / 4 < four.step_seconds < one.step_seconds / 3.5
    assert two.vram_peak < one.vram_peak
    # host RAM: the streamed weights once, one process overhead per GPU
    assert two.shared_weights == one.weights_in_ram and two.ram_peak == one.ram_peak + two.process_ram
    assert "Ulysses over 2 GPUs" in two.describe()
    causal = Workload(frames=13, guidance=False, keys=18 * 1560, cache_bytes=40e9)
    assert plan(cfg, causal, None, gpus=4).vram_peak == pytest.approx(plan(cfg, causal, None).vram_peak - 30e9,
                                                                      rel=0.05)


def test_plan_command_with_gpus(capsys):
    assert main(["plan", "--variant", "lingbot-cam", "--gpus", "4", "--vram", "24GB", "--ram", "64GB"]) == 0
    out = capsys.readouterr().out
    assert "Ulysses over 4 GPUs" in out and "held once in shared memory" in out
    assert main(["plan", "--variant", "lingbot-cam", "--gpus", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpus 3" in err[0] and "use 2, 4, 5, 8" in err[0]


# ---- 3. launch ------------------------------------------------------------------------------------------------------

def _env(tmp_path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    return env


def torchrun(n: int, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                           "--master_port", str(_port()), "-m", "worldstream", *args],
                          capture_output=True, text=True, cwd=cwd, env=_env(cwd), timeout=300)


def _port() -> int:
    from worldstream.testing.parallel import free_port
    return free_port()


def test_torchrun_generate_writes_the_single_process_video(tmp_path, monkeypatch):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "lingbot-cam-tiny")
    demo_image().save(tmp_path / "first.png")
    args = ["generate", "--ckpt_dir", str(ckpt), "--image", str(tmp_path / "first.png"), "--prompt", "a walk",
            "--size", "112*64", "--action_string", "w-8", "--sample_steps", "2", "--device", "cpu",
            "--no_prompt_cache"]
    out = torchrun(2, *args, "--ulysses", "2", "--save_file", "two.mp4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("wrote two.mp4") == 1 and out.stdout.count("time: load") == 1   # rank 0 reports
    assert "parallel: 2 processes (Ulysses)" in out.stdout
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["two.mp4"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(args + ["--save_file", "one.mp4"]) == 0
    one, two = read_mp4(tmp_path / "one.mp4").astype(int), read_mp4(tmp_path / "two.mp4").astype(int)
    assert one.shape == two.shape and np.abs(one - two).max() <= 1


def test_torchrun_bad_world_size_fails_with_one_error(tmp_path):
    """3 processes for a model with 4 heads: every process refuses, one line says why, nothing is written."""
    out = torchrun(3, "stream", "--device", "cpu", "--ulysses", "3", "--save_file", "s.mp4", cwd=tmp_path)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("worldstream: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "4 attention heads" in errors[0] and "--ulysses 3" in errors[0]
    assert str(SRC / "worldstream") not in out.stderr          # no traceback from a worker (torchrun's own stays)
    assert not (tmp_path / "s.mp4").exists()


def test_ulysses_without_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["stream", "--device", "cpu", "--ulysses", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun --nproc_per_node 2 -m worldstream" in err[0]
