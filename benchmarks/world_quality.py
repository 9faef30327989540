"""How well the shipped small world model (`lingbot-cam-world`) predicts the procedural world it was trained on.

On held-out scenes (seeds from 1,000,000 on; training used seeds below 100,000) with their seeded random
keyboard trajectories (`world.render_clip`: mostly forward and turning), the ground truth is rendered and
the model generates the same 33 frames from the same first frame, trajectory and prompt (the scene's
description). Reported, per frame index and as means (over frames 1-32, the generated ones, and over all 33):

  * generated vs ground truth: PSNR and SSIM;
  * the camera-control ablation: the same generation with the camera input zeroed;
  * the "copy the first frame" baseline: ground-truth frame 0 repeated;
  * the VAE's reconstruction of the ground truth (encode + decode): the ceiling of any generation.

A strip PNG (ground truth / generated / camera zeroed, frames 0, 8, 16, 24, 32) is written for a few scenes.

    python benchmarks/world_quality.py                              # 50 scenes, CUDA if available
    python benchmarks/world_quality.py --device cpu --scenes 4      # a quick look on a CPU

`--distill` measures the causal 4-step student (`lingbot-fast-world`, train/distill.py; default the shipped
one) against its teacher and the ground truth instead (`distill_quality`, below): results to
benchmarks/results/distill_quality.json, a strip to docs/distill_strip.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from worldstream.testing.world import WORLD_CHECKPOINT, WorldModel, psnr, ssim
from worldstream.world import render_clip

STRIP_FRAMES = (0, 8, 16, 24, 32)


def strip_png(rows: list[tuple[str, torch.Tensor]], path: Path, scale: int = 2) -> None:
    """rows of (label, video [3, F, H, W] in [-1, 1]) -> one PNG: a labelled row of STRIP_FRAMES per video."""
    from PIL import Image, ImageDraw

    _, _, h, w = rows[0][1].shape
    label_w, gap = 120, 4
    img = Image.new("RGB", (label_w + len(STRIP_FRAMES) * (w * scale + gap), len(rows) * (h * scale + gap) + 16),
                    "white")
    d = ImageDraw.Draw(img)
    for j, f in enumerate(STRIP_FRAMES):
        d.text((label_w + j * (w * scale + gap) + 4, 2), f"frame {f}", fill="black")
    for i, (label, video) in enumerate(rows):
        top = 16 + i * (h * scale + gap)
        d.text((4, top + h * scale // 2 - 6), label, fill="black")
        for j, f in enumerate(STRIP_FRAMES):
            px = ((video[:, f].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            tile = Image.fromarray(px).resize((w * scale, h * scale), Image.NEAREST)
            img.paste(tile, (label_w + j * (w * scale + gap), top))
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", default=str(WORLD_CHECKPOINT))
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--seed_start", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=10, help="scenes generated together")
    p.add_argument("--steps", type=int, help="sampling steps (default: the variant's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/world_quality.json")
    p.add_argument("--strip", default="docs/world_strip.png")
    p.add_argument("--strip_scenes", type=int, default=3)
    p.add_argument("--distill", action="store_true", help="evaluate the causal student instead (see below)")
    p.add_argument("--student", help="--distill: a folder with the student's transformers/ (default: shipped)")
    p.add_argument("--teacher_steps", type=int, default=50, help="--distill: the teacher's sampling steps")
    p.add_argument("--guide", type=float, default=1.0,
                   help="--distill: the teacher's classifier-free guidance against the empty prompt (default 1: "
                        "none; > 1 needs a teacher trained with --prompt_dropout)")
    p.add_argument("--long_scenes", type=int, default=2, help="--distill: scenes of the 333-frame rollout")
    p.add_argument("--long_frames", type=int, default=333, help="--distill: frames of the long rollout")
    p.add_argument("--decoder", choices=["vae", "tiny"], default="vae",
                   help="--distill: the student's frames from the VAE (default) or its own tiny decoder "
                        "(decoder.safetensors in the student folder; the teacher always uses the VAE)")
    args = p.parse_args(argv)
    if args.distill:
        return distill_quality(args)

    device = torch.device(args.device)
    t_start = time.perf_counter()
    model = WorldModel.load(args.ckpt_dir, device)
    cfg = model.config
    w, h = cfg.trained_size
    frames = cfg.sampling.frame_num
    fast = dict(frame_batch=frames, ray_box_elements=1 << 25) if device.type == "cuda" else {}
    per = {k: [] for k in ("gen", "camzero", "copy", "vae")}
    per_ssim = {k: [] for k in per}
    strip_rows = []
    seeds = list(range(args.seed_start, args.seed_start + args.scenes))
    for i in range(0, len(seeds), args.batch):
        chunk = seeds[i:i + args.batch]
        clips = [render_clip(s, frames, h, w, device=device, **fast) for s in chunk]
        gt = torch.stack([c["frames"].to(device).transpose(0, 1) for c in clips])      # [B, 3, F, H, W]
        first = gt[:, :, 0]
        poses = [c["poses"] for c in clips]
        prompts = [c["prompt"] for c in clips]
        gen = model.generate(first, poses, prompts, chunk, steps=args.steps, frames=frames)
        camzero = model.generate(first, poses, prompts, chunk, steps=args.steps, frames=frames, zero_camera=True)
        with torch.no_grad():
            vae = model.vae.decode(model.vae.encode(gt))
        copy = first[:, :, None].expand_as(gt)
        for name, video in (("gen", gen), ("camzero", camzero), ("copy", copy), ("vae", vae)):
            a, b = video.transpose(1, 2), gt.transpose(1, 2)                          # [B, F, 3, H, W]
            per[name].append(psnr(a, b).cpu())
            per_ssim[name].append(ssim(a, b).cpu())
        if len(strip_rows) < 3 * args.strip_scenes:
            for j in range(min(len(chunk), args.strip_scenes - len(strip_rows) // 3)):
                strip_rows += [(f"truth {chunk[j]}", gt[j]), ("generated", gen[j]), ("camera zeroed", camzero[j])]
        print(f"{i + len(chunk)}/{len(seeds)} scenes, {time.perf_counter() - t_start:.0f} s; generated frames "
              f"1-32 so far {torch.cat(per['gen'])[:, 1:].mean():.2f} dB", file=sys.stderr, flush=True)

    res = {"checkpoint": str(args.ckpt_dir), "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else "cpu", "scenes": len(seeds), "seed_start": args.seed_start,
           "frames": frames, "size": f"{w}x{h}", "steps": args.steps or cfg.sampling.steps,
           "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t_start, 1)}
    for name in per:
        ps, ss = torch.cat(per[name]), torch.cat(per_ssim[name])       # [scenes, F]
        finite = torch.isfinite(ps)
        res[name] = {
            "psnr_per_frame": [round(v, 2) for v in ps.where(finite, torch.nan).nanmean(0).tolist()],
            "ssim_per_frame": [round(v, 4) for v in ss.mean(0).tolist()],
            "psnr_1_32": round(ps[:, 1:].mean().item(), 2),
            "ssim_1_32": round(ss[:, 1:].mean().item(), 4),
            "psnr_all": round(ps.mean().item(), 2) if name != "copy" else None,   # copy: frame 0 is exact
            "ssim_all": round(ss.mean().item(), 4),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if args.strip and strip_rows:
        Path(args.strip).parent.mkdir(parents=True, exist_ok=True)
        strip_png(strip_rows, Path(args.strip))

    print(f"\n{res['scenes']} held-out scenes, {frames} frames {w}x{h}, {res['steps']} steps, {res['device']}, "
          f"{res['seconds']} s")
    print("| | PSNR frames 1-32 (dB) | PSNR all 33 | SSIM frames 1-32 |\n|---|---|---|---|")
    names = {"gen": "generated", "camzero": "camera zeroed (ablation)", "copy": "copy the first frame",
             "vae": "VAE reconstruction"}
    for k, label in names.items():
        r = res[k]
        all_ = f"{r['psnr_all']:.2f}" if r["psnr_all"] is not None else "inf (frame 0 exact)"
        print(f"| {label} | {r['psnr_1_32']:.2f} | {all_} | {r['ssim_1_32']:.3f} |")
    idx = [1, 4, 8, 16, 24, 32]
    print("\nPSNR by frame index: " + ", ".join(f"{i}: {res['gen']['psnr_per_frame'][i]:.1f}/"
                                              f"{res['camzero']['psnr_per_frame'][i]:.1f}/"
                                              f"{res['copy']['psnr_per_frame'][i]:.1f}" for i in idx)
          + " (generated / camera zeroed / copy)")
    print(f"wrote {out}" + (f" and {args.strip}" if args.strip else ""))
    return 0


# ---------------------------------------------------------------------------------------------- the student

def student_rollout(runner, ckpt, vae, context: torch.Tensor, first: torch.Tensor, camera: torch.Tensor, seed: int,
                    chunks: int, timing: bool = False, decoder=None):
    """The causal student through the real-time chunk loop (pipelines/realtime.py) with the whole clip's camera
    given up front (the teacher's conditioning): video [3, F, H, W] and the seconds of each chunk's parts.
    `decoder`: what turns latents into frames (default the VAE)."""
    from worldstream.pipelines.realtime import RealtimeSession

    h, w = first.shape[1:]
    session = RealtimeSession(runner, ckpt.config, vae, decoder or vae, context, first, h, w, seed=seed, camera=camera,
                              device=first.device, timing=timing)
    frames, seconds = [], []
    for _ in range(chunks):
        t0 = time.perf_counter()
        chunk = session.step()
        frames.append(chunk.frames)
        seconds.append(dict(chunk.seconds, total=time.perf_counter() - t0))
    return torch.cat(frames, dim=1), seconds


def distill_quality(args) -> int:
    """The student (4 steps + refresh, no CFG, chunks of 3 latent frames, KV window 9 with sink 3) vs its
    teacher (`--teacher_steps` UniPC steps, CFG `--guide`: 1, none, by default) vs the ground truth, on held-out
    scenes:

      * PSNR / SSIM per frame over 33 frames (student, teacher, the copy-first-frame baseline);
      * DiT forwards per frame (each frame's latents go through this many network evaluations);
      * a long rollout (`--long_frames`, 10x the training length) with the rolling window + sink: PSNR per
        frame vs the rendered truth, and the drift = mean PSNR of frames 300-330 minus that of frames 0-33;
      * speed on this device: seconds per chunk (DiT forwards, refresh, decode) in steady state -> FPS.
    """
    import tempfile

    from worldstream.checkpoints.dit import find_checkpoint
    from worldstream.models import camera as cam
    from worldstream.runtime.planner import Workload
    from worldstream.runtime.runner import build_runner
    from worldstream.testing.world import WORLD_STUDENT, student_checkpoint

    device = torch.device(args.device)
    t_start = time.perf_counter()
    teacher = WorldModel.load(args.ckpt_dir, device)
    tmp = tempfile.TemporaryDirectory(prefix="worldstream-student-")
    root = student_checkpoint(tmp.name, args.student or WORLD_STUDENT, args.ckpt_dir)
    ckpt = find_checkpoint(root, fast=True)
    cfg, rt = ckpt.config, ckpt.config.realtime
    runner = build_runner(ckpt, device, torch.float32 if device.type == "cpu" else torch.bfloat16,
                          Workload(guidance=False))
    vae = teacher.vae
    decoder = None
    if args.decoder == "tiny":
        from worldstream.checkpoints.tiny_decoder import DECODER_FILE, load_tiny_decoder
        if not (root / DECODER_FILE).is_file():
            raise SystemExit(f"--decoder tiny: the student folder has no {DECODER_FILE}")
        decoder = load_tiny_decoder(root / DECODER_FILE, device=device, latent_channels=cfg.latents.channels,
                                    dtype=torch.float32 if device.type == "cpu" else torch.float16)
    w, h = cfg.trained_size
    frames = 33
    chunk_frames = rt.chunk * cfg.latents.stride[0]
    chunks = -(-cfg.latents.latent_frames(frames) // rt.chunk)
    fast = dict(frame_batch=frames, ray_box_elements=1 << 25) if device.type == "cuda" else {}
    per = {k: [] for k in ("student", "teacher", "copy")}
    per_ssim = {k: [] for k in per}
    strip_rows, timings = [], []
    seeds = list(range(args.seed_start, args.seed_start + args.scenes))
    for n, seed in enumerate(seeds):
        clip = render_clip(seed, frames, h, w, device=device, **fast)
        gt = clip["frames"].to(device).transpose(0, 1)                                   # [3, F, H, W]
        first = gt[:, 0]
        t_teacher = time.perf_counter()
        teach = teacher.generate(first[None], [clip["poses"]], [clip["prompt"]], [seed], steps=args.teacher_steps,
                                 frames=frames, guide=args.guide)[0]
        t_teacher = time.perf_counter() - t_teacher
        camera = cam.camera_condition(clip["poses"], cam.DEFAULT_INTRINSICS, frames, h, w, truncate=False)
        context = teacher.encode_text([clip["prompt"]])[0]
        stud, sec = student_rollout(runner, ckpt, vae, context, first, camera, seed, chunks, timing=True,
                                     decoder=decoder)
        stud = stud[:, :frames]
        timings += sec[1:]
        for name, video in (("student", stud), ("teacher", teach), ("copy", first[:, None].expand_as(gt))):
            a, b = video.transpose(0, 1), gt.transpose(0, 1)
            per[name].append(psnr(a, b).cpu())
            per_ssim[name].append(ssim(a, b).cpu())
        if n < args.strip_scenes:
            strip_rows += [(f"truth {seed}", gt), ("teacher", teach), ("student", stud)]
        print(f"{n + 1}/{len(seeds)} scenes, {time.perf_counter() - t_start:.0f} s (teacher {t_teacher:.1f} s); "
              f"frames 1-32 so far: student {torch.stack(per['student'])[:, 1:].mean():.2f} dB, teacher "
              f"{torch.stack(per['teacher'])[:, 1:].mean():.2f} dB", file=sys.stderr, flush=True)

    # the long rollout: 10x the training length, the window rolling over with the sink kept
    long_psnr = []
    for seed in seeds[:args.long_scenes]:
        clip = render_clip(seed, args.long_frames, h, w, device=device, **fast)
        gt = clip["frames"].to(device).transpose(0, 1)
        camera = cam.camera_condition(clip["poses"], cam.DEFAULT_INTRINSICS, args.long_frames, h, w, truncate=False)
        context = teacher.encode_text([clip["prompt"]])[0]
        n_chunks = -(-camera.shape[1] // rt.chunk)
        camera = torch.cat([camera, camera[:, -1:].expand(-1, n_chunks * rt.chunk - camera.shape[1], -1, -1)], 1)
        video, sec = student_rollout(runner, ckpt, vae, context, gt[:, 0], camera, seed, n_chunks, timing=True,
                                     decoder=decoder)
        timings += sec[1:]
        long_psnr.append(psnr(video[:, :args.long_frames].transpose(0, 1), gt.transpose(0, 1)).cpu())
        print(f"long rollout of scene {seed}: {args.long_frames} frames, {time.perf_counter() - t_start:.0f} s",
              file=sys.stderr, flush=True)

    res = {"student": str(args.student or WORLD_STUDENT), "teacher": str(args.ckpt_dir), "decoder": args.decoder,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({torch.get_num_threads()} threads)",
           "scenes": len(seeds), "seed_start": args.seed_start, "frames": frames, "size": f"{w}x{h}",
           "teacher_steps": args.teacher_steps, "date": time.strftime("%Y-%m-%d"),
           "student_schedule": {"chunk_latent_frames": rt.chunk, "steps": len(rt.step_indices), "shift": rt.shift,
                                "window": rt.window, "sink": rt.sink},
           "teacher_guide": args.guide,
           # each frame's latents pass through: the teacher's steps (x2 with CFG), the student's steps + the refresh
           "forwards_per_frame": {"teacher": args.teacher_steps * (2 if args.guide != 1.0 else 1),
                                  "teacher_with_cfg": 2 * args.teacher_steps,
                                  "student": len(rt.step_indices) + 1}}
    for name in per:
        ps, ss = torch.stack(per[name]), torch.stack(per_ssim[name])
        res[name] = {"psnr_per_frame": [round(v, 2) for v in ps.mean(0).tolist()],
                     "ssim_per_frame": [round(v, 4) for v in ss.mean(0).tolist()],
                     "psnr_1_32": round(ps[:, 1:].mean().item(), 2), "ssim_1_32": round(ss[:, 1:].mean().item(), 4)}
    res["student_minus_teacher_db"] = round(res["student"]["psnr_1_32"] - res["teacher"]["psnr_1_32"], 2)
    if long_psnr:
        lp = torch.stack(long_psnr)                                   # [scenes, F]
        head, tail = lp[:, 1:33].mean().item(), lp[:, 300:330].mean().item()
        res["long"] = {"frames": args.long_frames, "scenes": len(long_psnr),
                       "psnr_per_30_frames": [round(lp[:, i:i + 30].mean().item(), 2)
                                              for i in range(0, lp.shape[1], 30)],
                       "psnr_1_33": round(head, 2), "psnr_300_330": round(tail, 2), "drift_db": round(tail - head, 2)}
    keys = [k for k in timings[0] if k != "total"] if timings else []
    if timings:
        mean = {k: sum(t[k] for t in timings) / len(timings) for k in keys + ["total"]}
        dit = sum(v for k, v in mean.items() if k.startswith("forward") or k == "refresh")
        res["speed"] = {"chunks": len(timings), "video_frames_per_chunk": chunk_frames,
                        "seconds_per_chunk": {k: round(v, 4) for k, v in mean.items()},
                        "fps_dit": round(chunk_frames / dit, 1),
                        "fps_dit_decode": round(chunk_frames / (dit + mean.get("decode", 0.0)), 1),
                        "fps_total": round(chunk_frames / mean["total"], 1)}
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out if args.out != "benchmarks/results/world_quality.json" else
               "benchmarks/results/distill_quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    strip = Path(args.strip if args.strip != "docs/world_strip.png" else "docs/distill_strip.png")
    if strip_rows:
        strip.parent.mkdir(parents=True, exist_ok=True)
        strip_png(strip_rows, strip)
    runner.close()
    tmp.cleanup()

    print(f"\n{len(seeds)} held-out scenes, {frames} frames {w}x{h}, {res['device']}, {res['seconds']} s")
    print("| | PSNR frames 1-32 (dB) | SSIM frames 1-32 | DiT forwards per frame |\n|---|---|---|---|")
    fw = res["forwards_per_frame"]
    cfg_note = f", CFG {args.guide:g}" if args.guide != 1.0 else ""
    for k, label, f in (("teacher", f"teacher, {args.teacher_steps} steps{cfg_note}", fw["teacher"]),
                        ("student", "student, 4 steps + refresh", fw["student"]), ("copy", "copy the first frame", 0)):
        print(f"| {label} | {res[k]['psnr_1_32']:.2f} | {res[k]['ssim_1_32']:.3f} | {f} |")
    if "long" in res:
        print(f"long rollout ({args.long_frames} frames): PSNR 1-33 {res['long']['psnr_1_33']:.2f} dB, 300-330 "
              f"{res['long']['psnr_300_330']:.2f} dB, drift {res['long']['drift_db']:+.2f} dB")
    if "speed" in res:
        print(f"speed: {res['speed']['seconds_per_chunk']} -> {res['speed']['fps_dit']} FPS DiT, "
              f"{res['speed']['fps_dit_decode']} FPS DiT + decode, {res['speed']['fps_total']} FPS overall")
    print(f"wrote {out} and {strip}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
