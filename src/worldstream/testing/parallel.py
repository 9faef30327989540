"""Several CPU processes joined by gloo, as torchrun would start them: for tests and benchmark smoke runs of
sequence parallelism (runtime/parallel.py) on a machine without GPUs.

    results = run_in_processes(fn, 2, arg)    # fn(sp, arg) in 2 processes; their return values, rank order

`fn` must be importable by name (a module-level function): the processes are spawned, not forked.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, out: str, threads: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch

    from ..runtime.parallel import SequenceParallel

    torch.set_num_threads(threads)
    sp = SequenceParallel.launch(world, "cpu")
    try:
        result = ("ok", fn(sp, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent with its traceback
        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    sp.close()


def run_in_processes(fn: Callable, world: int, *args, threads: int = 1) -> list:
    """`fn(sp, *args)` in `world` spawned CPU processes (`sp`: their runtime.parallel.SequenceParallel, gloo);
    the return values in rank order. An exception in any process is raised here with its traceback."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="worldstream-ranks-") as out:
        mp.start_processes(_entry, args=(fn, world, free_port(), out, threads, args), nprocs=world,
                           start_method="spawn")
        results = []
        for rank in range(world):
            with open(Path(out) / f"rank{rank}.pkl", "rb") as f:
                kind, value = pickle.load(f)
            if kind == "error":
                raise RuntimeError(value)
            results.append(value)
    return results
