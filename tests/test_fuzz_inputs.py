"""Fuzzing the command line's validation: a few hundred malformed safetensors headers, .npy files and action
strings, generated here from a fixed seed, each fed to `worldstream generate` (in one fresh process, so its
memory can be measured). Every one must end in exit code 2 with exactly one `worldstream: error:` line and no
traceback; the process's peak RSS must stay under RSS_PEAK (1 GiB) and grow by less than RSS_GROWTH (64 MiB)
over its peak after the first case (a believed header claiming 10^9 poses would need 128 GB; a believed
w-100000000 needed 7 GB).

Every case is malformed by construction (one definite fault injected into an otherwise valid input), so none
of them may run a generation.
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from worldstream.testing import demo_image, write_tiny_checkpoint

SRC = Path(__file__).resolve().parent.parent / "src"
SEED = 14
CASES_PER_KIND = 110
RSS_GROWTH = 64 * 2**20      # bytes: peak RSS over all cases above the peak after the first (warm-up) case
RSS_PEAK = 2**30             # bytes: peak RSS of the whole validating process (torch loaded: ~0.35 GB)

SHARD = "diffusion_pytorch_model-00001-of-00002.safetensors"


# ---- safetensors headers -------------------------------------------------------------------------------------

def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _pack(header: bytes, data: bytes, length: int | None = None) -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


def bad_safetensors(rng: random.Random, header: dict, data: bytes) -> bytes:
    """A shard whose header has exactly one definite fault."""
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = dict(header[key])
    kind = rng.randrange(14)
    if kind == 0:                                             # not JSON at all
        return _pack(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))), data)
    if kind == 1:                                             # JSON cut short
        text = json.dumps(header).encode()
        return _pack(text[:rng.randrange(1, len(text) - 1)], data)
    if kind == 2:                                             # nested deeper than any parser should follow
        depth = rng.choice([2000, 20_000, 200_000])
        return _pack(b"[" * depth + b"]" * depth, data)
    if kind == 3:                                             # JSON, but not an object
        return _pack(json.dumps(rng.choice([[], [1, 2], 3, "x", None, True])).encode(), data)
    if kind == 4:
        entry["dtype"] = rng.choice(["F128", "f32", "", "Q4", 7, None])
    elif kind == 5:
        entry["shape"] = rng.choice([[-1], [1.5], ["4"], [True], [2**70], {"a": 1}, "44", [1] * 100])
    elif kind == 6:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin - 1], [begin, end + 10**9], [begin], [begin, end, 0],
                                            [-8, end], [begin, 2**80]])
    elif kind == 7:                                           # bytes that do not match the shape
        entry["shape"] = [d + 1 for d in entry["shape"]] or [2]
    elif kind == 8:                                           # header length beyond the file / the 100 MB limit
        text = json.dumps(header).encode()
        return _pack(text, data, rng.choice([len(text) + len(data) + 1, 200 * 2**20, 2**63]))
    elif kind == 9:                                           # too short to be safetensors
        return bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
    elif kind == 10:                                          # a number with 5000 digits
        return _pack(json.dumps({key: {**entry}}).replace(str(entry["data_offsets"][1]), "9" * 5000, 1).encode(),
                     data)
    elif kind == 11:                                          # invalid UTF-8 in a key
        return _pack(json.dumps(header).replace(json.dumps(key), '"\\udcff' + key + '"', 1).encode()
                     .replace(b"\\udcff", b"\xff\xfe"), data)
    elif kind == 12:
        entry.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    else:
        entry = rng.choice([[], "x", 3, None])
    return _pack(json.dumps({**header, key: entry}).encode(), data)


# ---- .npy files ----------------------------------------------------------------------------------------------

def _npy(header: dict | str, data: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    text = (header if isinstance(header, str) else repr(header)).encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    size = struct.pack("<H", len(text)) if version == (1, 0) else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes(version) + size + text + data


def bad_npy(rng: random.Random) -> bytes:
    """A poses.npy with exactly one definite fault (shape, dtype, size, header, values)."""
    n = rng.randrange(1, 20)
    good = np.tile(np.eye(4, dtype=np.float32), (n, 1, 1))
    kind = rng.randrange(13)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if kind == 1:                                             # the magic, then garbage
        return b"\x93NUMPY\x01\x00" + bytes(rng.randrange(256) for _ in range(rng.randrange(2, 200)))
    if kind == 2:                                             # a header claiming far more than the file holds
        rows = rng.choice([10**9, 10**6, 2**40, n + 1])
        return _npy({"descr": "<f4", "fortran_order": False, "shape": (rows, 4, 4)}, good.tobytes())
    if kind == 3:
        shape = rng.choice([(n, 3, 4), (n, 4), (n, 4, 4, 1), (), (0, 4, 4), (n * 16,)])
        return _npy({"descr": "<f4", "fortran_order": False, "shape": shape},
                    b"\0" * (int(np.prod(shape)) * 4 if shape else 4))
    if kind == 4:                                             # pickled objects, strings, complex, records
        descr = rng.choice(["|O", "<U4", "<c8", [("a", "<f4")], "|V16", "<M8[s]"])
        return _npy({"descr": descr, "fortran_order": False, "shape": (n, 4, 4)}, good.tobytes())
    if kind == 5:                                             # truncated data
        return _npy({"descr": "<f4", "fortran_order": False, "shape": (n, 4, 4)}, good.tobytes()[:-rng.randrange(1, 60)])
    if kind == 6:                                             # an unknown format version
        return _npy({"descr": "<f4", "fortran_order": False, "shape": (n, 4, 4)}, good.tobytes(),
                    rng.choice([(3, 0), (9, 9), (0, 0)]))
    if kind == 7:                                             # a version-2 header length of gigabytes
        return b"\x93NUMPY\x02\x00" + struct.pack("<I", rng.choice([2**31, 2**32 - 1])) + b"{"
    if kind == 8:                                             # a header that is not a dict literal
        return _npy(rng.choice(["(" * 500 + ")" * 500, "{'descr': ", "__import__('os')", "[1, 2]", "{1: 2}"]),
                    good.tobytes())
    if kind == 9:                                             # NaN / inf poses
        bad = good.copy()
        bad[rng.randrange(n), rng.randrange(3), rng.randrange(4)] = rng.choice([np.nan, np.inf, -np.inf])
        return _npy({"descr": "<f4", "fortran_order": False, "shape": bad.shape}, bad.tobytes())
    if kind == 10:                                            # no rotation in the top-left 3x3
        bad = good.copy()
        bad[rng.randrange(n), :3, :3] = rng.choice([0.0, 2.0, -1.0])
        return _npy({"descr": "<f4", "fortran_order": False, "shape": bad.shape}, bad.tobytes())
    if kind == 11:                                            # a header that lies about its length
        raw = _npy({"descr": "<f4", "fortran_order": False, "shape": (n, 4, 4)}, good.tobytes())
        return raw[:8] + struct.pack("<H", rng.choice([0, 1, 65535])) + raw[10:]
    return _npy({"descr": "<f4", "fortran_order": rng.choice([True, False]), "shape": (n, 4, 4),
                 "extra": "x"}, good.tobytes())


# ---- action strings ------------------------------------------------------------------------------------------

def bad_action_string(rng: random.Random) -> str:
    """A keyboard string with exactly one definite fault among valid segments."""
    def seg():
        keys = "none" if rng.random() < 0.2 else "".join(rng.sample("wasdijkl", rng.randrange(1, 4)))
        return f"{keys}-{rng.randrange(1, 9)}"
    parts = [seg() for _ in range(rng.randrange(0, 6))]
    fault = rng.randrange(10)
    bad = [
        lambda: f"{rng.choice('xyzq!é')}w-{rng.randrange(1, 9)}",          # an unknown key
        lambda: f"w-{rng.choice(['0', '00', '-3', '1.5', 'x', '', '²', '٣', '1e3'])}",  # not a positive count
        lambda: rng.choice(["w", "-3", "w3", "--", "w--"]),                  # no <keys>-<frames>
        lambda: "",                                                          # an empty segment
        lambda: f"w-{rng.choice([1026, 10**8, 99999, 10**30])}",             # past the frame limit alone
        lambda: ",".join(["w-500"] * rng.randrange(3, 50)),                  # past it in total
        lambda: "w-" + "9" * rng.choice([6, 100, 5000]),                     # more digits than any limit
        lambda: "w" * rng.randrange(10, 5000) + "-x",
        lambda: "none-" + "0" * rng.randrange(1, 50),
        lambda: "w-1" + "," * rng.randrange(2, 5),
    ][fault]()
    parts.insert(rng.randrange(len(parts) + 1), bad)
    return ",".join(parts) or ","


# ---- the test ------------------------------------------------------------------------------------------------

RUNNER = r"""
import contextlib, io, json, resource, sys
from worldstream.cli import main

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

cases = json.load(open(sys.argv[1]))
results, base = [], None
for case in cases:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(case["args"])
    results.append({"code": code, "err": err.getvalue(), "name": case["name"]})
    if base is None:
        base = peak()       # after the first case: everything validation imports and builds is in
json.dump({"results": results, "base_rss": base, "peak_rss": peak()}, open(sys.argv[2], "w"))
"""


def _link_tree(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    """`dst` mirrors `src` with symlinks, except the files in `replace` (relative path -> content)."""
    for path in src.rglob("*"):
        rel = path.relative_to(src).as_posix()
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif rel in replace:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(replace[rel])
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    ckpt = write_tiny_checkpoint(root / "cam", "lingbot-cam-tiny")
    demo_image(48, 32).save(root / "first.png")
    actions = root / "actions"
    actions.mkdir()
    np.save(actions / "intrinsics.npy", np.tile(np.float32([500, 500, 416, 240]), (9, 1)))
    rng = random.Random(SEED)
    header, data = _header(ckpt / "high_noise_model" / SHARD)

    def args(ckpt_dir, *extra):
        return ["generate", "--ckpt_dir", str(ckpt_dir), "--prompt", "x", "--image", str(root / "first.png"),
                "--size", "48*32", "--sample_steps", "1", "--no_prompt_cache", "--save_file",
                str(root / "never.mp4"), *extra]

    out = []
    for i in range(CASES_PER_KIND):
        d = root / f"st{i}"
        _link_tree(ckpt, d, {f"high_noise_model/{SHARD}": bad_safetensors(rng, header, data)})
        out.append({"name": f"safetensors {i}", "args": args(d)})
    for i in range(CASES_PER_KIND):
        d = root / f"npy{i}"
        d.mkdir()
        (d / "intrinsics.npy").symlink_to(actions / "intrinsics.npy")
        (d / "poses.npy").write_bytes(bad_npy(rng))
        out.append({"name": f"npy {i}", "args": args(ckpt, "--action_path", str(d))})
    for i in range(CASES_PER_KIND):
        s = bad_action_string(rng)
        out.append({"name": f"action string {i}: {s[:60]!r}", "args": args(ckpt, "--action_string", s)})
    return root, out


def test_malformed_inputs_get_one_error_line_and_bounded_memory(cases, tmp_path):
    root, todo = cases
    (tmp_path / "cases.json").write_text(json.dumps(todo))
    env = {**os.environ, "PYTHONPATH": str(SRC), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "cases.json"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out.json").read_text())
    bad = []
    for r in report["results"]:
        lines = [ln for ln in r["err"].splitlines() if ln.startswith("worldstream: error:")]
        if r["code"] != 2 or len(lines) != 1 or "Traceback" in r["err"]:
            bad.append(f"{r['name']}: exit {r['code']}: {r['err'][-400:]}")
    assert not bad, f"{len(bad)} of {len(report['results'])} cases:\n" + "\n".join(bad[:10])
    assert report["peak_rss"] - report["base_rss"] < RSS_GROWTH, report    # measured: 0 (peak 0.35 GB)
    assert report["peak_rss"] < RSS_PEAK, report
    assert not (root / "never.mp4").exists()
