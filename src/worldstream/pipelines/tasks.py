"""What a generation request is: the upstream tasks and sizes, and `prepare`, which checks a request and
resolves every setting into a `Job` before anything large is allocated.

    job = prepare(ckpt_dir, prompt, image=..., size="480*832", action_path=...)   # validates, reads headers only

`prepare` finds the checkpoint (variant detected from the weights, checked against `--task`), checks every
part is there (DiT shards, VAE, umt5 weights and tokenizer), reads the image and the camera files, and fixes
the size, frame count and sampling settings (defaults from the variant's config: models/configs.py).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints.clip import CLIP_CHECKPOINT, check_image_encoder
from ..checkpoints.dit import Checkpoint, find_checkpoint, index_model_dir, validate
from ..checkpoints.lora import LoraSpec, check_loras, parse_lora_arg
from ..checkpoints.t5 import T5_CHECKPOINT, T5_TOKENIZER, check_text_encoder
from ..checkpoints.tensors import CheckpointError
from ..checkpoints.vae import VAE_FILE, read_vae_file
from ..models.camera import pad_to_4n_plus_1
from ..models.configs import VARIANTS, StepDistill
from .conditioning import (
    CameraInput, GenerationError, action_string_frames, camera_from_dir, camera_from_string, i2v_size,
    image_to_tensor, read_image, round_frames,
)

# Wan's default negative prompt (upstream wan/configs/shared_config.py, used by Wan2.1, Wan2.2, LingBot-World).
NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                   "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                   "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")

# Upstream task names -> our variants (the checkpoint's detected variant must be one of them), from the configs.
TASKS: dict[str, tuple[str, ...]] = {}
for _name, _cfg in VARIANTS.items():
    if _cfg.task is not None:
        TASKS.setdefault(_cfg.task, ())
        TASKS[_cfg.task] += (_name,)
UNSUPPORTED_TASKS = ("t2v-A14B", "ti2v-5B", "s2v-14B", "animate-14B", "flf2v-14B", "vace-14B", "vace-1.3B",
                     "t2i-14B")

# --size "W*H" (width*height, upstream's strings). T2V renders exactly W x H; I2V uses W*H as the pixel budget
# and takes the aspect ratio from the image.
SIZES = {"720*1280": (720, 1280), "1280*720": (1280, 720), "480*832": (480, 832), "832*480": (832, 480)}
SIZES_480P = ("832*480", "480*832")     # where Wan2.1 I2V's default shift is 3.0 (upstream generate.py)
SUPPORTED_SIZES = {
    "i2v-A14B": ("720*1280", "1280*720", "480*832", "832*480"),
    "t2v-14B": ("720*1280", "1280*720", "480*832", "832*480"),
    "t2v-1.3B": ("480*832", "832*480"),
    "i2v-14B": ("720*1280", "1280*720", "480*832", "832*480"),
}
DEFAULT_SIZE = "1280*720"

# Limits on what a request may ask for (README "Limits"): far above any real use, low enough that nothing absurd
# reaches the allocator. Frames: conditioning.MAX_FRAMES (1025, = the longest keyboard string).
MAX_STEPS = 1000                  # --sample_steps (upstream uses 40-70)
GUIDE_RANGE = (0.0, 100.0)        # --sample_guide_scale (upstream 3.5-5); larger values make the sampling diverge
MAX_SHIFT = 100.0                 # --sample_shift (upstream 3-12)
TINY_DEFAULT_SIZE = "112*64"      # toy models (`*-tiny`) accept any W*H in multiples of 16
TINY_MAX_SIDE = 1280


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
    solver: str                           # "unipc" | "euler" | "distill" (LightX2V's 4-step students)
    camera: CameraInput | None = None
    notices: list[str] = field(default_factory=list)
    student: StepDistill | None = None    # the distilled sampler's settings when solver == "distill"
    loras: list[LoraSpec] = field(default_factory=list)   # merged into the DiT as it is loaded

    @property
    def needs_clip(self) -> bool:
        """Wan2.1 I2V conditions on CLIP features of the first frame."""
        return self.ckpt.config.has_image_branch

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        cfg = self.ckpt.config
        return (cfg.latents.channels, *cfg.latent_grid(self.frames, self.height, self.width))

    @property
    def experts(self) -> list[str]:
        return list(self.ckpt.experts)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on (some scale differs from 1: the unconditional forward is needed)."""
        return any(g != 1.0 for g in self.guide_scale)

    def describe(self) -> str:
        g = self.guide_scale
        guide = f"{g[0]}" if len(self.experts) == 1 or g[0] == g[1] else f"{g[0]} (low) / {g[1]} (high)"
        experts = f", experts {'+'.join(self.experts)} (boundary {self.boundary})" if self.boundary else ""
        if self.solver == "distill" and self.student is not None and len(self.experts) == 2:
            experts = (f", experts {'+'.join(self.experts)} ({self.student.boundary_step} high-noise steps)"
                       if self.student.boundary_step is not None else experts)
        solver = (f"distilled Euler steps at t = {'/'.join(map(str, self.student.timesteps))}"
                  if self.solver == "distill" and self.student is not None else f"{self.solver} steps")
        return (f"{self.ckpt.config.name} ({self.task}){experts}: {self.frames} frames {self.width}x{self.height}, "
                f"{self.steps} {solver}, shift {self.shift}, guide {guide}, seed {self.seed}"
                + (f", camera from {self.camera.source}" if self.camera else "")
                + "".join(f", LoRA {spec.path.name} x{spec.scale:g}" for spec in self.loras))


def _parse_size(size: str, task: str, tiny: bool, multiple: int = 16) -> tuple[int, int]:
    """'W*H' -> (width, height), checked against the task's sizes (toy models: any multiple of `multiple`)."""
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
    m = multiple
    if not (m <= w <= TINY_MAX_SIDE and m <= h <= TINY_MAX_SIDE and w % m == 0 and h % m == 0):
        raise GenerationError(f"--size {size}: width and height must be multiples of {m} between {m} and "
                              f"{TINY_MAX_SIDE}")
    return w, h


def _resolve_task(ckpt: Checkpoint, task: str | None) -> tuple[str, str]:
    """(variant without -tiny, task). Rejects models this engine cannot run yet."""
    variant = ckpt.config.base_name
    if variant == "custom":
        raise GenerationError(f"{ckpt.root}: the DiT has non-standard shapes ({ckpt.config}); only the Wan2.1, "
                              "Wan2.2 I2V A14B and LingBot-World variants are supported")
    if variant == "lingbot-fast":
        raise GenerationError(f"{ckpt.root}: LingBot-World Fast (causal, chunked) is not supported by "
                              "`generate` yet; use the Base (Cam / Act) checkpoint")
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


def check_checkpoint(ckpt_dir: str | Path, dit: list | None = None) -> Checkpoint:
    """Find the DiT (shards, index and shapes checked, nothing loaded) and check the companion files exist.
    `dit`: DiT files / folders used instead of the checkpoint's own (`--dit`)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise GenerationError(f"--ckpt_dir {root}: no such folder")
    try:
        ckpt = find_checkpoint(root, dit=dit)
        for d in ckpt.experts.values():           # keys and shapes against the model, from headers only
            validate(ckpt.config, index_model_dir(d), d)
    except CheckpointError as e:
        raise GenerationError(f"checkpoint: {e}") from None
    missing = [f"{name} ({what})" for name, what, ok in [
        (VAE_FILE, "the VAE", (root / VAE_FILE).is_file()),
        (T5_CHECKPOINT, "the umt5 text encoder", (root / T5_CHECKPOINT).is_file()),
        (T5_TOKENIZER + "/", "the umt5 tokenizer folder", (root / T5_TOKENIZER).is_dir()),
        (CLIP_CHECKPOINT, "the CLIP image encoder of Wan2.1 I2V",
         not ckpt.config.has_image_branch or (root / CLIP_CHECKPOINT).is_file()),
    ] if not ok]
    if missing:
        raise GenerationError(f"checkpoint {root} is incomplete: missing {', '.join(missing)}")
    return ckpt


def check_companions(ckpt: Checkpoint) -> None:
    """The VAE and umt5 files with the same care as the DiT: read memory-mapped, keys and shapes checked
    against their models, nothing loaded."""
    try:
        read_vae_file(ckpt.root / VAE_FILE)
        check_text_encoder(ckpt.root)
        if ckpt.config.has_image_branch:
            check_image_encoder(ckpt.root)
    except CheckpointError as e:
        raise GenerationError(f"checkpoint: {e}") from None


def prepare(ckpt_dir: str | Path, prompt: str, *, task: str | None = None, image=None, size: str | None = None,
            frame_num: int | None = None, action_path: str | Path | None = None, action_string: str | None = None,
            negative_prompt: str | None = None, steps: int | None = None, shift: float | None = None,
            guide_scale: float | tuple[float, float] | None = None, seed: int | None = None,
            solver: str | None = None, notice: Callable[[str], None] | None = None, dit: list | None = None,
            loras: list | None = None) -> Job:
    """Validate a request and resolve every setting (reads headers and small files only).

    image: a path or a PIL image (I2V). size: upstream's "W*H". guide_scale: one value, or (low-noise,
    high-noise) as upstream's tuple. seed None or < 0: the variant's default (LingBot 42), else random.
    solver: "unipc" | "euler" | "distill"; None: "distill" for a step-distilled student (a LightX2V distill
    checkpoint, or a step-distill LoRA), else "unipc". dit: DiT files / folders replacing the checkpoint's
    (`--dit`). loras: `FILE[:SCALE]` strings or LoraSpecs, merged into the DiT while it loads (`--lora`).
    Raises GenerationError naming the culprit. `notice` receives adjustments (e.g. frame rounding).
    """
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        if notice:
            notice(msg)

    if not isinstance(prompt, str):
        raise GenerationError("--prompt is required")
    ckpt = check_checkpoint(ckpt_dir, dit)
    variant, task = _resolve_task(ckpt, task)
    d = ckpt.config.sampling
    tiny = ckpt.config.any_size
    i2v = task.startswith("i2v")

    # LoRAs (headers only: names, shapes and ranks checked against the model), and whether this is a student
    try:
        specs = [spec if isinstance(spec, LoraSpec) else parse_lora_arg(spec) for spec in (loras or [])]
        lora_student = check_loras(specs, ckpt)
    except (CheckpointError, ValueError) as e:
        raise GenerationError(f"--lora {e}") from None
    student = ckpt.student or lora_student
    if solver is None:
        solver = "distill" if student is not None else "unipc"
    if solver not in ("unipc", "euler", "distill"):
        raise GenerationError(f"--sample_solver {solver!r}: choose unipc, euler or distill")
    if solver == "distill":
        student = student or ckpt.config.student
        if student is None:
            raise GenerationError(f"--sample_solver distill: no step-distilled sampler is known for "
                                  f"{ckpt.config.name}")
        if steps is not None and steps != student.steps:
            raise GenerationError(f"--sample_steps {steps}: a step-distilled student runs its "
                                  f"{student.steps} steps (t = {', '.join(map(str, student.timesteps))})")
        if ckpt.student is not None or lora_student is not None:
            src = ckpt.student_source or next(s.path.name for s in specs if s.student)
            note(f"{src} is a step-distilled student: {student.steps} steps at shift {student.shift:g}, no CFG "
                 "(--sample_solver unipc runs the base sampler instead)")
    else:
        student = None

    # sampling settings
    steps = (student.steps if student else d.steps) if steps is None else steps
    if int(steps) != steps or not 1 <= steps <= MAX_STEPS:
        raise GenerationError(f"--sample_steps must be an integer from 1 to {MAX_STEPS}, got {steps}")
    size_text = None if size is None else str(size).strip().replace("x", "*").replace("X", "*")
    default_shift = student.shift if student else (
        d.shift_480p if d.shift_480p is not None and size_text in SIZES_480P else d.shift)
    shift = default_shift if shift is None else float(shift)
    if not (math.isfinite(shift) and 0 < shift <= MAX_SHIFT):
        raise GenerationError(f"--sample_shift must be > 0 and at most {MAX_SHIFT:g}, got {shift}")
    if guide_scale is None:
        guide = (1.0, 1.0) if student else d.guide_scale
    elif isinstance(guide_scale, (tuple, list)):
        if len(guide_scale) != 2:
            raise GenerationError(f"--sample_guide_scale takes one value or two (low,high), got {guide_scale}")
        guide = (float(guide_scale[0]), float(guide_scale[1]))
    else:
        guide = (float(guide_scale), float(guide_scale))
    lo, hi = GUIDE_RANGE
    if not all(math.isfinite(g) and lo <= g <= hi for g in guide):
        raise GenerationError(f"--sample_guide_scale must be between {lo:g} and {hi:g}, got {guide_scale} "
                              "(larger scales make the sampling diverge)")
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
    pil = image if image is None or hasattr(image, "convert") else read_image(image, note)

    # frames
    if frame_num is None:
        frames = pad_to_4n_plus_1(action_string_frames(action_string)) if action_string else d.frame_num
    else:
        frames = round_frames(frame_num, ckpt.config.latents)
        if frames != frame_num:
            note(f"--frame_num {frame_num} is not 4n+1; generating {frames} frames")

    camera = None
    if action_string is not None:
        camera = camera_from_string(action_string, frames, act, action_path)
    elif action_path is not None:
        camera = camera_from_dir(action_path, act)
        usable = camera.frames(frames)
        if usable < frames and frame_num is not None:
            raise GenerationError(f"--frame_num {frame_num}: {action_path}/poses.npy holds {len(camera.poses)} "
                                  f"pose(s), which drive {usable} frame(s); give at least {frames} poses, or "
                                  f"--frame_num {usable} or less")
        if usable < frames:
            note(f"{action_path}: {len(camera.poses)} poses drive {usable} frames; generating {usable} "
                 f"instead of the default {frames}")
            frames = usable
    elif has_camera:
        note(f"{ckpt.config.name}: no --action_path / --action_string; the camera layers get no input")

    # size
    trained = ckpt.config.trained_size
    size = size or (f"{trained[0]}*{trained[1]}" if trained else TINY_DEFAULT_SIZE if tiny else DEFAULT_SIZE)
    w, h = _parse_size(size, task, tiny, ckpt.config.pixel_multiple)
    image_t = None
    if i2v:
        image_t = image_to_tensor(pil)
        h, w = i2v_size(image_t.shape[1], image_t.shape[2], w * h, ckpt.config)

    check_companions(ckpt)     # last: the request's own inputs are refused first, cheaply
    return Job(ckpt=ckpt, variant=variant, task=task, prompt=prompt,
               negative_prompt=NEGATIVE_PROMPT if negative_prompt is None else negative_prompt,
               image=image_t, height=h, width=w, frames=frames, steps=int(steps), shift=shift, guide_scale=guide,
               boundary=d.boundary if len(ckpt.experts) == 2 else None, seed=int(seed), solver=solver,
               camera=camera, notices=notes, student=student, loras=specs)
