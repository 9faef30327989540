"""train/world.py: the pieces that must match inference exactly (camera maps, flips, the latent
normalization fold), the state files, and a toy end-to-end run that resumes (CPU, tiny sizes, seconds)."""
import json

import numpy as np
import pytest
import torch

from worldstream.models import camera as cam
from worldstream.models.vae import VAEConfig, WanVAE
from worldstream.train import world as tw
from worldstream.world import render_clip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def keys(s: str):
    return cam.trajectory_from_actions(cam.parse_action_string(s), 33)


@pytest.mark.parametrize("actions", ["w-8,jw-12,lw-12", "iw-6,d-10,lk-16", "none-32"])
def test_camera_maps_equal_camera_condition(actions):
    """The batched training maps are inference's `camera_condition(..., truncate=False)`."""
    poses = keys(actions)
    ref = cam.camera_condition(poses, cam.DEFAULT_INTRINSICS, 33, 96, 160, truncate=False)
    rel = tw.latent_relative_poses(poses)[None]
    got = tw.camera_maps(rel, tw.ray_dirs(96, 160))[0]
    assert got.shape == ref.shape == (384, 9, 12, 20)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_mirrored_poses_are_the_mirrored_keys():
    """A flipped clip's trajectory: J and L, A and D swap."""
    swap = str.maketrans("jlad", "ljda")
    for s in ["w-8,jw-12,lw-12", "a-4,wd-8,ij-8,kl-12"]:
        np.testing.assert_allclose(tw.mirror_poses(keys(s)), keys(s.translate(swap)), atol=1e-12)


def test_fold_latent_stats_keeps_the_video_and_normalizes_the_latents():
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny(4)).eval()
    video = torch.rand(2, 3, 5, 32, 48) * 2 - 1
    z = vae.encode(video)
    before = vae.decode(z)
    mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
    tw.fold_latent_stats(vae, mean, std)
    z2 = vae.encode(video)
    torch.testing.assert_close(z2, (z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vae.decode(z2), before, atol=1e-4, rtol=1e-4)


def test_state_files_stay_under_the_size_limit(tmp_path):
    t = {f"w{i}": torch.randn(300_000) for i in range(5)}            # 6 MB
    files = tw.save_tensors(tmp_path, "dit", t, limit=2_500_000)
    assert len(files) == 5 and all((tmp_path / f).stat().st_size <= 2_500_000 for f in files)
    back = tw.load_tensors(tmp_path, "dit")
    assert all(torch.equal(back[k], v) for k, v in t.items())


def test_every_description_is_a_training_prompt():
    prompts = set(tw.all_prompts())
    for seed in range(40):
        assert render_clip(seed, 1, 16, 16)["prompt"] in prompts


def test_toy_training_run_resumes_and_exports(tmp_path):
    """Render, VAE, decoder, DiT for a second each at toy sizes; resume; export an upstream-layout folder."""
    prompts = tw.all_prompts()
    tw.save_prompt_table(tmp_path / "prompts.safetensors", prompts, torch.randn(len(prompts), 64, 32))
    common = ["--prompts", str(tmp_path / "prompts.safetensors"), "--device", "cpu", "--height", "32", "--width",
              "48", "--frames", "5", "--pool_clips", "2", "--vae_dim", "4", "--vae_window", "5", "--vae_batch", "1",
              "--dit_batch", "2", "--decoder_batch", "1"]
    decoder = ["--decoder_seconds", "0.5", "--decoder_crop", "32,48"]
    assert tw.main(["--out", str(tmp_path / "a"), "--vae_seconds", "0.5", "--dit_seconds", "0.5"] + common) == 0
    first = json.loads((tmp_path / "a" / "state.json").read_text())
    assert first["vae_done"] and first["dit_steps"] >= 1
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0
    from worldstream.testing.text import write_tiny_text_encoder
    write_tiny_text_encoder(tmp_path / "text")
    assert tw.main(["--out", str(tmp_path / "b"), "--resume", str(tmp_path / "a"), "--dit_seconds", "0.5",
                    "--pool_start", "10", "--export", str(tmp_path / "ckpt"), "--text_dir", str(tmp_path / "text")]
                   + common + decoder) == 0
    second = json.loads((tmp_path / "b" / "state.json").read_text())
    assert second["dit_steps"] > first["dit_steps"] and second["vae_steps"] == first["vae_steps"]
    assert second["decoder_steps"] >= 1
    from worldstream.checkpoints.dit import find_checkpoint
    assert find_checkpoint(tmp_path / "ckpt").config.name == "lingbot-cam-world"


def _dit_contexts(tmp_path, dropout: float, prompts: list[str]):
    """Train the toy DiT briefly with `prompt_dropout`; every context row its forwards were given."""
    table = torch.randn(len(prompts), 64, 32)
    s = tw.Settings(height=32, width=48, frames=5, pool_clips=3, vae_dim=4, dit_batch=4, dit_seconds=0.4,
                    dit_warmup=1, prompt_dropout=dropout, save_every=1e9)
    trainer = tw.Trainer(s, tmp_path / f"run{dropout}", "cpu", prompts, table, log=lambda m: None)
    seen = []
    trainer.dit.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    trainer.train_dit(tw.render_pool(s, prompts, "cpu", log=lambda m: None))
    rows = torch.cat(seen)                                   # [forwards x batch, len, dim]
    hits = (rows[:, None] == table[None]).all(-1).all(-1)    # which table row each context is
    assert (hits.sum(1) == 1).all()
    return hits.float().argmax(1), prompts.index("")


def test_prompt_dropout_trains_on_the_empty_prompt(tmp_path):
    prompts = tw.all_prompts() + [tw.EMPTY_PROMPT]
    rows, empty = _dit_contexts(tmp_path, 0.0, prompts)
    assert not (rows == empty).any()                         # without dropout, every sample has its own prompt
    rows, empty = _dit_contexts(tmp_path, 1.0, prompts)
    assert (rows == empty).all()                             # with 1.0, every sample the empty prompt


def test_prompt_dropout_needs_an_empty_prompt_row(tmp_path, capsys):
    prompts = tw.all_prompts()                                # a table made before it had the "" row
    tw.save_prompt_table(tmp_path / "p.safetensors", prompts, torch.randn(len(prompts), 64, 32))
    assert tw.main(["--out", str(tmp_path / "a"), "--prompts", str(tmp_path / "p.safetensors"), "--device", "cpu",
                    "--prompt_dropout", "0.1"]) == 2
    assert "--make_prompts" in capsys.readouterr().err


def test_init_from_the_shipped_checkpoint_trains_its_dit_and_keeps_its_vae(tmp_path):
    """`--init`: the shipped model's VAE (finished, not trained further) and DiT (weights and EMA) to go on
    training from, e.g. with prompt dropout."""
    from worldstream.testing.world import WORLD_CHECKPOINT, WorldModel

    shipped = WorldModel.load(WORLD_CHECKPOINT)
    prompts = tw.all_prompts() + [tw.EMPTY_PROMPT]
    table = torch.randn(len(prompts), 64, shipped.config.text_dim)
    s = tw.Settings(height=32, width=48, frames=5, pool_clips=2, dit_batch=2, dit_seconds=0.5, dit_warmup=1,
                    vae_seconds=5.0, prompt_dropout=0.5, save_every=1e9)
    trainer = tw.Trainer(s, tmp_path / "run", "cpu", prompts, table, init=WORLD_CHECKPOINT, log=lambda m: None)
    same = lambda a, b: all(torch.equal(a[k].float(), b[k].float()) for k in a)   # noqa: E731
    assert same(trainer.dit.state_dict(), shipped.dit.state_dict())
    assert same(trainer.ema.state_dict(), shipped.dit.state_dict())
    vae_before = {k: v.clone() for k, v in trainer.vae.state_dict().items()}
    assert same(vae_before, shipped.vae.state_dict()) and trainer.state["vae_done"]
    pool = tw.render_pool(s, prompts, "cpu", log=lambda m: None)
    trainer.train_vae(pool)                                  # finished: nothing happens
    trainer.train_dit(pool)
    assert trainer.state["dit_steps"] >= 1 and trainer.state["vae_steps"] == 0
    assert same(trainer.vae.state_dict(), vae_before)
    assert not same(trainer.dit.state_dict(), shipped.dit.state_dict())
    # a checkpoint of another model is refused by name, before anything is trained
    bad = tw.Settings(vae_dim=8)
    with pytest.raises(ValueError, match="base width"):
        tw.Trainer(bad, tmp_path / "bad", "cpu", prompts, table, init=WORLD_CHECKPOINT, log=lambda m: None)
