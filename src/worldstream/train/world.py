"""Train the small LingBot-World Cam model `lingbot-cam-world` (and its VAE) on procedural worlds.

    python -m worldstream.train.world --make_prompts --out runs/p --prompts runs/prompts.safetensors \
        --text_dir src/worldstream/assets/tiny_world                   # once: the prompt embeddings
    python -m worldstream.train.world --out runs/a --prompts runs/prompts.safetensors --vae_seconds 95 \
        --dit_seconds 110
    worldstream train world --out runs/b --resume runs/a --prompts runs/prompts.safetensors --pool_start 5000 \
        --dit_seconds 160 --decay_tail 0.3 --export ckpt/ --text_dir src/worldstream/assets/tiny_world

What it trains, in order (each stage is skipped when the state it resumes from has finished it):

1. **Clips**: a pool of 33-frame 96×160 clips rendered by `world.render_clip` on the device (every frame
   of a clip in one batch of rays), from seeded scenes walked through by random keyboard schedules
   (`world.random_actions`: mostly forward and turning) through the live controls' key→pose code. Seeds
   start at `--pool_start`; evaluation uses seeds from 1,000,000 on (benchmarks/world_quality.py).
2. **VAE**: the project's Wan2.1 VAE (`models/vae.py`) at base width `--vae_dim` (16 channels of latents,
   4×8×8 strides kept), trained as an autoencoder on 9-frame windows through the same causal chunked
   encode / decode as inference (first frame alone, then 4 at a time). Loss: MSE + 0.05·L1 on pixels.
   Its latents are then normalized per channel by folding the statistics into the 1×1×1 convs around the
   latent (`fold_latent_stats`; the file keeps Wan's fixed normalization constants) and its weights are
   rounded to float16, as shipped, before any latent is computed for the DiT.
3. **DiT**: `lingbot-cam-world` (models/configs.py) as image-to-video with camera control, exactly as
   inference calls it: y = cat(mask, VAE(first frame, zeros…)), camera = Plücker-style rays of
   `camera_condition` (6 channels per pixel folded 8×8, from the F+1 keyboard poses), text = the tiny umT5
   embedding of the scene's description (`--prompts`: a table made by `prompt_table`), flow matching:
   x_σ = (1−σ)·x0 + σ·noise, target v = noise − x0, σ = shift·u / (1 + (shift−1)·u) with u uniform and the
   variant's sampling shift (pipelines/schedulers.py). Horizontal flips (with the poses mirrored) double
   the clips. AdamW, EMA of the weights (the EMA is what ships). `--prompt_dropout p`: that fraction of the
   samples get the empty prompt's embedding instead of their own (the table's "" row), so the model also
   learns the unconditional velocity that classifier-free guidance needs (`WorldModel.generate(guide=...)`).
4. **Decoder** (optional, `--decoder_seconds`; runs after stage 2, before the DiT): the VAE decoder alone on whole clips, the encoder frozen, so
   every latent the DiT learned stays valid (the shipped model: windows of 9 frames had left the decoder
   drifting over 33).

State (`--out`): `state.json` (progress, loss history, timings) and safetensors files of at most 16 MiB
(`vae.safetensors`: float16 weights; `dit-0000k.safetensors`: the DiT and its EMA in float16). That is
all `--resume` needs (the optimizer restarts with a short warm-up; its moments would triple the size).
Checkpoints are written every `--save_every` seconds and at the end. `--export DIR` writes the EMA model
in the real upstream layout (`loss.png`, the loss curve, goes next to the state).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints.t5 import T5_CHECKPOINT, T5_TOKENIZER
from ..checkpoints.vae import VAE_FILE
from ..files import atomic_write
from ..models import camera as cam
from ..models.configs import DiTConfig, get_config
from ..models.dit import WanDiT
from ..models.vae import VAEConfig, WanVAE
from ..world import scene as world

VARIANT = "lingbot-cam-world"
HEIGHT, WIDTH, FRAMES = 96, 160, 33
MAX_FILE_BYTES = 16 * 2**20           # state files are at most this big (what a GPU lease hands back)
EVAL_SEED_START = 1_000_000           # evaluation scenes; training seeds stay below


# ---------------------------------------------------------------------------------------------- settings

@dataclass
class Settings:
    height: int = HEIGHT
    width: int = WIDTH
    frames: int = FRAMES
    vae_dim: int = 16
    variant: str = VARIANT
    seed: int = 0
    # clips
    pool_start: int = 0                 # first scene seed of this run's pool
    pool_clips: int = 2048              # at most this many clips ...
    pool_seconds: float = 30.0          # ... rendered in at most this long
    # VAE
    vae_seconds: float = 100.0
    vae_batch: int = 16
    vae_window: int = 9                 # frames per training window (1 + 4k)
    vae_crop: int = 0                   # square random crop side (0: whole frames)
    vae_lr: float = 1e-3
    decoder_seconds: float = 0.0        # then: the decoder alone on whole clips (the latents stay as they are)
    decoder_batch: int = 8
    decoder_lr: float = 3e-4
    decoder_crop: tuple[int, int] = (64, 96)   # pixel crop (multiples of 8) of the whole-clip decoder windows
    # DiT
    dit_seconds: float = 140.0
    dit_batch: int = 48
    dit_lr: float = 5e-4
    dit_warmup: int = 150               # steps of linear warm-up (again after a resume: fresh optimizer)
    prompt_dropout: float = 0.0         # fraction of DiT samples trained with the empty prompt (for CFG)
    decay_tail: float = 0.0             # last fraction of this run's DiT time: LR decays linearly to 10%
    ema: float = 0.999
    flip: bool = True
    save_every: float = 60.0


# ---------------------------------------------------------------------------------------------- text

def all_prompts() -> list[str]:
    """Every description `Scene.describe()` can produce (the prompts the model is trained with)."""
    out = []
    for weather, time_of_day, ground, style, shapes in itertools.product(
            ("foggy", "cloudy", "moonlit", "sunny", "clear"), world.PALETTES, world.GROUND_NAMES.values(),
            world.BOX_STYLES, ("boxes", "boxes and columns", "columns")):
        out.append(f"a {weather} {time_of_day} {ground} with {style} {shapes}")
    return out


EMPTY_PROMPT = ""      # the unconditional prompt of classifier-free guidance (a row of every prompt table)


def prompt_table(text_dir: str | os.PathLike, text_len: int, prompts: list[str] | None = None
                 ) -> tuple[list[str], torch.Tensor]:
    """(prompts, embeddings [P, text_len, d_model] float32, zero-padded) through the same code as inference
    (pipelines.prompts.encode_prompts, float32 on the CPU)."""
    from ..pipelines.prompts import encode_prompts   # (pipelines sits below train)

    prompts = list(prompts or all_prompts() + [EMPTY_PROMPT])
    ctx = encode_prompts(prompts, text_dir, cache=None, placement="cpu", device="cpu", dtype=torch.float32,
                         text_len=text_len)
    table = torch.zeros(len(prompts), text_len, ctx[0].shape[1])
    for i, c in enumerate(ctx):
        table[i, :len(c)] = c
    return prompts, table


def save_prompt_table(path, prompts: list[str], table: torch.Tensor) -> None:
    from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file({"table": table.contiguous()}, tmp,
                                             metadata={"prompts": json.dumps(prompts)}))


def load_prompt_table(path) -> tuple[list[str], torch.Tensor]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["prompts"]), f.get_tensor("table")


# ---------------------------------------------------------------------------------------------- camera

MIRROR = np.diag([-1.0, 1.0, 1.0, 1.0])


def mirror_poses(poses: np.ndarray) -> np.ndarray:
    """The trajectory seen in a horizontally flipped video: x → −x in world and camera (M·P·M)."""
    return MIRROR @ np.asarray(poses, dtype=np.float64) @ MIRROR


def latent_relative_poses(poses: np.ndarray) -> torch.Tensor:
    """[lat_f, 4, 4] float32: the per-latent-frame relative poses `camera_condition(..., truncate=False)`
    builds from a keyboard trajectory's F+1 poses (interpolated, relative, translations normalized)."""
    lat_f = cam.latent_frames(len(poses))
    c2w = torch.from_numpy(cam.interpolate_poses(poses, lat_f)).to(torch.float32)
    return cam.relative_framewise(c2w).float()


def camera_maps(rel: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Batched `camera_condition` from relative poses rel [B, F, 4, 4] and unit rays dirs [H, W, 3]:
    [B, 6·64, F, H/8, W/8] (translation, then rays_d = d·Rᵀ; every 8×8 cell folded into channels)."""
    b, f = rel.shape[:2]
    h, w = dirs.shape[:2]
    c = cam.CELL
    rays = torch.einsum("hwc,bfdc->bfhwd", dirs, rel[..., :3, :3])
    emb = torch.cat([rel[..., :3, 3][:, :, None, None].expand(b, f, h, w, 3), rays], dim=-1)
    emb = emb.reshape(b, f, h // c, c, w // c, c, 6).permute(0, 6, 3, 5, 1, 2, 4)
    return emb.reshape(b, 6 * c * c, f, h // c, w // c)


def ray_dirs(height: int, width: int, device=None) -> torch.Tensor:
    k = cam.scale_intrinsics(cam.DEFAULT_INTRINSICS, height, width)
    return cam.ray_directions(k, height, width).to(device)


# ---------------------------------------------------------------------------------------------- clips

@dataclass
class Pool:
    """Rendered clips: frames uint8 [N, F, 3, H, W] (device), relative latent poses [N, lat_f, 4, 4] and
    their mirror images (CPU), prompt index per clip, seeds."""
    frames: torch.Tensor
    rel: torch.Tensor
    rel_mirror: torch.Tensor
    prompt: torch.Tensor
    seeds: list[int]


def render_pool(s: Settings, prompts: list[str], device, log=print) -> Pool:
    """Render up to `pool_clips` clips from seed `pool_start` on, stopping after `pool_seconds`."""
    device = torch.device(device)
    index = {p: i for i, p in enumerate(prompts)}
    fast = dict(frame_batch=s.frames, ray_box_elements=1 << 25) if device.type == "cuda" else {}
    frames, rel, rel_m, pidx, seeds = [], [], [], [], []
    t0 = time.perf_counter()
    for seed in range(s.pool_start, s.pool_start + s.pool_clips):
        clip = world.render_clip(seed, s.frames, s.height, s.width, device=device, **fast)
        frames.append(((clip["frames"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        rel.append(latent_relative_poses(clip["poses"]))
        rel_m.append(latent_relative_poses(mirror_poses(clip["poses"])))
        pidx.append(index[clip["prompt"]])
        seeds.append(seed)
        if time.perf_counter() - t0 > s.pool_seconds:
            break
    dt = time.perf_counter() - t0
    log(f"pool: {len(seeds)} clips (seeds {seeds[0]}..{seeds[-1]}) rendered in {dt:.1f} s "
        f"({1000 * dt / len(seeds):.0f} ms/clip)")
    return Pool(torch.stack(frames), torch.stack(rel), torch.stack(rel_m), torch.tensor(pidx), seeds)


def to_video(frames_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, F, 3, H, W] -> float [B, 3, F, H, W] in [-1, 1]."""
    return frames_u8.permute(0, 2, 1, 3, 4).float().div(127.5).sub(1)


# ---------------------------------------------------------------------------------------------- VAE

def vae_reconstruct(vae: WanVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable encode → normalized latents → decode, chunked and causal exactly as
    `WanVAE.encode` / `decode` (gradients do not flow through the causal caches between chunks).
    Returns (reconstruction [B, 3, F, H, W] unclamped, normalized latents)."""
    z = (vae.encode_mean(video) - vae.latents_mean) / vae.latents_std
    out = torch.cat(list(vae._decode_stream(vae._decoder_input(z))), dim=2)
    return out, z


@torch.no_grad()
def fold_latent_stats(vae: WanVAE, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make `vae.encode` return (z − mean)/std instead of z (per channel) with the same decoded video:
    rescale the posterior-mean half of the 1×1×1 `conv1` and compensate in `conv2`. The latent
    normalization constants in the file (Wan's) stay as they are."""
    M, S = vae.latents_mean.flatten(), vae.latents_std.flatten()
    m, s = mean.flatten().to(M), std.flatten().to(M)
    n = vae.cfg.z_dim
    w1, b1 = vae.conv1.weight, vae.conv1.bias
    w1[:n] /= s.view(-1, 1, 1, 1, 1)
    b1[:n] = b1[:n] / s + M * (1 - 1 / s) - m * S / s
    w2, b2 = vae.conv2.weight, vae.conv2.bias
    shift = m * S - M * (s - 1)                    # mu = s·mu' + shift
    b2 += (w2.flatten(1) @ shift)
    w2 *= s.view(1, -1, 1, 1, 1)


def round_to(module: nn.Module, dtype: torch.dtype) -> None:
    """Round every parameter to `dtype` in place (kept in its own dtype): the weights as they ship."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).to(p.dtype))


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error measured on [-1, 1] pixels (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / max(mse, 1e-12))


# ---------------------------------------------------------------------------------------------- DiT

def init_dit(model: WanDiT, seed: int) -> None:
    """Upstream-style initialization for training from scratch: Xavier linears with zero biases, small
    normal embeddings, a zero output head and zero camera scale / shift layers (the camera starts as no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                fan_out, fan_in = m.weight.shape[0], m.weight[0].numel()
                bound = math.sqrt(6 / (fan_in + fan_out))
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 * bound - bound)
                if m.bias is not None:
                    m.bias.zero_()
            if name.startswith(("text_embedding", "time_embedding")) and isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
            if name.endswith(("cam_scale_layer", "cam_shift_layer")) or name == "head.head":
                m.weight.zero_()


def sample_sigmas(n: int, shift: float, generator, device) -> torch.Tensor:
    """σ = shift·u / (1 + (shift − 1)·u), u ~ U(0, 1): the training counterpart of the shifted schedule."""
    u = torch.rand(n, generator=generator, device=device)
    return shift * u / (1 + (shift - 1) * u)


def first_frame_mask(b: int, lat_f: int, h: int, w: int, device) -> torch.Tensor:
    mask = torch.zeros(b, 4, lat_f, h, w, device=device)
    mask[:, :, 0] = 1
    return mask


@torch.no_grad()
def encode_pool(vae: WanVAE, frames_u8: torch.Tensor, flip: bool, batch: int = 32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, cond) latents [N, 16, lat_f, h, w] of the clips (flipped left-right when `flip`): x0 the video's,
    cond that of [first frame, zeros...] as `pipelines.conditioning.image_condition` encodes it."""
    x0s, conds = [], []
    for i in range(0, len(frames_u8), batch):
        video = to_video(frames_u8[i:i + batch].to(vae.device))
        if flip:
            video = video.flip(-1)
        cond = torch.zeros_like(video)
        cond[:, :, 0] = video[:, :, 0]
        x0s.append(vae.encode(video))
        conds.append(vae.encode(cond))
    return torch.cat(x0s), torch.cat(conds)


# ---------------------------------------------------------------------------------------------- state files

def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    groups, cur, size = [], {}, 0
    for k, v in tensors.items():
        if cur and size + v.nbytes > limit - 2**20:      # (room for the header)
            groups.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    return groups + ([cur] if cur else [])


def save_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor], limit: int = MAX_FILE_BYTES
                 ) -> list[str]:
    """`name-0000k.safetensors` files of at most `limit` bytes (one `name.safetensors` if it fits)."""
    from safetensors.torch import save_file
    groups = _shards({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, limit)
    for old in folder.glob(f"{name}*.safetensors"):
        old.unlink()
    files = []
    for i, group in enumerate(groups, 1):
        fname = f"{name}.safetensors" if len(groups) == 1 else f"{name}-{i:05d}.safetensors"
        atomic_write(folder / fname, lambda tmp, g=group: save_file(g, tmp))
        files.append(fname)
    return files


def load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(folder.glob(f"{name}.safetensors")) + sorted(folder.glob(f"{name}-[0-9]*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


class State:
    """Progress of a training run: which stages are done, steps, loss history, timings (`state.json`)."""

    def __init__(self, settings: Settings):
        self.data = {"settings": asdict(settings), "vae_done": False, "vae_steps": 0, "dit_steps": 0,
                     "vae_loss": [], "dit_loss": [], "events": [], "latent_stats": None}

    def __getitem__(self, k):
        return self.data[k]

    def __setitem__(self, k, v):
        self.data[k] = v

    def save(self, folder: Path) -> None:
        atomic_write(folder / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(self.data, indent=1)))

    @classmethod
    def load(cls, folder: Path, settings: Settings) -> "State":
        st = cls(settings)
        saved = json.loads((folder / "state.json").read_text())
        saved["settings"] = asdict(settings)
        st.data.update(saved)
        return st


# ---------------------------------------------------------------------------------------------- progress

class Bar:
    """A one-line progress bar for a time-budgeted loop, on stderr: step, elapsed / budget, loss."""

    def __init__(self, label: str, seconds: float):
        self.label, self.seconds = label, seconds
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.shown = 0.0

    def update(self, step: int, note: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.shown < (0.2 if self.tty else 10.0):
            return
        self.shown = now
        el = now - self.t0
        fill = int(24 * min(el / max(self.seconds, 1e-9), 1))
        line = f"{self.label} step {step} [{'#' * fill}{'.' * (24 - fill)}] {el:.0f}/{self.seconds:.0f} s {note}"
        sys.stderr.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


# ---------------------------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, s: Settings, out: Path, device, prompts: list[str], table: torch.Tensor,
                 resume: Path | None = None, log=print, init: Path | None = None):
        self.s, self.out, self.log = s, out, log
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.cfg: DiTConfig = get_config(s.variant)
        self.prompts, self.table = prompts, table.to(self.device)
        if not 0.0 <= s.prompt_dropout <= 1.0:
            raise ValueError(f"--prompt_dropout {s.prompt_dropout}: a fraction, 0 to 1")
        if s.prompt_dropout > 0 and EMPTY_PROMPT not in prompts:
            raise ValueError("--prompt_dropout needs the empty prompt's embedding, and this prompt table has no "
                             "\"\" row (tables made before it had one): make it again with --make_prompts")
        self.empty_prompt = prompts.index(EMPTY_PROMPT) if EMPTY_PROMPT in prompts else None
        out.mkdir(parents=True, exist_ok=True)
        self.vae = WanVAE(VAEConfig(dim=s.vae_dim)).to(self.device)
        self.dit = WanDiT(self.cfg)
        init_dit(self.dit, s.seed)
        self.dit.to(self.device).set_fuse(False)
        self.ema = WanDiT(self.cfg).to(self.device).requires_grad_(False)
        self.ema.load_state_dict(self.dit.state_dict())
        self.state = State(s)
        if resume is not None and init is not None:
            raise ValueError("--resume and --init: one or the other (a state folder, or an exported checkpoint)")
        if resume is not None:
            self._resume(resume)
        if init is not None:
            self._init(init)
        self.last_save = time.perf_counter()

    # -- state --
    def _resume(self, folder: Path) -> None:
        self.state = State.load(folder, self.s)
        vae = load_tensors(folder, "vae")
        if vae:
            self.vae.load_state_dict({k: v.float() for k, v in vae.items()})
        dit = load_tensors(folder, "dit")
        if dit:
            self.dit.load_state_dict({k[len("model."):]: v.float() for k, v in dit.items() if k.startswith("model.")})
            self.ema.load_state_dict({k[len("ema."):]: v.float() for k, v in dit.items() if k.startswith("ema.")})
        self.log(f"resumed from {folder}: VAE {'done' if self.state['vae_done'] else 'not done'} after "
                 f"{self.state['vae_steps']} steps, DiT {self.state['dit_steps']} steps")

    def _init(self, folder: Path) -> None:
        """Start from an exported checkpoint (the shipped one, say): its VAE, finished (latent statistics folded
        in), and its DiT as both the trained weights and the EMA. The DiT's training goes on from there."""
        from ..testing.world import WorldModel   # (testing sits below train)

        model = WorldModel.load(folder, device="cpu", dtype=torch.float32)
        if model.config.name != self.cfg.name:
            raise ValueError(f"--init {folder}: a {model.config.name} checkpoint, this trains {self.cfg.name}")
        if model.vae.cfg.dim != self.s.vae_dim:
            raise ValueError(f"--init {folder}: its VAE has base width {model.vae.cfg.dim}, --vae_dim is "
                             f"{self.s.vae_dim}")
        self.vae.load_state_dict(model.vae.state_dict())
        self.dit.load_state_dict(model.dit.state_dict())
        self.ema.load_state_dict(model.dit.state_dict())
        self.state["vae_done"] = True
        self.event(f"initialized from the checkpoint {folder}: its VAE (finished) and its DiT (weights and EMA)")

    def save(self, what: str = "all") -> None:
        t0 = time.perf_counter()
        if what in ("all", "vae"):
            dtype = torch.float16 if self.state["vae_done"] else torch.float32
            save_tensors(self.out, "vae", {k: v.to(dtype) for k, v in self.vae.state_dict().items()})
        if what in ("all", "dit") and self.state["dit_steps"] > 0:
            sd = {f"model.{k}": v.half() for k, v in self.dit.state_dict().items()}
            sd.update({f"ema.{k}": v.half() for k, v in self.ema.state_dict().items()})
            save_tensors(self.out, "dit", sd)
        self.state.save(self.out)
        self.last_save = time.perf_counter()
        self.log(f"saved state to {self.out} ({time.perf_counter() - t0:.1f} s)")

    def _maybe_save(self, what: str) -> None:
        if time.perf_counter() - self.last_save > self.s.save_every:
            self.save(what)

    def event(self, msg: str) -> None:
        self.state["events"].append(msg)
        self.log(msg)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)

    # -- VAE --
    def train_vae(self, pool: Pool) -> None:
        s, vae = self.s, self.vae
        if self.state["vae_done"] or s.vae_seconds <= 0:
            return
        g = torch.Generator(self.device).manual_seed(s.seed * 1000 + 1 + self.state["vae_steps"])
        opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
        vae.train()
        n, f = pool.frames.shape[:2]
        bar = Bar("vae", s.vae_seconds)
        t0 = time.perf_counter()
        step0, losses, mses = self.state["vae_steps"], [], []
        while (el := time.perf_counter() - t0) < s.vae_seconds:
            frac = el / s.vae_seconds
            lr = s.vae_lr * min(1.0, (self.state["vae_steps"] - step0 + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(n, (s.vae_batch,), generator=g, device=self.device).cpu()
            start = torch.randint(f - s.vae_window + 1, (1,), generator=g, device=self.device).item()
            video = to_video(pool.frames[idx, start:start + s.vae_window].to(self.device))
            if s.vae_crop:
                y0 = torch.randint(s.height - s.vae_crop + 1, (1,), generator=g, device=self.device).item() // 8 * 8
                x0 = torch.randint(s.width - s.vae_crop + 1, (1,), generator=g, device=self.device).item() // 8 * 8
                video = video[..., y0:y0 + s.vae_crop, x0:x0 + s.vae_crop]
            if torch.rand(1, generator=g, device=self.device).item() < 0.5:
                video = video.flip(-1)
            with self.autocast():
                rec, z = vae_reconstruct(vae, video)
            rec = rec.float()
            mse = F.mse_loss(rec, video)
            loss = mse + 0.05 * (rec - video).abs().mean() + 1e-6 * z.float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            self.state["vae_steps"] += 1
            mses.append(mse.detach())
            if len(mses) == 10:
                m = torch.stack(mses).mean().item()
                mses = []
                self.state["vae_loss"].append([self.state["vae_steps"], m, round(time.perf_counter() - t0, 2)])
                losses.append(m)
            note = f"mse {losses[-1]:.5f} ({psnr_of_mse(losses[-1]):.1f} dB) lr {lr:.2e}" if losses else ""
            bar.update(self.state["vae_steps"], note)
            self._maybe_save("vae")
        bar.update(self.state["vae_steps"], note, force=True)
        bar.close()
        vae.eval()
        self.event(f"VAE: {self.state['vae_steps'] - step0} steps in {time.perf_counter() - t0:.0f} s "
                   f"({(self.state['vae_steps'] - step0) / (time.perf_counter() - t0):.1f} steps/s, batch "
                   f"{s.vae_batch} x {s.vae_window} frames); last training PSNR "
                   f"{psnr_of_mse(losses[-1]) if losses else float('nan'):.2f} dB")
        self.finish_vae(pool)

    @torch.no_grad()
    def finish_vae(self, pool: Pool) -> None:
        """Normalize the latent channels (folded into the VAE), round the weights to float16 (as shipped)."""
        vae = self.vae.eval()
        x0, _ = encode_pool(vae, pool.frames[:64], flip=False, batch=16)
        mean, std = x0.mean(dim=(0, 2, 3, 4)), x0.std(dim=(0, 2, 3, 4))
        fold_latent_stats(vae, mean, std)
        round_to(vae, torch.float16)
        check, _ = encode_pool(vae, pool.frames[:64], flip=False, batch=16)
        rec = vae.decode(check[:8])
        mse = F.mse_loss(rec, to_video(pool.frames[:8].to(self.device))).item()
        self.state["vae_done"] = True
        self.state["latent_stats"] = {"mean_before": mean.tolist(), "std_before": std.tolist(),
                                      "std_after": check.std(dim=(0, 2, 3, 4)).tolist()}
        self.event(f"VAE folded + float16: latent std now {check.std().item():.3f}, training-pool PSNR of 8 "
                   f"whole clips {psnr_of_mse(mse):.2f} dB")
        self.save("vae")

    def train_decoder(self, pool: Pool) -> None:
        """Fine-tune the decoder (and the 1×1×1 conv before it) alone, on whole clips: the encoder, and so
        every latent the DiT was trained on, stays as it is. Whole clips teach the decoder's causal stream
        to stay accurate over all 9 latent frames (windows of 9 video frames only ever run 3)."""
        s, vae = self.s, self.vae
        if s.decoder_seconds <= 0:
            return
        t_enc = time.perf_counter()
        with torch.no_grad():
            lat = torch.cat([vae.encode(to_video(pool.frames[i:i + 32].to(self.device)))
                             for i in range(0, len(pool.frames), 32)])
        self.event(f"decoder data: {len(lat)} clips encoded in {time.perf_counter() - t_enc:.1f} s")
        vae.requires_grad_(False)
        params = list(vae.decoder.parameters()) + list(vae.conv2.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=s.decoder_lr, betas=(0.9, 0.99), weight_decay=0.0)
        g = torch.Generator(self.device).manual_seed(s.seed * 1000 + 3 + self.state.data.get("decoder_steps", 0))
        n = len(lat)
        ch, cw = min(s.decoder_crop[0], s.height), min(s.decoder_crop[1], s.width)
        bar = Bar("decoder", s.decoder_seconds)
        t0 = time.perf_counter()
        steps, window, losses = 0, [], []
        self.state.data.setdefault("decoder_loss", [])
        while (el := time.perf_counter() - t0) < s.decoder_seconds:
            lr = s.decoder_lr * min(1.0, (steps + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * el / s.decoder_seconds)))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(n, (s.decoder_batch,), generator=g, device=self.device)
            y0 = torch.randint((s.height - ch) // 8 + 1, (1,), generator=g, device=self.device).item()
            x0 = torch.randint((s.width - cw) // 8 + 1, (1,), generator=g, device=self.device).item()
            z = lat[idx][..., y0:y0 + ch // 8, x0:x0 + cw // 8]
            video = to_video(pool.frames[idx.cpu()].to(self.device))[..., 8 * y0:8 * y0 + ch, 8 * x0:8 * x0 + cw]
            with self.autocast():
                rec = torch.cat(list(vae._decode_stream(vae._decoder_input(z))), dim=2).float()
            mse = F.mse_loss(rec, video)
            loss = mse + 0.05 * (rec - video).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            steps += 1
            window.append(mse.detach())
            if len(window) == 10:
                m = torch.stack(window).mean().item()
                window = []
                self.state["decoder_loss"].append([steps, m, round(time.perf_counter() - t0, 2)])
                losses.append(m)
            bar.update(steps, f"mse {losses[-1]:.5f} ({psnr_of_mse(losses[-1]):.1f} dB) lr {lr:.2e}" if losses else "")
        bar.close()
        vae.requires_grad_(False).eval()
        round_to(vae, torch.float16)
        self.state.data["decoder_steps"] = self.state.data.get("decoder_steps", 0) + steps
        with torch.no_grad():
            rec = vae.decode(lat[:8])
            mse = F.mse_loss(rec, to_video(pool.frames[:8].to(self.device))).item()
        self.event(f"decoder: {steps} steps in {time.perf_counter() - t0:.0f} s (batch {s.decoder_batch} whole "
                   f"clips, {ch}x{cw} crops); PSNR of 8 whole clips now {psnr_of_mse(mse):.2f} dB")
        self.save("vae")

    # -- DiT --
    def train_dit(self, pool: Pool) -> None:
        s, cfg = self.s, self.cfg
        if s.dit_seconds <= 0:
            return
        t_enc = time.perf_counter()
        x0n, cn = encode_pool(self.vae, pool.frames, flip=False)
        x0f, cf = encode_pool(self.vae, pool.frames, flip=True) if s.flip else (x0n, cn)
        self.event(f"DiT data: {len(x0n)} clips{' x 2 (flips)' if s.flip else ''} encoded in "
                   f"{time.perf_counter() - t_enc:.1f} s; latents {tuple(x0n.shape[1:])}")
        rel_n, rel_f = pool.rel.to(self.device), pool.rel_mirror.to(self.device)
        prompt_idx = pool.prompt.to(self.device)
        dirs = ray_dirs(s.height, s.width, self.device)
        shift = cfg.sampling.shift
        dit, ema = self.dit.train(), self.ema
        opt = torch.optim.AdamW(dit.parameters(), lr=s.dit_lr, betas=(0.9, 0.99), weight_decay=0.01)
        g = torch.Generator(self.device).manual_seed(s.seed * 1000 + 2 + self.state["dit_steps"])
        n = len(x0n)
        b = s.dit_batch
        lat = x0n.shape[2:]
        mask = first_frame_mask(b, *lat, self.device)
        bar = Bar("dit", s.dit_seconds)
        t0 = time.perf_counter()
        step0, losses, window = self.state["dit_steps"], [], []
        ema_params = list(ema.parameters())
        params = list(dit.parameters())
        while (el := time.perf_counter() - t0) < s.dit_seconds:
            k = self.state["dit_steps"] - step0
            lr = s.dit_lr * min(1.0, (k + 1) / s.dit_warmup)
            tail = s.decay_tail * s.dit_seconds
            if tail > 0 and el > s.dit_seconds - tail:
                lr *= 1 - 0.9 * (el - (s.dit_seconds - tail)) / tail
            for group in opt.param_groups:
                group["lr"] = lr
            idx = torch.randint(n, (b,), generator=g, device=self.device)
            flip = (torch.rand(b, generator=g, device=self.device) < 0.5) if s.flip else \
                torch.zeros(b, dtype=torch.bool, device=self.device)
            fl = flip.view(b, 1, 1, 1, 1)
            x0 = torch.where(fl, x0f[idx], x0n[idx])
            y = torch.cat([mask, torch.where(fl, cf[idx], cn[idx])], dim=1)
            rel = torch.where(flip.view(b, 1, 1, 1), rel_f[idx], rel_n[idx])
            camera = camera_maps(rel, dirs)
            pidx = prompt_idx[idx]
            if s.prompt_dropout > 0:          # (no draw without dropout: earlier runs resume bit for bit)
                drop = torch.rand(b, generator=g, device=self.device) < s.prompt_dropout
                pidx = torch.where(drop, torch.full_like(pidx, self.empty_prompt), pidx)
            context = self.table[pidx]
            sigma = sample_sigmas(b, shift, g, self.device)
            noise = torch.randn(x0.shape, generator=g, device=self.device)
            sg = sigma.view(b, 1, 1, 1, 1)
            xt = (1 - sg) * x0 + sg * noise
            with self.autocast():
                v = dit(xt, sigma * 1000, context, y=y, camera=camera)
            loss = F.mse_loss(v.float(), noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            self.state["dit_steps"] += 1
            decay = min(s.ema, (1 + self.state["dit_steps"]) / (10 + self.state["dit_steps"]))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            window.append(loss.detach())
            if len(window) == 10:
                m = torch.stack(window).mean().item()
                window = []
                self.state["dit_loss"].append([self.state["dit_steps"], m, round(time.perf_counter() - t0, 2)])
                losses.append(m)
                if not math.isfinite(m):
                    raise RuntimeError(f"DiT loss is {m} at step {self.state['dit_steps']}")
            bar.update(self.state["dit_steps"], f"loss {losses[-1]:.4f} lr {lr:.2e}" if losses else "")
            self._maybe_save("dit")
        bar.update(self.state["dit_steps"], f"loss {losses[-1]:.4f}" if losses else "", force=True)
        bar.close()
        dit.eval()
        steps = self.state["dit_steps"] - step0
        el = time.perf_counter() - t0
        self.event(f"DiT: {steps} steps in {el:.0f} s ({steps / el:.1f} steps/s, batch {b}); "
                   f"loss (mean of the last 100 steps) {np.mean(losses[-10:]) if losses else float('nan'):.4f}")
        self.save("dit")


# ---------------------------------------------------------------------------------------------- export

def export_checkpoint(folder: str | os.PathLike, ema_state: dict[str, torch.Tensor], vae_state: dict,
                      text_dir: str | os.PathLike, variant: str = VARIANT, shards: int = 2) -> Path:
    """The shipped checkpoint in the real upstream layout: the DiT (float16) as `config.json` + safetensors
    shards + index at the root (one expert, like Wan2.1's layout), `Wan2.1_VAE.pth` (float16 state dict),
    and the umt5 encoder `.pth` + tokenizer folder copied from `text_dir`."""
    from ..testing.dit import write_dit_dir   # (testing sits below train)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_dit_dir(folder, get_config(variant), shards=shards, dtype=torch.float16,
                  state={k: v.float() for k, v in ema_state.items()})
    vae = {k: v.to(torch.float16).contiguous() for k, v in vae_state.items()}
    atomic_write(folder / VAE_FILE, lambda tmp: torch.save(vae, tmp))
    text_dir = Path(text_dir)
    if text_dir.resolve() != folder.resolve():       # (exporting into the folder the text files live in)
        shutil.copyfile(text_dir / T5_CHECKPOINT, folder / T5_CHECKPOINT)
        if (folder / T5_TOKENIZER).exists():
            shutil.rmtree(folder / T5_TOKENIZER)
        shutil.copytree(text_dir / T5_TOKENIZER, folder / T5_TOKENIZER)
    return folder


def export_from_state(dit_dir, vae_dir, text_dir, folder) -> Path:
    """`export_checkpoint` from training state folders: the DiT's EMA from `dit_dir`, the VAE from `vae_dir`."""
    dit = load_tensors(Path(dit_dir), "dit")
    ema = {k[len("ema."):]: v for k, v in dit.items() if k.startswith("ema.")}
    if not ema:
        raise FileNotFoundError(f"{dit_dir}: no DiT state (dit*.safetensors)")
    return export_checkpoint(folder, ema, load_tensors(Path(vae_dir), "vae"), text_dir)


# ---------------------------------------------------------------------------------------------- loss curve

def plot_losses(state: dict, path: str | os.PathLike) -> None:
    """Loss curves (VAE reconstruction PSNR, DiT flow-matching loss) as a PNG: matplotlib when installed,
    else drawn with PIL."""
    vae = np.array(state.get("vae_loss") or [[0, 1, 0]], dtype=float)
    dit = np.array(state.get("dit_loss") or [[0, 1, 0]], dtype=float)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(vae, dit, path)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(vae[:, 0], [psnr_of_mse(m) for m in vae[:, 1]], label="VAE, 9-frame windows")
    if state.get("decoder_loss"):
        dec = np.array(state["decoder_loss"], dtype=float)
        ax[0].plot(vae[-1, 0] + dec[:, 0], [psnr_of_mse(m) for m in dec[:, 1]],
                   label="then the decoder alone, whole clips (crops)")
        ax[0].legend(fontsize=8)
    ax[0].set(title="VAE: training reconstruction", xlabel="step", ylabel="PSNR (dB)")
    ax[1].plot(dit[:, 0], dit[:, 1])
    ax[1].set(title="DiT: flow-matching loss", xlabel="step", ylabel="MSE of v", yscale="log")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_pil(vae: np.ndarray, dit: np.ndarray, path) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 420, 300, 40
    img = Image.new("RGB", (2 * w, h), "white")
    d = ImageDraw.Draw(img)
    for i, (title, xs, ys) in enumerate([("VAE reconstruction PSNR (dB) vs step", vae[:, 0],
                                          np.array([psnr_of_mse(m) for m in vae[:, 1]])),
                                         ("DiT flow-matching loss (log) vs step", dit[:, 0],
                                          np.log10(np.maximum(dit[:, 1], 1e-8)))]):
        x0 = i * w
        d.rectangle([x0 + pad, pad, x0 + w - 10, h - pad], outline="black")
        d.text((x0 + pad, 10), title, fill="black")
        lo, hi = float(ys.min()), float(ys.max()) + 1e-9
        xmax = float(xs.max()) or 1.0
        pts = [(x0 + pad + (w - 10 - pad) * x / xmax, h - pad - (h - 2 * pad) * (y - lo) / (hi - lo))
               for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill="navy", width=2)
        d.text((x0 + 2, pad), f"{hi:.2f}", fill="black")
        d.text((x0 + 2, h - pad - 10), f"{lo:.2f}", fill="black")
        d.text((x0 + w - 60, h - pad + 5), f"{int(xmax)}", fill="black")
    img.save(path)


# ---------------------------------------------------------------------------------------------- entry

def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m worldstream.train.world", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    a = p.add_argument
    a("--out", required=True, help="folder for the training state (state.json, safetensors), loss.png, log")
    a("--resume", help="state folder to continue from (may equal --out)")
    a("--init", help="start from an exported checkpoint folder instead (e.g. src/worldstream/assets/tiny_world): "
                     "its VAE as finished, its DiT as the weights and the EMA to train on")
    a("--prompts", required=True, help="prompt table (safetensors from `--make_prompts`)")
    a("--text_dir", help="folder with the umt5 .pth + tokenizer (for --make_prompts and --export)")
    a("--make_prompts", action="store_true", help="write the prompt table to --prompts from --text_dir and exit")
    a("--export", help="write the EMA model in the upstream checkpoint layout here at the end")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in ("seed", "pool_start", "pool_clips", "pool_seconds", "vae_dim", "vae_seconds", "vae_batch",
                 "vae_window", "vae_crop", "vae_lr", "decoder_seconds", "decoder_batch", "decoder_lr", "dit_seconds", "dit_batch", "dit_lr", "dit_warmup",
                 "prompt_dropout", "decay_tail", "ema", "save_every", "height", "width", "frames"):
        default = getattr(d, name)
        a(f"--{name}", type=type(default), default=default, help=f"(default {default})")
    a("--decoder_crop", type=lambda t: tuple(int(v) for v in t.split(",")), default=d.decoder_crop,
      help=f"height,width of the decoder's pixel crops, multiples of 8 (default {d.decoder_crop[0]},{d.decoder_crop[1]})")
    a("--no_flip", action="store_true", help="no horizontal flips of the clips")
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    args = args or build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    if args.make_prompts:
        cfg = get_config(VARIANT)
        prompts, table = prompt_table(args.text_dir, cfg.text_len)
        save_prompt_table(args.prompts, prompts, table)
        log(f"wrote {len(prompts)} prompt embeddings {tuple(table.shape)} to {args.prompts}")
        return 0
    s = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__ if hasattr(args, k)})
    s.flip = not args.no_flip
    torch.manual_seed(s.seed)
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    prompts, table = load_prompt_table(args.prompts)
    t_all = time.perf_counter()
    try:
        trainer = Trainer(s, out, args.device, prompts, table, resume=Path(args.resume) if args.resume else None,
                          log=log, init=Path(args.init) if args.init else None)
    except (ValueError, OSError) as e:
        print(f"worldstream train world: {e}", file=sys.stderr)
        return 2
    log(f"settings: {asdict(s)}")
    log(f"DiT {s.variant}: {sum(p.numel() for p in trainer.dit.parameters()):,} parameters; VAE dim {s.vae_dim}: "
        f"{sum(p.numel() for p in trainer.vae.parameters()):,}")
    pool = render_pool(s, prompts, args.device, log=log)
    trainer.train_vae(pool)
    if not trainer.state["vae_done"]:
        trainer.finish_vae(pool)
    trainer.train_decoder(pool)
    trainer.train_dit(pool)
    trainer.save()
    plot_losses(trainer.state.data, out / "loss.png")
    if args.export:
        export_checkpoint(args.export, trainer.ema.state_dict(), trainer.vae.state_dict(), args.text_dir)
        log(f"exported the checkpoint to {args.export}")
    log(f"done in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
