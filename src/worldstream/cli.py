"""`worldstream` command line: one sub-command per job."""
from __future__ import annotations

import argparse
import sys


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
    from .pipelines.conditioning import GenerationError
    from .pipelines.generate import run
    from .pipelines.tasks import prepare
    from .testing.world import (DEMO_ACTION_STRING, DEMO_PROMPT, DEMO_SCENE_SEED, WORLD_CHECKPOINT,
                                demo_first_frame)

    print(f"worldstream demo: a small LingBot-World Cam model ({WORLD_CHECKPOINT.name}, shipped with the package, "
          "trained on procedural 3D worlds) runs the whole generation path (umt5 text encoder, VAE, DiT with "
          "camera control, UniPC sampler, MP4): the first frame is a rendered world, the keys move the camera.")
    try:
        device = _device(args.device or "cpu")
        path = _output_path(args.save_file, "demo.mp4")
        prompt = DEMO_PROMPT if args.prompt is None else args.prompt
        seed = DEMO_SCENE_SEED if args.scene_seed is None else args.scene_seed
        image = demo_first_frame(prompt, seed)
        job = prepare(WORLD_CHECKPOINT, prompt, image=image, size=f"{image.width}*{image.height}",
                      frame_num=args.frame_num, action_string=args.action_string or DEMO_ACTION_STRING,
                      steps=args.sample_steps,
                      seed=args.base_seed, notice=lambda m: print(f"note: {m}"))
        print(job.describe())
        result = run(job, device=device, progress=True)
        _write_and_report(result, path)
    except GenerationError as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("\nworldstream: interrupted; no video written", file=sys.stderr)
        return 130
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import world

    if args.what != "world":
        return _fail(f"unknown training job {args.what!r}; known: world")
    return world.main(args.args)


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model: `worldstream train world --help` (the small LingBot-World "
                                     "Cam model and its VAE on procedural worlds, resumable)",
                       description="Training jobs. world: lingbot-cam-world and its VAE on rendered clips "
                                   "(the flags are those of python -m worldstream.train.world).")
    t.add_argument("what", choices=["world"], help="what to train")
    t.add_argument("args", nargs=argparse.REMAINDER, help="the job's flags (see `worldstream train world --help`)")
    t.set_defaults(fn=cmd_train)


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
        "demo", help="generate a short video of a procedural world with the small shipped model (CPU, seconds)",
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
    _add_plan_parser(sub)
    _add_convert_parser(sub)
    _add_train_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import os
    # Fewer fragmentation stalls when a run works close to its --vram budget (set before torch loads CUDA).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
