"""The Wan model family: every DiT variant worldstream runs, as one table of dataclasses, and every fact about
them that other code derives from (this file is their one home).

Shapes come from `shared/spec/wan-architecture.md` (sections 1-2), sampling defaults from section 4. Each
full-size config has a `tiny` sibling with the same structure (same optional branches, same control channels,
same experts and defaults) for CPU tests.

What lives here, per config:
  * the DiT's shape (`DiTConfig` fields) and how many experts the model has;
  * the latent grid it works on (`LatentSpace`: the VAE's channels and its time / space strides) and the
    token arithmetic derived from it and the patch size (`latent_grid`, `tokens`);
  * the upstream task name and the sampling defaults (`Sampling`);
  * the block cost model the planner schedules with: parameters per block and outside the blocks, FLOPs and
    elementwise bytes of one block forward, and the activation peak of a forward, all from tokens and batch.
A second model family (Kandinsky 5) adds its own config class with the same methods; the planner and the CLI
only call those methods.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LatentSpace:
    """The video VAE's latent grid: `channels` per latent pixel; `stride` = (time, height, width) compression.

    The first latent frame is one video frame, every later one `stride[0]` frames: F = s*(T-1) + 1."""
    channels: int = 16
    stride: tuple[int, int, int] = (4, 8, 8)

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.stride[0] + 1

    def video_frames(self, latent_frames: int) -> int:
        return self.stride[0] * (latent_frames - 1) + 1

    def round_frames(self, frames: int) -> int:
        """The largest valid frame count (s*n + 1) <= frames."""
        return (frames - 1) // self.stride[0] * self.stride[0] + 1


WAN_LATENTS = LatentSpace(channels=16, stride=(4, 8, 8))   # the Wan2.1 VAE (spec section 6)


@dataclass(frozen=True)
class Sampling:
    """Sampling defaults of a variant (spec section 4; upstream configs)."""
    steps: int
    shift: float
    guide_scale: tuple[float, float]     # (low-noise expert or the single model, high-noise expert)
    boundary: float | None = None        # two experts: "high" while t >= boundary * 1000
    seed: int | None = None              # None: a random seed (printed)
    frame_num: int = 81
    shift_480p: float | None = None      # upstream's shift at the 480p sizes, when it differs (Wan2.1 I2V: 3.0)


@dataclass(frozen=True)
class StepDistill:
    """LightX2V's few-step students (shared/spec/more-models.md): `timesteps` of the 1000-step schedule
    (σ = linspace(1, 0, 1001)[1000 − t] shifted by `shift`, the model fed σ·1000 as a float), deterministic
    Euler between them, no CFG, no re-noise. Two experts: the steps before `boundary_step` run the high-noise
    expert (LightX2V's `boundary_step_index`)."""
    timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    boundary_step: int | None = None

    @property
    def steps(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class CausalSampling:
    """How a causal (real-time) student runs (spec realtime.md): chunks of `chunk` latent frames, each denoised
    at the timesteps `timesteps[i]` of the 1000-step flow schedule with `shift` (one forward per step, no CFG),
    then one refresh forward at t = 0; self-attention over a KV cache of `window` frames with `sink` (None:
    global, every frame since the start)."""
    chunk: int
    step_indices: tuple[int, ...]
    shift: float = 10.0
    window: int | None = None
    sink: int = 0
    seed: int = 42


class VideoTokens:
    """The token grid and variant name of a video transformer with `name`, `latents` (a LatentSpace) and
    `patch_size` (both families)."""
    name: str
    latents: LatentSpace
    patch_size: tuple[int, int, int]

    @property
    def base_name(self) -> str:
        """The variant without the '-tiny' suffix."""
        return self.name.removesuffix("-tiny")

    @property
    def is_tiny(self) -> bool:
        return self.name.endswith("-tiny")

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width) of a frames x height x width video."""
        st, sh, sw = self.latents.stride
        return self.latents.latent_frames(frames), height // sh, width // sw

    def tokens(self, frames: int, height: int, width: int) -> int:
        """Transformer tokens of a video: latent grid / patch (Wan at 480x832: 1,560 per latent frame)."""
        f, h, w = self.latent_grid(frames, height, width)
        pt, ph, pw = self.patch_size
        return (f // pt) * (h // ph) * (w // pw)


@dataclass(frozen=True)
class DiTConfig(VideoTokens):
    name: str
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    image_dim: int | None = None      # Wan2.1 I2V: CLIP feature width (1280) -> img_emb, k_img/v_img
    image_tokens: int = 257           # CLIP tokens prepended to the text context
    control_dim: int | None = None    # LingBot-World: 6 (camera rays) or 7 (rays_d + WASD)
    causal: bool = False              # LingBot-World Fast: chunked causal attention
    rope_max_len: int = 1024
    experts: int = 1                  # 2: Wan2.2 / LingBot high-noise + low-noise experts
    task: str | None = None           # upstream's task name (generate.py --task)
    sampling: Sampling | None = None  # None: not runnable by `generate` (no defaults known)
    realtime: CausalSampling | None = None   # causal students: the chunk loop's settings
    student: StepDistill | None = None       # how a LightX2V step-distilled student of this variant samples
    latents: LatentSpace = WAN_LATENTS
    trained_size: tuple[int, int] | None = None   # (width, height) of a small model trained at one size: it
                                                  # takes any multiple of 16 (as the tiny ones) and defaults to this

    # ---- shape ---------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head dims given to (frame, row, column) positions: d - 4(d//6), 2(d//6), 2(d//6)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @property
    def control_cell(self) -> int:
        """Pixels per side of the camera map's cells folded into channels: one latent pixel (the VAE stride)."""
        return self.latents.stride[1]

    @property
    def control_in(self) -> int:
        """Input features of `patch_embedding_wancamctrl`: cell x cell pixels x the 1x2x2 latent patch."""
        assert self.control_dim is not None
        return self.control_dim * self.control_cell ** 2 * math.prod(self.patch_size)

    @property
    def has_camera(self) -> bool:
        return self.control_dim is not None

    @property
    def has_image_branch(self) -> bool:
        return self.image_dim is not None

    @property
    def pixel_multiple(self) -> int:
        """Video sides must be multiples of this: the VAE's spatial stride times the DiT's spatial patch."""
        return self.latents.stride[1] * self.patch_size[1]

    # ---- the block cost model (runtime/planner.py schedules with it) ------------------------------------------
    def param_counts(self) -> tuple[int, int]:
        """(parameters of one block, parameters outside the blocks), from the module definitions."""
        return _param_counts(self)

    def block_module(self, dtype):
        """One block as it is stored in a `dtype` run (built on the current default device: use meta)."""
        from .dit import Block
        return Block(self).to(dtype)

    def weight_bytes(self, bytes_per_param: float) -> tuple[int, int]:
        """(bytes of one block, bytes outside the blocks): every parameter in the run's dtype."""
        per_block, outside = self.param_counts()
        return int(per_block * bytes_per_param), int(outside * bytes_per_param)

    def block_flops(self, tokens: int, batch: int, keys: int | None = None) -> tuple[float, float]:
        """(matmul FLOPs, attention FLOPs) of one block forward over `tokens` tokens for `batch` samples, whose
        self-attention sees `keys` tokens (default: the same tokens; a causal chunk: the KV cache's window)."""
        w = self.block_work(tokens, batch, keys)
        return w.linear_flops + w.camera_flops, w.self_attn_flops + w.cross_attn_flops

    def block_work(self, tokens: int, batch: int, keys: int | None = None) -> "BlockWork":
        """The work of one block forward, split the way the planner prices it (runtime/planner.py)."""
        d, f, L, B = self.dim, self.ffn_dim, tokens, batch
        keys = L if keys is None else keys
        text = self.text_len + (self.image_tokens if self.has_image_branch else 0)
        return BlockWork(
            # self-attention q, k, v, o and cross-attention q, o over the video tokens, cross k, v over the text
            # (the image branch's k_img, v_img over its tokens), the FFN
            linear_flops=2 * B * L * (6 * d * d + 2 * d * f) + 2 * B * text * 2 * d * d,
            camera_flops=2 * 1 * L * 4 * d * d if self.has_camera else 0,   # once for the whole CFG batch
            self_attn_flops=4 * B * L * keys * d,
            cross_attn_flops=4 * B * L * text * d,
            elementwise_bytes=self.block_elementwise_bytes(tokens, batch),
            # inputs of the compressible linears, quantized per token for fp8 matmuls: self-attention's q/k/v
            # (once) and o, cross-attention's q and o, the FFN's two (the second fused with the GELU)
            act_quant_elems=B * L * (5 * d + f),
            qkv_elems=B * (L + 2 * keys) * d,
            # the low-memory block's extra traffic: the queries' second modulate (6 bytes per element) and each
            # chunk's K and V copied into place (8)
            chunk_bytes=14 * B * L * d,
        )

    def kv_cache_bytes(self, frames: int, height: int, width: int, bytes_per_value: int = 2) -> int:
        """A causal model's self-attention cache for `frames` latent frames: K and V of every layer."""
        return 2 * self.num_layers * self.tokens(self.latents.video_frames(frames), height, width) * self.dim \
            * bytes_per_value

    def block_elementwise_bytes(self, tokens: int, batch: int) -> float:
        """Memory traffic of the block's float32 elementwise work: ~12 passes over [B, L, dim] (compiled norms,
        modulation, RoPE, gated residuals), and for a camera model its eager update of the residual stream
        ((1 + scale) * x + shift: ~20 bytes per element and sample, ~10 more for the batch-1 camera features)."""
        n = tokens * self.dim
        return 12 * batch * n * 4 + ((20 * batch + 10) * n if self.has_camera else 0)

    def activation_bytes(self, tokens: int, batch: int, chunk: int | None = None, attention: str = "sdpa",
                         fp8: bool = False, keep_tokens: bool = False) -> float:
        """Peak activation memory of a forward of `batch` samples over `tokens` tokens, with compiled elementwise
        kernels (what runs on a GPU), x1.1 for the allocator (the margin measured on an H100, BENCHMARKS.md).

        It is the live set at the forward's largest moment, per sample in units of tokens*dim bytes (f = ffn /
        dim), checked against a trace of the real code at full size (tests/test_chunked_block.py):
          plain block (`chunk` None): the FFN, where the block's input and output residual streams (float32,
            4 + 4), the modulated input (2) and the hidden tensor before and after the GELU (2f + 2f; fp8:
            2f + f) are alive; or self-attention's output projection, with the input stream (4), the modulated
            input (2; fp8: +1 quantized), q, k, v (6; 8-bit attention: +3 quantized), the attention output (2)
            and its projection (2);
          low-memory block (`chunk` tokens, models/dit.py): the float32 stream (4) and every token's K and V
            (4; 8-bit attention: +2 quantized copies while they are made), plus one chunk's temporaries.
        Besides: the camera features (bf16, batch 1: 2 per token), the embedded text and each block's cross
        K / V, the RoPE tables, and `keep_tokens` (step caching keeps the bf16 tokens through the stack: 2).
        Before the blocks the time projection's weight is read as float32 (24 * dim^2 bytes) beside the
        tokens."""
        d, L, B = self.dim, tokens, batch
        f = self.ffn_dim / d
        unit = L * d
        a8 = attention == "8bit"
        if chunk is None:
            ffn = 4 + 4 + 2 + 2 * f + (f if fp8 else 2 * f)
            attn = 4 + 2 + (1 if fp8 else 0) + 6 + (3 if a8 else 0) + 2 + 2
            block = B * max(ffn, attn) * unit
        else:   # K and V with one chunk's temporaries, or later one FFN chunk's (K and V are gone by then)
            c = min(chunk, L)
            block = max(B * (4 + 4 + (2 if a8 else 0)) * unit + 10 * c * d,
                        B * 4 * unit + c * (4 * d + (3 if fp8 else 4) * self.ffn_dim))
        cam = 2 * unit if self.has_camera else 0
        text = B * self.text_len * d * 2 * 3
        rope = L * self.head_dim * 4          # the cos / sin tables, float32
        kept = 2 * B * unit if keep_tokens else 0
        blocks = block + cam + text + rope + kept
        before = 24 * d * d + 2 * B * unit + cam + text + rope
        return 1.1 * max(blocks, before)

    def step_cache_bytes(self, tokens: int, batch: int) -> float:
        """The step cache's residual (models/dit.py StackCache): float32 [batch, tokens, dim], kept between
        steps (two forwards of one sample keep one each: the same bytes as one of two)."""
        return 4 * batch * tokens * self.dim

    # ---- variants ---------------------------------------------------------------------------------------------
    def tiny(self) -> "DiTConfig":
        """Same structure, toy sizes: 2 blocks of width 64 (head_dim 16), 32-wide text. A trained-small model
        (`trained_size`) keeps its time-embedding width, so its tiny sibling is told apart from the others'
        by the weights (lingbot-cam-world-tiny is otherwise shaped like lingbot-cam-tiny)."""
        return replace(
            self, name=self.name + "-tiny", dim=64, ffn_dim=128, num_heads=4, num_layers=2,
            text_dim=32, text_len=16, freq_dim=32 if self.trained_size is None else self.freq_dim,
            image_dim=32 if self.image_dim is not None else None,
            image_tokens=5 if self.image_dim is not None else self.image_tokens)

    @property
    def any_size(self) -> bool:
        """Runs at any multiple of `pixel_multiple` (toy and trained-small models), not only upstream's sizes."""
        return self.is_tiny or self.trained_size is not None


@dataclass(frozen=True)
class BlockWork:
    """One block forward's work, as the planner prices it: FLOPs of the compressible linears (fp8 matmuls can
    run them), of the camera layers (always bf16), of self- and cross-attention; bytes of float32 elementwise
    traffic; activation elements quantized per token for fp8 matmuls; q, k, v elements an 8-bit attention
    quantizes; the extra traffic of the low-memory block."""
    linear_flops: float
    camera_flops: float
    self_attn_flops: float
    cross_attn_flops: float
    elementwise_bytes: float
    act_quant_elems: float
    qkv_elems: float
    chunk_bytes: float


@functools.lru_cache(maxsize=64)
def _param_counts(cfg: DiTConfig) -> tuple[int, int]:
    import torch

    from .dit import WanDiT
    with torch.device("meta"):
        m = WanDiT(cfg)
    per_block = sum(p.numel() for p in m.blocks[0].parameters())
    total = sum(p.numel() for p in m.parameters())
    return per_block, total - cfg.num_layers * per_block


_WAN14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_WAN1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_LINGBOT = Sampling(70, 10.0, (5.0, 5.0), boundary=0.947, seed=42)
# LingBot-World Fast v1: 3-frame chunks at t = 999, 978, 947, 825; the cache is global (upstream's default).
_FAST_V1 = CausalSampling(chunk=3, step_indices=(0, 179, 358, 679), shift=10.0)
# v2 causal-fast: 4-frame chunks at t = 999, 967, 908, 768; upstream's scripts run a window of 18 with sink 6.
_FAST_V2 = CausalSampling(chunk=4, step_indices=(0, 250, 500, 750), shift=10.0, window=18, sink=6)
# The small LingBot-World Cam model trained on procedural worlds (train/world.py; shipped in assets/tiny_world):
# one expert (two 16-bit experts of this size would not fit the 30 MB the package ships, and a few GPU
# minutes of training are better spent on one model that sees every noise level); no guidance (the first
# frame fixes the world; a guide scale of 1 skips the unconditional pass); 30 UniPC steps at shift 3.
_WORLD = Sampling(30, 3.0, (1.0, 1.0), seed=42, frame_num=33)
# Its causal student, distilled from it (train/distill.py; shipped in assets/tiny_world_fast): the teacher's widths
# with 6 of its 8 blocks (16-bit weights within the package's 20 MB for the student), chunks of 3 latent frames
# (a 33-frame clip is 3 chunks), 4 steps at the teacher's shift 3 (t = 999, 899, 749, 499) + the refresh, a
# window of 9 latent frames (the training length) with the first chunk as sink.
_FAST_WORLD = CausalSampling(chunk=3, step_indices=(0, 250, 500, 750), shift=3.0, window=9, sink=3)
# LightX2V's 4-step students: Wan2.1 (one model) and Wan2.2 A14B (two experts, 2 + 2 steps). LingBot-World is a
# fine-tuned Wan2.2 A14B: the same sampler runs it when a step-distill LoRA or student is given for it.
_STUDENT = StepDistill()
_STUDENT_MOE = StepDistill(boundary_step=2)

VARIANTS: dict[str, DiTConfig] = {c.name: c for c in [
    DiTConfig("wan2.1-t2v-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, task="t2v-1.3B",
              sampling=Sampling(50, 5.0, (5.0, 5.0))),
    DiTConfig("wan2.1-t2v-14b", **_WAN14B, task="t2v-14B", sampling=Sampling(50, 5.0, (5.0, 5.0)),
              student=_STUDENT),
    DiTConfig("wan2.1-i2v-14b", **_WAN14B, in_dim=36, image_dim=1280, task="i2v-14B",
              sampling=Sampling(40, 5.0, (5.0, 5.0), shift_480p=3.0), student=_STUDENT),
    DiTConfig("wan2.2-i2v-a14b", **_WAN14B, in_dim=36, experts=2, task="i2v-A14B",
              sampling=Sampling(40, 5.0, (3.5, 3.5), boundary=0.900), student=_STUDENT_MOE),
    DiTConfig("lingbot-cam", **_WAN14B, in_dim=36, control_dim=6, experts=2, task="i2v-A14B", sampling=_LINGBOT,
              student=_STUDENT_MOE),
    DiTConfig("lingbot-act", **_WAN14B, in_dim=36, control_dim=7, experts=2, task="i2v-A14B", sampling=_LINGBOT,
              student=_STUDENT_MOE),
    DiTConfig("lingbot-fast", **_WAN14B, in_dim=36, control_dim=6, causal=True, realtime=_FAST_V1),
    DiTConfig("lingbot-fast-v2", **_WAN14B, in_dim=36, control_dim=6, causal=True, realtime=_FAST_V2),
    DiTConfig("lingbot-fast-v2-1.3b", **_WAN1_3B, in_dim=36, control_dim=6, causal=True, realtime=_FAST_V2),
    DiTConfig("lingbot-cam-world", dim=256, ffn_dim=768, num_heads=4, num_layers=8, in_dim=36, text_dim=32,
              text_len=64, control_dim=6, task="i2v-A14B", sampling=_WORLD, trained_size=(160, 96)),
    DiTConfig("lingbot-fast-world", dim=256, ffn_dim=768, num_heads=4, num_layers=6, in_dim=36, text_dim=32,
              text_len=64, control_dim=6, causal=True, realtime=_FAST_WORLD, trained_size=(160, 96)),
]}


def all_variants() -> dict:
    """Every model family's variants by name: the Wan family (VARIANTS) and Kandinsky 5 (models/kandinsky.py)."""
    from .kandinsky import KANDINSKY_VARIANTS
    return {**VARIANTS, **KANDINSKY_VARIANTS}


def get_config(name: str) -> DiTConfig:
    """`name` is a variant of any family (`all_variants`), optionally with a '-tiny' suffix."""
    base = name[: -len("-tiny")] if name.endswith("-tiny") else name
    known = all_variants()
    if base not in known:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(known)} (each also as <name>-tiny)")
    cfg = known[base]
    return cfg.tiny() if name.endswith("-tiny") else cfg
