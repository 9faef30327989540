"""Distil the shipped tiny world (`lingbot-cam-world`) into its causal 4-step student on one GPU, within one
device call (< 9 minutes), and bring back what the package ships and what shows the run:

    PYTHONPATH=src python3 benchmarks/distill_gpu.py --minutes 8                    # writes under $OUT
    PYTHONPATH=src python3 benchmarks/distill_gpu.py --minutes 8 --resume           # a second call, same machine

Under $OUT (8 files at most, each < 16 MiB):
    student/transformers/   the EMA student in the causal layout (config.json, 2 float16 shards, index)
    student_ode.safetensors the EMA student at the end of the ODE regression (float16, upstream names), to compare
    curves.json, curves.png loss curves (png only where matplotlib is installed)
    train.log               the run's log (settings, phases, timings)
The training state (models, optimizer moments, ODE pairs: ~300 MB) stays in runs/distill of the repository copy,
which a warm machine keeps for `--resume`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from worldstream.train import distill as D


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--state", default="runs/distill")
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/distill_gpu"))
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="DistillConfig overrides")
    args = p.parse_args()
    out, state = Path(args.out), Path(args.state)
    out.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    argv = ["--out", str(state), "--minutes", str(args.minutes), "--export", str(out / "student")]
    if args.resume:
        argv += ["--resume", str(state)]
    for kv in args.set:
        name, value = kv.split("=", 1)
        argv += [f"--{name}", value]
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; torch {torch.__version__}",
          flush=True)
    rc = D.main(argv)
    for name in ("curves.json", "curves.png", "train.log", "student_ode.safetensors"):
        if (state / name).is_file():
            shutil.copyfile(state / name, out / name)
    print(f"benchmarks/distill_gpu.py: done in {time.perf_counter() - t0:.0f} s; wrote "
          f"{sorted(str(f.relative_to(out)) for f in out.rglob('*') if f.is_file())}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
