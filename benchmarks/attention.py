"""8-bit attention (runtime/attention8.py) against bf16 SDPA: accuracy and speed, then one full-size block.

1. Accuracy: the Triton kernel against its float32 emulation (`reference`, same roundings) on small shapes
   (self and cross attention, lengths that are not multiples of the tile), and both against exact float32
   attention on the 81-frame shape (a slice of query rows: rows are independent).
2. Speed at the Wan 480x832 shapes (B=2 for batched CFG, 40 heads of 128): SDPA with each backend torch offers,
   the 8-bit path (quantization included) and its kernel alone.
3. One full-size Wan2.2 block (random bf16 weights), batch 2, 9 and 81 frames: bf16 weights + SDPA, fp8
   weights + SDPA, fp8 weights + 8-bit attention. A step is 40 of these plus the head.

    python benchmarks/attention.py --out $OUT/attention.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from worldstream.runtime import attention8 as a8  # noqa: E402

TOKENS = {9: 3 * 1560, 81: 21 * 1560}


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(b, lq, lk, h, d, seed=0, sc=1.0):
    """q, k with a per-channel offset (as projected, RMS-normed activations have) and v with one."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device="cuda")   # noqa: E731
    q = (rn(b, lq, h, d) + 0.5 * rn(h, d)) * sc
    k = (rn(b, lk, h, d) + 0.5 * rn(h, d)) * sc
    v = rn(b, lk, h, d) + 0.3 * rn(h, d)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def timed(fn, reps=10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def quantization_check() -> dict:
    """The kernels' quantization against `quantize_reference`: the 8-bit values must be the same."""
    q, k, v = inputs(2, 1000, 333, 3, 128)
    qq, sq, kq, sk, vt, sv = a8.quantize(q, k, v)
    rq, rsq, rkq, rsk, rvq, rsv = a8.quantize_reference(q, k, v)
    vt_ref = rvq.view(torch.uint8).permute(0, 2, 3, 1)
    row = dict(q_int8_equal=torch.equal(qq, rq), q_scale_equal=torch.equal(sq, rsq),
               k_int8_mismatch=(kq != rkq).float().mean().item(), k_scale_maxrel=((sk - rsk).abs() / rsk).max().item(),
               v_fp8_equal=torch.equal(vt[..., :333].view(torch.uint8), vt_ref),
               v_pad_zero=bool((vt[..., 333:].view(torch.uint8) == 0).all()), v_scale_equal=torch.equal(sv, rsv))
    print("quantization", row, flush=True)
    return row


def accuracy() -> list[dict]:
    rows = [quantization_check()]
    for (b, lq, lk, h, d, sc) in [(1, 3000, 3000, 4, 128, 1.0), (2, 1000, 257, 3, 128, 1.0), (1, 777, 777, 2, 64, 1.0),
                                   (1, 3000, 3000, 4, 128, 2.0), (1, 4096, 4096, 2, 128, 0.5)]:
        q, k, v = inputs(b, lq, lk, h, d, sc=sc)
        out = a8.attention8(q, k, v)
        ref = a8.reference(q, k, v)
        exact = sdpa(q.float(), k.float(), v.float())
        rows.append(dict(shape=[b, lq, lk, h, d], scale=sc, kernel_vs_emulation=rel(out, ref),
                         kernel_vs_exact=rel(out, exact), bf16_sdpa_vs_exact=rel(sdpa(q, k, v), exact),
                         emulation_vs_exact=rel(ref, exact)))
        print("accuracy", rows[-1], flush=True)
    # the 81-frame shape: 512 query rows of every head against all 32,760 keys
    for sc in (1.0, 2.0):
        q, k, v = inputs(1, TOKENS[81], TOKENS[81], 40, 128, seed=1, sc=sc)
        out = a8.attention8(q, k, v)[:, :512]
        exact = sdpa(q[:, :512].float(), k.float(), v.float())
        ref = torch.cat([a8.reference(q[:, :512, h0:h0 + 8], k[:, :, h0:h0 + 8], v[:, :, h0:h0 + 8])
                         for h0 in range(0, 40, 8)], dim=2)
        rows.append(dict(shape=[1, TOKENS[81], TOKENS[81], 40, 128], scale=sc, rows=512,
                         kernel_vs_emulation=rel(out, ref), kernel_vs_exact=rel(out, exact),
                         emulation_vs_exact=rel(ref, exact), bf16_sdpa_vs_exact=rel(sdpa(q, k, v)[:, :512], exact)))
        print("accuracy", rows[-1], flush=True)
    return rows


def speed() -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for frames, L in TOKENS.items():
        q, k, v = inputs(2, L, L, 40, 128)
        flops = 4 * 2 * 40 * L * L * 128
        variants = {"sdpa-default": lambda: sdpa(q, k, v)}
        for name, be in [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)]:
            def run(be=be):
                with sdpa_kernel([be]):
                    return sdpa(q, k, v)
            variants[name] = run
        variants["8bit"] = lambda: a8.attention8(q, k, v)
        variants["8bit-quantize-only"] = lambda: a8.quantize(q, k, v)
        for name, fn in variants.items():
            try:
                s = timed(fn, 5 if frames == 81 else 20)
                rows.append(dict(frames=frames, tokens=L, variant=name, ms=s * 1e3, tflops=flops / s / 1e12))
            except Exception as e:   # noqa: BLE001 - a backend this build lacks
                rows.append(dict(frames=frames, tokens=L, variant=name, error=f"{type(e).__name__}: {e}"[:300]))
            print("speed", rows[-1], flush=True)
        best = a8._kernels()[2].best_config
        rows.append(dict(frames=frames, variant="8bit-config", config=str(best)))
        print("speed", rows[-1], flush=True)
    return rows


def block_speed() -> list[dict]:
    from worldstream.models.configs import get_config
    from worldstream.models.dit import Block, rope_grid, rope_table
    from worldstream.models.quant import quantize_block_
    from worldstream.runtime import attention8  # noqa: F401  (registers "8bit")
    cfg = get_config("wan2.2-i2v-a14b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = Block(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for n, p in block.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            elif "modulation" in n:
                p.normal_(0, cfg.dim ** -0.5)
            else:
                p.normal_(0, 0.02)
    rows = []
    variants = [("bf16+sdpa", None, "sdpa"), ("fp8+sdpa", "fp8", "sdpa"), ("fp8+8bit", "fp8", "8bit"),
                ("bf16+8bit", None, "8bit")]
    blocks = {None: block}
    outs = {}
    for frames, L in TOKENS.items():
        x = torch.randn(2, L, cfg.dim, device="cuda")
        e0 = 0.1 * torch.randn(2, 1, 6, cfg.dim, device="cuda")
        ctx = torch.randn(2, 512, cfg.dim, device="cuda", dtype=torch.bfloat16)
        f, hh, ww = L // 1560, 30, 52
        rot = rope_grid(rope_table(cfg, "cuda"), f, hh, ww)
        rot = tuple(r.cuda() for r in rot)
        for name, fmt, backend in variants:
            if fmt not in blocks:
                import copy
                blocks[fmt] = copy.deepcopy(block)
                quantize_block_(blocks[fmt], fmt)
            blocks[fmt].self_attn.backend = backend
            with torch.no_grad():
                fn = lambda: blocks[fmt](x.clone(), e0, rot, ctx)   # noqa: E731
                out = fn()
                s = timed(fn, 3 if frames == 81 else 10)
            blocks[fmt].self_attn.backend = "sdpa"
            outs[name] = out
            update = out - x
            rows.append(dict(frames=frames, variant=name, ms=s * 1e3, step_s_est=40 * s,
                             update_rel_err_vs_bf16=rel(update, outs["bf16+sdpa"] - x)))
            print("block", rows[-1], flush=True)
        outs.clear()
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.json"))
    ap.add_argument("--skip", default="", help="comma list of parts to skip: accuracy,speed,block")
    args = ap.parse_args()
    import triton
    res = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "triton": triton.__version__}
    print(res, flush=True)
    skip = set(args.skip.split(","))
    for part, fn in [("accuracy", accuracy), ("speed", speed), ("block", block_speed)]:
        if part in skip:
            continue
        t0 = time.time()
        res[part] = fn()
        print(f"{part}: {time.time() - t0:.0f} s", flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
