"""A block packed out of a memory-mapped `.pth` (umt5 streamed through the GPU) is held once in host memory: its
file pages leave the resident set as its slab fills (the seed-002 run on an H200 peaked at 22 GB of RSS for a
16 GB budget: the 11 GB umt5 counted twice, mapped and packed)."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

from worldstream.checkpoints.tensors import read_pth
from worldstream.runtime.memory import release_file_pages
from worldstream.runtime.slab import BlockLayout
from worldstream.runtime.streaming import host_slabs_from_blocks

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
MB = 2**20


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


@pytest.fixture
def mapped(tmp_path):
    """Four 16 MB tensors saved to a .pth and read back memory-mapped, every page touched."""
    g = torch.Generator().manual_seed(0)
    want = {f"w{i}": torch.randn(2048, 2048, generator=g) for i in range(4)}
    torch.save(want, tmp_path / "w.pth")
    sd = read_pth(tmp_path / "w.pth")
    for t in sd.values():
        t.sum()
    return want, sd


def test_released_pages_leave_the_resident_set_and_the_data_stays(mapped):
    want, sd = mapped
    before = rss()
    released = release_file_pages(sd.values())
    assert released >= 60 * MB
    assert before - rss() >= 48 * MB
    for k, t in sd.items():   # touched again: read back from the page cache, unchanged
        torch.testing.assert_close(t, want[k], rtol=0, atol=0)


def test_anonymous_memory_is_left_alone():
    t = torch.arange(8 * MB // 4, dtype=torch.float32)
    assert release_file_pages([t]) == 0
    assert t[-1].item() == 8 * MB // 4 - 1 and t.sum().item() == pytest.approx(t.double().sum().item())


def test_packing_mapped_blocks_holds_each_block_once(mapped):
    _, sd = mapped
    blocks = nn.ModuleList()
    for i in range(2):
        b = nn.Module()
        b.a = nn.Parameter(sd[f"w{2 * i}"], requires_grad=False)
        b.b = nn.Parameter(sd[f"w{2 * i + 1}"], requires_grad=False)
        blocks.append(b)
    before = rss()
    sources = host_slabs_from_blocks(blocks, range(2), BlockLayout.of(blocks[0]))
    grown = rss() - before
    assert grown < 24 * MB, f"RSS grew {grown / MB:.0f} MB packing 64 MB of mapped weights into 64 MB of slabs"
    assert len(sources) == 2
    for i, b in enumerate(blocks):   # the parameters now live in the slabs, with the file's values
        torch.testing.assert_close(b.a, sd[f"w{2 * i}"], rtol=0, atol=0)
