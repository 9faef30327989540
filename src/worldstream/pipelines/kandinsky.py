"""Kandinsky 5 (I2V / T2V) end to end, with diffusers' own pipeline math: worldstream brings the loading (checked,
one tensor at a time), the placement (the transformer's visual blocks streamed under the planner's budget), the
phases (text encoders on the device then freed, before the transformer loads), progress and an atomic MP4.

Phases: "text" (Qwen2.5-VL + CLIP encode the prompt and the negative prompt, then are freed; Qwen on the GPU,
the CPU or its layers streamed through the GPU when it does not fit `vram`, and prompts seen before read from the
prompt cache without loading either encoder: pipelines/kandinsky_text.py), "load" (the
transformer into its homes, the VAE to the device), "denoise" (diffusers' `Kandinsky5I2VPipeline` /
`Kandinsky5T2VPipeline.__call__` with the embeddings given, so its loop, scheduler, first-frame conditioning
and CFG are the reference's: cond and uncond as two forwards), "decode" (the HunyuanVideo VAE, tiled when a
VRAM budget is given), "write". `report` has seconds and peak VRAM per phase (the peak within the phase),
the process's peak RSS so far at each phase's end, and the VAE's encode of the first frame (inside "denoise",
where diffusers' pipeline runs it) as `phases["denoise"]["vae_encode_s"]`.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints.kandinsky import KandinskyCheckpoint, find_kandinsky, validate_component
from ..checkpoints.tensors import CheckpointError, read_json
from ..runtime.memory import peak_rss_bytes
from ..runtime.kandinsky import place_transformer
from ..runtime.planner import Workload
from .kandinsky_text import KandinskyPromptCache, encode_kandinsky_prompts
from .progress import Progress

NEGATIVE = ("Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, "
            "deformed, walking backwards")   # the diffusers pipelines' default
FPS = 24
I2V_REFERENCE_FRAMES = 4      # latent frames diffusers' i2v pipeline normalises against later ones


@dataclass
class KandinskyJob:
    ckpt: KandinskyCheckpoint
    prompt: str
    image: object = None                  # a PIL image (i2v)
    negative_prompt: str = NEGATIVE
    frames: int = 121
    width: int = 768
    height: int = 512
    steps: int = 50
    guide_scale: float = 5.0
    seed: int = 0
    report: dict = field(default_factory=dict)

    def describe(self) -> str:
        return (f"{self.ckpt.config.name} ({self.ckpt.task}): {self.frames} frames at {self.width}x{self.height}, "
                f"{self.steps} steps, CFG {self.guide_scale:g}, seed {self.seed}")


def _component(root: Path, name: str, dtype: torch.dtype | None = None):
    """A companion as model_index.json names its class, loaded by its library, then checked."""
    import importlib

    index = read_json(root / "model_index.json", "pipeline index")
    entry = index.get(name) if isinstance(index, dict) else None
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in ("transformers", "diffusers")):
        raise CheckpointError(f"{root}/model_index.json: no usable entry for {name!r}")
    cls = getattr(importlib.import_module(entry[0]), str(entry[1]), None)
    if cls is None:
        raise CheckpointError(f"{root}/model_index.json: {name} class {entry[1]!r} is not in {entry[0]}")
    folder = str(root / name)
    if name.startswith("tokenizer") or name == "scheduler":
        return cls.from_pretrained(folder) if name != "scheduler" else cls.from_config(cls.load_config(folder))
    try:
        model, info = cls.from_pretrained(folder, torch_dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: cannot load {entry[1]} ({str(e).splitlines()[0][:300]})") from None
    validate_component(root, name, model, list(info.get("missing_keys") or []))
    return model.eval().requires_grad_(False)


def text_encoder_placement(root: Path, device, vram: float | None, text_cpu: bool = False) -> str:
    """"cpu" with `text_cpu`; on a GPU with a `vram` budget that Qwen2.5-VL's stored weights exceed 85% of,
    "stream" (the budget holds for every phase, as for umT5); else "gpu"."""
    if text_cpu:
        return "cpu"
    size = sum(f.stat().st_size for f in (Path(root) / "text_encoder").glob("*.safetensors"))
    if torch.device(device).type == "cuda" and vram is not None and size > 0.85 * vram:
        return "stream"
    return "gpu"


def _pipeline_class(task: str):
    from diffusers import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline
    return Kandinsky5I2VPipeline if task == "i2v" else Kandinsky5T2VPipeline


def _peak(device) -> float:
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def run_kandinsky(job: KandinskyJob, device="cpu", dtype: torch.dtype = torch.bfloat16, vram: float | None = None,
                  ram: float | None = None, text_cpu: bool = False, progress: bool = True,
                  resident: list[int] | None = None, prefetch: int = 1, quant=None,
                  prompt_cache: KandinskyPromptCache | None = None, text_placement: str | None = None,
                  transformer_tensors=None):
    """Frames as float [F, H, W, 3] in [0, 1] (numpy); `job.report` gets phases, peaks and the plan. `quant`
    ("fp8" | "fp8-block" | "int8" | a QuantPolicy): the visual blocks' linears compressed while loading.
    `text_placement` ("gpu" | "cpu" | "stream"): where Qwen2.5-VL runs; by default "cpu" with `text_cpu`,
    "stream" on a GPU when its weights exceed 85% of `vram`, else "gpu". `transformer_tensors`: (key, tensor)
    pairs to load instead of transformer/'s files (benchmarks: random full-size weights made on the device)."""
    device = torch.device(device)
    root, cfg, rep = job.ckpt.root, job.ckpt.config, job.report
    phases = rep.setdefault("phases", {})
    cls = _pipeline_class(job.ckpt.task)
    guided = job.guide_scale > 1.0

    t0 = time.perf_counter()
    placement = text_placement or text_encoder_placement(root, device, vram, text_cpu)
    text = {}
    encoded = encode_kandinsky_prompts([job.prompt] + ([job.negative_prompt] if guided else []), root, cls,
                                       lambda name, dt: _component(root, name, dt), device, dtype, placement,
                                       prompt_cache, report=text)
    emb, neg = encoded[0], (encoded[1] if guided else (None,) * 3)
    gc.collect()
    phases["text"] = dict(seconds=time.perf_counter() - t0, peak_vram=_peak(device), peak_rss=peak_rss_bytes(),
                          **text)
    vae = _component(root, "vae", dtype)
    pipe = cls(transformer=None, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
               scheduler=_component(root, "scheduler"))

    t0 = time.perf_counter()
    workload = Workload(frames=job.frames, height=job.height, width=job.width, guidance=guided)
    placed = place_transformer(job.ckpt, device, dtype, workload, vram, ram, resident=resident, prefetch=prefetch,
                               quant=quant, tensors=transformer_tensors)
    if placed.plan is not None:
        rep["plan"] = placed.plan.describe()
    pipe.transformer = placed.model
    pipe.register_modules(transformer=placed.model)
    vae.to(device)
    if vram is not None:
        vae.enable_tiling()
    phases["load"] = dict(seconds=time.perf_counter() - t0, peak_vram=_peak(device), peak_rss=peak_rss_bytes())
    encode, encoded = vae.encode, {}

    def timed_encode(*args, **kwargs):      # the first frame's latents (i2v), inside the pipeline's __call__
        t = time.perf_counter()
        try:
            return encode(*args, **kwargs)
        finally:
            encoded["seconds"] = encoded.get("seconds", 0.0) + time.perf_counter() - t
    vae.encode = timed_encode

    bar = Progress(job.steps, "denoise", enabled=progress)
    marks = {}

    def on_step(p, i, t, kwargs):
        bar.update()
        marks["denoised"] = time.perf_counter()
        if i == job.steps - 1:              # the decode that follows has its own peak
            marks["peak"] = _peak(device)
        return {}

    t0 = time.perf_counter()
    extra = dict(image=job.image) if job.ckpt.task == "i2v" else {}
    try:
        with torch.no_grad():
            out = pipe(**extra, prompt=None, height=job.height, width=job.width, num_frames=job.frames,
                       num_inference_steps=job.steps, guidance_scale=job.guide_scale,
                       generator=torch.Generator(device="cpu").manual_seed(job.seed),
                       prompt_embeds_qwen=emb[0], prompt_embeds_clip=emb[1], prompt_cu_seqlens=emb[2],
                       negative_prompt_embeds_qwen=neg[0], negative_prompt_embeds_clip=neg[1],
                       negative_prompt_cu_seqlens=neg[2], output_type="np", callback_on_step_end=on_step)
    finally:
        placed.close()
        vae.encode = encode
    end = time.perf_counter()
    done = marks.get("denoised", end)
    decode_peak = _peak(device)
    phases["denoise"] = dict(seconds=done - t0, peak_vram=marks.get("peak", decode_peak),
                             vae_encode_s=encoded.get("seconds", 0.0))
    phases["decode"] = dict(seconds=end - done, peak_vram=decode_peak if "peak" in marks else 0.0,
                            peak_rss=peak_rss_bytes())
    return out.frames[0]


def write_video(frames, path) -> Path:
    """float [F, H, W, 3] in [0, 1] -> an MP4 at 24 fps, written atomically."""
    import numpy as np

    from .video import write_mp4
    return write_mp4((np.clip(frames, 0, 1) * 255).round().astype(np.uint8), path, fps=FPS)


def prepare_kandinsky(ckpt_dir, prompt: str, image=None, size: str | None = None, frame_num: int | None = None,
                      steps: int | None = None, guide_scale: float | None = None, seed: int | None = None,
                      negative_prompt: str | None = None, dit=None) -> KandinskyJob:
    """Check the inputs against the checkpoint before anything large is loaded. `dit`: the original single-file
    transformer to use instead of transformer/'s weights."""
    from .conditioning import GenerationError

    ckpt = find_kandinsky(ckpt_dir, dit)
    cfg, s = ckpt.config, ckpt.config.sampling
    w, h = s.size
    if size:
        try:
            w, h = (int(v) for v in size.replace("x", "*").split("*"))
        except ValueError:
            raise GenerationError(f"--size {size!r}: expected WIDTH*HEIGHT, e.g. 768*512") from None
    m = cfg.pixel_multiple
    if w % m or h % m or w <= 0 or h <= 0:
        raise GenerationError(f"--size {w}*{h}: {cfg.name} needs both sides multiples of {m}")
    frames = frame_num or s.frame_num
    if frames < 1 or (frames - 1) % 4:
        raise GenerationError(f"--frame_num {frames}: must be 4n+1")
    if ckpt.task == "i2v" and (frames - 1) // 4 + 1 <= I2V_REFERENCE_FRAMES:
        # diffusers' Kandinsky5I2VPipeline.normalize_first_frame matches the first 4 latent frames to the
        # statistics of the ones after them: with none after them (5, 9, 13 frames) it divides by the std of an
        # empty tensor and every frame of the video is NaN; with one latent frame (1 frame) it returns a tuple
        # instead of the latents and the decode fails on it
        raise GenerationError(f"--frame_num {frames}: an image-to-video Kandinsky 5 run needs at least "
                              f"{4 * I2V_REFERENCE_FRAMES + 1} frames (diffusers' first-frame normalisation "
                              f"needs latent frames after the first {I2V_REFERENCE_FRAMES}: 5 to 13 give a NaN video, "
                              "1 fails)")
    img = None
    if ckpt.task == "i2v":
        if image is None:
            raise GenerationError(f"{ckpt.root} is an image-to-video checkpoint: --image is required")
        from PIL import Image
        try:
            img = Image.open(image).convert("RGB")
        except (OSError, ValueError) as e:
            raise GenerationError(f"--image {image}: cannot read it as an image ({e})") from None
    elif image is not None:
        raise GenerationError(f"{ckpt.root} is a text-to-video checkpoint: drop --image")
    import random
    return KandinskyJob(ckpt, prompt, img, negative_prompt or NEGATIVE, frames, w, h, steps or s.steps,
                        s.guide_scale if guide_scale is None else guide_scale,
                        random.randrange(2**31) if seed is None or seed < 0 else seed)
