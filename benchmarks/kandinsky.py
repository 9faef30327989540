"""Kandinsky 5 I2V Pro (20 B) benchmark: one CFG step (cond + uncond, two forwards as diffusers' pipeline runs
them) of the full-size transformer with random weights at 512x768, side by side, each case in a fresh
subprocess (so peak host RAM is that case's own).

Cases (`--cases`, default all; `name@frames@capGB`, cap 0 = none):
  resident     worldstream: diffusers' module loaded by runtime/kandinsky.py, every block on the GPU
  diffusers    diffusers' Kandinsky5Transformer3DModel built directly on the GPU (no cap)
  worldstream  the engine under the planner's plan for the cap (pinned slabs, one copy per block, ring of slots)
  fifo2 / fifo6  the seed's block swap (shared/seeds/003), re-created: blocks start in pinned CPU memory,
               `blocks_in_memory` of them on the GPU, FIFO eviction (`block.to("cpu")`), the next block
               prefetched with non-blocking copies
  group        diffusers' group offloading (block_level, one block per group, use_stream=True)
The cap is torch.cuda.set_per_process_memory_fraction(cap / total), as benchmarks/offload.py does.
Usage: python benchmarks/kandinsky.py --out $OUT/kandinsky.json [--cases ...]
"""
from __future__ import annotations

import argparse
import json
import os
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
CFG = KANDINSKY_VARIANTS["kandinsky5-i2v-pro"]
H, W, TEXT = 512, 768, 256
DEFAULT = ["resident@121@0", "diffusers@121@0", "worldstream@121@24", "worldstream@121@12", "fifo6@121@24",
           "group@121@24", "worldstream@25@12", "fifo2@25@12", "fifo6@25@12", "group@25@12"]


def random_tensors(device="cuda", seed=0):
    from worldstream.checkpoints.kandinsky import expected_state
    from worldstream.runtime.kandinsky import keeps_fp32
    g = torch.Generator(device=device).manual_seed(seed)
    for key, shape in expected_state(CFG).items():
        t = torch.randn(shape, generator=g, device=device)
        t = 1 + 0.02 * t if key.endswith("norm.weight") else 0.02 * t
        yield key, t if keeps_fp32(key) else t.to(torch.bfloat16)


def inputs(frames: int):
    f = (frames - 1) // 4 + 1
    g = torch.Generator(device="cuda").manual_seed(1)
    bf = torch.bfloat16
    return dict(hidden_states=torch.randn(1, f, H // 8, W // 8, 33, generator=g, device="cuda", dtype=bf),
                encoder_hidden_states=torch.randn(1, TEXT, 3584, generator=g, device="cuda", dtype=bf),
                timestep=torch.tensor([500.0], device="cuda", dtype=bf),
                pooled_projections=torch.randn(1, 768, generator=g, device="cuda", dtype=bf),
                visual_rope_pos=[torch.arange(f, device="cuda"), torch.arange(H // 16, device="cuda"),
                                 torch.arange(W // 16, device="cuda")],
                text_rope_pos=torch.arange(TEXT, device="cuda"), scale_factor=(1, 2, 2), return_dict=False)


def diffusers_model(device):
    from diffusers import Kandinsky5Transformer3DModel

    from worldstream.runtime.kandinsky import load_transformer, skeleton  # noqa: F401
    from worldstream.checkpoints.kandinsky import KandinskyCheckpoint
    # diffusers' class, filled with the same random tensors (its own init of 19 B params would take minutes)
    model, _ = load_transformer(KandinskyCheckpoint(Path("."), CFG, "i2v"), device, torch.bfloat16,
                                tensors=random_tensors())
    assert isinstance(model, Kandinsky5Transformer3DModel)
    return model


def fifo_swap(model, blocks_in_memory: int):
    """The seed's DiffusionTransformer3DBlockSwap: FIFO of `blocks_in_memory` blocks on the GPU, the next block
    prefetched with non-blocking copies, the oldest evicted with block.to('cpu')."""
    blocks = model.visual_transformer_blocks
    for b in blocks:
        b.to("cpu")
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
            p.data = p.data.to("cuda", non_blocking=True)
        on_gpu.append(i)

    def pre(i):
        def hook(module, args):
            load(i)
            load(i + 1)
        return hook
    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(pre(i))
    return model


def one_case(case: str) -> dict:
    name, frames, cap = case.split("@")
    frames, cap = int(frames), float(cap) * GB
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if not cap else min(1.0, cap / total))
    from worldstream.checkpoints.kandinsky import KandinskyCheckpoint
    from worldstream.runtime.kandinsky import place_transformer
    from worldstream.runtime.planner import Workload
    from worldstream.runtime.runner import plan_run
    out = dict(case=case, method=name, frames=frames, cap_gb=cap / GB, tokens=CFG.tokens(frames, H, W))
    workload = Workload(frames=frames, height=H, width=W, guidance=True)
    p = plan_run(CFG, workload, cap or None, 100 * GB, torch.bfloat16, None)
    out.update(predicted_step_s=p.step_seconds, predicted_resident_s=p.resident_step_seconds,
               predicted_vram_gb=p.vram_peak / GB, resident_blocks=len(p.resident),
               transfer_floor_s=2 * CFG.num_layers * p.block_bytes / 53e9)
    t0 = time.perf_counter()
    ck = KandinskyCheckpoint(Path("."), CFG, "i2v")
    if name in ("resident", "worldstream"):
        placed = place_transformer(ck, "cuda", torch.bfloat16, workload, plan_=p if name == "worldstream" else None,
                                   resident=None if name == "worldstream" else list(range(CFG.num_layers)),
                                   tensors=random_tensors())
        model = placed.model
    else:
        model = diffusers_model("cuda" if name == "diffusers" else "cpu")
        if name.startswith("fifo"):
            model.to("cuda")    # the seed moves all but the blocks (the blocks are put back on the CPU below)
            fifo_swap(model, int(name[4:]))
        elif name == "group":
            from diffusers.hooks import apply_group_offloading
            apply_group_offloading(model, onload_device=torch.device("cuda"), offload_type="block_level",
                                   num_blocks_per_group=1, use_stream=True)
    out["load_s"] = time.perf_counter() - t0
    x = inputs(frames)
    with torch.no_grad():
        model(**x)                       # warm-up forward
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model(**x)
        model(**x)                       # cond + uncond: one CFG step
        torch.cuda.synchronize()
    out.update(step_s=time.perf_counter() - t0, peak_vram_gb=torch.cuda.max_memory_allocated() / GB,
               peak_rss_gb=peak_rss_bytes() / GB, weights_gb=(CFG.num_layers * p.block_bytes) / GB)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=DEFAULT)
    ap.add_argument("--out", default="kandinsky.json")
    ap.add_argument("--one")
    ap.add_argument("--timeout", type=int, default=150)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one_case(a.one)), flush=True)
        return
    results = []
    for case in a.cases:
        try:
            r = subprocess.run([sys.executable, __file__, "--one", case], capture_output=True, text=True,
                               timeout=a.timeout)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else dict(case=case, error=(r.stderr or r.stdout)[-600:])
        except subprocess.TimeoutExpired:
            res = dict(case=case, error=f"timed out after {a.timeout} s")
        results.append(res)
        print(json.dumps(res), flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
