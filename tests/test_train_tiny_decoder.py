"""The tiny decoder's trainer (train/tiny_decoder.py) on a micro setup: the loss falls on a fixed batch, a
time-limited run writes a loadable decoder and its log, the training state round-trips, held-out seeds are
refused, and the command line parses its flags and presets."""
from __future__ import annotations

import json

import pytest
import torch

from worldstream.checkpoints.tiny_decoder import DECODER_FILE, load_tiny_decoder
from worldstream.train import tiny_decoder as T

MICRO = dict(widths=(8, 8, 8), blocks=(1, 1, 1), head_width=8, frames=5, height=16, width=24, batch=2,
             lr=3e-3, warmup=1)


def micro_pool(n: int = 2, seed: int = 0):
    """Smooth random clips (uint8 [n, 5, 3, 16, 24]) and random latents [n, 16, 2, 2, 3]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 5, 3, 4, 6, generator=g)
    frames = torch.nn.functional.interpolate(coarse.flatten(0, 1), size=(16, 24), mode="bilinear")
    frames = (frames.reshape(n, 5, 3, 16, 24) * 255).round().to(torch.uint8)
    return frames, torch.randn(n, 16, 2, 2, 3, generator=g)


def trainer(tmp_path, **kw) -> T.DecoderTrainer:
    t = T.DecoderTrainer(T.DecoderSettings(**{**MICRO, **kw}), tmp_path, "cpu", log=lambda m: None)
    t.use_pool(*micro_pool())
    return t


def test_loss_falls_on_a_fixed_batch(tmp_path):
    t = trainer(tmp_path)
    idx = torch.tensor([0, 1])
    first, _ = t.loss(idx)
    for _ in range(40):
        loss, _ = t.loss(idx)
        assert torch.isfinite(loss)
        t.opt.zero_grad()
        loss.backward()
        t.opt.step()
    last, _ = t.loss(idx)
    assert last.item() < 0.8 * first.item(), (first.item(), last.item())


def test_timed_run_writes_decoder_log_and_resumes(tmp_path):
    t = trainer(tmp_path / "a", minutes=0.02)
    t.train()
    log = json.loads((tmp_path / "a" / "log.json").read_text())
    assert log["steps"] == t.run.steps > 0 and log["curve"] and log["settings"]["widths"] == [8, 8, 8]
    assert all(map(lambda row: row[2] == row[2] and row[2] < 10, log["curve"]))     # finite mse
    loaded = load_tiny_decoder(tmp_path / "a" / DECODER_FILE)
    assert loaded.cfg == t.model.cfg
    z = micro_pool()[1]
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), t.model.half().float().eval().decode(z))
    # resume: the weights and the optimizer's moments come back
    r = T.DecoderTrainer(T.DecoderSettings(**MICRO), tmp_path / "b", "cpu", resume=tmp_path / "a", log=lambda m: None)
    assert r.run.steps == t.run.steps and r.resumed
    saved = T.DecoderTrainer(T.DecoderSettings(**MICRO), tmp_path / "c", "cpu", log=lambda m: None)
    T._load_train_state(tmp_path / "a" / T.TRAIN_STATE, saved.model, saved.opt)
    p = next(saved.model.parameters())
    assert set(saved.opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} and saved.opt.state[p]["exp_avg"].abs().sum() > 0
    with pytest.raises(ValueError, match="another shape"):
        T.DecoderTrainer(T.DecoderSettings(**{**MICRO, "widths": (8, 8, 4)}), tmp_path / "d", "cpu",
                         resume=tmp_path / "a", log=lambda m: None)


def test_settings_refuse_held_out_seeds_and_bad_sizes():
    with pytest.raises(ValueError, match="held out"):
        T.DecoderSettings(pool_start=999_000, pool_clips=4096)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        T.DecoderSettings(frames=32)
    with pytest.raises(ValueError, match="multiples of 8"):
        T.DecoderSettings(height=100)


def test_command_line_flags_and_presets():
    args = T._parser().parse_args(["--out", "x", "--preset", "smoke", "--batch", "3", "--widths", "16", "8", "8"])
    s = T.settings_from_args(args)
    assert s.batch == 3 and s.widths == (16, 8, 8) and s.frames == T.PRESETS["smoke"]["frames"]
    assert T.settings_from_args(T._parser().parse_args(["--out", "x"])) == T.DecoderSettings()
    assert T.main(["--out", "x", "--pool_start", "999999"]) == 2
