"""Key names: upstream (Wan / LingBot `WanModel`) <-> diffusers (`WanTransformer3DModel`), and configs.

worldstream's DiT uses upstream names. The diffusers layout differs by renames, plus one trap: upstream's
`norm3` (the affine norm before cross-attention) is diffusers' `norm2`, and upstream's `norm2` (before the
FFN) is diffusers' `norm3`. LingBot's camera layers have no diffusers counterpart and keep their names.
"""
from __future__ import annotations

import re

from ..models.configs import DiTConfig

# Top-level prefixes (upstream, diffusers).
_TOP = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
]

# Inside `blocks.{i}.` (upstream, diffusers).
_BLOCK = [
    ("modulation", "scale_shift_table"),
    ("norm2.", "norm3."),
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
]

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _rename(key: str, top: list[tuple[str, str]], block: list[tuple[str, str]]) -> str:
    m = _BLOCK_RE.match(key)
    if m:
        idx, rest = m.groups()
        for src, dst in block:
            if rest.startswith(src):
                return f"blocks.{idx}.{dst}{rest[len(src):]}"
        return key
    for src, dst in top:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def upstream_to_diffusers(key: str) -> str:
    return _rename(key, _TOP, _BLOCK)


def diffusers_to_upstream(key: str) -> str:
    return _rename(key, [(b, a) for a, b in _TOP], [(b, a) for a, b in _BLOCK])


# ---- config.json ------------------------------------------------------------------------------------

def diffusers_config(cfg: DiTConfig) -> dict:
    """The `transformer/config.json` diffusers writes for this DiT (camera fields kept as extras)."""
    out = {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim,
        "in_channels": cfg.in_dim,
        "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
        "eps": cfg.eps,
        "image_dim": cfg.image_dim,
        "added_kv_proj_dim": cfg.dim if cfg.image_dim else None,
        "rope_max_seq_len": cfg.rope_max_len,
    }
    if cfg.control_dim is not None:
        out["control_dim"] = cfg.control_dim
    return out


def upstream_config(cfg: DiTConfig) -> dict:
    """The `config.json` upstream's WanModel writes for this DiT."""
    out = {
        "_class_name": "WanModel",
        "model_type": "i2v" if cfg.in_dim != 16 else "t2v",
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim,
        "out_dim": cfg.out_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "text_len": cfg.text_len,
        "text_dim": cfg.text_dim,
        "eps": cfg.eps,
    }
    if cfg.control_dim is not None:
        out["control_type"] = "cam" if cfg.control_dim == 6 else "act"
    return out
