"""Live tensor memory of a piece of code, on any device, the meta device included.

`with LiveBytes() as live: model(**inputs)` records every storage an operation allocates while the block runs
(views and in-place results share their input's storage and are not counted again), and after each operation
adds up the bytes of those still alive: `live.peak` is the largest total, `live.now` the total at the end.
Tensors made before the block (weights, inputs) are not counted.

On the meta device nothing is computed, so a full-size forward (LingBot at 81 frames: 32,760 tokens of width
5,120) is traced in about a second on a CPU. What it measures is the program's own live set: a GPU allocator
rounds each block up and keeps freed blocks cached, and kernels may use workspaces of their own (the planner's
activation model adds a margin for both, models/configs.py).
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._tracked: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.now = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {StorageWeakRef(t.untyped_storage()).cdata
                  for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in inputs and ref.cdata not in self._tracked:
                    self._tracked[ref.cdata] = (ref, t.untyped_storage().nbytes())
        self._tracked = {k: v for k, v in self._tracked.items() if not v[0].expired()}
        self.now = sum(n for _, n in self._tracked.values())
        self.peak = max(self.peak, self.now)
        return out
