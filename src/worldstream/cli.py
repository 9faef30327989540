"""`worldstream` command line: one sub-command per job.

Errors: anything the commands anticipate (bad input, a damaged file, a full disk) ends with one
`worldstream: error: ...` line naming the culprit and exit code 2; anything else with one line and exit code 1;
`--debug` shows the traceback. Ctrl-C, SIGTERM and SIGHUP interrupt a command the same way (its partial outputs
are removed) with exit code 128 + the signal number.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path


class CommandError(Exception):
    """A failure the command anticipated; the message names the culprit (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one `worldstream: error:` line like every other error."""

    def error(self, message: str):
        print(f"worldstream: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


MAX_VAE_TILE = 1024   # --vae_tile, latent pixels
CUDA_GRAPHS_HELP = ("replay each chunk forward of resident weights as a CUDA graph (one launch instead of "
                    "~1,000: for launch-bound small models such as the 1.3B; same numbers; streamed blocks and the "
                    "CPU run as usual)")
DECODER_HELP = ("frames from the latents: vae (default: the VAE chosen by --vae; exact with wan) or tiny (the model "
                "folder's own decoder.safetensors, made by `worldstream train decoder`: several times faster on "
                "a CPU, less exact)")
MAX_BUDGET = 1e15     # --vram / --ram, bytes


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def cmd_info(args: argparse.Namespace) -> int:
    from .models.configs import all_variants
    from .runtime.quant import converted_model_bytes

    print(f"{'variant':20} {'params':>16} {'blocks':>6} {'block params':>13} {'bf16':>9} {'fp8':>9}  experts")
    for name, cfg in all_variants().items():
        nb, outside = cfg.param_counts()
        n = nb * cfg.num_layers + outside
        bf16 = converted_model_bytes(cfg, None)
        fp8 = converted_model_bytes(cfg, "fp8")   # as `convert --quant fp8` writes it (first/last blocks whole)
        print(f"{name:20} {n:>16,} {cfg.num_layers:>6} {nb:>13,} {_gb(bf16):>9} {_gb(fp8):>9}  {cfg.experts}")
    print("bf16 / fp8: bytes of one expert's weights; fp8 as `worldstream convert --quant fp8` stores them (8-bit "
          "block linears with float32 scales; norms, embeddings, camera layers and the first and last blocks "
          "stay bf16; Kandinsky 5's modulation layers stay float32 in both)")
    return 0


# ---- generate / demo / decode ------------------------------------------------------------------------------

def _rank() -> int:
    """This process's rank when torchrun started several (0 otherwise): only rank 0 speaks."""
    return int(os.environ.get("RANK", "0"))


def _fail(msg: object, code: int = 2) -> int:
    """One `worldstream: error: ...` line on stderr and the exit code; no traceback. Of several processes
    (torchrun), every one fails with the same error and only rank 0 prints it."""
    if _rank() == 0:
        print(f"worldstream: error: {msg}", file=sys.stderr)
    return code


def _parallel(args: argparse.Namespace):
    """The Ulysses group this process joins for `--ulysses N` (None for one process). Checked first, the same
    way in every process: the launch (torchrun with N processes on one machine) and the device (cuda:LOCAL_RANK
    for each process, or the CPU with gloo)."""
    from .pipelines.conditioning import GenerationError
    from .runtime.parallel import SequenceParallel, check_launch

    n = check_launch(args.ulysses)
    if n == 1:
        return None
    device = _device(args.device)
    if device.type == "cuda" and device.index is not None:
        raise GenerationError(f"--device {args.device}: with --ulysses each process takes the GPU of its local "
                              "rank (cuda:LOCAL_RANK); pass --device cuda (or leave it out)")
    return SequenceParallel.launch(n, device.type)


def _quiet_unless_first(parallel):
    """Processes other than rank 0 print nothing on stdout (rank 0 reports for all)."""
    import contextlib
    import os

    if parallel is None or parallel.first:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(open(os.devnull, "w"))


def _run_parallel_command(args: argparse.Namespace, body) -> int:
    """`body(args, parallel)` with the parallel group (`--ulysses N`) set up first and left together at the end.
    Errors the command anticipates are raised in every process together (their checks run everywhere), so the
    group is left on them too; an unexpected error in one process ends it, and torchrun stops the others."""
    parallel = _parallel(args)
    try:
        with _quiet_unless_first(parallel):
            code = body(args, parallel)
    except _expected():
        if parallel is not None:
            parallel.close()
        raise
    if parallel is not None:
        parallel.close()
    return code


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def _guide_scale(text: str) -> float | tuple[float, float]:
    """'5.0' -> 5.0; '3.5,4.0' -> (3.5, 4.0) = (low-noise, high-noise), upstream's tuple order."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or two numbers low,high; got {text!r}") from None
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise argparse.ArgumentTypeError(f"expected one or two values, got {len(vals)}")


def _device(text: str | None):
    import torch

    from .pipelines.conditioning import GenerationError
    from .pipelines.generate import default_device

    if text is None:
        return default_device()
    try:
        device = torch.device(text)
    except RuntimeError:
        raise GenerationError(f"--device {text!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GenerationError(f"--device {text}: there are {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise GenerationError(f"--device {text}: only cpu and cuda are supported")
    return device


def _budget(flag: str, text: str | None) -> int | None:
    from .pipelines.conditioning import GenerationError
    from .runtime.memory import parse_bytes

    try:
        n = parse_bytes(text)
    except ValueError as e:
        raise GenerationError(f"{flag}: {e}") from None
    if n is not None and not 0 < n <= MAX_BUDGET:
        raise GenerationError(f"{flag} must be above 0 and at most 1 PB, got {text}")
    return n


def _output_path(save_file: str | None, default_name: str, notice=print):
    """The MP4 path, checked now, before any model is loaded: not a folder nor a device, its folder created,
    a file writable there (the real temp file is created and removed), stale partial outputs of dead runs in
    that folder removed (`notice` says so)."""
    from pathlib import Path

    from .files import probe_write, remove_stale_partials

    text = save_file if save_file is not None else str(Path("outputs") / default_name)
    path = Path(text)
    if text.endswith("/") or path.is_dir() or not path.name:
        raise CommandError(f"--save_file {text}: is a folder; give a file name like {path / default_name}")
    if path.exists() and not path.is_file():
        raise CommandError(f"--save_file {path}: exists and is not a regular file (a device, pipe or socket); "
                           "worldstream replaces only regular files")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"--save_file {path}: cannot create the folder {path.parent} ({e.strerror})") from None
    remove_stale_partials(path.parent, lambda m: notice(f"note: {m}"))
    try:
        probe_write(path.parent, path.name)
    except OSError as e:
        raise CommandError(f"--save_file {path}: cannot write a file in {path.parent} ({e.strerror})") from None
    return path


def _check_room(path, frames: int, height: int, width: int) -> None:
    """Refuse a folder without room for the video (a tenth of its raw size: H.264 at CRF 18 stays well below)
    and, should the write still fail, its latents."""
    import shutil

    need = frames * height * width * 3 / 10 + frames * height * width / 16 + 16e6
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise CommandError(f"--save_file {path}: {free / 1e6:.1f} MB free in {path.parent}; the video needs about "
                           f"{need / 1e6:.0f} MB")


def _keep_latents(latents, ckpt_dir, path, what: str) -> CommandError:
    """After denoising something failed (`what`): keep the latents on disk so the run can be finished with
    `worldstream decode`, and say where; next to the video, else in the temp folder."""
    import tempfile
    from pathlib import Path

    from .pipelines.generate import latents_path, save_latents

    where = latents_path(Path(path))
    reasons = []
    for target in (where, Path(tempfile.gettempdir()) / where.name):
        try:
            save_latents(target, latents, ckpt_dir, path)
        except Exception as e:  # noqa: BLE001 - any failure to write: try the next place
            reasons.append(f"{target.parent}: {_reason(e)}")
            continue
        return CommandError(f"{what}; the denoised latents are kept in {target}: finish the video with "
                            f"`worldstream decode --latents {target}` (add --save_file to write it elsewhere)")
    return CommandError(f"{what}; the denoised latents could not be kept either ({'; '.join(reasons)})")


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


def _finish(run_video, job, path) -> None:
    """Run the job's computation (`run_video()` -> Result), then write the MP4. A failure after denoising (the
    VAE decode, the write) keeps the latents and names them in the error."""
    from .pipelines.generate import AfterDenoising

    try:
        result = run_video()
    except AfterDenoising as e:
        raise _keep_latents(e.latents, job.ckpt.root, path, f"the VAE decode failed ({_reason(e.cause)})") from e
    if result.frames is None:                # another process of a parallel run: rank 0 writes and reports
        return
    try:
        _write_and_report(result, path)
    except Exception as e:  # noqa: BLE001 - whatever the disk or the encoder says, the latents are kept
        raise _keep_latents(result.latents, job.ckpt.root, path, f"cannot write {path} ({_reason(e)})") from e


def _fuse_from_env() -> bool:
    """WORLDSTREAM_FUSE=0 runs the DiT's float32 elementwise work eagerly (same math; for debugging)."""
    import os
    return os.environ.get("WORLDSTREAM_FUSE", "1") != "0"


def _write_and_report(result, path) -> None:
    import time

    from .pipelines.generate import format_report
    from .pipelines.video import FPS, write_mp4

    t0 = time.perf_counter()
    write_mp4(result.frames, path, fps=FPS)
    result.timings["write"] = time.perf_counter() - t0
    f, h, w, _ = result.frames.shape
    print(f"wrote {path}: {f} frames {w}x{h}, H.264 {FPS} fps")
    print(format_report(result))


def _remove_stale_cache_partials(cache) -> None:
    from .files import remove_stale_partials

    for folder in (cache.root, cache.root / "fingerprints"):
        remove_stale_partials(folder, lambda m: print(f"note: {m}"))


def _check_step_cache(threshold: float | None) -> None:
    import math

    from .pipelines.conditioning import GenerationError
    from .pipelines.step_cache import MAX_THRESHOLD

    if threshold is not None and not (math.isfinite(threshold) and 0 <= threshold <= MAX_THRESHOLD):
        raise GenerationError(f"--step_cache {threshold:g}: a threshold from 0 to {MAX_THRESHOLD:g} (0 never skips; "
                              "README: 'Step caching')")


def cmd_generate(args: argparse.Namespace) -> int:
    return _run_parallel_command(args, _generate)


def _generate_kandinsky(args: argparse.Namespace, parallel) -> int:
    """A Kandinsky 5 checkpoint (detected from its model_index.json / transformer config): pipelines/kandinsky.py."""
    import re
    import time

    import torch

    from .pipelines.conditioning import GenerationError
    from .pipelines.kandinsky import prepare_kandinsky, run_kandinsky, text_encoder_placement, write_video
    from .pipelines.kandinsky_text import KandinskyPromptCache

    if parallel is not None:
        raise GenerationError("--ulysses is not wired for Kandinsky 5 yet: run one process")
    if args.prompt is None:
        raise GenerationError("--prompt is required")
    scale = args.sample_guide_scale
    job = prepare_kandinsky(args.ckpt_dir, args.prompt, image=args.image, size=args.size, frame_num=args.frame_num,
                            steps=args.sample_steps, guide_scale=scale[0] if isinstance(scale, tuple) else scale,
                            seed=args.base_seed, negative_prompt=args.negative_prompt, dit=args.dit)
    device = _device(args.device)
    vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", job.prompt)[:40].strip("_") or "video"
    path = _output_path(args.save_file, f"kandinsky5-{job.ckpt.task}_{job.width}x{job.height}_{slug}_"
                                         f"{time.strftime('%Y%m%d_%H%M%S')}.mp4")
    _check_room(path, job.frames, job.height, job.width)
    print(job.describe())
    placement = text_encoder_placement(job.ckpt.root, device, vram, args.t5_cpu)
    if placement == "stream":
        print(f"note: Qwen2.5-VL does not fit --vram {vram / 1e9:.0f}GB with headroom: streaming its layers "
              "through the GPU", file=sys.stderr)
    frames = run_kandinsky(job, device=device, dtype=dtype, vram=vram, ram=ram, text_cpu=args.t5_cpu,
                           quant=args.quant, text_placement=placement,
                           prompt_cache=None if args.no_prompt_cache else KandinskyPromptCache())
    t0 = time.perf_counter()
    write_video(frames, path)
    job.report["phases"]["write"] = dict(seconds=time.perf_counter() - t0)
    if "plan" in job.report:
        print(job.report["plan"])
    for name, ph in job.report["phases"].items():
        peak = f", peak VRAM {_gb(ph['peak_vram'])}" if ph.get("peak_vram") else ""
        print(f"phase {name}: {ph['seconds']:.1f} s{peak}")
    print(f"saved {path} ({len(frames)} frames at 24 fps)")
    return 0


def _generate(args: argparse.Namespace, parallel) -> int:
    import re
    import time

    import torch

    from .checkpoints.kandinsky import is_kandinsky
    if args.ckpt_dir is not None and is_kandinsky(args.ckpt_dir):
        return _generate_kandinsky(args, parallel)

    from .pipelines.conditioning import GenerationError
    from .pipelines.generate import run
    from .pipelines.prompts import PromptCache
    from .pipelines.tasks import prepare
    from .runtime.parallel import check

    everyone = (lambda fn: fn()) if parallel is None else parallel.everyone     # all check, all fail together
    once = (lambda fn: fn()) if parallel is None else parallel.from_first       # rank 0 does it, all get it

    def validate():
        if args.ckpt_dir is None:
            raise GenerationError("--ckpt_dir is required (the folder with the downloaded checkpoint)")
        if args.prompt is None:
            raise GenerationError("--prompt is required")
        if args.vae_tile is not None and not 2 <= args.vae_tile <= MAX_VAE_TILE:
            raise GenerationError(f"--vae_tile must be from 2 to {MAX_VAE_TILE} latent pixels, got {args.vae_tile}")
        _check_step_cache(args.step_cache)
        device = _device(args.device) if parallel is None else parallel.device
        vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
        if device.type == "cpu" and (vram or ram):
            print("note: --vram / --ram place the DiT on a GPU; on the CPU every weight stays in RAM")
        job = prepare(args.ckpt_dir, args.prompt, task=args.task, image=args.image, size=args.size,
                      frame_num=args.frame_num, action_path=args.action_path, action_string=args.action_string,
                      negative_prompt=args.negative_prompt, steps=args.sample_steps, shift=args.sample_shift,
                      guide_scale=args.sample_guide_scale, seed=args.base_seed, solver=args.sample_solver,
                      notice=lambda m: print(f"note: {m}"), dit=args.dit, loras=args.lora)
        if parallel is not None:
            check(job.ckpt.config, job.ckpt.config.tokens(job.frames, job.height, job.width), parallel.world,
                  f"{job.frames} frames at {job.width}x{job.height}")
        return device, vram, ram, job

    device, vram, ram, job = everyone(validate)
    job.seed = once(lambda: job.seed)        # a random seed is drawn by each process: rank 0's counts
    slug = re.sub(r"[^A-Za-z0-9]+", "_", job.prompt)[:40].strip("_") or "video"
    name = f"{job.task}_{job.width}x{job.height}_{slug}_{time.strftime('%Y%m%d_%H%M%S')}.mp4"

    def output():
        path = _output_path(args.save_file, name)
        _check_room(path, job.frames, job.height, job.width)
        return path
    path = once(output)
    cache = None if args.no_prompt_cache else PromptCache()
    if cache is not None and (parallel is None or parallel.first):
        _remove_stale_cache_partials(cache)
    print(job.describe() + (f"; Ulysses over {parallel.world} processes" if parallel is not None else ""))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    _finish(lambda: run(job, device=device, dtype=dtype, t5_cpu=args.t5_cpu, vae_cpu=args.vae_cpu,
                        clip_cpu=args.clip_cpu,
                        vae_tile=args.vae_tile, vram=vram, ram=ram, quant=args.quant, attention=args.attention,
                        fuse=_fuse_from_env(), prompt_cache=cache, parallel=parallel, step_cache=args.step_cache),
            job, path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipelines.generate import run
    from .pipelines.tasks import prepare
    from .testing.world import (DEMO_ACTION_STRING, DEMO_PROMPT, DEMO_SCENE_SEED, WORLD_CHECKPOINT,
                                demo_first_frame)

    print(f"worldstream demo: a small LingBot-World Cam model ({WORLD_CHECKPOINT.name}, shipped with the package, "
          "trained on procedural 3D worlds) runs the whole generation path (umt5 text encoder, VAE, DiT with "
          "camera control, UniPC sampler, MP4): the first frame is a rendered world, the keys move the camera.")
    device = _device(args.device or "cpu")
    path = _output_path(args.save_file, "demo.mp4")
    prompt = DEMO_PROMPT if args.prompt is None else args.prompt
    seed = DEMO_SCENE_SEED if args.scene_seed is None else args.scene_seed
    image = demo_first_frame(prompt, seed)
    job = prepare(WORLD_CHECKPOINT, prompt, image=image, size=f"{image.width}*{image.height}",
                  frame_num=args.frame_num, action_string=args.action_string or DEMO_ACTION_STRING,
                  steps=args.sample_steps, seed=args.base_seed, notice=lambda m: print(f"note: {m}"))
    _check_room(path, job.frames, job.height, job.width)
    print(job.describe())
    _finish(lambda: run(job, device=device, progress=True), job, path)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.what == "world":
        from .train import world
        return world.main(args.args)
    if args.what == "distill":
        from .train import distill
        return distill.main(args.args)
    if args.what == "decoder":
        from .train import tiny_decoder
        return tiny_decoder.main(args.args)
    raise CommandError(f"unknown training job {args.what!r}; known: world, distill, decoder")


def _add_train_parser(sub, common) -> None:
    t = sub.add_parser("train", parents=[common],
                       help="train a model: `worldstream train world --help` (the small LingBot-World "
                            "Cam model and its VAE on procedural worlds, resumable), `worldstream train distill "
                            "--help` (its causal 4-step student: ODE initialisation + DMD self forcing), `worldstream "
                            "train decoder --help` (the student's tiny real-time decoder)",
                       description="Training jobs. world: lingbot-cam-world and its VAE on rendered clips "
                                   "(the flags are those of python -m worldstream.train.world). distill: the "
                                   "causal student lingbot-fast-world from it (python -m worldstream.train.distill). "
                                   "decoder: the tiny causal decoder of its latents (python -m "
                                   "worldstream.train.tiny_decoder).")
    t.add_argument("what", choices=["world", "distill", "decoder"], help="what to train")
    t.add_argument("args", nargs=argparse.REMAINDER, help="the job's flags (see `worldstream train <what> --help`)")
    t.set_defaults(fn=cmd_train)


def cmd_decode(args: argparse.Namespace) -> int:
    """Finish a run that failed after denoising: its kept latents -> the MP4."""
    from pathlib import Path

    from .pipelines.generate import decode_video, load_checkpoint_vae, load_latents
    from .pipelines.video import FPS, write_mp4

    latents, meta = load_latents(args.latents)
    if args.vae_tile is not None and not 2 <= args.vae_tile <= MAX_VAE_TILE:
        raise CommandError(f"--vae_tile must be from 2 to {MAX_VAE_TILE} latent pixels, got {args.vae_tile}")
    ckpt_dir = Path(args.ckpt_dir or meta.get("ckpt_dir", ""))
    if not ckpt_dir.is_dir():
        raise CommandError(f"--ckpt_dir {ckpt_dir}: no such folder (the checkpoint whose VAE decodes the latents)")
    path = _output_path(args.save_file or meta.get("save_file"), Path(args.latents).stem + ".mp4")
    device = _device(args.device)
    vae = load_checkpoint_vae(ckpt_dir, "cpu")
    frames = decode_video(vae, latents, "cpu" if args.vae_cpu else device, args.vae_tile)
    write_mp4(frames, path, fps=FPS)
    f, h, w, _ = frames.shape
    print(f"wrote {path}: {f} frames {w}x{h}, H.264 {FPS} fps (from {args.latents}, which can be deleted now)")
    return 0


def _add_generate_parser(sub, common) -> None:
    g = sub.add_parser(
        "generate", parents=[common], help="generate a video from a checkpoint (upstream generate.py flags)",
        description="Generate a video with Wan2.1 T2V, Wan2.2 I2V A14B or LingBot-World (Cam / Act) from their "
                    "official checkpoint folders. The model is detected from the weights; bad input is reported "
                    "before anything large is loaded.")
    a = g.add_argument
    a("--task", help="upstream task name, checked against the checkpoint: i2v-A14B (Wan2.2 I2V, LingBot-World), "
                     "i2v-14B (Wan2.1 I2V, with its CLIP image encoder), t2v-14B, t2v-1.3B (Wan2.1). Default: "
                     "detected")
    a("--ckpt_dir", help="checkpoint folder (DiT weights, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, "
                         "google/umt5-xxl/; Wan2.1 I2V also models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth). "
                         "A distill_models/ (distill_fp8/, distill_int8/) folder in it is a LightX2V 4-step student")
    a("--dit", action="append", metavar="PATH",
      help="use this DiT (a .safetensors file, e.g. LightX2V's wan2.1_i2v_480p_scaled_fp8_e4m3_lightx2v_4step"
           ".safetensors, or a folder) instead of the checkpoint's; VAE, text encoder and CLIP still come from "
           "--ckpt_dir. Give it twice for the two experts of Wan2.2 / LingBot ('high' / 'low' in the names). "
           "Kandinsky 5: the original single-file transformer (kandinsky5pro_i2v_sft_5s.safetensors) instead of "
           "the diffusers folder's transformer/ weights")
    a("--lora", action="append", metavar="[high=|low=]FILE[:SCALE]",
      help="merge a LoRA (kohya or diffusers naming: lora_down/up or lora_A/B, alpha; .diff / .diff_b) into the "
           "DiT while it loads, before any compression; repeatable; SCALE defaults to 1. A step-distill LoRA "
           "(LightX2V's ..._cfg_step_distill_lora_rank64..., ..._4step...) switches to the 4-step sampler")
    a("--prompt", help="what the video shows")
    a("--negative_prompt", default=None, help="what to steer away from (default: Wan's Chinese negative prompt)")
    a("--image", help="first frame (image-to-video models); the output keeps its aspect ratio")
    a("--size", help="width*height: 1280*720, 720*1280, 832*480, 480*832 (t2v-1.3B: 832*480, 480*832). "
                     "Image-to-video uses it as the pixel budget. Default 1280*720")
    a("--frame_num", type=int, help="frames, 4n+1 (others are rounded down with a notice), at most 1025. Default "
                                    "81, or the length of --action_string")
    a("--action_path", help="LingBot-World: folder with poses.npy [N,4,4] and intrinsics.npy [N,4] "
                            "(Act models also action.npy [N,4] WASD)")
    a("--action_string", help="LingBot-World: keyboard schedule, e.g. 'w-10,iw-15,none-10' (W/A/S/D move, "
                              "I/K pitch, J/L yaw; <keys>-<frames> segments). Intrinsics from --action_path if "
                              "given, else a built-in camera calibrated for 832x480")
    a("--sample_steps", type=int, help="denoising steps, at most 1000 (default: LingBot 70, Wan2.2 40, Wan2.1 I2V "
                                       "40, Wan2.1 T2V 50; a 4-step student 4)")
    a("--sample_shift", type=float, help="flow schedule shift, above 0 and at most 100 (default: LingBot 10, "
                                         "Wan 5, Wan2.1 I2V at 480p 3, 4-step students 5)")
    a("--sample_guide_scale", type=_guide_scale,
      help="classifier-free guidance scale from 0 to 100, or low,high for the two experts (default: LingBot 5, "
           "Wan2.2 3.5, Wan2.1 5, 4-step students 1); 1 skips the unconditional pass")
    a("--sample_solver", default=None, choices=["unipc", "euler", "distill"],
      help="sampler: unipc (upstream's), euler, or distill (LightX2V's 4-step students: t = 1000/750/500/250 at "
           "shift 5, deterministic Euler, no CFG). Default: distill for a student, else unipc")
    a("--base_seed", type=int, help="noise seed; the same seed gives the same video (default: LingBot 42, "
                                    "others random, printed); -1 = default")
    a("--save_file", help="output .mp4 (default outputs/<task>_<size>_<prompt>_<time>.mp4)")
    a("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    a("--dtype", choices=["bf16", "fp32"], help="DiT compute dtype (default bf16 on CUDA, fp32 on CPU)")
    a("--vram", help="GPU memory budget for the DiT, e.g. 8GB or 24GiB: blocks that do not fit stream from "
                     "host RAM each step (slower, less VRAM). Default: the free memory of the device")
    a("--ram", help="host RAM budget, e.g. 32GB: blocks that do not fit are read from the checkpoint's "
                    "safetensors on disk each step (slower still). Default: 80%% of this machine's RAM")
    a("--quant", choices=["fp8", "fp8-block", "int8"],
      help="compress the DiT's block linears to 8 bits while loading (half the bytes to hold and stream; "
           "fp8 uses fp8 matmuls on Ada/Hopper GPUs). A checkpoint from `worldstream convert` needs no flag")
    a("--attention", choices=["sdpa", "8bit"], default="sdpa",
      help="self-attention kernel: sdpa (default, exact bf16) or 8bit (int8 Q.K, fp8 P.V Triton kernels on "
           "Ada/Hopper: ~20%% faster attention at 81 frames, ~0.3-3%% error per attention; used where the plan "
           "predicts it faster: not at 9 frames; see README)")
    a("--step_cache", type=float, default=None, metavar="THRESHOLD",
      help="step caching: skip the DiT's blocks at steps where their output is predicted to change little and "
           "reuse the last residual (no forward, no weight transfer). 0 never skips; larger skips more, at a "
           "quality cost (README: 'Step caching'). Default: off")
    a("--t5_cpu", action="store_true", help="run the text encoder on the CPU: saves ~11 GB of VRAM, costs "
                                            "seconds to a minute of encoding (skipped for cached prompts)")
    a("--clip_cpu", action="store_true", help="Wan2.1 I2V: run the CLIP image encoder on the CPU (float32) instead "
                                              "of on the GPU (float16, ~1.3 GB, freed before the DiT loads)")
    a("--vae_cpu", action="store_true", help="run the VAE on the CPU: saves VRAM during encode/decode, costs "
                                             "minutes at 720p")
    a("--vae_tile", type=int, default=None, metavar="N",
      help="encode the first frame's clip and decode the video in overlapping spatial tiles of N x N latent "
           "pixels (e.g. 32; 2 to 1024): the VAE's working memory shrinks with the tile; tile borders are blended, "
           "so the result is close to, not equal to, the untiled encode / decode")
    a("--no_prompt_cache", action="store_true", help="do not read or store prompt embeddings in "
                                                     "~/.cache/worldstream/prompts")
    a("--offload_model", type=_str2bool, help="accepted for upstream compatibility and ignored: worldstream "
                                              "decides placement itself from --vram / --ram")
    a("--convert_model_dtype", action="store_true", help="accepted for upstream compatibility: weights are "
                                                         "always loaded in the compute dtype")
    a("--ulysses", type=int, default=None, metavar="N",
      help="split every DiT forward over N GPUs of this machine (Ulysses sequence parallelism): launch N "
           "processes with `torchrun --nproc_per_node N -m worldstream generate ... --ulysses N`. N must divide the "
           "attention heads (40: 2, 4, 5, 8). Rank 0 writes the video and reports")
    g.set_defaults(fn=cmd_generate)


def _add_demo_parser(sub, common) -> None:
    d = sub.add_parser(
        "demo", parents=[common],
        help="generate a short video of a procedural world with the small shipped model (CPU, seconds)",
        description="Render the first frame of a procedural world and run the full generation path on the small "
                    "LingBot-World Cam model shipped with the package (text encoder, VAE, DiT with camera "
                    "control from a keyboard string, sampler, MP4).")
    a = d.add_argument
    a("--action_string", help="keyboard schedule driving the camera (default w-8,jw-12,lw-12: forward, then "
                              "forward turning left, then right; W/S move, A/D strafe, J/L turn, I/K pitch)")
    a("--prompt", help="text; its words also pick the world's time of day (dawn, noon, dusk, night), ground, "
                       "weather and box colours (default 'a sunny noon grassy field with colourful boxes')")
    a("--scene_seed", type=int, help="which world (default 4)")
    a("--frame_num", type=int, help="frames, 4n+1 (default: the length of --action_string, 33)")
    a("--sample_steps", type=int, help="denoising steps (default 30, the model's)")
    a("--base_seed", type=int, help="noise seed (default 42)")
    a("--save_file", default="outputs/demo.mp4", help="output .mp4 (default outputs/demo.mp4)")
    a("--device", help="cpu (default) or cuda")
    d.set_defaults(fn=cmd_demo)


# ---- stream -------------------------------------------------------------------------------------------------

def cmd_stream(args: argparse.Namespace) -> int:
    """Run a causal student's chunk loop offline (pipelines/stream.py), writing the MP4 as chunks come."""
    return _run_parallel_command(args, _stream)


def _stream(args: argparse.Namespace, parallel) -> int:
    import re
    import tempfile
    import time

    import torch

    from .pipelines.prompts import PromptCache
    from .pipelines.stream import format_chunk, open_session, prepare_stream, run_stream
    from .runtime.parallel import check
    from .testing.world import DEMO_PROMPT as WORLD_PROMPT
    from .testing.world import demo_first_frame, student_checkpoint

    everyone = (lambda fn: fn()) if parallel is None else parallel.everyone     # all check, all fail together
    once = (lambda fn: fn()) if parallel is None else parallel.from_first       # rank 0 does it, all get it
    with tempfile.TemporaryDirectory(prefix="worldstream-stream-") as tmp:

        def validate():
            device = _device(args.device) if parallel is None else parallel.device
            vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
            ckpt_dir, image, prompt = args.ckpt_dir, args.image, args.prompt
            if ckpt_dir is None:     # the built-in student of the tiny world, as `demo` runs its teacher
                print("worldstream stream: no --ckpt_dir: the built-in tiny world student (lingbot-fast-world, "
                      "distilled from the tiny world model; procedural scenes at 160x96)")
                ckpt_dir = student_checkpoint(Path(tmp))
                image = image or demo_first_frame()
                prompt = prompt or WORLD_PROMPT
            request = prepare_stream(ckpt_dir, prompt, image=image, size=args.size, frame_num=args.frame_num,
                                     action_string=args.action_string, action_path=args.action_path,
                                     seed=args.base_seed, steps=args.steps, window=args.window, sink=args.sink,
                                     noise=args.noise, notice=lambda m: print(f"note: {m}"))
            if parallel is not None:
                cfg = request.ckpt.config
                chunk_frames = cfg.latents.video_frames(cfg.realtime.chunk)
                check(cfg, cfg.tokens(chunk_frames, request.height, request.width), parallel.world,
                      f"a chunk of {cfg.realtime.chunk} latent frames at {request.width}x{request.height}")
            return device, vram, ram, request

        device, vram, ram, request = everyone(validate)
        slug = re.sub(r"[^A-Za-z0-9]+", "_", request.prompt)[:40].strip("_") or "stream"
        name = f"stream_{request.width}x{request.height}_{slug}_{time.strftime('%Y%m%d_%H%M%S')}.mp4"

        def output():
            path = _output_path(args.save_file, name)
            _check_room(path, request.frames, request.height, request.width)
            return path
        path = once(output)
        print(request.describe() + (f"; Ulysses over {parallel.world} processes" if parallel is not None else ""))
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
        first = parallel is None or parallel.first
        session = open_session(request, device=device, dtype=dtype, vram=vram, ram=ram, quant=args.quant,
                               attention=args.attention, vae=args.vae, taehv=args.taehv, decoder=args.decoder,
                               prompt_cache=None if args.no_prompt_cache else PromptCache(), parallel=parallel,
                               cuda_graphs=args.cuda_graphs)
        t0, frames = time.perf_counter(), 0
        try:
            for chunk in run_stream(session, request, path if first else None):
                n = session.video_frames_per_chunk - (3 if chunk.index == 0 else 0)
                frames += n
                print(format_chunk(chunk, n), flush=True)
        finally:
            session.close()
        wall = time.perf_counter() - t0
        print(f"wrote {path}: {frames} frames {request.width}x{request.height}, H.264 16 fps; "
              f"{wall:.1f} s ({frames / wall:.1f} FPS overall)")
    return 0


def _add_stream_parser(sub, common) -> None:
    st = sub.add_parser(
        "stream", parents=[common], help="run a causal (real-time) LingBot student chunk by chunk, as long as you like",
        description="Stream a LingBot-World Fast student (v1, v2 causal-fast 14B / 1.3B): chunks of latent frames "
                    "with a KV cache, 4 denoising steps + a refresh each, camera from the keys; the MP4 is written "
                    "as chunks are produced (it appears complete at the end). Without --ckpt_dir the built-in "
                    "student of the tiny procedural world runs (lingbot-fast-world, 160x96).")
    a = st.add_argument
    a("--ckpt_dir", help="checkpoint folder: lingbot_world_fast/ (v1, inside Base Cam) or transformers/ (v2 14B), "
                         "or the v2 1.3B; Wan2.1_VAE.pth, umt5 .pth and google/umt5-xxl/ at its root")
    a("--image", help="first frame (required with --ckpt_dir)")
    a("--prompt", help="what the world shows")
    a("--action_string", help="keys per frame, e.g. 'w-40,jw-20,none-8' (W/A/S/D move, I/K pitch, J/L yaw)")
    a("--action_path", help="folder with poses.npy + intrinsics.npy: the camera of the whole clip, computed as "
                            "upstream does (its length sets the frames)")
    a("--frame_num", type=int, help="frames to stream (rounded up to whole chunks). Default: the action "
                                    "string's length")
    a("--size", help="W*H pixel budget; the image's aspect ratio is kept (default 832*480)")
    a("--steps", type=int, help="denoising steps per chunk: the student's 4 (default), or 1 (t = 999 only)")
    a("--window", type=int, default=-1, help="latent frames the KV cache holds (default: the student's; v1 "
                                             "global, v2 18)")
    a("--sink", type=int, help="first latent frames kept forever in a windowed cache (default: the student's)")
    a("--noise", choices=["chunk", "upstream"], default="chunk",
      help="noise draws: per chunk (default, what a live stream can do) or upstream's order (whole clip first)")
    a("--vae", choices=["wan", "tiny"], default="wan", help="decoder: the Wan VAE (exact) or the TAEHV tiny one")
    a("--taehv", help="taew2_1.pth / .safetensors for --vae tiny (madebyollin/taehv; never downloaded)")
    a("--decoder", choices=["vae", "tiny"], default="vae", help=DECODER_HELP)
    a("--base_seed", type=int, help="noise seed (default 42)")
    a("--save_file", help="output .mp4 (default outputs/stream_<size>_<prompt>_<time>.mp4)")
    a("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    a("--dtype", choices=["bf16", "fp32"], help="DiT compute dtype (default bf16 on CUDA, fp32 on CPU)")
    a("--vram", help="GPU memory budget (weights + KV cache); blocks that do not fit stream from host RAM")
    a("--ram", help="host RAM budget for the weights")
    a("--quant", choices=["fp8", "fp8-block", "int8"], help="compress the DiT's block linears while loading")
    a("--attention", choices=["sdpa", "8bit"], default="sdpa", help="self-attention kernel")
    a("--cuda_graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    a("--no_prompt_cache", action="store_true", help="do not read or store prompt embeddings")
    a("--ulysses", type=int, default=None, metavar="N",
      help="split every DiT forward over N GPUs of this machine (Ulysses sequence parallelism): launch N "
           "processes with `torchrun --nproc_per_node N -m worldstream stream ... --ulysses N`. N must divide the "
           "attention heads (40: 2, 4, 5, 8). Rank 0 decodes, writes and reports")
    st.set_defaults(fn=cmd_stream)


# ---- serve ---------------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    """A local web page to walk through a world in real time (serve/): load the student once, then serve."""
    import os

    import torch

    from .pipelines.conditioning import GenerationError
    from .pipelines.prompts import PromptCache
    from .serve import Engine, ServeConfig, Server
    from .serve.config import is_loopback

    if args.random_weights is not None:
        given = [f for f in ("ckpt_dir", "image", "prompt", "vram", "ram", "taehv") if getattr(args, f) is not None]
        given += ["decoder"] if getattr(args, "decoder", "vae") != "vae" else []
        if given:
            raise GenerationError(f"--random_weights makes its own model, first frame and prompt, all resident: "
                                  f"it takes no --{', --'.join(given)}")
    elif args.ckpt_dir is not None and args.image is None:
        raise GenerationError("--image is required with --ckpt_dir: the stream starts from a first frame")
    if args.max_sessions is not None and not 1 <= args.max_sessions <= 64:
        raise GenerationError(f"--max_sessions {args.max_sessions}: between 1 and 64")
    if not 0 <= args.port <= 65535:
        raise GenerationError(f"--port {args.port}: between 0 and 65535")
    outputs = Path(args.outputs)
    try:
        outputs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenerationError(f"--outputs {outputs}: {e}") from None
    if not os.access(outputs, os.W_OK):
        raise GenerationError(f"--outputs {outputs}: not writable")
    try:
        config = ServeConfig(host=args.host, port=args.port, token=args.token,
                             allow_origins=tuple(args.allow_origin or ()), max_sessions=args.max_sessions,
                             max_image_bytes=int(args.max_image_mb * (1 << 20)), jpeg_quality=args.jpeg_quality,
                             outputs=outputs)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    device = _device(args.device)
    vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
    if args.ckpt_dir is None and args.random_weights is None:
        print("worldstream serve: no --ckpt_dir: the built-in tiny world student (lingbot-fast-world, distilled "
              "from the tiny world model: walk through procedural scenes at 160x96)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    sessions = args.max_sessions or (1 if torch.device(device).type == "cuda" else 2)
    if args.random_weights is not None:
        print(f"worldstream serve: random weights of {args.random_weights} (benchmarks: no checkpoint, no text "
              "encoder, everything resident)")
        engine = Engine.random(args.random_weights, size=args.size, device=device, dtype=dtype, quant=args.quant,
                               attention=args.attention, vae=args.vae, steps=args.steps, window=args.window,
                               sink=args.sink, seed=args.base_seed, cuda_graphs=args.cuda_graphs)
    else:
        engine = Engine.load(args.ckpt_dir, prompt=args.prompt, image=args.image, size=args.size, device=device,
                             dtype=dtype, vram=vram, ram=ram, quant=args.quant, attention=args.attention,
                             vae=args.vae, taehv=args.taehv, decoder=args.decoder, steps=args.steps,
                             window=args.window, sink=args.sink, seed=args.base_seed, sessions=sessions,
                             prompt_cache=None if args.no_prompt_cache else PromptCache(),
                             notice=lambda m: print(f"note: {m}"), cuda_graphs=args.cuda_graphs)
    try:
        try:
            server = Server(engine, config, log_level=args.log_level)
        except OSError as e:
            raise CommandError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from e
        print(f"worldstream serve: {engine.name} on {engine.device}, {engine.width}x{engine.height}, KV window "
              f"{engine.window} (sink {engine.sink}), at most {server.state.max_sessions} session(s) at once")
        if not is_loopback(args.host):
            print(f"worldstream serve: listening on {args.host} (not loopback): clients need the token below")
        if config.token:
            print(f"token: {config.token}")
        print(f"open {server.url}", flush=True)
        stopped_by = server.run()
    finally:
        engine.close()
    mem = engine.memory()
    freed = (f"; GPU memory allocated now {mem['vram'] / 2**20:.0f} MiB" if mem["vram"] is not None else "")
    print(f"worldstream serve: stopped{f' by {stopped_by}' if stopped_by else ''}; "
          f"{server.state.served} session(s) served; model freed{freed}", flush=True)
    return 0


def _add_serve_parser(sub, common) -> None:
    sv = sub.add_parser(
        "serve", parents=[common], help="a local web page to walk through a generated world in real time",
        description="Serve a causal LingBot student on a local web page: hold W/A/S/D, look with I/J/K/L or the "
                    "mouse, watch the world being generated. One session per browser tab (WebSocket), frames as "
                    "JPEG. Listens on 127.0.0.1 unless --host says otherwise (then a token is required). Without "
                    "--ckpt_dir the built-in tiny world student (lingbot-fast-world) runs on the CPU.")
    a = sv.add_argument
    a("--ckpt_dir", help="checkpoint folder, as for `worldstream stream` (default: the built-in tiny world "
                         "student)")
    a("--image", help="first frame (required with --ckpt_dir; the page can upload another)")
    a("--prompt", help="what the world shows (the page can change it)")
    a("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; anything else needs the "
                                          "token printed at start)")
    a("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    a("--token", help="the token clients must give (?token=... on the page URL); default: none on loopback, a "
                      "random one otherwise")
    a("--allow_origin", action="append", help="another page origin allowed to open the WebSocket, e.g. "
                                              "https://proxy.example (repeatable)")
    a("--max_sessions", type=int, help="sessions generating at once (default 1 on a GPU, 2 on the CPU)")
    a("--max_image_mb", type=float, default=8.0, help="largest image upload in MiB (default 8)")
    a("--jpeg_quality", type=int, default=85, help="JPEG quality of the frames sent (default 85)")
    a("--outputs", default="outputs", help="folder for recorded MP4s (default outputs)")
    a("--size", help="W*H pixel budget; the image's aspect ratio is kept (default 832*480; tiny model 112*64)")
    a("--steps", type=int, help="denoising steps per chunk: the student's 4 (default), or 1")
    a("--window", type=int, help="latent frames the KV cache holds (default: the student's; 18 for a v1 "
                                 "student, whose own cache is global)")
    a("--sink", type=int, help="first latent frames kept forever in the window (default: the student's, or 6)")
    a("--vae", choices=["wan", "tiny"], default="wan", help="decoder: the Wan VAE or the TAEHV tiny one")
    a("--taehv", help="taew2_1.pth / .safetensors for --vae tiny (never downloaded)")
    a("--decoder", choices=["vae", "tiny"], default="vae", help=DECODER_HELP)
    a("--base_seed", type=int, help="noise seed (default 42)")
    a("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    a("--dtype", choices=["bf16", "fp32"], help="DiT compute dtype (default bf16 on CUDA, fp32 on CPU)")
    a("--vram", help="GPU memory budget (weights + KV caches)")
    a("--ram", help="host RAM budget for the weights")
    a("--quant", choices=["fp8", "fp8-block", "int8"], help="compress the DiT's block linears while loading")
    a("--attention", choices=["sdpa", "8bit"], default="sdpa", help="self-attention kernel")
    a("--cuda_graphs", action="store_true", help=CUDA_GRAPHS_HELP)
    a("--no_prompt_cache", action="store_true", help="do not read or store prompt embeddings")
    a("--random_weights", metavar="VARIANT", help=argparse.SUPPRESS)   # benchmarks: Engine.random, no checkpoint
    a("--log_level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
      help="server log level (default warning)")
    sv.set_defaults(fn=cmd_serve)


# ---- plan ----------------------------------------------------------------------------------------------------

MAX_SIDE = 8192        # plan --size: pixels per side
MAX_BANDWIDTH = 1e4    # plan --pcie / --disk: GB/s


def _plan_size(text: str) -> tuple[int, int]:
    from .pipelines.conditioning import GenerationError

    try:
        w, h = (int(v) for v in text.replace("x", "*").split("*"))
    except ValueError:
        raise GenerationError(f"--size {text!r}: expected WIDTH*HEIGHT, e.g. 832*480") from None
    if not (16 <= w <= MAX_SIDE and 16 <= h <= MAX_SIDE and w % 16 == 0 and h % 16 == 0):
        raise GenerationError(f"--size {text}: both sides must be multiples of 16 from 16 to {MAX_SIDE}")
    return w, h


def _bandwidth(flag: str, value: float) -> float:
    import math

    from .pipelines.conditioning import GenerationError

    if not (math.isfinite(value) and 0 < value <= MAX_BANDWIDTH):
        raise GenerationError(f"{flag} {value:g}: a bandwidth in GB/s above 0 and at most {MAX_BANDWIDTH:g}")
    return value * 1e9


def cmd_plan(args: argparse.Namespace) -> int:
    """Print what the planner would do for a model, a clip and a machine, without loading anything: the same
    plan `generate` makes (runtime/runner.plan_run), with generate's budget defaults."""
    import dataclasses

    import torch

    from .checkpoints.compressed import as_policy
    from .checkpoints.dit import find_checkpoint
    from .models.configs import get_config
    from .pipelines.conditioning import GenerationError, round_frames
    from .runtime.loading import resolve_quant
    from .runtime.memory import fmt_bytes
    from .runtime.planner import Hardware, Workload
    from .runtime.parallel import check
    from .runtime.runner import RAM_SHARE, default_ram, plan_run

    if (args.ckpt_dir is None) == (args.variant is None):
        raise GenerationError("give exactly one of --ckpt_dir (a checkpoint folder) or --variant (a name "
                              "from `worldstream info`)")
    student = None
    if args.ckpt_dir:
        from .checkpoints.kandinsky import find_kandinsky, is_kandinsky
        ckpt = find_kandinsky(args.ckpt_dir, args.dit) if is_kandinsky(args.ckpt_dir) else \
            find_checkpoint(args.ckpt_dir, dit=args.dit)
        cfg, experts = ckpt.config, len(ckpt.experts)
        student = ckpt.student
        try:
            policy, _ = resolve_quant(ckpt, args.quant)   # a converted checkpoint plans its stored format
        except ValueError as e:
            raise GenerationError(str(e)) from None
    else:
        try:
            cfg = get_config(args.variant)
        except KeyError as e:
            raise GenerationError(e.args[0]) from None
        experts, policy = cfg.experts, as_policy(args.quant)
        if policy is not None and args.no_skip_first_last:
            from .checkpoints.compressed import QuantPolicy
            policy = QuantPolicy(policy.fmt, skip_first_last=False)
    if args.student:
        student = student or cfg.student
        if student is None:
            raise GenerationError(f"--student: no step-distilled sampler is known for {cfg.name}")
    guided = not args.no_cfg and student is None
    own = getattr(cfg.sampling, "size", None)   # a family with its own default size (Kandinsky 5: 768x512, 121)
    size = args.size or ("*".join(map(str, own)) if own else "832*480")
    frame_num = args.frame_num or (cfg.sampling.frame_num if own else 81)
    w, h = _plan_size(size)
    frames = round_frames(frame_num, cfg.latents)
    if frames != frame_num:
        print(f"note: --frame_num {frame_num} is not 4n+1; planning for {frames}", file=sys.stderr)
    hw = Hardware(pcie_bw=_bandwidth("--pcie", args.pcie), disk_bw=_bandwidth("--disk", args.disk))
    if args.nvlink is not None:
        hw = dataclasses.replace(hw, p2p_bw=_bandwidth("--nvlink", args.nvlink))
    if args.gpus < 1:
        raise GenerationError(f"--gpus must be at least 1, got {args.gpus}")
    check(cfg, cfg.tokens(frames, h, w), args.gpus, f"{frames} frames at {w}x{h}", flag="--gpus")
    vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
    vram_note = fmt_bytes(vram) if vram else "unlimited (no --vram)"
    if vram is None and torch.cuda.is_available():
        vram = torch.cuda.mem_get_info(0)[0]
        vram_note = f"{fmt_bytes(vram)} (free on cuda:0, generate's default)"
    ram_note = fmt_bytes(ram) if ram else f"{fmt_bytes(default_ram())} ({RAM_SHARE:.0%} of this machine's, generate's default)"
    ram = ram if ram is not None else default_ram()
    p = plan_run(cfg, Workload(frames=frames, height=h, width=w, guidance=guided, experts=experts,
                               step_cache=args.step_cache),
                 vram, ram, torch.bfloat16, policy, hw, attention=args.attention, gpus=args.gpus)
    weights = policy.fmt + (" (first/last blocks bf16)" if policy.skip_first_last else "") if policy else "bf16"
    gpus = f"{args.gpus} GPUs (Ulysses), " if args.gpus > 1 else ""
    print(f"{cfg.name}: {frames} frames at {w}x{h}, {'CFG' if guided else 'no CFG'}, "
          f"{experts} expert(s); weights {weights}; {gpus}budgets: VRAM {vram_note}{' per GPU' if gpus else ''}, "
          f"RAM {ram_note}; PCIe {args.pcie:g} GB/s, disk {args.disk:g} GB/s"
          + (f", GPU-to-GPU {hw.p2p_bw / 1e9:.0f} GB/s" if gpus else ""))
    print(p.describe())
    steps = student.steps if student else (cfg.sampling.steps if cfg.sampling else None)
    if steps:
        what = f"the 4-step student's {steps} steps" if student else f"the default {steps} steps"
        print(f"denoise: {what} x {p.step_seconds:.2f} s = {steps * p.step_seconds:.0f} s (DiT compute and copies "
              "only; load, text / image encoding and the VAE come on top)")
    for line in _companion_plan(cfg, vram):
        print(line)
    return 0


def _companion_plan(cfg, vram) -> list[str]:
    """Where generate puts the encoders under `vram` (none of them resident with the DiT)."""
    import math

    from .checkpoints.clip import visual_shapes
    from .checkpoints.t5 import upstream_shapes
    from .models.clip import ClipVisionConfig
    from .models.text_encoder import T5Config
    from .runtime.memory import fmt_bytes

    if getattr(cfg, "family", "wan") == "kandinsky5":   # Qwen2.5-VL-7B (~8.3 B) and CLIP-L's text tower
        qwen, clip = 2 * 8.29e9, 2 * 123e6
        where = ("its 28 layers streamed through the GPU from pinned RAM (~2 GB of VRAM)" if vram and qwen > 0.85 * vram
                 else "on the GPU, then freed")
        return [f"text encoders: Qwen2.5-VL {fmt_bytes(qwen)} bf16, {where}, and CLIP-L text {fmt_bytes(clip)}, "
                "before the DiT loads (--t5_cpu: on the CPU; cached prompts skip them)"]
    t5 = 2 * sum(math.prod(s) for s in upstream_shapes(T5Config()).values())
    where = ("streamed through the GPU from pinned RAM (~3 GB of VRAM)" if vram and t5 > 0.85 * vram
             else "on the GPU, then freed")
    out = [f"text encoder: umt5-xxl {fmt_bytes(t5)} bf16, {where}, before the DiT loads (--t5_cpu: on the CPU; "
           "cached prompts skip it)"]
    if cfg.has_image_branch:
        clip = 2 * sum(math.prod(s) for s in visual_shapes(ClipVisionConfig()).values())
        out.append(f"image encoder: CLIP ViT-H/14 visual tower {fmt_bytes(clip)} fp16, on the GPU then freed, "
                   "before the DiT loads (--clip_cpu: on the CPU)")
    return out


def _add_plan_parser(sub, common) -> None:
    q = sub.add_parser("plan", parents=[common], help="show how a model would be placed under VRAM / RAM budgets",
                       description="Plan residency, prefetch and host tiers for one denoising step, and predict "
                                   "peak VRAM, peak host RAM and seconds per step: the plan `generate` makes "
                                   "(bf16 on a GPU). Nothing is loaded.")
    q.add_argument("--ckpt_dir", help="checkpoint folder (the variant and a converted checkpoint's weight format are "
                                      "read from it)")
    q.add_argument("--variant", help="a variant name from `worldstream info`, e.g. lingbot-cam")
    q.add_argument("--size", default=None, help=f"WIDTH*HEIGHT, multiples of 16 up to {MAX_SIDE} "
                                                "(default 832*480; Kandinsky 5: 768*512)")
    q.add_argument("--frame_num", type=int, default=None, help="frames, 4n+1, at most 1025 (default 81; "
                                                                "Kandinsky 5: 121)")
    q.add_argument("--vram", help="VRAM budget, e.g. 8GB (default: the free memory of cuda:0, as generate; "
                                  "unlimited on a machine without a GPU)")
    q.add_argument("--ram", help="host RAM budget, e.g. 32GB (default: 80%% of this machine's RAM, as generate)")
    q.add_argument("--quant", choices=["fp8", "fp8-block", "int8"], help="plan for compressed block weights "
                                                                         "(generate --quant)")
    q.add_argument("--no_cfg", action="store_true", help="one forward per step (guide scale 1 / distilled models)")
    q.add_argument("--no_skip_first_last", action="store_true",
                   help="with --quant: every block compressed (as `convert --no_skip_first_last` and LightX2V's "
                        "fp8 / int8 students store them), so none must stay resident")
    q.add_argument("--student", action="store_true", help="plan a LightX2V 4-step student of the model (no CFG, "
                                                          "its steps); a student checkpoint is planned so anyway")
    q.add_argument("--dit", action="append", metavar="PATH", help="with --ckpt_dir: the DiT file / folder generate "
                                                                  "would use instead (generate --dit)")
    q.add_argument("--attention", choices=["sdpa", "8bit"], default="sdpa",
                   help="plan for 8-bit self-attention (generate --attention 8bit): taken where it is faster")
    q.add_argument("--step_cache", action="store_true",
                   help="budget the step cache's residuals (generate --step_cache); the prediction is per "
                        "computed step")
    q.add_argument("--pcie", type=float, default=53.0, help="pinned host-to-device GB/s (default 53, H100 Gen5)")
    q.add_argument("--disk", type=float, default=1.5, help="disk read GB/s for the disk tier (default 1.5)")
    q.add_argument("--gpus", type=int, default=1, help="GPUs of this machine sharing each forward (--ulysses N): "
                                                        "the plan is per GPU, --vram per GPU, --ram the machine's")
    q.add_argument("--nvlink", type=float, default=None, help="GPU-to-GPU all-to-all GB/s per GPU for --gpus "
                                                              "(default 300, assumed, not measured)")
    q.set_defaults(fn=cmd_plan)


# ---- convert -------------------------------------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    """Write a compressed copy of a checkpoint (runtime/convert.py)."""
    from .runtime.convert import convert

    if args.ckpt_dir is None or args.out is None or args.quant is None:
        raise CommandError("--ckpt_dir, --quant and --out are required")
    try:
        from .checkpoints.lora import parse_lora_arg
        convert(args.ckpt_dir, args.out, args.quant, skip_first_last=args.skip_first_last,
                log=lambda m: print(m, file=sys.stderr, flush=True), dit=args.dit,
                loras=[parse_lora_arg(x) for x in args.lora or []])
    except ValueError as e:     # a bad format, an existing --out, an unusable source (CheckpointError)
        raise CommandError(e) from e
    except OSError as e:
        raise CommandError(f"cannot write {e.filename or args.out} ({e.strerror or e}); {args.out} was not "
                           "written and its partial folder is removed") from e
    print(f"wrote {args.out}: use it as --ckpt_dir (no --quant needed)")
    return 0


def _add_convert_parser(sub, common) -> None:
    c = sub.add_parser(
        "convert", parents=[common], help="write a compressed (fp8 / int8) copy of a checkpoint, laid out for streaming",
        description="Quantize the DiT block linears of a checkpoint one block at a time and write one safetensors "
                    "file per block (plus the index json and config.json with a 'quantization' entry); the text "
                    "encoder, tokenizer and VAE are hard-linked. OUT is written in full or not at all; the room it "
                    "needs is checked first, and a partial folder left by a killed conversion is removed.")
    c.add_argument("--ckpt_dir", help="source checkpoint folder")
    c.add_argument("--quant", help="fp8 (per-channel), fp8-block (128-column blocks) or int8 (per-channel)")
    c.add_argument("--out", help="new folder for the compressed checkpoint (must not exist)")
    c.add_argument("--dit", action="append", metavar="PATH",
                   help="convert this DiT file / folder (e.g. LightX2V's single-file student) instead of the "
                        "checkpoint's; it becomes OUT's DiT (twice: the high- and low-noise experts)")
    c.add_argument("--lora", action="append", metavar="[high=|low=]FILE[:SCALE]",
                   help="merge a LoRA into the weights before compressing them (repeatable)")
    c.add_argument("--skip_first_last", dest="skip_first_last", action="store_true", default=True,
                   help="keep the first and last blocks whole (default; they are the most sensitive)")
    c.add_argument("--no_skip_first_last", dest="skip_first_last", action="store_false",
                   help="compress the first and last blocks too")
    c.set_defaults(fn=cmd_convert, interrupted="nothing written")


def _add_decode_parser(sub, common) -> None:
    d = sub.add_parser(
        "decode", parents=[common], help="finish a run that failed after denoising: its kept latents -> MP4",
        description="When a run fails after its denoising loop (the VAE decode, or writing the MP4: a full disk), "
                    "worldstream keeps the denoised latents in NAME.latents.safetensors and says so. This command "
                    "decodes them with the checkpoint's VAE and writes the video.")
    a = d.add_argument
    a("--latents", required=True, help="the .latents.safetensors file the failed run named")
    a("--ckpt_dir", help="checkpoint folder whose VAE decodes them (default: the one the run used)")
    a("--save_file", help="output .mp4 (default: the one the run was writing)")
    a("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    a("--vae_cpu", action="store_true", help="run the VAE on the CPU")
    a("--vae_tile", type=int, metavar="N", help="decode in spatial tiles of N x N latent pixels (less memory)")
    d.set_defaults(fn=cmd_decode)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="worldstream", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", parents=[common], help="list the model variants and their sizes").set_defaults(fn=cmd_info)
    _add_generate_parser(sub, common)
    _add_demo_parser(sub, common)
    _add_stream_parser(sub, common)
    _add_serve_parser(sub, common)
    _add_decode_parser(sub, common)
    _add_plan_parser(sub, common)
    _add_convert_parser(sub, common)
    _add_train_parser(sub, common)
    return p


# ---- running a command ---------------------------------------------------------------------------------------

class _Interrupted(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised where the program is, so it unwinds (and cleans up) like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise _Interrupted(signum)


def _expected() -> tuple[type, ...]:
    """The errors a command anticipates: bad input and damaged files (exit code 2)."""
    from .checkpoints.tensors import CheckpointError
    from .pipelines.conditioning import GenerationError
    from .runtime.parallel import ParallelError
    from .runtime.planner import PlanError

    return CommandError, GenerationError, CheckpointError, PlanError, ParallelError


def _run(args: argparse.Namespace) -> int:
    debug = getattr(args, "debug", False)
    try:
        return args.fn(args)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\nworldstream: interrupted ({name}); {getattr(args, 'interrupted', 'no video written')}",
              file=sys.stderr)
        return 128 + signum
    except Exception as e:  # noqa: BLE001 - every error ends as one line (the traceback only with --debug)
        if debug:
            traceback.print_exc()
        if isinstance(e, _expected()):
            return _fail(e)
        if isinstance(e, OSError) and e.filename:
            return _fail(f"{e.filename}: {e.strerror or e}")
        if isinstance(e, MemoryError):
            return _fail("out of host memory (MemoryError); lower --frame_num or the size, or set --ram", 1)
        hint = "" if debug else "; run again with --debug for the traceback"
        return _fail(f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}", 1)


def main(argv: list[str] | None = None) -> int:
    # Fewer fragmentation stalls when a run works close to its --vram budget (set before torch loads CUDA).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:       # --help, or a usage error already reported in one line
        return e.code if isinstance(e.code, int) else 2
    handlers = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):   # treated like Ctrl-C: the same unwinding and cleanup
        try:
            handlers[signum] = signal.signal(signum, _interrupt)
        except ValueError:    # not the main thread (an embedding program): leave its handlers alone
            pass
    try:
        return _run(args)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
