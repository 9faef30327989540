"""Video generation end to end: check the request, encode the prompts, condition, denoise, decode.

Two steps, so bad input fails before anything large is allocated:

    job = prepare(ckpt_dir, prompt, image=..., size="480*832", action_path=...)   # validates, reads headers only
    result = run(job, device="cuda", vram=24e9)                                   # loads and computes
    write_mp4(result.frames, "out.mp4")

`prepare` finds the checkpoint (variant detected from the weights, checked against `--task`), checks every
part is there (DiT shards, VAE, umt5 weights and tokenizer), reads the image and the camera files, fixes the
size, frame count and sampling settings (defaults per variant, spec section 4) and returns a `Job`.

`run` then goes: VAE load -> text encoding (umt5 loaded, used, freed) -> VAE encode of the first frame (I2V)
-> denoising through a `DiTRunner` (runtime/runner.py: DiT weights placed or streamed under the VRAM / RAM
budgets) -> VAE decode. The denoising loop:

  * experts: Wan2.2 / LingBot have a high-noise and a low-noise expert; step t uses "high" while
    t >= boundary * 1000 (`schedulers.expert_for`). Before every forward the runner is told which expert the
    forward after it uses (`runner.expect`), so it can prefetch the other expert's first blocks across the switch;
  * classifier-free guidance: v = v_uncond + g * (v_cond - v_uncond), g per expert. By default cond and
    uncond run as ONE forward of batch 2 (latents repeated, contexts stacked, camera batch 1), so each weight
    crosses the bus once per step; the runner's plan may ask for two forwards instead (less activation memory).
    Same math either way. A scale of exactly 1 skips the unconditional forward (v = v_cond);
  * the sampler (UniPC or Euler on the shifted flow schedule) advances the float32 latents.
"""
from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..models.attention import backend as attention_backend
from ..models.camera import pad_to_4n_plus_1
from ..models.loader import Checkpoint, CheckpointError, find_checkpoint, index_model_dir, validate
from ..models.text_encoder import T5_CHECKPOINT, T5_TOKENIZER, PromptCache, encode_prompts
from ..runtime.memory import fmt_bytes, peak_rss_bytes
from .conditioning import (
    CameraInput, GenerationError, action_string_frames, camera_from_dir, camera_from_string, i2v_size,
    image_condition, image_to_tensor, initial_noise, latent_frames, read_image, resize_image, round_frames,
)
from .schedulers import FlowEuler, FlowUniPC, expert_for
from .video import to_uint8_frames

__all__ = ["NEGATIVE_PROMPT", "TASKS", "SIZES", "Defaults", "DEFAULTS", "GenerationError", "Job", "Result",
           "prepare", "run", "sample", "guided_velocity", "Progress", "format_report"]

VAE_FILE = "Wan2.1_VAE.pth"

# Wan's default negative prompt (upstream wan/configs/shared_config.py, used by Wan2.1, Wan2.2, LingBot-World).
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                   "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                   "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

# Upstream task names -> our variants (the checkpoint's detected variant must be one of them).
TASKS: dict[str, tuple[str, ...]] = {
    "i2v-A14B": ("wan2.2-i2v-a14b", "lingbot-cam", "lingbot-act"),
    "t2v-14B": ("wan2.1-t2v-14b",),
    "t2v-1.3B": ("wan2.1-t2v-1.3b",),
    "i2v-14B": ("wan2.1-i2v-14b",),
}
UNSUPPORTED_TASKS = ("t2v-A14B", "ti2v-5B", "s2v-14B", "animate-14B", "flf2v-14B", "vace-14B", "vace-1.3B",
                     "t2i-14B")

# --size "W*H" (width*height, upstream's strings). T2V renders exactly W x H; I2V uses W*H as the pixel budget
# and takes the aspect ratio from the image.
SIZES = {"720*1280": (720, 1280), "1280*720": (1280, 720), "480*832": (480, 832), "832*480": (832, 480)}
SUPPORTED_SIZES = {
    "i2v-A14B": ("720*1280", "1280*720", "480*832", "832*480"),
    "t2v-14B": ("720*1280", "1280*720", "480*832", "832*480"),
    "t2v-1.3B": ("480*832", "832*480"),
    "i2v-14B": ("720*1280", "1280*720", "480*832", "832*480"),
}
DEFAULT_SIZE = "1280*720"
TINY_DEFAULT_SIZE = "112*64"      # toy models (`*-tiny`) accept any W*H in multiples of 16
TINY_MAX_SIDE = 1280


@dataclass(frozen=True)
class Defaults:
    """Sampling defaults of a variant (spec section 4; upstream configs)."""
    steps: int
    shift: float
    guide_scale: tuple[float, float]     # (low-noise expert or the single model, high-noise expert)
    boundary: float | None = None        # two experts: "high" while t >= boundary * 1000
    seed: int | None = None              # None: a random seed (printed)
    frame_num: int = 81


DEFAULTS: dict[str, Defaults] = {
    "lingbot-cam": Defaults(70, 10.0, (5.0, 5.0), boundary=0.947, seed=42),
    "lingbot-act": Defaults(70, 10.0, (5.0, 5.0), boundary=0.947, seed=42),
    "wan2.2-i2v-a14b": Defaults(40, 5.0, (3.5, 3.5), boundary=0.900),
    "wan2.1-i2v-14b": Defaults(40, 5.0, (5.0, 5.0)),
    "wan2.1-t2v-14b": Defaults(50, 5.0, (5.0, 5.0)),
    "wan2.1-t2v-1.3b": Defaults(50, 5.0, (5.0, 5.0)),
}


# ---------------------------------------------------------------------------------------------- the job

@dataclass
class Job:
    """A validated request with every setting resolved; `run(job)` computes it."""
    ckpt: Checkpoint
    variant: str                          # detected, without "-tiny"
    task: str
    prompt: str
    negative_prompt: str
    image: torch.Tensor | None            # [3, H0, W0] in [-1, 1] (original size), I2V only
    height: int
    width: int
    frames: int
    steps: int
    shift: float
    guide_scale: tuple[float, float]
    boundary: float | None
    seed: int
    solver: str
    camera: CameraInput | None = None
    notices: list[str] = field(default_factory=list)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return 16, latent_frames(self.frames), self.height // 8, self.width // 8

    @property
    def experts(self) -> list[str]:
        return list(self.ckpt.experts)

    @property
    def cfg(self) -> bool:
        return any(g != 1.0 for g in self.guide_scale)

    def describe(self) -> str:
        g = self.guide_scale
        guide = f"{g[0]}" if len(self.experts) == 1 or g[0] == g[1] else f"{g[0]} (low) / {g[1]} (high)"
        experts = f", experts {'+'.join(self.experts)} (boundary {self.boundary})" if self.boundary else ""
        return (f"{self.ckpt.config.name} ({self.task}){experts}: {self.frames} frames {self.width}x{self.height}, "
                f"{self.steps} {self.solver} steps, shift {self.shift}, guide {guide}, seed {self.seed}"
                + (f", camera from {self.camera.source}" if self.camera else ""))


def _parse_size(size: str, task: str, tiny: bool) -> tuple[int, int]:
    """'W*H' -> (width, height), checked against the task's sizes (toy models: any multiple of 16)."""
    text = str(size).strip().replace("x", "*").replace("X", "*")
    if not tiny:
        if text not in SUPPORTED_SIZES[task]:
            raise GenerationError(f"--size {size} is not supported for {task}; supported: "
                                  f"{', '.join(SUPPORTED_SIZES[task])} (width*height)")
        return SIZES[text]
    parts = text.split("*")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise GenerationError(f"--size {size}: expected width*height, e.g. 112*64")
    w, h = int(parts[0]), int(parts[1])
    if not (16 <= w <= TINY_MAX_SIDE and 16 <= h <= TINY_MAX_SIDE and w % 16 == 0 and h % 16 == 0):
        raise GenerationError(f"--size {size}: width and height must be multiples of 16 between 16 and "
                              f"{TINY_MAX_SIDE}")
    return w, h


def _resolve_task(ckpt: Checkpoint, task: str | None) -> tuple[str, str]:
    """(variant without -tiny, task). Rejects models this engine cannot run yet."""
    variant = ckpt.config.name.removesuffix("-tiny")
    if variant == "custom":
        raise GenerationError(f"{ckpt.root}: the DiT has non-standard shapes ({ckpt.config}); only the Wan2.1, "
                              "Wan2.2 I2V A14B and LingBot-World variants are supported")
    if variant == "lingbot-fast":
        raise GenerationError(f"{ckpt.root}: LingBot-World Fast (causal, chunked) is not supported by "
                              "`generate` yet; use the Base (Cam / Act) checkpoint")
    if variant == "wan2.1-i2v-14b":
        raise GenerationError(f"{ckpt.root}: Wan2.1 I2V 14B needs the CLIP image encoder "
                              "(models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth), which worldstream "
                              "does not support yet; Wan2.2 I2V A14B and LingBot-World are supported")
    detected = next(t for t, vs in TASKS.items() if variant in vs)
    if task is None:
        return variant, detected
    if task in UNSUPPORTED_TASKS:
        raise GenerationError(f"--task {task} is not supported yet; supported: {', '.join(TASKS)}")
    if task not in TASKS:
        raise GenerationError(f"--task {task} is unknown; supported: {', '.join(TASKS)}")
    if variant not in TASKS[task]:
        raise GenerationError(f"--task {task} does not match the checkpoint in {ckpt.root}: its weights are "
                              f"{ckpt.config.name} (task {detected})")
    return variant, task


def check_checkpoint(ckpt_dir: str | Path) -> Checkpoint:
    """Find the DiT (shards, index and shapes checked, nothing loaded) and check the companion files exist."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise GenerationError(f"--ckpt_dir {root}: no such folder")
    try:
        ckpt = find_checkpoint(root)
        for d in ckpt.experts.values():           # keys and shapes against the model, from headers only
            validate(ckpt.config, index_model_dir(d), d)
    except CheckpointError as e:
        raise GenerationError(f"checkpoint: {e}") from None
    missing = [f"{name} ({what})" for name, what, ok in [
        (VAE_FILE, "the VAE", (root / VAE_FILE).is_file()),
        (T5_CHECKPOINT, "the umt5 text encoder", (root / T5_CHECKPOINT).is_file()),
        (T5_TOKENIZER + "/", "the umt5 tokenizer folder", (root / T5_TOKENIZER).is_dir()),
    ] if not ok]
    if missing:
        raise GenerationError(f"checkpoint {root} is incomplete: missing {', '.join(missing)}")
    return ckpt


def prepare(ckpt_dir: str | Path, prompt: str, *, task: str | None = None, image=None, size: str | None = None,
            frame_num: int | None = None, action_path: str | Path | None = None, action_string: str | None = None,
            negative_prompt: str | None = None, steps: int | None = None, shift: float | None = None,
            guide_scale: float | tuple[float, float] | None = None, seed: int | None = None,
            solver: str = "unipc", notice: Callable[[str], None] | None = None) -> Job:
    """Validate a request and resolve every setting (reads headers and small files only).

    image: a path or a PIL image (I2V). size: upstream's "W*H". guide_scale: one value, or (low-noise,
    high-noise) as upstream's tuple. seed None or < 0: the variant's default (LingBot 42), else random.
    Raises GenerationError naming the culprit. `notice` receives adjustments (e.g. frame rounding).
    """
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        if notice:
            notice(msg)

    if not isinstance(prompt, str):
        raise GenerationError("--prompt is required")
    ckpt = check_checkpoint(ckpt_dir)
    variant, task = _resolve_task(ckpt, task)
    d = DEFAULTS[variant]
    tiny = ckpt.config.name.endswith("-tiny")
    i2v = task.startswith("i2v")

    # sampling settings
    steps = d.steps if steps is None else steps
    if int(steps) != steps or steps < 1:
        raise GenerationError(f"--sample_steps must be a positive integer, got {steps}")
    shift = d.shift if shift is None else float(shift)
    if not (math.isfinite(shift) and shift > 0):
        raise GenerationError(f"--sample_shift must be > 0, got {shift}")
    if guide_scale is None:
        guide = d.guide_scale
    elif isinstance(guide_scale, (tuple, list)):
        if len(guide_scale) != 2:
            raise GenerationError(f"--sample_guide_scale takes one value or two (low,high), got {guide_scale}")
        guide = (float(guide_scale[0]), float(guide_scale[1]))
    else:
        guide = (float(guide_scale), float(guide_scale))
    if not all(math.isfinite(g) for g in guide):
        raise GenerationError(f"--sample_guide_scale must be finite, got {guide_scale}")
    if solver not in ("unipc", "euler"):
        raise GenerationError(f"--sample_solver {solver!r}: choose unipc or euler")
    if seed is not None and seed >= 2**64:
        raise GenerationError(f"--base_seed must be below 2**64, got {seed}")
    if seed is None or seed < 0:
        seed = d.seed if d.seed is not None else random.randint(0, 2**63 - 1)
        if d.seed is None:
            note(f"random seed {seed} (pass --base_seed {seed} to repeat this video)")

    # inputs: image, camera
    if i2v and image is None:
        raise GenerationError(f"{task} ({ckpt.config.name}) is image-to-video: --image is required")
    if not i2v and image is not None:
        raise GenerationError(f"{task} ({ckpt.config.name}) is text-to-video: it takes no --image")
    has_camera = ckpt.config.has_camera
    act = ckpt.config.control_dim == 7
    if (action_path is not None or action_string is not None) and not has_camera:
        flag = "--action_path" if action_path is not None else "--action_string"
        raise GenerationError(f"{flag} given, but {ckpt.config.name} has no camera / action layers "
                              "(only LingBot-World models take them)")
    pil = image if image is None or hasattr(image, "convert") else read_image(image)

    # frames
    if frame_num is None:
        frames = pad_to_4n_plus_1(action_string_frames(action_string)) if action_string else d.frame_num
    else:
        frames = round_frames(frame_num)
        if frames != frame_num:
            note(f"--frame_num {frame_num} is not 4n+1; generating {frames} frames")

    camera = None
    if action_string is not None:
        camera = camera_from_string(action_string, frames, act, action_path)
    elif action_path is not None:
        camera = camera_from_dir(action_path, act)
        usable = camera.frames(frames)
        if usable < frames:
            note(f"{action_path}: {len(camera.poses)} poses drive {usable} frames; generating {usable} "
                 f"instead of {frames}")
            frames = usable
    elif has_camera:
        note(f"{ckpt.config.name}: no --action_path / --action_string; the camera layers get no input")

    # size
    size = size or (TINY_DEFAULT_SIZE if tiny else DEFAULT_SIZE)
    w, h = _parse_size(size, task, tiny)
    image_t = None
    if i2v:
        image_t = image_to_tensor(pil)
        h, w = i2v_size(image_t.shape[1], image_t.shape[2], w * h)

    return Job(ckpt=ckpt, variant=variant, task=task, prompt=prompt,
               negative_prompt=NEGATIVE_PROMPT if negative_prompt is None else negative_prompt,
               image=image_t, height=h, width=w, frames=frames, steps=int(steps), shift=shift, guide_scale=guide,
               boundary=d.boundary if len(ckpt.experts) == 2 else None, seed=int(seed), solver=solver,
               camera=camera, notices=notes)


# ---------------------------------------------------------------------------------------------- progress

class Progress:
    """A one-line progress bar on stderr: done/total, s/step and ETA (a new line per update off a terminal)."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self.first: float | None = None        # time of the first update: s/step excludes warm-up (loading)
        self.shown = 0.0                       # when the line was last written
        self.shown_len = 0                     # its length (a shorter line must blank the rest)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.first is None:
            self.first, rate = now, now - self.start
        else:
            rate = (now - self.first) / max(self.done - 1, 1)
        last = self.done >= self.total
        # at most 10 lines/s on a terminal, one per 5 s in a log (plus the first and the last)
        if not self.enabled or (self.done > 1 and not last and now - self.shown < (0.1 if self.tty else 5.0)):
            return
        self.shown = now
        eta = rate * (self.total - self.done)
        fill = int(self.width * self.done / max(self.total, 1))
        line = (f"{self.label} {self.done}/{self.total} [{'#' * fill}{'.' * (self.width - fill)}] "
                f"{rate:.2f} s/step, ETA {int(eta // 60):02d}:{int(eta % 60):02d}" + (f" {note}" if note else ""))
        if self.tty:
            self.stream.write("\r" + line.ljust(self.shown_len) + ("\n" if last else ""))
            self.shown_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------- denoising

def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, n - t.shape[0]))


def guided_velocity(runner, expert: str, x: torch.Tensor, t: torch.Tensor, scale: float, context: torch.Tensor,
                    context_null: torch.Tensor, y: torch.Tensor | None, camera: torch.Tensor | None,
                    batched: bool, before_forward: Callable[[], None] = lambda: None) -> torch.Tensor:
    """v_uncond + scale * (v_cond - v_uncond) at latents x [16, F, H, W] and timestep t (0-dim).

    batched: one forward of batch 2 (x repeated, contexts zero-padded to a common length and stacked, camera
    batch 1); else two batch-1 forwards. The DiT zero-pads every context to text_len itself, so padding here
    changes nothing. scale == 1: only the conditional forward. `before_forward` runs before each forward.
    """
    kw = {"camera": camera}
    if scale == 1.0:
        before_forward()
        return runner(expert, x=x[None], t=t.reshape(1), context=context[None],
                      y=None if y is None else y[None], **kw)[0]
    if batched:
        n = max(context.shape[0], context_null.shape[0])
        ctx = torch.stack([_pad_rows(context, n), _pad_rows(context_null, n)])
        before_forward()
        out = runner(expert, x=x[None].expand(2, *x.shape), t=t.reshape(1).expand(2), context=ctx,
                     y=None if y is None else y[None].expand(2, *y.shape), **kw)
        v_cond, v_uncond = out[0], out[1]
    else:
        yy = None if y is None else y[None]
        before_forward()
        v_cond = runner(expert, x=x[None], t=t.reshape(1), context=context[None], y=yy, **kw)[0]
        before_forward()
        v_uncond = runner(expert, x=x[None], t=t.reshape(1), context=context_null[None], y=yy, **kw)[0]
    return v_uncond + scale * (v_cond - v_uncond)


def sample(runner, noise: torch.Tensor, sampler, experts: list[str], boundary: float | None,
           guide_scale: tuple[float, float], context: torch.Tensor, context_null: torch.Tensor,
           y: torch.Tensor | None = None, camera: torch.Tensor | None = None, cfg_batched: bool = True,
           progress: Progress | None = None, log: list | None = None) -> torch.Tensor:
    """Run the whole schedule from `noise` [16, F, H, W] (float32, on the device) and return the latents.

    Step t uses expert_for(t, boundary) ("high" / "low") with guide_scale[1] / [0]; a single model uses
    experts[0] and guide_scale[0]. `log`, if given, receives (step, expert) per step.
    """
    def expert_of(t) -> str:
        return expert_for(t, boundary) if len(experts) == 2 else experts[0]

    def scale_of(expert: str) -> float:
        return guide_scale[1] if expert == "high" else guide_scale[0]

    # The forward schedule, so that before each forward the runner hears which expert the one after uses.
    schedule = []
    for t in sampler.timesteps:
        e = expert_of(t)
        schedule += [e] * (1 if scale_of(e) == 1.0 or cfg_batched else 2)
    cursor = [0]

    def before_forward() -> None:
        j = cursor[0]
        runner.expect(schedule[min(j + 1, len(schedule) - 1)])
        cursor[0] += 1

    x = noise
    for i, t in enumerate(sampler.timesteps):
        e = expert_of(t)
        v = guided_velocity(runner, e, x, t.to(x.device), scale_of(e), context, context_null, y, camera,
                            cfg_batched, before_forward)
        x = sampler.step(v.float(), x)
        if log is not None:
            log.append((i, e))
        if progress is not None:
            progress.update(note=f"({e})" if len(experts) == 2 else "")
    return x


# ---------------------------------------------------------------------------------------------- running

@dataclass
class Result:
    frames: torch.Tensor                  # uint8 [F, H, W, 3], CPU
    latents: torch.Tensor                 # float32 [16, lat_f, lat_h, lat_w], CPU
    timings: dict[str, float]             # seconds per phase, in order
    report: dict                          # peak memory, runner report, expert steps
    job: Job


def _vae_config(path: Path):
    """The VAE config of a `Wan2.1_VAE.pth` from its first conv's width (96 for the real file; toy VAEs less)."""
    from ..models.vae import VAEConfig

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        sd = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
    w = sd.get("encoder.conv1.weight") if isinstance(sd, dict) else None
    if not isinstance(w, torch.Tensor) or w.dim() != 5:
        raise ValueError(f"{path}: no 5-D 'encoder.conv1.weight'; is this the Wan2.1 VAE?")
    return VAEConfig(dim=int(w.shape[0]))


def load_checkpoint_vae(ckpt_dir: Path, device) -> object:
    """`Wan2.1_VAE.pth` of a checkpoint folder, float32 (upstream), on `device`."""
    from ..models.vae import load_vae

    path = Path(ckpt_dir) / VAE_FILE
    try:
        return load_vae(path, dtype=torch.float32, device=device, cfg=_vae_config(path))
    except (ValueError, RuntimeError, OSError) as e:
        raise GenerationError(f"{path}: cannot load the VAE ({e})") from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(job: Job, *, device=None, dtype: torch.dtype | None = None, t5_cpu: bool = False, vae_cpu: bool = False,
        vae_tile: int | None = None,
        vram: float | None = None, ram: float | None = None, prompt_cache: PromptCache | None = None,
        cfg_batched: bool | None = None, runner_factory: Callable | None = None, progress: bool = True,
        quant: str | None = None, attention: str | None = None) -> Result:
    """Compute a prepared job. dtype: DiT compute dtype (default bf16 on CUDA, float32 on the CPU).

    t5_cpu: run umt5 on the CPU (upstream --t5_cpu). vae_cpu: keep the VAE on the CPU. vae_tile: decode in
    spatial tiles of that many latent pixels (less VRAM, approximate at tile borders). vram / ram: byte
    budgets for the DiT placement (None: what the device has). cfg_batched: None = the runner's plan decides.
    runner_factory: `build_runner`-compatible callable (default runtime.runner.build_runner).
    progress: show the denoising progress bar on stderr. quant: "fp8" | "fp8-block" | "int8" compresses the
    DiT's block linears while loading (runtime/quant.py; a converted checkpoint is already compressed).
    attention: the DiT's self-attention backend for this run ("sdpa", "8bit": models/attention.py).

    Order, so that at most one big model is on the GPU at a time: VAE loaded (parked on the CPU on CUDA runs),
    umt5 loaded / used / freed, VAE encode, DiT denoising (the runner loads it at its first forward and is
    closed after the last), VAE decode.
    """
    from ..runtime.planner import Workload
    from ..runtime.runner import build_runner

    device = torch.device(device) if device is not None else default_device()
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    cfg = job.ckpt.config
    timings: dict[str, float] = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def phase(name: str, t0: float) -> None:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

    # The runner plans placement now (a budget that cannot work fails here) and loads on its first forward.
    workload = Workload(frames=job.frames, height=job.height, width=job.width, cfg=job.cfg,
                        experts=len(job.experts))
    extra = {"quant": quant} if quant is not None else {}
    runner = (runner_factory or build_runner)(job.ckpt, device, dtype, workload, vram=vram, ram=ram, **extra)
    try:
        t0 = time.perf_counter()
        vae_home = torch.device("cpu") if (vae_cpu or cuda) else device   # parked on the CPU between uses
        vae = load_checkpoint_vae(job.ckpt.root, vae_home)
        vae_device = torch.device("cpu") if vae_cpu else device
        phase("load", t0)

        t0 = time.perf_counter()
        t5_dtype = torch.bfloat16 if cuda else dtype     # umt5 runs in bf16 (its checkpoint dtype) on GPU runs
        t5_file = Path(job.ckpt.root) / T5_CHECKPOINT
        t5_placement = "cpu" if t5_cpu else "gpu"
        if cuda and vram is not None and not t5_cpu and t5_file.exists() and t5_file.stat().st_size > 0.85 * vram:
            t5_placement = "stream"   # the --vram budget holds for every phase, not only the DiT's
            print(f"note: the text encoder ({t5_file.stat().st_size / 1e9:.1f} GB) does not fit --vram "
                  f"{vram / 1e9:.0f}GB with headroom: streaming its blocks through the GPU", file=sys.stderr)
        try:
            context, context_null = encode_prompts(
                [job.prompt, job.negative_prompt], job.ckpt.root, cache=prompt_cache,
                placement=t5_placement, device=device, dtype=t5_dtype, text_len=cfg.text_len)
        except (ValueError, FileNotFoundError) as e:
            raise GenerationError(f"text encoder: {e}") from None
        phase("text encode", t0)

        y = None
        if job.image is not None:
            t0 = time.perf_counter()
            vae.to(vae_device)
            image = resize_image(job.image, job.height, job.width)
            y = image_condition(vae, image, job.frames).to(device)
            vae.to(vae_home)
            phase("VAE encode", t0)

        camera = None
        if job.camera is not None:
            # cast once to the DiT's dtype (upstream does too) rather than inside every forward
            camera = job.camera.condition(job.frames, job.height, job.width).to(device=device, dtype=dtype)
            if camera.shape[2] != job.latent_shape[1]:
                raise GenerationError(f"camera input has {camera.shape[2]} latent frames, the video "
                                      f"{job.latent_shape[1]}")

        t0 = time.perf_counter()
        noise = initial_noise(job.seed, *job.latent_shape[1:]).to(device)
        sampler = (FlowUniPC if job.solver == "unipc" else FlowEuler)(job.steps, job.shift)
        batched = cfg_batched if cfg_batched is not None else bool(getattr(runner, "cfg_batched", True))
        bar = Progress(job.steps, "denoise", enabled=progress)
        steps_log: list = []
        load_before = runner.report.get("load_s", 0.0)
        with torch.no_grad(), attention_backend(attention):
            latents = sample(runner, noise, sampler, job.experts, job.boundary, job.guide_scale, context,
                             context_null, y=y, camera=camera, cfg_batched=batched, progress=bar, log=steps_log)
        dit_load = runner.report.get("load_s", 0.0) - load_before
        phase("denoise", t0)
        timings["denoise"] -= dit_load
        timings["load"] += dit_load
        if not torch.isfinite(latents).all():
            raise RuntimeError("the denoised latents contain NaN/inf (numerical overflow in the DiT?)")
    finally:
        runner.close()
    runner_report = dict(runner.report)
    del runner

    t0 = time.perf_counter()
    vae.to(vae_device)
    if vae_tile:   # tile after tile, each through all frames, straight into host memory
        frames = to_uint8_frames(vae.decode(latents[None].to(vae_device), tile=(vae_tile, vae_tile),
                                            overlap=min(4, max(1, vae_tile // 4)), out_device="cpu")[0])
    else:          # frames leave the device as they are produced
        frames = torch.cat([to_uint8_frames(c[0]) for c in vae.decode_frames(latents[None].to(vae_device))], dim=0)
    phase("VAE decode", t0)

    report = {
        "peak_vram": torch.cuda.max_memory_allocated(device) if cuda else None,
        "peak_rss": peak_rss_bytes(),
        "runner": runner_report,
        "expert_steps": {e: sum(1 for _, x in steps_log if x == e) for e in job.experts},
        "cfg_batched": batched,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    return Result(frames=frames, latents=latents.cpu(), timings=timings, report=report, job=job)


def format_report(result: Result) -> str:
    """The end-of-run summary: seconds per phase, s/step, peak VRAM and host RAM."""
    t = result.timings
    parts = []
    for name, s in t.items():
        extra = f" ({s / result.job.steps:.2f} s/step)" if name == "denoise" else ""
        parts.append(f"{name} {s:.1f} s{extra}")
    lines = ["time: " + ", ".join(parts) + f"; total {sum(t.values()):.1f} s"]
    r = result.report
    mem = []
    if r.get("peak_vram") is not None:
        mem.append(f"peak VRAM {fmt_bytes(r['peak_vram'])}")
    mem.append(f"peak host RAM {fmt_bytes(r['peak_rss'])}")
    steps = ", ".join(f"{n} {e}" for e, n in r["expert_steps"].items())
    mem.append(f"steps per expert: {steps}; CFG {'batched' if r['cfg_batched'] else 'as two forwards'}")
    lines.append("memory: " + "; ".join(mem))
    return "\n".join(lines)
