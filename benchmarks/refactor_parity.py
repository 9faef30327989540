"""Same machine, side by side: one CFG step of LingBot Cam before and after a change of the code's layout.

Runs `benchmarks/offload.py`'s worldstream job (random full-size bf16 weights, the planner's plan for each VRAM
cap) from two source trees in turn, each in a fresh subprocess: a copy of the pre-change commit (`--baseline`,
its own `benchmarks/offload.py` and `src/`) and this working tree. The 9-frame points are then measured again
in the opposite order, which gives the run-to-run spread to judge a difference by.

    python benchmarks/refactor_parity.py --baseline .baseline --out $OUT/parity.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
POINTS = [(9, 24), (9, 8), (81, 24), (81, 8)]


def spawn(tree: str, points, model: str) -> list[dict]:
    spec = dict(method="worldstream", model=model, points=points)
    script = os.path.join(tree, "benchmarks", "offload.py")
    t0 = time.time()
    p = subprocess.run([sys.executable, script, "--job", json.dumps(spec)], capture_output=True, text=True)
    rows = [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    print(f"[{tree}] {time.time() - t0:.0f} s, rc {p.returncode}", flush=True)
    if p.returncode:
        print(p.stderr[-3000:], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="a copy of the pre-change commit (src/ and benchmarks/)")
    ap.add_argument("--model", default="lingbot-cam")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "refactor_parity.json"))
    args = ap.parse_args()
    after = os.path.dirname(HERE)
    runs = []
    for label, tree, points in [("before", args.baseline, POINTS), ("after", after, POINTS),
                                ("after", after, POINTS[:2]), ("before", args.baseline, POINTS[:2])]:
        for row in spawn(tree, points, args.model):
            runs.append(dict(row, code=label))
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "model": args.model, "rows": runs}, f, indent=1)
    print(f"\n{'frames':>6} {'cap':>4} {'before s':>9} {'after s':>9} {'after/before':>13}  (each run's s/step)")
    for frames, cap in POINTS:
        pick = lambda code: [r["s_per_step"] for r in runs   # noqa: E731
                             if r["code"] == code and r["frames"] == frames and r["cap_GB"] == cap and "s_per_step" in r]
        b, a = pick("before"), pick("after")
        if a and b:
            print(f"{frames:>6} {cap:>4} {min(b):>9.3f} {min(a):>9.3f} {min(a) / min(b):>13.3f}  "
                  f"before {['%.3f' % x for x in b]}, after {['%.3f' % x for x in a]}")


if __name__ == "__main__":
    main()
