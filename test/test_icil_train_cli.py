"""`mail-ros train` with an ICIL config: a tiny run on CPU through the CLI, the checkpoint it
writes reloads as an ICILPolicy, held-out tasks stay out, frame features are cached once."""

from pathlib import Path

import pytest
import torch
import yaml

from mail_ros.cli import main as cli_main
from mail_ros.policy.checkpoint import describe_checkpoint, load_checkpoint
from mail_ros.policy.icil_policy import ICILPolicy
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


def test_tiny_icil_run_through_the_cli_reloads(tmp_path, tiny_config, capsys):
    data = write_demos(tmp_path / "demos.hdf5", TASKS, per_task=3)
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(out), "--no-progress"]) == 0
    assert "held out ['pick up the blue cube']" in capsys.readouterr().out
    policy = load_checkpoint(out / "last")
    assert isinstance(policy, ICILPolicy) and policy.config.prompt.k_max == 2
    description = describe_checkpoint(out / "last")
    assert description.policy_type == "icil" and description.training["step"] == 3
    assert description.extra["held_out_tasks"] == ["pick up the blue cube"]
    assert description.extra["tasks"] == ["pick up the green cube", "pick up the red cube"]
    cached = sorted((tmp_path / "features").iterdir())
    assert len(cached) == 6  # one file per kept episode; the held-out task's are never encoded
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,chunks,seconds" and len(rows) == 4
    # A second run finds every feature cached, and an existing run is replaced only on request.
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    before = [p.stat().st_mtime_ns for p in cached]
    assert cli_main(["train", "--config", str(tiny_config), str(data), "--out", str(out), "--overwrite",
                     "--steps", "1"]) == 0
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "features").iterdir())] == before
    assert describe_checkpoint(out / "last").training["step"] == 1


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


def test_shipped_icil_config_reads():
    run = load_icil_run_config(ROOT / "config" / "train_icil_demo.yaml")
    assert run.preset == "icil-demo-ma" and run.policy.backbone.kind == "mamba"
    assert len(run.data.held_out_tasks) == 2 and run.policy.prompt.k_max == 4
    with pytest.raises(TrainError, match="unknown keys"):
        load_icil_run_config(ROOT / "config" / "train_icil_demo.yaml", {"data.heldout": []})


def test_testbed_script_refuses_bad_tasks_before_starting_anything(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("icil_testbed", ROOT / "scripts" / "icil_testbed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--checkpoint", "x", "--task", "pick up the blue cube"]) == 2
    assert "expects 'INSTRUCTION=DEMO[,DEMO...]'" in capsys.readouterr().err
    assert script.main(["--checkpoint", "x", "--task", "fly to the moon=a.hdf5"]) == 2
    assert "unrecognised instruction 'fly to the moon'" in capsys.readouterr().err
