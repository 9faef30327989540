"""The real-time chunk loop (pipelines/realtime.py) on tiny causal students written in their real layouts.

1. The session reproduces a sampler written here by hand from the spec, for v1 and v2: the 1000-step
   schedule, x0 with the first-index σ in float64, the re-noise with the second-index σ, the t = 0 refresh,
   and both noise orders.
2. Deterministic for a seed; a prompt switch keeps the frames seen and recomputes only the prompt's K/V.
3. 3,000 latent frames (past upstream's 1024-position RoPE table) with a window: constant memory.
4. Live keys move the camera; the incremental y equals a whole-clip encode.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from worldstream.checkpoints.dit import find_checkpoint
from worldstream.checkpoints.vae import VAE_FILE, load_vae
from worldstream.models.kv_cache import CrossKV, KVCache
from worldstream.models.taehv import TAEHV, TAEHVConfig
from worldstream.pipelines.realtime import ImageCondition, RealtimeSession
from worldstream.runtime.memory import rss_bytes
from worldstream.runtime.planner import Workload
from worldstream.runtime.runner import build_runner
from worldstream.testing import write_tiny_checkpoint
from worldstream.testing.checkpoint import demo_image

H, W = 32, 48


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    out = {}
    for variant in ("lingbot-fast-tiny", "lingbot-fast-v2-tiny"):
        root = tmp_path_factory.mktemp(variant)
        write_tiny_checkpoint(root, variant, seed=3)
        out[variant] = root
    return out


def session(root, **kw):
    ckpt = find_checkpoint(root)
    vae = kw.pop("vae", None) or load_vae(root / VAE_FILE)
    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, kw.pop("h", H), kw.pop("w", W), generator=g) * 2 - 1
    context = kw.pop("context", torch.randn(4, ckpt.config.text_dim, generator=g))
    runner = build_runner(ckpt, "cpu", torch.float32, Workload(guidance=False))
    decoder = kw.pop("decoder", vae)
    return RealtimeSession(runner, ckpt.config, vae, decoder, context, image, image.shape[1], image.shape[2], **kw)


def spec_schedule(indices, shift):
    """From the spec: sigmas = linspace(0.999, 0, 1001)[:-1] shifted; t = int64(1000 σ); x0 uses the first
    index holding t, the re-noise the second when t repeats."""
    sig = np.linspace(float(np.float32(0.999)), 0.0, 1001)[:-1]      # float64, from float32(0.999)
    sig = shift * sig / (1 + (shift - 1) * sig)
    ts = (sig * 1000).astype(np.int64)
    sig = sig.astype(np.float32)
    out = []
    for i in indices:
        where = np.nonzero(ts == ts[i])[0]
        out.append((int(ts[i]), float(sig[where[0]]), float(sig[where[min(1, len(where) - 1)]])))
    return out


@pytest.mark.parametrize("variant,indices,chunk", [("lingbot-fast-tiny", (0, 179, 358, 679), 3),
                                                   ("lingbot-fast-v2-tiny", (0, 250, 500, 750), 4)])
@pytest.mark.parametrize("noise", ["chunk", "upstream"])
@torch.no_grad()
def test_session_reproduces_the_samplers_written_from_the_spec(students, variant, indices, chunk, noise):
    chunks = 3
    frames = 4 * chunk * chunks - 3
    s = session(students[variant], noise=noise, total_frames=frames, window=None if "v2" not in variant else -1)
    assert s.rt.chunk == chunk and s.schedule.indices == indices
    got = [s.step() for _ in range(chunks)]

    # the reference: the same model, cache and conditioning, the loop written out by hand
    model = s.runner.loader.load("fast", set(), "cpu", torch.float32)[0]
    cfg = model.cfg
    steps = spec_schedule(indices, 10.0)
    assert [t for t, _, _ in steps] == s.schedule.timesteps
    g = torch.Generator().manual_seed(42)
    lat_h, lat_w = H // 8, W // 8
    clip_noise = torch.randn(16, chunk * chunks, lat_h, lat_w, generator=g) if noise == "upstream" else None
    cache = KVCache.empty(cfg.num_layers, 1, lat_h * lat_w // 4, cfg.num_heads, cfg.head_dim, torch.float32,
                          "cpu", window=s.window, sink=s.sink, max_frames=chunk * chunks)
    cross = CrossKV(cfg.num_layers)
    y_all = ImageCondition(s.vae, s.image)
    for c in range(chunks):
        start = c * chunk
        x = clip_noise[:, start:start + chunk].clone() if clip_noise is not None else \
            torch.randn(16, chunk, lat_h, lat_w, generator=g)
        kw = dict(context=s.context[None], y=y_all.chunk(start, chunk)[None],
                  camera=s.camera.condition(list(range(start, start + chunk)))[None],
                  cache=cache, cross=cross, start_frame=start)
        for k, (t, sig_x0, _) in enumerate(steps):
            v = model(x[None], torch.tensor([t]), **kw)[0]
            x0 = (x.double() - np.float64(np.float32(sig_x0)) * v.double()).float()
            if k + 1 < len(steps):
                sig_n = torch.tensor(steps[k + 1][2], dtype=torch.float32)
                x = (1 - sig_n) * x0 + sig_n * torch.randn(x0.shape, generator=g)
        model(x0[None], torch.tensor([0.0]), **kw)             # the refresh
        assert torch.equal(got[c].latents, x0), (c, (got[c].latents - x0).abs().max())
    assert [c.frames.shape[1] for c in got] == [4 * chunk - 3] + [4 * chunk] * (chunks - 1)


@torch.no_grad()
def test_same_seed_same_stream_and_prompt_switch_keeps_the_frames(students):
    root = students["lingbot-fast-v2-tiny"]
    ctx_a = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    ctx_b = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))

    def run(switch_to=None, seed=None):
        s = session(root, context=ctx_a, seed=seed)
        out = [s.step(keys={"w"}), s.step(keys=[set("w")] * 8 + [set("wj")] * 8)]
        if switch_to is not None:
            s.set_prompt(switch_to)
            assert s.cache.frames == 8             # the frames seen stay
        out.append(s.step(keys="wj"))
        return [c.latents for c in out]

    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_seed = run(seed=7)
    assert not torch.equal(a[0], other_seed[0])
    switched = run(switch_to=ctx_b)
    assert torch.equal(switched[1], a[1]) and not torch.equal(switched[2], a[2])
    back = run(switch_to=ctx_a)                    # the same prompt again: cross K/V recomputed, identical
    assert torch.equal(back[2], a[2])


@torch.no_grad()
def test_a_deferred_refresh_changes_when_frames_exist_not_what_they_are(students):
    """The server hands a chunk's frames out before its refresh forward (`defer_refresh`) and runs the refresh
    before reading the next keys; a caller that forgets, or switches the prompt, gets it run first. Same
    forwards in the same order: the same latents and frames as refreshing at once."""
    root = students["lingbot-fast-v2-tiny"]
    ctx_a = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    ctx_b = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))

    def run(defer):
        s = session(root, context=ctx_a)
        out = [s.step(keys="w", defer_refresh=defer)]
        if defer:
            assert "refresh" not in out[0].seconds and s.refresh() > 0 and s.refresh() == 0.0
        out.append(s.step(keys="wj", defer_refresh=defer))          # left pending: the next step runs it
        out.append(s.step(keys="a", defer_refresh=defer))
        s.set_prompt(ctx_b)                                          # runs the pending one with the old prompt
        out.append(s.step(keys="d", defer_refresh=defer))
        return out

    now, later = run(False), run(True)
    assert "refresh" in now[0].seconds and "refresh (previous chunk)" in later[2].seconds
    for a, b in zip(now, later):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)


@torch.no_grad()
def test_unbounded_stream_keeps_constant_memory(students):
    """3,000 latent frames (1,000 chunks, far past upstream's 1,024 RoPE positions) with a window: the
    cache's buffers never move or grow, and host memory stays flat (bound: 64 MB over 800 chunks)."""
    torch.manual_seed(0)
    s = session(students["lingbot-fast-tiny"], steps=1, window=6, sink=3, h=16, w=32,
                decoder=TAEHV(TAEHVConfig.tiny()).eval())      # the tiny decoder: the loop, not the VAE, is timed
    ptrs = [t.data_ptr() for t in s.cache.k + s.cache.v]
    nbytes = s.cache.nbytes
    rss = {}
    for c in range(1000):
        s.step(keys={"w", "l"} if c % 2 else {"w"})
        if c in (199, 999):
            rss[c] = rss_bytes()
    assert s.cache.frames == 3000 and s.cache.held == 6
    assert [t.data_ptr() for t in s.cache.k + s.cache.v] == ptrs and s.cache.nbytes == nbytes
    assert rss[999] - rss[199] < 64e6, rss


@torch.no_grad()
def test_keys_move_the_camera_and_y_equals_a_whole_clip_encode(students):
    root = students["lingbot-fast-tiny"]
    s = session(root, window=9)
    s.step(keys={"w"})
    s.step(keys={"w"})
    pose = s.camera.pose
    assert pose[2, 3] > 0.9 and abs(pose[0, 3]) < 1e-9        # 20 frames forward at 0.05 per frame
    # the live rule: a straight step is one unit, after the first latent frame
    cond = s.camera.condition([1, 2])
    assert torch.allclose(cond[2 * 64, 0], torch.ones_like(cond[2 * 64, 0]))    # t_z = 1
    # y, made chunk by chunk, equals the VAE encode of [image, zeros] for the whole clip
    clip = torch.zeros(1, 3, 4 * 9 + 1, H, W)
    clip[0, :, 0] = s.image
    whole = s.vae.encode(clip)[0]
    y = s.y.chunk(0, 10)
    assert torch.allclose(y[4:], whole, atol=1e-6)
    assert torch.equal(y[:4, 0], torch.ones_like(y[:4, 0])) and not y[:4, 1:].any()


@torch.no_grad()
def test_y_past_the_steady_point_still_equals_a_whole_clip_encode(students):
    """The black frames' latents are reused once the VAE encoder's causal state stops changing: from there on
    they are exactly what encoding the whole clip [image, zeros, ...] gives, however long it is."""
    s = session(students["lingbot-fast-tiny"], window=9)
    y = s.y
    y.latent(70)
    steady_at = len(y.latents)
    assert y.steady and 4 < steady_at < 64, steady_at      # (not the cap: the state really stopped changing)
    n = steady_at + 6                                       # latent frames past the steady point
    clip = torch.zeros(1, 3, 4 * (n - 1) + 1, H, W)
    clip[0, :, 0] = s.image
    whole = s.vae.encode(clip)[0]
    assert torch.allclose(y.chunk(0, n)[4:], whole, atol=1e-6, rtol=0)


@torch.no_grad()
def test_streamed_and_compressed_students_run_the_same_loop(students):
    """The student through the streaming engine (blocks from pinned host slabs, one resident) gives the resident
    session's latents bit for bit; int8 weights (dequantized on the CPU) stay close."""
    from worldstream.checkpoints.compressed import QuantPolicy
    from worldstream.runtime.loading import CheckpointLoader
    from worldstream.runtime.planner import Plan
    from worldstream.runtime.runner import DiTRunner, Forward, Schedule
    root = students["lingbot-fast-v2-tiny"]
    ckpt = find_checkpoint(root)
    plan = Plan(n_blocks=2, block_bytes=0, resident=[0], prefetch=1, batched_guidance=True, chunk=None,
                ram_blocks=[1], disk_blocks=[], vram_peak=0, ram_peak=0, weights_in_ram=0, step_seconds=0,
                resident_step_seconds=0, block_compute_s=0, block_copy_s=0)

    def latents(runner):
        s = session(root)
        s.runner = runner
        runner.start(Schedule.repeat([Forward("fast", 1)] * 5))
        return torch.cat([s.step(keys="wl").latents for _ in range(2)], dim=1)

    resident = latents(DiTRunner(["fast"], CheckpointLoader(ckpt), "cpu", torch.float32, None))
    streamed_runner = DiTRunner(["fast"], CheckpointLoader(ckpt), "cpu", torch.float32, plan, trace=True)
    streamed = latents(streamed_runner)
    assert torch.equal(streamed, resident)
    assert streamed_runner.engine.stats["copies"] >= 10          # block 1 crossed for every forward
    every_block = QuantPolicy("int8", skip_first_last=False)        # the tiny student has only 2 blocks
    int8 = latents(DiTRunner(["fast"], CheckpointLoader(ckpt, every_block), "cpu", torch.float32, None))
    err = ((int8 - resident).norm() / resident.norm()).item()
    assert 0 < err < 0.1, err


def test_stream_command_writes_the_video_and_refuses_bad_input(tmp_path, capsys):
    from worldstream.cli import main
    from worldstream.pipelines.video import mp4_info
    out = tmp_path / "walk.mp4"
    toy = write_tiny_checkpoint(tmp_path / "toy", "lingbot-fast-v2-tiny", seed=0)
    demo_image().save(tmp_path / "first.png")
    toy_args = ["--ckpt_dir", str(toy), "--image", str(tmp_path / "first.png"), "--prompt", "a walk"]
    assert main(["stream", *toy_args, "--action_string", "w-10,jw-6", "--save_file", str(out), "--device", "cpu",
                 "--no_prompt_cache"]) == 0, capsys.readouterr().err
    info = mp4_info(out)
    assert info["frames"] == 29 and (info["width"], info["height"]) == (112, 64)     # 13 + 16: two chunks
    printed = capsys.readouterr().out
    assert "chunk 0: 13 frames" in printed and "chunk 1: 16 frames" in printed and "FPS" in printed
    for bad, culprit in [(["--steps", "3"], "--steps 3"), (["--window", "3"], "--window 3"),
                         (["--action_string", "w-5,q-2"], "unknown key"), (["--frame_num", "0"], "--frame_num"),
                         (["--vae", "tiny"], "--taehv")]:
        target = tmp_path / "bad.mp4"
        assert main(["stream", *toy_args, "--save_file", str(target), "--device", "cpu", "--no_prompt_cache",
                     *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("worldstream: error:") and culprit in err and "Traceback" not in err, err
        assert not target.exists()
    ckpt = tmp_path / "base"
    write_tiny_checkpoint(ckpt, "lingbot-cam-tiny")
    assert main(["stream", "--ckpt_dir", str(ckpt), "--image", "x.png", "--prompt", "p", "--device", "cpu"]) == 2
    assert "not a causal" in capsys.readouterr().err


@torch.no_grad()
def test_sessions_from_one_first_frame_share_its_conditioning_and_get_the_same_numbers(students):
    """The server's sessions (and every reset) start from one first frame: its conditioning latents are
    encoded once and shared (`ImageConditions`), and a session that reuses them produces exactly what a
    session that encoded them itself does."""
    from worldstream.pipelines.realtime import ImageConditions

    root = students["lingbot-fast-v2-tiny"]
    memo = ImageConditions(capacity=2)
    vae = load_vae(root / VAE_FILE)                    # one VAE, as a server's sessions share (the memo keys on it)
    alone = session(root)
    first = session(root, conditions=memo, vae=vae)
    second = session(root, conditions=memo, vae=vae)
    assert second.y is first.y and len(memo) == 1
    keys = ["w", "wj", "a", "d"]
    ref = [alone.step(keys=k).latents for k in keys]
    assert all(torch.equal(first.step(keys=k).latents, r) for k, r in zip(keys, ref))
    assert all(torch.equal(second.step(keys=k).latents, r) for k, r in zip(keys, ref))   # extended by first
    second.reset()
    assert second.y is first.y and torch.equal(second.step(keys="w").latents, ref[0])
    other = session(root, conditions=memo, vae=vae)    # `session` draws the same image: the same entry
    assert other.y is first.y
    other.reset(image=-first.image)                     # another first frame: its own entry
    assert other.y is not first.y and len(memo) == 2
    second.reset(image=first.image * 0.5)               # a third: the least recently used one goes
    assert len(memo) == 2 and second.y is not first.y
