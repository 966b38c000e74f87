"""`mail-ros train` with an ICIL config: a tiny run on CPU through the CLI, the checkpoint it
writes reloads as an ICILPolicy, held-out tasks stay out, frame features are cached once."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mail_ros.cli import main as cli_main
from mail_ros.data.icil_data import module_digest
from mail_ros.policy.checkpoint import describe_checkpoint, load_checkpoint, save_checkpoint
from mail_ros.policy.icil_policy import ICILPolicy
from mail_ros.policy.mail_policy import MaILPolicy
from mail_ros.policy.presets import get_preset
from mail_ros.train.icil_trainer import load_icil_run_config
from mail_ros.train.trainer import TrainError

from icil_demos import write_demos

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TASKS = {"pick up the red cube": 0, "pick up the green cube": 1, "pick up the blue cube": 2}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "icil_tiny.yaml"
    path.write_text(yaml.safe_dump({
        "preset": "icil-tiny-ma",
        "policy": {"prompt.k_max": 2},
        "data": {"held_out_tasks": ["pick up the blue cube"], "feature_cache": str(tmp_path / "features"),
                 "cut_stride": 2},
        "train": {"steps": 3, "batch_size": 2, "log_every": 1, "checkpoint_every": 2, "device": "cpu"},
    }))
    return path


@pytest.mark.parametrize("film", [False, True])
def test_tiny_icil_run_through_the_cli_reloads(tmp_path, tiny_config, capsys, film):
    data = write_demos(tmp_path / "demos.hdf5", TASKS, per_task=3)
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(out), "--no-progress",
                     "--set", f"policy.prompt.film={json.dumps(film)}"]) == 0
    assert "held out ['pick up the blue cube']" in capsys.readouterr().out
    policy = load_checkpoint(out / "last")
    assert isinstance(policy, ICILPolicy) and policy.config.prompt.k_max == 2 and policy.config.prompt.film == film
    if film:  # the prompt's FiLM layers and summary trained (from zero and from their init)
        assert any(p.any() for name, p in policy.encoder.named_parameters() if ".film." in name)
    description = describe_checkpoint(out / "last")
    assert description.policy_type == "icil" and description.training["step"] == 3
    assert description.extra["held_out_tasks"] == ["pick up the blue cube"]
    assert description.extra["tasks"] == ["pick up the green cube", "pick up the red cube"]
    cached = sorted((tmp_path / "features").iterdir())
    assert len(cached) == 6  # one file per kept episode; the held-out task's are never encoded
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,chunks,seconds" and len(rows) == 4
    # A second run finds every feature cached, and an existing run is replaced only on request.
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(out),
                     "--set", f"policy.prompt.film={json.dumps(film)}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    before = [p.stat().st_mtime_ns for p in cached]
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(out), "--overwrite",
                     "--steps", "1", "--set", f"policy.prompt.film={json.dumps(film)}"]) == 0
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "features").iterdir())] == before
    assert describe_checkpoint(out / "last").training["step"] == 1


def test_a_run_with_shifted_views_caches_and_trains_on_each(tmp_path, tiny_config):
    data = write_demos(tmp_path / "demos.hdf5", TASKS, per_task=3)
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(out), "--no-progress",
                     "--set", "policy.prompt.film=true", "--set", "data.augment_shift=2",
                     "--set", "data.shift_views=2"]) == 0
    assert len(list((tmp_path / "features").iterdir())) == 18  # 6 kept episodes x (unshifted + 2 views)
    assert describe_checkpoint(out / "last").training["step"] == 3
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["augment_shift"] == 2 and run["data"]["shift_views"] == 2
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(tmp_path / "bad"),
                     "--set", "data.augment_shift=-1"]) == 2


def test_bad_icil_runs_are_refused_with_one_line(tmp_path, tiny_config, capsys):
    data = write_demos(tmp_path / "demos.hdf5", TASKS, per_task=2)
    out = str(tmp_path / "run")
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", out,
                     "--set", 'data.held_out_tasks=["pick up the purple cube"]']) == 2
    assert "held-out tasks ['pick up the purple cube'] are not in the data" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", out, "--set", "train.lr=-1"]) == 2
    assert "train.lr must be positive" in capsys.readouterr().err
    small = write_demos(tmp_path / "small.hdf5", TASKS, per_task=2, size=(32, 32))
    assert cli_main(["train", "--config", str(tiny_config), str(small), "--out", out]) == 2
    assert "images are 32x32 but the policy expects 64x64" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last").exists()


def test_a_run_takes_over_a_mail_checkpoints_encoders(tmp_path, tiny_config, capsys):
    torch.manual_seed(1)
    mail = MaILPolicy(get_preset("tiny-d_ma-bc", {"vision.film": True, "language.encoder": "clip-test",
                                                  "language.dim": 8}))
    mail.set_normalization({"mean": np.zeros(8), "std": np.ones(8), "min": -np.ones(8), "max": np.ones(8)},
                           language_stats={"mean": np.zeros(8), "std": np.ones(8), "min": -np.ones(8),
                                           "max": np.ones(8)})
    with torch.no_grad():
        mail.encoder.encoders["agentview"].film.bias.normal_(0.0, 0.5)
    save_checkpoint(tmp_path / "mail", mail)
    data = write_demos(tmp_path / "demos.hdf5", TASKS, per_task=3)
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(out), "--no-progress",
                     "--set", f"train.encoder_from={tmp_path / 'mail'}"]) == 0
    trained = load_checkpoint(out / "last")
    expected = ICILPolicy(trained.config)
    expected.load_encoder_from(load_checkpoint(tmp_path / "mail"))
    frozen = [nn.ModuleList(policy.feature_modules()) for policy in (trained, expected)]
    assert module_digest(frozen[0]) == module_digest(frozen[1])  # trunks and keypoints frozen while training
    assert not torch.equal(trained.encoder.proj.weight, expected.encoder.proj.weight)  # the projections train
    assert describe_checkpoint(out / "last").extra["encoder_from"] == str(tmp_path / "mail")
    capsys.readouterr()
    # A run of other settings from that ICIL run's encoders (the MaIL checkpoint may be long gone);
    # encoders of another layout are refused by name and nothing is written.
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(tmp_path / "again"),
                     "--no-progress", "--set", f"train.encoder_from={out / 'last'}", "--set", "policy.proprio=false",
                     "--set", "train.steps=1"]) == 0
    again = load_checkpoint(tmp_path / "again" / "last")
    assert not again.config.proprio and module_digest(nn.ModuleList(again.feature_modules())) == module_digest(frozen[0])
    capsys.readouterr()
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(tmp_path / "other"),
                     "--set", f"train.encoder_from={out / 'last'}", "--set", "policy.vision.num_keypoints=4"]) == 2
    assert "the ICIL policy's image encoders do not fit this ICIL policy: vision.num_keypoints" in capsys.readouterr().err
    assert not (tmp_path / "other" / "last").exists()


def test_a_fine_tune_starts_from_an_icil_checkpoint_and_may_add_joints(tmp_path, tiny_config, capsys):
    data = write_demos(tmp_path / "demos.hdf5", TASKS, per_task=3)
    source = tmp_path / "run"
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(source), "--no-progress",
                     "--set", "policy.proprio=false"]) == 0
    out = tmp_path / "tuned"
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(out), "--no-progress",
                     "--set", f"train.init_from={source / 'last'}", "--set", "train.steps=1",
                     "--set", "train.lr=1e-4"]) == 0
    before, after = load_checkpoint(source / "last"), load_checkpoint(out / "last")
    assert after.config.proprio and describe_checkpoint(out / "last").extra["init_from"] == str(source / "last")
    # Adam's first step moves each weight by lr at most: the run started at the checkpoint's weights
    # (the joint projection at zero) and statistics.
    theirs = before.state_dict()
    for name, value in after.state_dict().items():
        start = theirs.get(name, torch.zeros_like(value))
        assert torch.all((value - start).abs() <= 1.01e-4), name
    capsys.readouterr()
    # A MaIL checkpoint, or both settings at once, are refused and nothing is written.
    mail = MaILPolicy(get_preset("tiny-d_ma-bc"))
    save_checkpoint(tmp_path / "mail", mail)
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(tmp_path / "no"),
                     "--set", f"train.init_from={tmp_path / 'mail'}"]) == 2
    assert "a MaILPolicy checkpoint, not an ICIL one" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(tmp_path / "no"),
                     "--set", f"train.init_from={source / 'last'}",
                     "--set", f"train.encoder_from={source / 'last'}"]) == 2
    assert "train.encoder_from and train.init_from are both set" in capsys.readouterr().err
    assert not (tmp_path / "no" / "last").exists()


def test_shipped_icil_config_reads():
    run = load_icil_run_config(ROOT / "config" / "train_icil_demo.yaml")
    assert run.preset == "icil-demo-ma" and run.policy.backbone.kind == "mamba"
    assert len(run.data.held_out_tasks) == 2 and run.policy.prompt.k_max == 4
    with pytest.raises(TrainError, match="unknown keys"):
        load_icil_run_config(ROOT / "config" / "train_icil_demo.yaml", {"data.heldout": []})


@pytest.mark.parametrize("ema, schedule", [(False, "constant"), (True, "constant"), (True, "cosine")])
def test_an_interrupted_icil_run_resumes_into_the_uninterrupted_one(tmp_path, tiny_config, capsys, ema, schedule):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mail_ros.train.icil_trainer import train_icil
    from mail_ros.train.trainer import learning_rate

    data = str(write_demos(tmp_path / "demos.hdf5", TASKS, per_task=3))
    run = load_icil_run_config(tiny_config, {"train.steps": 5, "train.checkpoint_every": 2, "train.ema": ema,
                                             "train.lr_schedule": schedule, "train.warmup_steps": 1})
    straight = train_icil(run, [data], tmp_path / "a")
    assert not straight.interrupted and straight.step == 5

    def terminate_at_3(step, info):  # SIGTERM stops like Ctrl-C (what a background run gets)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    stopped = train_icil(run, [data], tmp_path / "b", callbacks=[terminate_at_3])
    assert stopped.interrupted and stopped.step == 3
    assert signal.getsignal(signal.SIGTERM) is before
    assert describe_checkpoint(tmp_path / "b/last").training["step"] == 3  # saved at the completed step
    # A kill after step 4 was logged but before its checkpoint: that row is logged again, once.
    with open(tmp_path / "b/log.csv", "a") as stream:
        stream.write("4,0.5,8,1.0\n")
    assert cli_main(["train", "--resume", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "finished ICIL icil-tiny-ma at step 5" in capsys.readouterr().out
    assert load_file(str(tmp_path / "b/last/model.safetensors")).keys() == load_file(
        str(tmp_path / "a/last/model.safetensors")).keys()
    for name in ("model.safetensors", "trainer_state.safetensors"):  # weights and Adam state, bit for bit
        torch.testing.assert_close(load_file(str(tmp_path / "b/last" / name)), load_file(str(tmp_path / "a/last" / name)),
                                   rtol=0, atol=0)

    def losses(folder):
        return [row.split(",")[:3] for row in (folder / "log.csv").read_text().splitlines()]

    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 6
    groups = json.loads(safe_open(str(tmp_path / "a/last/trainer_state.safetensors"), "pt").metadata()["param_groups"])
    assert groups[0]["lr"] == learning_rate(4, 5, run.train.lr, schedule, 1)  # the last step's
    if schedule == "cosine":  # the schedule is laid over the budget: it cannot grow
        assert cli_main(["train", "--resume", str(tmp_path / "b"), "--steps", "6"]) == 2
        assert "this run's train.steps differ" in capsys.readouterr().err
        return
    # Extending the budget continues from step 5.
    assert cli_main(["train", "--resume", str(tmp_path / "b"), "--steps", "6"]) == 0
    assert describe_checkpoint(tmp_path / "b/last").training["step"] == 6


def test_an_icil_run_with_ema_checkpoints_the_average_of_the_same_training(tmp_path, tiny_config):
    from safetensors.torch import load_file

    from mail_ros.train.icil_trainer import train_icil

    data = str(write_demos(tmp_path / "demos.hdf5", TASKS, per_task=3))
    plain = load_icil_run_config(tiny_config, {"train.steps": 4})
    train_icil(plain, [data], tmp_path / "plain")
    train_icil(load_icil_run_config(tiny_config, {"train.steps": 4, "train.ema": True, "train.ema_decay": 0.5}),
               [data], tmp_path / "ema")
    raw = {run: load_file(str(tmp_path / run / "last/trainer_state.safetensors")) for run in ("plain", "ema")}
    model = {run: load_file(str(tmp_path / run / "last/model.safetensors")) for run in ("plain", "ema")}
    weights = {k: v for k, v in raw["plain"].items() if k.startswith("model.")}
    # The average rides beside the training and does not change it.
    torch.testing.assert_close({k: v for k, v in raw["ema"].items() if k.startswith("model.")}, weights, rtol=0, atol=0)
    torch.testing.assert_close(model["plain"], {k.removeprefix("model."): v for k, v in weights.items()}, rtol=0, atol=0)
    # What ships is the average: the trained layers differ from the last weights, the frozen ones do not.
    policy = ICILPolicy(plain.policy)
    policy.freeze_features()
    trained = {name for name, p in policy.named_parameters() if p.requires_grad}
    moved = {k for k in model["ema"] if not torch.equal(model["ema"][k], model["plain"][k])}
    assert moved and moved <= trained
    extra = {run: describe_checkpoint(tmp_path / run / "last").extra for run in ("plain", "ema")}
    assert (extra["ema"]["ema"], extra["ema"]["ema_decay"]) == (True, 0.5)
    assert extra["plain"]["ema"] is False and "ema_decay" not in extra["plain"]


def test_an_icil_resume_that_would_change_the_run_is_refused(tmp_path, tiny_config, capsys):
    data = write_demos(tmp_path / "demos.hdf5", TASKS, per_task=3)
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(out), "--steps", "2"]) == 0
    capsys.readouterr()
    refusals = [
        (["--set", "policy.prompt.k_max=3"], "--resume accepts train.* overrides only"),
        (["--set", "train.lr=0.01"], "this run's train.lr differ from the saved run's"),
        (["--out", str(tmp_path / "elsewhere")], "an ICIL run is resumed in place"),
        ([str(write_demos(tmp_path / "other.hdf5", TASKS, per_task=3, seed=7))], "the demo data differ"),
    ]
    for extra, message in refusals:
        assert cli_main(["train", "--resume", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
    assert describe_checkpoint(out / "last").training["step"] == 2  # untouched
    (out / "last" / "trainer_state.safetensors").unlink()  # e.g. a checkpoint from before resumable ICIL runs
    assert cli_main(["train", "--resume", str(out)]) == 2
    assert "holds no resumable state" in capsys.readouterr().err


def test_prompt_check_tells_a_policy_that_uses_its_prompt(tmp_path, capsys):
    # In these demonstrations only the prompt tells the tasks apart (icil_demos): a policy trained
    # on them does better with its own task's prompt than with another's, and the script says so.
    import importlib.util

    config = tmp_path / "icil_prompted.yaml"
    config.write_text(yaml.safe_dump({
        "preset": "icil-tiny-ma",
        "policy": {"prompt.k_max": 2},
        "data": {"feature_cache": str(tmp_path / "features"), "cut_stride": 2},
        "train": {"steps": 150, "batch_size": 4, "lr": 3.0e-3, "log_every": 150, "checkpoint_every": 150,
                  "device": "cpu"},
    }))
    data = write_demos(tmp_path / "demos.hdf5", TASKS, per_task=3)
    assert cli_main(["train", "--config", str(config), str(data), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    spec = importlib.util.spec_from_file_location("icil_prompt_check", ROOT / "scripts" / "icil_prompt_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    capsys.readouterr()
    assert script.main(["--checkpoint", str(tmp_path / "run" / "last"), str(data), "--k", "2", "--live", "1"]) == 0
    rows = {line[:40].strip(): [float(v) for v in line[40:].split()]
            for line in capsys.readouterr().out.splitlines()[1:]}
    assert sorted(rows) == sorted(TASKS)
    for task, (own, other, _none) in rows.items():
        assert own < 0.9 * other, (task, own, other)
    own, other, _ = np.mean(list(rows.values()), axis=0)
    assert own < 0.8 * other, rows
    # Not an ICIL checkpoint: refused.
    assert script.main(["--checkpoint", str(ROOT / "checkpoints" / "demo"), str(data)]) == 2
