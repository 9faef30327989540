"""Real-time benchmark: the causal students' chunk loop on one GPU, side by side with upstream's way.

Full-size random weights (no checkpoint can be downloaded), 480x832, batch 1, the session of
pipelines/realtime.py exactly as `worldstream stream` runs it. Variants, in one process and one run:

  eager-upstream  LingBot Fast 18.5 B (v2 settings: 4-frame chunks, 4 steps + refresh, window 18 / sink 6),
                  bf16, eager elementwise work, upstream's clone-shift cache (copies on eviction), Wan VAE decode
  exact           the same model and settings through worldstream (fused kernels, ring cache), Wan VAE
  fast            fp8 weights, 8-bit self-attention, window 9 / sink 3, TAEHV decoder (random weights), 4 steps
  fast-1step      the same with one denoising step (t = 999) + refresh
  1.3b / 1.3b-fast / 1.3b-1step   the v2 1.3B: bf16 exact; fp8 + 8-bit attention + TAEHV, 4 steps; 1 step
  long(-graphs)   1.3B fast, 1 step, 500 chunks: per-chunk latency at chunk 500 vs chunk 60
  *-graphs        fast, fast-1step, 1.3b-fast, 1.3b-1step with every chunk forward replayed as a CUDA graph
                  (`--cuda_graphs`, runtime/graphs.py: one launch instead of ~1,000 kernels; same numbers)
  fast-24gb       the fast settings planned and streamed under a 24 GB cap: FPS, the transfer floor, the planner
  fast-profile    the fast settings, then one chunk under torch.profiler: GPU time by kernel kind
  fast-w7(-graphs) the fast settings with the smallest window a 4-frame chunk allows beside a sink of 3: 7
                  latent frames (the issue's fast settings allow <= 9): 22 % fewer keys per query
  graphs-parity   the 1.3B fast settings, 8 chunks with and without graphs: the latents must be equal

Each variant: warm-up chunks until the window is full, then `--chunks` measured chunks (steady state); per
chunk: each forward, the refresh, decode, camera, and the wall time from keys in to the last pixel out
(key-to-pixel latency = a chunk's wall time: keys for chunk n are read when it starts, its first pixel comes
with its decode). FLOPs of the forwards at the measured bf16 rate give the compute floor.

    python benchmarks/realtime.py --out $OUT/realtime.json            # H200
    python benchmarks/realtime.py --smoke                             # tiny, CPU: checks the script runs
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from worldstream.models.configs import get_config  # noqa: E402
from worldstream.models.kv_cache import KVCache  # noqa: E402
from worldstream.pipelines.realtime import RealtimeSession  # noqa: E402
from worldstream.checkpoints.dit import Checkpoint  # noqa: E402
from worldstream.runtime.loading import RandomLoader  # noqa: E402
from worldstream.runtime.planner import Workload  # noqa: E402
from worldstream.runtime.runner import build_runner  # noqa: E402
from worldstream.testing.random_models import (EXPERT, RANDOM_ROOT, random_inputs, random_runner,  # noqa: E402
                                               random_taehv, random_vae)

H, W = 480, 832


class CloneShiftCache(KVCache):
    """Upstream's cache (model_fast.py): one buffer of `window` frames; when a new chunk would overflow it, the
    frames after the sink are copied left by the overflow (`.clone()` of the rolled span), and the chunk is
    written at the end. What the baseline pays for eviction."""

    def begin_chunk(self, start: int, n: int) -> None:
        ft = self.frame_tokens
        if start + n > self.frames and self.window is not None:
            end = min(self.frames, self.capacity)
            overflow = end + n - self.capacity
            if overflow > 0:
                rolled = end - overflow - self.sink
                for buf in self.k + self.v:
                    s, e = self.sink * ft, (self.sink + rolled) * ft
                    buf[:, s:e] = buf[:, s + overflow * ft:e + overflow * ft].clone()
            self._base = min(end, self.capacity - n)
        self._writes = [(self._base * ft, 0, n * ft)]
        self.frames = max(self.frames, start + n)
        self._visible = (self._base + n) * ft


def graphs_parity(cfg, *, device, dtype, decoder, vae, chunks=8, h=H, w=W, **settings) -> dict:
    """The same stream with and without CUDA graphs: latents per chunk must be equal bit for bit."""
    out = {}
    for graphs in (False, True):
        runner = random_runner(cfg, device, dtype, settings.get("quant"), settings.get("attention", "sdpa"),
                               graphs=graphs)
        image, context = random_inputs(cfg, h, w)
        s = RealtimeSession(runner, cfg, vae, decoder, context, image, h, w, device=device, dtype=dtype,
                            window=settings.get("window", -1), sink=settings.get("sink"))
        out[graphs] = torch.stack([s.step(keys={"w"} if c % 2 else {"d"}).latents for c in range(chunks)]).cpu()
        stats = dict(runner.graphs.stats) if graphs else None
        s.close()
        del s, runner
    diff = (out[True] - out[False]).abs().max().item()
    row = dict(variant="graphs-parity", model=cfg.name, chunks=chunks, equal=bool(torch.equal(out[True], out[False])),
               max_abs_diff=diff, graphs=stats)
    print(json.dumps(row), flush=True)
    return row


def forward_flops(cfg, chunk_tokens: int, keys: int) -> float:
    mm, attn = cfg.block_flops(chunk_tokens, 1, keys)
    return cfg.num_layers * (mm + attn)


def run_variant(name, cfg, *, device, dtype, decoder, vae, chunks, warmup, steps=None, window=-1, sink=None,
                quant=None, attention="sdpa", fuse=True, cache_cls=None, h=H, w=W, keep_latency=False,
                graphs=False, vram=None, profile=False):
    t0 = time.perf_counter()
    if vram is None:
        runner = random_runner(cfg, device, dtype, quant, attention, fuse, graphs=graphs)
    else:   # planned and streamed as `worldstream stream --vram` plans it (the KV cache budgeted beside the weights)
        runner = budget_runner(cfg, device, dtype, quant, attention, vram, h, w, window)
    image, context = random_inputs(cfg, h, w)
    s = RealtimeSession(runner, cfg, vae, decoder, context, image, h, w, device=device, dtype=dtype,
                        steps=steps, window=window, sink=sink, timing=True)
    if cache_cls is not None:
        old = s.cache
        s.cache = cache_cls(old.k, old.v, old.frame_tokens, old.capacity, old.sink, old.window)
    build = time.perf_counter() - t0
    rows, warm_rows = [], []
    keys = ["w"] * 8 + ["wj"] * 8
    # warm-up: `warmup` chunks, and on until the first frame's conditioning is steady (the black frames after the
    # first frame are VAE-encoded chunk by chunk until their latents stop changing: pipelines/realtime.py
    # ImageCondition, ~0.3 s a chunk on the GPU for the first ~8 chunks), so that the measured chunks are the
    # unbounded stream's steady state; the warm-up chunks are reported apart
    c = 0
    while len(rows) < chunks:
        wall0 = time.perf_counter()
        y_steady = s.y is None or s.y.steady
        ch = s.step(keys=set(keys[c % len(keys)]), look=(1.0, 0.0) if c % 3 == 0 else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - wall0
        row = dict(chunk=c, wall=wall, frames=ch.frames.shape[1], y_steady=y_steady, **ch.seconds)
        (rows if c >= warmup and y_steady else warm_rows).append(row)
        c += 1
    if keep_latency:
        rows = warm_rows + rows
    rt = cfg.realtime
    ft = (h // 16) * (w // 16)
    held = s.window if s.window is not None else s.frame
    steady = rows if not keep_latency else rows[len(warm_rows):]
    med = lambda k: statistics.median(r[k] for r in steady if k in r)   # noqa: E731
    n_fw = len(s.schedule) + 1
    flops = n_fw * forward_flops(cfg, rt.chunk * ft, held * ft)
    out = dict(variant=name, model=cfg.name, steps=len(s.schedule), chunk_latent_frames=rt.chunk,
               window=s.window, sink=s.sink, quant=quant, attention=attention, fused=fuse,
               cache="clone-shift" if cache_cls else "ring", decoder=type(decoder).__name__,
               frames_per_chunk=s.video_frames_per_chunk, chunk_wall_s=med("wall"),
               fps=s.video_frames_per_chunk / med("wall"), forward_s=[med(f"forward {k}") for k in range(len(s.schedule))],
               refresh_s=med("refresh"), decode_s=med("decode"), camera_s=med("camera"),
               key_to_pixel_s=med("wall"), flops_per_chunk=flops, build_s=build, measured_chunks=len(steady),
               warmup_chunks=len(warm_rows), warmup_walls_s=[r["wall"] for r in warm_rows],
               y_steady_from_chunk=next((r["chunk"] for r in warm_rows + rows if r["y_steady"]), None),
               kv_cache_GB=s.cache.nbytes / 1e9,
               peak_vram_GB=torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
               graphs=dict(runner.graphs.stats) if runner.graphs is not None else None)
    if keep_latency:
        out["latency_by_chunk"] = [(r["chunk"], r["wall"]) for r in rows]
    if profile:
        out["profile"] = profile_chunk(s, keys)
    if vram is not None:
        p = runner.plan
        bw = pinned_bandwidth(device)
        streamed = len(p.streamed) * p.block_bytes
        out.update(vram_GB=vram / 1e9, predicted_forward_s=p.step_seconds, resident_blocks=len(p.resident),
                   streamed_blocks=len(p.streamed), prefetch=p.prefetch, streamed_GB_per_forward=streamed / 1e9,
                   pinned_h2d_GBps=bw / 1e9, transfer_floor_chunk_s=n_fw * streamed / bw,
                   measured_forward_s=statistics.mean(out["forward_s"] + [out["refresh_s"]]),
                   plan=p.describe(), peak_reserved_GB=torch.cuda.max_memory_reserved() / 1e9)
        torch.cuda.set_per_process_memory_fraction(1.0)
    s.close()
    del s, runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps({k: v for k, v in out.items() if k != "latency_by_chunk"}), flush=True)
    return out


KERNEL_KINDS = (("fp8 GEMM", ("f8", "e4m3", "scaled_mm", "fp8gemm")), ("attention", ("flash", "fmha", "attn", "sdpa")),
                ("quantize", ("quant", "amax", "triton_red", "triton_per")), ("GEMM", ("gemm", "nvjet", "cutlass", "sm90_xmma")),
                ("copy", ("memcpy", "copy")))


def profile_chunk(s, keys) -> dict:
    """One more chunk under torch.profiler: GPU time by kernel (top 30) and by kind, to say where a forward's time
    goes beyond its FLOP floor (the issue's "fp8 barely helps: find out why")."""
    from torch.profiler import ProfilerActivity, profile
    cuda = s.device.type == "cuda"      # (on the CPU, the smoke test: operators' CPU time instead of kernels)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        s.step(keys={"w"})
        sync()
    kernels = {}
    for e in prof.events():
        if e.device_type.name == ("CUDA" if cuda else "CPU"):
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.device_time_total if cuda else e.self_cpu_time_total
            k[1] += 1
    kinds = {}
    for name, (us, n) in kernels.items():
        low = name.lower()
        kind = next((k for k, pats in KERNEL_KINDS if any(p in low for p in pats)), "elementwise/other")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e6
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:30]
    return dict(by_kind_s=kinds, total_s=sum(kinds.values()), kernels=sum(n for _, n in kernels.values()),
                top=[(name[:160], us / 1e6, n) for name, (us, n) in top])


def budget_runner(cfg, device, dtype, quant, attention, vram, h, w, window):
    """The random-weight student planned under `vram` bytes with its KV cache (pipelines/stream.py load_student's
    workload), the process capped at `vram` (a smaller GPU, simulated)."""
    rt = cfg.realtime
    held = rt.window if window == -1 else window
    vf = cfg.latents.video_frames
    workload = Workload(frames=vf(rt.chunk), height=h, width=w, guidance=False, keys=cfg.tokens(vf(held), h, w),
                        cache_bytes=cfg.kv_cache_bytes(held, h, w, torch.finfo(dtype).bits // 8))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, vram / torch.cuda.get_device_properties(device).total_memory))
        torch.cuda.reset_peak_memory_stats()
    ckpt = Checkpoint(RANDOM_ROOT, "random", {EXPERT: RANDOM_ROOT}, cfg)
    return build_runner(ckpt, device, dtype, workload, vram=vram, loader=RandomLoader(cfg, quant=quant),
                        quant=quant, attention=attention)


def pinned_bandwidth(device) -> float:
    """Host (pinned) -> device copy rate in bytes/s, 1 GiB copies."""
    host = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * 2**30 / (time.perf_counter() - t0)


def matmul_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU (the script runs)")
    ap.add_argument("--chunks", type=int, default=20, help="measured chunks per variant (steady state)")
    ap.add_argument("--long", type=int, default=500, help="chunks of the long-run latency check")
    ap.add_argument("--only", default=None, help="comma list of variants, each NAME or NAME:CHUNKS (its measured "
                                                  "chunks, instead of --chunks)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "realtime.json"))
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    h, w = (32, 48) if args.smoke else (H, W)
    big = get_config("lingbot-fast-v2-tiny" if args.smoke else "lingbot-fast-v2")
    small = get_config("lingbot-fast-v2-tiny" if args.smoke else "lingbot-fast-v2-1.3b")
    if args.smoke:
        from worldstream.runtime import attention8  # noqa: F401
    chunks = 2 if args.smoke else args.chunks
    wan = random_vae(device, tiny=args.smoke)
    tae = random_taehv(device, torch.float32 if args.smoke else torch.float16)
    common = dict(device=device, dtype=dtype, vae=wan, h=h, w=w)
    warm14 = -(-big.realtime.window // big.realtime.chunk) + 1            # window full, then one more
    fast_window = dict(window=9, sink=3) if not args.smoke else dict(window=9, sink=3)
    fast = dict(decoder=tae, warmup=4, quant="fp8", attention="8bit", **common)     # the fast settings
    w9, w7 = fast_window, dict(window=7, sink=3)
    # name -> (model, settings): every row is `run_variant(name, model, chunks=chunks, **settings)`
    rows = {
        "eager-upstream": (big, dict(decoder=wan, warmup=warm14, fuse=False, cache_cls=CloneShiftCache,
                                     chunks=max(chunks // 2, 2), **common)),
        "exact": (big, dict(decoder=wan, warmup=warm14, **common)),
        "fast": (big, dict(**fast, **w9)),
        "fast-1step": (big, dict(**fast, **w9, steps=1)),
        "1.3b": (small, dict(decoder=wan, warmup=warm14, **common)),
        "1.3b-fast": (small, dict(**fast, **w9)),
        "1.3b-1step": (small, dict(**fast, **w9, steps=1)),
        "fast-w7": (big, dict(**fast, **w7)),
        # weights partly streamed: the fast settings under a 24 GB cap (the exact settings' window of 18 latent
        # frames is a 23 GB KV cache at 480p: no room for a block slot beside it)
        "fast-24gb": (big, dict(**fast, **w9, **({} if args.smoke else dict(vram=24e9)))),
        "long": (small, dict(**fast, **w9, steps=1, keep_latency=True,
                             chunks=(10 if args.smoke else args.long) - 4)),
        "long-graphs": (small, dict(**fast, **w9, steps=1, keep_latency=True, graphs=True,
                                    chunks=(10 if args.smoke else args.long) - 4)),
    }
    rows["fast-profile"] = (big, dict(**fast, **w9, profile=True))
    for name in ("fast", "fast-1step", "1.3b-fast", "1.3b-1step", "fast-w7"):   # the same with CUDA graphs
        model, settings = rows[name]
        rows[f"{name}-graphs"] = (model, dict(settings, graphs=True))
    wanted = [item.split(":") for item in args.only.split(",")] if args.only else [[name] for name in rows]
    counts = {item[0]: (2 if args.smoke else int(item[1])) for item in wanted if len(item) == 2}
    variants = {name: (lambda name=name, model=model, settings=settings:
                       run_variant(name, model, **dict(dict(chunks=counts.get(name, chunks)), **settings)))
                for name, (model, settings) in rows.items()}
    variants["graphs-parity"] = lambda: graphs_parity(small, chunks=4 if args.smoke else 8, **{
        k: v for k, v in dict(**fast, **w9).items() if k != "warmup"})
    wanted = [item[0] for item in wanted] if args.only else list(variants)
    unknown = [name for name in wanted if name not in variants]
    if unknown:
        raise SystemExit(f"--only: unknown variants {unknown}; known: {', '.join(variants)}")
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "height": h, "width": w,
              "bf16_matmul_TFLOPs": matmul_tflops(device), "rows": []}
    for name in wanted:
        try:
            result["rows"].append(variants[name]())
        except Exception as e:   # noqa: BLE001 - record and go on: one variant's failure must not lose the run
            import traceback
            traceback.print_exc()
            result["rows"].append(dict(variant=name, error=f"{type(e).__name__}: {e}"))
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{'variant':15} {'model':22} {'steps':>5} {'chunk s':>8} {'FPS':>6} {'fwd ms':>7} {'refresh':>8} "
          f"{'decode':>7} {'floor s':>8}")
    tf = result["bf16_matmul_TFLOPs"] or 1.0
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['variant']:15} ERROR {r['error'][:100]}")
            continue
        if r["variant"] == "graphs-parity":
            print(f"{r['variant']:15} {r['model']:22} equal: {r['equal']} (max |diff| {r['max_abs_diff']:.3g}), "
                  f"graphs {r['graphs']}")
            continue
        print(f"{r['variant']:15} {r['model']:22} {r['steps']:>5} {r['chunk_wall_s']:>8.3f} {r['fps']:>6.1f} "
              f"{1e3 * statistics.mean(r['forward_s']):>7.0f} {1e3 * r['refresh_s']:>8.0f} {1e3 * r['decode_s']:>7.0f} "
              f"{r['flops_per_chunk'] / (tf * 1e12):>8.3f}")
        if "latency_by_chunk" in r:
            lat = dict(r["latency_by_chunk"])
            near = lambda c: statistics.median(v for k, v in lat.items() if abs(k - c) <= 5)   # noqa: E731
            early, late = min(60, max(lat) // 2), max(lat) - 5
            r["latency_early_late"] = (early, near(early), late, near(late))
            print(f"   latency around chunk {early}: {near(early):.4f} s, around chunk {late}: {near(late):.4f} s "
                  f"({near(late) / near(early):.3f}x)")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
