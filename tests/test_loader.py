"""DiT checkpoint loading: both on-disk layouts, variant detection, dtypes, bad input, memory.

Checkpoints are tiny but written exactly as users have them (config.json, sharded safetensors, index json,
expert subfolders), by `worldstream.testing.write_dit_checkpoint`.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from worldstream.checkpoints import keymap
from worldstream.models.configs import VARIANTS, get_config
from worldstream.models.dit import WanDiT
from worldstream.checkpoints.dit import (CheckpointError, TensorLocation, detect_config, find_checkpoint,
                                       index_model_dir, load_dit, read_safetensors_header)
from worldstream.testing import random_dit_state, write_dit_checkpoint, write_dit_dir

SHARD2 = "diffusion_pytorch_model-00002-of-00003.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def assert_same_state(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert sd[k].dtype == ref[k].dtype, k
        assert torch.equal(sd[k], ref[k]), k


# ---- both layouts give the same model ------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["lingbot-cam-tiny", "wan2.1-i2v-14b-tiny"])
def test_upstream_and_diffusers_layouts_load_identically(tmp_path, variant):
    written = write_dit_checkpoint(tmp_path / "up", variant, layout="upstream", seed=3)
    write_dit_checkpoint(tmp_path / "df", variant, layout="diffusers", seed=3)
    up, df = find_checkpoint(tmp_path / "up"), find_checkpoint(tmp_path / "df")
    assert (up.layout, df.layout) == ("upstream", "diffusers")
    assert up.experts.keys() == df.experts.keys() == written.keys()
    for name in written:
        a = load_dit(up.experts[name], dtype=torch.float32)
        b = load_dit(df.experts[name], dtype=torch.float32)
        assert_same_state(a, written[name])
        assert_same_state(b, a.state_dict())
    if len(written) == 2:  # experts hold different weights, so a swap would be caught
        assert not torch.equal(written["high"]["head.head.weight"], written["low"]["head.head.weight"])
        assert up.experts["high"].name == "high_noise_model" and df.experts["low"].name == "transformer_2"


def test_single_file_and_pth_load(tmp_path):
    cfg = get_config("wan2.2-i2v-a14b-tiny")
    sd = write_dit_dir(tmp_path / "one", cfg, shards=1)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_same_state(load_dit(tmp_path / "one", dtype=torch.float32), sd)
    (tmp_path / "pth").mkdir()
    shutil.copy(tmp_path / "one" / "config.json", tmp_path / "pth")
    torch.save(sd, tmp_path / "pth" / "dit.pth")
    assert_same_state(load_dit(tmp_path / "pth", dtype=torch.float32), sd)


def test_header_locations_address_the_bytes(tmp_path):
    """The absolute offsets (used by disk streaming) point at each tensor's bytes."""
    sd = write_dit_dir(tmp_path, get_config("lingbot-act-tiny"), dtype=torch.bfloat16)
    locs = index_model_dir(tmp_path)
    assert locs.keys() == sd.keys()
    for k in ["patch_embedding_wancamctrl.weight", "blocks.1.cam_scale_layer.bias", "head.modulation"]:
        loc = locs[k]
        with open(loc.file, "rb") as f:
            f.seek(loc.offset)
            raw = f.read(loc.nbytes)
        assert (loc.dtype, loc.shape) == (torch.bfloat16, tuple(sd[k].shape))
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).view(sd[k].shape), sd[k])


# ---- variant detection -------------------------------------------------------------------------------

EXPERTS = {"wan2.1-t2v-1.3b": ["main"], "wan2.1-t2v-14b": ["main"], "wan2.1-i2v-14b": ["main"],
           "wan2.2-i2v-a14b": ["high", "low"], "lingbot-cam": ["high", "low"], "lingbot-act": ["high", "low"],
           "lingbot-fast": ["fast"], "lingbot-fast-v2": ["fast"], "lingbot-fast-v2-1.3b": ["fast"],
           "lingbot-cam-world": ["main"], "lingbot-fast-world": ["fast"]}


@pytest.mark.parametrize("layout", ["upstream", "diffusers"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detects_every_tiny_variant(tmp_path, variant, layout):
    assert set(EXPERTS) == set(VARIANTS)
    write_dit_checkpoint(tmp_path, variant + "-tiny", layout=layout, shards=2)
    ck = find_checkpoint(tmp_path)
    expected = get_config(variant + "-tiny")
    # The two Wan2.1 T2V sizes have identical tiny configs; any name is then fine, the structure must match
    # (and so whether a LightX2V student of it exists: the 14B's, not the 1.3B's).
    # The causal students' tiny siblings all share shapes: their folders tell them apart (and set the loop).
    assert replace(ck.config, name=expected.name, task=expected.task, student=expected.student) == expected
    if variant == "lingbot-fast-v2-1.3b" and layout == "diffusers":   # only the full-size shapes differ
        assert ck.config.realtime == expected.realtime
    elif variant != "wan2.1-t2v-14b":
        assert ck.config.name == variant + "-tiny"
    assert (ck.layout, list(ck.experts)) == (layout, EXPERTS[variant])


@functools.cache
def meta_shapes(cfg) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanDiT(cfg).state_dict().items()}


@pytest.mark.parametrize("layout", ["upstream", "diffusers"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detects_full_size_variants_from_shapes(tmp_path, variant, layout):
    """Full-size shapes, without full-size files: locations from WanDiT on meta plus the real config.json."""
    cfg = VARIANTS[variant]
    fake = tmp_path / "x.safetensors"
    locs = {k: TensorLocation(fake, torch.bfloat16, s, 0, 0, k) for k, s in meta_shapes(cfg).items()}
    js = keymap.diffusers_config(cfg) if layout == "diffusers" else keymap.upstream_config(cfg)
    (tmp_path / "config.json").write_text(json.dumps(js))
    got = detect_config(tmp_path, locs, causal=cfg.causal)
    if variant == "lingbot-fast-v2":     # v1's shapes exactly: its folder (transformers/) tells them apart
        got = replace(got, name=cfg.name, realtime=cfg.realtime)
    assert got == cfg


def test_cam_or_act_comes_from_weight_shapes_not_folder_names(tmp_path):
    write_dit_checkpoint(tmp_path / "cam_model", "lingbot-act-tiny")
    write_dit_checkpoint(tmp_path / "act_model", "lingbot-cam-tiny")
    act, cam = find_checkpoint(tmp_path / "cam_model"), find_checkpoint(tmp_path / "act_model")
    assert (act.config.name, act.config.control_dim) == ("lingbot-act-tiny", 7)
    assert (cam.config.name, cam.config.control_dim) == ("lingbot-cam-tiny", 6)
    assert load_dit(act.experts["low"]).patch_embedding_wancamctrl.in_features == 7 * 256


def test_custom_config_is_named_custom(tmp_path):
    cfg = replace(get_config("wan2.1-t2v-1.3b-tiny"), name="x", num_layers=3, num_heads=2)
    write_dit_dir(tmp_path, cfg)
    got = find_checkpoint(tmp_path).config
    assert got == replace(cfg, name="custom", task=None, sampling=None)   # shapes known, no defaults


# ---- dtypes ----------------------------------------------------------------------------------------------

def test_fp32_on_disk_loads_as_bf16_and_bf16_on_disk_loads(tmp_path):
    cfg = get_config("lingbot-cam-tiny")
    sd32 = write_dit_dir(tmp_path / "f32", cfg, dtype=torch.float32)
    assert_same_state(load_dit(tmp_path / "f32"), {k: v.to(torch.bfloat16) for k, v in sd32.items()})
    sd16 = write_dit_dir(tmp_path / "bf16", cfg, dtype=torch.bfloat16, seed=1)
    assert read_safetensors_header(next((tmp_path / "bf16").glob("*.safetensors")))
    assert_same_state(load_dit(tmp_path / "bf16"), sd16)
    assert_same_state(load_dit(tmp_path / "bf16", dtype=torch.float32), {k: v.float() for k, v in sd16.items()})


# ---- forward parity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["lingbot-cam-tiny", "wan2.1-i2v-14b-tiny"])
def test_loaded_model_forward_matches_in_memory_model(tmp_path, variant):
    cfg = get_config(variant)
    sd = random_dit_state(cfg, seed=5)
    ref = WanDiT(cfg).eval()
    ref.load_state_dict(sd)
    write_dit_dir(tmp_path, cfg, layout="diffusers", state=sd)
    model = load_dit(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    kw = dict(x=torch.randn(1, 16, 2, 4, 6, generator=g), t=torch.tensor([700.0]),
              context=torch.randn(1, 9, cfg.text_dim, generator=g),
              y=torch.randn(1, cfg.in_dim - 16, 2, 4, 6, generator=g))
    if cfg.has_image_branch:
        kw["clip"] = torch.randn(1, cfg.image_tokens, cfg.image_dim, generator=g)
    if cfg.has_camera:
        kw["camera"] = torch.randn(1, cfg.control_dim * 64, 2, 4, 6, generator=g)
    with torch.no_grad():
        out, want = model(**kw), ref(**kw)
    assert out.shape == (1, 16, 2, 4, 6) and out.abs().mean() > 0.1
    assert torch.equal(out, want)


# ---- bad input: every error names its culprit -------------------------------------------------------

@pytest.fixture
def cam_dir(tmp_path):
    cfg = get_config("lingbot-cam-tiny")
    return tmp_path / "m", cfg, random_dit_state(cfg)


def test_missing_shard(tmp_path):
    write_dit_dir(tmp_path, get_config("wan2.1-t2v-1.3b-tiny"))
    (tmp_path / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=SHARD2):
        load_dit(tmp_path)
    (tmp_path / INDEX).unlink()  # without the index, the -0000K-of-0000N names still reveal the gap
    with pytest.raises(CheckpointError, match=f"{SHARD2} is missing"):
        load_dit(tmp_path)


def test_index_naming_a_missing_file(tmp_path):
    write_dit_dir(tmp_path, get_config("wan2.1-t2v-1.3b-tiny"))
    index = json.loads((tmp_path / INDEX).read_text())
    index["weight_map"]["blocks.1.ffn.2.bias"] = "nope.safetensors"
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"nope\.safetensors.*blocks\.1\.ffn\.2\.bias"):
        index_model_dir(tmp_path)


def test_index_key_not_in_its_shard_and_duplicate_keys(tmp_path):
    write_dit_dir(tmp_path, get_config("wan2.1-t2v-1.3b-tiny"))
    index = json.loads((tmp_path / INDEX).read_text())
    index["weight_map"]["head.head.bias"] = SHARD2   # really in shard 3
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{SHARD2}: key 'head.head.bias' .* not in it"):
        index_model_dir(tmp_path)
    (tmp_path / INDEX).unlink()
    save_file({"head.head.bias": torch.zeros(64)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"head\.head\.bias.*duplicate"):
        index_model_dir(tmp_path)


def test_missing_key(cam_dir):
    d, cfg, sd = cam_dir
    del sd["blocks.1.cam_shift_layer.bias"]
    write_dit_dir(d, cfg, state=sd)
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.1\.cam_shift_layer\.bias'") as e:
        load_dit(d)
    assert str(d) in str(e.value)


def test_unexpected_key_names_file_and_stored_name(cam_dir):
    d, cfg, sd = cam_dir
    sd["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    write_dit_dir(d, cfg, state=sd, layout="diffusers", shards=1)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: unexpected key "
                                              r"'blocks\.0\.self_attn\.extra\.weight'"):
        load_dit(d)


@pytest.mark.parametrize("layout, stored", [("upstream", "blocks.1.self_attn.q.weight"),
                                            ("diffusers", "blocks.1.attn1.to_q.weight")])
def test_shape_mismatch_names_expected_and_found(cam_dir, layout, stored):
    d, cfg, sd = cam_dir
    sd["blocks.1.self_attn.q.weight"] = torch.zeros(64, 32)
    write_dit_dir(d, cfg, state=sd, layout=layout)
    calls = []
    with pytest.raises(CheckpointError) as e:
        load_dit(d, progress=lambda i, n: calls.append(i))
    msg = str(e.value)
    assert f"'{stored}': expected shape (64, 64), found (64, 32)" in msg
    assert "diffusion_pytorch_model-0000" in msg
    assert calls == []  # nothing was read before the check


def test_truncated_safetensors(tmp_path):
    write_dit_dir(tmp_path, get_config("wan2.1-t2v-1.3b-tiny"), shards=1)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: tensor .*truncated"):
        load_dit(tmp_path)


@pytest.mark.parametrize("content, why", [
    (b"\x01\x02\x03", "too short"),
    (b"garbage! this is not a safetensors file at all", "exceeds the file size"),
    ((20).to_bytes(8, "little") + b"\xff\xfe{not json at all}" + b"\x00" * 8, "not valid JSON"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
])
def test_corrupt_header(tmp_path, content, why):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: .*{why}"):
        index_model_dir(tmp_path)


def _raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def test_header_entry_checks(tmp_path):
    f = tmp_path / "x.safetensors"
    _raw_safetensors(f, {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: tensor 'w': unknown dtype 'Q4'"):
        read_safetensors_header(f)
    _raw_safetensors(f, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"tensor 'w': 8 bytes do not match shape \(3,\)"):
        read_safetensors_header(f)
    _raw_safetensors(f, {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"tensor 'w': malformed"):
        read_safetensors_header(f)
    entry = {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}
    _raw_safetensors(f, {"__metadata__": {"format": "pt"}, "w": entry}, b"\0" * 8)
    assert read_safetensors_header(f)["w"].offset == f.stat().st_size - 8


class NotATensor:
    pass


@pytest.mark.parametrize("obj, culprit", [
    ({"patch_embedding.weight": torch.zeros(2), "step": 3}, "'step' is a int"),
    ([torch.zeros(2)], "found a list"),
    ({"model": {"patch_embedding.weight": torch.zeros(2)}}, "'model' is a dict"),
    ({"w": NotATensor()}, "refused.*never runs code"),
])
def test_pth_that_is_not_a_plain_state_dict(tmp_path, obj, culprit):
    torch.save(obj, tmp_path / "dit.pth")
    with pytest.raises(CheckpointError, match=rf"dit\.pth: .*{culprit}"):
        index_model_dir(tmp_path)


@pytest.mark.parametrize("layout, gone", [("upstream", "low_noise_model"), ("upstream", "high_noise_model"),
                                          ("diffusers", "transformer_2")])
def test_checkpoint_missing_an_expert(tmp_path, layout, gone):
    write_dit_checkpoint(tmp_path, "lingbot-cam-tiny", layout=layout)
    shutil.rmtree(tmp_path / gone)
    with pytest.raises(CheckpointError, match=f"{gone}/ .*missing"):
        find_checkpoint(tmp_path)


def test_experts_that_disagree(tmp_path):
    write_dit_checkpoint(tmp_path, "lingbot-cam-tiny")
    shutil.rmtree(tmp_path / "low_noise_model")
    write_dit_dir(tmp_path / "low_noise_model", get_config("lingbot-act-tiny"))
    with pytest.raises(CheckpointError, match="experts disagree.*lingbot-act-tiny"):
        find_checkpoint(tmp_path)


def test_config_json_contradicting_the_weights(tmp_path):
    write_dit_dir(tmp_path, get_config("wan2.1-t2v-1.3b-tiny"))
    js = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**js, "num_layers": 5}))
    with pytest.raises(CheckpointError, match=r"config\.json: num_layers = 5 but the weights have 2"):
        find_checkpoint(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no DiT weights"):
        find_checkpoint(tmp_path)


# ---- memory --------------------------------------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from worldstream.models.configs import get_config
    from worldstream.models.dit import WanDiT
    from worldstream.checkpoints.dit import load_dit
    def mb(field):  # VmRSS: now; VmHWM: peak of this process (reset at exec, unlike ru_maxrss)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))
    with torch.device("meta"):  # the first meta build imports modules worth ~70 MB of RSS: not data
        WanDiT(get_config("lingbot-cam-tiny"))
    base = mb("VmRSS")
    model = load_dit(sys.argv[1], dtype=torch.bfloat16)
    print(base, mb("VmHWM"), sum(p.nbytes for p in model.parameters()) / 2**20)
""")


def test_bf16_load_of_fp32_checkpoint_never_holds_an_fp32_copy(tmp_path):
    """Peak RSS grows by about the bf16 model plus one tensor, not the fp32 model (106 MB here).

    Measured on this design: growth 59 MB for a 53 MB bf16 model; loading the fp32 shards whole first (the
    usual `load_file` then cast) grows by about 160 MB."""
    cfg = replace(get_config("wan2.1-t2v-1.3b-tiny"), name="custom", dim=512, ffn_dim=1024, num_heads=4,
                  num_layers=8, text_dim=512, freq_dim=256)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    sd = write_dit_dir(tmp_path, cfg, shards=2, state={k: torch.full(s, 0.5) for k, s in shapes.items()})
    fp32_mb = sum(v.nbytes for v in sd.values()) / 2**20
    largest_mb = max(v.nbytes for v in sd.values()) / 2**20
    del sd
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True)
    base, peak, model_mb = map(float, out.stdout.split())
    assert abs(model_mb - fp32_mb / 2) < 1
    growth = peak - base
    print(f"fp32 on disk {fp32_mb:.0f} MB, bf16 model {model_mb:.0f} MB, peak RSS growth {growth:.0f} MB")
    assert growth < model_mb + 2 * largest_mb + 16, (growth, model_mb, fp32_mb)
