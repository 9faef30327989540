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

def _fail(msg: object) -> int:
    """Bad input: one `worldstream: error: ...` line on stderr, exit code 2, no traceback."""
    print(f"worldstream: error: {msg}", file=sys.stderr)
    return 2


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
    import re
    import time

    import torch

    from .checkpoints.tensors import CheckpointError
    from .pipelines.conditioning import GenerationError
    from .pipelines.generate import run
    from .pipelines.prompts import PromptCache
    from .pipelines.tasks import prepare
    from .runtime.planner import PlanError

    try:
        if args.ckpt_dir is None:
            raise GenerationError("--ckpt_dir is required (the folder with the downloaded checkpoint)")
        if args.prompt is None:
            raise GenerationError("--prompt is required")
        device = _device(args.device)
        vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
        if device.type == "cpu" and (vram or ram):
            print("note: --vram / --ram place the DiT on a GPU; on the CPU every weight stays in RAM")
        job = prepare(args.ckpt_dir, args.prompt, task=args.task, image=args.image, size=args.size,
                      frame_num=args.frame_num, action_path=args.action_path, action_string=args.action_string,
                      negative_prompt=args.negative_prompt, steps=args.sample_steps, shift=args.sample_shift,
                      guide_scale=args.sample_guide_scale, seed=args.base_seed, solver=args.sample_solver,
                      notice=lambda m: print(f"note: {m}"))
        slug = re.sub(r"[^A-Za-z0-9]+", "_", job.prompt)[:40].strip("_") or "video"
        name = f"{job.task}_{job.width}x{job.height}_{slug}_{time.strftime('%Y%m%d_%H%M%S')}.mp4"
        path = _output_path(args.save_file, name)
        print(job.describe())
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
        if args.vae_tile is not None and args.vae_tile < 2:
            raise GenerationError(f"--vae_tile must be at least 2 latent pixels, got {args.vae_tile}")
        result = run(job, device=device, dtype=dtype, t5_cpu=args.t5_cpu,
                     vae_cpu=args.vae_cpu, vae_tile=args.vae_tile, vram=vram, ram=ram, quant=args.quant,
                     attention=args.attention, fuse=_fuse_from_env(),
                     prompt_cache=None if args.no_prompt_cache else PromptCache())
        _write_and_report(result, path)
    except (GenerationError, CheckpointError, PlanError) as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("\nworldstream: interrupted; no video written", file=sys.stderr)
        return 130
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
    import re
    import tempfile
    import time

    import torch

    from .checkpoints.tensors import CheckpointError
    from .pipelines.conditioning import GenerationError
    from .pipelines.prompts import PromptCache
    from .pipelines.stream import format_chunk, open_session, prepare_stream, run_stream
    from .runtime.planner import PlanError
    from .testing.checkpoint import demo_image, write_tiny_checkpoint

    try:
        device = _device(args.device)
        vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
        with tempfile.TemporaryDirectory(prefix="worldstream-stream-") as tmp:
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
            slug = re.sub(r"[^A-Za-z0-9]+", "_", request.prompt)[:40].strip("_") or "stream"
            path = _output_path(args.save_file, f"stream_{request.width}x{request.height}_{slug}_"
                                                 f"{time.strftime('%Y%m%d_%H%M%S')}.mp4")
            print(request.describe())
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
            session = open_session(request, device=device, dtype=dtype, vram=vram, ram=ram, quant=args.quant,
                                   attention=args.attention, vae=args.vae, taehv=args.taehv,
                                   prompt_cache=None if args.no_prompt_cache else PromptCache())
            t0, frames = time.perf_counter(), 0
            try:
                for chunk in run_stream(session, request, path):
                    n = chunk.frames.shape[1]
                    frames += n
                    print(format_chunk(chunk, n), flush=True)
            finally:
                session.close()
            wall = time.perf_counter() - t0
            print(f"wrote {path}: {frames} frames {request.width}x{request.height}, H.264 16 fps; "
                  f"{wall:.1f} s ({frames / wall:.1f} FPS overall)")
    except (GenerationError, CheckpointError, PlanError) as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("\nworldstream: interrupted; no video written", file=sys.stderr)
        return 130
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
    st.set_defaults(fn=cmd_stream)


# ---- serve ---------------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    """A local web page to walk through a world in real time (serve/): load the student once, then serve."""
    import os

    import torch

    from .checkpoints.tensors import CheckpointError
    from .pipelines.conditioning import GenerationError
    from .pipelines.prompts import PromptCache
    from .runtime.planner import PlanError
    from .serve import Engine, ServeConfig, Server
    from .serve.config import is_loopback

    try:
        if args.ckpt_dir is not None and args.image is None:
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
        config = ServeConfig(host=args.host, port=args.port, token=args.token,
                             allow_origins=tuple(args.allow_origin or ()), max_sessions=args.max_sessions,
                             max_image_bytes=int(args.max_image_mb * (1 << 20)), jpeg_quality=args.jpeg_quality,
                             outputs=outputs)
        device = _device(args.device)
        vram, ram = _budget("--vram", args.vram), _budget("--ram", args.ram)
        if args.ckpt_dir is None:
            print("worldstream serve: no --ckpt_dir: a tiny built-in causal model with RANDOM weights (the page and "
                  "the whole path work; the video is coloured noise, not a world)")
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
        sessions = args.max_sessions or (1 if torch.device(device).type == "cuda" else 2)
        engine = Engine.load(args.ckpt_dir, prompt=args.prompt, image=args.image, size=args.size, device=device,
                             dtype=dtype, vram=vram, ram=ram, quant=args.quant, attention=args.attention,
                             vae=args.vae, taehv=args.taehv, steps=args.steps, window=args.window, sink=args.sink,
                             seed=args.base_seed, sessions=sessions,
                             prompt_cache=None if args.no_prompt_cache else PromptCache(),
                             notice=lambda m: print(f"note: {m}"))
    except (GenerationError, CheckpointError, PlanError, ValueError) as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("\nworldstream: interrupted", file=sys.stderr)
        return 130
    try:
        try:
            server = Server(engine, config, log_level=args.log_level)
        except OSError as e:
            return _fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
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


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser(
        "serve", help="a local web page to walk through a generated world in real time",
        description="Serve a causal LingBot student on a local web page: hold W/A/S/D, look with I/J/K/L or the "
                    "mouse, watch the world being generated. One session per browser tab (WebSocket), frames as "
                    "JPEG. Listens on 127.0.0.1 unless --host says otherwise (then a token is required). Without "
                    "--ckpt_dir a tiny built-in causal model (random weights) runs on the CPU.")
    a = sv.add_argument
    a("--ckpt_dir", help="checkpoint folder, as for `worldstream stream` (default: the tiny built-in model)")
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
    a("--base_seed", type=int, help="noise seed (default 42)")
    a("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    a("--dtype", choices=["bf16", "fp32"], help="DiT compute dtype (default bf16 on CUDA, fp32 on CPU)")
    a("--vram", help="GPU memory budget (weights + KV caches)")
    a("--ram", help="host RAM budget for the weights")
    a("--quant", choices=["fp8", "fp8-block", "int8"], help="compress the DiT's block linears while loading")
    a("--attention", choices=["sdpa", "8bit"], default="sdpa", help="self-attention kernel")
    a("--no_prompt_cache", action="store_true", help="do not read or store prompt embeddings")
    a("--log_level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
      help="server log level (default warning)")
    sv.set_defaults(fn=cmd_serve)


# ---- plan ----------------------------------------------------------------------------------------------------

def cmd_plan(args: argparse.Namespace) -> int:
    """Print what the planner would do for a model, a clip and a machine, without loading anything."""
    from .checkpoints.dit import find_checkpoint
    from .checkpoints.tensors import CheckpointError
    from .models.configs import get_config
    from .pipelines.conditioning import GenerationError
    from .runtime.memory import fmt_bytes
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
        block_bytes = None
        if args.quant:
            from .runtime.quant import quantized_block_bytes
            block_bytes = quantized_block_bytes(cfg, args.quant)
        p = plan(cfg, Workload(frames=frames, height=h, width=w, guidance=not args.no_cfg, experts=experts),
                 vram, ram, hw, block_bytes=block_bytes)
    except (GenerationError, CheckpointError, PlanError, KeyError, ValueError) as e:
        return _fail(e.args[0] if isinstance(e, KeyError) else e)
    print(f"{cfg.name}: {frames} frames at {w}x{h}, {'CFG' if not args.no_cfg else 'no CFG'}, "
          f"{experts} expert(s); weights {args.quant or 'bf16'}; budgets: VRAM "
          f"{fmt_bytes(vram) if vram else 'unlimited'}, RAM {fmt_bytes(ram) if ram else 'unlimited'}; "
          f"PCIe {args.pcie:.0f} GB/s, disk {args.disk:.1f} GB/s")
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
    _add_serve_parser(sub)
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
