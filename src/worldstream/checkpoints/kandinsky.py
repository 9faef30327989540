"""Kandinsky 5 checkpoints in the diffusers layout: find, detect, validate (as checkpoints/dit.py does for Wan).

A folder is a Kandinsky 5 checkpoint when its model_index.json names a `Kandinsky5*Pipeline` (or its
transformer/config.json a `Kandinsky5Transformer3DModel`). Every component folder must be there (transformer/,
vae/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, scheduler/); the variant comes from the
transformer's config.json and its weight shapes, the task (i2v / t2v) from the pipeline class, never from the
folder name. The transformer's tensors are indexed by their safetensors headers (missing shards, truncated files
and malformed headers are refused by name: checkpoints/dit.py `_raw_index`), compared key by key and shape by
shape with diffusers' module built on `meta`, and read one at a time (NaN / inf refused, naming file and key).
The other components are checked the same way against their classes before transformers / diffusers load them.

The original single-file release (`kandinsky5pro_i2v_sft_5s.safetensors`, ai-forever/Kandinsky-5) can stand in for
transformer/'s weights (`dit`): upstream loads that file strictly (`load_state_dict`) into its own
`DiffusionTransformer3D`, whose modules carry the same names as diffusers' `Kandinsky5Transformer3DModel`
(time_embeddings, text_embeddings, pooled_text_embeddings, visual_embeddings, text_ / visual_transformer_blocks
with visual_modulation, self_attention.to_query / to_key / to_value / query_norm / key_norm / out_layer,
cross_attention, feed_forward.in_layer / out_layer, out_layer), and neither keeps a persistent buffer: its keys
are diffusers' keys, one to one. It carries no config, so the variant comes from the folder's
transformer/config.json, and every key and shape of the file is validated against it like a shard's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..models.kandinsky import KANDINSKY_VARIANTS, KandinskyConfig
from .dit import _raw_index
from .tensors import CheckpointError, TensorLocation, check_finite, read_json

COMPONENTS = {"transformer": "the DiT (Kandinsky5Transformer3DModel)", "vae": "the HunyuanVideo VAE",
              "text_encoder": "the Qwen2.5-VL text encoder", "tokenizer": "Qwen2.5-VL's tokenizer",
              "text_encoder_2": "the CLIP text encoder", "tokenizer_2": "CLIP's tokenizer",
              "scheduler": "the flow-match scheduler"}
_SHAPE_KEYS = ("model_dim", "ff_dim", "time_dim", "num_visual_blocks", "num_text_blocks", "axes_dims",
               "in_visual_dim", "out_visual_dim", "visual_cond", "in_text_dim", "in_text_dim2", "patch_size")


@dataclass
class KandinskyCheckpoint:
    root: Path
    config: KandinskyConfig
    task: str                                  # "i2v" | "t2v"
    layout: str = "diffusers"
    dit: Path | None = None                    # the original single-file transformer, instead of transformer/'s
    quant = None
    student = None

    @property
    def experts(self) -> dict[str, Path]:      # the runner's view: one DiT
        return {"main": self.dit if self.dit is not None else self.root / "transformer"}

    def folder(self, component: str) -> Path:
        return self.root / component


def is_kandinsky(root: str | Path) -> bool:
    root = Path(root)
    for f, key in ((root / "model_index.json", "Kandinsky5"), (root / "transformer" / "config.json", "Kandinsky5")):
        if f.is_file():
            js = read_json(f, "config")
            if isinstance(js, dict) and str(js.get("_class_name", "")).startswith(key):
                return True
    return False


def find_kandinsky(root: str | Path, dit: str | Path | list | None = None) -> KandinskyCheckpoint:
    """`dit`: the original single-file transformer (`kandinsky5pro_i2v_sft_5s.safetensors`) to use instead of
    transformer/'s weights (its config.json still names the variant)."""
    root = Path(root)
    if isinstance(dit, (list, tuple)):
        if len(dit) > 1:
            raise CheckpointError(f"--dit given {len(dit)} times: a Kandinsky 5 checkpoint has one transformer")
        dit = dit[0] if dit else None
    if dit is not None:
        dit = Path(dit)
        if not dit.is_file() or dit.suffix != ".safetensors":
            raise CheckpointError(f"--dit {dit}: expected the transformer as one .safetensors file "
                                  "(e.g. kandinsky5pro_i2v_sft_5s.safetensors)")
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint folder does not exist")
    for name, role in COMPONENTS.items():
        if not (root / name).is_dir():
            raise CheckpointError(f"{root}: {name}/ is missing ({role})")
    index = read_json(root / "model_index.json", "pipeline index") if (root / "model_index.json").is_file() else {}
    pipeline = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    task = "t2v" if "T2V" in pipeline else "i2v"
    cfg = detect_config(root / "transformer", task)
    return KandinskyCheckpoint(root, cfg, task, dit=dit)


def detect_config(model_dir: Path, task: str = "i2v") -> KandinskyConfig:
    """The variant whose shape fields match transformer/config.json (also the tiny siblings)."""
    js = read_json(model_dir / "config.json", "transformer config")
    if not isinstance(js, dict) or js.get("_class_name") != "Kandinsky5Transformer3DModel":
        raise CheckpointError(f"{model_dir}/config.json: not a Kandinsky5Transformer3DModel config")
    candidates = [c for base in KANDINSKY_VARIANTS.values() for c in (base, base.tiny()) if c.task == task]
    for c in candidates:
        want = c.diffusers_config()
        if all(_norm(js.get(k, want[k])) == _norm(want[k]) for k in _SHAPE_KEYS if k in want):
            return replace(c, attention_type=str(js.get("attention_type") or "regular"))
    shape = {k: js.get(k) for k in _SHAPE_KEYS}
    raise CheckpointError(f"{model_dir}/config.json: a Kandinsky 5 transformer of unknown shape {shape}; known: "
                          + ", ".join(KANDINSKY_VARIANTS))


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


@functools.lru_cache(maxsize=8)
def expected_state(cfg: KandinskyConfig) -> dict[str, tuple[int, ...]]:
    from diffusers import Kandinsky5Transformer3DModel
    with torch.device("meta"):
        m = Kandinsky5Transformer3DModel(**cfg.diffusers_config())
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def transformer_locations(ckpt: KandinskyCheckpoint) -> dict[str, TensorLocation]:
    d = ckpt.experts["main"]                   # transformer/, or the single file given as `dit`
    locations = _raw_index(d)
    validate(ckpt.config, locations, d)
    return locations


def validate(cfg: KandinskyConfig, locations: dict[str, TensorLocation], model_dir: Path,
             expected: dict[str, tuple[int, ...]] | None = None, what: str = "DiT") -> None:
    """Keys, shapes and float dtypes against the module; one error listing every problem (as checkpoints/dit.py)."""
    expected = expected if expected is not None else expected_state(cfg)
    problems = []
    for k in expected.keys() - locations.keys():
        problems.append(f"{model_dir}: missing key {k!r}")
    for k in locations.keys() - expected.keys():
        problems.append(f"{locations[k].file}: unexpected key {k!r} (not in a {cfg.name} {what})")
    for k in expected.keys() & locations.keys():
        loc = locations[k]
        if loc.shape != expected[k]:
            problems.append(f"{loc.file}: key {k!r}: expected shape {expected[k]}, found {loc.shape}")
        elif not loc.dtype.is_floating_point:
            problems.append(f"{loc.file}: key {k!r} is {loc.dtype}, expected a floating-point tensor")
    if problems:
        problems.sort()
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{len(problems)} problem(s) with the {what} weights in {model_dir}:\n"
                              + "\n".join(problems[:20]) + more)


def validate_component(root: Path, name: str, module: torch.nn.Module, missing: list | None = None) -> None:
    """A companion loaded by transformers / diffusers (VAE, text encoders): the keys they reported missing
    (they would be filled at random, with only a warning) refused, every weight finite (file and key named)."""
    folder = root / name
    if missing:
        raise CheckpointError(f"{folder}: missing key {sorted(missing)[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for k, t in module.state_dict().items():
        if t.is_floating_point():
            check_finite(t, f"{folder}: tensor {k!r}")
