"""Every DiT variant worldstream runs, as one table of dataclasses.

Shapes come from `shared/spec/wan-architecture.md` (section 1-2). Each full-size config has a `tiny`
sibling with the same structure (same optional branches, same control channels) for CPU tests.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DiTConfig:
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head dims given to (frame, row, column) positions: d - 4(d//6), 2(d//6), 2(d//6)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @property
    def control_in(self) -> int:
        """Input features of `patch_embedding_wancamctrl`: 8x8 pixel cells x 1x2x2 latent patch."""
        assert self.control_dim is not None
        pt, ph, pw = self.patch_size
        return self.control_dim * 64 * pt * ph * pw

    @property
    def has_camera(self) -> bool:
        return self.control_dim is not None

    @property
    def has_image_branch(self) -> bool:
        return self.image_dim is not None

    def tiny(self) -> "DiTConfig":
        """Same structure, toy sizes: 2 blocks of width 64 (head_dim 16), 32-wide text."""
        return replace(
            self, name=self.name + "-tiny", dim=64, ffn_dim=128, num_heads=4, num_layers=2,
            text_dim=32, text_len=16, freq_dim=32,
            image_dim=32 if self.image_dim is not None else None,
            image_tokens=5 if self.image_dim is not None else self.image_tokens)


_WAN14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

VARIANTS: dict[str, DiTConfig] = {c.name: c for c in [
    DiTConfig("wan2.1-t2v-1.3b", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    DiTConfig("wan2.1-t2v-14b", **_WAN14B),
    DiTConfig("wan2.1-i2v-14b", **_WAN14B, in_dim=36, image_dim=1280),
    DiTConfig("wan2.2-i2v-a14b", **_WAN14B, in_dim=36),
    DiTConfig("lingbot-cam", **_WAN14B, in_dim=36, control_dim=6),
    DiTConfig("lingbot-act", **_WAN14B, in_dim=36, control_dim=7),
    DiTConfig("lingbot-fast", **_WAN14B, in_dim=36, control_dim=6, causal=True),
]}

# Models that come as two experts (high noise / low noise) in subfolders.
TWO_EXPERTS = {"wan2.2-i2v-a14b", "lingbot-cam", "lingbot-act"}


def get_config(name: str) -> DiTConfig:
    """`name` is a variant from VARIANTS, optionally with a '-tiny' suffix."""
    base = name[: -len("-tiny")] if name.endswith("-tiny") else name
    if base not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)} (each also as <name>-tiny)")
    cfg = VARIANTS[base]
    return cfg.tiny() if name.endswith("-tiny") else cfg
