"""What step caching (`--step_cache`, pipelines/step_cache.py) costs in quality, measured against the same run
without it. Runs on a CPU.

1. Random weights: the tiny LingBot Cam (two experts, CFG) through `worldstream generate`'s own code
   (`pipelines.generate.run`) with the target job's schedule (70 UniPC steps, shift 10, guide 5; 17 frames at
   64x48 here), a few seeds: skipped steps and the relative error of the final latents vs the uncached run.
2. The shipped tiny world model (`lingbot-cam-world`, trained): held-out scenes generated one at a time (the
   decisions are per clip) uncached and cached: PSNR against the rendered ground truth (frames 1-32, as
   BENCHMARKS.md's world table), PSNR of the cached video against the uncached one, skipped steps, seconds.

    python benchmarks/step_cache_quality.py                          # both parts, CPU, ~10-20 minutes
    python benchmarks/step_cache_quality.py --scenes 2 --part world  # a quicker look
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

RANDOM_THRESHOLDS = (0.1, 0.3, 0.5, 1.0)
WORLD_THRESHOLDS = (0.02, 0.05, 0.1, 0.2)


def random_part(thresholds, seeds, steps: int) -> list[dict]:
    from worldstream.pipelines.generate import run
    from worldstream.pipelines.tasks import prepare
    from worldstream.testing import write_tiny_checkpoint
    from worldstream.testing.checkpoint import demo_image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_tiny_checkpoint(Path(tmp) / "lingbot", "lingbot-cam-tiny", seed=1)
        for seed in seeds:
            job = prepare(root, "a walk through a town", image=demo_image(64, 48), size="64*48", frame_num=17,
                          action_string="w-8,jw-8", steps=steps, seed=seed)
            t0 = time.perf_counter()
            base = run(job, device="cpu", progress=False)
            rows.append({"part": "random", "seed": seed, "threshold": None, "skipped": 0,
                         "seconds": time.perf_counter() - t0, "rel_err": 0.0})
            for th in thresholds:
                t0 = time.perf_counter()
                res = run(job, device="cpu", progress=False, step_cache=th)
                err = ((res.latents - base.latents).norm() / base.latents.norm()).item()
                sc = res.report["step_cache"]
                rows.append({"part": "random", "seed": seed, "threshold": th, "skipped": sc["skipped"],
                             "skipped_steps": sc["skipped_steps"], "seconds": time.perf_counter() - t0,
                             "rel_err": err})
                print(f"random seed {seed} threshold {th}: skipped {sc['skipped']}/{steps}, final latents "
                      f"rel. error {err:.4f}", file=sys.stderr, flush=True)
    return rows


def world_part(thresholds, scenes: int, seed_start: int) -> list[dict]:
    from worldstream.pipelines.step_cache import StepCache
    from worldstream.testing.world import WorldModel, psnr
    from worldstream.world import render_clip

    model = WorldModel.load(device="cpu")
    w, h = model.config.trained_size
    frames = model.config.sampling.frame_num
    rows = []
    for seed in range(seed_start, seed_start + scenes):
        clip = render_clip(seed, frames, h, w)
        gt = clip["frames"].transpose(0, 1)[None]                       # [1, 3, F, H, W]
        args = (gt[:, :, 0], [clip["poses"]], [clip["prompt"]], [seed])

        def measure(video):
            return psnr(video.transpose(1, 2), gt.transpose(1, 2))[0, 1:].mean().item()
        t0 = time.perf_counter()
        base = model.generate(*args, frames=frames)
        base_psnr = measure(base)
        rows.append({"part": "world", "seed": seed, "threshold": None, "skipped": 0,
                     "seconds": time.perf_counter() - t0, "psnr_gt": base_psnr, "psnr_vs_uncached": None})
        for th in thresholds:
            cache = StepCache(th)
            t0 = time.perf_counter()
            video = model.generate(*args, frames=frames, step_cache=cache)
            vs = psnr(video.transpose(1, 2), base.transpose(1, 2))[0].mean().item()
            rows.append({"part": "world", "seed": seed, "threshold": th, "skipped": len(cache.skipped),
                         "skipped_steps": cache.skipped, "seconds": time.perf_counter() - t0,
                         "psnr_gt": measure(video), "psnr_vs_uncached": vs})
            n = model.config.sampling.steps
            print(f"world scene {seed} threshold {th}: skipped {len(cache.skipped)}/{n}, "
                  f"PSNR vs truth {rows[-1]['psnr_gt']:.2f} dB (uncached {base_psnr:.2f}), vs uncached {vs:.1f} dB",
                  file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict], part: str, thresholds) -> list[dict]:
    out = []
    for th in (None, *thresholds):
        sel = [r for r in rows if r["part"] == part and r["threshold"] == th]
        if not sel:
            continue
        s = {"threshold": th, "runs": len(sel), "skipped_mean": sum(r["skipped"] for r in sel) / len(sel),
             "seconds_mean": sum(r["seconds"] for r in sel) / len(sel)}
        if part == "random":
            s["rel_err_mean"] = sum(r["rel_err"] for r in sel) / len(sel)
            s["rel_err_max"] = max(r["rel_err"] for r in sel)
        else:
            s["psnr_gt_mean"] = sum(r["psnr_gt"] for r in sel) / len(sel)
            vs = [r["psnr_vs_uncached"] for r in sel if r["psnr_vs_uncached"] is not None]
            s["psnr_vs_uncached_mean"] = sum(vs) / len(vs) if vs else None
            s["psnr_vs_uncached_min"] = min(vs) if vs else None
        out.append(s)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["both", "random", "world"], default="both")
    p.add_argument("--scenes", type=int, default=4, help="tiny-world scenes (held-out seeds from --seed_start)")
    p.add_argument("--seed_start", type=int, default=1_000_000)
    p.add_argument("--random_seeds", default="42,7,123")
    p.add_argument("--steps", type=int, default=70, help="steps of the random-weight runs (the target job's 70)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/step_cache_quality_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows: list[dict] = []
    if args.part in ("both", "random"):
        rows += random_part(RANDOM_THRESHOLDS, [int(s) for s in args.random_seeds.split(",")], args.steps)
    if args.part in ("both", "world"):
        rows += world_part(WORLD_THRESHOLDS, args.scenes, args.seed_start)
    res = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "threads": args.threads, "torch": torch.__version__,
           "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
           "random": summary(rows, "random", RANDOM_THRESHOLDS), "world": summary(rows, "world", WORLD_THRESHOLDS)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if res["random"]:
        print(f"\nRandom weights (lingbot-cam-tiny, {args.steps} steps, CFG 5, two experts), "
              f"{len(args.random_seeds.split(','))} seeds:\n| threshold | skipped steps | final latents rel. error "
              "(mean / max) |\n|---|---|---|")
        for s in res["random"]:
            print(f"| {s['threshold'] if s['threshold'] is not None else 'off'} | {s['skipped_mean']:.1f} | "
                  f"{s['rel_err_mean']:.2%} / {s['rel_err_max']:.2%} |")
    if res["world"]:
        print(f"\nTiny world (lingbot-cam-world, 30 steps), {args.scenes} held-out scenes:\n| threshold | skipped "
              "steps | PSNR vs truth, frames 1-32 | PSNR vs uncached (mean / min) |\n|---|---|---|---|")
        for s in res["world"]:
            vs = ("-" if s["psnr_vs_uncached_mean"] is None else
                  f"{s['psnr_vs_uncached_mean']:.1f} / {s['psnr_vs_uncached_min']:.1f} dB")
            print(f"| {s['threshold'] if s['threshold'] is not None else 'off'} | {s['skipped_mean']:.1f} | "
                  f"{s['psnr_gt_mean']:.2f} dB | {vs} |")
    print(f"wrote {out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
