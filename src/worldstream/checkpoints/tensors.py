"""Reading tensors from checkpoint files safely: safetensors headers, byte ranges, and weights-only `.pth`.

Every reader here checks before it allocates: a safetensors header (at most 100 MB, the format's limit) is parsed
and each tensor's byte range, dtype and shape checked against the file size (so a truncated or hostile file is
refused by name), JSON files are size-limited and parsed safely, and a `.pth` is unpickled with
`weights_only=True` (no code from the file runs) and must be a flat name -> tensor dict. Every tensor read is
checked finite (`check_finite`): a NaN in the weights is refused while loading, not found after a whole run.
`TensorLocation`s are absolute byte ranges: the loader reads them one tensor at a time and the disk tier reads
them straight into pinned slabs.
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit
MAX_DIMS = 16              # dimensions of one tensor (real checkpoints have at most 5)
MAX_JSON = 16 * 2**20      # index / config json files (real ones are well under 1 MB)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as is; the message names the file (and key) at fault."""


SHOWN_KEYS = 5     # how many offending keys an error message lists


def check_keys_and_shapes(found: dict, expected: dict, source) -> None:
    """CheckpointError naming `source` and the first offending keys unless `found` (key -> shape) has exactly
    the keys and shapes of `expected`."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing:
        raise CheckpointError(f"{source}: missing keys {missing[:SHOWN_KEYS]} ({len(missing)} in all)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys {unexpected[:SHOWN_KEYS]} ({len(unexpected)} in all)")
    if wrong:
        raise CheckpointError(f"{source}: wrong shapes: " + ", ".join(
            f"{k!r} is {tuple(found[k])}, expected {tuple(expected[k])}" for k in wrong[:SHOWN_KEYS])
            + f" ({len(wrong)} in all)")


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor lives. `offset` is the absolute byte offset in `file` (-1 for `.pth` files, which
    are read through torch.load); `key` is the name as stored in the file (diffusers or upstream)."""
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    key: str


def _parse_json(raw: bytes | str, where: str, what: str):
    """JSON from an untrusted file: any parse failure (bad UTF-8, syntax, absurd numbers, nesting deeper than
    the interpreter's recursion limit) is a CheckpointError naming `where`."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise CheckpointError(f"{where}: {what} is nested too deeply (corrupt or hostile file)") from None
    except ValueError as e:   # JSONDecodeError, UnicodeDecodeError, int digits limit
        raise CheckpointError(f"{where}: {what} is not valid JSON ({e})") from None


def read_json(path: str | Path, what: str = "file") -> object:
    """A small JSON file (index, config): at most MAX_JSON bytes, parsed safely; CheckpointError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_JSON:
        raise CheckpointError(f"{path}: larger than {MAX_JSON >> 20} MB, too large for a {what}")
    return _parse_json(raw, str(path), what)


def _read_header(path: Path) -> tuple[int, int, dict]:
    """(file size, header length, header JSON object) of a safetensors file."""
    try:
        size = path.stat().st_size
        if size < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file")
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: header length {n} exceeds the file size {size} or the 100 MB limit "
                                      "(corrupt or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    header = _parse_json(raw, str(path), "the safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return size, n, header


def _entry(e: object) -> tuple[str, tuple[int, ...], int, int] | None:
    """(dtype, shape, begin, end) of a well-formed header entry, else None."""
    if not isinstance(e, dict):
        return None
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(offsets, list):
        return None
    if len(shape) > MAX_DIMS or len(offsets) != 2:
        return None
    if not all(type(v) is int and 0 <= v < 2**63 for v in [*shape, *offsets]) or offsets[0] > offsets[1]:
        return None
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_safetensors_header(path: str | Path) -> dict[str, TensorLocation]:
    """Parse a safetensors header (u64 little-endian length + JSON) into absolute byte locations."""
    path = Path(path)
    size, n, header = _read_header(path)
    out = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor {key!r}"
        parsed = _entry(e)
        if parsed is None:
            raise CheckpointError(f"{where}: malformed header entry {_short(e)}")
        dtype_s, shape, begin, end = parsed
        if dtype_s not in _DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {_short(dtype_s)}")
        dtype = _DTYPES[dtype_s]
        if 8 + n + end > size:
            raise CheckpointError(f"{where}: data ends at byte {8 + n + end}, the file has {size} (truncated?)")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{where}: {end - begin} bytes do not match shape {shape} of {dtype_s}")
        out[key] = TensorLocation(path, dtype, shape, 8 + n + begin, end - begin, key)
    return out


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` entry of a safetensors file (str -> str), {} if there is none."""
    path = Path(path)
    meta = _read_header(path)[2].get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: __metadata__ is not a map of strings")
    return meta


def _short(v: object, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- finite weights ----------------------------------------------------------------------------------------

# fp8 formats have no aminmax kernel: their NaN / inf codes are the largest byte values of either sign.
_FP8_SPECIAL = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def nonfinite(t: torch.Tensor) -> bool:
    """True when the floating tensor `t` holds a NaN or an infinity. One pass (`aminmax` propagates NaN and
    ends at an infinity), no temporary the size of `t`; about 0.1 s per GB on two CPU cores. Integer and
    empty tensors are finite."""
    if t.numel() == 0 or not (t.is_floating_point()):
        return False
    if t.dtype in _FP8_SPECIAL:
        special = _FP8_SPECIAL[t.dtype]
        flat = t.reshape(-1)
        positive = int(flat.view(torch.int8).max()) >= special          # 0 sign bit: int8 view
        negative = int(flat.view(torch.uint8).max()) >= 0x80 | special  # 1 sign bit: uint8 view
        return positive or negative
    lo, hi = torch.aminmax(t)
    return not (math.isfinite(lo.item()) and math.isfinite(hi.item()))


def check_finite(t: torch.Tensor, where: str) -> torch.Tensor:
    """`t`, or CheckpointError naming `where` (file and key) when it holds NaN / inf."""
    if nonfinite(t):
        raise CheckpointError(f"{where}: holds NaN or infinite values (the file is damaged, or was saved from a "
                              "diverged training run); worldstream loads only finite weights")
    return t


def read_tensor(loc: TensorLocation) -> torch.Tensor:
    """Read one safetensors tensor's byte range into a fresh CPU tensor (stored dtype); NaN / inf refused."""
    if loc.offset < 0:
        raise CheckpointError(f"{loc.file}: {loc.key!r} is not byte-addressable (.pth); use iter_tensors")
    if loc.nbytes == 0:
        return torch.empty(loc.shape, dtype=loc.dtype)
    buf = bytearray(loc.nbytes)
    with open(loc.file, "rb") as f:
        f.seek(loc.offset)
        if f.readinto(buf) != loc.nbytes:
            raise CheckpointError(f"{loc.file}: short read for {loc.key!r} (file changed or truncated)")
    t = torch.frombuffer(buf, dtype=torch.uint8).view(loc.dtype).reshape(loc.shape)
    return check_finite(t, f"{loc.file}: tensor {loc.key!r}")


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.pth` state dict (DiT, umT5, VAE), unpickled safely (weights_only: no code from the file runs) and
    memory-mapped where the format allows; anything but a flat dict of name -> tensor is refused."""
    path = Path(path)
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):   # the file holds more than tensors: refused, and nothing of it ran
            reason = next(ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln)
            raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain containers, "
                                  f"and worldstream never runs code from checkpoint files "
                                  f"({reason.split('. Please use')[0]})") from None
        raise CheckpointError(f"{path}: cannot read as a weights-only PyTorch state dict (not a PyTorch "
                              f"checkpoint, or damaged)") from None
    except Exception as e:  # noqa: BLE001 - any other unpickling failure is a bad file
        raise CheckpointError(f"{path}: cannot read as a weights-only PyTorch state dict "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a flat state dict (str -> Tensor), found a {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: expected a flat state dict (str -> Tensor); "
                                  f"entry {k!r} is a {type(v).__name__}")
    return sd


def iter_tensors(locations: dict[str, TensorLocation], dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) one at a time, in file order, converted to `dtype` (None: as stored) and moved to `device`;
    every tensor is checked finite as it is read (`check_finite`)."""
    pth: dict[Path, dict[str, torch.Tensor]] = {}
    for key, loc in sorted(locations.items(), key=lambda kv: (str(kv[1].file), kv[1].offset, kv[0])):
        if loc.offset < 0:
            if loc.file not in pth:
                pth.clear()   # keep at most one (memory-mapped) .pth open
                pth[loc.file] = read_pth(loc.file)
            t = check_finite(pth[loc.file][loc.key], f"{loc.file}: tensor {loc.key!r}").clone()  # own memory
        else:
            t = read_tensor(loc)
        yield key, t.to(device=device, dtype=dtype or t.dtype).contiguous()
