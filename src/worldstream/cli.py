"""`worldstream` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def cmd_info(args: argparse.Namespace) -> int:
    from .models.configs import VARIANTS

    print(f"{'variant':18} {'params':>16} {'blocks':>6} {'block params':>13} {'bf16':>9} {'fp8':>9}  experts")
    for name, cfg in VARIANTS.items():
        nb, outside = cfg.param_counts()
        n = nb * cfg.num_layers + outside
        print(f"{name:18} {n:>16,} {cfg.num_layers:>6} {nb:>13,} {_gb(2 * n):>9} {_gb(n):>9}  {cfg.experts}")
    return 0


# ---- generate / demo ------------------------------------------------------------------------------------

def _rank() -> int:
    """This process's rank when torchrun started several (0 otherwise): only rank 0 speaks."""
    import os
    return int(os.environ.get("RANK", "0"))


def _fail(msg: object) -> int:
    """Bad input: one `worldstream: error: ...` line on stderr, exit code 2, no traceback. Of several processes
    (torchrun), every one fails with the same error and only rank 0 prints it."""
    if _rank() == 0:
        print(f"worldstream: error: {msg}", file=sys.stderr)
    return 2


def _interrupted(what: str = "no video written") -> int:
    if _rank() == 0:
        print(f"\nworldstream: interrupted; {what}", file=sys.stderr)
    return 130


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
    """`body(args, parallel)` with the parallel group set up first and left together at the end; known errors
    become one `worldstream: error:` line (rank 0), exit code 2 in every process."""
    from .checkpoints.tensors import CheckpointError
    from .pipelines.conditioning import GenerationError
    from .runtime.parallel import ParallelError
    from .runtime.planner import PlanError

    parallel = None
    try:
        parallel = _parallel(args)
        with _quiet_unless_first(parallel):
            code = body(args, parallel)
    except (GenerationError, CheckpointError, PlanError, ParallelError) as e:
        code = _fail(e)
    except KeyboardInterrupt:
        return _interrupted()
    if parallel is not None:   # (an unexpected error skips this: the process dies, torchrun stops the others)
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
    if n is not None and n <= 0:
        raise GenerationError(f"{flag} must be positive, got {text}")
    return n


def _output_path(save_file: str | None, default_name: str):
    """The MP4 path, its folder created and checked writable now (before any model is loaded)."""
    import os
    from pathlib import Path

    from .pipelines.conditioning import GenerationError

    path = Path(save_file) if save_file else Path("outputs") / default_name
    if path.is_dir():
        raise GenerationError(f"--save_file {path}: is a folder; give a file name like {path / default_name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenerationError(f"--save_file {path}: cannot create the folder {path.parent} ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise GenerationError(f"--save_file {path}: the folder {path.parent} is not writable")
    return path


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


def cmd_generate(args: argparse.Namespace) -> int:
    return _run_parallel_command(args, _generate)


def _generate(args: argparse.Namespace, parallel) -> int:
    import re
    import time

    import torch

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
        device = _device(args.device) if parallel is None else parallel.device
        vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
        if device.type == "cpu" and (vram or ram):
            print("note: --vram / --ram place the DiT on a GPU; on the CPU every weight stays in RAM")
        job = prepare(args.ckpt_dir, args.prompt, task=args.task, image=args.image, size=args.size,
                      frame_num=args.frame_num, action_path=args.action_path, action_string=args.action_string,
                      negative_prompt=args.negative_prompt, steps=args.sample_steps, shift=args.sample_shift,
                      guide_scale=args.sample_guide_scale, seed=args.base_seed, solver=args.sample_solver,
                      notice=lambda m: print(f"note: {m}"))
        if parallel is not None:
            check(job.ckpt.config, job.ckpt.config.tokens(job.frames, job.height, job.width), parallel.world,
                  f"{job.frames} frames at {job.width}x{job.height}")
        if args.vae_tile is not None and args.vae_tile < 2:
            raise GenerationError(f"--vae_tile must be at least 2 latent pixels, got {args.vae_tile}")
        return device, vram, ram, job

    device, vram, ram, job = everyone(validate)
    job.seed = once(lambda: job.seed)        # a random seed is drawn by each process: rank 0's counts
    slug = re.sub(r"[^A-Za-z0-9]+", "_", job.prompt)[:40].strip("_") or "video"
    name = f"{job.task}_{job.width}x{job.height}_{slug}_{time.strftime('%Y%m%d_%H%M%S')}.mp4"
    path = once(lambda: _output_path(args.save_file, name))
    print(job.describe() + (f"; Ulysses over {parallel.world} processes" if parallel is not None else ""))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    result = run(job, device=device, dtype=dtype, t5_cpu=args.t5_cpu,
                 vae_cpu=args.vae_cpu, vae_tile=args.vae_tile, vram=vram, ram=ram, quant=args.quant,
                 attention=args.attention, fuse=_fuse_from_env(),
                 prompt_cache=None if args.no_prompt_cache else PromptCache(), parallel=parallel)
    if result.frames is not None:            # rank 0 writes and reports
        _write_and_report(result, path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from .pipelines.conditioning import GenerationError
    from .pipelines.generate import run
    from .pipelines.tasks import prepare
    from .testing.checkpoint import DEMO_HEIGHT, DEMO_PROMPT, DEMO_VARIANT, DEMO_WIDTH, demo_image, write_demo_checkpoint

    print(f"worldstream demo: the whole generation path (umt5 text encoder, VAE, two-expert DiT with camera "
          f"control, UniPC sampler, MP4) on a tiny {DEMO_VARIANT} model.\n"
          "The weights are RANDOM: the video shows that the machinery runs, not a world. "
          "For real videos download a checkpoint and use `worldstream generate`.")
    try:
        device = _device(args.device or "cpu")
        path = _output_path(args.save_file, "demo.mp4")
        with tempfile.TemporaryDirectory(prefix="worldstream-demo-") as ckpt:
            write_demo_checkpoint(ckpt)
            job = prepare(ckpt, DEMO_PROMPT, image=demo_image(), size=f"{DEMO_WIDTH}*{DEMO_HEIGHT}",
                          frame_num=args.frame_num, action_string=args.action_string, steps=args.sample_steps,
                          seed=args.base_seed, notice=lambda m: print(f"note: {m}"))
            print(job.describe())
            result = run(job, device=device)
        _write_and_report(result, path)
    except GenerationError as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("\nworldstream: interrupted; no video written", file=sys.stderr)
        return 130
    return 0


def _add_generate_parser(sub) -> None:
    g = sub.add_parser(
        "generate", help="generate a video from a checkpoint (upstream generate.py flags)",
        description="Generate a video with Wan2.1 T2V, Wan2.2 I2V A14B or LingBot-World (Cam / Act) from their "
                    "official checkpoint folders. The model is detected from the weights; bad input is reported "
                    "before anything large is loaded.")
    a = g.add_argument
    a("--task", help="upstream task name, checked against the checkpoint: i2v-A14B (Wan2.2 I2V, LingBot-World), "
                     "t2v-14B, t2v-1.3B (Wan2.1), i2v-14B (Wan2.1 I2V: not supported yet). Default: detected")
    a("--ckpt_dir", help="checkpoint folder (DiT weights, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, "
                         "google/umt5-xxl/)")
    a("--prompt", help="what the video shows")
    a("--negative_prompt", default=None, help="what to steer away from (default: Wan's Chinese negative prompt)")
    a("--image", help="first frame (image-to-video models); the output keeps its aspect ratio")
    a("--size", help="width*height: 1280*720, 720*1280, 832*480, 480*832 (t2v-1.3B: 832*480, 480*832). "
                     "Image-to-video uses it as the pixel budget. Default 1280*720")
    a("--frame_num", type=int, help="frames, 4n+1 (others are rounded down with a notice). Default 81, or the "
                                    "length of --action_string")
    a("--action_path", help="LingBot-World: folder with poses.npy [N,4,4] and intrinsics.npy [N,4] "
                            "(Act models also action.npy [N,4] WASD)")
    a("--action_string", help="LingBot-World: keyboard schedule, e.g. 'w-10,iw-15,none-10' (W/A/S/D move, "
                              "I/K pitch, J/L yaw; <keys>-<frames> segments). Intrinsics from --action_path if "
                              "given, else a built-in 480x832 camera")
    a("--sample_steps", type=int, help="denoising steps (default: LingBot 70, Wan2.2 40, Wan2.1 T2V 50)")
    a("--sample_shift", type=float, help="flow schedule shift (default: LingBot 10, Wan 5)")
    a("--sample_guide_scale", type=_guide_scale,
      help="classifier-free guidance scale, or low,high for the two experts (default: LingBot 5, Wan2.2 3.5, "
           "Wan2.1 5); 1 skips the unconditional pass")
    a("--sample_solver", default="unipc", choices=["unipc", "euler"], help="sampler (default unipc)")
    a("--base_seed", type=int, help="noise seed; the same seed gives the same video (default: LingBot 42, "
                                    "others random, printed); -1 = default")
    a("--save_file", help="output .mp4 (default outputs/<task>_<size>_<prompt>_<time>.mp4)")
    a("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    a("--dtype", choices=["bf16", "fp32"], help="DiT compute dtype (default bf16 on CUDA, fp32 on CPU)")
    a("--vram", help="GPU memory budget for the DiT, e.g. 8GB or 24GiB: blocks that do not fit stream from "
                     "host RAM each step (slower, less VRAM). Default: the free memory of the device")
    a("--ram", help="host RAM budget, e.g. 32GB: blocks that do not fit are read from the checkpoint's "
                    "safetensors on disk each step (slower still). Default: no limit")
    a("--quant", choices=["fp8", "fp8-block", "int8"],
      help="compress the DiT's block linears to 8 bits while loading (half the bytes to hold and stream; "
           "fp8 uses fp8 matmuls on Ada/Hopper GPUs). A checkpoint from `worldstream convert` needs no flag")
    a("--attention", choices=["sdpa", "8bit"], default="sdpa",
      help="self-attention kernel: sdpa (default, exact bf16) or 8bit (int8 Q.K, fp8 P.V Triton kernels on "
           "Ada/Hopper: ~20%% faster attention at 81 frames, ~0.3-3%% error per attention; see README)")
    a("--t5_cpu", action="store_true", help="run the text encoder on the CPU: saves ~11 GB of VRAM, costs "
                                            "seconds to a minute of encoding (skipped for cached prompts)")
    a("--vae_cpu", action="store_true", help="run the VAE on the CPU: saves VRAM during encode/decode, costs "
                                             "minutes at 720p")
    a("--vae_tile", type=int, default=None, metavar="N",
      help="decode the video in overlapping spatial tiles of N x N latent pixels (e.g. 32): the VAE's working "
           "memory shrinks with the tile; tile borders are blended, so the result is close to, not equal to, "
           "the untiled decode")
    a("--no_prompt_cache", action="store_true", help="do not read or store prompt embeddings in "
                                                     "~/.cache/worldstream/prompts")
    a("--ulysses", type=int, default=None, metavar="N",
      help="split every DiT forward over N GPUs of this machine (Ulysses sequence parallelism): launch N "
           "processes with `torchrun --nproc_per_node N -m worldstream generate ... --ulysses N`. N must divide the "
           "attention heads (40: 2, 4, 5, 8). Rank 0 writes the video and reports")
    a("--offload_model", type=_str2bool, help="accepted for upstream compatibility and ignored: worldstream "
                                              "decides placement itself from --vram / --ram")
    a("--convert_model_dtype", action="store_true", help="accepted for upstream compatibility: weights are "
                                                         "always loaded in the compute dtype")
    g.set_defaults(fn=cmd_generate)


def _add_demo_parser(sub) -> None:
    d = sub.add_parser(
        "demo", help="run the whole pipeline on a tiny built-in model with RANDOM weights (CPU, seconds)",
        description="Write a tiny LingBot-World Cam checkpoint with random weights to a temp folder and run the "
                    "full generation path on it (text encoder, VAE, two DiT experts, camera from a keyboard "
                    "string, sampler, MP4). The video shows the machinery runs, not a world.")
    a = d.add_argument
    a("--action_string", default="w-8,jw-8", help="keyboard schedule driving the camera (default w-8,jw-8)")
    a("--frame_num", type=int, help="frames, 4n+1 (default: the length of --action_string, 17)")
    a("--sample_steps", type=int, help="denoising steps (default 70, LingBot's)")
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
    from .testing.checkpoint import demo_image, write_tiny_checkpoint

    everyone = (lambda fn: fn()) if parallel is None else parallel.everyone     # all check, all fail together
    once = (lambda fn: fn()) if parallel is None else parallel.from_first       # rank 0 does it, all get it
    with tempfile.TemporaryDirectory(prefix="worldstream-stream-") as tmp:

        def validate():
            device = _device(args.device) if parallel is None else parallel.device
            vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
            ckpt_dir, image, prompt = args.ckpt_dir, args.image, args.prompt
            if ckpt_dir is None:     # the built-in tiny causal student (random weights), as `demo` does
                print("worldstream stream: no --ckpt_dir: a tiny built-in causal model with RANDOM weights (it shows "
                      "the chunk loop runs, not a world)")
                ckpt_dir = write_tiny_checkpoint(Path(tmp), "lingbot-fast-v2-tiny", seed=0)
                image = image or demo_image()
                prompt = prompt or "A walk through a sunny field."
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
        path = once(lambda: _output_path(args.save_file, name))
        print(request.describe() + (f"; Ulysses over {parallel.world} processes" if parallel is not None else ""))
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
        first = parallel is None or parallel.first
        session = open_session(request, device=device, dtype=dtype, vram=vram, ram=ram, quant=args.quant,
                               attention=args.attention, vae=args.vae, taehv=args.taehv,
                               prompt_cache=None if args.no_prompt_cache else PromptCache(), parallel=parallel)
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


def _add_stream_parser(sub) -> None:
    st = sub.add_parser(
        "stream", help="run a causal (real-time) LingBot student chunk by chunk, as long as you like",
        description="Stream a LingBot-World Fast student (v1, v2 causal-fast 14B / 1.3B): chunks of latent frames "
                    "with a KV cache, 4 denoising steps + a refresh each, camera from the keys; the MP4 is written "
                    "as chunks are produced (it appears complete at the end). Without --ckpt_dir a tiny built-in "
                    "causal model (random weights) runs.")
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
    a("--base_seed", type=int, help="noise seed (default 42)")
    a("--save_file", help="output .mp4 (default outputs/stream_<size>_<prompt>_<time>.mp4)")
    a("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    a("--dtype", choices=["bf16", "fp32"], help="DiT compute dtype (default bf16 on CUDA, fp32 on CPU)")
    a("--vram", help="GPU memory budget (weights + KV cache); blocks that do not fit stream from host RAM")
    a("--ram", help="host RAM budget for the weights")
    a("--quant", choices=["fp8", "fp8-block", "int8"], help="compress the DiT's block linears while loading")
    a("--attention", choices=["sdpa", "8bit"], default="sdpa", help="self-attention kernel")
    a("--no_prompt_cache", action="store_true", help="do not read or store prompt embeddings")
    a("--ulysses", type=int, default=None, metavar="N",
      help="split every DiT forward over N GPUs of this machine (Ulysses sequence parallelism): launch N "
           "processes with `torchrun --nproc_per_node N -m worldstream stream ... --ulysses N`. N must divide the "
           "attention heads (40: 2, 4, 5, 8). Rank 0 writes the video and reports")
    st.set_defaults(fn=cmd_stream)


# ---- plan ----------------------------------------------------------------------------------------------------

def cmd_plan(args: argparse.Namespace) -> int:
    """Print what the planner would do for a model, a clip and a machine, without loading anything."""
    from .checkpoints.dit import find_checkpoint
    from .checkpoints.tensors import CheckpointError
    from .models.configs import get_config
    from .pipelines.conditioning import GenerationError
    import dataclasses

    from .runtime.memory import fmt_bytes
    from .runtime.parallel import check
    from .runtime.planner import Hardware, PlanError, Workload, plan

    try:
        if (args.ckpt_dir is None) == (args.variant is None):
            raise GenerationError("give exactly one of --ckpt_dir (a checkpoint folder) or --variant (a name "
                                  "from `worldstream info`)")
        if args.ckpt_dir:
            ckpt = find_checkpoint(args.ckpt_dir)
            cfg, experts = ckpt.config, len(ckpt.experts)
        else:
            cfg = get_config(args.variant)
            experts = cfg.experts
        try:
            w, h = (int(v) for v in args.size.split("*"))
        except ValueError:
            raise GenerationError(f"--size {args.size!r}: expected WIDTH*HEIGHT, e.g. 832*480") from None
        if h % 16 or w % 16:
            raise GenerationError(f"--size {args.size}: both sides must be multiples of 16")
        frames = args.frame_num
        if frames < 1:
            raise GenerationError(f"--frame_num must be positive, got {frames}")
        if (frames - 1) % 4:
            frames = (frames - 1) // 4 * 4 + 1
            print(f"note: --frame_num {args.frame_num} is not 4n+1; planning for {frames}", file=sys.stderr)
        vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
        hw = Hardware(pcie_bw=args.pcie * 1e9, disk_bw=args.disk * 1e9)
        if args.nvlink is not None:
            hw = dataclasses.replace(hw, p2p_bw=args.nvlink * 1e9)
        if args.gpus < 1:
            raise GenerationError(f"--gpus must be at least 1, got {args.gpus}")
        check(cfg, cfg.tokens(frames, h, w), args.gpus, f"{frames} frames at {w}x{h}", flag="--gpus")
        block_bytes = None
        if args.quant:
            from .runtime.quant import quantized_block_bytes
            block_bytes = quantized_block_bytes(cfg, args.quant)
        p = plan(cfg, Workload(frames=frames, height=h, width=w, guidance=not args.no_cfg, experts=experts),
                 vram, ram, hw, block_bytes=block_bytes, gpus=args.gpus)
    except (GenerationError, CheckpointError, PlanError, KeyError, ValueError) as e:
        return _fail(e.args[0] if isinstance(e, KeyError) else e)
    gpus = f"{args.gpus} GPUs (Ulysses), " if args.gpus > 1 else ""
    print(f"{cfg.name}: {frames} frames at {w}x{h}, {'CFG' if not args.no_cfg else 'no CFG'}, "
          f"{experts} expert(s); weights {args.quant or 'bf16'}; {gpus}budgets: VRAM "
          f"{fmt_bytes(vram) if vram else 'unlimited'}{' per GPU' if gpus else ''}, RAM "
          f"{fmt_bytes(ram) if ram else 'unlimited'}; PCIe {args.pcie:.0f} GB/s, disk {args.disk:.1f} GB/s"
          + (f", GPU-to-GPU {hw.p2p_bw / 1e9:.0f} GB/s" if gpus else ""))
    print(p.describe())
    return 0


def _add_plan_parser(sub) -> None:
    q = sub.add_parser("plan", help="show how a model would be placed under VRAM / RAM budgets",
                       description="Plan residency, prefetch and host tiers for one denoising step, and predict "
                                   "peak VRAM, peak host RAM and seconds per step. Nothing is loaded.")
    q.add_argument("--ckpt_dir", help="checkpoint folder (the variant is detected from its weights)")
    q.add_argument("--variant", help="a variant name from `worldstream info`, e.g. lingbot-cam")
    q.add_argument("--size", default="832*480", help="WIDTH*HEIGHT as in generate (default 832*480)")
    q.add_argument("--frame_num", type=int, default=81, help="frames, 4n+1 (default 81)")
    q.add_argument("--vram", help="VRAM budget, e.g. 8GB (default: unlimited)")
    q.add_argument("--ram", help="host RAM budget, e.g. 32GB (default: unlimited)")
    q.add_argument("--quant", choices=["fp8", "fp8-block", "int8"], help="plan for compressed block weights")
    q.add_argument("--no_cfg", action="store_true", help="one forward per step (guide scale 1 / distilled models)")
    q.add_argument("--gpus", type=int, default=1, help="GPUs of this machine sharing each forward (--ulysses N): "
                                                        "the plan is per GPU, --vram per GPU, --ram the machine's")
    q.add_argument("--nvlink", type=float, default=None, help="GPU-to-GPU all-to-all GB/s per GPU for --gpus "
                                                              "(default 300, assumed, not measured)")
    q.add_argument("--pcie", type=float, default=53.0, help="pinned host-to-device GB/s (default 53, H100 Gen5)")
    q.add_argument("--disk", type=float, default=1.5, help="disk read GB/s for the disk tier (default 1.5)")
    q.set_defaults(fn=cmd_plan)


# ---- convert -------------------------------------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    """Write a compressed copy of a checkpoint (runtime/convert.py)."""
    from .checkpoints.tensors import CheckpointError
    from .runtime.convert import convert

    if args.ckpt_dir is None or args.out is None or args.quant is None:
        return _fail("--ckpt_dir, --quant and --out are required")
    try:
        convert(args.ckpt_dir, args.out, args.quant, skip_first_last=args.skip_first_last)
    except (CheckpointError, ValueError) as e:
        return _fail(e)
    except OSError as e:
        return _fail(f"{e.filename or args.out}: {e.strerror or e}")
    except KeyboardInterrupt:
        print("\nworldstream: interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: use it as --ckpt_dir (no --quant needed)")
    return 0


def _add_convert_parser(sub) -> None:
    c = sub.add_parser(
        "convert", help="write a compressed (fp8 / int8) copy of a checkpoint, laid out for streaming",
        description="Quantize the DiT block linears of a checkpoint one block at a time and write one safetensors "
                    "file per block (plus the index json and config.json with a 'quantization' entry); the text "
                    "encoder, tokenizer and VAE are hard-linked. OUT is written in full or not at all.")
    c.add_argument("--ckpt_dir", help="source checkpoint folder")
    c.add_argument("--quant", help="fp8 (per-channel), fp8-block (128-column blocks) or int8 (per-channel)")
    c.add_argument("--out", help="new folder for the compressed checkpoint (must not exist)")
    c.add_argument("--skip_first_last", dest="skip_first_last", action="store_true", default=True,
                   help="keep the first and last blocks whole (default; they are the most sensitive)")
    c.add_argument("--no_skip_first_last", dest="skip_first_last", action="store_false",
                   help="compress the first and last blocks too")
    c.set_defaults(fn=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="worldstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list the model variants and their sizes").set_defaults(fn=cmd_info)
    _add_generate_parser(sub)
    _add_demo_parser(sub)
    _add_stream_parser(sub)
    _add_plan_parser(sub)
    _add_convert_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import os
    # Fewer fragmentation stalls when a run works close to its --vram budget (set before torch loads CUDA).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
