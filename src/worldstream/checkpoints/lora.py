"""LoRA files for the DiT: their key naming, checked against the model from headers alone, and the merge.

A LoRA file is a safetensors file of low-rank updates. For a layer with weight W [out, in] it holds
`down` [r, in] and `up` [out, r] (and optionally `alpha`); the merged weight is

    W' = W + strength * (alpha / r) * (up @ down)          (alpha absent: alpha / r = 1)

computed in float32 and rounded once to W's dtype. Some files (LightX2V's CFG / step-distill LoRAs, extracted
from a full fine-tune) also carry whole differences: `<layer>.diff` (W' = W + strength * diff) and
`<layer>.diff_b` (bias' = bias + strength * diff_b), for norms and biases a low rank cannot express.

Naming, all accepted (shared/spec/more-models.md; LightX2V `_load_lora_file`, tools/convert's LoRA formats):
  * prefixes `diffusion_model.`, `model.diffusion_model.`, `transformer.`, `base_model.model.` stripped;
  * `<layer>.lora_down.weight` / `.lora_up.weight` (kohya style), `.lora_A.weight` / `.lora_B.weight`
    (PEFT / diffusers), `.lora_A.default.weight`, `_lora.down.weight`, `.lora.down.weight`; `<layer>.alpha`;
  * kohya's flattened names `lora_unet_blocks_0_self_attn_q.lora_down.weight` (dots as underscores);
  * layer names upstream's (`blocks.0.self_attn.q`) or diffusers' (`blocks.0.attn1.to_q`, mapped by keymap).

`read_lora` resolves every tensor of the file to a model key and checks shapes (a LoRA for another model is
refused, naming the first keys that do not fit); nothing is read but the header. `merge` applies the deltas of
one key to its tensor: runtime/loading.py calls it in the load stream, before compression, so a compressed
block carries the merged weights.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import keymap
from .tensors import CheckpointError, TensorLocation, read_safetensors_header, read_tensor

MAX_SCALE = 100.0
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
# suffix -> role
_SUFFIXES = [
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
]
_ROLE_WORDS = ("lora_down", "lora_up", "lora_A", "lora_B", "alpha", "diff")


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora [high=|low=]FILE[:SCALE]`: the file, its strength, and the expert it is for (None: all)."""
    path: Path
    scale: float = 1.0
    expert: str | None = None

    @property
    def student(self) -> bool:
        """A CFG / step-distill LoRA (LightX2V's names: `..._cfg_step_distill_lora_rank64...`, `..._4step...`)."""
        from .dit import is_student_name
        return is_student_name(self.path.name)


def parse_lora_arg(text: str) -> LoraSpec:
    """`FILE`, `FILE:SCALE`, optionally prefixed `high=` / `low=` (one expert of a two-expert model)."""
    text = str(text)
    expert = None
    for name in ("high", "low"):
        if text.startswith(name + "="):
            expert, text = name, text[len(name) + 1:]
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise ValueError(f"{text}: the scale must be a finite number of magnitude at most {MAX_SCALE:g}")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such LoRA file")
    if expert is None:     # LightX2V's Wan2.2 LoRAs come as one file per expert, named after it
        low = p.name.lower()
        expert = "high" if "high_noise" in low else "low" if "low_noise" in low else None
    return LoraSpec(p, scale, expert)


@dataclass
class Delta:
    """What one LoRA file changes in one model tensor."""
    down: TensorLocation | None = None
    up: TensorLocation | None = None
    alpha: TensorLocation | None = None
    diff: TensorLocation | None = None
    scale: float = 1.0                  # the user's strength


@dataclass
class Lora:
    spec: LoraSpec
    deltas: dict[str, list[Delta]] = field(default_factory=dict)   # model key -> its deltas (in file order)
    rank: int = 0

    @property
    def blocks(self) -> set[int]:
        return {int(k.split(".")[1]) for k in self.deltas if k.startswith("blocks.")}


def _split(key: str) -> tuple[str, str] | None:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _resolver(shapes: dict[str, tuple[int, ...]]):
    """layer name (upstream, diffusers, or kohya-flattened) -> the model's parameter-owning name, or None."""
    owners = {k.rpartition(".")[0] for k in shapes} | set(shapes)
    flat = {}
    for o in owners:
        flat[o.replace(".", "_")] = o
        d = keymap.upstream_to_diffusers(o + ".weight").removesuffix(".weight")
        flat.setdefault(d.replace(".", "_"), o)

    def resolve(name: str) -> str | None:
        if name in owners:
            return name
        up = keymap.diffusers_to_upstream(name + ".weight").removesuffix(".weight")
        if up in owners:
            return up
        if name.startswith("lora_unet_"):
            return flat.get(name[len("lora_unet_"):])
        return flat.get(name)
    return resolve


def read_lora(spec: LoraSpec, shapes: dict[str, tuple[int, ...]], model_name: str) -> Lora:
    """Resolve every tensor of the LoRA file against the model's keys and shapes (`shapes`: key -> shape of the
    uncompressed model); CheckpointError naming the file and the first offending keys if it does not fit."""
    try:
        header = read_safetensors_header(spec.path)
    except CheckpointError as e:
        raise CheckpointError(f"{spec.path}: not a readable LoRA safetensors file ({e})") from None
    resolve = _resolver(shapes)
    parts: dict[str, dict[str, TensorLocation]] = {}
    unknown, problems = [], []
    for key, loc in header.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        name, role = split
        owner = resolve(name)
        if owner is None:
            unknown.append(key)
            continue
        parts.setdefault(owner, {})[role] = loc
    if not parts:
        raise CheckpointError(f"{spec.path}: not a LoRA for {model_name}: none of its {len(header)} tensors "
                              f"names a layer of the model (e.g. {sorted(header)[:3]})")
    if unknown:
        raise CheckpointError(f"{spec.path}: does not match {model_name}: {len(unknown)} of its {len(header)} "
                              f"tensors name no layer of the model (e.g. {unknown[:3]})")
    lora = Lora(spec)
    ranks = set()
    for owner, roles in sorted(parts.items()):
        weight = owner + ".weight" if owner + ".weight" in shapes else owner
        bias = owner + ".bias"
        if ("down" in roles) != ("up" in roles):
            problems.append(f"{owner}: has {'lora_down' if 'down' in roles else 'lora_up'} without its pair")
        if "down" in roles and "up" in roles:
            down, up = roles["down"], roles["up"]
            target = shapes.get(weight)
            if target is None or len(target) != 2:
                problems.append(f"{owner}: a low-rank update for a tensor of shape {target}, not a 2-D weight")
            elif (len(down.shape) != 2 or len(up.shape) != 2 or down.shape[0] != up.shape[1]
                  or (up.shape[0], down.shape[1]) != target):
                problems.append(f"{down.key}: up {list(up.shape)} x down {list(down.shape)} does not make the "
                                f"{list(target)} of {weight}")
            else:
                ranks.add(down.shape[0])
                if "alpha" in roles and roles["alpha"].shape not in ((), (1,)):
                    problems.append(f"{roles['alpha'].key}: alpha must be one number, has shape "
                                    f"{list(roles['alpha'].shape)}")
                lora.deltas.setdefault(weight, []).append(
                    Delta(down=down, up=up, alpha=roles.get("alpha"), scale=spec.scale))
        elif "alpha" in roles:
            problems.append(f"{roles['alpha'].key}: alpha without lora_down / lora_up")
        if "diff" in roles:
            if shapes.get(weight) != roles["diff"].shape:
                problems.append(f"{roles['diff'].key}: shape {list(roles['diff'].shape)}, but {weight} has "
                                f"{shapes.get(weight)}")
            else:
                lora.deltas.setdefault(weight, []).append(Delta(diff=roles["diff"], scale=spec.scale))
        if "diff_b" in roles:
            if shapes.get(bias) != roles["diff_b"].shape:
                problems.append(f"{roles['diff_b'].key}: shape {list(roles['diff_b'].shape)}, but {bias} has "
                                f"{shapes.get(bias)}")
            else:
                lora.deltas.setdefault(bias, []).append(Delta(diff=roles["diff_b"], scale=spec.scale))
    for loc in header.values():
        if not loc.dtype.is_floating_point:
            problems.append(f"{loc.key}: {loc.dtype}, expected floating-point values")
    if problems:
        raise CheckpointError(f"{spec.path}: does not match {model_name}: " + "; ".join(problems[:5])
                              + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    lora.rank = max(ranks) if ranks else 0
    return lora


def delta_tensor(d: Delta, device="cpu") -> torch.Tensor:
    """The float32 update one Delta adds to its tensor (strength included)."""
    if d.diff is not None:
        return read_tensor(d.diff).to(device=device, dtype=torch.float32) * d.scale
    down = read_tensor(d.down).to(device=device, dtype=torch.float32)
    up = read_tensor(d.up).to(device=device, dtype=torch.float32)
    alpha = float(read_tensor(d.alpha).float().reshape(-1)[0]) if d.alpha is not None else down.shape[0]
    return (up @ down) * (d.scale * alpha / down.shape[0])


def merge(t: torch.Tensor, deltas: list[Delta]) -> torch.Tensor:
    """`t` with every delta added, in float32, rounded once back to t's dtype (same device)."""
    out = t.to(torch.float32)
    for d in deltas:
        out = out + delta_tensor(d, t.device)
    return out.to(t.dtype)


def merge_stream(tensors, deltas: dict[str, list[Delta]]):
    """(key, tensor) pairs -> the same, with LoRA deltas merged into the keys they touch (one at a time)."""
    for key, t in tensors:
        yield (key, merge(t, deltas[key])) if key in deltas else (key, t)


def model_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the uncompressed WanDiT(cfg) (what a LoRA is checked against)."""
    from .dit import _expected_state
    return _expected_state(cfg, None)[0]


def expert_deltas(specs: list[LoraSpec], cfg, expert: str) -> dict[str, list[Delta]]:
    """Every delta the LoRAs `specs` make to expert `expert` of a `cfg` model, per key, in the order given."""
    shapes = model_shapes(cfg)
    out: dict[str, list[Delta]] = {}
    for spec in specs:
        if spec.expert is not None and expert in ("high", "low") and spec.expert != expert:
            continue
        for key, ds in read_lora(spec, shapes, cfg.name).deltas.items():
            out.setdefault(key, []).extend(ds)
    return out


def check_loras(specs: list[LoraSpec], ckpt):
    """Check LoRAs against a checkpoint (headers only) before anything is loaded: every tensor must fit the
    model; an expert named (`high=` / `low=`) must exist; a compressed checkpoint's 8-bit weights cannot take
    a merge (it must happen before compression). Returns the variant's student sampler when one of the LoRAs
    is a step-distill LoRA, else None."""
    from .compressed import quantized_keys
    cfg = ckpt.config
    for spec in specs:
        if spec.expert is not None and spec.expert not in ckpt.experts:
            raise CheckpointError(f"{spec.path}: given for the {spec.expert}-noise expert, but {cfg.name} has "
                                  f"{'one model' if len(ckpt.experts) == 1 else ' and '.join(ckpt.experts)}")
        lora = read_lora(spec, model_shapes(cfg), cfg.name)
        if ckpt.quant is not None:
            stuck = sorted(set(lora.deltas) & quantized_keys(cfg, ckpt.quant))
            if stuck:
                raise CheckpointError(
                    f"{spec.path}: changes {stuck[0]} (and {len(stuck) - 1} more), which {ckpt.root} stores "
                    f"compressed ({ckpt.quant.fmt}); LoRAs are merged before compression: use the bf16 "
                    "checkpoint (with --quant to compress while loading), or `worldstream convert --lora`")
    students = [s for s in specs if s.student]
    return cfg.student if students and cfg.student is not None else None
