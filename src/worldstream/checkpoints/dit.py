"""Find, check and load DiT checkpoints as users have them on disk (upstream or diffusers layout).

Everything is checked before anything big is allocated: safetensors headers are parsed (checkpoints/tensors.py,
so every tensor's absolute byte range is known, which the disk-streaming tier reuses), keys and shapes are compared
with `WanDiT(cfg)` built on the `meta` device, and only then are tensors read, one at a time, converted to the
target dtype and moved to the target device. Peak host RAM is the loaded model plus about one tensor.

The variant is detected from config.json and the weight shapes, never from folder names: e.g. Cam vs Act
from the in-features of `patch_embedding_wancamctrl` (6*256 vs 7*256).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..models.configs import VARIANTS, WAN_LATENTS, DiTConfig, StepDistill
from ..models.dit import WanDiT
from . import keymap
from .compressed import QuantPolicy, quantized_model, stored_as_is
from ..models.quant import DEFAULT_SKIP
from .tensors import CheckpointError, TensorLocation, iter_tensors, read_json, read_pth, read_safetensors_header

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Companion files that sit next to a Wan2.1 DiT at the checkpoint root and are not the DiT.
_NOT_DIT = ("models_t5", "models_clip", "Wan2.1_VAE", "Wan2.2_VAE")
_SHARD_RE = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")

@dataclass
class Checkpoint:
    root: Path
    layout: str                 # "upstream" or "diffusers"
    experts: dict[str, Path]    # {"main": ...} | {"high": ..., "low": ...} | {"fast": ...}
    config: DiTConfig
    quant: QuantPolicy | None = None   # the policy of a converted (compressed) checkpoint, else None
    student: StepDistill | None = None # a LightX2V step-distilled student: how it samples (else None)
    student_source: str = ""           # what told us it is one (a folder or file name)


def _weight_files(d: Path) -> list[Path]:
    """The DiT weight files of a folder: the index json, else *.safetensors, else one .pth/.pt/.bin."""
    if (d / INDEX_NAME).is_file():
        return [d / INDEX_NAME]
    for pattern in ("*.safetensors.index.json", "*.safetensors"):
        if found := sorted(d.glob(pattern)):
            return found
    return sorted(p for ext in ("*.pth", "*.pt", "*.bin") for p in d.glob(ext) if not p.name.startswith(_NOT_DIT))


def _shard_name(index: Path, name) -> Path:
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{index}: shard name {name!r} is not a plain file name in the same folder")
    return index.parent / name


def _raw_index(model_dir: Path) -> dict[str, TensorLocation]:
    """Keys as stored in the files -> locations. `model_dir` is a DiT folder, or one `.safetensors` file holding
    a whole DiT (LightX2V's single-file students)."""
    if model_dir.is_file():
        if model_dir.suffix != ".safetensors":
            raise CheckpointError(f"{model_dir}: a DiT given as one file must be a .safetensors file")
        files = [model_dir]
    elif not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a folder")
    else:
        files = _weight_files(model_dir)
    if not files:
        raise CheckpointError(f"{model_dir}: no DiT weights (looked for {INDEX_NAME}, *.safetensors, *.pth)")
    out: dict[str, TensorLocation] = {}

    def add(locs: dict[str, TensorLocation]):
        for k, loc in locs.items():
            if k in out:
                raise CheckpointError(f"{loc.file}: key {k!r} is also in {out[k].file.name} (duplicate across shards)")
            out[k] = loc

    if files[0].name.endswith(".index.json"):
        if len(files) > 1:
            raise CheckpointError(f"{model_dir}: several index files {[f.name for f in files]}; expected one")
        index = files[0]
        js = read_json(index, "safetensors index")
        weight_map = js.get("weight_map") if isinstance(js, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a 'weight_map' object)")
        shards = {}
        for key, name in weight_map.items():
            shard = _shard_name(index, name)
            if shard not in shards:
                if not shard.is_file():
                    raise CheckpointError(f"{index}: shard {name} (holding {key!r}) does not exist in {model_dir}")
                shards[shard] = read_safetensors_header(shard)
                add(shards[shard])
            if key not in shards[shard]:
                raise CheckpointError(f"{shard}: key {key!r} is listed for this shard in {index.name} "
                                      "but is not in it")
    elif files[0].suffix == ".safetensors":
        by_set: dict[tuple[str, str], set[int]] = {}
        for f in files:
            if m := _SHARD_RE.match(f.name):
                by_set.setdefault((m[1], m[3]), set()).add(int(m[2]))
        for (stem, total), got in by_set.items():
            if len(total) > 5 or int(total) > MAX_BLOCKS:
                raise CheckpointError(f"{model_dir}: shard names claim {total[:12]} shards; at most {MAX_BLOCKS}")
            for k in sorted(set(range(1, int(total) + 1)) - got):
                name = f"{stem}-{k:0{len(total)}d}-of-{total}.safetensors"
                raise CheckpointError(f"{model_dir}: shard {name} is missing")
        for f in files:
            add(read_safetensors_header(f))
    else:
        if len(files) > 1:
            raise CheckpointError(f"{model_dir}: several .pth files {[f.name for f in files]}; "
                                  "cannot tell which is the DiT")
        sd = read_pth(files[0])
        add({k: TensorLocation(files[0], v.dtype, tuple(v.shape), -1, v.nbytes, k) for k, v in sd.items()})
    return out


def _layout(model_dir: Path, keys) -> str:
    if "condition_embedder.time_embedder.linear_1.weight" in keys:
        return "diffusers"
    if "time_embedding.0.weight" in keys:
        return "upstream"
    raise CheckpointError(f"{model_dir}: weights are neither a Wan DiT in upstream nor diffusers naming "
                          "(no time_embedding.0.weight / condition_embedder.time_embedder.linear_1.weight)")


def _index(model_dir: Path) -> tuple[dict[str, TensorLocation], str]:
    raw = _raw_index(model_dir)
    layout = _layout(model_dir, raw)
    if layout == "upstream":
        return raw, layout
    out = {}
    for k, loc in raw.items():
        up = keymap.diffusers_to_upstream(k)
        if up in out:
            raise CheckpointError(f"{loc.file}: keys {out[up].key!r} and {k!r} both map to {up!r}")
        out[up] = loc
    return out, layout


def index_model_dir(model_dir: str | Path) -> dict[str, TensorLocation]:
    """Upstream key -> location for every tensor of one DiT folder (diffusers names are mapped)."""
    return _index(Path(model_dir))[0]


def read_quantization(model_dir: str | Path, locations: dict[str, TensorLocation] | None = None
                      ) -> QuantPolicy | None:
    """How a DiT's block linears are stored: the `"quantization"` entry of its config.json (written by
    `worldstream convert`), else what the tensors themselves show (LightX2V's scaled fp8 / int8 files, which
    carry no config: `infer_quantization`), else None for ordinary bf16/fp32 weights."""
    model_dir = Path(model_dir)
    entry = _read_config(model_dir).get("quantization")
    if entry is None:
        return infer_quantization(model_dir, locations if locations is not None else index_model_dir(model_dir))
    try:
        return QuantPolicy.from_json(entry, str(model_dir / "config.json"))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def infer_quantization(where: Path, locations: dict[str, TensorLocation]) -> QuantPolicy | None:
    """The QuantPolicy of a DiT stored the way LightX2V's converter writes compressed Wan DiTs
    (tools/convert, `--quantized` without `--comfyui_mode`): every 2-D weight of a block's self_attn,
    cross_attn and ffn as `<name>.weight` in float8_e4m3fn or int8 plus `<name>.weight_scale` [out, 1] (one
    scale per output row, amax / 448 or / 127), all blocks; everything else bf16. That is worldstream's own
    per-channel format, so such a file loads into the same QLinears (scales converted to float32). None when
    nothing is scaled. ComfyUI's per-tensor `scale_weight` variant is refused by name."""
    if "scaled_fp8" in locations or any(k.endswith(".scale_weight") for k in locations):
        raise CheckpointError(f"{where}: ComfyUI 'scaled_fp8' weights (one scale per tensor, '.scale_weight'); "
                              "worldstream reads LightX2V's per-channel files (`...scaled_fp8_e4m3_lightx2v...`, "
                              "'.weight_scale' keys), or convert the bf16 original with `worldstream convert`")
    scaled = [k[: -len("_scale")] for k in locations if k.endswith(".weight_scale")]
    if not scaled:
        return None
    kinds = {locations[k].dtype for k in scaled if k in locations}
    fmt = {frozenset({torch.float8_e4m3fn}): "fp8", frozenset({torch.int8}): "int8"}.get(frozenset(kinds))
    if fmt is None:
        raise CheckpointError(f"{where}: scaled weights stored as {sorted(map(str, kinds))}; expected all "
                              "float8_e4m3fn or all int8")
    groups = {locations[k + "_scale"].shape[1:] for k in scaled}
    if fmt == "fp8" and any(g != (1,) for g in groups):
        fmt = "fp8-block"
    blocks = {int(k.split(".")[1]) for k in scaled if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    n = _num_blocks(where, locations)
    skip_first_last = bool(blocks) and 0 not in blocks and n - 1 not in blocks
    return QuantPolicy(fmt, skip_first_last=skip_first_last, skip=DEFAULT_SKIP)


# ---- variant detection ----------------------------------------------------------------------------------

def _read_config(model_dir: Path) -> dict:
    if model_dir.is_file():          # a single-file DiT carries no config.json
        return {}
    path = model_dir / "config.json"
    if not path.is_file():
        return {}
    cfg = read_json(path, "config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return cfg


MAX_BLOCKS = 1024   # transformer blocks of one DiT (Wan has 30 or 40)
# config.json fields taken as they are: (name there, DiTConfig field, type, lowest, highest)
_CONFIG_FIELDS = (("eps", "eps", float, 1e-12, 1e-2), ("text_len", "text_len", int, 1, 4096),
                  ("rope_max_seq_len", "rope_max_len", int, 1, 65536))


def _num_blocks(model_dir: Path, locations: dict[str, TensorLocation]) -> int:
    """1 + the highest `blocks.<i>.` index (at most MAX_BLOCKS); CheckpointError for a malformed index."""
    indices = set()
    for k in locations:
        if k.startswith("blocks."):
            i = k.split(".")[1]
            if not (i.isascii() and i.isdigit() and len(i) <= 4 and int(i) < MAX_BLOCKS):
                raise CheckpointError(f"{locations[k].file}: key {k[:80]!r}: block index is not a number below "
                                      f"{MAX_BLOCKS}")
            indices.add(int(i))
    if not indices:
        raise CheckpointError(f"{model_dir}: no 'blocks.<i>.' weights; not a Wan DiT")
    return 1 + max(indices)


def detect_config(model_dir: str | Path, locations: dict[str, TensorLocation],
                  causal: bool | None = None) -> DiTConfig:
    """The DiTConfig of a folder from its weight shapes plus config.json (heads, eps, text length).

    Named after the matching VARIANTS entry or its tiny sibling, else "custom". `causal` (LingBot Fast) is
    not visible in the weights: it comes from the argument, config.json's `_class_name` (WanModelFast, or a
    diffusers export's Causal... class), or the shapes themselves when only a causal variant has them (the v2
    1.3B). A causal model's chunk loop settings (models/configs.py CausalSampling) come from its variant, with
    `num_frames_per_block` (chunk) and a positive `local_attn_size` / `sink_size` (window) from config.json.
    """
    model_dir = Path(model_dir)
    js = _read_config(model_dir)
    if causal is None and ("Fast" in str(js.get("_class_name", "")) or "Causal" in str(js.get("_class_name", ""))):
        causal = True

    def shape(key: str) -> tuple[int, ...]:
        if key not in locations:
            raise CheckpointError(f"{model_dir}: weight {key!r} is missing; cannot tell the model's shape")
        return locations[key].shape

    pe = shape("patch_embedding.weight")
    if len(pe) != 5:
        raise CheckpointError(f"{locations['patch_embedding.weight'].file}: 'patch_embedding.weight' "
                              f"has shape {pe}, expected 5-D")
    patch = tuple(pe[2:])
    if 0 in patch:
        raise CheckpointError(f"{locations['patch_embedding.weight'].file}: 'patch_embedding.weight' has an "
                              f"empty patch {patch}")
    known = dict(dim=pe[0], in_dim=pe[1], patch_size=patch, ffn_dim=shape("blocks.0.ffn.0.weight")[0],
                 num_layers=_num_blocks(model_dir, locations),
                 out_dim=shape("head.head.weight")[0] // math.prod(patch),
                 text_dim=shape("text_embedding.0.weight")[1], freq_dim=shape("time_embedding.0.weight")[1],
                 qk_norm="blocks.0.self_attn.norm_q.weight" in locations,
                 cross_attn_norm="blocks.0.norm3.weight" in locations,
                 image_dim=shape("img_emb.proj.0.weight")[0] if "img_emb.proj.0.weight" in locations else None,
                 control_dim=None, causal=bool(causal) or js.get("_class_name") == "WanModelFast")
    if "patch_embedding_wancamctrl.weight" in locations:
        n_in = shape("patch_embedding_wancamctrl.weight")[1]
        cell = WAN_LATENTS.stride[1] ** 2 * math.prod(patch)    # one latent pixel's cell x the latent patch
        if n_in % cell:
            raise CheckpointError(f"{locations['patch_embedding_wancamctrl.weight'].file}: "
                                  f"'patch_embedding_wancamctrl.weight' has {n_in} in-features, not a multiple "
                                  f"of {cell} (6*{cell} = camera, 7*{cell} = action)")
        known["control_dim"] = n_in // cell
    # config.json: upstream names, else diffusers names. Sizes it declares must agree with the weights.
    declared = {"dim": js.get("dim"), "ffn_dim": js.get("ffn_dim"), "num_layers": js.get("num_layers"),
                "in_dim": js.get("in_dim", js.get("in_channels")), "text_dim": js.get("text_dim"),
                "out_dim": js.get("out_dim", js.get("out_channels")), "freq_dim": js.get("freq_dim")}
    heads_, head_dim = js.get("num_attention_heads"), js.get("attention_head_dim")
    if type(heads_) is int and type(head_dim) is int:
        declared["dim"] = heads_ * head_dim
    for name, value in declared.items():
        if value is not None and value != known[name]:
            raise CheckpointError(f"{model_dir / 'config.json'}: {name} = {value} but the weights have {known[name]}")
    heads = js.get("num_heads", js.get("num_attention_heads"))
    if heads is not None:
        if not isinstance(heads, int) or heads <= 0 or known["dim"] % heads:
            raise CheckpointError(f"{model_dir / 'config.json'}: {heads} heads do not divide dim {known['dim']}")
        known["num_heads"] = heads
    for src, dst, kind, lo, hi in _CONFIG_FIELDS:
        value = js.get(src)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool) or not lo <= value <= hi:
            raise CheckpointError(f"{model_dir / 'config.json'}: {src} = {str(value)[:40]} is not a "
                                  f"{kind.__name__} between {lo} and {hi}")
        known[dst] = value
    candidates = [c for base in VARIANTS.values() for c in (base, base.tiny())]
    match = next((c for c in candidates if replace(c, **known) == c), None)
    if match is None and causal is None:     # shapes only a causal student has (the v2 1.3B)
        match = next((c for c in candidates if replace(c, **dict(known, causal=True)) == c), None)
    if match is not None:
        return _realtime_from_config(match, js, model_dir)
    if "num_heads" not in known:
        raise CheckpointError(f"{model_dir}: no config.json (needed for the head count of a non-standard DiT)")
    return DiTConfig(name="custom", **known)


def _realtime_from_config(cfg: DiTConfig, js: dict, model_dir: Path) -> DiTConfig:
    """A causal variant's chunk loop settings, with what config.json says where it says something usable.
    Upstream passes the window on its command line and files carry -1 ("global"): only a positive value here
    replaces the variant's window."""
    if cfg.realtime is None:
        return cfg
    rt = cfg.realtime
    chunk = js.get("num_frames_per_block", rt.chunk)
    window = js.get("local_attn_size")
    window = window if isinstance(window, int) and window > 0 else rt.window
    sink = js.get("sink_size", rt.sink) if window != rt.window else rt.sink
    for name, value, lo, hi in (("num_frames_per_block", chunk, 1, 64), ("sink_size", sink, 0, 1024),
                                ("local_attn_size", window if window is not None else 1, 1, 100_000)):
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise CheckpointError(f"{model_dir / 'config.json'}: {name} = {str(value)[:40]} is not a count "
                                  f"between {lo} and {hi}")
    if window is not None and window < sink + chunk:
        sink = 0 if window >= chunk else sink     # a sink the window cannot keep is no sink (as upstream)
    return replace(cfg, realtime=replace(rt, chunk=chunk, window=window, sink=sink))


def _fast_variant(cfg: DiTConfig, model_dir: Path, at_root: bool) -> DiTConfig:
    """v1 and v2 students share shapes (and every tiny sibling shares one): the folder they come in tells
    which one it is, and so its chunk loop; what config.json says about chunk and window is kept."""
    if at_root:
        wanted = FAST_AT_ROOT
    elif model_dir.name == "transformer":
        wanted = FAST_BY_CHUNK.get(cfg.realtime.chunk if cfg.realtime else None)
    else:
        wanted = FAST_DIRS.get(model_dir.name)
    if wanted is None or cfg.base_name == wanted:
        return cfg
    other = VARIANTS[wanted].tiny() if cfg.is_tiny else VARIANTS[wanted]
    if replace(other, name=cfg.name, realtime=cfg.realtime) != cfg:
        return cfg                                   # other shapes: not that student
    rt = other.realtime
    if cfg.realtime is not None and cfg.realtime != VARIANTS[cfg.base_name].realtime:
        rt = replace(rt, chunk=cfg.realtime.chunk, window=cfg.realtime.window, sink=cfg.realtime.sink)
    return replace(cfg, name=other.name, realtime=rt)


# ---- finding the experts of a checkpoint folder -------------------------------------------------------

_ROLE = {"high": "high-noise expert", "low": "low-noise expert", "fast": "LingBot Fast model", "main": "DiT"}


# Where the causal students live: v1 `lingbot_world_fast/` inside a Base Cam folder, v2 14B `transformers/`
# (its 40-step causal pretrain, `transformer_causal/`, is not a few-step student), and which variant each is.
# The v2 1.3B comes as shards at the root of its own folder; a diffusers export in `transformer/` says its
# chunk (`num_frames_per_block`: 3 is v1, 4 is v2).
FAST_DIRS = {"lingbot_world_fast": "lingbot-fast", "transformers": "lingbot-fast-v2"}
FAST_AT_ROOT = "lingbot-fast-v2-1.3b"
FAST_BY_CHUNK = {3: "lingbot-fast", 4: "lingbot-fast-v2"}


# LightX2V's step-distilled students: the folders their repositories hold the DiT in (bf16, fp8, int8;
# lightx2v/utils/utils.py find_torch_model_path), and the file / folder names that mark a student.
DISTILL_DIRS = ("distill_models", "distill_fp8", "distill_int8")
STUDENT_MARK = "step_distill"   # config.json field `worldstream convert` writes for a student (or a merged student LoRA)
STUDENT_NAME = re.compile(r"(?i)(distill|\d+_?steps?\b|\d+step)")


def is_student_name(name: str) -> bool:
    """Whether a DiT or LoRA file name says it is a LightX2V step-distilled student (`distill_model`,
    `..._lightx2v_4step...`, `..._cfg_step_distill_lora_rank64...`)."""
    return bool(STUDENT_NAME.search(name))


def _dit_overrides(root: Path, dit: list) -> dict[str, Path]:
    """`--dit` paths -> experts: one path is the model; two are the high- and low-noise experts, told apart
    by "high" / "low" in their names (else given in that order)."""
    paths = [Path(p) for p in dit]
    for p in paths:
        if not (p.is_dir() or p.is_file()):
            raise CheckpointError(f"--dit {p}: no such file or folder")
    if len(paths) == 1:
        return {"main": paths[0]}
    if len(paths) != 2:
        raise CheckpointError(f"--dit given {len(paths)} times; give one DiT, or two (high- and low-noise expert)")
    named = {("high" if "high" in p.name.lower() else "low" if "low" in p.name.lower() else None): p for p in paths}
    if set(named) == {"high", "low"}:
        return {"high": named["high"], "low": named["low"]}
    return {"high": paths[0], "low": paths[1]}


def find_checkpoint(ckpt_dir: str | Path, fast: bool | None = None, dit: list | None = None) -> Checkpoint:
    """Locate the DiT folders of a checkpoint and detect its variant (both experts must agree).

    Wan2.1: DiT at the root (upstream) or in transformer/ (diffusers). Two experts: high_noise_model/ and
    low_noise_model/, or transformer/ and transformer_2/. LingBot Fast (the causal students): v1
    lingbot_world_fast/, v2 14B transformers/ (taken when `fast` is True, or when there are no two-expert
    folders), a diffusers export's transformer/ with a causal class, or a v2 1.3B at the root.

    LightX2V's step-distilled students: a `distill_models/` (or `distill_fp8/`, `distill_int8/`) folder at the
    root is the DiT (with `high_noise_model/` + `low_noise_model/` inside for Wan2.2); `dit` (the `--dit` flag)
    names DiT files or folders to use instead of the checkpoint's own (e.g. LightX2V's single files), the
    rest (VAE, text encoder, CLIP) still coming from `ckpt_dir`. A DiT found in a distill folder, or whose file
    name marks a student (`is_student_name`), samples as one (`Checkpoint.student`).
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint folder does not exist")
    student_source = ""
    if dit:
        experts = _dit_overrides(root, dit)
        return _checkpoint(root, experts, student_source=next(
            (p.name for p in experts.values() if is_student_name(p.name)), ""))
    distill = next((root / d for d in DISTILL_DIRS if (root / d).is_dir()), None)
    if distill is not None and not fast:
        hi, lo = distill / "high_noise_model", distill / "low_noise_model"
        experts = {"high": hi, "low": lo} if hi.is_dir() or lo.is_dir() else {"main": distill}
        return _checkpoint(root, experts, student_source=f"{distill.name}/")
    up_hi, up_lo = root / "high_noise_model", root / "low_noise_model"
    df_hi, df_lo = root / "transformer", root / "transformer_2"
    fast_dir = next((root / d for d in FAST_DIRS if (root / d).is_dir()), root / "lingbot_world_fast")
    two = up_hi.is_dir() or up_lo.is_dir()
    if fast or (fast is None and fast_dir.is_dir() and not two):
        experts = {"fast": fast_dir}
    elif two:
        experts = {"high": up_hi, "low": up_lo}
    elif df_hi.is_dir() or df_lo.is_dir():
        experts = {"high": df_hi, "low": df_lo} if df_lo.is_dir() else {"main": df_hi}
    else:
        experts = {"main": root}
    for name, d in experts.items():
        if not d.is_dir():
            raise CheckpointError(f"{root}: {d.name}/ is missing (the {_ROLE[name]})")
    return _checkpoint(root, experts)


def _checkpoint(root: Path, experts: dict[str, Path], student_source: str = "") -> Checkpoint:
    """Detect and cross-check the experts' variant, layout and storage; a Checkpoint."""
    for name, d in experts.items():
        if not (d.is_dir() or d.is_file()):
            raise CheckpointError(f"{root}: {d.name}/ is missing (the {_ROLE[name]})")
    configs, layouts, quants = {}, set(), {}
    for name, d in experts.items():
        locations, layout = _index(d)
        layouts.add(layout)
        configs[name] = detect_config(d, locations, causal=True if name == "fast" else None)
        if configs[name].causal:
            configs[name] = _fast_variant(configs[name], d, at_root=d == root)
        quants[name] = read_quantization(d, locations)
        if not student_source and _read_config(d).get(STUDENT_MARK) is True:   # written by `convert`
            student_source = f"{d.name}/config.json"
    if len(set(quants.values())) > 1:
        raise CheckpointError(f"{root}: the experts are stored differently: " +
                              "; ".join(f"{experts[n].name}/ {q.to_json() if q else 'not quantized'}"
                                        for n, q in quants.items()))
    if len(layouts) > 1:
        raise CheckpointError(f"{root}: the experts mix upstream and diffusers key naming")
    layout, cfg = layouts.pop(), next(iter(configs.values()))
    if cfg.causal and set(experts) == {"main"}:      # a student at the root or in a diffusers transformer/
        experts = {"fast": experts["main"]}
        layout = "diffusers" if experts["fast"].name == "transformer" else layout
    if any(c != cfg for c in configs.values()):
        raise CheckpointError(f"{root}: the experts disagree: " +
                              "; ".join(f"{experts[n].name}/ is {c}" for n, c in configs.items()))
    if len(experts) == 2 and cfg.experts != 2:
        raise CheckpointError(f"{root}: two expert folders, but the weights are {cfg.name}, a single model")
    if "main" in experts and cfg.experts == 2:
        missing = "transformer_2/" if layout == "diffusers" else "high_noise_model/ and low_noise_model/"
        raise CheckpointError(f"{root}: {missing} missing: the DiT in {experts['main']} is "
                              f"one {cfg.name} expert of two")
    student = cfg.student if student_source else None
    if student_source and student is None:
        raise CheckpointError(f"{root}: {student_source} looks like a step-distilled student, but its weights are "
                              f"{cfg.name}, for which no student sampler is known")
    return Checkpoint(root, layout, experts, cfg, next(iter(quants.values())), student, student_source)


# ---- validating and loading ------------------------------------------------------------------------------

_FROM_CONFIG = "config.json"


@functools.lru_cache(maxsize=16)
def _expected_state(cfg: DiTConfig, quant) -> tuple[dict, dict]:
    """(key -> shape, key -> dtype) of WanDiT(cfg) holding the policy's QLinears, built once on `meta`."""
    state = quantized_model(cfg, torch.float32, quant).state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}, {k: v.dtype for k, v in state.items()}


def validate(cfg: DiTConfig, locations: dict[str, TensorLocation], model_dir: str | Path,
             quant=_FROM_CONFIG) -> None:
    """Compare keys, shapes and dtypes with WanDiT(cfg) built on `meta`; raise one error listing all problems.

    `quant` (a QuantPolicy, None, or by default the folder's config.json entry): a compressed folder is
    compared with the model holding QLinears, so its 8-bit `weight`s (exact dtype required) and float32
    `weight_scale`s are expected.
    """
    if quant == _FROM_CONFIG:
        quant = read_quantization(model_dir, locations)
    expected, expected_dtype = _expected_state(cfg, quant)
    problems = []
    for k in expected.keys() - locations.keys():
        problems.append(f"{model_dir}: missing key {k!r}")
    for k in locations.keys() - expected.keys():
        problems.append(f"{locations[k].file}: unexpected key {locations[k].key!r} (not in a {cfg.name} DiT)")
    for k in expected.keys() & locations.keys():
        loc = locations[k]
        if loc.shape != expected[k]:
            problems.append(f"{loc.file}: key {loc.key!r}: expected shape {expected[k]}, found {loc.shape}")
        elif k.endswith(".weight_scale") and loc.dtype.is_floating_point and loc.dtype.itemsize >= 2:
            pass                                 # float32 as worldstream writes it; LightX2V's may be bf16
        elif expected_dtype[k] in (torch.float8_e4m3fn, torch.int8) or k.endswith(".weight_scale"):
            if loc.dtype != expected_dtype[k]:
                problems.append(f"{loc.file}: key {loc.key!r} is {loc.dtype}, expected {expected_dtype[k]} "
                                f"(quantization {quant.fmt})")
        elif not loc.dtype.is_floating_point:
            problems.append(f"{loc.file}: key {loc.key!r} is {loc.dtype}, expected a floating-point tensor")
    if problems:
        problems.sort()
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{len(problems)} problem(s) with the DiT weights in {model_dir}:\n"
                              + "\n".join(problems[:20]) + more)


def load_dit(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             cfg: DiTConfig | None = None, progress: Callable[[int, int], None] | None = None) -> WanDiT:
    """Build WanDiT on meta, validate the folder, then fill it tensor by tensor (no full-size host copy).

    Pass `cfg=find_checkpoint(...).config` for an expert of a checkpoint: a folder alone cannot always tell
    LingBot Fast (causal) from Cam, since their weights have the same shapes.
    """
    model_dir = Path(model_dir)
    locations = index_model_dir(model_dir)
    cfg = cfg or detect_config(model_dir, locations)
    quant = read_quantization(model_dir, locations)
    validate(cfg, locations, model_dir, quant)
    if quant is None:
        with torch.device("meta"):
            model = WanDiT(cfg)
        stored = set()
    else:   # compressed folder (worldstream convert): QLinears; 8-bit weights and scales keep their dtype
        model = quantized_model(cfg, dtype, quant)
        stored = stored_as_is(model)
    for i, (key, t) in enumerate(iter_tensors(locations, dtype, device) if not stored else
                                 ((k, v.float() if k.endswith(".weight_scale") else v if k in stored else v.to(dtype))
                                  for k, v in iter_tensors(locations, None, device))):
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[name] = t
        if progress:
            progress(i + 1, len(locations))
    assert not any(p.is_meta for p in model.parameters()), "validate() let a missing key through"
    return model.eval().requires_grad_(False)
