"""The Kandinsky 5 family (video Pro 20B and Lite 2B, image-to-video and text-to-video): one dataclass table
beside the Wan family (models/configs.py), with the same cost-model methods, so the planner, `worldstream plan`
and `worldstream info` handle it without special cases.

Facts: shared/spec/more-models.md (Kandinsky 5 section) and diffusers' `Kandinsky5Transformer3DModel`
(models/transformers/transformer_kandinsky.py), whose math worldstream runs unchanged. What streams is the
`visual_transformer_blocks` stack (60 decoder blocks for Pro, 612.5 MB of parameters each); the 4 text blocks,
the embeddings, RoPE tables and `out_layer` stay resident (the planner counts them as "outside the blocks").

Each block's `visual_modulation` (and the embeddings' time layers, the head's modulation) are kept in float32
(diffusers' `_keep_in_fp32_modules`), so a Pro block's slab is 688 MB in a bf16 run, not 612.5 MB:
`weight_bytes` gives the planner the stored bytes.

The parameter counts are analytic (no diffusers import to plan); tests/test_kandinsky.py checks them, and the
FLOPs of the linears, against a meta-device diffusers transformer built from the full-size config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .configs import BlockWork, LatentSpace, VideoTokens

# HunyuanVideo VAE: 16 channels, 4x time, 8x space (scaling 0.476986, set in vae/config.json).
HUNYUAN_LATENTS = LatentSpace(channels=16, stride=(4, 8, 8))
FP32_MODULES = ("time_embeddings", "modulation", "visual_modulation", "text_modulation")   # diffusers' list
QUANT_SKIP = ("modulation",)    # fp8 / int8 block weights: the float32 modulation stays as it is


@dataclass(frozen=True)
class KandinskySampling:
    """Defaults of the diffusers pipelines: 50 flow-match Euler steps, CFG 5 (two forwards), 121 frames of
    512x768 at 24 fps. The scheduler's shift comes from the checkpoint's scheduler/ folder."""
    steps: int = 50
    guide_scale: float = 5.0
    frame_num: int = 121
    size: tuple[int, int] = (768, 512)     # (width, height)
    fps: int = 24
    seed: int | None = None


@dataclass(frozen=True)
class KandinskyConfig(VideoTokens):   # (tokens: 512x768 gives 1,536 per latent frame, 47,616 for 121 frames)
    name: str
    model_dim: int
    ff_dim: int
    time_dim: int
    num_layers: int                         # visual_transformer_blocks (the streamed stack)
    num_text_blocks: int
    axes_dims: tuple[int, int, int]
    task: str = "i2v"                       # "i2v" (first latent frame is the image) | "t2v"
    in_visual_dim: int = 16
    out_visual_dim: int = 16
    visual_cond: bool = True                # input = latents + conditioning latents + mask (2C + 1 channels)
    in_text_dim: int = 3584                 # Qwen2.5-VL-7B hidden
    in_text_dim2: int = 768                 # CLIP-L pooled
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512                     # Qwen tokens the cost model assumes (the pipeline's maximum)
    attention_type: str = "regular"         # "nabla": sparse (flex_attention) in the checkpoint's config
    sampling: KandinskySampling = KandinskySampling()
    latents: LatentSpace = HUNYUAN_LATENTS
    family: str = "kandinsky5"
    experts: int = 1
    student = None                          # no step-distilled sampler known (the CLI asks)
    image_dim = None
    causal = False
    batched_guidance = False                # diffusers runs cond and uncond as two forwards (their prompts
                                            # have different lengths and the model takes no attention mask)
    low_memory_block = False                # no chunked block (WanDiT.set_chunk) for this family

    # ---- shape ---------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.model_dim

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def has_image_branch(self) -> bool:
        return False                        # no CLIP image tokens: the image enters as the first latent

    @property
    def has_camera(self) -> bool:
        return False

    @property
    def pixel_multiple(self) -> int:
        return self.latents.stride[1] * self.patch_size[1] * (8 if self.attention_type == "nabla" else 1)

    def diffusers_config(self) -> dict:
        """The transformer/config.json entries of this variant (diffusers' Kandinsky5Transformer3DModel)."""
        return dict(in_visual_dim=self.in_visual_dim, in_text_dim=self.in_text_dim, in_text_dim2=self.in_text_dim2,
                    time_dim=self.time_dim, out_visual_dim=self.out_visual_dim, patch_size=list(self.patch_size),
                    model_dim=self.model_dim, ff_dim=self.ff_dim, num_text_blocks=self.num_text_blocks,
                    num_visual_blocks=self.num_layers, axes_dims=list(self.axes_dims), visual_cond=self.visual_cond,
                    attention_type=self.attention_type)

    # ---- parameters --------------------------------------------------------------------------------------------
    def _param_parts(self) -> dict[str, int]:
        d, f, t = self.model_dim, self.ff_dim, self.time_dim
        attn = 4 * (d * d + d) + 2 * self.head_dim            # q, k, v, out (+ bias); RMSNorm q / k
        ffn = 2 * d * f                                       # no bias
        visual_in = 2 * self.in_visual_dim + 1 if self.visual_cond else self.in_visual_dim
        return dict(
            block_mod=t * 9 * d + 9 * d, block_rest=2 * attn + ffn,
            text_mod=t * 6 * d + 6 * d, text_rest=attn + ffn,
            time=(d * t + t) + (t * t + t),
            text_emb=self.in_text_dim * d + d + 2 * d, pooled=self.in_text_dim2 * t + t + 2 * t,
            visual_emb=math.prod(self.patch_size) * visual_in * d + d,
            out_mod=t * 2 * d + 2 * d, out=d * math.prod(self.patch_size) * self.out_visual_dim
            + math.prod(self.patch_size) * self.out_visual_dim)

    def param_counts(self) -> tuple[int, int]:
        """(parameters of one visual block, parameters outside them: text blocks, embeddings, head)."""
        p = self._param_parts()
        per_block = p["block_mod"] + p["block_rest"]
        outside = (self.num_text_blocks * (p["text_mod"] + p["text_rest"]) + p["time"] + p["text_emb"]
                   + p["pooled"] + p["visual_emb"] + p["out_mod"] + p["out"])
        return per_block, outside

    def weight_bytes(self, bytes_per_param: float) -> tuple[int, int]:
        """(bytes of one visual block, bytes outside the blocks) with the fp32 modules kept float32."""
        p = self._param_parts()
        per_block, outside = self.param_counts()
        fp32_block = p["block_mod"]
        fp32_out = self.num_text_blocks * p["text_mod"] + p["time"] + p["out_mod"]
        return (int((per_block - fp32_block) * bytes_per_param + 4 * fp32_block),
                int((outside - fp32_out) * bytes_per_param + 4 * fp32_out))

    def block_module(self, dtype):
        """One visual block as a `dtype` run stores it (its modulation float32), from diffusers' class."""
        from diffusers.models.transformers.transformer_kandinsky import Kandinsky5TransformerDecoderBlock
        block = Kandinsky5TransformerDecoderBlock(self.model_dim, self.time_dim, self.ff_dim, self.head_dim).to(dtype)
        block.visual_modulation.float()
        return block

    quant_skip = QUANT_SKIP

    # ---- the block cost model (runtime/planner.py) ---------------------------------------------------------------
    def block_work(self, tokens: int, batch: int, keys: int | None = None) -> BlockWork:
        """One visual block forward (diffusers' Kandinsky5TransformerDecoderBlock), dense attention.

        Linears: self-attention q, k, v, out and cross-attention q, out over the visual tokens, cross k, v over
        the text tokens, the FFN (d -> ff -> d), the modulation (batch rows). Elementwise traffic: the block
        runs eagerly in float32 around each sub-layer (norm, (1 + scale) * x + shift, the gated residual: ~32 +
        ~42 bytes per element each), q / k RMSNorm in float32 and the RoPE product ([.., d/2, 2, 2] float32,
        ~80 bytes per q / k element), the GELU over the hidden tensor: about 390 bytes per token and model
        channel and sample. NABLA sparse attention would cut `self_attn_flops`; the plan prices it dense."""
        d, f, L, B = self.model_dim, self.ff_dim, tokens, batch
        keys = L if keys is None else keys
        text = self.text_len
        return BlockWork(
            linear_flops=2 * B * L * (6 * d * d + 2 * d * f) + 2 * B * text * 2 * d * d + 2 * B * self.time_dim * 9 * d,
            camera_flops=0,
            self_attn_flops=4 * B * L * keys * d,
            cross_attn_flops=4 * B * L * text * d,
            elementwise_bytes=self.block_elementwise_bytes(tokens, batch),
            act_quant_elems=B * L * (5 * d + f),
            qkv_elems=B * (L + 2 * keys) * d,
            chunk_bytes=0.0,
        )

    def block_flops(self, tokens: int, batch: int, keys: int | None = None) -> tuple[float, float]:
        w = self.block_work(tokens, batch, keys)
        return w.linear_flops, w.self_attn_flops + w.cross_attn_flops

    def block_elementwise_bytes(self, tokens: int, batch: int) -> float:
        return 390.0 * batch * tokens * self.model_dim

    def activation_bytes(self, tokens: int, batch: int, chunk: int | None = None, attention: str = "sdpa",
                         fp8: bool = False, keep_tokens: bool = False) -> float:
        """Peak activations of a forward, x1.1 for the allocator. Per sample in units of tokens x dim bytes:
        self-attention at the RoPE product is the largest moment: the bf16 stream (2), the modulated input
        (2), q, k, v (6), the float32 copy being rotated (4) and its [.., 2, 2] product (8): 22; the FFN has the
        stream, its float32 copy, the modulated input and the hidden tensor before and after the GELU:
        2 + 4 + 2 + 2f + 2f. Besides: the visual RoPE table (float32 [B, L, d_head/2, 2, 2]), the text tokens
        and their cross K / V, and before the blocks the float32 RoPE construction (cos, sin, stack)."""
        d, L, B = self.model_dim, tokens, batch
        f = self.ff_dim / d
        unit = L * d
        ffn = 2 + 4 + 2 + 4 * f + (0 if not fp8 else 1)
        attn = 22 + (3 if attention == "8bit" else 0)
        rope = B * L * self.head_dim * 8
        text = B * self.text_len * d * 2 * 4
        blocks = B * max(ffn, attn) * unit + rope + text + (2 * B * unit if keep_tokens else 0)
        before = 2 * B * unit + 3 * rope + text
        return 1.1 * max(blocks, before)

    def step_cache_bytes(self, tokens: int, batch: int) -> float:
        return 2 * batch * tokens * self.model_dim

    # ---- variants ---------------------------------------------------------------------------------------------
    def tiny(self) -> "KandinskyConfig":
        """Same structure, toy sizes: 4 visual and 1 text block of width 64 (head_dim 16), small text dims (4 visual
        blocks: the planner can then leave some on disk beside its read ring of 3)."""
        return replace(self, name=self.name + "-tiny", model_dim=64, ff_dim=128, time_dim=32, num_layers=4,
                       num_text_blocks=1, axes_dims=(4, 6, 6), in_text_dim=32, in_text_dim2=16, text_len=16)

    @property
    def any_size(self) -> bool:
        return self.is_tiny


_PRO = dict(model_dim=4096, ff_dim=16384, time_dim=1024, num_layers=60, num_text_blocks=4, axes_dims=(32, 48, 48))
_LITE = dict(model_dim=1792, ff_dim=7168, time_dim=512, num_layers=32, num_text_blocks=2, axes_dims=(16, 24, 24))

KANDINSKY_VARIANTS: dict[str, KandinskyConfig] = {c.name: c for c in [
    KandinskyConfig("kandinsky5-i2v-pro", **_PRO, task="i2v", visual_cond=True),
    KandinskyConfig("kandinsky5-t2v-pro", **_PRO, task="t2v", visual_cond=True),
    KandinskyConfig("kandinsky5-i2v-lite", **_LITE, task="i2v", visual_cond=True),
    KandinskyConfig("kandinsky5-t2v-lite", **_LITE, task="t2v", visual_cond=True),
]}
