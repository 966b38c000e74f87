"""Training: the loss falls on a learnable task, resume continues the same run, Ctrl-C leaves a checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bag_factory as bf
from mail_ros.cli import main
from mail_ros.data.hdf5 import Episode
from mail_ros.policy.checkpoint import load_checkpoint
from mail_ros.policy.presets import get_preset
from mail_ros.train.trainer import (DataConfig, RunConfig, TrainConfig, Trainer, TrainError, build_datasets,
                                    learning_rate)

torch.set_num_threads(1)
TINY_YAML = str(Path(__file__).resolve().parents[1] / "config" / "train_tiny.yaml")


def block_episode(x0: float, n: int = 24, size: int = 32) -> Episode:
    """A block slides right at constant speed; actions (and joints) are functions of its position."""
    xs = x0 + 0.02 * np.arange(n)
    images = np.zeros((n, size, size, 3), np.uint8)
    for i, x in enumerate(xs):
        c = int(round(x * (size - 8)))
        images[i, 12:20, c : c + 8] = 255
    actions = np.stack([xs, 1 - xs, 2 * xs, -xs, xs**2, 0.5 * xs, xs + 1, 0.04 + 0.02 * xs], 1)
    joints = np.tile(xs[:, None], (1, 9))
    return Episode({"agentview": images, "wrist": images[:, ::-1].copy()}, joints, actions, "slide", 0.1 * np.arange(n), f"ep{x0:.3f}")


def make_run(preset: str, steps: int, **train) -> RunConfig:
    policy = get_preset(preset, {"spec.observation.image_size": [32, 32], "proprio": True})
    settings = dict(steps=steps, batch_size=16, val_every=50, log_every=10, checkpoint_every=1000, device="cpu") | train
    return RunConfig(policy, DataConfig(val_fraction=0.25, embedding_cache=None), TrainConfig(**settings))


EPISODES = [block_episode(x0) for x0 in np.random.default_rng(0).uniform(0.0, 0.5, 8)]


def test_bc_validation_loss_falls_far_below_mean_predictor(tmp_path):
    run = make_run("tiny-d_ma-bc", 150, lr=2e-3)
    summary = Trainer(run, build_datasets(EPISODES, run), tmp_path, progress=False).fit()
    assert summary.mean_predictor_val_loss > 0.5
    assert summary.best_val_loss < 0.1 * summary.mean_predictor_val_loss
    policy = load_checkpoint(tmp_path / "best")
    assert policy.config == run.policy
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(10, 151, 10))
    assert any((tmp_path / "tensorboard").iterdir())


@given(total=st.integers(1, 5000), warmup=st.integers(0, 500), lr=st.floats(1e-6, 1.0), data=st.data())
def test_cosine_schedule_warms_up_then_decays_to_zero(total, warmup, lr, data):
    step = data.draw(st.integers(0, total - 1))
    value = learning_rate(step, total, lr, "cosine", warmup)
    assert 0.0 <= value <= lr * (1 + 1e-12)
    if step < warmup:
        assert value == pytest.approx(lr * (step + 1) / warmup)
    else:
        assert value >= learning_rate(min(step + 1, total - 1), total, lr, "cosine", warmup) - 1e-15
        assert learning_rate(total, total, lr, "cosine", warmup) == pytest.approx(0.0, abs=1e-12 * lr)
    assert learning_rate(step, total, lr, "constant", 0) == lr


def test_schedule_settings_are_validated():
    with pytest.raises(TrainError, match="lr_schedule must be one of"):
        TrainConfig(steps=10, lr_schedule="linear")
    with pytest.raises(TrainError, match="warmup_steps must be >= 0"):
        TrainConfig(steps=10, warmup_steps=-1)


def test_interrupt_then_resume_continues_the_same_run(tmp_path):
    # DDPM: EMA on, random noise per step; a cosine schedule whose warm-up spans the interruption.
    run = make_run("tiny-d_ma-ddpm", 24, val_every=8, log_every=4, lr_schedule="cosine", warmup_steps=12)
    straight = Trainer(run, build_datasets(EPISODES, run), tmp_path / "a", progress=False)
    straight.fit()

    def stop_at_10(trainer, step, metrics):
        if step == 10:
            raise KeyboardInterrupt

    first = Trainer(run, build_datasets(EPISODES, run), tmp_path / "b", callbacks=[stop_at_10], progress=False)
    summary = first.fit()
    assert summary.interrupted and summary.step == 10
    info = json.loads((tmp_path / "b/last/trainer.json").read_text())
    assert info["step"] == 10 and info["epoch"] == 10 // first.batches_per_epoch
    saved = load_checkpoint(tmp_path / "b/last")  # usable as a policy straight away
    torch.testing.assert_close(saved.state_dict(), {k: v.cpu() for k, v in first.ema.model.state_dict().items()})

    resumed = Trainer(run, build_datasets(EPISODES, run), tmp_path / "b", progress=False)
    resumed.load_state(tmp_path / "b")
    assert resumed.step == 10
    assert resumed.fit().step == 24
    torch.testing.assert_close(resumed.policy.state_dict(), straight.policy.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(resumed.ema.model.state_dict(), straight.ema.model.state_dict(), rtol=0, atol=0)
    rows = list(csv.DictReader(open(tmp_path / "b/log.csv")))
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20, 24]  # one row per logged step, none duplicated
    # The logged rate is the one the step used: the warm-up, then the cosine decay.
    for row in rows:
        step = int(row["step"]) - 1
        assert float(row["lr"]) == pytest.approx(learning_rate(step, 24, run.train.lr, "cosine", 12), rel=1e-5)


def test_cli_convert_train_resume(tmp_path, capsys):
    for i, storage in enumerate(("mcap", "sqlite3")):
        bf.write_demo_bag(tmp_path / f"bag{i}", bf.DemoBag(storage=storage, seed=i))
    data = tmp_path / "demos.hdf5"
    assert main(["convert", str(tmp_path / "bag0"), str(tmp_path / "bag1"), "-o", str(data),
                 "--image-size", "64", "64", "--max-skew", "0.03"]) == 0
    out = tmp_path / "run"
    assert main(["train", "--config", TINY_YAML, str(data), "--out", str(out), "--steps", "6",
                 "--set", "train.log_every=3", "--set", "train.val_every=3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "finished at step 6" in text and "windows: 26 train, 26 val" in text
    assert main(["train", "--resume", str(out), "--steps", "9", "--no-progress"]) == 0
    assert "finished at step 9" in capsys.readouterr().out
    assert json.loads((out / "last/config.json").read_text())["training"]["step"] == 9
    assert load_checkpoint(out / "best").config.spec.observation.image_size == (64, 64)
    assert main(["train", "--config", TINY_YAML, str(tmp_path / "none.hdf5"), "--out", str(out)]) == 2
    assert "cannot open as HDF5" in capsys.readouterr().err
