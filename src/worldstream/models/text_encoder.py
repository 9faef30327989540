"""The umt5-xxl text encoder Wan / LingBot-World condition on: its shape, upstream's prompt cleaning, and the
encoder itself (tokenize, run, cut to the true length).

What upstream does (spec section 7, `wan/modules/t5.py`, `wan/modules/tokenizers.py`):

1. clean each prompt: `ftfy.fix_text`, HTML-unescape twice, strip, collapse whitespace runs to one space;
2. tokenize with the umt5 sentencepiece tokenizer, adding the `</s>` token, truncating and right-padding to
   512 tokens, with an attention mask;
3. run the encoder-only half of umt5-xxl on the padded ids, one prompt per call;
4. cut each output to its true length (the mask's sum, `</s>` included). The DiT zero-pads back to 512.

The network is transformers' `UMT5EncoderModel` built from `T5Config.to_hf()`: every layer has its own relative
position bias (32 buckets, max distance 128, bidirectional), attention scores are not scaled, norms are T5
RMSNorms (eps 1e-6), the FFN is gated with the tanh-approximated GELU ("gelu_new", the formula upstream writes
out). Attention runs in the "eager" implementation, which computes the same softmax(QK^T + bias + mask)V as
upstream (SDPA kernels would round differently).

Reading upstream's `.pth` into it is checkpoints/t5.py; the prompt-embedding cache and where the encoder runs
(GPU, CPU, or its blocks streamed) are pipelines/prompts.py.
"""
from __future__ import annotations

import gc
import html
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

TEXT_LEN = 512                                        # upstream pads / truncates every prompt to this


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
        """The transformer blocks (`model.encoder.block`): what the streaming engine streams when the encoder
        does not fit the GPU (runtime/streaming.py `place`, the same door as the DiT's blocks)."""
        return self.model.encoder.block

    def close(self) -> None:
        """Drop the weights (and return cached GPU memory); the encoder cannot encode afterwards."""
        if self.model is None:
            return
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
