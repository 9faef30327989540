"""A tiny umt5 text encoder in the real on-disk layout: `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`.

The weights use upstream's key names and bf16, like the real file. The tokenizer is a real sentencepiece
unigram model trained here, offline, on a few dozen prompt-like sentences (English, German, French,
Spanish, Chinese), saved as a Hugging Face T5 tokenizer folder, so tests exercise the real loading code
(`AutoTokenizer.from_pretrained(folder)`). Training is deterministic and takes well under a second.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from ..checkpoints.t5 import T5_CHECKPOINT, T5_TOKENIZER, upstream_shapes
from ..models.text_encoder import T5Config

CORPUS = [
    "A cat walks across a sunny garden full of flowers.",
    "The camera pans slowly over a snowy mountain ridge at dawn.",
    "A red car drives through the rainy city streets at night.",
    "Waves crash against the rocky shore under a grey sky.",
    "A small boat sails on a calm lake surrounded by pine trees.",
    "An old man reads a newspaper on a wooden bench in the park.",
    "Children play football on a dusty field in the afternoon.",
    "A drone flies above a busy market with colorful tents.",
    "The first-person view walks down a narrow medieval alley.",
    "Sunlight shines through the leaves of a tall oak tree.",
    "A horse gallops across an open meadow in slow motion.",
    "The spaceship lands gently on the surface of a red planet.",
    "A chef chops vegetables quickly in a bright kitchen.",
    "Heavy snow falls on a quiet village with warm lights.",
    "A dog runs along the beach chasing a ball.",
    "The camera moves forward through a dark forest path.",
    "Ein Hund läuft am Strand entlang und spielt im Wasser.",
    "Die Kamera fliegt über eine alte Burg in den Bergen.",
    "Un chat dort paisiblement sur le rebord de la fenêtre.",
    "Una ciudad moderna con rascacielos brillantes al atardecer.",
    "城市夜景，霓虹灯闪烁，街道上车来车往。",
    "一只白色的猫在花园里慢慢地走着。",
    "镜头缓缓推进，穿过古老的森林小路。",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品。",
    "A futuristic robot walks through an abandoned factory hall.",
    "Rain drops slide down the window of a moving train.",
    "The hot air balloon rises above the green valley.",
    "A woman in a blue dress dances in an empty ballroom.",
    "Fireworks explode over the harbor during the festival.",
    "A tiny frog jumps from one lily pad to another.",
    "The view turns left and reveals a waterfall in the jungle.",
    "Clouds move quickly over the desert dunes, time lapse.",
]
TOKENIZER_PIECES = 120   # <pad>=0, </s>=1, <unk>=2 (T5's ids), then 117 learned pieces; T5Config.tiny() has 128 rows


def train_tiny_spm() -> bytes:
    """A sentencepiece unigram model (serialized) with T5's special ids, trained on CORPUS."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="unigram", vocab_size=TOKENIZER_PIECES,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    return model.getvalue()


def write_tiny_tokenizer(folder: str | os.PathLike) -> Path:
    """Write `spiece.model` + the HF T5 tokenizer files (tokenizer.json, tokenizer_config.json) into `folder`."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    proto = train_tiny_spm()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(str(folder))
    (folder / "spiece.model").write_bytes(proto)
    return folder


def random_text_encoder_state(cfg: T5Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with upstream's key names, scaled so every part (bias, norms, gate) visibly matters."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in upstream_shapes(cfg).items():
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith("pos_embedding.embedding.weight"):
            t = torch.randn(shape, generator=g)            # relative position bias, in score units
        elif key == "token_embedding.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * shape[1] ** -0.5
        state[key] = t.to(torch.bfloat16)
    return state


def write_tiny_text_encoder(ckpt_root: str | os.PathLike, seed: int = 0, cfg: T5Config | None = None) -> Path:
    """Write a tiny umt5 encoder (`T5Config.tiny()` unless `cfg`) and tokenizer into `ckpt_root`; return it."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    state = random_text_encoder_state(cfg or T5Config.tiny(), seed)
    tmp = root / (T5_CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, root / T5_CHECKPOINT)
    write_tiny_tokenizer(root / T5_TOKENIZER)
    return root
