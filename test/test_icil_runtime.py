"""The ICIL runtime core: prompts read from demo files and bags with the training data's
contract check, and ICILRunner (PolicyRunner's rules with the prompt as part of the goal)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mail_ros.data.hdf5 import DataError
from mail_ros.data.prompts import read_prompt
from mail_ros.policy.icil_policy import ICILPolicy
from mail_ros.policy.icil_runner import ICILRunner, PromptError, prompt_goal
from mail_ros.policy.normalizer import Normalizer
from mail_ros.policy.presets import get_icil_preset
from mail_ros.policy.runner import Goal, RunnerSettings
from mail_ros.spec import FR3_HOME, Observation

from icil_demos import task_target, write_demos

torch.set_num_threads(1)
TASKS = {"pick up the red cube": 0, "pick up the green cube": 1}
NS = 1_000_000_000


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    return write_demos(tmp_path_factory.mktemp("demos") / "demos.hdf5", TASKS, per_task=2, n=6)


def _policy(preset="icil-tiny-ma", overrides=None) -> ICILPolicy:
    torch.manual_seed(0)
    policy = ICILPolicy(get_icil_preset(preset, overrides)).eval()
    policy.set_normalization(Normalizer.stats_from_data(np.stack([task_target(i) for i in range(3)])),
                             Normalizer.stats_from_data(np.array([FR3_HOME + (0.04, 0.04)] * 2) + [[0.0], [0.1]]))
    return policy


def _observation(policy: ICILPolicy, t: float, seed: int = 0) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(round(t * NS), {c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in policy.cameras},
                       np.array(FR3_HOME + (0.04, 0.04)))


def test_prompt_paths_name_files_groups_and_keep_order(demos):
    config = get_icil_preset("icil-tiny-ma")
    whole = read_prompt([str(demos)], config)
    assert [d.label for d in whole] == [f"{demos}:demo_{i}" for i in range(4)]
    assert [d.instruction for d in whole] == ["pick up the red cube"] * 2 + ["pick up the green cube"] * 2
    picked = read_prompt([f"{demos}:demo_3", f"{demos}:/data/demo_0", f"{demos}:data/demo_1"], config)
    assert [d.label.rsplit(":", 1)[1] for d in picked] == ["demo_3", "demo_0", "demo_1"]
    demo = picked[0].demonstration
    assert len(demo.observations) == 6 and demo.actions.shape == (6, 8)
    assert [o.stamp for o in demo.observations] == [i * NS // 10 for i in range(6)]
    np.testing.assert_allclose(demo.actions.mean(0), task_target(1), atol=0.01)


@pytest.mark.parametrize("case,message", [
    ("missing group", r"no episode group 'demo_9'; the file has \['demo_0', 'demo_1', 'demo_2', 'demo_3'\]"),
    ("missing file", r"nowhere.hdf5: no such file"),
    ("not a prompt", r"not an HDF5 demo file"),
    ("image size", r"images are 32x32 but the policy expects 64x64"),
    ("joint names", r"joint names \['a0', .* differ from the policy's"),
    ("rate", r"recorded at 20.0 Hz but the policy runs at 10.0 Hz"),
])
def test_prompts_that_break_the_contract_are_refused(demos, tmp_path, case, message):
    config = get_icil_preset("icil-tiny-ma")
    path = {
        "missing group": f"{demos}:demo_9",
        "missing file": str(tmp_path / "nowhere.hdf5"),
        "not a prompt": str(tmp_path / "notes.txt"),
        "image size": lambda: write_demos(tmp_path / "small.hdf5", TASKS, 1, size=(32, 32)),
        "joint names": lambda: write_demos(tmp_path / "names.hdf5", TASKS, 1, joint_names=[f"a{i}" for i in range(9)]),
        "rate": lambda: write_demos(tmp_path / "rate.hdf5", TASKS, 1, rate_hz=20.0),
    }[case]
    path = str(path()) if callable(path) else path
    with pytest.raises(DataError, match=message):
        read_prompt([path], config)


def test_bag_folders_are_read_like_mail_ros_convert(tmp_path):
    from bag_factory import DemoBag, write_demo_bag

    write_demo_bag(tmp_path / "bag", DemoBag())
    config = get_icil_preset("icil-tiny-ma")
    (prompt,) = read_prompt([str(tmp_path / "bag")], config)
    assert prompt.label == f"{tmp_path / 'bag'}#0" and len(prompt.demonstration.observations) >= 20
    assert prompt.demonstration.observations[0].images["wrist"].shape == (64, 64, 3)


def test_no_chunk_without_a_prompt_then_the_prompt_is_the_goal(demos):
    policy = _policy()
    runner = ICILRunner(policy, RunnerSettings(max_observation_age=1e9))
    runner.warm_up()
    runner.set_goal(Goal("pick up the red cube", stamp=1))  # an instruction alone does not make chunks
    assert runner.observe(_observation(policy, 1.0), 1 * NS).used and not runner.ready
    prompt = runner.load_prompt([f"{demos}:demo_0", f"{demos}:demo_1"])
    assert (prompt.k, prompt.frames) == (2, 12)  # dilation 1: 2 x 6 frames
    goal = prompt_goal(prompt, 5 * NS)
    assert goal.text == "pick up the red cube" and goal.stamp == 5 * NS  # the demonstrations' instruction
    runner.use_prompt(prompt, goal)
    assert runner.goal.stamp == 5 * NS and not runner.ready  # a new episode: the old observation is gone
    # The chunk is the policy's own with that prompt, from the live observations since.
    reference = _policy()
    reference.set_prompt([d.demonstration for d in read_prompt(
        [f"{demos}:demo_0", f"{demos}:demo_1"], reference.config)])
    for step in range(3):
        observation = _observation(policy, 6.0 + 0.1 * step, seed=step)
        runner.observe(observation, observation.stamp)
        request = runner.take()
        chunk, why = runner.finish(request, runner.predict(request))
        assert why == "" and (chunk.goal.text, chunk.goal.stamp) == (goal.text, goal.stamp)
        np.testing.assert_allclose(chunk.actions, reference.predict_chunk(observation), rtol=1e-5, atol=1e-6)
    # Our own announcement of the goal coming back is not a new episode; another goal is.
    runner.set_goal(Goal(goal.text, stamp=goal.stamp))
    assert runner.history.window()
    runner.set_goal(Goal("pick up the red cube", stamp=9 * NS))
    assert not runner.history.window() and runner.prompt is prompt
    runner.clear_prompt()
    runner.observe(_observation(policy, 10.0), 10 * NS)
    assert not runner.ready


def test_a_refused_prompt_keeps_the_previous_one_and_its_episode(demos, tmp_path):
    policy = _policy()
    runner = ICILRunner(policy, RunnerSettings(max_observation_age=1e9))
    first = runner.load_prompt([str(demos)])
    runner.use_prompt(first, prompt_goal(first, NS))
    assert first.k == 4 and prompt_goal(first, NS).text.startswith(f"prompt: {demos}:demo_0, ")
    runner.observe(_observation(policy, 2.0), 2 * NS)
    request = runner.take()
    before = runner.predict(request)
    small = write_demos(tmp_path / "small.hdf5", TASKS, 1, size=(32, 32))
    for paths, message in (([str(small)], "images are 32x32"), ([], "no demonstrations given"),
                           ([f"{demos}:demo_0", f"{demos}:demo_7"], "no episode group 'demo_7'")):
        with pytest.raises(PromptError, match=message):
            runner.load_prompt(paths)
    assert runner.prompt is first and runner.goal.stamp == NS and policy.prompt_info == first.info
    # The episode went on: the next chunk continues the same stream.
    observation = _observation(policy, 2.1, seed=1)
    runner.observe(observation, observation.stamp)
    after = runner.predict(runner.take())
    assert after.shape == before.shape and policy.stream_state.length == first.info.tokens + 2


def test_a_chunk_computed_across_a_prompt_swap_is_dropped(demos):
    policy = _policy()
    runner = ICILRunner(policy, RunnerSettings(max_observation_age=1e9))
    first = runner.load_prompt([f"{demos}:demo_0"])
    runner.use_prompt(first, prompt_goal(first, NS))
    runner.observe(_observation(policy, 2.0), 2 * NS)
    request = runner.take()
    actions = runner.predict(request)
    second = runner.load_prompt([f"{demos}:demo_2"])
    runner.use_prompt(second, prompt_goal(second, 3 * NS))
    assert runner.finish(request, actions) == (None, "goal_changed")


def test_icil_with_language_is_refused_by_the_runtime():
    with pytest.raises(ValueError, match="prompt-only"):
        ICILRunner(_policy(overrides={"language.encoder": "hash:test", "language.dim": 4}))


def test_the_shipped_icil_checkpoint_takes_a_converted_prompt_and_acts(demos):
    """checkpoints/icil_demo (the README's teach-a-new-task example) is a prompt-only ICIL policy
    that never saw the config's held-out tasks and acts on demonstrations in the converter's format."""
    import yaml

    from mail_ros.policy.checkpoint import describe_checkpoint, load_checkpoint
    from mail_ros.control.limits import FR3_POSITION_MAX, FR3_POSITION_MIN
    from mail_ros.resources import icil_demo_checkpoint

    description = describe_checkpoint(icil_demo_checkpoint())
    held_out = yaml.safe_load((Path(__file__).parents[1] / "config" / "train_icil_demo.yaml").read_text())
    assert description.policy_type == "icil" and description.config.language.encoder is None
    assert description.extra["held_out_tasks"] == held_out["data"]["held_out_tasks"]
    policy = load_checkpoint(icil_demo_checkpoint()).eval()
    runner = ICILRunner(policy, RunnerSettings(max_observation_age=1e9))
    prompt = runner.load_prompt([str(demos)])
    runner.use_prompt(prompt, prompt_goal(prompt, NS))
    chunk = None
    for step in range(policy.config.spec.observation.obs_horizon):
        observation = _observation(policy, 2.0 + 0.1 * step, seed=step)
        runner.observe(observation, observation.stamp)
        request = runner.take()
        chunk, why = runner.finish(request, runner.predict(request))
        assert why == ""
    arm = chunk.actions[:, :7]
    assert np.isfinite(chunk.actions).all()
    assert (arm >= np.array(FR3_POSITION_MIN)).all() and (arm <= np.array(FR3_POSITION_MAX)).all()
