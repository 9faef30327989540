"""The planner against what was measured: every fp8 row of the offload benchmark (benchmarks/results/*.json, H100
runs C and D) predicted within 10% for the configuration that ran (its CFG batching, resident blocks, prefetch
depth, weight policy, attention kernel), and the bf16 rows of the same runs still within 15%; the 8-bit
attention is chosen where it is faster (not at 9 frames); LingBot at 81 frames fits 8 GB with CFG batched."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from worldstream.checkpoints.compressed import QuantPolicy
from worldstream.models.configs import get_config
from worldstream.runtime.planner import Hardware, Workload, attention_for, plan, step_seconds
from worldstream.runtime.quant import quantized_block_bytes
from worldstream.runtime.streaming import spread_resident

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
# Which fp8 policy each run used (BENCHMARKS.md): run D (offload_quant) kept the first and last blocks bf16,
# run C (offload_fp8_resident, offload_worldstream_final) compressed all 40.
SKIP_FIRST_LAST = {"offload_quant.json": True, "offload_fp8_resident.json": False,
                   "offload_worldstream_final.json": False, "offload_lowmem.json": True}


def measured_rows():
    for name, skip in SKIP_FIRST_LAST.items():
        data = json.loads((RESULTS / name).read_text())
        bandwidth = data["bandwidth"]["pinned_h2d_GBps"] * 1e9
        for row in data["rows"]:
            if "error" not in row and row["method"].startswith(("resident", "worldstream")):
                yield name, skip, bandwidth, row


def predicted(skip: bool, bandwidth: float, row: dict) -> float:
    """The model's seconds per step for the configuration the row measured."""
    cfg = get_config(row["model"])
    n = cfg.num_layers
    policy = QuantPolicy("fp8", skip_first_last=skip) if "fp8" in row["method"] else None
    block_bytes = quantized_block_bytes(cfg, "fp8" if policy else None)
    if row["cap_GB"] is None:
        resident, prefetch = list(range(n)), 1
    else:
        pinned = set(policy.pinned(n)) if policy else set()
        resident = sorted(set(spread_resident(n, row["resident_blocks"] - len(pinned))) | pinned)
        prefetch = row["prefetch"]
    return step_seconds(cfg, Workload(frames=row["frames"]), dataclasses.replace(Hardware(), pcie_bw=bandwidth),
                        batched=row["cfg_batched"], resident=resident, prefetch=prefetch, block_bytes=block_bytes,
                        fp8_blocks=tuple(policy.blocks(n)) if policy else (),
                        attention="8bit" if "8bit" in row["method"] else "sdpa", chunk=row.get("chunk"))


ROWS = list(measured_rows())


def test_every_fp8_row_within_10_percent():
    fp8 = [(name, row, predicted(skip, bw, row)) for name, skip, bw, row in ROWS if "fp8" in row["method"]]
    assert len(fp8) >= 18
    for name, row, pred in fp8:
        err = pred / row["s_per_step"] - 1
        print(f"{name:32} {row['model']:16} {row['method']:26} {row['frames']:3} {row['cap_GB']}: "
              f"measured {row['s_per_step']:.3f} s, predicted {pred:.3f} s ({err:+.1%})")
        assert abs(err) <= 0.10, (name, row["method"], row["frames"], row["cap_GB"])


def test_bf16_rows_stay_within_15_percent():
    """Pricing fp8 did not disturb bf16 (the previous bound across the grid was 20%; run C measured -8%..+7%)."""
    rows = [(row, predicted(skip, bw, row)) for _, skip, bw, row in ROWS
            if "fp8" not in row["method"] and not row.get("chunk")]
    assert len(rows) >= 20
    for row, pred in rows:
        assert abs(pred / row["s_per_step"] - 1) <= 0.15, (row["model"], row["method"], row["frames"], row["cap_GB"])


def test_the_slow_low_memory_block_is_not_chosen_where_two_plain_forwards_fit():
    """The one bf16 low-memory row measured (LingBot, 81 frames, CFG batched, chunks of 8192: 9.25 s on the
    H200, 2026-12-02) is under-predicted (the per-chunk price is fitted to the fp8 row, 3.8 ms; this one paid
    7.8 ms, not yet understood: BENCHMARKS.md). What matters is the choice: priced so, the batched low-memory
    plan is slower than two plain forwards (measured 7.06 s there), and the 8 GB plan is the latter."""
    (_, skip, bw, row), = [r for r in ROWS if r[0] == "offload_lowmem.json" and r[3].get("chunk")
                           and "fp8" not in r[3]["method"]]
    chunked = predicted(skip, bw, row)
    assert chunked < row["s_per_step"]                     # the known miss, in the safe direction for the choice
    cfg = get_config("lingbot-cam")
    two = step_seconds(cfg, Workload(frames=81), dataclasses.replace(Hardware(), pcie_bw=bw), batched=False,
                       resident=[], prefetch=1, block_bytes=quantized_block_bytes(cfg, None))
    assert two < chunked
    p = plan(cfg, Workload(frames=81, experts=2), 8e9)
    assert not p.batched_guidance and p.chunk is None and p.vram_peak <= 8e9


@pytest.mark.parametrize("variant", ["lingbot-cam", "wan2.2-i2v-a14b"])
def test_8bit_attention_is_chosen_where_it_is_faster(variant):
    cfg, hw = get_config(variant), Hardware()
    assert attention_for(cfg, cfg.tokens(9, 480, 832), 2, hw, asked="8bit") == "sdpa"     # measured: it loses
    assert attention_for(cfg, cfg.tokens(81, 480, 832), 2, hw, asked="8bit") == "8bit"   # measured: 1.21x
    assert attention_for(cfg, cfg.tokens(81, 480, 832), 2, hw, asked="sdpa") == "sdpa"
    assert attention_for(cfg, cfg.tokens(81, 480, 832), 2, dataclasses.replace(hw, fp8=False), asked="8bit") == "sdpa"
    p = plan(cfg, Workload(frames=9), 24e9, attention="8bit")
    assert p.attention == "sdpa" and any("slower than SDPA" in n for n in p.notes)


def test_lingbot_81_frames_fits_8gb_with_cfg_batched():
    """Issue 17: the low-memory block brings the batch-2 activations under 8 GB (they needed ~8.5 GB), when
    the block is cheap enough to win (here: priced at the 0.2 ms per chunk first guessed; as measured, the
    planner prefers two plain forwards: the test above)."""
    cfg = get_config("lingbot-cam")
    p = plan(cfg, Workload(frames=81, experts=2), 8e9, hardware=dataclasses.replace(Hardware(), chunk_overhead_s=2e-4))
    assert p.batched_guidance and p.chunk is not None and p.vram_peak <= 8e9
    resident = plan(cfg, Workload(frames=81, experts=2), None)
    assert resident.chunk is None and resident.batched_guidance
    # a budget that holds the plain block's activations does not chunk
    assert plan(cfg, Workload(frames=81, experts=2), 24e9).chunk is None
