"""Train the tiny decoder (models/tiny_decoder.py) of the tiny world: the shipped VAE's latents -> frames.

    worldstream train decoder --out runs/dec --minutes 2.5                       # on a GPU
    worldstream train decoder --out runs/dec2 --resume runs/dec --minutes 2      # continue
    worldstream train decoder --out runs/cpu --preset smoke                      # the whole loop on a CPU, seconds

1. **Clips**: 33-frame 96x160 clips of procedural worlds (`world.render_clip`, as `train world` renders them,
   on the device), seeds from `--pool_start` on, at most `--pool_clips` in at most `--pool_seconds`. Seeds of
   1,000,000 and up are held out for evaluation and refused here.
2. **Latents**: each clip encoded once by the tiny world's VAE (`assets/tiny_world/Wan2.1_VAE.pth`, frozen):
   the normalized latents the DiT makes, so the decoder learns exactly the input it will get.
3. **Decoder**: whole clips (9 latents -> 33 frames, from the start of a stream, as a stream decodes them),
   loss MSE + `--l1`·L1 against the rendered frames, plus `--vae_weight`·MSE against the Wan VAE decoder's
   output on the same latents (default 0: the truth alone). AdamW, linear warm-up, cosine decay to 10% over
   this run's `--minutes`, gradient norm clipped at 1, bf16 autocast on CUDA.

State (`--out`), written every `--save_minutes` and at the end: `log.json` (settings, steps, training seconds,
the loss curve, events, the evaluation when asked for), `train_state.safetensors` (the float32 weights and the
optimizer's moments: with log.json, what `--resume` needs; the pool is rendered again, same seeds) and
`decoder.safetensors` (float16, what a model folder ships). `--eval_clips N`
measures the decoder and the VAE's own decoder on N held-out worlds at the end (`evaluate`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints.tiny_decoder import DECODER_FILE, save_tiny_decoder
from ..checkpoints.vae import VAE_FILE, load_vae
from ..files import atomic_write
from ..models.tiny_decoder import TinyDecoder, TinyDecoderConfig
from ..testing.world import WORLD_CHECKPOINT
from ..world import scene as world
from .world import EVAL_SEED_START, Bar, psnr_of_mse, to_video

TRAIN_STATE = "train_state.safetensors"


@dataclass
class DecoderSettings:
    height: int = 96
    width: int = 160
    frames: int = 33                       # per clip: 1 + 4k
    vae: str = str(WORLD_CHECKPOINT / VAE_FILE)
    widths: tuple[int, ...] = TinyDecoderConfig.widths
    blocks: tuple[int, ...] = TinyDecoderConfig.blocks
    head_width: int = TinyDecoderConfig.head_width
    seed: int = 0
    pool_start: int = 0
    pool_clips: int = 4096
    pool_seconds: float = 30.0
    minutes: float = 2.5                   # training time of this run (pool and evaluation not counted)
    batch: int = 16                        # whole clips per step
    lr: float = 2e-3
    warmup: int = 100                      # steps (a resumed run keeps its optimizer moments: none then)
    l1: float = 0.05
    vae_weight: float = 0.0
    save_minutes: float = 1.0
    eval_clips: int = 0                    # held-out worlds measured at the end (0: none)
    eval_cpu_threads: int = 2              # torch threads for the CPU decode timing (this project's CPU has 2)

    def __post_init__(self):
        if self.frames % 4 != 1 or self.frames < 5:
            raise ValueError(f"--frames {self.frames}: 1 + 4k frames, at least 5")
        if self.height % 8 or self.width % 8:
            raise ValueError(f"--height/--width must be multiples of 8, got {self.height}x{self.width}")
        if self.pool_start < 0 or self.pool_start + self.pool_clips > EVAL_SEED_START:
            raise ValueError(f"training seeds must stay below {EVAL_SEED_START} (held out for evaluation): "
                             f"--pool_start {self.pool_start} + --pool_clips {self.pool_clips}")
        if self.batch < 1 or self.pool_clips < 1 or self.minutes < 0 or self.lr <= 0:
            raise ValueError("--batch and --pool_clips must be >= 1, --minutes >= 0, --lr > 0")

    def decoder_config(self) -> TinyDecoderConfig:
        return TinyDecoderConfig(widths=tuple(self.widths), blocks=tuple(self.blocks), head_width=self.head_width)


PRESETS = {
    # the whole loop on a CPU in seconds: a few small clips, a few steps, a micro evaluation
    "smoke": dict(frames=9, pool_clips=4, pool_seconds=20.0, minutes=0.1, batch=2, warmup=2, eval_clips=2,
                  save_minutes=0.05),
}


# ---------------------------------------------------------------------------------------------- data

def render_clips(seeds, s: DecoderSettings, device, deadline: float | None = None
                 ) -> tuple[torch.Tensor, list[int]]:
    """uint8 frames [N, F, 3, H, W] on `device` of the clips of `seeds` (stops at `deadline`, a perf_counter)."""
    device = torch.device(device)
    fast = dict(frame_batch=s.frames, ray_box_elements=1 << 25) if device.type == "cuda" else {}
    out, done = [], []
    for seed in seeds:
        clip = world.render_clip(seed, s.frames, s.height, s.width, device=device, **fast)
        out.append(((clip["frames"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        done.append(seed)
        if deadline is not None and time.perf_counter() > deadline:
            break
    return torch.stack(out), done


@torch.no_grad()
def encode_clips(vae, frames_u8: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The VAE's normalized latents [N, z, T, h, w] (float32) of uint8 clips [N, F, 3, H, W]."""
    return torch.cat([vae.encode(to_video(frames_u8[i:i + batch].to(vae.device)))
                      for i in range(0, len(frames_u8), batch)])


@torch.no_grad()
def vae_decode_clips(vae, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """The VAE decoder's frames of `latents` as uint8 [N, F, 3, H, W] (the `--vae_weight` targets)."""
    out = []
    for i in range(0, len(latents), batch):
        video = vae.decode(latents[i:i + batch])
        out.append(((video.permute(0, 2, 1, 3, 4) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- state

def _save_train_state(path: Path, model: TinyDecoder, opt: torch.optim.Optimizer) -> None:
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"opt.{names[id(p)]}.{k}"] = v.detach().float().cpu().reshape(v.shape).contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def _load_train_state(path: Path, model: TinyDecoder, opt: torch.optim.Optimizer) -> None:
    from safetensors.torch import load_file
    sd = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    for key, v in sd.items():
        if key.startswith("opt."):
            name, _, slot = key[4:].rpartition(".")
            p = params[name]
            opt.state[p][slot] = v.to(p.device) if slot != "step" else v.reshape(())


# ---------------------------------------------------------------------------------------------- training

@dataclass
class Run:
    """What a run has done (log.json)."""
    settings: dict
    steps: int = 0
    seconds: float = 0.0
    curve: list = field(default_factory=list)        # [step, train seconds, mse, psnr dB]
    events: list = field(default_factory=list)
    evaluation: dict | None = None


class DecoderTrainer:
    def __init__(self, s: DecoderSettings, out: Path, device, resume: Path | None = None, log=None):
        self.s, self.out, self.log = s, Path(out), log or (lambda msg: print(msg, flush=True))
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(s.seed)
        self.model = TinyDecoder(s.decoder_config()).to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.run = Run(asdict(s))
        self.resumed = False
        if resume is not None:
            saved = json.loads((Path(resume) / "log.json").read_text())
            if saved["settings"].get("widths") != list(s.widths) or saved["settings"].get("blocks") != list(s.blocks) \
                    or saved["settings"].get("head_width") != s.head_width:
                raise ValueError(f"--resume {resume}: a decoder of another shape ({saved['settings']['widths']}, "
                                 f"{saved['settings']['blocks']})")
            _load_train_state(Path(resume) / TRAIN_STATE, self.model, self.opt)
            self.run.steps, self.run.seconds = saved["steps"], saved["seconds"]
            self.run.curve, self.run.events = saved["curve"], saved["events"]
            self.resumed = True
            self.event(f"resumed from {resume}: step {self.run.steps}, {self.run.seconds:.0f} s trained")
        self.vae = load_vae(s.vae, device=self.device)

    def event(self, msg: str) -> None:
        self.run.events.append(msg)
        self.log(msg)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)

    def prepare(self) -> None:
        s = self.s
        t0 = time.perf_counter()
        self.frames, seeds = render_clips(range(s.pool_start, s.pool_start + s.pool_clips), s, self.device,
                                          deadline=t0 + s.pool_seconds)
        t1 = time.perf_counter()
        latents = encode_clips(self.vae, self.frames)
        self.use_pool(self.frames, latents, vae_decode_clips(self.vae, latents) if s.vae_weight > 0 else None)
        self.event(f"pool: {len(seeds)} clips (seeds {seeds[0]}..{seeds[-1]}) rendered in {t1 - t0:.1f} s "
                   f"({1000 * (t1 - t0) / len(seeds):.0f} ms/clip), encoded{' and VAE-decoded' if self.targets is not None else ''} "
                   f"in {time.perf_counter() - t1:.1f} s; latents {tuple(self.latents.shape[1:])}")

    def use_pool(self, frames_u8: torch.Tensor, latents: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Train on these clips: uint8 frames [N, F, 3, H, W], their latents [N, z, T, h, w] and, for
        `--vae_weight`, the VAE decoder's frames (uint8, like `frames_u8`)."""
        if len(frames_u8) != len(latents) or frames_u8.shape[1] != 4 * (latents.shape[2] - 1) + 1:
            raise ValueError(f"frames {tuple(frames_u8.shape)} do not match latents {tuple(latents.shape)}")
        self.frames, self.latents, self.targets = frames_u8.to(self.device), latents.to(self.device), targets
        if targets is not None:
            self.targets = targets.to(self.device)

    def loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mse vs truth) of the clips `idx` of the pool."""
        truth = to_video(self.frames[idx])
        with self.autocast():
            out = self.model(self.latents[idx])
        out = out.float()
        mse = F.mse_loss(out, truth)
        loss = mse + self.s.l1 * (out - truth).abs().mean()
        if self.targets is not None:
            loss = loss + self.s.vae_weight * F.mse_loss(out, to_video(self.targets[idx]))
        return loss, mse

    def train(self) -> None:
        s, run = self.s, self.run
        budget = s.minutes * 60
        g = torch.Generator().manual_seed(s.seed * 7919 + run.steps)
        n = len(self.latents)
        bar = Bar("decoder", budget)
        t0 = last_save = time.perf_counter()
        steps0, window, skipped = run.steps, [], 0
        warmup = 0 if self.resumed else s.warmup
        while (el := time.perf_counter() - t0) < budget:
            k = run.steps - steps0
            lr = s.lr * min(1.0, (k + 1) / max(1, warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * el / budget)))
            for group in self.opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(n, (min(s.batch, n),), generator=g).to(self.frames.device)
            loss, mse = self.loss(idx)
            self.opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):              # skip the step; give up only if it keeps happening
                skipped += 1
                if skipped > 20:
                    raise FloatingPointError(f"step {run.steps}: the loss is {loss.item()} (20 steps skipped)")
                continue
            skipped = 0
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            run.steps += 1
            window.append(mse.detach())
            if len(window) == 10 or time.perf_counter() - t0 >= budget:
                m = torch.stack(window).mean().item()
                window = []
                if not math.isfinite(m):
                    raise FloatingPointError(f"step {run.steps}: the loss is {m}")
                run.curve.append([run.steps, round(run.seconds + time.perf_counter() - t0, 2), m,
                                  round(psnr_of_mse(m), 3)])
            if run.curve:
                bar.update(run.steps, f"mse {run.curve[-1][2]:.5f} ({run.curve[-1][3]:.2f} dB) lr {lr:.2e}")
            if time.perf_counter() - last_save > s.save_minutes * 60:
                self.save(run.seconds + time.perf_counter() - t0)
                last_save = time.perf_counter()
        bar.close()
        self.model.eval()
        trained = time.perf_counter() - t0
        self.event(f"trained {run.steps - steps0} steps in {trained:.0f} s ({1000 * trained / max(1, run.steps - steps0):.0f} "
                   f"ms/step, batch {min(s.batch, n)} clips of {s.frames} frames)"
                   + (f"; last mse {run.curve[-1][2]:.5f} ({run.curve[-1][3]:.2f} dB)" if run.curve else ""))
        run.seconds += trained
        self.save()

    def save(self, seconds: float | None = None) -> None:
        """State, weights and log; `seconds`: training time so far when saving mid-run (default: the run's)."""
        data = asdict(self.run)
        data["seconds"] = round(self.run.seconds if seconds is None else seconds, 2)
        _save_train_state(self.out / TRAIN_STATE, self.model, self.opt)
        save_tiny_decoder(self.model, self.out / DECODER_FILE,
                          extra={"steps": str(self.run.steps), "trained_seconds": f"{data['seconds']:.0f}"})
        atomic_write(self.out / "log.json", lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


# ---------------------------------------------------------------------------------------------- evaluation

def _cpu_ms_per_frame(decoder, latents: torch.Tensor, chunk: int = 3, repeats: int = 2) -> float:
    """CPU float32 decode time per frame, chunk by chunk as a stream decodes (chunks of `chunk` latents), the
    first chunk (warm-up, 3 trimmed frames) not counted; best of `repeats` passes."""
    best = float("inf")
    for _ in range(repeats):
        state = decoder.decoder_state()
        frames, state = decoder.decode_chunk(latents[:, :, :chunk], state)
        t, n = time.perf_counter(), 0
        for s in range(chunk, latents.shape[2] - chunk + 1, chunk):
            frames, state = decoder.decode_chunk(latents[:, :, s:s + chunk], state)
            n += frames.shape[2]
        if n:
            best = min(best, (time.perf_counter() - t) / n)
    return 1000 * best


@torch.no_grad()
def evaluate(decoder: TinyDecoder, vae, s: DecoderSettings, clips: int, device, log=None,
             strip: str | Path | None = None) -> dict:
    """PSNR against the rendered truth on `clips` held-out worlds (seeds 1,000,000 on) of the tiny decoder and
    of the VAE's decoder on the same latents (mean over clips of each clip's PSNR, and of the pooled MSE),
    the tiny decoder against the VAE decoder, and both decoders' CPU float32 ms per frame at the clips' size
    (chunks of 3 latents, `eval_cpu_threads` torch threads). `strip`: a PNG of the first two clips (rows: truth,
    VAE decoder, tiny decoder; every 8th frame), where Pillow is installed."""
    device = torch.device(device)
    frames, seeds = render_clips(range(EVAL_SEED_START, EVAL_SEED_START + clips), s, device)
    truth = to_video(frames)
    z = encode_clips(vae, frames)
    shipped = TinyDecoder(decoder.cfg).eval()          # the weights as the file has them (float16)
    shipped.load_state_dict({k: v.detach().half().float().cpu() for k, v in decoder.state_dict().items()})
    gpu = shipped.to(device)
    tiny = torch.cat([gpu.decode(z[i:i + 8]) for i in range(0, len(z), 8)])
    ref = torch.cat([vae.decode(z[i:i + 8]) for i in range(0, len(z), 8)])
    if strip is not None:
        _write_strip(strip, [truth[:2], ref[:2], tiny[:2]])

    def psnrs(a, b):
        mse = (a - b).pow(2).mean(dim=(1, 2, 3, 4))
        return {"psnr_db": round(sum(psnr_of_mse(m) for m in mse.tolist()) / len(mse), 3),
                "psnr_pooled_db": round(psnr_of_mse(mse.mean().item()), 3)}

    out = {"clips": len(seeds), "seeds": [seeds[0], seeds[-1]], "frames": s.frames,
           "size": f"{s.width}x{s.height}", "tiny_vs_truth": psnrs(tiny, truth), "vae_vs_truth": psnrs(ref, truth),
           "tiny_vs_vae": psnrs(tiny, ref)}
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, s.eval_cpu_threads))
    try:
        cpu_tiny = shipped.to("cpu")
        cpu_vae = load_vae(s.vae, device="cpu")
        zc = z[:1].cpu().repeat(1, 1, -(-9 // z.shape[2]), 1, 1)[:, :, :9]   # 9 latents whatever the clips'
        out["cpu_threads"] = torch.get_num_threads()
        out["cpu_ms_per_frame"] = {"tiny": round(_cpu_ms_per_frame(cpu_tiny, zc), 2),
                                   "vae": round(_cpu_ms_per_frame(cpu_vae, zc, repeats=1), 2)}
    finally:
        torch.set_num_threads(threads)
    (log or (lambda msg: print(msg, flush=True)))(f"evaluation on {len(seeds)} held-out worlds: tiny decoder {out['tiny_vs_truth']['psnr_db']:.2f} dB, "
        f"VAE decoder {out['vae_vs_truth']['psnr_db']:.2f} dB vs the truth (tiny vs VAE "
        f"{out['tiny_vs_vae']['psnr_db']:.2f} dB); CPU float32 ({out['cpu_threads']} threads): tiny "
        f"{out['cpu_ms_per_frame']['tiny']:.1f} ms/frame, VAE {out['cpu_ms_per_frame']['vae']:.1f} ms/frame")
    return out


def _write_strip(path, videos: list[torch.Tensor]) -> None:
    try:
        from PIL import Image
    except ImportError:
        return
    rows = []
    for clip in range(videos[0].shape[0]):
        for v in videos:
            frames = v[clip, :, ::8]                                              # [3, n, H, W]
            rows.append(torch.cat(list(frames.unbind(1)), dim=2))                # [3, H, n*W]
    img = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu()
    Image.fromarray(img.numpy()).save(str(path))


# ---------------------------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="worldstream train decoder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="state folder (written every --save_minutes and at the end)")
    p.add_argument("--resume", help="a state folder to continue from (its weights and optimizer)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--preset", choices=sorted(PRESETS), help="smoke: the whole loop on a CPU in seconds")
    p.add_argument("--export", help="also copy decoder.safetensors into this model folder")
    defaults = DecoderSettings()
    for f in fields(DecoderSettings):
        v = getattr(defaults, f.name)
        if isinstance(v, tuple):
            p.add_argument(f"--{f.name}", type=int, nargs="+", default=None, help=f"default {' '.join(map(str, v))}")
        else:
            p.add_argument(f"--{f.name}", type=type(v), default=None, help=f"default {v}")
    return p


def settings_from_args(args: argparse.Namespace) -> DecoderSettings:
    values = dict(PRESETS.get(args.preset, {})) if args.preset else {}
    for f in fields(DecoderSettings):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return DecoderSettings(**values)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        s = settings_from_args(args)
    except ValueError as e:
        print(f"worldstream train decoder: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"train decoder on {device}: {s.decoder_config()}; {s.minutes} min, batch {s.batch}, lr {s.lr}", flush=True)
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    trainer = DecoderTrainer(s, Path(args.out), device, resume=Path(args.resume) if args.resume else None)
    trainer.prepare()
    trainer.train()
    if s.eval_clips > 0:
        trainer.run.evaluation = evaluate(trainer.model, trainer.vae, s, s.eval_clips, device,
                                          strip=Path(args.out) / "strip.png")
        trainer.save()
    if args.export:
        import shutil
        Path(args.export).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(args.out) / DECODER_FILE, Path(args.export) / DECODER_FILE)
        print(f"exported {Path(args.export) / DECODER_FILE}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
