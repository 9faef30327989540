"""runtime/graphs.py: a causal stream with `cuda_graphs` computes exactly what it computes without.

On the CPU the graph path's split forward (prepare eagerly, then the blocks and the head) runs eagerly: it must
equal `WanDiT.forward` bit for bit over chunks that wrap the KV ring and across a prompt change. On a GPU the
forwards are captured and replayed: the same equality, and the replays must actually happen."""
from __future__ import annotations

import pytest
import torch

from worldstream.testing.random_models import random_student

KEYS = ["w", "wd", "", "a", "wj", "w", "s", "l"]


def stream(device: str, cuda_graphs: bool, chunks: int = 8, prompt_change_at: int = 5):
    """Latents of `chunks` chunks of the tiny v2 student (window 9 / sink 3, chunks of 4: the ring of 6 slots
    wraps every 3 chunks), the prompt changed at chunk `prompt_change_at`; and the runner's graph counters."""
    student = random_student("lingbot-fast-v2-tiny", device=device, cuda_graphs=cuda_graphs, seed=3)
    session = student.session()
    out = []
    for c in range(chunks):
        if c == prompt_change_at:
            session.set_prompt(student.context * 0.5)    # new cross-attention K / V tensors
        out.append(session.step(keys=set(KEYS[c % len(KEYS)]), look=(2.0, 0.0) if c % 3 == 0 else None).latents)
    stats = dict(student.runner.graphs.stats) if student.runner.graphs is not None else None
    session.close()
    return torch.stack(out), stats


def test_the_graph_path_equals_the_plain_forward_on_the_cpu():
    plain, none = stream("cpu", False)
    split, stats = stream("cpu", True)
    # the first forward of the stream and of the new prompt computes the cross-attention K / V (whole forward);
    # every other one went through the split path a graph records
    assert none is None and stats["whole"] == 2 and stats["split"] == 8 * 5 - 2, stats
    assert stats["replays"] == stats["captures"] == 0
    assert torch.equal(split, plain)
    assert (plain[6] - plain[4]).abs().max() > 0          # the chunks differ: the comparison can tell


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_replayed_graphs_equal_the_eager_stream_on_the_gpu():
    plain, _ = stream("cuda", False, chunks=12, prompt_change_at=7)
    graphed, stats = stream("cuda", True, chunks=12, prompt_change_at=7)
    assert stats["captures"] >= 1 and stats["replays"] > 0, stats
    assert torch.equal(graphed, plain)
