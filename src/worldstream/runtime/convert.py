"""`worldstream convert`: write a compressed checkpoint laid out for streaming, one block at a time.

For each DiT expert folder of the source checkpoint, one block's tensors are read (loader.iter_tensors on that
block's byte ranges), its linears quantized (runtime/quant.py, the policy in `QuantPolicy`), and written to their
own file:

    OUT/<expert>/block_000.safetensors ... block_NNN.safetensors    one file per block = one contiguous byte range
    OUT/<expert>/non_block.safetensors                             embeddings, time projection, head (as stored)
    OUT/<expert>/diffusion_pytorch_model.safetensors.index.json    standard weight_map
    OUT/<expert>/config.json                                       the source's, plus "quantization": {...}

Keys are upstream names; a compressed linear stores `<name>.weight` (float8_e4m3fn / int8) and
`<name>.weight_scale` (float32); every other tensor keeps its stored dtype (lossless). The rest of the
checkpoint (umt5 .pth, tokenizer folder, VAE .pth, other model folders) is hard-linked (copied across file
systems), so OUT is a complete checkpoint that `worldstream generate --ckpt_dir OUT` and the disk tier read
directly. Peak host memory is about one block in the source dtype. Everything is written into a hidden
temporary folder next to OUT (`.OUT.partial-PID`, locked while it is written) that is renamed to OUT at the end,
and removed on any failure, Ctrl-C and SIGTERM included: OUT either exists whole or not at all. A folder left by
a killed conversion (SIGKILL, power loss) is removed by the next conversion into the same parent folder
(files.remove_stale_partials). The room OUT needs is checked before anything is converted.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..checkpoints import keymap
from ..checkpoints.compressed import QuantPolicy, quantize_stream, quantized_keys, quantized_model
from ..checkpoints.dit import INDEX_NAME, STUDENT_MARK, find_checkpoint, index_model_dir, validate
from ..checkpoints.lora import LoraSpec, check_loras, expert_deltas, merge_stream
from ..checkpoints.tensors import CheckpointError, iter_tensors, read_json
from ..files import lock, partial_dir_name, remove_stale_partials
from ..models.quant import DEFAULT_SKIP, FORMATS

NON_BLOCK_FILE = "non_block.safetensors"


def block_file(i: int) -> str:
    return f"block_{i:03d}.safetensors"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _link_or_copy(src: str, dst: str) -> str:
    """Hard-link `src` (its target, if a symlink) to `dst`; copy where links are impossible (other filesystem)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def convert(ckpt_dir: str | Path, out: str | Path, fmt: str, skip_first_last: bool = True,
            skip: tuple[str, ...] = DEFAULT_SKIP, log: Callable[[str], None] | None = _stderr,
            dit: list | None = None, loras: list[LoraSpec] | tuple = ()) -> Path:
    """Write the compressed copy of checkpoint `ckpt_dir` to the new folder `out`; return `out`.

    `dit`: DiT files / folders used instead of the checkpoint's own (LightX2V's single-file students): each is
    written as the DiT at OUT's root (two: OUT/high_noise_model/, OUT/low_noise_model/). `loras`: merged into
    each tensor before it is compressed. A student (or a step-distill LoRA merged in) is marked in config.json
    (`"step_distill": true`) so OUT samples as one.
    Raises CheckpointError for a source that cannot be used, ValueError for a bad format or an existing `out`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")
    policy = QuantPolicy(fmt, skip_first_last, tuple(skip))
    log = log or (lambda msg: None)
    ckpt = find_checkpoint(ckpt_dir, dit=dit)
    root = ckpt.root.resolve()
    loras = list(loras)
    student = ckpt.student is not None or check_loras(loras, ckpt) is not None
    if ckpt.quant is not None:
        raise CheckpointError(f"{ckpt.root}: already compressed ({ckpt.quant.fmt}); convert the original checkpoint")
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ValueError(f"--out {out}: already exists; give a new folder (nothing is overwritten)")
    if out.resolve().is_relative_to(root) and out.resolve().parent != root:
        raise ValueError(f"--out {out}: inside the checkpoint's model folders; write it elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent, log)
    expert_dirs = {name: Path(d).resolve() for name, d in ckpt.experts.items()}
    _check_room(ckpt, expert_dirs, policy, out)
    tmp = out.parent / partial_dir_name(out.name)
    if tmp.exists():                       # this process's own, from an earlier call
        shutil.rmtree(tmp)
    tmp.mkdir()
    held = lock(tmp)                       # held until the end: a later run can tell this folder is in use
    try:
        dit_files: set[Path] = set()
        for name, d in expert_dirs.items():
            if d.is_relative_to(root):
                rel = d.relative_to(root)
            else:       # a --dit outside the checkpoint: the DiT of OUT
                rel = Path({"high": "high_noise_model", "low": "low_noise_model"}.get(name, "."))
            deltas = expert_deltas(loras, ckpt.config, name) if loras else {}
            dit_files |= _convert_expert(ckpt.config, d, tmp / rel, policy, f"{name} ({rel.as_posix()}/)", log,
                                         deltas, student)
        skip_dirs = set(expert_dirs.values()) - {root}
        if dit:      # the checkpoint's own DiT is replaced by --dit: none of it goes into OUT
            own_dirs, own_files = _own_dit(ckpt_dir)
            skip_dirs |= own_dirs
            dit_files |= own_files
        _copy_rest(root, tmp, skip_dirs=skip_dirs, skip_files=dit_files, skip_names={out.name, tmp.name})
        if out.exists():
            raise ValueError(f"--out {out}: appeared while converting; the conversion is left unwritten")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(held)
    log(f"convert: wrote {out} ({fmt}, first/last blocks {'whole' if skip_first_last else 'compressed'})")
    return out


def _own_dit(ckpt_dir) -> tuple[set[Path], set[Path]]:
    """(folders, files) of the DiT a checkpoint folder holds itself (none if it holds only companions)."""
    try:
        own = find_checkpoint(ckpt_dir)
    except CheckpointError:
        return set(), set()
    root = own.root.resolve()
    dirs, files = set(), set()
    for d in own.experts.values():
        d = Path(d).resolve()
        if d == root:
            files |= {loc.file.resolve() for loc in index_model_dir(d).values()}
            files |= {p.resolve() for p in d.glob("*.safetensors.index.json")} | {(d / "config.json").resolve()}
        else:
            dirs.add(d)
    return dirs, files


def converted_bytes(cfg, locations: dict, policy: QuantPolicy) -> int:
    """Bytes of tensors one converted expert stores: 8-bit weights and float32 scales for the compressed
    linears (their shapes from the model on the meta device), every other tensor as stored."""
    qkeys = quantized_keys(cfg, policy)
    state = quantized_model(cfg, torch.float32, policy).state_dict()   # meta: shapes and dtypes only
    total = 0
    for key, loc in locations.items():
        if key in qkeys:
            scale = key + "_scale"
            total += state[key].numel() * state[key].element_size() + state[scale].numel() * 4
        else:
            total += loc.nbytes
    return total


def _check_room(ckpt, expert_dirs: dict[str, Path], policy: QuantPolicy, out: Path) -> None:
    """Refuse before converting anything when OUT's file system has not the room for the compressed experts
    (plus the companion files, where they cannot be hard-linked: another file system)."""
    root = Path(ckpt.root).resolve()
    need = sum(converted_bytes(ckpt.config, index_model_dir(d), policy) for d in expert_dirs.values())
    if os.stat(root).st_dev != os.stat(out.parent).st_dev:     # companions are copied, not linked
        subdirs = [d for d in expert_dirs.values() if d != root]
        need += sum(f.stat().st_size for f in root.rglob("*")
                    if f.is_file() and not any(f.resolve().is_relative_to(d) for d in subdirs))
    free = shutil.disk_usage(out.parent).free
    if free < need * 1.02 + 64e6:
        raise OSError(errno.ENOSPC, f"needs about {need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free "
                                    "(nothing was written)", str(out.parent))


def _save(tensors: dict, path: Path) -> None:
    """safetensors' save_file, its write failures reported as the OSError they are (it raises its own
    SafetensorError, naming neither the file nor the errno)."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise OSError(f"{path}: cannot write it ({e})") from None
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def _convert_expert(cfg, src: Path, dst: Path, policy: QuantPolicy, label: str, log, deltas=None,
                    student: bool = False) -> set[Path]:
    """Convert one DiT folder (or single file), LoRA `deltas` merged first; returns the source files that
    belong to it (not copied as companions)."""
    locations = index_model_dir(src)
    validate(cfg, locations, src, None)
    qkeys = quantized_keys(cfg, policy)
    n = cfg.num_layers
    groups: dict[str, dict] = {NON_BLOCK_FILE: {}}
    groups.update({block_file(i): {} for i in range(n)})
    for key, loc in locations.items():
        parts = key.split(".")
        groups[block_file(int(parts[1])) if parts[0] == "blocks" else NON_BLOCK_FILE][key] = loc

    def parts():
        for k, (fname, locs) in enumerate(groups.items()):
            tensors = iter_tensors(locs, None, "cpu")
            if deltas:
                tensors = merge_stream(tensors, deltas)
            tensors = dict(quantize_stream(tensors, qkeys, policy.fmt))
            before, after = sum(loc.nbytes for loc in locs.values()), sum(t.nbytes for t in tensors.values())
            yield fname, tensors
            del tensors             # one block in memory at a time
            if fname != NON_BLOCK_FILE:
                log(f"convert: {label} block {k}/{n}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")

    config = {}
    if src.is_dir() and (src / "config.json").is_file():
        config = read_json(src / "config.json", "config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{src / 'config.json'}: not a JSON object")
    if not config:
        config = keymap.upstream_config(cfg)
    if student:
        config[STUDENT_MARK] = True
    write_expert(dst, parts(), config, policy)
    own = {loc.file.resolve() for loc in locations.values()}
    if src.is_dir():
        own |= {p.resolve() for p in src.glob("*.safetensors.index.json")} | {(src / "config.json").resolve()}
    return own


def write_expert(dst: Path, parts, config: dict, policy: QuantPolicy) -> int:
    """Write one compressed expert folder: `parts` yields (file name, {key: tensor}) — each block's tensors
    (or the non-block ones) already in their stored dtypes, one group at a time — then the index json and
    config.json (`config` plus the policy's "quantization" entry). Returns the bytes of tensors written."""
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for fname, tensors in parts:
        _save(tensors, dst / fname)
        weight_map.update({key: fname for key in tensors})
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2))
    (dst / "config.json").write_text(json.dumps({**config, "quantization": policy.to_json()}, indent=2))
    return total


def _copy_rest(root: Path, dst: Path, skip_dirs: set[Path], skip_files: set[Path], skip_names: set[str]) -> None:
    """Hard-link every other file and folder of the checkpoint (text encoder, tokenizer, VAE, ...) into dst."""
    for entry in sorted(root.iterdir()):
        if entry.name in skip_names or entry.resolve() in skip_dirs or entry.resolve() in skip_files:
            continue
        target = dst / entry.name
        if target.exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, target, copy_function=_link_or_copy)
        elif entry.is_file():
            _link_or_copy(str(entry), str(target))
