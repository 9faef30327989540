"""Prompt embeddings for the DiT: an on-disk cache, and where the text encoder runs when it must.

`encode_prompts` reads each prompt from the `PromptCache`; only if some miss is the umt5 encoder loaded
(checkpoints/t5.py), used and freed, in one of three placements: "gpu" (loaded on the target device), "cpu"
(upstream's `--t5_cpu`; only the embeddings move), or "stream" (its 24 blocks, ~0.39 GB each in bf16, wait in
pinned host slabs and stream through two GPU slots by the same engine and the same `place` call as the DiT's
blocks, so the 11 GB encoder needs ~3 GB of VRAM).

`PromptCache` stores embeddings as safetensors keyed by sha256(cleaned prompt, encoder identity), so a prompt
seen before never loads the encoder.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Literal, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoints.t5 import T5_CHECKPOINT, T5_TOKENIZER, check_files, load_text_encoder
from ..files import atomic_write
from ..models.text_encoder import TEXT_LEN, TextEncoder, clean_prompt
from ..runtime.memory import empty_host_cache
from ..runtime.slab import BlockLayout
from ..runtime.streaming import host_slabs_from_blocks, place, unplace


def _warn(msg: str) -> None:
    """The prompt cache is optional: its failures are warnings on stderr, never the end of a run."""
    print(f"warning: prompt cache: {msg}", file=sys.stderr)

Placement = Literal["gpu", "cpu", "stream"]


CACHE_FORMAT = "worldstream-prompt-embedding-v1"
_MIB = 1 << 20


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/worldstream/prompts`, else `~/.cache/worldstream/prompts`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "worldstream" / "prompts"


def _file_stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _checkpoint_files(ckpt_dir: Path) -> dict[str, Path]:
    pth, tok = check_files(ckpt_dir)
    files = {T5_CHECKPOINT: pth}
    for f in sorted(tok.iterdir()):
        if f.is_file():
            files[f"{T5_TOKENIZER}/{f.name}"] = f
    return files


def fingerprint_checkpoint(ckpt_dir: str | os.PathLike) -> str:
    """sha256 over the `.pth` size + first and last MiB, and every tokenizer file's name and content.

    Cheap (no full 11 GB read) yet changes with any re-export, re-quantization or different tokenizer.
    """
    h = hashlib.sha256(b"umt5-encoder-fingerprint-v1\0")
    for name, path in _checkpoint_files(Path(ckpt_dir)).items():
        size = path.stat().st_size
        h.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if name == T5_CHECKPOINT and size > 2 * _MIB:
                h.update(f.read(_MIB))
                f.seek(size - _MIB)
                h.update(f.read(_MIB))
            else:
                for chunk in iter(lambda: f.read(_MIB), b""):
                    h.update(chunk)
    return h.hexdigest()





class PromptCache:
    """Prompt embeddings on disk: `<root>/<sha256>.safetensors`, one tensor "context" [len, d_model] each.

    key = sha256(format, encoder identity, cleaned prompt). The identity covers the checkpoint fingerprint,
    dtype and text_len (a bf16 embedding is not an fp32 one). It does not cover the device: GPU and CPU
    results differ only by rounding. Fingerprints are remembered per checkpoint folder in
    `<root>/fingerprints/` next to the files' (size, mtime, inode), so a repeat run reads no weights at all
    and still serves hits once the encoder files have been deleted to free disk; a changed file re-fingerprints.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    # identity --------------------------------------------------------------------------------

    def _memo_path(self, ckpt_dir: Path) -> Path:
        return self.root / "fingerprints" / (hashlib.sha256(str(ckpt_dir).encode()).hexdigest()[:32] + ".json")

    def _fingerprint(self, ckpt_dir: str | os.PathLike) -> str:
        ckpt_dir = Path(ckpt_dir).resolve()
        memo_path = self._memo_path(ckpt_dir)
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError, RecursionError):
            memo = None
        valid = (isinstance(memo, dict) and isinstance(memo.get("files"), dict)
                 and isinstance(memo.get("fingerprint"), str))       # anything else: fingerprint again
        if valid and memo.get("ckpt_dir") == str(ckpt_dir):
            stats = memo["files"]
            tok = ckpt_dir / T5_TOKENIZER
            present = {f"{T5_TOKENIZER}/{f.name}" for f in tok.iterdir() if f.is_file()} if tok.is_dir() else set()
            # Reuse while every remembered file that still exists is unchanged and no file was added.
            unchanged = present <= stats.keys() and all(
                _file_stat(ckpt_dir / name) == stat for name, stat in stats.items() if (ckpt_dir / name).exists())
            if unchanged:
                return memo["fingerprint"]
        files = _checkpoint_files(ckpt_dir)        # raises FileNotFoundError naming what is missing
        stats = {name: _file_stat(path) for name, path in files.items()}
        fingerprint = fingerprint_checkpoint(ckpt_dir)
        record = {"ckpt_dir": str(ckpt_dir), "files": stats, "fingerprint": fingerprint}
        try:
            atomic_write(memo_path, lambda tmp: Path(tmp).write_text(json.dumps(record)))
        except OSError as e:                       # a read-only cache still works, just slower
            _warn(f"cannot remember the fingerprint of {ckpt_dir} in {memo_path} ({e.strerror or e})")
        return fingerprint

    def identity(self, ckpt_dir: str | os.PathLike, dtype: torch.dtype, text_len: int = TEXT_LEN) -> str:
        """The encoder identity of the umt5 files in `ckpt_dir`, run in `dtype` with `text_len` tokens."""
        return f"umt5:{self._fingerprint(ckpt_dir)}:{str(dtype).removeprefix('torch.')}:{text_len}"

    # entries ---------------------------------------------------------------------------------

    def key(self, cleaned_prompt: str, identity: str) -> str:
        return hashlib.sha256(json.dumps([CACHE_FORMAT, identity, cleaned_prompt]).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, cleaned_prompt: str, identity: str) -> torch.Tensor | None:
        """The stored embedding (CPU), or None on a miss. A corrupt or mismatched file counts as a miss."""
        path = self.path(self.key(cleaned_prompt, identity))
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("identity") != identity or meta.get("prompt") != cleaned_prompt:
                    raise ValueError("entry belongs to another prompt or encoder")
                if set(f.keys()) != {"context"}:
                    raise ValueError(f"expected one tensor 'context', found {sorted(f.keys())}")
                context = f.get_tensor("context")
            if context.ndim != 2:
                raise ValueError(f"context has shape {list(context.shape)}")
            return context
        except Exception as e:  # noqa: BLE001 - any unreadable entry is a miss
            _warn(f"ignoring the unreadable entry {path} ({e})")
            return None

    def put(self, cleaned_prompt: str, identity: str, context: torch.Tensor) -> Path | None:
        """Store one embedding [len, d_model] atomically (temp file + os.replace). A cache that cannot be
        written (read-only, full, not a folder) gives a warning and None: the run goes on without it."""
        path = self.path(self.key(cleaned_prompt, identity))
        meta = {"format": CACHE_FORMAT, "identity": identity, "prompt": cleaned_prompt}
        tensor = context.detach().to("cpu").contiguous()
        try:
            atomic_write(path, lambda tmp: save_file({"context": tensor}, tmp, metadata=meta))
        except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error for a failed write
            _warn(f"cannot store an embedding in {self.root} ({getattr(e, 'strerror', None) or e}); "
                  "the run goes on without it")
            return None
        return path


def stream_encoder(encoder: TextEncoder, device: torch.device | str, prefetch: int = 1):
    """Run `encoder` (loaded on the CPU) on `device` with only its embedding and final norm resident: its blocks
    are packed into pinned host slabs and streamed through the engine. Returns what `unplace` needs."""
    blocks = encoder.blocks
    sources = host_slabs_from_blocks(blocks, range(len(blocks)), BlockLayout.of(blocks[0]))
    engine, handle = place(encoder.model, blocks, device, sources, resident=[], prefetch=prefetch)
    return sources, engine, handle


# --------------------------------------------------------------------------------------------- entry

def encode_prompts(prompts: Sequence[str], ckpt_dir: str | os.PathLike, cache: PromptCache | None = None,
                   placement: Placement = "gpu", device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.bfloat16, text_len: int = TEXT_LEN) -> list[torch.Tensor]:
    """Prompt embeddings for the DiT, one [true_len, d_model] tensor per prompt, on `device`.

    Cached prompts are read from `cache`; only if some miss is the encoder loaded (placement "gpu": on
    `device`; "cpu": on the CPU, upstream's `--t5_cpu`, the embeddings then moved to `device`; "stream": its
    blocks streamed through `device` from pinned host memory, see `stream_encoder`), the misses
    encoded and stored, and the encoder freed again. `device` defaults to CUDA when available, else the CPU.
    Repeated prompts are encoded once. To keep an encoder resident, use `load_text_encoder` directly.
    """
    if placement not in ("gpu", "cpu", "stream"):
        raise ValueError(f"placement must be 'gpu', 'cpu' or 'stream', got {placement!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cleaned = [clean_prompt(p) for p in prompts]
    identity = cache.identity(ckpt_dir, dtype, text_len) if cache is not None else None

    found: dict[str, torch.Tensor] = {}
    if cache is not None:
        for text in dict.fromkeys(cleaned):
            if (hit := cache.get(text, identity)) is not None:
                found[text] = hit
    misses = [t for t in dict.fromkeys(cleaned) if t not in found]
    if misses:
        encoder = load_text_encoder(ckpt_dir, device if placement == "gpu" else "cpu", dtype, text_len)
        streaming = stream_encoder(encoder, device) if placement == "stream" else None
        try:
            for text, context in zip(misses, encoder.encode_cleaned(misses)):
                found[text] = context
                if cache is not None:
                    cache.put(text, identity, context)
        finally:
            if streaming is not None:
                unplace(encoder.blocks, *streaming)
            encoder.close()
            del encoder, streaming
            empty_host_cache()   # (its slabs' host RAM goes back to the system before the DiT loads)
    return [found[t].to(device=device, dtype=dtype) for t in cleaned]
