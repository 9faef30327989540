"""The cost of checking weights finite while loading (checkpoints/tensors.py `nonfinite`), per GB of weights.

The check runs on the host copy of every tensor as it is read (before it goes to its slab or the GPU), so its
cost is host CPU / memory bandwidth. Measured on 1 GiB tensors of each stored dtype, as the median of 5 runs;
prints seconds per GB and what that means for one full-size expert (LingBot 37.1 GB bf16, its fp8
conversion 23.7 GB).

    python benchmarks/finite_check.py [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from worldstream.checkpoints.tensors import nonfinite

GIB = 2**30
EXPERT = {"bf16": 37.09e9, "fp8": 23.75e9}   # bytes of one LingBot expert (worldstream info)


def seconds(t: torch.Tensor, runs: int = 5) -> float:
    nonfinite(t)                              # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        assert not nonfinite(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = {}
    for name, dtype in [("bf16", torch.bfloat16), ("fp32", torch.float32), ("fp8", torch.float8_e4m3fn)]:
        t = torch.randn(GIB // dtype.itemsize // 4, 4).to(dtype)     # 1 GiB, 2-D like a weight
        s = seconds(t)
        rows[name] = {"s_per_GB": s / (GIB / 1e9), "GB_per_s": GIB / 1e9 / s}
        del t
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "results": rows,
            "lingbot_expert_s": {k: EXPERT[k] / 1e9 * rows[k]["s_per_GB"] for k in EXPERT}}
    for name, r in rows.items():
        print(f"{name}: {r['s_per_GB'] * 1e3:.1f} ms per GB ({r['GB_per_s']:.1f} GB/s)")
    print(f"one LingBot expert: bf16 {info['lingbot_expert_s']['bf16']:.2f} s, fp8 {info['lingbot_expert_s']['fp8']:.2f} s "
          f"({info['cpus']} CPUs, {info['torch_threads']} torch threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
