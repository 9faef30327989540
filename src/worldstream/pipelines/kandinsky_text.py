"""Kandinsky 5's prompt embeddings: its two text encoders placed under the budget, and an on-disk cache.

The math is diffusers' (`Kandinsky5I2VPipeline.encode_prompt` / the T2V one: the prompt template, Qwen2.5-VL's
last hidden state after the template's tokens, CLIP-L's pooled output); what this module adds is where Qwen
runs and that a prompt seen before loads neither encoder.

Qwen2.5-VL-7B (~8.3 B parameters, 16.6 GB in bf16) is placed like umT5 (pipelines/prompts.py):
  "gpu"     its language model on the device, then freed;
  "cpu"     on the CPU (`--t5_cpu`), only the embeddings move;
  "stream"  its 28 decoder layers packed into pinned host slabs and streamed through two GPU slots by the same
            engine and `place` call as the DiT's blocks (embeddings, final norm and RoPE table resident): what
            `run_kandinsky` picks when the encoder does not fit the `--vram` budget with headroom.
Only `model.model` runs (Qwen2_5_VLModel: its hidden states are what diffusers reads; the vision tower stays on
the CPU unused and the 1 GB `lm_head` is never computed), so every placement gives the embeddings of the whole
model's forward. CLIP's text tower (123 M) goes where Qwen's non-streamed parts go.

`KandinskyPromptCache` stores (Qwen embedding, CLIP pooled embedding, cu_seqlens) per prompt as safetensors,
keyed like the umT5 `PromptCache`: sha256 of the cleaned prompt and an encoder identity (a fingerprint of the
checkpoint's text_encoder/, tokenizer/, text_encoder_2/ and tokenizer_2/ files, the pipeline class whose prompt
template is used, the dtype and the token limit).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import atomic_write
from ..runtime.memory import empty_host_cache
from ..runtime.slab import BlockLayout
from ..runtime.streaming import host_slabs_from_blocks, place, unplace
from .prompts import PromptCache, _warn, default_cache_dir

TEXT_FOLDERS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
CACHE_FORMAT = "worldstream-kandinsky5-prompt-v1"
MAX_TOKENS = 512          # diffusers' default max_sequence_length for these pipelines
PLACEMENTS = ("gpu", "cpu", "stream")
_MIB = 1 << 20


def fingerprint_text_encoders(root: str | os.PathLike) -> str:
    """sha256 over every file of the four text folders: its path and size, and its content (the first and last
    MiB of files over 2 MiB). Cheap for a 16 GB encoder, and it changes with any re-export or other tokenizer."""
    root = Path(root)
    h = hashlib.sha256(b"kandinsky5-text-fingerprint-v1\0")
    for folder in TEXT_FOLDERS:
        d = root / folder
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is missing")
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            size = f.stat().st_size
            h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
            with open(f, "rb") as fh:
                if size > 2 * _MIB:
                    h.update(fh.read(_MIB))
                    fh.seek(size - _MIB)
                    h.update(fh.read(_MIB))
                else:
                    h.update(fh.read())
    return h.hexdigest()


class KandinskyPromptCache(PromptCache):
    """`<root>/<sha256>.safetensors` holding "qwen" [len, 3584], "clip" [768] and "cu_seqlens" [2] (int32) of one
    prompt. Unreadable or mismatched entries are misses; a cache that cannot be written is a warning."""

    def __init__(self, root: str | os.PathLike | None = None):
        super().__init__(root if root is not None else default_cache_dir() / "kandinsky5")

    def identity(self, ckpt_root: str | os.PathLike, dtype: torch.dtype, max_tokens: int = MAX_TOKENS,
                 pipeline: str = "") -> str:
        return (f"kandinsky5-text:{fingerprint_text_encoders(ckpt_root)}:{pipeline}:"
                f"{str(dtype).removeprefix('torch.')}:{max_tokens}")

    def key(self, cleaned_prompt: str, identity: str) -> str:
        return super().key(CACHE_FORMAT + "\0" + cleaned_prompt, identity)

    def get_entry(self, prompt: str, identity: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        path = self.path(self.key(prompt, identity))
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("identity") != identity or meta.get("prompt") != prompt:
                    raise ValueError("entry belongs to another prompt or encoder")
                if set(f.keys()) != {"qwen", "clip", "cu_seqlens"}:
                    raise ValueError(f"expected tensors qwen, clip, cu_seqlens; found {sorted(f.keys())}")
                qwen, clip, cu = f.get_tensor("qwen"), f.get_tensor("clip"), f.get_tensor("cu_seqlens")
            if qwen.ndim != 2 or clip.ndim != 1 or cu.tolist() != [0, qwen.shape[0]]:
                raise ValueError(f"shapes qwen {list(qwen.shape)}, clip {list(clip.shape)}, cu_seqlens {cu.tolist()}")
            return qwen, clip, cu
        except Exception as e:  # noqa: BLE001 - any unreadable entry is a miss
            _warn(f"ignoring the unreadable entry {path} ({e})")
            return None

    def put_entry(self, prompt: str, identity: str, qwen: torch.Tensor, clip: torch.Tensor,
                  cu: torch.Tensor) -> Path | None:
        path = self.path(self.key(prompt, identity))
        meta = {"format": CACHE_FORMAT, "identity": identity, "prompt": prompt}
        tensors = {"qwen": qwen.detach().cpu().contiguous(), "clip": clip.detach().cpu().contiguous(),
                   "cu_seqlens": cu.detach().cpu().to(torch.int32).contiguous()}
        try:
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        except Exception as e:  # noqa: BLE001
            _warn(f"cannot store an embedding in {self.root} ({getattr(e, 'strerror', None) or e}); "
                  "the run goes on without it")
            return None
        return path


def stream_language_model(lm: torch.nn.Module, device, prefetch: int = 1):
    """Qwen's language model (on the CPU) run on `device` with its decoder layers streamed from pinned slabs;
    returns what `unplace` needs."""
    layers = lm.layers
    sources = host_slabs_from_blocks(layers, range(len(layers)), BlockLayout.of(layers[0]))
    engine, handle = place(lm, layers, device, sources, resident=[], prefetch=prefetch, name="qwen2.5-vl")
    return sources, engine, handle


def encode_kandinsky_prompts(prompts: Sequence[str], root: str | os.PathLike, pipeline_cls, load, device,
                             dtype: torch.dtype, placement: str = "gpu", cache: KandinskyPromptCache | None = None,
                             max_tokens: int = MAX_TOKENS, report: dict | None = None):
    """[(qwen [1, len, d], clip [1, d2], cu_seqlens [2] int32) on `device` in `dtype`] per prompt.

    Cached prompts are read; only if some miss are the encoders loaded (`load(name, dtype)` gives a checked
    component of the checkpoint) and placed per `placement`, the misses encoded with diffusers' `encode_prompt`
    and stored, and both encoders freed. `report["encoders_loaded"]` says whether they were (and
    "qwen_layer_copies", in a "stream" run, how many layer copies the engine made)."""
    import importlib

    prompt_clean = importlib.import_module(pipeline_cls.__module__).prompt_clean     # what encode_prompt applies
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    device = torch.device(device)
    cleaned = [prompt_clean(p) for p in prompts]
    identity = cache.identity(root, dtype, max_tokens, pipeline_cls.__name__) if cache is not None else None
    found = {}
    if cache is not None:
        for text in dict.fromkeys(cleaned):
            if (hit := cache.get_entry(text, identity)) is not None:
                found[text] = hit
    misses = [t for t in dict.fromkeys(cleaned) if t not in found]
    if report is not None:
        report.update(encoders_loaded=bool(misses), cached_prompts=len(set(cleaned)) - len(misses),
                      qwen_placement=placement if misses else None)
    if misses:
        found.update(_encode(misses, pipeline_cls, load, device, dtype, placement, max_tokens, report))
        if cache is not None:
            for text in misses:
                cache.put_entry(text, identity, *found[text])
    out = []
    for text in cleaned:
        qwen, clip, cu = found[text]
        out.append((qwen.to(device=device, dtype=dtype)[None], clip.to(device=device, dtype=dtype)[None],
                    cu.to(device=device, dtype=torch.int32)))
    return out


def _encode(prompts: list[str], pipeline_cls, load, device, dtype, placement: str, max_tokens: int,
            report: dict | None = None) -> dict:
    home = torch.device("cpu") if placement == "cpu" else device
    qwen = load("text_encoder", dtype)                   # on the CPU, as loaded
    model = qwen.model                                   # Qwen2_5_VLModel: hidden states, no lm_head
    lm = model.language_model
    clip = load("text_encoder_2", dtype).to(home)
    streaming = pipe = None
    try:
        if placement == "stream":
            streaming = stream_language_model(lm, device)
        else:
            lm.to(home)
        pipe = pipeline_cls(transformer=None, vae=None, text_encoder=model, tokenizer=load("tokenizer", None),
                            text_encoder_2=clip, tokenizer_2=load("tokenizer_2", None), scheduler=None)
        out = {}
        with torch.no_grad():
            for text in prompts:      # one at a time, as the pipeline does for prompt and negative prompt
                q, c, cu = pipe.encode_prompt([text], device=home, dtype=dtype, max_sequence_length=max_tokens)
                out[text] = (q[0].to(device), c[0].to(device), cu.cpu())
        if report is not None and streaming is not None:
            report["qwen_layer_copies"] = streaming[1].stats["copies"]
        return out
    finally:
        if streaming is not None:
            unplace(lm.layers, *streaming)
        del qwen, model, lm, clip, streaming, pipe
        empty_host_cache()         # (the slabs' host RAM goes back before the transformer loads)
        if device.type == "cuda":
            torch.cuda.empty_cache()
