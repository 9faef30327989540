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
    args = p.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
