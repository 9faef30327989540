"""Reading tensors from checkpoint files safely: safetensors headers, byte ranges, and weights-only `.pth`.

Every reader here checks before it allocates: a safetensors header is parsed and each tensor's byte range,
dtype and shape checked against the file size (so a truncated or hostile file is refused by name), and a `.pth`
is unpickled with `weights_only=True` (no code from the file runs) and must be a flat name -> tensor dict.
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

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as is; the message names the file (and key) at fault."""


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



def read_safetensors_header(path: str | Path) -> dict[str, TensorLocation]:
    """Parse a safetensors header (u64 little-endian length + JSON) into absolute byte locations."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: header length {n} exceeds the file size {size} or the 100 MB limit "
                                  "(corrupt or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    out = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: tensor {key!r}"
        try:
            dtype_s, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
            ok = all(type(v) is int and v >= 0 for v in [*shape, begin, end]) and begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{where}: malformed header entry {e!r}")
        if dtype_s not in _DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dtype_s!r}")
        dtype = _DTYPES[dtype_s]
        if 8 + n + end > size:
            raise CheckpointError(f"{where}: data ends at byte {8 + n + end}, the file has {size} (truncated?)")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{where}: {end - begin} bytes do not match shape {tuple(shape)} of {dtype_s}")
        out[key] = TensorLocation(path, dtype, tuple(shape), 8 + n + begin, end - begin, key)
    return out


def read_tensor(loc: TensorLocation) -> torch.Tensor:
    """Read one safetensors tensor's byte range into a fresh CPU tensor (stored dtype)."""
    if loc.offset < 0:
        raise CheckpointError(f"{loc.file}: {loc.key!r} is not byte-addressable (.pth); use iter_tensors")
    if loc.nbytes == 0:
        return torch.empty(loc.shape, dtype=loc.dtype)
    buf = bytearray(loc.nbytes)
    with open(loc.file, "rb") as f:
        f.seek(loc.offset)
        if f.readinto(buf) != loc.nbytes:
            raise CheckpointError(f"{loc.file}: short read for {loc.key!r} (file changed or truncated)")
    return torch.frombuffer(buf, dtype=torch.uint8).view(loc.dtype).reshape(loc.shape)


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
    """(key, tensor) one at a time, in file order, converted to `dtype` (None: as stored) and moved to `device`."""
    pth: dict[Path, dict[str, torch.Tensor]] = {}
    for key, loc in sorted(locations.items(), key=lambda kv: (str(kv[1].file), kv[1].offset, kv[0])):
        if loc.offset < 0:
            if loc.file not in pth:
                pth.clear()   # keep at most one (memory-mapped) .pth open
                pth[loc.file] = read_pth(loc.file)
            t = pth[loc.file][loc.key].clone()  # own memory, not a view of the mapped file
        else:
            t = read_tensor(loc)
        yield key, t.to(device=device, dtype=dtype or t.dtype).contiguous()
