"""Loading TAEHV weights (`taew2_1.pth` / `taew2_1.safetensors` from madebyollin/taehv) into
`worldstream.models.taehv.TAEHV`.

The file is a flat state dict in upstream's layout (`encoder.{i}...`, `decoder.{i}...`, `nn.Sequential` indices). The config is inferred from
the tensor shapes (latent channels, widths, temporal strides, patch size); then every key and shape is
checked against the model built on the meta device before anything is allocated, so a wrong file fails
with a ValueError naming the file and the first offending keys, not deep inside `load_state_dict`.

Both formats are read by checkpoints/tensors.py (`.pth` only with `weights_only=True`: pickles holding
anything but a flat name -> tensor dict are refused; safetensors headers checked against the file size).
"""
from __future__ import annotations

import math
import os

import torch

from ..models.taehv import TAEHV, TAEHVConfig
from .tensors import CheckpointError, check_finite, check_keys_and_shapes, iter_tensors, read_pth, read_safetensors_header

# indices of the layers the config is read from (upstream's nn.Sequential layout, 3 MemBlocks per stage)
_ENC_TPOOL = (2, 7, 12)          # encoder TPool(width, stride): conv weight [width, stride*width, 1, 1]
_ENC_FIRST, _ENC_LAST = 0, 17    # conv(3*p^2 -> width), conv(width -> z)
_DEC_FIRST, _DEC_LAST = 1, 22    # conv(z -> n_f[0]), conv(n_f[3] -> 3*p^2)
_DEC_TGROW = (7, 13, 19)         # decoder TGrow(n_f[i], stride): conv weight [stride*n_f[i], n_f[i], 1, 1]
_DEC_PROJ = (8, 14, 20)          # conv(n_f[i] -> n_f[i+1]), no bias


def _read_shapes(path: str) -> tuple[dict, dict | None]:
    """-> (shapes {key: tuple}, tensors or None). For safetensors only the header is read here. Both formats go
    through the package's one set of safe readers (checkpoints/tensors.py)."""
    if path.endswith(".safetensors"):
        locations = read_safetensors_header(path)
        bad = [k for k, loc in locations.items() if not loc.dtype.is_floating_point]
        if bad:
            raise CheckpointError(f"{path}: key {bad[0]!r} has dtype {locations[bad[0]].dtype}, "
                                  "expected floating point tensors")
        return {k: loc.shape for k, loc in locations.items()}, None
    sd = read_pth(path)
    notfloat = [k for k, v in sd.items() if not v.is_floating_point()]
    if notfloat:
        raise CheckpointError(f"{path}: key {notfloat[0]!r} has dtype {sd[notfloat[0]].dtype}, "
                              "expected floating point tensors")
    return {k: tuple(v.shape) for k, v in sd.items()}, sd


def infer_taehv_config(shapes: dict, source: str = "state dict") -> TAEHVConfig:
    """Read latent channels, widths, patch size and temporal strides off the tensor shapes (spatial
    upsampling has no weights and is taken as upstream's default, all stages x2)."""
    def get(key: str, ndim: int) -> tuple:
        if key not in shapes:
            raise ValueError(f"{source}: missing key {key!r} (is this a TAEHV checkpoint?)")
        if len(shapes[key]) != ndim:
            raise ValueError(f"{source}: key {key!r} has shape {shapes[key]}, expected {ndim} dims")
        return shapes[key]

    def stride(key: str, grown: int, base: int) -> bool:
        if base <= 0 or grown % base or grown // base not in (1, 2):
            raise ValueError(f"{source}: key {key!r} has shape {shapes[key]}: not a temporal stride of 1 or 2")
        return grown // base == 2

    z = get(f"decoder.{_DEC_FIRST}.weight", 4)[1]
    n_f = [get(f"decoder.{_DEC_FIRST}.weight", 4)[0]] + [get(f"decoder.{i}.weight", 4)[0] for i in _DEC_PROJ]
    out_ch = get(f"decoder.{_DEC_LAST}.weight", 4)[0]
    width = get(f"encoder.{_ENC_FIRST}.weight", 4)[0]
    in_ch = get(f"encoder.{_ENC_FIRST}.weight", 4)[1]
    p = math.isqrt(max(out_ch // 3, 1))
    if out_ch != 3 * p * p or in_ch != out_ch:
        raise ValueError(f"{source}: image channels {in_ch} in / {out_ch} out are not 3 * patch_size^2")
    t_up = tuple(stride(k, get(k, 4)[0], n) for k, n in
                 ((f"decoder.{i}.conv.weight", n_f[s]) for s, i in enumerate(_DEC_TGROW)))
    t_down = tuple(stride(k, get(k, 4)[1], width) for k in (f"encoder.{i}.conv.weight" for i in _ENC_TPOOL))
    return TAEHVConfig(latent_channels=z, image_channels=3, patch_size=p, encoder_width=width,
                       decoder_widths=tuple(n_f), encoder_time_downscale=t_down, decoder_time_upscale=t_up)


def load_taehv(path: str | os.PathLike, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> TAEHV:
    """Load `taew2_1.pth` (or its `.safetensors` conversion) into an eval-mode, frozen `TAEHV` on `device`
    in `dtype`. Raises ValueError (naming the file) for anything that is not a TAEHV state dict."""
    path = os.fspath(path)
    shapes, sd = _read_shapes(path)
    cfg = infer_taehv_config(shapes, path)
    with torch.device("meta"):
        model = TAEHV(cfg)
    check_keys_and_shapes(shapes, {k: tuple(v.shape) for k, v in model.state_dict().items()}, path)
    if sd is None:                                   # safetensors: read the tensors only now, one at a time
        sd = dict(iter_tensors(read_safetensors_header(path)))   # (checked finite as they are read)
    for k, v in sd.items():
        check_finite(v, f"{path}: tensor {k!r}")
    model.load_state_dict(sd, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
