"""The DiT runner: experts loaded from a checkpoint into their planned homes (device, pinned RAM slabs, or the
shards themselves via the disk tier) give the same output as plainly loaded experts, across the expert switch."""
import pytest
import torch

from worldstream.models.configs import get_config
from worldstream.models.loader import find_checkpoint, load_dit
from worldstream.runtime.planner import Plan
from worldstream.runtime.runner import DiTRunner, checkpoint_loader
from worldstream.testing import write_dit_dir


def make_plan(n, resident, ram, disk, prefetch=1):
    return Plan(n_blocks=n, block_bytes=0, resident=resident, prefetch=prefetch, cfg_batched=True, ffn_chunk=None,
                ram_blocks=ram, disk_blocks=disk, vram_peak=0, ram_peak=0, weights_in_ram=0, step_seconds=0,
                resident_step_seconds=0, block_compute_s=0, block_copy_s=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    cfg = get_config("lingbot-cam-tiny")   # 2 blocks
    write_dit_dir(root / "high_noise_model", cfg, seed=1)
    write_dit_dir(root / "low_noise_model", cfg, seed=2)
    return find_checkpoint(root)


def inputs(cfg):
    g = torch.Generator().manual_seed(0)
    f, h, w = 2, 4, 6
    return dict(x=torch.randn(2, 16, f, h, w, generator=g), y=torch.randn(2, 20, f, h, w, generator=g),
                t=torch.tensor([950.0, 950.0]), context=torch.randn(2, 5, cfg.text_dim, generator=g),
                camera=torch.randn(1, 384, f, h, w, generator=g))


@pytest.mark.parametrize("resident,ram,disk,prefetch", [
    ([1], [0], [], 1),              # RAM tier only
    ([], [0], [1], 2),              # one streamed block from RAM, one read from the shards
    ([0], [], [1], 1),              # disk tier only
])
def test_runner_matches_plain_experts_across_the_switch(ckpt, resident, ram, disk, prefetch):
    cfg = ckpt.config
    inp = inputs(cfg)
    with torch.no_grad():
        ref = {n: load_dit(d, dtype=torch.float32, cfg=cfg)(**inp) for n, d in ckpt.experts.items()}
    runner = DiTRunner(["high", "low"], checkpoint_loader(ckpt), "cpu", torch.float32,
                       make_plan(2, resident, ram, disk, prefetch), keep_all=True, cfg=cfg)
    order = ["high", "high", "low", "low", "low"]
    for k, name in enumerate(order):
        if k + 1 < len(order):
            runner.expect(order[k + 1])
        assert torch.equal(runner(name, **inp), ref[name]), (k, name)
    assert runner.engine.stats["resyncs"] == 0
    if not disk:   # the low expert's first blocks were prefetched during the high expert's last forward
        trace_names = runner.calls
        assert trace_names == order
    runner.close()


def test_switch_without_room_for_both_refills_the_same_slabs(ckpt):
    """RAM for one expert only: at the switch the old expert is let go entirely (engine included) and the new
    one is read from its files straight into the old expert's slabs; outputs stay exact."""
    cfg = ckpt.config
    inp = inputs(cfg)
    with torch.no_grad():
        ref = {n: load_dit(d, dtype=torch.float32, cfg=cfg)(**inp) for n, d in ckpt.experts.items()}
    runner = DiTRunner(["high", "low"], checkpoint_loader(ckpt), "cpu", torch.float32,
                       make_plan(2, [], [0, 1], []), keep_all=False, cfg=cfg)
    runner.expect("high")
    assert torch.equal(runner("high", **inp), ref["high"])
    runner.expect("high")                 # as the pipeline does between steps of one expert
    slabs = {src.buf.data_ptr() for src in runner.loaded["high"][1].values()}
    high_handle = runner.placed["high"]
    runner.expect("low")
    assert torch.equal(runner("low", **inp), ref["low"])
    assert torch.equal(runner("low", **inp), ref["low"])
    assert set(runner.loaded) == {"low"}
    assert {src.buf.data_ptr() for src in runner.loaded["low"][1].values()} == slabs
    assert runner.engine.next_model is not high_handle and high_handle not in runner.engine.models
    runner.close()
