"""Tiny DiT checkpoints written exactly as users have them on disk (upstream or diffusers layout).

`write_dit_dir` writes one model folder: config.json, sharded safetensors and the index json;
`write_dit_checkpoint` writes the DiT part of a whole checkpoint folder for a variant name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoints import keymap
from ..models.configs import DiTConfig, get_config
from ..models.dit import WanDiT



def random_dit_state(cfg: DiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Upstream-named weights for WanDiT(cfg): every tensor normal(0, 0.2), norm weights 1 + normal(0, 0.2).

    Large enough that any mix-up of keys shows in the output (upstream's zero-init head would hide it),
    while q/k keep about unit scale. Uses its own generator; the global RNG is untouched.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        v = torch.randn(shape, generator=g) * 0.2
        if "norm" in k and k.endswith(".weight"):
            v += 1.0
        out[k] = v.to(dtype)
    return out


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _split(keys: list[str], shards: int) -> list[list[str]]:
    """`shards` contiguous, non-empty groups of keys (fewer if there are fewer keys)."""
    n = max(1, min(shards, len(keys)))
    return [keys[i * len(keys) // n:(i + 1) * len(keys) // n] for i in range(n)]


def write_dit_dir(model_dir: str | Path, cfg: DiTConfig, layout: str = "upstream", shards: int = 3,
                  dtype: torch.dtype = torch.float32, seed: int = 0, state: dict[str, torch.Tensor] | None = None,
                  class_name: str | None = None, stem: str = "diffusion_pytorch_model",
                  upstream_names: bool = False, extra_config: dict | None = None) -> dict[str, torch.Tensor]:
    """Write one DiT folder and return its upstream-named state dict (as written, in `dtype`).

    shards > 1: `<stem>-0000K-of-0000N.safetensors` + `<stem>.safetensors.index.json`; shards == 1: a single
    `<stem>.safetensors`. `state` overrides the random weights; `class_name` the config's `_class_name` (e.g.
    upstream's "WanModelFast"); `upstream_names` keeps upstream tensor names in a diffusers folder (what the
    LingBot Fast diffusers exports store); `extra_config` adds config.json fields.
    """
    if layout not in ("upstream", "diffusers"):
        raise ValueError(f"layout must be 'upstream' or 'diffusers', got {layout!r}")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype).contiguous() for k, v in (state or random_dit_state(cfg, seed, dtype)).items()}
    rename = keymap.upstream_to_diffusers if layout == "diffusers" and not upstream_names else (lambda k: k)
    on_disk = {rename(k): v for k, v in sd.items()}
    config = keymap.diffusers_config(cfg) if layout == "diffusers" else keymap.upstream_config(cfg)
    if class_name:
        config["_class_name"] = class_name
    config.update(extra_config or {})
    _write_json(model_dir / "config.json", config)

    keys = list(on_disk)
    groups = _split(keys, shards)
    n = len(groups)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{n:05d}.safetensors" if n > 1 else f"{stem}.safetensors"
        tmp = model_dir / (name + ".tmp")
        save_file({k: on_disk[k] for k in group}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, model_dir / name)
        weight_map.update({k: name for k in group})
    if n > 1:
        total = sum(v.nbytes for v in on_disk.values())
        _write_json(model_dir / f"{stem}.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    return sd


def write_dit_checkpoint(root: str | Path, variant: str, layout: str = "upstream", **kw) -> dict[str, dict]:
    """Write the DiT part of a checkpoint folder for `variant` (e.g. "lingbot-cam-tiny").

    Wan2.1: root (upstream) or transformer/ (diffusers). Two experts (config.experts == 2):
    high_noise_model/ + low_noise_model/, or transformer/ (high) + transformer_2/ (low).
    LingBot Fast: lingbot_world_fast/. Returns {expert: upstream state dict} with experts
    "main" | "high", "low" | "fast". Extra keywords go to `write_dit_dir` (seed offsets per expert).
    """
    root = Path(root)
    cfg = get_config(variant)
    seed = kw.pop("seed", 0)
    diff = layout == "diffusers"
    if cfg.experts == 2:
        dirs = {"high": "transformer", "low": "transformer_2"} if diff else \
            {"high": "high_noise_model", "low": "low_noise_model"}
    elif cfg.causal:     # the students' real layouts (spec realtime.md); diffusers exports keep upstream names
        if diff:
            dirs = {"fast": "transformer"}
            kw.setdefault("class_name", "CausalLingBotWorldTransformer3DModel")
            kw.setdefault("upstream_names", True)
            kw.setdefault("extra_config", {"num_frames_per_block": cfg.realtime.chunk, "sink_size": cfg.realtime.sink,
                                           "local_attn_size": cfg.realtime.window or -1})
        else:
            dirs = {"fast": {"lingbot-fast": "lingbot_world_fast", "lingbot-fast-v2": "transformers"}.get(
                cfg.base_name, ".")}
            kw.setdefault("class_name", "WanModelFast")
            if cfg.base_name != "lingbot-fast":
                kw.setdefault("stem", "model")
    else:
        dirs = {"main": "transformer" if diff else "."}
    return {name: write_dit_dir(root / sub, cfg, layout=layout, seed=seed + i, **kw)
            for i, (name, sub) in enumerate(dirs.items())}
