"""The shipped small world model (`assets/tiny_world`, trained by train/world.py) and how it is measured.

`WorldModel.load(folder, device)` reads the checkpoint with the package's own loaders (VAE, DiT, umt5);
`WorldModel.generate(...)` runs image-to-video with camera control for a batch of scenes: the same steps as
`pipelines.generate.run` (image_condition, camera_condition, initial_noise, the UniPC schedule, VAE decode),
batched over scenes, with no classifier-free guidance (the variant's guide scale is 1). benchmarks/
world_quality.py and the tests measure it against the procedural renderer's ground truth with `psnr`, `ssim`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints.dit import find_checkpoint, load_dit
from ..checkpoints.vae import VAE_FILE, load_vae
from ..models import camera as cam
from ..models.configs import DiTConfig
from ..models.dit import WanDiT
from ..models.vae import WanVAE
from ..pipelines.conditioning import image_condition, initial_noise
from ..pipelines.prompts import encode_prompts
from ..pipelines.schedulers import FlowEuler, FlowUniPC
from ..pipelines.step_cache import StepCache

WORLD_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "tiny_world"
# The causal 4-step student distilled from it (train/distill.py): only its DiT, `transformers/` in the v2
# causal-fast layout; it shares the teacher's VAE, umt5 and tokenizer (`student_checkpoint` puts them together).
WORLD_STUDENT = Path(__file__).resolve().parent.parent / "assets" / "tiny_world_fast"


@dataclass
class WorldModel:
    root: Path
    config: DiTConfig
    vae: WanVAE
    dit: WanDiT
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, root: str | Path = WORLD_CHECKPOINT, device="cpu", dtype: torch.dtype | None = None
             ) -> "WorldModel":
        """VAE in float32, DiT in bf16 on CUDA / float32 on the CPU (as `generate` runs them)."""
        root, device = Path(root), torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        ckpt = find_checkpoint(root)
        if len(ckpt.experts) != 1:
            raise ValueError(f"{root}: expected a one-expert world model, found {list(ckpt.experts)}")
        vae = load_vae(root / VAE_FILE, dtype=torch.float32, device=device)
        dit = load_dit(next(iter(ckpt.experts.values())), dtype=dtype, device=device, cfg=ckpt.config)
        dit.set_fuse(False)
        return cls(root, ckpt.config, vae, dit, device, dtype)

    def encode_text(self, prompts: list[str]) -> list[torch.Tensor]:
        return encode_prompts(prompts, self.root, cache=None, placement="gpu", device=self.device,
                              dtype=torch.float32, text_len=self.config.text_len)

    @torch.no_grad()
    def generate(self, first_frames: torch.Tensor, poses: list, prompts: list[str], seeds: list[int],
                 steps: int | None = None, zero_camera: bool = False, solver: str = "unipc",
                 intrinsics=cam.DEFAULT_INTRINSICS, frames: int = 33,
                 step_cache: StepCache | None = None, guide: float = 1.0) -> torch.Tensor:
        """Videos [B, 3, frames, H, W] in [-1, 1] (float32, on the device) from first frames [B, 3, H, W]
        in [-1, 1], keyboard trajectories (`frames` + 1 camera-to-world poses each), prompts and noise
        seeds. `zero_camera`: the camera input is all zeros (the ablation). `step_cache`: skip the blocks where
        it decides to (pipelines/step_cache.py; one decision per step for the whole batch, so measure it one
        scene at a time); its `skipped` list says where. `guide` > 1: classifier-free guidance against the
        empty prompt, v = v("") + guide * (v(prompt) - v("")), two forwards a step (meaningful for a model
        trained with prompt dropout: train/world.py `--prompt_dropout`)."""
        b, _, h, w = first_frames.shape
        cfg, sampling = self.config, self.config.sampling
        if sampling.guide_scale != (1.0, 1.0):
            raise NotImplementedError("WorldModel.generate takes the guidance as `guide`, not from the variant")
        if guide != 1.0 and step_cache is not None:
            raise ValueError("WorldModel.generate: step caching with classifier-free guidance is not supported")
        steps = steps or sampling.steps
        y = torch.stack([image_condition(self.vae, img.float().cpu(), frames) for img in first_frames])
        camera = torch.stack([cam.camera_condition(p, intrinsics, frames, h, w, truncate=False) for p in poses])
        if zero_camera:
            camera.zero_()
        ctx = self.encode_text(prompts)
        n = max(len(c) for c in ctx)
        context = torch.stack([F.pad(c, (0, 0, 0, n - len(c))) for c in ctx])
        if guide != 1.0:
            empty = self.encode_text([""])[0]
            uncond = F.pad(empty, (0, 0, 0, n - len(empty)))[None].expand_as(context)
        shape = (cfg.latents.channels, *cfg.latent_grid(frames, h, w))
        x = torch.stack([initial_noise(s, shape) for s in seeds]).to(self.device)
        sampler = (FlowUniPC if solver == "unipc" else FlowEuler)(steps, sampling.shift)
        y, camera = y.to(self.device), camera.to(self.device, self.dtype)
        if step_cache is not None:
            step_cache.start(["main"] * len(sampler.timesteps))
        for i, t in enumerate(sampler.timesteps):
            stack, skip = None, False
            if step_cache is not None:
                stack = step_cache.stacks("main", 1)[0]
                skip = step_cache.decide(i, x)
            tt = t.to(self.device).reshape(1).expand(b)
            v = self.dit(x, tt, context, y=y, camera=camera, stack=stack)
            if guide != 1.0:
                vu = self.dit(x, tt, uncond, y=y, camera=camera)
                v = vu + guide * (v - vu)
            if step_cache is not None:
                step_cache.done(i, x, v, skip)
            x = sampler.step(v.float(), x)
        if step_cache is not None:
            step_cache.finish()
        return self.vae.decode(x)


def student_checkpoint(folder: str | Path, student: str | Path = WORLD_STUDENT, base: str | Path = WORLD_CHECKPOINT
                       ) -> Path:
    """A complete causal checkpoint folder in `folder` (as `worldstream stream --ckpt_dir` takes one): the
    student's `transformers/` (and its tiny decoder `decoder.safetensors`, where it has one) and the VAE, umt5
    encoder and tokenizer of `base` at its root, copied."""
    import shutil

    from ..checkpoints.t5 import T5_CHECKPOINT, T5_TOKENIZER
    from ..checkpoints.tiny_decoder import DECODER_FILE
    folder, student, base = Path(folder), Path(student), Path(base)
    if not (student / "transformers" / "config.json").is_file():
        raise FileNotFoundError(f"{student}: no transformers/config.json (a causal student's DiT)")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(student / "transformers", folder / "transformers", dirs_exist_ok=True)
    if (student / DECODER_FILE).is_file():
        shutil.copyfile(student / DECODER_FILE, folder / DECODER_FILE)
    shutil.copyfile(base / VAE_FILE, folder / VAE_FILE)
    shutil.copyfile(base / T5_CHECKPOINT, folder / T5_CHECKPOINT)
    shutil.copytree(base / T5_TOKENIZER, folder / T5_TOKENIZER, dirs_exist_ok=True)
    return folder


# ---- metrics (images in [-1, 1]) ----------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor, dims=(-3, -2, -1)) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), reduced over `dims` (default: C, H, W)."""
    mse = (a.float() - b.float()).pow(2).mean(dim=dims)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM (Gaussian window 11, σ 1.5, valid region, per channel then averaged) of images [..., 3, H, W] in
    [-1, 1], on [0, 1] intensities; one value per leading index."""
    lead = a.shape[:-3]
    x = (a.float().reshape(-1, *a.shape[-3:]) + 1) / 2
    y = (b.float().reshape(-1, *b.shape[-3:]) + 1) / 2
    c = x.shape[1]
    g = torch.exp(-((torch.arange(window, dtype=torch.float32, device=x.device) - window // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, k, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).reshape(lead)


# ---- the built-in demo ------------------------------------------------------------------------------------

DEMO_PROMPT = "a sunny noon grassy field with colourful boxes"
DEMO_SCENE_SEED = 4
DEMO_ACTION_STRING = "w-8,jw-12,lw-12"   # forward, then forward turning left, then forward turning right: 33 frames


def demo_first_frame(prompt: str = DEMO_PROMPT, seed: int = DEMO_SCENE_SEED, width: int = 160, height: int = 96):
    """The demo's first frame (PIL RGB): the procedural world of `seed` (words in `prompt` pick the time of day,
    ground, weather, box colours) seen from the start pose, rendered like the training clips."""
    from PIL import Image

    from ..world import make_scene, render

    frame = render(make_scene(seed, prompt), torch.eye(4), height=height, width=width, device="cpu")[0]
    return Image.fromarray(((frame + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy(), "RGB")
