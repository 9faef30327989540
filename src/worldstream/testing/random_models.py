"""Random full-size models with no checkpoint: what the GPU benchmarks run (no checkpoint can be downloaded
there), and what `worldstream serve --random_weights VARIANT` serves (benchmarks/serve_gpu.py).

    runner = random_runner(cfg, device, dtype, quant="fp8", attention="8bit")   # the DiT, made on the device
    vae, taehv = random_vae(device), random_taehv(device, torch.float16)
    image, context = random_inputs(cfg, 480, 832)                                # first frame and prompt
    student = random_student("lingbot-fast", device="cuda")                      # all of it as a stream Student

Every weight is drawn from a fixed seed, so two processes (benchmarks/realtime.py in one, the server in the
other) build the same model and the same first frame. Everything is resident on the device: no VRAM / RAM
plan, no streaming.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.dit import Checkpoint
from ..models import camera as cam
from ..models.configs import get_config
from ..models.taehv import TAEHV, TAEHVConfig
from ..models.vae import VAEConfig, WanVAE
from ..pipelines.conditioning import GenerationError
from ..pipelines.realtime import EXPERT
from ..pipelines.stream import StreamRequest, Student, check_steps, check_window, stream_size
from ..runtime.loading import RandomLoader
from ..runtime.runner import DiTRunner

RANDOM_ROOT = Path("<random weights>")      # the stand-in checkpoint's root: nothing is ever read from it


def random_runner(cfg, device, dtype, quant=None, attention: str = "sdpa", fuse: bool = True,
                  graphs: bool = False) -> DiTRunner:
    """The causal student's DiT with random weights (made on the device at its first forward), all resident;
    `graphs`: its chunk forwards replayed as CUDA graphs (runtime/graphs.py)."""
    return DiTRunner([EXPERT], RandomLoader(cfg, quant=quant), device, dtype, None, attention=attention, fuse=fuse,
                     graphs=graphs)


def random_vae(device, tiny: bool = False) -> WanVAE:
    """The Wan2.1 VAE (float32, as upstream runs it) with random weights; `tiny`: its toy width."""
    torch.manual_seed(0)
    m = WanVAE(VAEConfig.tiny() if tiny else VAEConfig()).to(device).eval().requires_grad_(False)
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    return m


def random_taehv(device, dtype) -> TAEHV:
    """The TAEHV tiny decoder (taew2_1's shape) with random weights."""
    torch.manual_seed(0)
    m = TAEHV(TAEHVConfig()).to(device=device, dtype=dtype).eval().requires_grad_(False)
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    return m


def random_inputs(cfg, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first frame [3, H, W] in [-1, 1], prompt embedding [len, text_dim]) from a fixed seed."""
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, height, width, generator=g) * 2 - 1
    context = torch.randn(min(40, cfg.text_len), cfg.text_dim, generator=g)
    return image, context


def prompt_embedding(cfg, text: str) -> torch.Tensor:
    """A random embedding seeded by the text: with no text encoder, a new prompt still changes the stream."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little")
    return torch.randn(min(40, cfg.text_len), cfg.text_dim, generator=torch.Generator().manual_seed(seed))


class RandomStudent(Student):
    """A `Student` on random weights: prompts become `prompt_embedding`s (there is no text encoder)."""

    def encode_prompt(self, prompt: str, *, prompt_cache=None, placement=None) -> torch.Tensor:
        return prompt_embedding(self.config, prompt).to(self.device, self.dtype)


def parse_size(size: str | None, cfg) -> tuple[int, int]:
    """`--size` as a stream reads it (`pipelines.stream.stream_size`) -> (height, width); with no first frame
    to fit (no `i2v_size` rounding) each side must also be a multiple of 16."""
    w, h = stream_size(cfg, size)
    if w % 16 or h % 16:
        raise GenerationError(f"--size {size}: each side a multiple of 16 between 16 and 2048")
    return h, w


def random_student(variant: str, *, device=None, dtype=None, size: str | None = None, quant: str | None = None,
                   attention: str = "sdpa", vae: str = "wan", steps: int | None = None, window: int | None = -1,
                   sink: int | None = None, seed: int | None = None, cuda_graphs: bool = False) -> RandomStudent:
    """A causal student (`lingbot-fast`, `lingbot-fast-v2`, `lingbot-fast-v2-1.3b`, any of them `-tiny`) with
    random full-size weights, resident on `device` (default cuda if available): the DiT, the Wan VAE (first
    frame) and the decoder (`vae="wan"`, or `"tiny"`: a random TAEHV, float16 on CUDA). No checkpoint folder;
    a first frame and prompt from `random_inputs`. Bad arguments raise GenerationError before anything is made."""
    try:
        cfg = get_config(variant)
    except KeyError as e:
        raise GenerationError(f"--random_weights {variant!r}: {e.args[0]}") from None
    rt = getattr(cfg, "realtime", None)      # (other families' configs have no chunk loop at all)
    if rt is None:
        raise GenerationError(f"--random_weights {variant}: not a causal (real-time) student; one of "
                              "lingbot-fast, lingbot-fast-v2, lingbot-fast-v2-1.3b (or -tiny)")
    if vae not in ("wan", "tiny"):
        raise GenerationError(f"--vae {vae!r}: wan or tiny")
    check_steps(cfg, steps)
    check_window(rt, window, sink)
    h, w = parse_size(size, cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    image, context = random_inputs(cfg, h, w)
    lat = cfg.latents
    frames = lat.video_frames(rt.chunk)
    ckpt = Checkpoint(RANDOM_ROOT, "random", {EXPERT: RANDOM_ROOT}, cfg)
    request = StreamRequest(ckpt, "random weights", image, h, w, frames, [frozenset()] * frames,
                            cam.DEFAULT_INTRINSICS.astype(np.float64), seed=seed, steps=steps, window=window, sink=sink)
    wan = random_vae(device, tiny=cfg.is_tiny)
    decoder = wan if vae == "wan" else random_taehv(device, torch.float16 if cuda else torch.float32)
    runner = random_runner(cfg, device, dtype, quant, attention, graphs=cuda_graphs)
    return RandomStudent(request, runner, wan, decoder, context.to(device), device, dtype)

