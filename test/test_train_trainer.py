"""Training: the loss falls on a learnable task, resume continues the same run, Ctrl-C leaves a checkpoint;
checkpoints are swapped whole, divergence and bad settings or data are refused before anything is lost."""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bag_factory as bf
from mail_ros.cli import main
from mail_ros.data.hdf5 import DataError, DemoSet, Episode, write_hdf5
from mail_ros.policy.checkpoint import load_checkpoint
from mail_ros.policy.presets import get_preset
from mail_ros.train.trainer import (DataConfig, RunConfig, TrainConfig, Trainer, TrainError, build_datasets,
                                    learning_rate, load_demos)

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
SMALL_IMAGES = "policy.spec.observation.image_size=[32, 32]"  # for TINY_YAML with EPISODES


def write_demos(path: Path, episodes: list[Episode], action_space: str = "joint_position") -> Path:
    spec = get_preset("tiny-d_ma-bc").spec
    write_hdf5(path, DemoSet(episodes, ("agentview", "wrist"), spec.observation.joint_names, spec.action.names,
                             spec.observation.rate_hz, action_space))
    return path


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


@pytest.mark.parametrize("cls,kwargs,message", [
    (TrainConfig, dict(steps=10, epochs=1), "set exactly one of train.steps and train.epochs"),
    (TrainConfig, dict(steps=2.5), "train.steps must be an integer >= 1, got 2.5"),
    (TrainConfig, dict(steps=True), "train.steps must be an integer >= 1, got True"),
    (TrainConfig, dict(epochs=float("inf")), "train.epochs must be a finite number, got inf"),
    (TrainConfig, dict(epochs=0), "train.epochs must be positive, got 0"),
    (TrainConfig, dict(steps=10, batch_size=2.5), "train.batch_size must be an integer >= 1, got 2.5"),
    (TrainConfig, dict(steps=10, val_every=0), "train.val_every must be an integer >= 1, got 0"),
    (TrainConfig, dict(steps=10, checkpoint_every="10"), "train.checkpoint_every must be an integer >= 1, got '10'"),
    (TrainConfig, dict(steps=10, lr=float("inf")), "train.lr must be a finite number, got inf"),
    (TrainConfig, dict(steps=10, lr=0.0), "train.lr must be positive, got 0.0"),
    (TrainConfig, dict(steps=10, lr_schedule="linear"), r"train.lr_schedule must be one of \['constant', 'cosine'\]"),
    (TrainConfig, dict(steps=10, warmup_steps=-1), "train.warmup_steps must be an integer >= 0, got -1"),
    (TrainConfig, dict(steps=10, ema="false"), "train.ema must be true or false, got 'false'"),
    (TrainConfig, dict(steps=10, ema_decay=1.0), r"train.ema_decay must be in \(0, 1\), got 1.0"),
    (TrainConfig, dict(steps=10, ema_decay="0.9"), "train.ema_decay must be a finite number, got '0.9'"),
    (TrainConfig, dict(steps=10, num_workers=-1), "train.num_workers must be an integer >= 0, got -1"),
    (TrainConfig, dict(steps=10, seed=1.5), "train.seed must be an integer >= 0, got 1.5"),
    (TrainConfig, dict(steps=10, seed=-1), "train.seed must be an integer >= 0, got -1"),
    (TrainConfig, dict(steps=10, seed=2**64), r"train.seed must be below 2\*\*64"),
    (TrainConfig, dict(steps=10, device=5), "train.device must be auto, cpu, cuda or cuda:N, got 5"),
    (TrainConfig, dict(steps=10, device="gpu"), "train.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (DataConfig, dict(camera_map=["a", "b"]), r"data.camera_map must map file camera names to policy camera names"),
    (DataConfig, dict(camera_map={"eye_in_hand": 3}), r"data.camera_map must map .* got \{'eye_in_hand': 3\}"),
    (DataConfig, dict(val_fraction=True), "data.val_fraction must be a finite number, got True"),
    (DataConfig, dict(val_fraction=1.0), r"data.val_fraction must be in \[0, 1\), got 1.0"),
    (DataConfig, dict(augment_shift=1.5), "data.augment_shift must be an integer >= 0, got 1.5"),
    (DataConfig, dict(embedding_cache=5), "data.embedding_cache must be a folder name or null, got 5"),
])
def test_settings_are_checked_for_type_and_range(cls, kwargs, message):
    with pytest.raises(TrainError, match=message):
        cls(**kwargs)


def test_numpy_settings_are_accepted_as_plain_numbers_and_saved_configs_checked():
    run = RunConfig(get_preset("tiny-d_ma-bc"), DataConfig(augment_shift=np.int64(2)),
                    TrainConfig(steps=np.int64(5), lr=np.float32(1e-3), seed=np.uint32(3), ema=True))
    saved = json.loads(json.dumps(run.to_dict()))
    assert RunConfig.from_dict(saved) == run and saved["train"]["seed"] == 3
    for edit, message in [(lambda d: d["train"].update(steps=2.5), "train.steps must be an integer >= 1"),
                          (lambda d: d.pop("data"), "missing key 'data'"),
                          (lambda d: d["train"].update(typo=1), "train has unknown keys"),
                          (lambda d: d["policy"].update(proprio="yes"), "proprio must be true or false")]:
        broken = copy.deepcopy(saved)
        edit(broken)
        with pytest.raises(TrainError, match=f"invalid saved run config: .*{message}"):
            RunConfig.from_dict(broken)


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


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    # A run in the background (nohup, a scheduler) gets SIGTERM, not SIGINT: it must save and stop.
    run = make_run("tiny-d_ma-bc", 24, val_every=8, log_every=4)

    def terminate_at_10(trainer, step, metrics):
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    summary = Trainer(run, build_datasets(EPISODES, run), tmp_path, callbacks=[terminate_at_10], progress=False).fit()
    assert summary.interrupted and summary.step == 10
    assert json.loads((tmp_path / "last/trainer.json").read_text())["step"] == 10
    assert signal.getsignal(signal.SIGTERM) is before  # put back once the run ends


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
    assert main(["train", "--config", TINY_YAML, str(tmp_path / "none.hdf5"), "--out", str(tmp_path / "new")]) == 2
    assert "cannot open as HDF5" in capsys.readouterr().err


def test_cli_replaces_a_run_only_with_overwrite(tmp_path, capsys):
    data = str(write_demos(tmp_path / "demos.hdf5", EPISODES))
    out = tmp_path / "run"
    args = ["train", "--config", TINY_YAML, "--out", str(out), "--set", SMALL_IMAGES, "--set", "train.log_every=2",
            "--set", "train.val_every=2", "--no-progress"]
    assert main([*args, data, "--steps", "4"]) == 0
    best = (out / "best/model.safetensors").read_bytes()
    assert main([*args, data, "--steps", "2"]) == 2
    assert (f"{out} already holds a run (best, last, log.csv, summary.json, tensorboard); continue it with --resume"
            in capsys.readouterr().err)
    # A command that fails to set up a new run leaves the old one alone, --overwrite or not.
    assert main([*args, str(tmp_path / "none.hdf5"), "--steps", "2", "--overwrite"]) == 2
    assert "cannot open as HDF5" in capsys.readouterr().err
    assert (out / "best/model.safetensors").read_bytes() == best
    assert [int(r["step"]) for r in csv.DictReader(open(out / "log.csv"))] == [2, 4]
    assert main([*args, data, "--steps", "2", "--overwrite"]) == 0
    assert [int(r["step"]) for r in csv.DictReader(open(out / "log.csv"))] == [2]  # the new run's rows only
    assert json.loads((out / "best/config.json").read_text())["training"]["step"] == 2
    assert main(["train", "--resume", str(out), "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    # A resume into another folder must not replace a run there either.
    shutil.copytree(out, tmp_path / "other")
    assert main(["train", "--resume", str(out), "--out", str(tmp_path / "other"), "--steps", "3"]) == 2
    assert "other already holds a run" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--set", 'train.ema="false"']) == 2
    assert "invalid saved run config: train.ema must be true or false, got 'false'" in capsys.readouterr().err


def test_a_failed_save_keeps_the_previous_last_complete_and_resumable(tmp_path):
    run = make_run("tiny-d_ma-bc", 4, checkpoint_every=2)
    trainer = Trainer(run, build_datasets(EPISODES, run), tmp_path, progress=False)
    trainer.fit()
    before = {p.name: p.read_bytes() for p in (tmp_path / "last").iterdir()}
    assert sorted(before) == ["config.json", "model.safetensors", "trainer.json", "trainer_state.safetensors"]
    # trainer.json refuses a NaN: the resume state fails half-written (trainer_state.safetensors done) at step 6.
    trainer.best_val_loss = float("nan")
    trainer.total_steps = 6
    with pytest.raises(ValueError, match="not JSON compliant"):
        trainer.fit()
    assert {p.name: p.read_bytes() for p in (tmp_path / "last").iterdir()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    resumed = Trainer(run, build_datasets(EPISODES, run), tmp_path, progress=False)
    resumed.load_state(tmp_path)
    assert resumed.step == 4


@pytest.mark.parametrize("weights,what", [("policy", "loss nan"), ("ema", "validation loss nan")])
def test_divergence_stops_the_run_and_keeps_the_checkpoints(tmp_path, weights, what):
    run = make_run("tiny-d_ma-bc", 8, ema=True, val_every=2, log_every=2, checkpoint_every=1)

    def poison(trainer, step, metrics):  # what a too-high learning rate does after a while
        if step == 3:
            model = trainer.policy if weights == "policy" else trainer.ema.model
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    trainer = Trainer(run, build_datasets(EPISODES, run), tmp_path, callbacks=[poison], progress=False)
    with pytest.raises(TrainError, match=f"training diverged at step 4: {what}; nothing was saved"):
        trainer.fit()
    for name, step in (("last", 3), ("best", 2)):
        assert json.loads((tmp_path / name / "config.json").read_text())["training"]["step"] == step
        load_checkpoint(tmp_path / name)
    resumed = Trainer(run, build_datasets(EPISODES, run), tmp_path, progress=False)
    resumed.load_state(tmp_path)
    assert resumed.step == 3


def test_resume_refuses_other_data(tmp_path):
    run = make_run("tiny-d_ma-bc", 2)
    demos = write_demos(tmp_path / "demos.hdf5", EPISODES)
    Trainer(run, build_datasets(EPISODES, run), tmp_path / "run", data_files=[demos], progress=False).fit()
    others = [block_episode(x0) for x0 in np.random.default_rng(1).uniform(0.3, 0.9, 8)]
    other = write_demos(tmp_path / "other.hdf5", others)  # same count and sizes, another task
    trainer = Trainer(run, build_datasets(others, run), tmp_path / "run", data_files=[other], progress=False)
    with pytest.raises(TrainError, match=r"the demo data differ from the run's \(.*other.hdf5 is not .*demos.hdf5"):
        trainer.load_state(tmp_path / "run")
    both = Trainer(run, build_datasets(EPISODES + others, run), tmp_path / "run", data_files=[demos, other], progress=False)
    with pytest.raises(TrainError, match=r"trained on 1 data file\(s\) .*demos.hdf5.*, got 2"):
        both.load_state(tmp_path / "run")
    moved = shutil.copy(demos, tmp_path / "moved.hdf5")  # the same data elsewhere is fine
    resumed = Trainer(run, build_datasets(EPISODES, run), tmp_path / "run", data_files=[moved], progress=False)
    resumed.load_state(tmp_path / "run")
    assert resumed.step == 2


def test_load_demos_refuses_other_action_spaces_and_repeated_files(tmp_path, caplog):
    policy = make_run("tiny-d_ma-bc", 1).policy
    write_demos(tmp_path / "ee.hdf5", EPISODES[:2], action_space="ee_delta")
    with pytest.raises(DataError, match=r"ee.hdf5: the actions are 'ee_delta' but the policy's are 'joint_position'"):
        load_demos([tmp_path / "ee.hdf5"], policy, {})
    # robomimic/LIBERO files declare none: taken on the strength of their action names and count.
    path = write_demos(tmp_path / "demos.hdf5", EPISODES[:2])
    with h5py.File(path, "a") as f:
        del f["data"].attrs["action_space"]
    with caplog.at_level(logging.WARNING):
        assert len(load_demos([path], policy, {})) == 2
    assert "does not declare its action space" in caplog.text
    (tmp_path / "link.hdf5").symlink_to(path)
    with pytest.raises(DataError, match=r"demos.hdf5 is given twice \(as .*demos.hdf5 and .*link.hdf5\)"):
        load_demos([path, tmp_path / "link.hdf5"], policy, {})


def test_short_episodes_are_dropped_before_the_split(caplog):
    spec = make_run("tiny-d_ma-bc", 1).policy.spec
    span = spec.observation.obs_horizon + spec.action.horizon - 1
    episodes = EPISODES + [block_episode(0.1, n=span - 1), block_episode(0.2, n=0)]
    for seed in range(6):  # before: some seeds put a short episode alone in validation and failed
        run = make_run("tiny-d_ma-bc", 1, seed=seed)
        with caplog.at_level(logging.WARNING):
            datasets = build_datasets(episodes, run)
        assert sorted(datasets.train_episodes + datasets.val_episodes) == list(range(8))
        assert len(datasets.val_episodes) == 2
    assert (f"dropping 2 episode(s) shorter than one window ({span} frames) before the split: "
            f"ep0.100 ({span - 1} frames), ep0.200 (0 frames)") in caplog.text
    with pytest.raises(DataError, match=f"no episode is long enough for one window of T \\+ A - 1 = {span} frames"):
        build_datasets(episodes[8:], run)
