"""Where does the low-memory block's time go? One full-size LingBot Cam block, plain vs chunked, on one GPU.

The planner charges the low-memory block (`Block._forward_chunked`, `WanDiT.set_chunk`) 0.2 ms per chunk and
sample; measured in whole-model runs it costs ~70 ms more per block and step (81 frames, CFG batch 2). This script
takes one block (random weights, bf16 on CUDA; also fp8 weights + 8-bit attention) and measures, for 81 frames
480x832 (32,760 tokens), batch 2 and batch 1:

  timing     the plain block vs the chunked block at each chunk size, fuse on / off (CUDA events, after warm-up;
             the first call, which compiles, is reported apart), host-side enqueue time, allocator counters and
             any torch._dynamo recompiles / graph breaks during the timed calls
  sections   an instrumented copy of the plain and the chunked forward (the same calls, in the same order, with a
             CUDA event between steps): K/V pass, query + attention + output pass, camera, cross-attention, FFN,
             split further into modulate / projections / attention / residual; checked against the real block
  profiler   torch.profiler's top kernels (plain vs chunk 8192, batch 2), kernel launches per block call, and
             which SDPA kernel ran (flash / efficient / cuDNN / math)
  sdpa       scaled_dot_product_attention alone: query chunks against the full K/V, per forced backend
  tight      the chunked block with the allocator capped just above its own peak (the whole-model runs were
             capped at 8 GB): time and alloc retries / cudaMalloc counts

Everything goes to --out (JSON, rewritten after every stage, so a run cut short keeps what it measured).

  python benchmarks/chunked_block_profile.py --out $OUT/chunked_block_profile.json      # H200: ~2-3 minutes
  python benchmarks/chunked_block_profile.py --cpu-smoke                               # tiny config, CPU
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import sys
import time
import traceback
import warnings

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # as offload.py and the CLI

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import worldstream.models.dit as dit  # noqa: E402
from worldstream.models import attention as attn_mod  # noqa: E402
from worldstream.models.attention import prepare_attention  # noqa: E402
from worldstream.models.configs import get_config  # noqa: E402
from worldstream.models.dit import (Block, _gated_residual_, _rows, compute_dtype, gate_residual, linear,  # noqa: E402
                                    modulate, modulate_rows, rope_grid, rope_table, shared_input)

MS = 1e3


# ---- inputs and blocks ---------------------------------------------------------------------------------------

def build_block(cfg, device, dtype, seed=0) -> Block:
    """One block with random weights (offload.py's scale: 0.02, norms ~1, modulation ~1/sqrt(dim))."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        block = Block(cfg)
    block.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            r = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.02 * r)
            elif "modulation" in name:
                p.copy_(r / cfg.dim ** 0.5)
            else:
                p.copy_(0.02 * r)
    return block.to(dtype).eval().requires_grad_(False)


def block_inputs(cfg, grid, batch, device, dtype, seed=1):
    """x: the float32 residual stream [B, L, dim] (what every block but the first gets); kwargs of Block.forward:
    e0 [B, 1, 6, dim] float32, rot (cos, sin), text context [B, text_len, dim], camera features [1, L, dim]."""
    g = torch.Generator(device=device).manual_seed(seed)
    f, h, w = grid
    L = f * h * w
    x = torch.randn(batch, L, cfg.dim, generator=g, device=device)
    kw = dict(e0=0.1 * torch.randn(batch, 1, 6, cfg.dim, generator=g, device=device),
              rot=rope_grid(rope_table(cfg, device), f, h, w),
              context=torch.randn(batch, cfg.text_len, cfg.dim, generator=g, device=device).to(dtype))
    if cfg.has_camera:
        kw["cam"] = torch.randn(1, L, cfg.dim, generator=g, device=device).to(dtype)
    if cfg.has_image_branch:
        kw["context_img"] = torch.randn(batch, cfg.image_tokens, cfg.dim, generator=g, device=device).to(dtype)
    return x, kw


def set_block(block: Block, chunk, fuse: bool) -> None:
    block.chunk = chunk
    for m in block.modules():          # as WanDiT.set_fuse
        if hasattr(m, "fuse"):
            m.fuse = bool(fuse)


# ---- timing helpers ------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Marks:
    """Time between consecutive `mark(name)` calls, summed per name: CUDA events on the GPU (no syncs in
    between), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.spans = []
        self.last = self._now()

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def mark(self, name: str) -> None:
        now = self._now()
        self.spans.append((name, self.last, now))
        self.last = now

    def totals(self) -> dict:
        sync(self.device)
        out = {}
        for name, a, b in self.spans:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * MS
            out[name] = out.get(name, 0.0) + ms
        return out


def dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    return {k: dict(v) for k, v in counters.items()}


def counter_diff(before: dict, after: dict) -> dict:
    out = {}
    for k, sub in after.items():
        for kk, v in sub.items():
            d = v - before.get(k, {}).get(kk, 0)
            if d:
                out[f"{k}/{kk}"] = d
    return out


ALLOC_KEYS = ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def alloc_stats(device) -> dict:
    if device.type != "cuda":
        return {}
    s = torch.cuda.memory_stats(device)
    return {k: s.get(k, 0) for k in ALLOC_KEYS}


def fused_state() -> dict:
    """Per `@fused` helper of models/dit.py: 'compiled', 'eager (compile failed)' or 'not compiled yet'."""
    out = {}
    for name in ("modulate", "modulate_rows", "gate_residual", "rms_norm", "rope", "rope_rows"):
        fn = getattr(dit, name)
        cells = [c.cell_contents for c in (fn.__closure__ or ()) if isinstance(c.cell_contents, list)]
        state = cells[0] if cells else None
        out[name] = ("not compiled yet" if not state else "eager (compile failed)" if state == [None]
                     else "compiled")
    return out


def time_calls(fn, reset, device, warmup: int, reps: int) -> dict:
    """First call (compiles) by wall clock, then `warmup` calls, then `reps` calls each between CUDA events.
    `reset()` (restoring the in-place stream) runs outside the timed span."""
    reset()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        reset()
        fn()
    sync(device)
    before_c, before_a = dynamo_counters(), alloc_stats(device)
    gpu, host = [], []
    for _ in range(reps):
        reset()
        m = Marks(device)
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * MS)
        m.mark("call")
        gpu.append(m.totals()["call"])
    sync(device)
    after_a = alloc_stats(device)
    med = statistics.median(gpu)
    return dict(ms=med, ms_all=gpu, host_ms=statistics.median(host), first_call_s=first,
                first_minus_steady_s=first - med / MS,
                dynamo_during_timed=counter_diff(before_c, dynamo_counters()),
                alloc_during_timed={k: after_a[k] - before_a[k] for k in after_a})


# ---- instrumented copies of the block's two forwards (same calls, same order as models/dit.py) ----------------

def plain_sections(block: Block, x, e0, rot, context, context_img=None, cam=None, tm: Marks = None):
    """Block.forward's plain path (with SelfAttention.forward inlined), a mark after each step."""
    mods = (block.modulation.float() + e0).unbind(2)
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods
    fuse, sa = block.fuse, block.self_attn
    tm.mark("mods")
    h = modulate(x, shift_sa, scale_sa, block.norm1.eps, compute_dtype(sa.q), x.dtype, fuse=fuse)
    tm.mark("sa.modulate")
    h = shared_input(h.to(compute_dtype(sa.q)), (sa.q, sa.k, sa.v))
    tm.mark("sa.shared_input")
    k, v = sa.keys_values(h, rot)
    tm.mark("sa.kv_proj_norm_rope")
    q = sa.queries(h, rot)
    del h
    tm.mark("sa.q_proj_norm_rope")
    a = attn_mod.attention(q, k, v, sa.backend)
    del q, k, v
    tm.mark("sa.attention")
    y = sa.out(a)
    del a
    tm.mark("sa.out_proj")
    x = gate_residual(x, y, gate_sa, fuse=fuse)
    del y
    tm.mark("sa.residual")
    if cam is not None:
        h = linear(block.cam_injector_layer2, F.silu(linear(block.cam_injector_layer1, cam))) + cam
        x = (1.0 + linear(block.cam_scale_layer, h)) * x + linear(block.cam_shift_layer, h)
        del h
        tm.mark("camera")
    x = x + block.cross_attn(block.norm3(x), context, context_img, None)
    tm.mark("cross")
    h = modulate(x, shift_ff, scale_ff, block.norm2.eps, compute_dtype(block.ffn[0]), x.dtype, fuse=fuse)
    tm.mark("ffn.modulate")
    y = block._ffn_of(h)
    del h
    tm.mark("ffn.mlp")
    x = gate_residual(x, y, gate_ff, fuse=fuse)
    tm.mark("ffn.residual")
    return x


def chunked_sections(block: Block, x, e0, rot, context, context_img=None, cam=None, tm: Marks = None,
                     norm_dtype=None):
    """Block._forward_chunked (float32 x, updated in place), a mark after each step."""
    mods = (block.modulation.float() + e0).unbind(2)
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (m.clone() if m.shape[1] == 1 else m
                                                                for m in mods)
    fuse, sa = block.fuse, block.self_attn
    norm_dtype = norm_dtype or x.dtype
    n_batch, length = x.shape[:2]
    chunk = block.chunk
    pieces = [(b, s, slice(s, min(s + chunk, length)))
              for s in range(0, length, chunk) for b in range(n_batch)]

    def mod_sa(b, s, r):
        return modulate_rows(x, shift_sa, scale_sa, b, s, r.stop - s, block.norm1.eps, compute_dtype(sa.q),
                             norm_dtype, fuse=fuse)
    tm.mark("mods")

    keys = values = None
    for b, s, r in pieces:
        h = mod_sa(b, s, r)
        tm.mark("kv.modulate")
        h = shared_input(h, (sa.k, sa.v))
        tm.mark("kv.shared_input")
        k, v = sa.keys_values(h, rot, s)
        del h
        tm.mark("kv.proj_norm_rope")
        if keys is None:
            keys = k.new_empty((n_batch, length, *k.shape[2:]))
            values = v.new_empty((n_batch, length, *v.shape[2:]))
        keys[b:b + 1, r], values[b:b + 1, r] = k, v
        del k, v
        tm.mark("kv.copy_into_place")
    attend = [prepare_attention(keys[b:b + 1], values[b:b + 1], sa.backend) for b in range(n_batch)]
    del keys, values
    tm.mark("kv.prepare_attention")
    for b, s, r in pieces:
        h = mod_sa(b, s, r)
        tm.mark("q.modulate")
        h = shared_input(h, (sa.q,))
        tm.mark("q.shared_input")
        q = sa.queries(h, rot, s)
        del h
        tm.mark("q.proj_norm_rope")
        a = attend[b](q)
        del q
        tm.mark("q.attention")
        y = sa.out(a)
        del a
        tm.mark("q.out_proj")
        _gated_residual_(x[b:b + 1, r], y, _rows(gate_sa, b, s, r.stop - s), fuse)
        del y
        tm.mark("q.residual")
    del attend

    if cam is not None:
        for s in range(0, length, chunk):
            r = slice(s, min(s + chunk, length))
            c = cam[:, r]
            h = linear(block.cam_injector_layer2, F.silu(linear(block.cam_injector_layer1, c))) + c
            scale, shift = 1.0 + linear(block.cam_scale_layer, h), linear(block.cam_shift_layer, h)
            tm.mark("camera.mlp")
            for b in range(n_batch):
                i = b if cam.shape[0] > 1 else 0
                x[b:b + 1, r].mul_(scale[i:i + 1]).add_(shift[i:i + 1])
            tm.mark("camera.apply")

    kvs = block.cross_attn.context_kv(context, context_img, None)
    tm.mark("cross.context_kv")
    for b, s, r in pieces:
        x[b:b + 1, r].add_(block.cross_attn.attend(block.norm3(x[b:b + 1, r]), kvs, slice(b, b + 1)))
        tm.mark("cross.attend")
    del kvs

    for b, s, r in pieces:
        n = r.stop - s
        h = modulate_rows(x, shift_ff, scale_ff, b, s, n, block.norm2.eps, compute_dtype(block.ffn[0]),
                          torch.float32, fuse=fuse)
        tm.mark("ffn.modulate")
        y = block._ffn_of(h)
        del h
        tm.mark("ffn.mlp")
        _gated_residual_(x[b:b + 1, r], y, _rows(gate_ff, b, s, n), fuse)
        del y
        tm.mark("ffn.residual")
    return x


GROUPS = ("sa.modulate", "sa.kv", "sa.q", "sa.attention", "sa.out", "camera", "cross", "ffn", "other")
SECTION_GROUPS = {   # section -> the part of the block it belongs to (the brief's breakdown)
    "sa.modulate": "sa.modulate", "sa.shared_input": "sa.modulate",
    "sa.kv_proj_norm_rope": "sa.kv", "sa.q_proj_norm_rope": "sa.q",
    "sa.attention": "sa.attention", "sa.out_proj": "sa.out", "sa.residual": "sa.out",
    "kv.modulate": "sa.modulate", "kv.shared_input": "sa.modulate",
    "kv.proj_norm_rope": "sa.kv", "kv.copy_into_place": "sa.kv", "kv.prepare_attention": "sa.kv",
    "q.modulate": "sa.modulate", "q.shared_input": "sa.modulate",
    "q.proj_norm_rope": "sa.q", "q.attention": "sa.attention", "q.out_proj": "sa.out", "q.residual": "sa.out",
    "camera": "camera", "camera.mlp": "camera", "camera.apply": "camera",
    "cross": "cross", "cross.context_kv": "cross", "cross.attend": "cross",
    "ffn.modulate": "ffn", "ffn.mlp": "ffn", "ffn.residual": "ffn",
}


def grouped(sections: dict) -> dict:
    out = dict.fromkeys(GROUPS, 0.0)
    for k, v in sections.items():
        g = SECTION_GROUPS.get(k, "other")
        out[g] += v
    return out


# ---- profiler -------------------------------------------------------------------------------------------------

def _dev_time(evt, self_only=False):
    names = (("self_device_time_total", "self_cuda_time_total") if self_only
             else ("device_time_total", "cuda_time_total"))
    for n in names:
        v = getattr(evt, n, None)
        if v is not None:
            return v
    return 0.0


def sdpa_kind(name: str) -> str | None:
    n = name.lower()
    if "cudnn" in n and ("attn" in n or "attention" in n or "fmha" in n or "sdpa" in n or "flash" in n):
        return "cudnn"
    if "flash" in n:
        return "flash"
    if "fmha" in n or "efficient_attention" in n or "cutlassf" in n or "mem_eff" in n:
        return "efficient"
    if n.startswith("attend") or "attend" in n and "triton" in n:
        return "8bit-triton"
    return None


def profile_call(fn, reset, device, top: int = 25) -> dict:
    """One call under torch.profiler (after the caller's warm-up): top kernels by total device time, kernel
    count, the attention kernels seen. On the CPU: top aten ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    reset()
    sync(device)
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    cuda = device.type == "cuda"
    kernels, total, n_kernels, n_memcpy, attn = {}, 0.0, 0, 0, {}
    for e in prof.events():
        dt = getattr(e, "device_type", None)
        is_dev = cuda and dt is not None and str(dt).endswith("CUDA")
        if cuda and not is_dev:
            continue
        if not cuda and getattr(e, "cpu_parent", None) is not None:
            continue   # CPU: top-level ops only
        t = _dev_time(e, self_only=True) if cuda else getattr(e, "self_cpu_time_total", 0.0)
        name = e.name
        if cuda:
            if name.lower().startswith(("memcpy", "memset")):
                n_memcpy += 1
            else:
                n_kernels += 1
            kind = sdpa_kind(name)
            if kind:
                attn[kind] = attn.get(kind, 0) + 1
        k = kernels.setdefault(name, [0, 0.0])
        k[0] += 1
        k[1] += t
        total += t
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    table = None
    if cuda and n_kernels == 0:   # (profiler API drift: keep torch's own table to read by eye)
        try:
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top)
        except Exception as e:  # noqa: BLE001
            table = f"{type(e).__name__}: {e}"
    return dict(table=table, unit="device us" if cuda else "cpu us (top-level ops)",
                total_us=total, kernel_launches=n_kernels, memcpy_memset=n_memcpy,
                ops_counted=sum(v[0] for v in kernels.values()), attention_kernels=attn,
                top=[dict(name=n[:160], calls=c, total_us=t, pct=100 * t / total if total else 0.0)
                     for n, (c, t) in rows])


# ---- SDPA alone ------------------------------------------------------------------------------------------------

def sdpa_bench(cfg, L, chunks, device, dtype, reps: int, with_8bit: bool = False) -> list[dict]:
    """q [1, n, H, D] against K/V [1, L, H, D] as the chunked block calls it (and [2, L] as the plain block
    does), per backend; ms and TFLOP/s, and the kernel the default dispatch runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, D = cfg.num_heads, cfg.dim // cfg.num_heads
    g = torch.Generator(device=device).manual_seed(3)
    k = torch.randn(2, L, H, D, generator=g, device=device).to(dtype)
    v = torch.randn(2, L, H, D, generator=g, device=device).to(dtype)
    qs = torch.randn(2, L, H, D, generator=g, device=device).to(dtype)
    backends = [("default", None)]
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name) and (name != "MATH" or device.type == "cpu"):
            backends.append((name.lower(), getattr(SDPBackend, name)))
    if with_8bit:   # the 8-bit kernel as the low-memory block calls it: K / V prepared once, then query chunks
        backends.append(("8bit-prepared", "8bit"))
    out = []
    shapes = [(2, L)] + [(1, min(n, L)) for n in chunks]
    for batch, n in shapes:
        q = qs[:batch, :n]
        kk, vv = k[:batch], v[:batch]
        for bname, be in backends:
            ctx = sdpa_kernel([be]) if be not in (None, "8bit") else contextlib.nullcontext()
            row = dict(batch=batch, q_rows=n, k_rows=L, backend=bname)
            try:
                with ctx:
                    if be == "8bit":
                        f = functools.partial(attn_mod.prepare_attention(kk, vv, "8bit"), q)
                    else:
                        f = functools.partial(attn_mod.sdpa, q, kk, vv)   # (the seam's layout: [B, L, H, D])
                    f()
                    sync(device)
                    ts = []
                    for _ in range(reps):
                        m = Marks(device)
                        f()
                        m.mark("a")
                        ts.append(m.totals()["a"])
                    ms = statistics.median(ts)
                    flops = 4.0 * batch * n * L * H * D
                    row.update(ms=ms, tflops=flops / (ms / MS) / 1e12,
                               ms_per_sample_all_queries=ms * (L / n) / batch)
                    if bname in ("default", "8bit-prepared") and device.type == "cuda":
                        p = profile_call(f, lambda: None, device, top=3)
                        row["kernels"] = [t["name"] for t in p["top"]]
                        row["kinds"] = p["attention_kernels"]
            except Exception as e:  # noqa: BLE001 - a backend that does not take these inputs
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            out.append(row)
    return out


# ---- main -------------------------------------------------------------------------------------------------------

def parse_list(s: str, conv=str):
    return [conv(p) for p in s.split(",") if p.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/chunked_block_profile.json, or "
                                                 "./chunked_block_profile.json without $OUT)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny config on the CPU: the same code path, seconds")
    ap.add_argument("--model", default=None, help="config name (default lingbot-cam; smoke: lingbot-cam-tiny)")
    ap.add_argument("--grid", default=None, help="latent token grid f,h,w (default 21,30,52 = 81 frames 480x832; "
                                                 "smoke 3,4,5)")
    ap.add_argument("--chunks", default=None, help="chunk sizes (default 4096,8192,16384,32768; smoke 16,64)")
    ap.add_argument("--batches", default="2,1")
    ap.add_argument("--fuse", default="on,off", help="fuse settings for the bf16 block (fp8 runs fuse on)")
    ap.add_argument("--variants", default="bf16,fp8-8bit",
                    help="bf16 (sdpa), fp8-8bit (fp8 QLinear weights + 8-bit attention), bf16-8bit")
    ap.add_argument("--warmup", type=int, default=None, help="calls after the first, untimed (default 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls, median reported (default 3; smoke 1)")
    ap.add_argument("--profile-chunk", type=int, default=None, help="chunk profiled against plain (default 8192; "
                                                                   "smoke 16)")
    ap.add_argument("--skip", default="", help="stages to skip: timing,sections,profile,sdpa,tight")
    ap.add_argument("--tight-margins-gb", default="1.0,0.25,0.05",
                    help="allocator cap = the call's own peak + margin (GB) for the tight-memory stage")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="stages still to start after this many seconds are skipped (the JSON says which)")
    args = ap.parse_args(argv)

    smoke = args.cpu_smoke
    args.warmup = args.warmup if args.warmup is not None else 1
    args.reps = args.reps if args.reps is not None else (1 if smoke else 3)
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")

    def ints(text, what, n=None):
        try:
            vals = parse_list(text, int)
        except ValueError:
            ap.error(f"{what}: integers separated by commas, got {text!r}")
        if not vals or any(v < 1 for v in vals) or (n is not None and len(vals) != n):
            ap.error(f"{what}: {n or 'one or more'} positive integers, got {text!r}")
        return vals
    try:
        cfg = get_config(args.model or ("lingbot-cam-tiny" if smoke else "lingbot-cam"))
    except Exception as e:  # noqa: BLE001
        ap.error(f"--model: {e}")
    grid = tuple(ints(args.grid or ("3,4,5" if smoke else "21,30,52"), "--grid", 3))
    L = grid[0] * grid[1] * grid[2]
    chunks = ints(args.chunks or ("16,64" if smoke else "4096,8192,16384,32768"), "--chunks")
    batches = ints(args.batches, "--batches")
    try:
        fuses = [{"on": True, "off": False}[f] for f in parse_list(args.fuse)]
    except KeyError:
        ap.error(f"--fuse: on and/or off, got {args.fuse!r}")
    variants = parse_list(args.variants)
    for v in variants:
        if v not in ("bf16", "fp8-8bit", "bf16-8bit"):
            ap.error(f"--variants: unknown variant {v!r} (bf16, fp8-8bit, bf16-8bit)")
    pchunk = args.profile_chunk or (16 if smoke else 8192)
    if pchunk < 1:
        ap.error("--profile-chunk must be positive")
    skip = set(parse_list(args.skip))
    if skip - {"timing", "sections", "profile", "sdpa", "tight"}:
        ap.error(f"--skip: unknown stage(s) {sorted(skip - {'timing', 'sections', 'profile', 'sdpa', 'tight'})}")
    try:
        margins = parse_list(args.tight_margins_gb, float)
    except ValueError:
        ap.error(f"--tight-margins-gb: numbers separated by commas, got {args.tight_margins_gb!r}")
    if not smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or use --cpu-smoke")
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        torch.set_num_threads(1)   # (tiny ops: a thread pool on a shared CPU only adds wake-up latency)
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "chunked_block_profile.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    t_start = time.perf_counter()

    caught = []
    warnings.simplefilter("always")
    warnings.showwarning = lambda msg, cat, *a, **k: (caught.append(f"{cat.__name__}: {msg}"),
                                                     print(f"warning: {cat.__name__}: {msg}", file=sys.stderr))

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        with contextlib.suppress(Exception):   # recompiles and graph breaks also go to stderr as they happen
            torch._logging.set_logs(recompiles=True, graph_breaks=True)
    res = dict(model=cfg.name, grid=grid, tokens=L, chunks=chunks, batches=batches, device=str(device),
               gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
               torch=torch.__version__, alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
               args=vars(args), timing=[], sections=[], profiles={}, sdpa=[], tight=[], skipped=[], errors=[],
               warnings=caught)

    env = res["env"] = {"cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                        "TORCH_CUDNN_SDPA_DEPRIORITIZED": os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED")}
    if device.type == "cuda":
        env["capability"] = torch.cuda.get_device_capability(0)
        with contextlib.suppress(Exception):
            import triton
            env["triton"] = triton.__version__
        with contextlib.suppress(Exception):   # (private; absent in some versions)
            env["sdpa_priority_order"] = [str(b) for b in torch._C._get_sdp_priority_order()]
        for name in ("flash", "mem_efficient", "cudnn", "math"):
            with contextlib.suppress(Exception):
                env[f"{name}_sdp_enabled"] = getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
    print(f"env: {env}", flush=True)

    def save():
        res["elapsed_s"] = time.perf_counter() - t_start
        res["fused_helpers"] = fused_state()
        res["attention_registry"] = dict(prepare=sorted(attn_mod._PREPARE), handles_cache=sorted(attn_mod._HANDLES_CACHE))
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1, default=str)

    def over_budget(stage) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            res["skipped"].append(f"{stage} (budget {args.budget_s:.0f} s spent)")
            print(f"[skip] {stage}: time budget spent", flush=True)
            return True
        return False

    # blocks per variant
    need8 = any("8bit" in v for v in variants)
    if need8:
        from worldstream.runtime import attention8
        if device.type == "cuda" and not attention8.available():
            res["skipped"].append("8-bit variants: attention8.available() is False (no Triton or no fp8 cores)")
            variants = [v for v in variants if "8bit" not in v]
    blocks = {}
    base = build_block(cfg, device, dtype)
    for v in variants:
        b = base if v == "bf16" else copy.deepcopy(base)
        if v == "fp8-8bit":
            from worldstream.models.quant import quantize_block_
            try:
                quantize_block_(b, "fp8")       # the default policy: camera layers stay bf16
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"fp8 quantization: {type(e).__name__}: {e}")
                continue
        b.self_attn.backend = "8bit" if v.endswith("8bit") else "sdpa"
        blocks[v] = b
    res["variants"] = list(blocks)
    x_full, kw_full = block_inputs(cfg, grid, max(batches), device, dtype)

    def inputs_for(batch):
        kw = {k: (v if k in ("rot", "cam") else v[:batch]) for k, v in kw_full.items()}
        x0 = x_full[:batch].clone()
        return x0, kw

    def runner(block, batch):
        """(call, reset): one block call on the stream x (updated in place by the chunked block), and x's
        restoration from a kept copy (outside the timed spans)."""
        x0, kw = inputs_for(batch)
        x = x0.clone()
        return (lambda: block(x, **kw)), (lambda: x.copy_(x0))

    def label(v, fuse, batch, chunk):
        return f"{v} fuse={'on' if fuse else 'off'} b{batch} " + ("plain" if chunk is None else f"chunk {chunk}")

    def run_configs(configs, stage):
        for v, fuse, batch, chunk in configs:
            if over_budget(f"{stage}: {label(v, fuse, batch, chunk)}"):
                continue
            block = blocks[v]
            set_block(block, chunk, fuse)
            try:
                call, reset = runner(block, batch)
                with torch.no_grad():
                    r = time_calls(call, reset, device, args.warmup, args.reps)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    reset()
                    before = torch.cuda.memory_allocated()
                    with torch.no_grad():
                        call()
                    sync(device)
                    r["peak_extra_GB"] = (torch.cuda.max_memory_allocated() - before) / 1e9
                r.update(variant=v, fuse=fuse, batch=batch, chunk=chunk, stage=stage)
                res["timing"].append(r)
                print(f"  {label(v, fuse, batch, chunk):34s} {r['ms']:8.2f} ms  host {r['host_ms']:7.2f} ms  "
                      f"first {r['first_call_s']:6.2f} s  recompiles/graphs {r['dynamo_during_timed'] or '-'}",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"{stage} {label(v, fuse, batch, chunk)}: {type(e).__name__}: {e}")
                traceback.print_exc()
                if smoke:
                    raise
            save()
        set_block(blocks.get(variants[0], base), None, True)

    cfg_chunks = [None] + chunks

    def do_timing(configs, stage="timing"):
        if "timing" in skip or not configs:
            return
        print(f"== timing ({stage}): {cfg.name}, {L} tokens, chunks {chunks}", flush=True)
        run_configs(configs, stage)
        save()

    def do_unprepared_8bit():
        """The 8-bit path as it ran before attention8's prepare was registered: K/V re-quantized per query chunk."""
        if "timing" in skip or "fp8-8bit" not in blocks or "8bit" not in attn_mod._PREPARE:
            return
        saved = attn_mod._PREPARE.pop("8bit")
        try:
            n0 = len(res["timing"])
            run_configs([("fp8-8bit", True, b, pchunk) for b in batches], "timing-8bit-kv-per-chunk")
            for r in res["timing"][n0:]:
                r["note"] = "K/V re-quantized for every query chunk (attention8 before its prepare was registered)"
        finally:
            attn_mod._PREPARE["8bit"] = saved
        save()

    def do_sections(v):
        if "sections" in skip or v not in blocks:
            return
        print(f"== sections, {v} (instrumented copies; ms summed over the block call)", flush=True)
        for batch in batches:
            for chunk in cfg_chunks:
                if over_budget(f"sections: {label(v, True, batch, chunk)}"):
                    continue
                block = blocks[v]
                set_block(block, chunk, True)
                x0, kw = inputs_for(batch)
                x = x0.clone()
                fn = plain_sections if chunk is None else chunked_sections
                try:
                    with torch.no_grad():
                        ref = block(x0.clone(), **kw)
                        tots = []
                        for i in range(1 + args.reps):
                            x.copy_(x0)
                            sync(device)
                            tm = Marks(device)
                            got = fn(block, x, tm=tm, **kw)
                            tot = tm.totals()
                            if i:
                                tots.append(tot)
                        diff = (got.float() - ref.float()).abs().max().item()
                        del ref, got
                    if smoke and diff != 0:
                        raise AssertionError(f"instrumented copy differs from the block ({diff}): "
                                             "models/dit.py changed; update the copy")
                    sec = {k: statistics.median(t[k] for t in tots) for k in tot}
                    row = dict(variant=v, batch=batch, chunk=chunk, sections_ms=sec, groups_ms=grouped(sec),
                               total_ms=sum(sec.values()), max_abs_diff_vs_block=diff)
                    res["sections"].append(row)
                    print(f"  {label(v, True, batch, chunk):34s} total {row['total_ms']:8.2f} ms  " +
                          "  ".join(f"{k} {val:.1f}" for k, val in row["groups_ms"].items()), flush=True)
                except Exception as e:  # noqa: BLE001
                    res["errors"].append(f"sections {label(v, True, batch, chunk)}: {type(e).__name__}: {e}")
                    traceback.print_exc()
                    if smoke:
                        raise
                save()
                del x, x0, kw
        set_block(blocks[v], None, True)

    def do_profile(todo):
        if "profile" in skip:
            return
        print("== profiler", flush=True)
        for v, batch, chunk in todo:
            if v not in blocks or batch not in batches or over_budget(f"profile {v} b{batch} {chunk}"):
                continue
            key = label(v, True, batch, chunk)
            if key in res["profiles"]:
                continue
            block = blocks[v]
            set_block(block, chunk, True)
            try:
                call, reset = runner(block, batch)
                with torch.no_grad():
                    reset()
                    call()      # warm (compiled already in the timing stage, unless skipped)
                    p = profile_call(call, reset, device)
                res["profiles"][key] = p
                launches = (f"launches {p['kernel_launches']:5d} (+{p['memcpy_memset']} memcpy/set)"
                            if device.type == "cuda" else f"top-level ops {p['ops_counted']:5d}")
                print(f"  {key:34s} {launches}  "
                      f"total {p['total_us'] / 1e3:8.2f} ms  attention kernels {p['attention_kernels']}", flush=True)
            except Exception as e:  # noqa: BLE001
                res["errors"].append(f"profile {key}: {type(e).__name__}: {e}")
                traceback.print_exc()
                if smoke:
                    raise
            set_block(block, None, True)
            save()

    def print_top(keys):
        for key in keys:
            p = res["profiles"].get(key)
            if p:
                print(f"-- top kernels, {key} ({p['unit']}):")
                for t in p["top"]:
                    print(f"   {t['total_us'] / 1e3:9.2f} ms {t['pct']:5.1f}% x{t['calls']:<4d} {t['name'][:110]}")
                if p.get("table"):
                    print(p["table"])

    def do_sdpa():
        if "sdpa" in skip or over_budget("sdpa"):
            return
        print("== SDPA: query chunks against the full K/V", flush=True)
        try:
            with torch.no_grad():
                res["sdpa"] = sdpa_bench(cfg, L, chunks, device, dtype, args.reps,
                                         with_8bit=any("8bit" in v for v in blocks))
            for r in res["sdpa"]:
                head = f"  B{r['batch']} q {r['q_rows']:6d} x k {r['k_rows']}: {r['backend']:20s}"
                if "error" in r:
                    print(f"{head} {r['error'][:80]}")
                else:
                    print(f"{head} {r['ms']:8.2f} ms {r['tflops']:7.1f} TFLOP/s  (all queries of one sample: "
                          f"{r['ms_per_sample_all_queries']:.2f} ms)" + (f"  {r.get('kinds')}" if r.get("kinds") else ""))
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"sdpa: {type(e).__name__}: {e}")
            traceback.print_exc()
            if smoke:
                raise
        save()

    def do_tight():
        """The chunked (and plain) block under an allocator cap just above the call's own peak (CUDA only)."""
        if "tight" in skip or device.type != "cuda" or "bf16" not in blocks:
            return
        print("== tight allocator cap (cap = this call's own peak + margin)", flush=True)
        total = torch.cuda.get_device_properties(0).total_memory
        batch = batches[0]
        for chunk in (pchunk, None):
            for margin in margins:
                if over_budget(f"tight b{batch} {chunk} +{margin} GB"):
                    continue
                set_block(base, chunk, True)
                try:
                    call, reset = runner(base, batch)
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    with torch.no_grad():
                        reset()
                        call()
                    sync(device)
                    peak = torch.cuda.max_memory_allocated()
                    cap = peak + margin * 1e9
                    torch.cuda.empty_cache()
                    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
                    with torch.no_grad():
                        r = time_calls(call, reset, device, 1, args.reps)
                    r.update(batch=batch, chunk=chunk, margin_GB=margin, cap_GB=cap / 1e9, peak_GB=peak / 1e9)
                    res["tight"].append(r)
                    print(f"  {label('bf16', True, batch, chunk):34s} cap {cap / 1e9:6.2f} GB (+{margin}) "
                          f"{r['ms']:8.2f} ms  allocator {r['alloc_during_timed']}", flush=True)
                except Exception as e:  # noqa: BLE001
                    res["errors"].append(f"tight b{batch} {chunk} +{margin}: {type(e).__name__}: {e}")
                    traceback.print_exc()
                finally:
                    torch.cuda.set_per_process_memory_fraction(1.0)
                    torch.cuda.empty_cache()
                    set_block(base, None, True)
                save()

    # stages, most telling first (a run cut short by --budget-s keeps these)
    on, off = [f for f in fuses if f], [f for f in fuses if not f]
    if "bf16" in blocks:
        do_timing([("bf16", True, b, c) for b in batches for c in cfg_chunks] if on else [], "timing")
        do_profile([("bf16", batches[0], None), ("bf16", batches[0], pchunk), ("bf16", batches[0], min(chunks))])
        print_top([label("bf16", True, batches[0], None), label("bf16", True, batches[0], pchunk)])
        do_sections("bf16")
        do_tight()
    do_sdpa()
    if "bf16" in blocks and off:
        do_timing([("bf16", False, b, c) for b in batches for c in cfg_chunks], "timing")
    for v in ("fp8-8bit", "bf16-8bit"):
        if v in blocks:
            do_timing([(v, True, b, c) for b in batches for c in cfg_chunks], "timing")
    do_unprepared_8bit()
    if "fp8-8bit" in blocks:
        do_profile([("fp8-8bit", 1, None), ("fp8-8bit", 1, pchunk)])
        do_sections("fp8-8bit")

    save()
    print_summary(res)
    print(f"wrote {out_path} ({time.perf_counter() - t_start:.1f} s)")
    return res


def print_summary(res):
    rows = res["timing"]
    if rows:
        print("\n== summary: ms per block call (median), vs the plain block of the same variant/fuse/batch"
              " (* K/V re-quantized per query chunk: the 8-bit path before attention8's prepare was registered)")
        print(f"  {'variant':10s} {'fuse':4s} {'B':>2s} {'chunk':>7s} {'ms':>9s} {'vs plain':>9s} {'per chunk':>10s} "
              f"{'host ms':>8s} {'first s':>8s} {'dynamo':>7s} {'allocs':>6s}")
        plain = {(r["variant"], r["fuse"], r["batch"]): r["ms"] for r in rows
                 if r["chunk"] is None and r["stage"] == "timing"}
        for r in rows:
            p = plain.get((r["variant"], r["fuse"], r["batch"]))
            extra = r["ms"] - p if p is not None and r["chunk"] is not None else None
            n = r["batch"] * -(-res["tokens"] // r["chunk"]) if r["chunk"] else None
            star = "" if r["stage"] == "timing" else "*"
            print(f"  {r['variant'] + star:10s} {'on' if r['fuse'] else 'off':4s} {r['batch']:2d} "
                  f"{r['chunk'] if r['chunk'] else 'plain':>7} {r['ms']:9.2f} "
                  f"{'' if extra is None else f'{extra:+9.2f}':>9s} "
                  f"{'' if extra is None else f'{extra / n:+10.3f}':>10s} {r['host_ms']:8.2f} {r['first_call_s']:8.2f} "
                  f"{sum(r['dynamo_during_timed'].values()):7d} {r['alloc_during_timed'].get('num_device_alloc', 0):6d}")
    if res["sections"]:
        print("\n== sections (ms, grouped)")
        groups = GROUPS
        print(f"  {'config':22s} " + " ".join(f"{g:>12s}" for g in groups) + f" {'total':>9s}")
        for r in res["sections"]:
            name = f"{r['variant']} b{r['batch']} {r['chunk'] or 'plain'}"
            print(f"  {name:22s} " + " ".join(f"{r['groups_ms'].get(g, 0.0):12.2f}" for g in groups)
                  + f" {r['total_ms']:9.2f}")
    if res["errors"]:
        print("\n== errors")
        for e in res["errors"]:
            print("  " + e)
    if res["skipped"]:
        print("\n== skipped: " + "; ".join(res["skipped"]))


if __name__ == "__main__":
    main()
