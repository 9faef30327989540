"""The umt5-xxl text encoder Wan / LingBot-World condition on, plus an on-disk prompt-embedding cache.

What upstream does (spec section 7, `wan/modules/t5.py`, `wan/modules/tokenizers.py`):

1. clean each prompt: `ftfy.fix_text`, HTML-unescape twice, strip, collapse whitespace runs to one space;
2. tokenize with the umt5 sentencepiece tokenizer (`google/umt5-xxl/` in the checkpoint folder), adding the
   `</s>` token, truncating and right-padding to 512 tokens, with an attention mask;
3. run the encoder-only half of umt5-xxl (stored as `models_t5_umt5-xxl-enc-bf16.pth`, a plain state dict) on
   the padded ids, one prompt per call;
4. cut each output to its true length (the mask's sum, `</s>` included). The DiT zero-pads back to 512.

The network is transformers' `UMT5EncoderModel` built from a config: every layer has its own relative position
bias (32 buckets, max distance 128, bidirectional), attention scores are not scaled, norms are T5 RMSNorms
(eps 1e-6), the FFN is gated with the tanh-approximated GELU ("gelu_new", the formula upstream writes out).
We load upstream's weights into it through `upstream_to_hf_key`. Attention runs in the "eager" implementation,
which computes the same softmax(QK^T + bias + mask)V as upstream (SDPA kernels would round differently).

Loading is built for an 11 GB file: the `.pth` is opened with `torch.load(weights_only=True, mmap=True)` (no
code runs, nothing is read yet), its keys and shapes are checked against the layout before anything is
allocated, the model is built on the meta device and each tensor is then copied to its device/dtype one at a
time. On the CPU in the checkpoint's own dtype the copy is skipped: the weights stay memory-mapped.

Placement (see `encode_prompts`): "gpu" loads the encoder on the target device, encodes the misses and frees
it; "cpu" (upstream's `--t5_cpu`) runs it on the CPU and moves only the embeddings. Block-by-block streaming
is left to the streaming engine: the 24 blocks are `TextEncoder.blocks` (= `model.encoder.block`, an
`nn.ModuleList` of `UMT5Block`), which it can wrap like the DiT's blocks; the embedding and final norm are small.

`PromptCache` stores embeddings as safetensors keyed by sha256(cleaned prompt, encoder identity), so a prompt
seen before never loads the encoder.
"""
from __future__ import annotations

import gc
import hashlib
import html
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..files import atomic_write

log = logging.getLogger(__name__)

T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"   # inside a Wan / LingBot checkpoint folder
T5_TOKENIZER = "google/umt5-xxl"                      # HF tokenizer folder, same place
TEXT_LEN = 512                                        # upstream pads / truncates every prompt to this

Placement = Literal["gpu", "cpu", "stream"]


# --------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class T5Config:
    """Shape of a umt5 encoder. Defaults are umt5-xxl as shipped with Wan2.1/2.2 and LingBot-World."""

    vocab_size: int = 256_384     # embedding rows (the tokenizer has fewer pieces; the rest are never used)
    d_model: int = 4096
    d_ff: int = 10_240
    num_heads: int = 64
    d_kv: int = 64                # per-head width; num_heads * d_kv is the attention width (4096)
    num_layers: int = 24
    num_buckets: int = 32         # relative position buckets, half per direction
    max_distance: int = 128       # distances beyond this share the last bucket (not stored in the weights)
    eps: float = 1e-6
    act: str = "gelu_new"         # tanh GELU on the gate branch: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))

    @classmethod
    def tiny(cls) -> "T5Config":
        """Toy sizes for CPU tests. d_model 32 = the tiny DiTs' text_dim; 128 rows >= the tiny tokenizer's 120."""
        return cls(vocab_size=128, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2)

    def to_hf(self):
        """The equivalent `transformers.UMT5Config` (encoder only, eager attention, no dropout)."""
        from transformers import UMT5Config

        hf = UMT5Config(
            vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
            num_layers=self.num_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets, relative_attention_max_distance=self.max_distance,
            layer_norm_epsilon=self.eps, feed_forward_proj="gated-gelu", dense_act_fn=self.act,
            dropout_rate=0.0, use_cache=False, attn_implementation="eager",
        )
        if not (hf.is_gated_act and hf.dense_act_fn == self.act):
            raise RuntimeError(f"transformers built a different FFN ({hf.feed_forward_proj}, {hf.dense_act_fn})")
        return hf


# --------------------------------------------------------------------------------------------- keys

def upstream_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Every key of upstream's encoder state dict (`T5Encoder`, shared_pos=False) and its shape."""
    inner = cfg.num_heads * cfg.d_kv
    shapes: dict[str, tuple[int, ...]] = {"token_embedding.weight": (cfg.vocab_size, cfg.d_model)}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (cfg.d_model,),
            b + "attn.q.weight": (inner, cfg.d_model),
            b + "attn.k.weight": (inner, cfg.d_model),
            b + "attn.v.weight": (inner, cfg.d_model),
            b + "attn.o.weight": (cfg.d_model, inner),
            b + "norm2.weight": (cfg.d_model,),
            b + "ffn.gate.0.weight": (cfg.d_ff, cfg.d_model),
            b + "ffn.fc1.weight": (cfg.d_ff, cfg.d_model),
            b + "ffn.fc2.weight": (cfg.d_model, cfg.d_ff),
            b + "pos_embedding.embedding.weight": (cfg.num_buckets, cfg.num_heads),
        })
    shapes["norm.weight"] = (cfg.d_model,)
    return shapes


# Inside `blocks.{i}.` (upstream) -> inside `encoder.block.{i}.` (transformers).
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",   # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",      # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def upstream_to_hf_key(key: str) -> list[str]:
    """transformers names for one upstream key (a list: the token embedding is tied to two names)."""
    if key == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if key == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    m = _BLOCK_RE.fullmatch(key)
    if m and m.group(2) in _BLOCK_KEYS:
        return [f"encoder.block.{m.group(1)}.{_BLOCK_KEYS[m.group(2)]}"]
    raise KeyError(f"not a umt5 encoder key: {key!r}")


def infer_config(state: dict[str, torch.Tensor], source: str = "state dict") -> T5Config:
    """Read the shape of the encoder from the tensors (max_distance and eps are not stored: umt5's values)."""

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"{source}: missing key {key!r}; is this the umt5-xxl encoder ({T5_CHECKPOINT})?")
        s = tuple(state[key].shape)
        if len(s) != ndim:
            raise ValueError(f"{source}: {key!r} has shape {list(s)}, expected {ndim} dimensions")
        return s

    if "pos_embedding.embedding.weight" in state:
        raise ValueError(f"{source}: has one shared position bias (plain T5); umt5 has one per layer")
    vocab, d_model = shape("token_embedding.weight", 2)
    num_buckets, num_heads = shape("blocks.0.pos_embedding.embedding.weight", 2)
    inner = shape("blocks.0.attn.q.weight", 2)[0]
    d_ff = shape("blocks.0.ffn.fc1.weight", 2)[0]
    layers = {int(m.group(1)) for k in state if (m := _BLOCK_RE.fullmatch(k))}
    if sorted(layers) != list(range(len(layers))):
        gaps = sorted(set(range(max(layers) + 1)) - layers)[:5] if max(layers) < 10_000 else "many"
        raise ValueError(f"{source}: block indices are not 0..{len(layers) - 1} (missing {gaps})")
    if num_heads == 0 or inner % num_heads:
        raise ValueError(f"{source}: attention width {inner} is not a multiple of {num_heads} heads")
    return T5Config(vocab_size=vocab, d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=inner // num_heads,
                    num_layers=len(layers), num_buckets=num_buckets)


def validate_state(state: dict[str, torch.Tensor], cfg: T5Config, source: str = "state dict") -> None:
    """Raise ValueError naming `source` and the key unless `state` is exactly the layout of `cfg`."""
    expected = upstream_shapes(cfg)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source}: keys do not match a {cfg.num_layers}-layer umt5 encoder; "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k, s in expected.items():
        t = state[k]
        if tuple(t.shape) != s:
            raise ValueError(f"{source}: {k!r} has shape {list(t.shape)}, expected {list(s)}")
        if not t.is_floating_point():
            raise ValueError(f"{source}: {k!r} has dtype {t.dtype}, expected a floating point tensor")


# --------------------------------------------------------------------------------------------- prompts

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Upstream's prompt cleaning ("whitespace" mode): fix mojibake with ftfy, HTML-unescape twice, strip,
    and collapse every whitespace run to one space.

    Upstream matches whitespace with the `regex` module; Python's `re` differs only on U+001C..U+001F, which
    `ftfy.fix_text` has already removed, so the result is the same.
    """
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


# --------------------------------------------------------------------------------------------- encoder

def _paths(ckpt_dir: str | os.PathLike) -> tuple[Path, Path]:
    root = Path(ckpt_dir)
    return root / T5_CHECKPOINT, root / T5_TOKENIZER


def _check_exists(ckpt_dir: str | os.PathLike) -> tuple[Path, Path]:
    pth, tok = _paths(ckpt_dir)
    if not pth.is_file():
        raise FileNotFoundError(f"text encoder weights not found: {pth}")
    if not tok.is_dir():
        raise FileNotFoundError(f"text encoder tokenizer folder not found: {tok}")
    return pth, tok


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Open a `.pth` safely (weights_only: no code runs) and lazily (mmap: nothing is read yet)."""
    from .loader import read_pth
    return read_pth(path)


def load_tokenizer(folder: Path):
    """The HF tokenizer in `folder`, from local files only, never running code from the folder."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"{folder}: cannot load the umt5 tokenizer ({type(e).__name__}: {e})") from e
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"{folder}: tokenizer has no pad or eos token")
    tok.padding_side = "right"      # outputs are cut as out[:length]: padding must come last
    return tok


def _set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf not in module._parameters:
        raise KeyError(f"model has no parameter {name!r}")
    module._parameters[leaf] = param


class TextEncoder:
    """A loaded umt5 encoder + tokenizer. `encode(prompts)` -> one [true_len, d_model] tensor per prompt."""

    def __init__(self, model: nn.Module, tokenizer, cfg: T5Config, text_len: int = TEXT_LEN):
        self.model, self.tokenizer, self.cfg, self.text_len = model, tokenizer, cfg, text_len

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (`model.encoder.block`): what a block-streaming engine wraps."""
        return self.model.encoder.block

    def close(self) -> None:
        """Drop the weights (and return cached GPU memory); the encoder cannot encode afterwards."""
        if self.model is None:
            return
        if getattr(self, "engine", None) is not None:
            self.engine.release()
            self.engine = None
        device = self.device
        self.model = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def tokenize(self, cleaned: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Already-cleaned prompts -> (ids, mask), both [B, text_len] int64: `</s>` added, truncated, right-padded."""
        out = self.tokenizer(list(cleaned), padding="max_length", truncation=True, max_length=self.text_len,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    @torch.no_grad()
    def encode_cleaned(self, cleaned: Sequence[str]) -> list[torch.Tensor]:
        """Encode already-cleaned prompts one at a time (as upstream does: batch 1, padded to text_len)."""
        outs = []
        for text in cleaned:
            ids, mask = self.tokenize([text])
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            outs.append(hidden[0, : int(mask.sum())].clone())   # clone: do not keep the padded rows alive
        return outs

    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Clean, tokenize, encode; each result is [true_len, d_model] (true_len counts `</s>`, no padding)."""
        return self.encode_cleaned([clean_prompt(p) for p in prompts])


def stream_blocks(encoder: TextEncoder, device: torch.device | str, prefetch: int = 1) -> None:
    """Run `encoder` on `device` with only its embedding and final norm resident: its 24 blocks (~0.39 GB each
    in bf16) wait in pinned host slabs and stream through two GPU slots (runtime/streaming.py), so the 11 GB
    encoder needs ~3 GB of VRAM. Load the encoder on the CPU first."""
    from ..runtime.slab import BlockLayout
    from ..runtime.streaming import host_slabs_from_blocks, place

    blocks = encoder.blocks
    sources = host_slabs_from_blocks(blocks, range(len(blocks)), BlockLayout.of(blocks[0]))
    encoder.engine, _ = place(encoder.model.encoder, device, sources, [], prefetch, blocks_attr="block")
    encoder.model.shared.to(device)


def load_text_encoder(ckpt_dir: str | os.PathLike, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16, text_len: int = TEXT_LEN) -> TextEncoder:
    """Load `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/` from a checkpoint folder onto `device`.

    Upstream runs it in bfloat16 (the checkpoint's dtype) on either device; float32 is for tests.
    """
    from transformers import UMT5EncoderModel

    if text_len < 1:
        raise ValueError(f"text_len must be positive, got {text_len}")
    pth, tok_dir = _check_exists(ckpt_dir)
    state = read_state_dict(pth)
    cfg = infer_config(state, str(pth))
    validate_state(state, cfg, str(pth))
    tokenizer = load_tokenizer(tok_dir)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"{tok_dir}: tokenizer has {len(tokenizer)} tokens but {pth} embeds only {cfg.vocab_size}")

    with torch.device("meta"):
        model = UMT5EncoderModel(cfg.to_hf())
    device = torch.device(device)
    for key in upstream_shapes(cfg):           # one tensor at a time: peak memory ~ the model plus one tensor
        param = nn.Parameter(state.pop(key).to(device=device, dtype=dtype), requires_grad=False)
        for name in upstream_to_hf_key(key):
            _set_param(model, name, param)
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers()
                                                                         if b.is_meta]
    if leftover:
        raise RuntimeError(f"{pth}: parameters left unloaded: {leftover[:5]}")
    return TextEncoder(model.eval().requires_grad_(False), tokenizer, cfg, text_len)


# --------------------------------------------------------------------------------------------- cache

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
    pth, tok = _check_exists(ckpt_dir)
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
        except (OSError, ValueError):
            memo = None
        if memo is not None and memo.get("ckpt_dir") == str(ckpt_dir):
            stats = memo.get("files", {})
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
            log.warning("cannot remember the fingerprint of %s in %s: %s", ckpt_dir, memo_path, e)
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
        except Exception as e:
            log.warning("ignoring unreadable prompt cache entry %s: %s", path, e)
            return None

    def put(self, cleaned_prompt: str, identity: str, context: torch.Tensor) -> Path:
        """Store one embedding [len, d_model] atomically (temp file + os.replace)."""
        path = self.path(self.key(cleaned_prompt, identity))
        meta = {"format": CACHE_FORMAT, "identity": identity, "prompt": cleaned_prompt}
        tensor = context.detach().to("cpu").contiguous()
        atomic_write(path, lambda tmp: save_file({"context": tensor}, tmp, metadata=meta))
        return path


# --------------------------------------------------------------------------------------------- entry

def encode_prompts(prompts: Sequence[str], ckpt_dir: str | os.PathLike, cache: PromptCache | None = None,
                   placement: Placement = "gpu", device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.bfloat16, text_len: int = TEXT_LEN) -> list[torch.Tensor]:
    """Prompt embeddings for the DiT, one [true_len, d_model] tensor per prompt, on `device`.

    Cached prompts are read from `cache`; only if some miss is the encoder loaded (placement "gpu": on
    `device`; "cpu": on the CPU, upstream's `--t5_cpu`, the embeddings then moved to `device`; "stream": its
    blocks streamed through `device` from pinned host memory, see `stream_blocks`), the misses
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
        if placement == "stream":
            stream_blocks(encoder, device)
        try:
            for text, context in zip(misses, encoder.encode_cleaned(misses)):
                found[text] = context
                if cache is not None:
                    cache.put(text, identity, context)
        finally:
            encoder.close()
    return [found[t].to(device=device, dtype=dtype) for t in cleaned]
