"""Reading upstream's umt5 encoder (`models_t5_umt5-xxl-enc-bf16.pth` + the `google/umt5-xxl/` tokenizer
folder of a Wan / LingBot-World checkpoint) into a models.text_encoder.TextEncoder.

Built for an 11 GB file: the `.pth` is opened with `torch.load(weights_only=True, mmap=True)` (no code runs,
nothing is read yet), its keys and shapes are checked against the layout before anything is allocated, the
model is built on the meta device and each tensor is then copied to its device/dtype one at a time (upstream
key names are mapped onto transformers' by `upstream_to_hf_key`). On the CPU in the checkpoint's own dtype the
copy is skipped: the weights stay memory-mapped. The tokenizer is loaded from local files only, never running
code from the folder.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..models.text_encoder import TEXT_LEN, T5Config, TextEncoder
from .tensors import CheckpointError, check_finite, read_pth

T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"   # inside a Wan / LingBot checkpoint folder
T5_TOKENIZER = "google/umt5-xxl"                      # HF tokenizer folder, same place


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


def check_files(ckpt_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(weights file, tokenizer folder) of a checkpoint folder; FileNotFoundError naming the missing one."""
    pth, tok = Path(ckpt_dir) / T5_CHECKPOINT, Path(ckpt_dir) / T5_TOKENIZER
    if not pth.is_file():
        raise FileNotFoundError(f"text encoder weights not found: {pth}")
    if not tok.is_dir():
        raise FileNotFoundError(f"text encoder tokenizer folder not found: {tok}")
    return pth, tok


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Open a `.pth` safely (weights_only: no code runs) and lazily (mmap: nothing is read yet)."""
    return read_pth(path)


def check_text_encoder(ckpt_dir: str | os.PathLike) -> T5Config:
    """The umt5 weights of a checkpoint folder checked without reading them (memory-mapped, keys and shapes
    only): its config, or CheckpointError naming the file. The tokenizer folder must exist."""
    try:
        pth, _ = check_files(ckpt_dir)
        state = read_state_dict(pth)
        cfg = infer_config(state, str(pth))
        validate_state(state, cfg, str(pth))
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e)) from None
    return cfg


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


def load_text_encoder(ckpt_dir: str | os.PathLike, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16, text_len: int = TEXT_LEN) -> TextEncoder:
    """Load `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/` from a checkpoint folder onto `device`.

    Upstream runs it in bfloat16 (the checkpoint's dtype) on either device; float32 is for tests.
    """
    from transformers import UMT5EncoderModel

    if text_len < 1:
        raise ValueError(f"text_len must be positive, got {text_len}")
    pth, tok_dir = check_files(ckpt_dir)
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
        t = check_finite(state.pop(key), f"{pth}: tensor {key!r}")
        param = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
        for name in upstream_to_hf_key(key):
            _set_param(model, name, param)
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers()
                                                                         if b.is_meta]
    if leftover:
        raise RuntimeError(f"{pth}: parameters left unloaded: {leftover[:5]}")
    return TextEncoder(model.eval().requires_grad_(False), tokenizer, cfg, text_len)
