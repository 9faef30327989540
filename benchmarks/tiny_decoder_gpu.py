"""Train the tiny world's tiny decoder (`worldstream train decoder`) on one GPU within one device call, evaluate
it against the Wan VAE's decoder on held-out worlds, and bring back what a model folder ships and what shows
the run:

    PYTHONPATH=src python3 benchmarks/tiny_decoder_gpu.py --minutes 2.5        # writes under $OUT/tiny_decoder
    PYTHONPATH=src python3 benchmarks/tiny_decoder_gpu.py --minutes 2 --resume # a second call, same machine
    PYTHONPATH=src python3 benchmarks/tiny_decoder_gpu.py --cpu-smoke          # the whole job on a CPU (~30 s)

Wall time: the pool (--pool_seconds, default 30 s: ~1,100 clips at ~26 ms each on an H200) and its encoding,
then --minutes of training, then the evaluation (--eval_clips held-out worlds, seeds 1,000,000 on, and the
CPU float32 timing of both decoders with 2 threads: ~20 s), plus start-up.

Under --out (default $OUT/tiny_decoder; 5 files, the largest ~2.6 MB):
    decoder.safetensors   the decoder, float16 (copy it to src/worldstream/assets/tiny_world_fast/)
    log.json              settings, loss curve, events and the evaluation (PSNR of the tiny decoder and of the
                          VAE decoder against the truth on the same latents, tiny vs VAE; CPU ms/frame of both)
    eval.json             the evaluation alone
    strip.png             truth / VAE decoder / tiny decoder, every 8th frame of two held-out worlds
    train.log             this script's output
The training state (weights + optimizer moments, ~16 MB) stays in --state of the repository copy, which a warm
machine keeps for --resume.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from worldstream.train import tiny_decoder as T


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=2.5, help="training time (default 2.5)")
    p.add_argument("--pool_seconds", type=float, default=30.0, help="clip rendering time (default 30)")
    p.add_argument("--eval_clips", type=int, default=32, help="held-out worlds evaluated (default 32)")
    p.add_argument("--state", default="runs/tiny_decoder", help="training state folder (kept for --resume)")
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--out", default=None, help="default: $OUT/tiny_decoder (outputs/tiny_decoder without $OUT)")
    p.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true",
                   help="the whole job on the CPU in well under a minute (4 tiny clips, seconds of training)")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                   help="other `worldstream train decoder` flags, e.g. batch=24 lr=3e-3")
    args = p.parse_args(argv)
    out = Path(args.out or os.path.join(os.environ.get("OUT", "outputs"), "tiny_decoder"))
    state = Path(args.state)
    if args.resume and not (state / "log.json").is_file():
        p.error(f"--resume: no training state in {state}")
    if args.resume:
        # the previous call's copies would be overwritten: keep state and out apart
        if out.resolve() == state.resolve():
            p.error("--out and --state must differ")
    out.mkdir(parents=True, exist_ok=True)
    work = state if not args.resume else state.with_name(state.name + "-next")
    if work.exists():
        shutil.rmtree(work)
    train_argv = ["--out", str(work), "--minutes", str(args.minutes), "--pool_seconds", str(args.pool_seconds),
                  "--eval_clips", str(args.eval_clips)]
    if args.cpu_smoke:
        train_argv = ["--out", str(work), "--preset", "smoke", "--device", "cpu"]
    if args.resume:
        train_argv += ["--resume", str(state)]
    for kv in args.set:
        name, sep, value = kv.partition("=")
        if not sep or not name:
            p.error(f"--set {kv!r}: expected NAME=VALUE")
        train_argv += [f"--{name}", *value.split(",")]

    t0 = time.perf_counter()
    with open(out / "train.log", "w") as logf, contextlib.redirect_stdout(_Tee(sys.stdout, logf)), \
            contextlib.redirect_stderr(_Tee(sys.stderr, logf)):
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
        print(f"{dev}; torch {torch.__version__}; train decoder {' '.join(train_argv)}", flush=True)
        rc = T.main(train_argv)
        if rc == 0 and args.resume:          # the continued state replaces the one it came from
            shutil.rmtree(state)
            work.rename(state)
            work = state
        if rc == 0:
            for name in (T.DECODER_FILE, "log.json", "strip.png"):
                if (work / name).is_file():
                    shutil.copyfile(work / name, out / name)
            log = json.loads((work / "log.json").read_text())
            if log.get("evaluation"):
                (out / "eval.json").write_text(json.dumps(log["evaluation"], indent=1))
        files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
        print(f"benchmarks/tiny_decoder_gpu.py: rc {rc}, {time.perf_counter() - t0:.0f} s; wrote {files} "
              f"under {out}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
