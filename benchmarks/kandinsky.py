"""Kandinsky 5 I2V Pro (20 B) benchmark: one CFG step (cond + uncond, two forwards as diffusers' pipeline runs
them) of the full-size transformer with random weights at 512x768, side by side, each case in a fresh
subprocess (so peak host RAM is that case's own).

Cases (`--cases`, or `--group`, default groups A, B, C; `name@frames@capGB`, cap 0 = none):
  resident     worldstream: diffusers' module loaded by runtime/kandinsky.py, every block on the GPU
  diffusers    diffusers' Kandinsky5Transformer3DModel built directly on the GPU (no cap)
  worldstream  the engine under the planner's plan for the cap (pinned slabs, one copy per block, ring of slots)
  fifo2 / fifo6  the seed's block swap (shared/seeds/003), re-created: blocks start in pinned CPU memory,
               `blocks_in_memory` of them on the GPU, FIFO eviction (`block.to("cpu")`), the next block
               prefetched with non-blocking copies
  group        diffusers' group offloading (block_level, one block per group, use_stream=True)
  fp8 / int8 / fp8-block  worldstream with the visual blocks' linears compressed while loading (--quant), under
               the plan for the cap (which prices the compressed bytes; first / last blocks whole and resident)
  err-fp8 / err-int8  no timing: the relative error (max |q - bf16| / max |bf16|) of one forward of the resident
               compressed model against the resident bf16 one, same random weights and inputs
  qwen-resident / qwen-stream  Qwen2.5-VL-7B's language model (random weights, 28 layers, bf16), one forward of
               `frames` tokens (the prompt template and prompt): on the GPU, or its layers streamed from pinned
               RAM through the engine (pipelines/kandinsky_text.py's "stream" placement) under the cap
  pipeline     name@frames@cap[@steps]: `worldstream generate`'s code for this family end to end (Qwen2.5-VL +
               CLIP, VAE encode, denoise, tiled VAE decode) on a random full-size diffusers folder under --vram cap,
               phases and peaks (benchmarks/kandinsky_pipeline.py; steps default 3)
The cap is torch.cuda.set_per_process_memory_fraction(cap / total), as benchmarks/offload.py does (the pipeline
case passes it as --vram only). Each case runs in a fresh process (its own process group, killed with what it
started after `--timeout`); the JSON is rewritten after every case, so a timeout or a crash keeps what finished;
`--budget` (500 s) bounds the whole command: no case starts with less than 20 s left, the last one's timeout is
cut to what is left.

Commands on one H200 (fresh machine each, ~15 s for the pip line; the lead carries diffusers 0.42.1 and
importlib_metadata as wheels in .whl/; everything else the cases import is in the image: transformers,
accelerate (diffusers' group offloading needs it), safetensors, pillow, numpy; PyAV is not, so the pipeline
case skips its MP4 write and says so). Predicted wall times (H200; process start + imports ~15 s per case,
building 20 B random weights on the GPU ~10 s resident, ~30 s into 41 GB of pinned slabs, ~40 s through
pageable CPU memory then pinned for fifo / group, one warm-up forward + one timed CFG step at the planner's
16.5 s/step (121 frames) or 2.3 s/step (25 frames)):

  pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  PYTHONPATH=/tmp/site:src python3 benchmarks/kandinsky.py --group A --out $OUT/kandinsky_A.json   # ~5.5 min
  PYTHONPATH=/tmp/site:src python3 benchmarks/kandinsky.py --group B --out $OUT/kandinsky_B.json   # ~6 min
  PYTHONPATH=/tmp/site:src python3 benchmarks/kandinsky.py --group C --out $OUT/kandinsky_C.json   # ~5.5 min
  PYTHONPATH=/tmp/site:src python3 benchmarks/kandinsky.py --group P --out $OUT/kandinsky_P.json   # ~6 min

  A: resident@121@0 (~50 s) diffusers@121@0 (~50) worldstream@121@24 (~70) worldstream@121@12 (~70)
     fifo6@121@24 (~90)
  B: group@121@24 (~95) worldstream@25@12 (~50) fifo2@25@12 (~70) fifo6@25@12 (~70) group@25@12 (~70)
  C: fp8@121@12 (~75) fp8@25@12 (~55) int8@25@12 (~55) err-fp8@25@0 (~45) err-int8@25@0 (~45)
     qwen-resident@300@0 (~30) qwen-stream@300@12 (~35)
  P: pipeline@121@24 (~6 min: folder build ~100 s, of which Qwen's 16.6 GB written; text ~50 s reading it
     back from disk; load ~35 s; denoise 3 steps ~55 s; decode ~60 s); needs ~18 GB of disk under
     $KANDINSKY_WORKDIR (default the temp dir) and ~45 GB of host RAM
Each command is bounded at ~8.6 min by --budget 500 whatever the cases take. What comes back: the --out JSON
(one object per case: timings, peaks, the plan's predictions, or "error" with the stderr's tail).

  python benchmarks/kandinsky.py --cpu-smoke --out /tmp/k.json [--group X | --cases ...]
the same code for every case kind with the tiny config (4 visual blocks of width 64, 64x96 pixels, 16 text
tokens; a 4-layer Qwen of width 64) on the CPU: caps are skipped (said in the case's "notes"), capped cases
stream every block the plan would stream on the GPU (all, or all but the whole first / last under --quant),
fifo blocks are not pinned, group offloading runs without streams; fp8's torch._scaled_mm path is CUDA-only
(the CPU dequantizes), so it is not smoked. ~15 s per case on the shared 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from worldstream.models.kandinsky import KANDINSKY_VARIANTS  # noqa: E402
from worldstream.runtime.memory import peak_rss_bytes  # noqa: E402

GB = 1e9
FULL = KANDINSKY_VARIANTS["kandinsky5-i2v-pro"]
# the run's sizes, set once per process by `configure` (full size on the GPU, or `--cpu-smoke`: tiny, CPU)
CFG, H, W, TEXT, DEV, SMOKE = FULL, 512, 768, 256, "cuda", False
QWEN_FULL = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064)
QWEN_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512)
DEFAULT = ["resident@121@0", "diffusers@121@0", "worldstream@121@24", "worldstream@121@12", "fifo6@121@24",
           "group@121@24", "worldstream@25@12", "fifo2@25@12", "fifo6@25@12", "group@25@12"]
QUANT_QWEN = ["fp8@121@12", "fp8@25@12", "int8@25@12", "err-fp8@25@0", "err-int8@25@0", "qwen-resident@300@0",
              "qwen-stream@300@12"]
# commands of < 9 minutes each on one H200 (predicted wall times in the module docstring and BENCHMARKS.md)
GROUPS = {"A": DEFAULT[:5], "B": DEFAULT[5:], "C": QUANT_QWEN, "P": ["pipeline@121@24"]}


def configure(smoke: bool) -> None:
    global CFG, H, W, TEXT, DEV, SMOKE
    if smoke:
        CFG, H, W, TEXT, DEV, SMOKE = FULL.tiny(), 64, 96, 16, "cpu", True
        torch.set_num_threads(1)


def cuda() -> bool:
    return DEV == "cuda"


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def note(msg: str) -> None:
    print(f"[kandinsky] {msg}", flush=True)


def set_cap(cap: float) -> None:
    """The cap as benchmarks/offload.py sets it; on the CPU (smoke) there is none to set."""
    if not cuda():
        if cap:
            note(f"cap {cap / GB:g} GB skipped (CPU smoke: no CUDA caching allocator)")
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if not cap else min(1.0, cap / total))


def peak_vram() -> float:
    return torch.cuda.max_memory_allocated() / GB if cuda() else 0.0


def random_tensors(device=None, seed=0):
    from worldstream.checkpoints.kandinsky import expected_state
    from worldstream.runtime.kandinsky import keeps_fp32
    device = device or DEV
    g = torch.Generator(device=device).manual_seed(seed)
    for key, shape in expected_state(CFG).items():
        t = torch.randn(shape, generator=g, device=device)
        t = 1 + 0.02 * t if key.endswith("norm.weight") else 0.02 * t
        yield key, t if keeps_fp32(key) else t.to(torch.bfloat16)


def inputs(frames: int):
    f = (frames - 1) // 4 + 1
    g = torch.Generator(device=DEV).manual_seed(1)
    bf, c = torch.bfloat16, 2 * CFG.in_visual_dim + 1 if CFG.visual_cond else CFG.in_visual_dim
    s = CFG.latents.stride[1] * CFG.patch_size[1]
    return dict(hidden_states=torch.randn(1, f, H // 8, W // 8, c, generator=g, device=DEV, dtype=bf),
                encoder_hidden_states=torch.randn(1, TEXT, CFG.in_text_dim, generator=g, device=DEV, dtype=bf),
                timestep=torch.tensor([500.0], device=DEV, dtype=bf),
                pooled_projections=torch.randn(1, CFG.in_text_dim2, generator=g, device=DEV, dtype=bf),
                visual_rope_pos=[torch.arange(f, device=DEV), torch.arange(H // s, device=DEV),
                                 torch.arange(W // s, device=DEV)],
                text_rope_pos=torch.arange(TEXT, device=DEV), scale_factor=(1, 2, 2), return_dict=False)


def diffusers_model(device):
    """diffusers' class, filled with the same random tensors (its own init of 19 B params would take minutes),
    every tensor on `device`."""
    from diffusers import Kandinsky5Transformer3DModel

    from worldstream.checkpoints.kandinsky import KandinskyCheckpoint
    from worldstream.runtime.kandinsky import load_transformer
    model, _ = load_transformer(KandinskyCheckpoint(Path("."), CFG, "i2v"), device, torch.bfloat16,
                                tensors=random_tensors())
    assert isinstance(model, Kandinsky5Transformer3DModel)
    return model.to(device)     # its computed tables (RoPE, time frequencies) too; the weights are there already


def fifo_swap(model, blocks_in_memory: int):
    """The seed's DiffusionTransformer3DBlockSwap: FIFO of `blocks_in_memory` blocks on the GPU, the next block
    prefetched with non-blocking copies, the oldest evicted with block.to('cpu'). `model`: on the CPU; all but
    its visual blocks go to the device (moving the whole model first, as the seed does, would not fit a cap)."""
    blocks = model.visual_transformer_blocks
    for name, child in model.named_children():
        if name != "visual_transformer_blocks":
            child.to(DEV)
    for b in blocks:
        b.to("cpu")
        if cuda():
            for p in b.parameters():
                p.data = p.data.pin_memory()
    on_gpu: deque[int] = deque()

    def load(i):
        if i in on_gpu or i >= len(blocks):
            return
        while len(on_gpu) >= blocks_in_memory:
            j = on_gpu.popleft()
            blocks[j].to("cpu")
        for p in blocks[i].parameters():
            p.data = p.data.to(DEV, non_blocking=True)
        on_gpu.append(i)

    def pre(i):
        def hook(module, args):
            load(i)
            load(i + 1)
        return hook
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(pre(i))
    return model


QUANT = ("fp8", "int8", "fp8-block")


def qwen_case(name: str, tokens: int, cap: float) -> dict:
    """Qwen2.5-VL-7B's language model with random bf16 weights made on the device; "qwen-stream" then hands it
    to pipelines/kandinsky_text.py's `stream_language_model` (its layers packed into pinned slabs, the device
    copies freed) before the cap is set. Smoke: a 4-layer model of width 64, on the CPU."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    from worldstream.pipelines.kandinsky_text import stream_language_model
    size = QWEN_TINY if SMOKE else QWEN_FULL
    half = size["hidden_size"] // size["num_attention_heads"] // 2     # 7B: 64 = 16 + 24 + 24 (t, h, w)
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    cfg = Qwen2_5_VLConfig(text_config=dict(size, rope_scaling={"type": "mrope", "mrope_section": section})
                           ).text_config
    out = dict(case=f"{name}@{tokens}@{cap / GB:g}", method=name, tokens=tokens, cap_gb=cap / GB)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(DEV):      # (made in bf16 directly: a float32 7B would take 30 GB first)
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            lm = Qwen2_5_VLTextModel(cfg).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(dtype)
    layer_bytes = sum(p.numel() * p.element_size() for p in lm.layers[0].parameters())
    streaming = stream_language_model(lm, DEV) if name == "qwen-stream" else None
    sync()
    out["load_s"] = time.perf_counter() - t0
    out.update(layer_mb=layer_bytes / 1e6, transfer_floor_s=2 * len(lm.layers) * layer_bytes / 53e9)
    if cuda():
        torch.cuda.empty_cache()
    set_cap(cap)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=DEV)
    with torch.no_grad():
        lm(input_ids=ids)                         # warm-up
        sync()
        if cuda():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(2):                        # the prompt and the negative prompt
            lm(input_ids=ids)
        sync()
    out.update(encode_2_prompts_s=time.perf_counter() - t0, peak_rss_gb=peak_rss_bytes() / GB,
               peak_vram_gb=peak_vram())
    if streaming is not None:
        out["layer_copies"] = streaming[1].stats["copies"]
    return out


def error_case(fmt: str, frames: int) -> dict:
    """Relative error of the resident compressed transformer's output against the resident bf16 one."""
    from worldstream.checkpoints.compressed import QuantPolicy
    from worldstream.checkpoints.kandinsky import KandinskyCheckpoint
    from worldstream.runtime.kandinsky import place_transformer
    from worldstream.runtime.planner import Workload
    ck, work, x = KandinskyCheckpoint(Path("."), CFG, "i2v"), Workload(frames=frames, height=H, width=W), inputs(frames)
    outs = []
    t0 = time.perf_counter()
    for quant in (None, QuantPolicy(fmt)):
        placed = place_transformer(ck, DEV, torch.bfloat16, work, resident=list(range(CFG.num_layers)),
                                   tensors=random_tensors(), quant=quant)
        with torch.no_grad():
            outs.append(placed.model(**x)[0].float().cpu())
        placed.close()
        del placed
        if cuda():
            torch.cuda.empty_cache()
    ref, q = outs
    return dict(case=f"err-{fmt}@{frames}@0", method=f"err-{fmt}", frames=frames, seconds=time.perf_counter() - t0,
                rel_max=((q - ref).abs().max() / ref.abs().max()).item(),
                rel_rms=((q - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item(),
                peak_vram_gb=peak_vram(), peak_rss_gb=peak_rss_bytes() / GB)


def transformer_case(case: str, name: str, frames: int, cap: float) -> dict:
    from worldstream.checkpoints.compressed import QuantPolicy
    from worldstream.checkpoints.kandinsky import KandinskyCheckpoint
    from worldstream.runtime.kandinsky import place_transformer
    from worldstream.runtime.planner import Workload
    from worldstream.runtime.runner import plan_run
    set_cap(cap)
    out = dict(case=case, method=name, frames=frames, cap_gb=cap / GB, tokens=CFG.tokens(frames, H, W))
    workload = Workload(frames=frames, height=H, width=W, guidance=True)
    policy = QuantPolicy(name) if name in QUANT else None
    p = plan_run(CFG, workload, cap or None, 100 * GB, torch.bfloat16, policy)
    out.update(predicted_step_s=p.step_seconds, predicted_resident_s=p.resident_step_seconds,
               predicted_vram_gb=p.vram_peak / GB, resident_blocks=len(p.resident), prefetch=p.prefetch,
               transfer_floor_s=2 * CFG.num_layers * p.block_bytes / 53e9)
    t0 = time.perf_counter()
    ck = KandinskyCheckpoint(Path("."), CFG, "i2v")
    if name in ("resident", "worldstream") + QUANT:
        planned = name != "resident"
        resident = None if planned else list(range(CFG.num_layers))
        plan_ = p if planned else None
        if planned and SMOKE:      # the tiny model fits any cap: force the streamed placement the cap gives on the GPU
            plan_, resident = None, sorted(policy.pinned(CFG.num_layers)) if policy is not None else []
            note(f"{case}: plan for the tiny model has {len(p.resident)} resident blocks; streaming "
                 f"{CFG.num_layers - len(resident)} of {CFG.num_layers} instead (smoke)")
        placed = place_transformer(ck, DEV, torch.bfloat16, workload, plan_=plan_, resident=resident,
                                   prefetch=p.prefetch, tensors=random_tensors(), quant=policy)
        model = placed.model
        out["streamed_blocks"] = len(placed.sources)
    else:
        model = diffusers_model(DEV if name == "diffusers" else "cpu")
        if name.startswith("fifo"):
            fifo_swap(model, int(name[4:]))
        elif name == "group":
            from diffusers.hooks import apply_group_offloading
            from diffusers.utils import is_accelerate_available
            if not is_accelerate_available():    # diffusers' group offloading calls accelerate's send_to_device
                raise SystemExit("group offloading needs accelerate (pip install accelerate)")
            if not cuda():
                note(f"{case}: group offloading onto the CPU without streams (use_stream needs CUDA)")
            apply_group_offloading(model, onload_device=torch.device(DEV), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=cuda())
    sync()
    out["load_s"] = time.perf_counter() - t0
    x = inputs(frames)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(**x)                       # warm-up forward
        sync()
        out["warmup_s"] = time.perf_counter() - t0
        if cuda():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model(**x)
        model(**x)                       # cond + uncond: one CFG step
        sync()
    out.update(step_s=time.perf_counter() - t0, peak_vram_gb=peak_vram(),
               peak_rss_gb=peak_rss_bytes() / GB, weights_gb=(CFG.num_layers * p.block_bytes) / GB,
               block_mb=p.block_bytes / 1e6)
    return out


def one_case(case: str) -> dict:
    name, frames, cap, *rest = case.split("@")
    frames, cap = int(frames), float(cap) * GB
    if name.startswith("qwen-"):
        return qwen_case(name, frames, cap)
    if name.startswith("err-"):
        return error_case(name[4:], frames)
    if name == "pipeline":
        from kandinsky_pipeline import pipeline_case      # benchmarks/kandinsky_pipeline.py
        return pipeline_case(case, frames, cap, SMOKE, *(int(v) for v in rest[:1]))
    if name not in ("resident", "diffusers", "worldstream", "group") + QUANT and not name.startswith("fifo"):
        raise SystemExit(f"unknown case {case!r}")
    return transformer_case(case, name, frames, cap)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", help="name@frames@capGB ... (default: group A, B and C's cases)")
    ap.add_argument("--group", choices=sorted(GROUPS), help="a named set of cases, one < 9 min command each")
    ap.add_argument("--out", default="kandinsky.json")
    ap.add_argument("--one")
    ap.add_argument("--timeout", type=float, help="seconds per case, its processes killed after (default: 240, "
                    "480 for pipeline cases)")
    ap.add_argument("--budget", type=float, default=500,
                    help="seconds for the whole command: a case starts only with its timeout cut to what is left, "
                         "and none starts with less than 20 s left")
    ap.add_argument("--cpu-smoke", action="store_true", help="same code path, tiny models, on the CPU")
    a = ap.parse_args()
    configure(a.cpu_smoke)
    if a.one:
        print("RESULT " + json.dumps(one_case(a.one)), flush=True)
        return
    cases = a.cases if a.cases else GROUPS[a.group] if a.group else DEFAULT + QUANT_QWEN
    results, start = [], time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in cases:
        left = a.budget - (time.perf_counter() - start)
        if left < 20:
            res = dict(case=case, error=f"not started: {a.budget:g} s budget spent")
        else:
            timeout = min(a.timeout or (480 if case.startswith("pipeline@") else 240), left)
            cmd = [sys.executable, __file__, "--one", case] + (["--cpu-smoke"] if a.cpu_smoke else [])
            t0 = time.perf_counter()
            # its own process group: a timeout kills the case and whatever it started (the folder build)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
                line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT ")), None)
                res = json.loads(line[7:]) if line else dict(case=case, error=(stderr or stdout)[-1500:])
                notes = [ln for ln in stdout.splitlines() if ln.startswith("[kandinsky]")]
                if notes:
                    res["notes"] = notes
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
                res = dict(case=case, error=f"timed out after {timeout:.0f} s", stderr_tail=stderr[-1500:],
                           notes=[ln for ln in stdout.splitlines() if ln.startswith("[kandinsky]")])
            res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(json.dumps(res), flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))     # after every case: a later timeout keeps these
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
