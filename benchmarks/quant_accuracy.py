"""Accuracy and speed of compressed block weights (fp8 / fp8-block / int8) on one full-size Wan 14B block.

What it measures, on a GPU, for a random block with Wan 14B shapes (dim 5120, ffn 13824, bf16) whose linear
weights have std 0.02 plus a few outlier input channels (8-32x):
  1. per linear: relative error of the weight, and of the linear's output on the inputs it really sees inside a
     block forward (captured with hooks), vs the bf16 linear, for each format, by the dequantize path and, for
     "fp8" on Ada/Hopper, by the fp8 x fp8 `torch._scaled_mm` path;
  2. per block: relative error of the block's update (output - input) vs the bf16 block, at 9 frames' tokens;
     the bf16 block vs a float32 copy is printed too, as the floor that bf16 itself sets;
  3. time of one block forward at 9 and 81 frames (4,680 and 32,760 tokens at 480x832), batch 1 and 2 (CFG
     batched), for bf16, fp8 by `_scaled_mm`, and each format by the dequantize path; and of the two FFN
     linears alone at 32,760 tokens, with the cost of quantizing activations / dequantizing the weight.
Writes $OUT/quant_accuracy.json (or benchmarks/results/quant_accuracy.json when OUT is unset, or --out) and
prints tables. About a minute on an H100.

    python benchmarks/quant_accuracy.py               # needs CUDA
    python benchmarks/quant_accuracy.py --cpu-smoke   # tiny shapes on CPU: checks the script, not the numbers
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))   # runs from a checkout without installing

from worldstream.models.configs import get_config          # noqa: E402
from worldstream.models.dit import Block, rope_grid, rope_table  # noqa: E402
from worldstream.models import quant                         # noqa: E402
from worldstream.models.quant import FORMATS, QLinear, quantize_block_, set_matmul_options  # noqa: E402
from worldstream.runtime.slab import BlockLayout              # noqa: E402

# Latent grids (frames, rows, columns) of 480x832 video: 9 frames -> 3 latent frames, 81 -> 21.
GRIDS = {"9 frames": (3, 30, 52), "81 frames": (21, 30, 52)}
SMOKE_GRIDS = {"small": (2, 3, 4), "large": (3, 4, 5)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def realistic_(block: nn.Module, seed: int) -> None:
    """Linear weights N(0, 0.02) with ~1 in 1000 input channels (at least 2) scaled 8-32x; biases N(0, 0.01);
    norm weights 1 + N(0, 0.05); modulation N(0, 0.05)."""
    dev = next(block.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    with torch.no_grad():
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear):
                w = randn(*m.weight.shape) * 0.02
                k = w.shape[1]
                cols = torch.randperm(k, generator=g, device=dev)[:max(2, k // 1000)]
                w[:, cols] *= 8 + 24 * torch.rand(len(cols), generator=g, device=dev)
                m.weight.copy_(w)
                m.bias.copy_(randn(*m.bias.shape) * 0.01)
        for name, p in block.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + randn(*p.shape) * 0.05)
            elif name == "modulation":
                p.copy_(randn(*p.shape) * 0.05)


def block_inputs(cfg, grid, batch, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = math.prod(grid)
    x = torch.randn(batch, tokens, cfg.dim, generator=g, device=device)
    e0 = torch.randn(batch, 1, 6, cfg.dim, generator=g, device=device) * 0.05
    context = torch.randn(batch, cfg.text_len, cfg.dim, generator=g, device=device).to(torch.bfloat16)
    rot = rope_grid(rope_table(cfg, device), *grid)
    return dict(x=x, e0=e0, rot=rot, context=context)


def quantized(block: nn.Module, fmt: str) -> nn.Module:
    q = copy.deepcopy(block)
    quantize_block_(q, fmt)
    return q


def capture_linear_inputs(block: nn.Module, kwargs: dict, rows: int) -> dict[str, torch.Tensor]:
    """The input each nn.Linear of `block` receives during one forward (first `rows` rows of the batch)."""
    seen, hooks = {}, []
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1])[:rows].clone())))
    try:
        block(**kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def timed(fn, warmup: int, reps: int, device) -> float:
    """Median milliseconds of fn() (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


TARGETS: list[torch.nn.Module] = []     # the compressed blocks whose QLinear options `switches` sets
COMPILED = {"on": True}                 # the quantizer option for direct quantize_rows_fp8 calls below


@contextlib.contextmanager
def switches(scaled_mm: bool = False, compiled: bool = True, fast_accum: bool = True):
    """Set the QLinear options of every block in TARGETS (fp8 matmul on/off, compiled activation quantizer,
    fast accumulation), then restore the defaults."""
    for m in TARGETS:
        set_matmul_options(m, scaled_mm=scaled_mm, fast_accum=fast_accum, compile_quantizer=compiled)
    COMPILED["on"] = compiled
    try:
        yield
    finally:
        for m in TARGETS:
            set_matmul_options(m, scaled_mm=True, fast_accum=True, compile_quantizer=True)
        COMPILED["on"] = True


def variants(fp8_mm: bool) -> list[tuple[str, str | None, dict]]:
    """(label, fmt, switches) for every way of running a block. 'fp8 mm' is quant's default on Ada/Hopper."""
    out = [("bf16", None, {})]
    if fp8_mm:
        out += [("fp8 mm", "fp8", dict(scaled_mm=True)),
                ("fp8 mm eager-q", "fp8", dict(scaled_mm=True, compiled=False)),
                ("fp8 mm exact-acc", "fp8", dict(scaled_mm=True, fast_accum=False))]
    out += [(f"{fmt} dequant", fmt, {}) for fmt in FORMATS]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (checks the script runs)")
    ap.add_argument("--config", default="wan2.1-t2v-14b", help="DiT config whose block shapes to use")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/quant_accuracy.json)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median)")
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
        cfg = replace(get_config(args.config + "-tiny"), dim=256, ffn_dim=512, num_heads=4, text_len=16)
        grids, batches, rows, warmup, reps = SMOKE_GRIDS, (1, 2), 64, 0, 1
    else:
        if not torch.cuda.is_available():
            print("quant_accuracy.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                  "run with --cpu-smoke for a CPU dry run of the script", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        cfg = get_config(args.config)
        grids, batches, rows, warmup, reps = GRIDS, (1, 2), 4096, 2, args.reps
        torch.backends.cuda.matmul.allow_tf32 = False   # the float32 reference block really is float32
    fp8_mm = device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    t_start = time.perf_counter()
    torch.set_grad_enabled(False)

    env = dict(torch=torch.__version__, python=platform.python_version(), device=str(device),
               config=cfg.name, dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, fp8_matmul=fp8_mm)
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   cuda=torch.version.cuda)
    print(f"{cfg.name} block: dim {cfg.dim}, ffn {cfg.ffn_dim}; {env.get('gpu', 'CPU')}; torch {torch.__version__}; "
          f"fp8 matmul {'available' if fp8_mm else 'not available: dequantize path only'}")

    bf16 = Block(cfg).to(device=device, dtype=torch.bfloat16).eval()
    realistic_(bf16, seed=0)
    blocks = {fmt: quantized(bf16, fmt) for fmt in FORMATS}
    TARGETS[:] = list(blocks.values())
    sizes = {"bf16": BlockLayout.of(bf16).nbytes, **{f: BlockLayout.of(b).nbytes for f, b in blocks.items()}}
    result: dict = dict(env=env, slab_bytes=sizes)
    print("slab bytes: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))

    # ---- 1. per linear --------------------------------------------------------------------------------------
    grid0 = next(iter(grids.values()))
    kw = block_inputs(cfg, grid0, 1, device, seed=1)
    inputs = capture_linear_inputs(bf16, kw, rows)
    per_linear, compiled_same = {}, True
    for name, x in inputs.items():
        lin = bf16.get_submodule(name)
        ref = lin(x)
        row = {}
        for fmt, qb in blocks.items():
            q = qb.get_submodule(name)
            entry = dict(weight=rel_err(q.dequantized_weight(), lin.weight))
            with switches(scaled_mm=False):
                entry["dequant"] = rel_err(q(x), ref)
            if fmt == "fp8" and fp8_mm:
                with switches(scaled_mm=True):
                    assert q.uses_scaled_mm(x), "fp8 fast path expected"
                    y = q(x)
                    entry["scaled_mm"] = rel_err(y, ref)
                    # the kernel against its definition in float32: per-token fp8 activations x fp8 weight
                    xq, sx = quant.quantize_rows_fp8(x, COMPILED["on"])
                    emulated = F.linear(xq.float() * sx, q.weight.float() * q.weight_scale, q.bias.float())
                    entry["scaled_mm_vs_emulation"] = rel_err(y, emulated)
                with switches(scaled_mm=True, fast_accum=False):
                    entry["scaled_mm_exact_accum"] = rel_err(q(x), ref)
                with switches(compiled=False):
                    xq_eager, sx_eager = quant.quantize_rows_fp8(x, COMPILED["on"])
                compiled_same &= torch.equal(xq.view(torch.uint8), xq_eager.view(torch.uint8)) and torch.equal(sx, sx_eager)
            row[fmt] = entry
        per_linear[name] = row
    result["per_linear"] = per_linear
    print(f"\nper linear: relative error vs bf16 (weight | output by dequant | output by fp8 matmul | same with "
          f"exact accumulation), {rows} captured input rows")
    print(f"{'linear':16s}" + "".join(f"{fmt:>36s}" for fmt in FORMATS))
    for name, row in per_linear.items():
        cells = []
        for fmt in FORMATS:
            e = row[fmt]
            mm = " | ".join(f"{e[k]:.2%}" if k in e else "-" for k in ("scaled_mm", "scaled_mm_exact_accum"))
            cells.append(f"{e['weight']:.2%} | {e['dequant']:.2%} | {mm}".rjust(36))
        print(f"{name:16s}" + "".join(cells))
    if fp8_mm:
        worst = max(row["fp8"]["scaled_mm_vs_emulation"] for row in per_linear.values())
        print(f"fp8 matmul vs its float32 emulation: worst relative difference {worst:.3%} (bf16 output rounding)")
        compiled_ok = not quant._act_quantizer.failed
        print(f"compiled activation quantizer: {'ok' if compiled_ok else 'FAILED, eager used'}; "
              f"bit-identical to eager: {compiled_same}")
        result["compiled_quantizer"] = dict(ok=compiled_ok, identical_to_eager=compiled_same)

    # weights without outliers (plain Gaussian, std 0.02) at the block's three shapes
    g = torch.Generator(device=device).manual_seed(4)
    plain = {}
    for n, k in {(cfg.dim, cfg.dim), (cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim)}:
        w = (torch.randn(n, k, generator=g, device=device) * 0.02).to(torch.bfloat16)
        plain[f"{n}x{k}"] = {fmt: rel_err(quant.dequantize(*quant.quantize(w, fmt), fmt), w) for fmt in FORMATS}
    result["plain_gaussian_weight_error"] = plain
    print("weight error without outliers: " + "; ".join(
        f"{shape}: " + ", ".join(f"{f} {e:.2%}" for f, e in errs.items()) for shape, errs in plain.items()))
    del inputs

    # ---- 2. per block ---------------------------------------------------------------------------------------
    ref_out = bf16(**kw)
    ref_upd = ref_out - kw["x"]
    fp32 = copy.deepcopy(bf16).float()
    floor = rel_err(fp32(**kw) - kw["x"], ref_upd)
    del fp32
    per_block = {"bf16 vs float32 (floor)": floor}
    for label, fmt, sw in variants(fp8_mm)[1:]:
        if "eager-q" in label:
            continue                                  # same bits as the compiled quantizer
        with switches(**sw):
            out = blocks[fmt](**kw)
        per_block[label] = rel_err(out - kw["x"], ref_upd)
        per_block[label + " (output)"] = rel_err(out, ref_out)
    result["per_block"] = dict(tokens=math.prod(grid0), batch=1, metric="relative error of the block update "
                               "(output - input) vs bf16; '(output)': of the output", **per_block)
    print(f"\nper block ({math.prod(grid0)} tokens): relative error of the update (output - input) vs bf16")
    for k, v in per_block.items():
        print(f"  {k:32s} {v:.3%}")
    del kw, ref_out, ref_upd

    # ---- 3. timing ------------------------------------------------------------------------------------------
    timing = []
    for gname, grid in grids.items():
        for batch in batches:
            kw = block_inputs(cfg, grid, batch, device, seed=2)
            rec = dict(grid=gname, tokens=math.prod(grid), batch=batch)
            for label, fmt, sw in variants(fp8_mm):
                block = bf16 if fmt is None else blocks[fmt]
                with switches(**sw):
                    try:
                        rec[label] = timed(lambda: block(**kw), warmup, reps, device)
                    except torch.OutOfMemoryError:
                        rec[label] = None
                        torch.cuda.empty_cache()
            timing.append(rec)
            del kw
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["block_forward_ms"] = timing
    labels = [v[0] for v in variants(fp8_mm)]
    print("\none block forward, milliseconds (median of %d)" % reps)
    print(f"{'tokens x batch':18s}" + "".join(f"{lab:>18s}" for lab in labels))
    for rec in timing:
        cells = "".join(f"{rec[lab]:18.2f}" if rec[lab] is not None else f"{'OOM':>18s}" for lab in labels)
        print(f"{rec['tokens']:>8d} x {rec['batch']:<7d}" + cells)

    # the FFN linears alone at the largest token count: where the time of each path goes
    m = math.prod(list(grids.values())[-1])
    lin_timing = {}
    g = torch.Generator(device=device).manual_seed(3)
    for name in ("ffn.0", "ffn.2"):
        lin = bf16.get_submodule(name)
        x = torch.randn(m, lin.in_features, generator=g, device=device).to(torch.bfloat16)
        q = blocks["fp8"].get_submodule(name)
        rec = {"bf16 F.linear": timed(lambda: lin(x), warmup, reps, device),
               "dequantize weight only": timed(q.dequantized_weight, warmup, reps, device)}
        with switches(scaled_mm=False):
            rec["fp8 dequant path"] = timed(lambda: q(x), warmup, reps, device)
        if fp8_mm:
            for label, compiled in (("quantize activations (compiled)", True), ("quantize activations (eager)", False)):
                with switches(compiled=compiled):
                    rec[label] = timed(lambda: quant.quantize_rows_fp8(x, COMPILED["on"]), warmup, reps, device)
            xq, sx = quant.quantize_rows_fp8(x, COMPILED["on"])
            for label, fast in (("fp8 GEMM alone", False), ("fp8 GEMM alone, fast accum", True)):
                rec[label] = timed(lambda: torch._scaled_mm(xq, q.weight.t(), scale_a=sx, scale_b=q.weight_scale.view(1, -1),
                                                            bias=q.bias, out_dtype=torch.bfloat16, use_fast_accum=fast),
                                   warmup, reps, device)
            with switches(scaled_mm=True):
                rec["fp8 mm path"] = timed(lambda: q(x), warmup, reps, device)
        lin_timing[name] = dict(tokens=m, **rec)
        del x
    result["ffn_linear_ms"] = lin_timing
    print(f"\nFFN linears alone at {m} tokens, milliseconds")
    for name, rec in lin_timing.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in rec.items() if k != "tokens"))

    result["seconds"] = time.perf_counter() - t_start
    out = Path(args.out) if args.out else (
        Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results") / (
        "quant_accuracy_cpu_smoke.json" if args.cpu_smoke else "quant_accuracy.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".tmp", delete=False) as f:
        json.dump(result, f, indent=1)
    os.replace(f.name, out)
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
