"""umt5 text encoder: parity with an independent reference, prompt cleaning, tokenization, cache, bad input."""
from __future__ import annotations

import math

import shutil

import pytest
import torch

from worldstream.checkpoints.t5 import (
    T5_CHECKPOINT, T5_TOKENIZER, load_text_encoder, upstream_shapes, upstream_to_hf_key,
)
from worldstream.models.text_encoder import T5Config, clean_prompt
from worldstream.pipelines import prompts as te
from worldstream.pipelines.prompts import PromptCache, encode_prompts
from worldstream.testing.text import write_tiny_text_encoder

PROMPTS = [
    "A cat walks across a sunny garden full of flowers.",
    "镜头缓缓推进，穿过古老的森林小路。 The camera moves forward.",
    "x",
]
SHORT = 64        # text_len for the cache tests: the 512 padding is tested above, the cache does not care


# ------------------------------------------------------------------ independent reference (spec section 7)

def ref_bucket(rel: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """T5 bidirectional bucket of one relative position (key index - query index), written from the spec."""
    half = num_buckets // 2
    bucket = half if rel > 0 else 0
    n = abs(rel)
    exact = half // 2
    if n < exact:
        return bucket + n
    log_bucket = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (half - exact))
    return bucket + min(log_bucket, half - 1)


def ref_encode(sd: dict[str, torch.Tensor], ids: list[int], heads: int, eps: float = 1e-6) -> torch.Tensor:
    """umt5 encoder on the raw upstream state dict, float32, on the unpadded ids: [len, d]."""
    w = {k: v.float() for k, v in sd.items()}
    n = len(ids)
    layers = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    buckets = torch.tensor([[ref_bucket(j - i) for j in range(n)] for i in range(n)])

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = w["token_embedding.weight"][torch.tensor(ids)]
    for i in range(layers):
        p = f"blocks.{i}."
        h = rms(x, w[p + "norm1.weight"])
        q, k, v = (h @ w[p + f"attn.{c}.weight"].T for c in "qkv")
        q, k, v = (t.reshape(n, heads, -1).transpose(0, 1) for t in (q, k, v))       # [H, n, dh]
        bias = w[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)      # [H, n, n], own per layer
        att = torch.softmax(q @ k.transpose(1, 2) + bias, dim=-1)                     # no 1/sqrt(dh)
        x = x + (att @ v).transpose(0, 1).reshape(n, -1) @ w[p + "attn.o.weight"].T
        h = rms(x, w[p + "norm2.weight"])
        ff = gelu_tanh(h @ w[p + "ffn.gate.0.weight"].T) * (h @ w[p + "ffn.fc1.weight"].T)
        x = x + ff @ w[p + "ffn.fc2.weight"].T
    return rms(x, w["norm.weight"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared CPU their spin-waits cost seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_text_encoder(tmp_path_factory.mktemp("t5"), seed=0)


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return load_text_encoder(tiny_dir, "cpu", torch.float32)


@pytest.fixture
def fresh_dir(tmp_path):
    return write_tiny_text_encoder(tmp_path / "ckpt", seed=1)


# ------------------------------------------------------------------ architecture / keys

def test_reference_buckets_match_t5_table():
    # max_exact 8 per direction; 8..15 log-spaced up to 128; positive offsets shifted by 16.
    assert [ref_bucket(r) for r in (0, -1, -7, -8, -12, -16, -127, -128, -5000)] == [0, 1, 7, 8, 9, 10, 15, 15, 15]
    assert [ref_bucket(r) for r in (1, 7, 8, 16, 5000)] == [17, 23, 24, 26, 31]


def test_key_map_covers_umt5_xxl_exactly():
    from transformers import UMT5EncoderModel

    cfg = T5Config()
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg.to_hf())
    hf = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    mapped = {}
    for key, shape in upstream_shapes(cfg).items():
        for name in upstream_to_hf_key(key):
            assert hf[name] == shape, name
            mapped[name] = key
    assert mapped.keys() == hf.keys()
    assert sum(math.prod(s) for s in upstream_shapes(cfg).values()) == 5_680_910_336   # ~11.4 GB in bf16
    assert model.config.dense_act_fn == "gelu_new" and model.config._attn_implementation == "eager"


def test_writer_layout(tiny_dir):
    sd = torch.load(tiny_dir / T5_CHECKPOINT, weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == upstream_shapes(T5Config.tiny())
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert "blocks.1.pos_embedding.embedding.weight" in sd and "pos_embedding.embedding.weight" not in sd
    assert (tiny_dir / T5_TOKENIZER / "tokenizer.json").is_file()


# ------------------------------------------------------------------ parity

@pytest.mark.parametrize("n_words", [3, 60])     # 60 words > 8 tokens apart: exercises the log buckets
def test_parity_with_reference(tiny_dir, encoder, n_words):
    words = "the camera moves forward through a dark forest path".split()
    prompt = " ".join(words[i % len(words)] for i in range(n_words))
    sd = torch.load(tiny_dir / T5_CHECKPOINT, weights_only=True)
    ids = encoder.tokenizer(prompt)["input_ids"]
    assert ids[-1] == encoder.tokenizer.eos_token_id
    (out,) = encoder.encode([prompt])
    ref = ref_encode(sd, ids, heads=T5Config.tiny().num_heads)   # unpadded: padding + mask must not leak
    assert out.shape == ref.shape == (len(ids), 32)
    assert rel_err(out, ref) <= 1e-5


def test_bf16_close_to_reference(tiny_dir):
    enc = load_text_encoder(tiny_dir, "cpu", torch.bfloat16)
    # all in bf16 like upstream, `wo` too (transformers' from_pretrained would keep it in fp32)
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    (out,) = enc.encode([PROMPTS[0]])
    ref = ref_encode(torch.load(tiny_dir / T5_CHECKPOINT, weights_only=True), enc.tokenizer(PROMPTS[0])["input_ids"], 4)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 3e-2


# ------------------------------------------------------------------ cleaning / tokenization / cutting

@pytest.mark.parametrize("raw, cleaned", [
    ("  a   cat\n\twalks  ", "a cat walks"),
    ("Tom &amp;amp; Jerry", "Tom & Jerry"),                  # unescaped twice
    ("&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>"),
    ("cafÃ©\u3000au\u00a0lait", "café au lait"),             # mojibake fixed; unicode spaces collapsed
    ("a\x1cb", "ab"),                                         # ftfy drops control characters
    ("城市夜景，  霓虹灯闪烁", "城市夜景, 霓虹灯闪烁"),          # ftfy folds the full-width comma
    ("", ""),
])
def test_clean_prompt(raw, cleaned):
    assert clean_prompt(raw) == cleaned


def test_tokenize_pads_and_truncates_to_512(encoder):
    short, long = "a cat", " ".join(["waterfall"] * 800)
    ids, mask = encoder.tokenize([short, long])
    assert ids.shape == mask.shape == (2, 512)
    n = int(mask[0].sum())
    assert n == len(encoder.tokenizer(short)["input_ids"]) and n < 10
    assert mask[0, :n].all() and not mask[0, n:].any()
    assert ids[0, n - 1] == encoder.tokenizer.eos_token_id and (ids[0, n:] == encoder.tokenizer.pad_token_id).all()
    assert mask[1].all() and ids[1, -1] == encoder.tokenizer.eos_token_id      # truncated, </s> kept


def test_outputs_cut_to_true_length(encoder):
    outs = encoder.encode(PROMPTS + [" ".join(["waterfall"] * 800)])
    for prompt, out in zip(PROMPTS, outs):
        assert out.shape == (len(encoder.tokenizer(clean_prompt(prompt))["input_ids"]), 32)
        assert (out.abs().sum(-1) > 0).all()                                    # no zero padding rows
    assert outs[-1].shape == (512, 32)
    # the cleaned text is what gets encoded
    a, b = encoder.encode(["a  cat\n", "a cat"])
    assert torch.equal(a, b)


# ------------------------------------------------------------------ cache

def cached_encode(prompts, ckpt_dir, cache, placement="cpu"):
    return encode_prompts(prompts, ckpt_dir, cache, placement=placement, device="cpu", dtype=torch.float32,
                          text_len=SHORT)


def test_cache_hit_needs_no_checkpoint(fresh_dir, tmp_path):
    cache = PromptCache(tmp_path / "cache")
    first = cached_encode(PROMPTS[:2], fresh_dir, cache)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    direct = load_text_encoder(fresh_dir, "cpu", torch.float32, text_len=SHORT).encode(PROMPTS[:2])
    assert all(torch.equal(a, b) for a, b in zip(first, direct))

    (fresh_dir / T5_CHECKPOINT).unlink()                   # a hit must not even open the weights
    shutil.rmtree(fresh_dir / T5_TOKENIZER)
    again = cached_encode([PROMPTS[1], " " + PROMPTS[0]], fresh_dir, cache, placement="gpu")
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])

    with pytest.raises(FileNotFoundError, match=T5_CHECKPOINT):   # a miss has to load, and says what is gone
        cached_encode(["a different prompt"], fresh_dir, cache)


def test_cache_identity_tracks_checkpoint_and_dtype(fresh_dir, tmp_path):
    cache = PromptCache(tmp_path / "cache")
    id1 = cache.identity(fresh_dir, torch.bfloat16)
    assert cache.identity(fresh_dir, torch.bfloat16) == id1
    assert cache.identity(fresh_dir, torch.float32) != id1
    assert cache.key("a cat", id1) != cache.key("a dog", id1)
    first = cached_encode(["a cat"], fresh_dir, cache)

    write_tiny_text_encoder(fresh_dir, seed=2)             # new weights, same shapes and size
    id2 = cache.identity(fresh_dir, torch.bfloat16)
    assert id2 != id1
    second = cached_encode(["a cat"], fresh_dir, cache)
    assert not torch.allclose(first[0], second[0])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    (fresh_dir / T5_TOKENIZER / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer"}')
    assert cache.identity(fresh_dir, torch.bfloat16) not in (id1, id2)    # tokenizer files count too


def test_cache_write_is_atomic(tmp_path, monkeypatch, capsys):
    cache = PromptCache(tmp_path / "cache")

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(te, "save_file", failing_save)
    assert cache.put("a cat", "id", torch.ones(3, 4)) is None   # the cache is optional: a warning, no error
    assert "warning: prompt cache: cannot store an embedding" in capsys.readouterr().err
    assert list((tmp_path / "cache").iterdir()) == []        # neither the entry nor a temp file
    assert cache.get("a cat", "id") is None

    monkeypatch.undo()
    cache.put("a cat", "id", torch.ones(3, 4))
    assert torch.equal(cache.get("a cat", "id"), torch.ones(3, 4))
    assert cache.get("a cat", "other id") is None


def test_corrupt_cache_entry_is_a_miss(fresh_dir, tmp_path):
    cache = PromptCache(tmp_path / "cache")
    (good,) = cached_encode(["a cat"], fresh_dir, cache)
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    entry.write_bytes(b"garbage")
    (again,) = cached_encode(["a cat"], fresh_dir, cache)
    assert torch.equal(again, good)
    assert cache.get("a cat", cache.identity(fresh_dir, torch.float32, SHORT)) is not None   # rewritten


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert PromptCache().root == tmp_path / "worldstream" / "prompts"


# ------------------------------------------------------------------ bad input

def test_missing_files_are_named(fresh_dir):
    shutil.rmtree(fresh_dir / T5_TOKENIZER)
    with pytest.raises(FileNotFoundError, match="umt5-xxl"):
        load_text_encoder(fresh_dir, "cpu", torch.float32)
    (fresh_dir / T5_CHECKPOINT).unlink()
    with pytest.raises(FileNotFoundError, match=T5_CHECKPOINT):
        load_text_encoder(fresh_dir, "cpu", torch.float32)


@pytest.mark.parametrize("payload, message", [
    ([torch.zeros(2)], "flat state dict"),
    ({"model": {"token_embedding.weight": torch.zeros(2, 2)}}, "flat state dict"),
    ({"norm.weight": torch.zeros(4)}, "missing key 'token_embedding.weight'"),
])
def test_not_a_state_dict(fresh_dir, payload, message):
    torch.save(payload, fresh_dir / T5_CHECKPOINT)
    with pytest.raises(ValueError, match=message) as info:
        load_text_encoder(fresh_dir, "cpu", torch.float32)
    assert T5_CHECKPOINT in str(info.value)


def test_garbage_file(fresh_dir):
    (fresh_dir / T5_CHECKPOINT).write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read"):
        load_text_encoder(fresh_dir, "cpu", torch.float32)


def test_wrong_shape_and_extra_keys_are_named(fresh_dir):
    path = fresh_dir / T5_CHECKPOINT
    sd = torch.load(path, weights_only=True)
    bad = dict(sd, **{"blocks.1.ffn.fc2.weight": torch.zeros(32, 65, dtype=torch.bfloat16)})
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.fc2\.weight.*\[32, 65\]"):
        load_text_encoder(fresh_dir, "cpu", torch.float32)
    torch.save(dict(sd, **{"blocks.1.attn.extra": torch.zeros(1)}), path)
    with pytest.raises(ValueError, match="blocks.1.attn.extra"):
        load_text_encoder(fresh_dir, "cpu", torch.float32)
    del sd["blocks.1.norm2.weight"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match="blocks.1.norm2.weight"):
        load_text_encoder(fresh_dir, "cpu", torch.float32)


def test_block_indices_must_be_contiguous(fresh_dir):
    path = fresh_dir / T5_CHECKPOINT
    sd = torch.load(path, weights_only=True)
    torch.save(dict(sd, **{"blocks.1000000000000.norm1.weight": torch.ones(32)}), path)
    with pytest.raises(ValueError, match="block indices"):
        load_text_encoder(fresh_dir, "cpu", torch.float32)


def test_streamed_blocks_give_the_resident_result(tiny_dir):
    """placement="stream": the blocks wait in host slabs and run through the streaming engine's slots
    (synchronous copies on the CPU); the embeddings equal the resident encoder's exactly."""
    prompts = ["a red fox crossing a snowy field", "rain on a tin roof at night"]
    plain = te.encode_prompts(prompts, tiny_dir, placement="cpu", device="cpu", dtype=torch.float32, text_len=64)
    streamed = te.encode_prompts(prompts, tiny_dir, placement="stream", device="cpu", dtype=torch.float32,
                                 text_len=64)
    for a, b in zip(plain, streamed):
        assert torch.equal(a, b)
    encoder = load_text_encoder(tiny_dir, "cpu", torch.float32, text_len=64)
    sources, engine, handle = te.stream_encoder(encoder, "cpu")
    encoder.encode(prompts)
    assert engine.stats["copies"] >= 2 * len(encoder.blocks)   # every block crossed for each prompt
    encoder.close()
