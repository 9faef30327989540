"""Video generation end to end: the phases of a run, in the order that keeps one big model on the GPU at a time.

    job = prepare(ckpt_dir, prompt, image=..., size="480*832", action_path=...)   # pipelines/tasks.py
    result = run(job, device="cuda", vram=24e9)                                   # loads and computes
    write_mp4(result.frames, "out.mp4")

`run` goes: plan the DiT's placement (runtime/runner.py `build_runner`: a budget that cannot work fails here)
-> VAE load -> text encoding (pipelines/prompts.py: umt5 loaded, used, freed) -> VAE encode of the first frame
(I2V) -> the denoising loop (pipelines/sampling.py; the runner loads the DiT at its first forward and frees it
after its last) -> VAE decode. It returns the frames, the latents, seconds per phase and peak memory. A failure
after the denoising loop raises `AfterDenoising` carrying the latents, which `save_latents` keeps on disk and
`worldstream decode` (`decode_video`) turns into the video later.

With sequence parallelism (`parallel`, runtime/parallel.py; `torchrun ... generate --ulysses N`) every process
runs `run`: rank 0 alone loads the VAE, encodes the prompts and the first frame and sends the results to the
others (the text encoder and the VAE exist once, not per GPU); all of them denoise together; rank 0 alone
decodes. A failure in rank 0's part is raised in every process.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints.t5 import T5_CHECKPOINT
from ..checkpoints.tensors import CheckpointError, read_safetensors_header, read_safetensors_metadata, read_tensor
from ..checkpoints.vae import VAE_FILE, load_vae
from ..files import atomic_write
from ..models.configs import WAN_LATENTS
from ..models.vae import WanVAE
from ..runtime.memory import fmt_bytes, peak_rss_bytes
from ..runtime.planner import Workload
from ..runtime.runner import build_runner
from .conditioning import MAX_FRAMES, GenerationError, image_condition, initial_noise, resize_image
from .images import encode_image
from .progress import Progress
from .prompts import PromptCache, encode_prompts
from .sampling import sample
from .schedulers import FlowDistill, FlowEuler, FlowUniPC
from .step_cache import StepCache
from .tasks import Job
from .video import to_uint8_frames


@dataclass
class Result:
    frames: torch.Tensor | None           # uint8 [F, H, W, 3], CPU (None in processes other than rank 0)
    latents: torch.Tensor                 # float32 [16, lat_f, lat_h, lat_w], CPU
    timings: dict[str, float]             # seconds per phase, in order
    report: dict                          # peak memory, runner report, expert steps
    job: Job


def load_checkpoint_vae(ckpt_dir: Path, device) -> WanVAE:
    """`Wan2.1_VAE.pth` of a checkpoint folder, float32 (upstream), on `device` (config read off the file)."""
    path = Path(ckpt_dir) / VAE_FILE
    try:
        return load_vae(path, dtype=torch.float32, device=device)
    except (ValueError, RuntimeError, OSError) as e:
        raise GenerationError(f"{path}: cannot load the VAE ({e})") from None


class AfterDenoising(Exception):
    """The run failed after its denoising loop had finished: `latents` (CPU float32) survive, so the video can
    still be decoded from them (`save_latents`, `worldstream decode`)."""

    def __init__(self, latents: torch.Tensor, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.latents, self.cause = latents, cause


def decode_video(vae: WanVAE, latents: torch.Tensor, device, tile: int | None = None) -> torch.Tensor:
    """Latents [16, lat_f, lat_h, lat_w] -> uint8 frames [F, H, W, 3] on the CPU, the VAE run on `device`
    (moved there for the decode). `tile`: spatial tiles of that many latent pixels (less memory)."""
    device = torch.device(device)
    vae.to(device)
    if tile:   # tile after tile, each through all frames, straight into host memory
        return to_uint8_frames(vae.decode(latents[None].to(device), tile=(tile, tile),
                                          overlap=min(4, max(1, tile // 4)), out_device="cpu")[0])
    # frames leave the device as they are produced
    return torch.cat([to_uint8_frames(c[0]) for c in vae.decode_frames(latents[None].to(device))], dim=0)


# ---- latents on disk: what a run that failed after denoising leaves to finish it -----------------------------

LATENTS_FORMAT = "worldstream-latents-v1"


def latents_path(video: Path) -> Path:
    """Where the latents of the video `video` are kept: next to it, `NAME.latents.safetensors`."""
    return video.with_name(video.stem + ".latents.safetensors")


def save_latents(path: str | Path, latents: torch.Tensor, ckpt_dir: str | Path, video: str | Path) -> Path:
    """Write denoised latents [16, lat_f, lat_h, lat_w] atomically with what `worldstream decode` needs to
    finish the video: the checkpoint folder (its VAE) and the video path."""
    from safetensors.torch import save_file

    meta = {"format": LATENTS_FORMAT, "ckpt_dir": str(Path(ckpt_dir).resolve()), "save_file": str(video)}
    tensor = latents.detach().to("cpu", torch.float32).contiguous()
    return atomic_write(path, lambda tmp: save_file({"latents": tensor}, tmp, metadata=meta))


def load_latents(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """(latents, metadata) of a file written by `save_latents`, read by the checked safetensors reader (shape
    within the frame and size limits, finite values); GenerationError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"--latents {path}: no such file")
    try:
        meta = read_safetensors_metadata(path)
        locations = read_safetensors_header(path)
        if meta.get("format") != LATENTS_FORMAT or set(locations) != {"latents"}:
            raise CheckpointError(f"{path}: not a latents file written by worldstream ({LATENTS_FORMAT})")
        loc = locations["latents"]
        c, f, h, w = loc.shape if len(loc.shape) == 4 else (0, 0, 0, 0)
        if (loc.dtype != torch.float32 or c != WAN_LATENTS.channels or not 1 <= f <= MAX_LATENT_FRAMES
                or not 1 <= h <= MAX_LATENT_SIDE or not 1 <= w <= MAX_LATENT_SIDE):
            raise CheckpointError(f"{path}: latents of shape {list(loc.shape)} {loc.dtype}; expected float32 "
                                  f"[{WAN_LATENTS.channels}, <= {MAX_LATENT_FRAMES}, <= {MAX_LATENT_SIDE}, "
                                  f"<= {MAX_LATENT_SIDE}]")
        return read_tensor(loc), meta
    except CheckpointError as e:
        raise GenerationError(f"--latents {e}") from None


MAX_LATENT_FRAMES = WAN_LATENTS.latent_frames(MAX_FRAMES)
MAX_LATENT_SIDE = 1024    # latent pixels (8192 video pixels)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_sampler(job: Job):
    """The job's sampler: UniPC, Euler, or the students' distilled Euler."""
    if job.solver == "distill":
        st = job.student
        return FlowDistill(st.timesteps, job.shift, st.boundary_step if len(job.experts) == 2 else None)
    return (FlowUniPC if job.solver == "unipc" else FlowEuler)(job.steps, job.shift)


def run(job: Job, *, device=None, dtype: torch.dtype | None = None, t5_cpu: bool = False, vae_cpu: bool = False,
        vae_tile: int | None = None, clip_cpu: bool = False,
        vram: float | None = None, ram: float | None = None, prompt_cache: PromptCache | None = None,
        batched_guidance: bool | None = None, runner_factory: Callable | None = None, progress: bool = True,
        quant: str | None = None, attention: str = "sdpa", fuse: bool = True, parallel=None,
        step_cache: "float | StepCache | None" = None) -> Result:
    """Compute a prepared job. dtype: DiT compute dtype (default bf16 on CUDA, float32 on the CPU).

    t5_cpu: run umt5 on the CPU (upstream --t5_cpu). clip_cpu: run Wan2.1 I2V's CLIP image encoder on the CPU
    (else on the device, then freed). vae_cpu: keep the VAE on the CPU. vae_tile: encode and
    decode in spatial tiles of that many latent pixels (less VRAM, approximate at tile borders). vram / ram: byte
    budgets for the DiT placement (None: what the device has). batched_guidance: CFG's cond and uncond as one
    batch-2 forward (None: the runner's plan decides). runner_factory: `build_runner`-compatible callable
    (default runtime.runner.build_runner). progress: show the denoising progress bar on stderr. quant: "fp8" |
    "fp8-block" | "int8" compresses the DiT's block linears while loading (a converted checkpoint is already
    compressed). attention: the DiT's self-attention kernel for this run ("sdpa", "8bit": models/attention.py;
    on a GPU "8bit" runs where the plan finds it faster). fuse: compiled float32 elementwise kernels on CUDA
    (same math as eager). parallel: this process's runtime.parallel.SequenceParallel (see the module
    docstring); `device` is then its GPU. step_cache: a threshold: skip the DiT's blocks at steps where the
    step cache (pipelines/step_cache.py) predicts little change, reusing the last residual (None: off; 0:
    never skips), or a StepCache with other settings.

    Order, so that at most one big model is on the GPU at a time: VAE loaded (parked on the CPU on CUDA runs),
    umt5 loaded / used / freed, CLIP (Wan2.1 I2V) loaded / used / freed, VAE encode, DiT denoising (the runner loads it at its first forward and is
    closed after the last), VAE decode.
    """
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
    cache = (step_cache if isinstance(step_cache, StepCache) or step_cache is None else StepCache(step_cache))
    workload = Workload(frames=job.frames, height=job.height, width=job.width, guidance=job.guided,
                        experts=len(job.experts), step_cache=cache is not None and cache.threshold > 0)
    extra = {"loras": job.loras} if job.loras else {}
    if parallel is not None:
        extra["parallel"] = parallel
    runner = (runner_factory or build_runner)(job.ckpt, device, dtype, workload, vram=vram, ram=ram, quant=quant,
                                              attention=attention, fuse=fuse, **extra)
    first = parallel is None or parallel.first
    once = (lambda fn: fn()) if parallel is None else parallel.from_first   # rank 0 computes, all receive
    vae = None
    try:
        t0 = time.perf_counter()
        vae_home = torch.device("cpu") if (vae_cpu or cuda) else device   # parked on the CPU between uses
        vae_device = torch.device("cpu") if vae_cpu else device

        def load_vae_once() -> None:
            nonlocal vae
            vae = load_checkpoint_vae(job.ckpt.root, vae_home)
        once(load_vae_once)
        phase("load", t0)

        t0 = time.perf_counter()
        t5_dtype = torch.bfloat16 if cuda else dtype     # umt5 runs in bf16 (its checkpoint dtype) on GPU runs
        t5_file = Path(job.ckpt.root) / T5_CHECKPOINT
        t5_placement = "cpu" if t5_cpu else "gpu"
        if cuda and vram is not None and not t5_cpu and t5_file.exists() and t5_file.stat().st_size > 0.85 * vram:
            t5_placement = "stream"   # the --vram budget holds for every phase, not only the DiT's
            if first:
                print(f"note: the text encoder ({t5_file.stat().st_size / 1e9:.1f} GB) does not fit --vram "
                      f"{vram / 1e9:.0f}GB with headroom: streaming its blocks through the GPU", file=sys.stderr)

        def encode():
            try:
                return encode_prompts([job.prompt, job.negative_prompt], job.ckpt.root, cache=prompt_cache,
                                      placement=t5_placement, device=device, dtype=t5_dtype, text_len=cfg.text_len)
            except (ValueError, FileNotFoundError) as e:
                raise GenerationError(f"text encoder: {e}") from None
        context, context_null = (c.to(device) for c in once(encode))
        phase("text encode", t0)

        clip = None
        if job.needs_clip:
            t0 = time.perf_counter()

            def clip_features():
                try:
                    return encode_image(job.image, job.ckpt.root, "cpu" if clip_cpu else "gpu", device)
                except CheckpointError as e:
                    raise GenerationError(f"image encoder: {e}") from None
            clip = once(clip_features).to(device)
            phase("CLIP encode", t0)

        y = None
        if job.image is not None:
            t0 = time.perf_counter()

            def first_frame_latents():
                vae.to(vae_device)
                image = resize_image(job.image, job.height, job.width)
                out = image_condition(vae, image, job.frames, vae_tile)
                vae.to(vae_home)
                return out
            y = once(first_frame_latents).to(device)
            phase("VAE encode", t0)

        camera = None
        if job.camera is not None:
            # cast once to the DiT's dtype (upstream does too) rather than inside every forward
            camera = job.camera.condition(job.frames, job.height, job.width).to(device=device, dtype=dtype)
            if camera.shape[2] != job.latent_shape[1]:
                raise GenerationError(f"camera input has {camera.shape[2]} latent frames, the video "
                                      f"{job.latent_shape[1]}")

        t0 = time.perf_counter()
        noise = initial_noise(job.seed, job.latent_shape).to(device)
        sampler = make_sampler(job)
        batched = (batched_guidance if batched_guidance is not None
                   else bool(getattr(runner, "batched_guidance", True)))
        bar = Progress(job.steps, "denoise", enabled=progress and first)
        steps_log: list = []
        load_before = runner.report.get("load_s", 0.0)
        with torch.no_grad():
            latents = sample(runner, noise, sampler, job.experts, job.boundary, job.guide_scale, context,
                             context_null, y=y, camera=camera, batched_guidance=batched, progress=bar,
                             log=steps_log, clip=clip, step_cache=cache)
        cache_report = None
        if cache is not None:                                          # (its residuals go before the decode)
            cache_report = {**cache.finish(), "signals": cache.signals, "forced": sorted(cache.forced)}
        dit_load = runner.report.get("load_s", 0.0) - load_before
        phase("denoise", t0)
        timings["denoise"] -= dit_load
        timings["load"] += dit_load
    finally:
        runner.close()
    runner_report = dict(runner.report)
    del runner
    ranks = parallel.gather(_rank_report(runner_report, device)) if parallel is not None else None
    if not first:      # rank 0 decodes and writes
        return Result(frames=None, latents=latents.cpu(), timings=timings, report={"runner": runner_report},
                      job=job)

    t0 = time.perf_counter()
    try:
        frames = decode_video(vae, latents, vae_device, vae_tile)
    except Exception as e:   # the denoised latents survive a failed decode (the CLI keeps them on disk)
        raise AfterDenoising(latents.cpu(), e) from e
    phase("VAE decode", t0)

    report = {
        "peak_vram": torch.cuda.max_memory_allocated(device) if cuda else None,
        "peak_rss": peak_rss_bytes(),
        "runner": runner_report,
        "expert_steps": {e: sum(1 for _, x in steps_log if x == e) for e in job.experts},
        "batched_guidance": batched,
        "step_cache": cache_report,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if ranks is not None:
        report["ranks"] = ranks
    return Result(frames=frames, latents=latents.cpu(), timings=timings, report=report, job=job)


def _rank_report(runner_report: dict, device) -> dict:
    """What one process of a parallel run tells rank 0 for the report."""
    return {"peak_vram": runner_report.get("peak_vram"), "peak_rss": runner_report.get("peak_rss", peak_rss_bytes()),
            "pss": runner_report.get("pss"), "shared_slabs": runner_report.get("shared_slabs", 0),
            "device": str(device)}


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
    cfg_text = ("no CFG" if not result.job.guided else
                f"CFG {'batched' if r['batched_guidance'] else 'as two forwards'}")
    mem.append(f"steps per expert: {steps}; {cfg_text}")
    lines.append("memory: " + "; ".join(mem))
    if r.get("ranks"):
        lines.append(format_ranks(r["ranks"]))
    sc = r.get("step_cache")
    if sc is not None:
        lines.append(f"step cache (threshold {sc['threshold']:g}): skipped {sc['skipped']} of "
                     f"{sc['skipped'] + sc['computed']} steps"
                     + (f" ({', '.join(str(i + 1) for i in sc['skipped_steps'])})" if sc["skipped_steps"] else ""))
    return "\n".join(lines)


def format_ranks(ranks: list[dict]) -> str:
    """One line on the processes of a parallel run: their GPUs' peaks, host RAM counted once for shared pages."""
    vram = [x["peak_vram"] for x in ranks if x.get("peak_vram") is not None]
    pss = [x["pss"] for x in ranks if x.get("pss") is not None]
    parts = [f"{len(ranks)} processes (Ulysses)"]
    if vram:
        parts.append(f"peak VRAM per GPU {fmt_bytes(min(vram))} - {fmt_bytes(max(vram))}")
    if pss:
        parts.append(f"host RAM of all processes while denoising {fmt_bytes(sum(pss))} (proportional set size: "
                     f"shared pages counted once)")
    shared = max((x.get("shared_slabs") or 0) for x in ranks)
    if shared:
        parts.append(f"streamed weights held once in shared memory: {fmt_bytes(shared)}")
    return "parallel: " + "; ".join(parts)
