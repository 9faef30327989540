"""A tiny Kandinsky 5 checkpoint in the diffusers layout (what `kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers`
holds, at toy sizes): transformer/ (sharded safetensors + index), vae/ (HunyuanVideo VAE), text_encoder/
(Qwen2.5-VL), tokenizer/, text_encoder_2/ (CLIP text), tokenizer_2/, scheduler/, model_index.json.

The transformer's modulation layers are zero-initialised by diffusers (the model is then an identity); they are
re-randomised here so that numeric tests mean something. The tokenizers are the shipped tiny umT5 tokenizer
(a real sentencepiece model: the Kandinsky prompt template still tokenizes to more than the 128 tokens the
pipeline cuts off). Everything is float32 unless `dtype` says otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..models.kandinsky import KANDINSKY_VARIANTS, KandinskyConfig

TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tiny_world" / "google" / "umt5-xxl"


def tiny_config(task: str = "i2v") -> KandinskyConfig:
    return KANDINSKY_VARIANTS[f"kandinsky5-{task}-pro"].tiny()


def tiny_transformer(cfg: KandinskyConfig, seed: int = 0):
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(seed)
    model = Kandinsky5Transformer3DModel(**cfg.diffusers_config())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name:         # zero-initialised upstream: an identity otherwise
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def write_tiny_kandinsky(root: str | os.PathLike, task: str = "i2v", seed: int = 0, shard_kb: int = 200,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny checkpoint into `root` (created); returns it."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler
    from diffusers import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline
    from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration)

    root = Path(root)
    cfg = tiny_config(task)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    vocab = len(tok)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                    mid_block_add_attention=True).eval()
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(hidden_size=cfg.in_text_dim, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, tie_word_embeddings=False),
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=cfg.in_text_dim, num_heads=2,
                           intermediate_size=32, fullatt_block_indexes=[0]),
        vocab_size=vocab)).eval()
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=cfg.in_text_dim2, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=vocab, max_position_embeddings=77,
                                        projection_dim=cfg.in_text_dim2, pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).eval()
    cls = Kandinsky5I2VPipeline if task == "i2v" else Kandinsky5T2VPipeline
    pipe = cls(transformer=tiny_transformer(cfg, seed), vae=vae, text_encoder=qwen, tokenizer=tok,
               text_encoder_2=clip, tokenizer_2=tok, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.to(dtype)
    pipe.save_pretrained(str(root), max_shard_size=f"{shard_kb}KB", safe_serialization=True)
    return root
