"""Several GPUs of one machine: Ulysses sequence parallelism side by side with one GPU, in one run (issue 18).

Random full-size weights (no checkpoint can be downloaded on the lent machines), bf16, the code paths of
`worldstream generate` / `stream` (runner, planner, streaming engine, RealtimeSession) with `--ulysses N`.
The driver starts one `torchrun --nproc_per_node N` per world size (1 first: the baseline, same script, same
machine), collects rank 0's results and prints the table the targets are read from:

  cam-step    LingBot Cam expert (18.5 B), 81 frames 480x832 (32,760 tokens), one CFG step = one batch-2
              forward, weights resident; median of --repeats forwards after a warm-up (compile). Reports s/step,
              speed-up against 1 GPU, peak VRAM per GPU, and the output's relative difference to the 1-GPU
              output (bf16: not bit-equal, the matmuls see other row counts).
              Targets: >= 1.85x on 2 GPUs, >= 3.5x on 4.
  fast-chunk  LingBot Fast v2 (causal, 4-frame chunks, 4 steps + refresh, window 18 / sink 6), bf16, Wan VAE
              decode on rank 0 ("exact"); and fp8 weights + 8-bit attention + TAEHV decode, window 9 / sink 3
              ("fast"). Warm-up until the window is full, then --chunks measured chunks: chunk wall time and FPS,
              reported against the 1-GPU figure.
  stream-ram  LingBot Cam expert streamed from pinned host RAM under --vram per GPU (default 16GB), two CFG
              steps: the machine's used host RAM (MemTotal - MemAvailable from /proc/meminfo, sampled every
              20 ms by local rank 0, minus its value before loading) against the bytes of the streamed weights;
              plus the sum of the processes' proportional set sizes after loading.
              Target: <= 1.15x the weights on 2 GPUs (one shared copy; N private copies would be N x).

    python benchmarks/multigpu.py --gpus 1,2,4 --out $OUT/multigpu.json     # an 8 x H200 machine: 1,2,4,8
    python benchmarks/multigpu.py --smoke                                  # CPU, gloo, tiny models (plumbing)

A world size above the machine's GPU count is skipped. Each world size is a fresh set of processes (its own
peaks); a case's failure is recorded and the run goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

CASES = ("cam-step", "fast-chunk", "stream-ram")
TARGETS = {"cam-step": {2: 1.85, 4: 3.5}, "stream-ram": {2: 1.15}}


# ---------------------------------------------------------------------------------------------- measuring

class HostRamSampler:
    """The machine's used RAM (MemTotal - MemAvailable) every `period` s in a thread; `peak` since `start`."""

    def __init__(self, period: float = 0.02):
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used() -> int:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0]) * 1024
        return info["MemTotal"] - info["MemAvailable"]

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.period)

    def start(self) -> "HostRamSampler":
        self.peak = self.used()
        self.thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return max(self.peak, self.used())


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_wan_vae(device, tiny: bool):
    import torch

    from worldstream.models.vae import VAEConfig, WanVAE
    torch.manual_seed(0)
    m = WanVAE(VAEConfig.tiny() if tiny else VAEConfig()).to(device).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    return m


def random_taehv(device, dtype):
    import torch

    from worldstream.models.taehv import TAEHV, TAEHVConfig
    torch.manual_seed(0)
    m = TAEHV(TAEHVConfig()).to(device=device, dtype=dtype).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    return m


# ---------------------------------------------------------------------------------------------- cases (in every rank)

def cam_inputs(cfg, frames, h, w, device, dtype):
    import torch
    g = torch.Generator().manual_seed(7)
    f, lh, lw = cfg.latent_grid(frames, h, w)
    inp = dict(x=torch.randn(2, 16, f, lh, lw, generator=g), y=torch.randn(2, 20, f, lh, lw, generator=g),
               t=torch.tensor([900.0, 900.0]), context=torch.randn(2, 512 if not cfg.is_tiny else 8, cfg.text_dim,
                                                                    generator=g) * 0.1,
               camera=torch.randn(1, cfg.control_in // 4, f, lh, lw, generator=g))
    out = {k: v.to(device) for k, v in inp.items()}
    out["camera"] = out["camera"].to(dtype)
    return out


def case_cam_step(sp, env, args, out_dir):
    import torch

    from worldstream.models.configs import get_config
    from worldstream.runtime.loading import RandomLoader
    from worldstream.runtime.planner import Workload
    from worldstream.runtime.runner import Forward, build_runner

    device, dtype = env.device, env.dtype
    cfg = get_config("lingbot-cam-tiny" if args.smoke else "lingbot-cam")
    frames, h, w = (9, 64, 64) if args.smoke else (81, 480, 832)
    ckpt = SimpleNamespace(config=cfg, experts={"high": None}, quant=None, root=None)
    wl = Workload(frames=frames, height=h, width=w, guidance=True, experts=1)
    t0 = time.perf_counter()
    runner = build_runner(ckpt, device, dtype, wl, loader=RandomLoader(cfg), parallel=sp)
    runner.start([Forward("high", 2)] * (1 + args.repeats))
    inp = cam_inputs(cfg, frames, h, w, device, dtype)
    times, out = [], None
    for k in range(1 + args.repeats):
        sync(device)
        t1 = time.perf_counter()
        y = runner("high", **inp)
        sync(device)
        times.append(time.perf_counter() - t1)
        if k == 0:
            out = y[:, :, :4].float().cpu()       # the first 4 latent frames: compared across world sizes
    if sp is None or sp.first:
        torch.save(out, out_dir / f"cam_step_w{env.world}.pt")
    plan = runner.plan
    return dict(model=cfg.name, frames=frames, height=h, width=w, tokens=cfg.tokens(frames, h, w),
                step_s=statistics.median(times[1:]), steps_s=times, warmup_s=times[0],
                build_and_first_s=time.perf_counter() - t0,
                resident=len(plan.resident) if plan else None, predicted_step_s=plan.step_seconds if plan else None,
                peak_vram_GB=env.peak_vram())


def case_fast_chunk(sp, env, args, out_dir):
    import torch

    from worldstream.models.configs import get_config
    from worldstream.pipelines.realtime import RealtimeSession
    from worldstream.runtime.loading import RandomLoader
    from worldstream.runtime.runner import DiTRunner

    device, dtype = env.device, env.dtype
    cfg = get_config("lingbot-fast-v2-tiny" if args.smoke else "lingbot-fast-v2")
    h, w = (32, 48) if args.smoke else (480, 832)
    first = sp is None or sp.first
    rows = []
    variants = [("exact", dict(quant=None, attention="sdpa", window=-1, sink=None, decoder="wan")),
                ("fast", dict(quant="fp8", attention="8bit", window=9, sink=3, decoder="tiny"))]
    for name, v in variants:
        if v["attention"] == "8bit" and device.type == "cpu" and not args.smoke:
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runner = DiTRunner(["fast"], RandomLoader(cfg, quant=v["quant"]), device, dtype, None,
                           attention=v["attention"], parallel=sp)
        wan = random_wan_vae(device, tiny=args.smoke) if first else None
        decoder = (wan if v["decoder"] == "wan" else
                   random_taehv(device, torch.float32 if device.type == "cpu" else torch.float16)) if first else None
        g = torch.Generator().manual_seed(1)
        image = torch.rand(3, h, w, generator=g) * 2 - 1
        context = torch.randn(min(40, cfg.text_len), cfg.text_dim, generator=g)
        s = RealtimeSession(runner, cfg, wan, decoder, context, image, h, w, device=device, dtype=dtype,
                            window=v["window"], sink=v["sink"], timing=True)
        window = s.window or 18
        warmup = -(-window // cfg.realtime.chunk) + 1
        walls, seconds = [], []
        keys = ["w"] * 8 + ["wj"] * 8
        for c in range(warmup + args.chunks):
            sync(device)
            t0 = time.perf_counter()
            ch = s.step(keys=set(keys[c % len(keys)]))
            sync(device)
            if c >= warmup:
                walls.append(time.perf_counter() - t0)
                seconds.append(ch.seconds)
        s.close()
        wall = statistics.median(walls)
        med = {k: statistics.median(x[k] for x in seconds) for k in seconds[0]}
        rows.append(dict(variant=name, model=cfg.name, quant=v["quant"], attention=v["attention"],
                         decoder=v["decoder"], window=s.window, sink=s.sink, chunk_wall_s=wall,
                         fps=s.video_frames_per_chunk / wall, frames_per_chunk=s.video_frames_per_chunk,
                         seconds=med, kv_cache_GB_per_gpu=s.cache.nbytes / 1e9, measured_chunks=len(walls),
                         peak_vram_GB=env.peak_vram()))
        del s, runner, wan, decoder
    return rows


def case_stream_ram(sp, env, args, out_dir):
    from worldstream.models.configs import get_config
    from worldstream.runtime.loading import RandomLoader
    from worldstream.runtime.memory import pss_bytes
    from worldstream.runtime.planner import Plan, Workload
    from worldstream.runtime.runner import DiTRunner, Forward, build_runner

    device, dtype = env.device, env.dtype
    cfg = get_config("lingbot-cam-tiny" if args.smoke else "lingbot-cam")
    frames, h, w = (9, 64, 64) if args.smoke else (81, 480, 832)
    ckpt = SimpleNamespace(config=cfg, experts={"high": None}, quant=None, root=None)
    sampler = HostRamSampler() if env.local_rank == 0 else None
    if sp is not None:
        sp.barrier()
    if sampler:
        sampler.start()
    base = sampler.peak if sampler else 0
    if device.type == "cuda":
        runner = build_runner(ckpt, device, dtype, Workload(frames=frames, height=h, width=w, guidance=True,
                                                             experts=1),
                              vram=args.vram * 1e9, loader=RandomLoader(cfg), parallel=sp)
    else:   # the CPU has no plan of its own: stream every block from host slabs (the same engine, synchronous)
        plan = Plan(n_blocks=cfg.num_layers, block_bytes=0, resident=[], prefetch=1, batched_guidance=True,
                    chunk=None, ram_blocks=list(range(cfg.num_layers)), disk_blocks=[], vram_peak=0, ram_peak=0,
                    weights_in_ram=0, step_seconds=0, resident_step_seconds=0, block_compute_s=0, block_copy_s=0)
        runner = DiTRunner(["high"], RandomLoader(cfg), device, dtype, plan, parallel=sp)
    runner.start([Forward("high", 2)] * 3)
    inp = cam_inputs(cfg, frames, h, w, device, dtype)
    times = []
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        runner("high", **inp)
        sync(device)
        times.append(time.perf_counter() - t0)
    e = runner.experts["high"]
    streamed_bytes = sum(src.buf.numel() for src in e.sources.values() if getattr(src, "buf", None) is not None)
    streamed_blocks = len(e.sources)
    pss = pss_bytes()
    pss_all = sp.gather(pss) if sp is not None else [pss]
    peak = sampler.stop() if sampler else None
    runner.close()
    row = dict(model=cfg.name, vram_budget_GB=args.vram, streamed_blocks=streamed_blocks,
               streamed_weights_GB=streamed_bytes / 1e9, step_s=times[-1], pss_sum_GB=sum(pss_all) / 1e9,
               peak_vram_GB=env.peak_vram())
    if peak is not None:
        row.update(host_used_before_GB=base / 1e9, host_used_peak_GB=peak / 1e9,
                   host_growth_GB=(peak - base) / 1e9,
                   host_growth_per_weights=(peak - base) / streamed_bytes if streamed_bytes else None)
    return row


# ---------------------------------------------------------------------------------------------- one world size

def worker(args) -> None:
    """One process of a `torchrun --nproc_per_node N` launch: the cases, rank 0 writes the results."""
    import torch

    from worldstream.runtime.parallel import SequenceParallel, launch_env

    env_ = launch_env()
    world = env_["world"]
    cuda = torch.cuda.is_available() and not args.smoke
    sp = SequenceParallel.launch(world, "cuda" if cuda else "cpu") if world > 1 else None
    device = sp.device if sp is not None else torch.device("cuda", env_["local_rank"]) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1 if args.smoke else torch.get_num_threads())
    env = SimpleNamespace(world=world, device=device, dtype=torch.bfloat16 if cuda else torch.float32,
                          local_rank=env_["local_rank"],
                          peak_vram=lambda: torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None)
    out_dir = Path(args.result).parent
    result = {"world": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "torch": torch.__version__, "cases": {}}
    cases = {"cam-step": case_cam_step, "fast-chunk": case_fast_chunk, "stream-ram": case_stream_ram}
    for name in args.cases.split(","):
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            row = cases[name](sp, env, args, out_dir)
            if sp is not None and cuda:   # every GPU's peak
                peaks = sp.gather(torch.cuda.max_memory_allocated(device) / 1e9)
                (row[0] if isinstance(row, list) else row)["peak_vram_GB_per_rank"] = peaks
            result["cases"][name] = row
        except Exception as e:  # noqa: BLE001 - one case's failure must not lose the others
            import traceback
            traceback.print_exc()
            result["cases"][name] = {"error": f"{type(e).__name__}: {e}"}
            if sp is not None:      # the processes may be out of step now: stop here
                break
        if sp is None or sp.first:
            print(json.dumps({name: result["cases"][name]}, default=str), flush=True)
    if sp is None or sp.first:
        with open(args.result, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if sp is not None:
        sp.close()


# ---------------------------------------------------------------------------------------------- driver

def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def launch(n: int, args, result: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
           "--worker", "--result", str(result), "--cases", args.cases, "--repeats", str(args.repeats),
           "--chunks", str(args.chunks), "--vram", str(args.vram)] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    print(f"--- {n} process(es): {' '.join(cmd[1:4])} ... ", flush=True)
    return subprocess.run(cmd, env=env, timeout=args.timeout)


def summarize(results: dict[int, dict], out_dir: Path) -> list[str]:
    import torch
    lines = []
    base = results.get(1, {}).get("cases", {})
    ref = out_dir / "cam_step_w1.pt"
    lines.append(f"{'case':12} {'GPUs':>4} {'time':>10} {'speed-up':>9} {'target':>7}  notes")
    for n, r in sorted(results.items()):
        c = r.get("cases", {}).get("cam-step")
        if not c:
            continue
        if "error" in c:
            lines.append(f"{'cam-step':12} {n:>4} ERROR {c['error'][:90]}")
            continue
        b = base.get("cam-step", {})
        sp = b["step_s"] / c["step_s"] if b and "step_s" in b else None
        diff = ""
        mine = out_dir / f"cam_step_w{n}.pt"
        if n > 1 and ref.exists() and mine.exists():
            a, w1 = torch.load(mine), torch.load(ref)
            c["rel_diff_vs_1gpu"] = float((a - w1).abs().max() / w1.abs().max())
            diff = f"max |diff| vs 1 GPU {c['rel_diff_vs_1gpu']:.2e} of max"
        t = TARGETS["cam-step"].get(n)
        lines.append(f"{'cam-step':12} {n:>4} {c['step_s']:>8.3f} s {sp or 0:>8.2f}x {('>=' + str(t)) if t else '':>7}"
                     f"  VRAM {c.get('peak_vram_GB') or 0:.1f} GB; {diff}")
    for n, r in sorted(results.items()):
        rows = r.get("cases", {}).get("fast-chunk")
        if not rows:
            continue
        if isinstance(rows, dict):
            lines.append(f"{'fast-chunk':12} {n:>4} ERROR {rows['error'][:90]}")
            continue
        for row in rows:
            b = next((x for x in base.get("fast-chunk", []) if isinstance(x, dict) and x.get("variant") == row["variant"]),
                     None)
            sp = row["fps"] / b["fps"] if b else None
            lines.append(f"{'fast/' + row['variant']:12} {n:>4} {row['chunk_wall_s']:>8.3f} s {sp or 0:>8.2f}x "
                         f"{'':>7}  {row['fps']:.2f} FPS, decode {row['seconds'].get('decode', 0) * 1e3:.0f} ms "
                         f"(rank 0), KV cache {row['kv_cache_GB_per_gpu']:.1f} GB per GPU")
    for n, r in sorted(results.items()):
        c = r.get("cases", {}).get("stream-ram")
        if not c:
            continue
        if "error" in c:
            lines.append(f"{'stream-ram':12} {n:>4} ERROR {c['error'][:90]}")
            continue
        t = TARGETS["stream-ram"].get(n)
        lines.append(f"{'stream-ram':12} {n:>4} {c['step_s']:>8.3f} s {'':>9} {('<=' + str(t)) if t else '':>7}"
                     f"  host RAM growth {c.get('host_growth_GB', 0):.1f} GB = "
                     f"{c.get('host_growth_per_weights') or 0:.2f}x the {c['streamed_weights_GB']:.1f} GB streamed; "
                     f"PSS sum {c['pss_sum_GB']:.1f} GB")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,2,4", help="world sizes, comma separated (1 is the baseline)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=3, help="measured cam-step forwards after the warm-up")
    ap.add_argument("--chunks", type=int, default=8, help="measured chunks per fast-chunk variant")
    ap.add_argument("--vram", type=float, default=16.0, help="GB per GPU for stream-ram (forces streaming)")
    ap.add_argument("--timeout", type=int, default=3000, help="seconds per world size")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU with gloo: the script runs")
    ap.add_argument("--out", default=None, help="results JSON (default $OUT/multigpu.json or "
                                                 "benchmarks/results/multigpu.json)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.repeats, args.chunks = 1, 1
    out = Path(args.out or (Path(os.environ["OUT"]) / "multigpu.json" if os.environ.get("OUT")
                            else HERE / "results" / ("multigpu_smoke.json" if args.smoke else "multigpu.json")))
    out.parent.mkdir(parents=True, exist_ok=True)
    have = gpu_count()
    results: dict[int, dict] = {}
    skipped = []
    with tempfile.TemporaryDirectory(prefix="worldstream-multigpu-") as tmp:
        for n in (int(v) for v in args.gpus.split(",")):
            if not args.smoke and n > have:
                skipped.append(n)
                continue
            res = Path(tmp) / f"w{n}.json"
            proc = launch(n, args, res)
            results[n] = json.loads(res.read_text()) if res.exists() else {"error": f"exit code {proc.returncode}"}
        lines = summarize(results, Path(tmp))
    doc = {"date": time.strftime("%Y-%m-%d"), "gpus_on_machine": have, "skipped_world_sizes": skipped,
           "targets": TARGETS, "smoke": args.smoke, "results": {str(k): v for k, v in results.items()},
           "table": lines}
    out.write_text(json.dumps(doc, indent=1, default=str))
    print("\n".join(lines))
    if skipped:
        print(f"skipped world sizes {skipped}: this machine has {have} GPU(s)")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
