"""scripts/policy_sync_rollout.py: the policy alone in closed loop on the simulated FR3, no ROS."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from mail_ros.train.icil_trainer import load_icil_run_config, train_icil

from icil_demos import write_demos

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("policy_sync_rollout", ROOT / "scripts" / "policy_sync_rollout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_mail_policy_picks_the_cube_without_ros(script, capsys):
    assert script.main(["--checkpoint", str(ROOT / "checkpoints" / "demo"), "--episodes", "1",
                        "pick up the red cube"]) == 0
    out = capsys.readouterr().out
    assert ": 1 of each chunk's 8 actions executed, then the next chunk" in out
    assert "pick up the red cube                 seed 100000: success" in out
    # At its lowest the hand was down at the red cube (its centre 2.25 cm above the table), not above
    # it or between cubes, and the policy closed the hand.
    lowest = re.search(r"hand at its lowest (-?[0-9.]+) cm above the table, red 0 cm, green [0-9]+ cm, blue [0-9]+ cm "
                       r"from the cubes; narrowest width predicted (-?[0-9.]+) cm; the red cube lifted at most "
                       r"([0-9.]+) cm; opened again before it was 2 cm up ([0-9]+) times \(([0-9]+) by a new chunk\)", out)
    assert lowest is not None, out
    assert 2.0 < float(lowest[1]) < 5.0 and float(lowest[2]) < 1.0
    assert float(lowest[3]) > 10.0  # a success: lifted past tasks.PICK_LIFT_HEIGHT
    assert lowest[4] == lowest[5] == "0"  # closed once, and kept closed while lifting
    assert out.rstrip().endswith("overall                              1/1")


def test_an_icil_policy_is_taught_by_its_prompt_file(script, tmp_path, capsys):
    tasks = {"pick up the red cube": 0, "pick up the green cube": 1}
    data = write_demos(tmp_path / "demos.hdf5", tasks, per_task=3)
    config = tmp_path / "tiny.yaml"
    config.write_text("preset: icil-tiny-ma\npolicy: {prompt.k_max: 2}\n"
                      f"data: {{feature_cache: {tmp_path / 'features'}, cut_stride: 2}}\n"
                      "train: {steps: 2, batch_size: 2, device: cpu}\n")
    train_icil(load_icil_run_config(config), [str(data)], tmp_path / "run")
    checkpoint = str(tmp_path / "run" / "last")
    assert script.main(["--checkpoint", checkpoint, "pick up the red cube"]) == 2
    assert "give --prompt-file" in capsys.readouterr().err
    assert script.main(["--checkpoint", checkpoint, "--prompt-file", str(data), "--k", "4",
                        "pick up the red cube"]) == 2
    assert "3 demonstrations of 'pick up the red cube', --prompt-skip 0 --prompt-k 4 needs 4" in capsys.readouterr().err
    assert script.main(["--checkpoint", checkpoint, "--prompt-file", str(data), "pick up the purple cube"]) == 2
    assert "unknown cube colour 'purple'" in capsys.readouterr().err
    assert script.main(["--checkpoint", checkpoint, "--prompt-file", str(data), "--execute", "5",
                        "pick up the red cube"]) == 2
    assert "--execute 5: a chunk holds 1 to 4 actions" in capsys.readouterr().err
    # By default as `mail-ros demo` executes an ICIL checkpoint's chunks: a chunk of 4 whole.
    assert script.main(["--checkpoint", checkpoint, "--prompt-file", str(data), "--k", "2", "--episodes", "1",
                        "--pick-steps", "3", "pick up the red cube"]) == 0
    assert ": 4 of each chunk's 4 actions executed, then the next chunk" in capsys.readouterr().out
    # Two steps of training do not pick a cube; the episode runs out its budget and is judged.
    assert script.main(["--checkpoint", checkpoint, "--prompt-file", str(data), "--k", "2", "--episodes", "1",
                        "--pick-steps", "5", "--execute", "2", "pick up the red cube"]) == 0
    out = capsys.readouterr().out
    assert "pick up the red cube                 seed 100000: fail (not grasped: " in out
    assert "after 5 steps" in out and out.rstrip().endswith("0/1")


def test_an_icil_policy_with_language_is_given_the_instruction_beside_its_prompt(script, tmp_path, capsys):
    data = write_demos(tmp_path / "demos.hdf5", {"pick up the red cube": 0, "pick up the green cube": 1}, per_task=2)
    config = tmp_path / "tiny.yaml"
    config.write_text("preset: icil-tiny-ma\n"
                      "policy: {prompt.k_max: 1, prompt.film: true, language.encoder: 'minilm:all-MiniLM-L6-v2', language.dim: 384}\n"
                      f"data: {{feature_cache: {tmp_path / 'features'}, embedding_cache: {tmp_path / 'embeddings'}, "
                      "cut_stride: 2}\ntrain: {steps: 2, batch_size: 2, device: cpu}\n")
    train_icil(load_icil_run_config(config), [str(data)], tmp_path / "run")
    # Without the instruction the policy refuses the prompt; the script gives it the instruction.
    assert script.main(["--checkpoint", str(tmp_path / "run" / "last"), "--prompt-file", str(data), "--k", "1",
                        "--episodes", "1", "--pick-steps", "3", "pick up the green cube"]) == 0
    out = capsys.readouterr().out
    assert "pick up the green cube               seed 100000: fail (not grasped: " in out
    assert "after 3 steps" in out and out.rstrip().endswith("0/1")
