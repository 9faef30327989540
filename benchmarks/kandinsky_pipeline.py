"""The `pipeline@FRAMES@CAP[@STEPS]` case of benchmarks/kandinsky.py: Kandinsky 5 I2V Pro end to end (issue 15's
last target: text encoders, VAE, transformer under `--vram 24GB`, 121 frames), phases and peaks.

What runs is `worldstream generate`'s own code for this family (`prepare_kandinsky` -> `run_kandinsky`,
pipelines/kandinsky.py) on a checkpoint folder in the real diffusers layout, built first by a separate process
(`--build`, so that the run's peak RSS is its own) with random full-size weights:
  * text_encoder/  Qwen2.5-VL-7B (language model 3584 x 28 layers, vision tower 32 blocks), random bf16, made on
                   the GPU and written by `save_pretrained` (16.6 GB);
  * text_encoder_2/ CLIP-L's text tower (12 layers of 768, 123 M), vae/ the HunyuanVideo VAE (diffusers' default
                   config, 246 M, float32), scheduler/ flow-match Euler (shift 5);
  * tokenizer/, tokenizer_2/  the repo's tiny umT5 tokenizer (no network on the GPU machine; it tokenizes the
                   prompt template to well over the 128 tokens the pipeline crops, ids < 120);
  * transformer/   config.json only: the 20 B transformer's weights (41 GB in bf16, which with the rest would
                   not fit the lent machine's 64 GB disk) are generated on the device tensor by tensor and given
                   to `run_kandinsky(transformer_tensors=...)`, which loads them as it loads the shards (the
                   streamed blocks into pinned slabs). So "load" is generation, not a disk read of 41 GB.
After building, every file of the folder is dropped from the page cache (benchmarks/pipeline.py
`evict_page_cache`), so "text" reads Qwen from the disk.

Reported: per phase (text: Qwen + CLIP load, encode of prompt and negative prompt, free; load: transformer +
VAE; denoise: the first frame's VAE encode, `vae_encode_s`, and STEPS steps of CFG 5; decode: the tiled VAE
decode of all frames; write: the MP4 when PyAV is there) the seconds, peak VRAM within the phase, peak RSS so
far; the plan; s/step. STEPS defaults to 3 (50 would take ~14 min at the predicted 16.5 s/step).
`--cpu-smoke`: the same code with tiny sizes on the CPU (no budget: the CPU has no VRAM).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
GB = 1e9
PROMPT = "A red dragon flies over a snowy mountain range at sunrise, the camera follows it."

QWEN = dict(full=dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                max_position_embeddings=128000, tie_word_embeddings=False,
                                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6),
                      vision=dict(depth=32, hidden_size=1280, out_hidden_size=3584, num_heads=16,
                                  intermediate_size=3420, fullatt_block_indexes=[7, 15, 23, 31])),
            tiny=dict(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=152, max_position_embeddings=1024,
                                tie_word_embeddings=False, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                      vision=dict(depth=1, hidden_size=16, out_hidden_size=32, num_heads=2, intermediate_size=32,
                                  fullatt_block_indexes=[0])))
CLIP = dict(full=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      vocab_size=49408, max_position_embeddings=77, projection_dim=768),
            tiny=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=152, max_position_embeddings=77, projection_dim=16))
VAE = dict(full=dict(), tiny=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4))


def config(smoke: bool):
    from worldstream.models.kandinsky import KANDINSKY_VARIANTS
    cfg = KANDINSKY_VARIANTS["kandinsky5-i2v-pro"]
    return cfg.tiny() if smoke else cfg


def build_folder(root: Path, smoke: bool) -> dict:
    """The checkpoint folder (see the module docstring); returns the bytes written per component."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
    from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration)

    from worldstream.testing.kandinsky import TOKENIZER
    size, device = ("tiny", "cpu") if smoke else ("full", "cuda")
    cfg = config(smoke)
    assert QWEN[size]["text"]["hidden_size"] == cfg.in_text_dim and CLIP[size]["hidden_size"] == cfg.in_text_dim2
    root.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    for name in ("tokenizer", "tokenizer_2"):
        tok.save_pretrained(str(root / name))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)            # made in bf16 directly (float32 first: 33 GB)
    try:
        with torch.device(device):
            qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
                text_config=QWEN[size]["text"], vision_config=QWEN[size]["vision"],
                vocab_size=QWEN[size]["text"]["vocab_size"])).eval()
    finally:
        torch.set_default_dtype(default)
    qwen.save_pretrained(str(root / "text_encoder"), max_shard_size="4GB")
    del qwen
    if device == "cuda":
        torch.cuda.empty_cache()
    clip = CLIPTextModel(CLIPTextConfig(**CLIP[size], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                        bos_token_id=tok.eos_token_id)).eval()
    clip.save_pretrained(str(root / "text_encoder_2"))
    vae = AutoencoderKLHunyuanVideo(**VAE[size], mid_block_add_attention=True).eval()
    vae.save_pretrained(str(root / "vae"))
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(str(root / "scheduler"))
    (root / "transformer").mkdir(exist_ok=True)
    (root / "transformer" / "config.json").write_text(json.dumps(
        dict(_class_name="Kandinsky5Transformer3DModel", **cfg.diffusers_config()), indent=1))
    index = dict(_class_name="Kandinsky5I2VPipeline", _diffusers_version="0.42.1",
                 transformer=["diffusers", "Kandinsky5Transformer3DModel"],
                 vae=["diffusers", "AutoencoderKLHunyuanVideo"],
                 text_encoder=["transformers", "Qwen2_5_VLForConditionalGeneration"],
                 tokenizer=["transformers", type(tok).__name__],
                 text_encoder_2=["transformers", "CLIPTextModel"], tokenizer_2=["transformers", type(tok).__name__],
                 scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"])
    (root / "model_index.json").write_text(json.dumps(index, indent=1))
    return {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in root.iterdir() if d.is_dir()}


def note(msg: str) -> None:      # (benchmarks/kandinsky.py keeps these lines, also from a case that times out)
    print(f"[kandinsky] {msg}", flush=True)


def pipeline_case(case: str, frames: int, cap: float, smoke: bool, steps: int = 3) -> dict:
    from pipeline import evict_page_cache        # benchmarks/pipeline.py

    out = dict(case=case, method="pipeline", frames=frames, cap_gb=cap / GB, steps=steps)
    with tempfile.TemporaryDirectory(prefix="k5pipe", dir=os.environ.get("KANDINSKY_WORKDIR")) as tmp:
        root = Path(tmp) / "Kandinsky-5.0-I2V-Pro-random-Diffusers"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--build", str(root)] + (["--cpu-smoke"] if smoke else []),
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"building the folder failed:\n{(r.stderr or r.stdout)[-1500:]}")
        out["build_s"] = time.perf_counter() - t0
        out["folder_bytes"] = json.loads(r.stdout.strip().splitlines()[-1])
        note(f"folder built in {out['build_s']:.1f} s: {out['folder_bytes']}")
        t0 = time.perf_counter()
        out["evicted_bytes"] = evict_page_cache(root)       # (fsync first: the written data reaches the disk)
        out["evict_s"] = time.perf_counter() - t0
        note(f"{out['evicted_bytes'] / GB:.1f} GB synced and dropped from the page cache in {out['evict_s']:.1f} s")
        out.update(run(root, frames, cap, smoke, steps))
    return out


def run(root: Path, frames: int, cap: float, smoke: bool, steps: int) -> dict:
    import numpy as np
    from PIL import Image

    import kandinsky as bench                    # benchmarks/kandinsky.py: the same random tensors
    from worldstream.pipelines.kandinsky import prepare_kandinsky, run_kandinsky, write_video
    from worldstream.runtime.memory import peak_rss_bytes

    bench.configure(smoke)
    device = bench.DEV
    img = Path(root) / "first.png"
    Image.fromarray((np.random.RandomState(0).rand(bench.H, bench.W, 3) * 255).astype(np.uint8)).save(img)
    t0 = time.perf_counter()
    job = prepare_kandinsky(root, PROMPT, image=str(img), size=f"{bench.W}*{bench.H}", frame_num=frames,
                            steps=steps, seed=0)
    assert job.ckpt.config == bench.CFG, (job.ckpt.config.name, bench.CFG.name)
    force = {}
    if smoke:      # no plan on the CPU (the planner plans for a GPU): stream all but block 0, as the tests do
        force = dict(resident=[0], prefetch=1)
        bench.note(f"--vram {cap / GB:g}GB on the CPU (smoke): no plan; visual blocks 1.. streamed, Qwen 'gpu' "
                   "placement on the CPU")
    frames_out = run_kandinsky(job, device, torch.bfloat16, vram=cap or None, progress=not smoke,
                               transformer_tensors=bench.random_tensors(), prompt_cache=None, **force)
    total = time.perf_counter() - t0
    rep = job.report
    note(f"pipeline done in {total:.1f} s: " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in rep["phases"].items()))
    t1 = time.perf_counter()
    try:
        import av  # noqa: F401
        write_video(frames_out, Path(root) / "out.mp4")
        rep["phases"]["write"] = dict(seconds=time.perf_counter() - t1, peak_rss=peak_rss_bytes())
    except ImportError:
        bench.note("write skipped: PyAV (av) is not installed")
    phases = {k: {n: (v / GB if n.startswith("peak") else v) for n, v in ph.items()}
              for k, ph in rep["phases"].items()}
    den = rep["phases"]["denoise"]
    return dict(total_s=total, frames_shape=list(np.shape(frames_out)), phases_gb=phases, plan=rep.get("plan"),
                step_s=(den["seconds"] - den.get("vae_encode_s", 0.0)) / steps,
                finite=bool(np.isfinite(frames_out).all()), peak_rss_gb=peak_rss_bytes() / GB)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args()
    if a.cpu_smoke:
        torch.set_num_threads(1)
    print(json.dumps(build_folder(Path(a.build), a.cpu_smoke)))
