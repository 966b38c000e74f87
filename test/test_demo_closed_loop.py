"""`mail-ros demo` closed loop: the shipped checkpoint drives franka_sim_node through camera_sync,
language, policy and executor nodes over DDS on simulated time; one episode ends and is judged.
An ICIL checkpoint is taught each task by a prompt (``--prompt``) through policy_node's service."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mail_ros.cli import main as cli_main
from mail_ros.commands.demo import PARAPHRASES, prompts_from_file
from mail_ros.resources import demo_checkpoint
from mail_ros.sim.collect import CollectError, schedule
from mail_ros.sim.tasks import Task

from icil_demos import write_demos

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def icil_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("icil_demo")
    assert cli_main(["checkpoint", "init", "--preset", "icil-tiny-ma", "--out", str(root / "icil")]) == 0
    write_demos(root / "demos.hdf5", {"pick up the red cube": 0, "pick up the green cube": 1}, per_task=2, n=6)
    return root


def test_cli_refuses_a_missing_checkpoint_and_unknown_instructions(tmp_path):
    for extra, message in ((["--checkpoint", str(tmp_path)], "config.json missing"),
                           (["--instructions", "juggle"], "unrecognised instruction")):
        result = subprocess.run([sys.executable, "-m", "mail_ros.cli", "demo", *extra],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_cli_refuses_bad_prompts_before_starting_anything(icil_files, capsys):
    icil, demos = str(icil_files / "icil"), str(icil_files / "demos.hdf5")
    mail = str(demo_checkpoint())
    for argv, message in (
            (["--checkpoint", icil, "--prompt", "pick up the blue cube"], "expects 'INSTRUCTION=DEMO[,DEMO...]'"),
            (["--checkpoint", icil, "--prompt", f"fly to the moon={demos}"], "unrecognised instruction 'fly to the moon'"),
            (["--checkpoint", icil, "--prompt", f"pick up the red cube={demos}", "--prompt",
              f"pick up the red cube={demos}"], "'pick up the red cube' is taught twice"),
            (["--checkpoint", icil, "--prompt", f"pick up the red cube={demos}", "--instructions",
              "pick up the red cube"], "not with --instructions"),
            (["--checkpoint", icil], "is an ICIL checkpoint: teach each task with --prompt"),
            (["--checkpoint", mail, "--prompt", f"pick up the red cube={demos}"],
             "--prompt/--prompt-file need an ICIL checkpoint"),
            (["--checkpoint", mail, "--prompt-file", demos, "--prompt-k", "1", "--instructions", "pick up the red cube"],
             "need an ICIL checkpoint"),
            # Without --checkpoint a prompt runs the shipped ICIL policy: past its checks to the next one.
            (["--prompt", f"pick up the red cube={demos}", "--record", str(icil_files)], "already exists"),
            (["--checkpoint", icil, "--prompt-file", demos, "--prompt", f"pick up the red cube={demos}"],
             "not with --instructions, --paraphrases or --prompt-file"),
            (["--checkpoint", icil, "--prompt-file", demos, "--paraphrases"], "not with --paraphrases"),
            (["--checkpoint", icil, "--prompt-file", demos, "--prompt-k", "1"], "0 demonstrations of 'pick up the blue cube'"),
            (["--checkpoint", icil, "--prompt-file", str(icil_files / "none.hdf5")], "none.hdf5: no such file")):
        assert cli_main(["demo", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_prompt_file_teaches_each_task_by_its_own_demonstrations(icil_files):
    demos = icil_files / "demos.hdf5"  # demo_0, demo_1: red pick; demo_2, demo_3: green pick
    red, green = Task("pick", "red"), Task("pick", "green")
    prompts = prompts_from_file(demos, [green, red], k=1, skip=1)
    assert list(prompts) == [green.instruction, red.instruction]  # the tasks' order
    assert prompts[green.instruction] == (green, [f"{demos.resolve()}:demo_3"])
    assert prompts[red.instruction] == (red, [f"{demos.resolve()}:demo_1"])
    assert prompts_from_file(demos, [red], k=2, skip=0)[red.instruction][1] == [
        f"{demos.resolve()}:demo_0", f"{demos.resolve()}:demo_1"]
    for k, skip, message in ((2, 1, "2 demonstrations of 'pick up the red cube', --prompt-skip 1 --prompt-k 2 needs 3"),
                             (0, 0, "--prompt-k must be >= 1")):
        with pytest.raises(CollectError, match=message):
            prompts_from_file(demos, [red], k=k, skip=skip)


def test_paraphrases_mean_test_bed_tasks():
    assert len({text for text, _ in PARAPHRASES}) == len(PARAPHRASES)
    assert all(text != task.instruction for text, task in PARAPHRASES)


@pytest.mark.slow
def test_shipped_checkpoint_commands_the_sim_and_the_episode_ends():
    from mail_ros.nodes.demo_graph import DemoGraph

    assert (demo_checkpoint() / "config.json").is_file(), "checkpoints/demo is not in the repository"
    (spec,) = schedule([("lift the red block", Task("pick", "red"))], 1)
    with DemoGraph(demo_checkpoint(), seed=123, real_time_factor=1.0) as graph:
        _, home, _ = graph.session.sim.sim.joint_state()
        outcome, trace = graph.run_episode(spec, budget=3.0)
        _, moved, _ = graph.session.sim.sim.joint_state()
        graph.session.check()
    # The episode ended (success or the budget), judged as the paraphrase's task via ~/task.
    assert outcome.success or outcome.seconds >= 3.0
    assert outcome.progress is not None and outcome.progress.success == outcome.success
    # Judged once per JUDGE_PERIOD through a service call; at a real-time factor of 1 a busy machine
    # stretches that round trip to seconds of simulated time (4.5 s seen in a loaded fresh clone).
    assert outcome.seconds < 3.0 + 10.0
    assert len(trace.inference) > 0 and all(t > 0 for t in trace.inference)
    assert trace.commands > 0
    assert np.abs(moved[:7] - home[:7]).max() > 1e-3


@pytest.mark.slow
def test_an_icil_checkpoint_is_taught_each_task_by_prompt(icil_files, capsys):
    icil, demos = str(icil_files / "icil"), str(icil_files / "demos.hdf5")
    argv = ["demo", "--checkpoint", icil, "--prompt", f"pick up the red cube={demos}",
            "--prompt", f"pick up the green cube={demos}:demo_1", "--episodes", "2", "--pick-seconds", "1.0",
            "--real-time-factor", "1.0"]
    assert cli_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    # The default for ICIL checkpoints: the first 8 actions of each chunk (here all of a chunk of 4).
    assert "executor mode receding_horizon (at most 8 actions of each chunk)" in lines[0], lines[0]
    prompts = [line for line in lines if line.startswith("prompt for ")]
    # One prompt per task, set before its episodes, which keep the layouts (indices) of the plain demo.
    assert len(prompts) == 2 and "K=4" in prompts[0] and "K=1" in prompts[1], prompts
    episodes = [line for line in lines if line.startswith("episode ")]
    assert [int(line.split()[1]) for line in episodes] == [0, 2, 1, 3]
    assert all("'pick up the red cube'" in line for line in episodes[:2])
    assert lines.index(prompts[1]) > lines.index(episodes[1]) and lines.index(prompts[1]) < lines.index(episodes[2])
    assert any(line.startswith("instruction (taught by prompt)") for line in lines)
