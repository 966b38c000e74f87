"""Scripted expert: seeded episodes of both skills succeed, phases end on convergence, IK is sane."""

import numpy as np
import pytest

from mail_ros.sim.expert import (
    ExpertConfig,
    ExpertError,
    ScriptedExpert,
    observe,
    run_episode,
)
from mail_ros.sim.franka_sim import FR3_LIMITS, FrankaSim
from mail_ros.sim.tasks import Task
from mail_ros.spec import FR3_ARM_JOINTS


@pytest.fixture(scope="module")
def bed():
    sim = FrankaSim()
    yield sim, ScriptedExpert(model=sim.model)
    sim.close()


@pytest.mark.parametrize(
    "instruction, seed",
    [
        ("pick up the red cube", 101),
        ("pick up the green cube", 102),
        ("pick up the blue cube", 103),
        ("put the red cube on the green cube", 104),
        ("put the blue cube on the red cube", 105),
        ("put the green cube on the blue cube", 106),
    ],
)
def test_expert_succeeds_on_seeded_episodes(bed, instruction, seed):
    sim, expert = bed
    task = Task.parse(instruction)
    result = run_episode(sim, expert, task, seed)
    assert expert.done and result.success, f"{instruction} (seed {seed}) ended in phase {expert.phase}"
    assert result.actions.shape == (result.steps, 8) and result.joint_positions.shape == (result.steps, 9)
    arm = result.actions[:, :7]
    assert np.all(arm >= FR3_LIMITS.position_min) and np.all(arm <= FR3_LIMITS.position_max)
    assert set(np.unique(result.actions[:, 7])) <= {0.0, 0.08}
    if task.skill == "pick":
        others = [c for c in ("red", "green", "blue") if c != task.cube]
        assert all(sim.cube_poses()[c].position[2] < 0.03 for c in others)


def test_episode_is_deterministic_and_noise_only_changes_execution(bed):
    sim, expert = bed
    task = Task("pick", "blue")
    a = run_episode(sim, expert, task, 7)
    b = run_episode(sim, expert, task, 7)
    np.testing.assert_array_equal(a.actions, b.actions)
    noisy_expert = ScriptedExpert(ExpertConfig(noise_std=0.01), model=sim.model)
    noisy = run_episode(sim, noisy_expert, task, 7)
    assert noisy.success
    assert noisy.actions.shape != a.actions.shape or not np.array_equal(noisy.actions, a.actions)
    # The noise perturbs what is executed, within the limits, and never what is recorded.
    sim.reset(7)
    obs = observe(sim)
    noisy_expert.reset(task, obs, np.random.default_rng(0))
    action = noisy_expert.act(obs)
    offset = action.executed_arm - action.arm
    assert 0.0 < np.abs(offset).max() < 0.06
    assert np.all(action.executed_arm >= FR3_LIMITS.position_min)
    assert np.all(action.executed_arm <= FR3_LIMITS.position_max)


def test_close_starts_once_in_place_and_lift_waits_for_the_fingers(bed):
    sim, expert = bed
    task = Task("pick", "red")
    sim.reset(21)
    obs = observe(sim)
    expert.reset(task, obs)
    phases = []
    for _ in range(200):
        arm, width, _ = expert.act(obs)
        phases.append((expert.phase, width, obs.gripper_width))
        sim.set_trajectory(FR3_ARM_JOINTS, [(0.1, arm)])
        sim.set_gripper(width)
        sim.step(0.1)
        obs = observe(sim)
        if expert.done:
            break
    names = [p for p, _, _ in phases]
    assert names == sorted(names, key=["approach", "descend", "close", "lift"].index)
    first_lift = names.index("lift")
    # Lifting starts only once the fingers have stopped on the cube, and the command stays closed.
    assert abs(phases[first_lift][2] - 0.045) < 0.005
    assert all(w == 0.0 for p, w, _ in phases if p in ("close", "lift"))


def test_expert_validation(bed):
    sim, _ = bed
    with pytest.raises(ExpertError, match="reset"):
        ScriptedExpert(model=sim.model).act(observe(sim))
    with pytest.raises(ExpertError, match="rate_hz"):
        ExpertConfig(rate_hz=0.0)
    with pytest.raises(ExpertError, match="noise_std"):
        ExpertConfig(noise_std=-1.0)
    with pytest.raises(ExpertError, match="rng"):
        ScriptedExpert(ExpertConfig(noise_std=0.01), model=sim.model).reset(Task("pick", "red"), observe(sim))


def _run_phases(sim, expert, task, seed, rng):
    """Drive ``expert`` without noise; per step: (phase, action, TCP (3,), named cube position (3,))."""
    sim.reset(seed)
    obs = observe(sim)
    expert.reset(task, obs, rng)
    steps = []
    for _ in range(300):
        action = expert.act(obs)
        steps.append((expert.phase, action, sim.tcp_position(), obs.cube_poses[task.cube].position))
        sim.set_trajectory(FR3_ARM_JOINTS, [(0.1, action.executed_arm)])
        sim.set_gripper(action.gripper)
        sim.step(0.1)
        obs = observe(sim)
        if expert.done:
            break
    return steps


def test_detour_leads_the_arm_off_centre_and_the_descent_steers_it_back(bed):
    sim, _ = bed
    expert = ScriptedExpert(ExpertConfig(detour=0.04), model=sim.model)
    task = Task("pick", "green")
    steps = _run_phases(sim, expert, task, 31, np.random.default_rng(4))
    assert expert.done and sim.task_success(task)
    phases = [phase for phase, *_ in steps]
    approach = [s for s in steps if s[0] == "approach"]
    # Off the true goal the recorded intent and the executed command part; elsewhere they are one.
    assert any(not np.array_equal(a.arm, a.executed_arm) for _, a, _, _ in approach)
    assert all(a.executed_arm is a.arm for p, a, _, _ in steps if p != "approach")
    # The approach ended over the detoured point, well off the cube...
    _, _, tcp, cube = steps[phases.index("descend")]
    assert np.linalg.norm(tcp[:2] - cube[:2]) > 0.015
    # ...and the gripper closed with the hand centred on it again.
    _, _, tcp, cube = steps[phases.index("close")]
    assert np.linalg.norm(tcp[:2] - cube[:2]) < 0.006


def test_no_detour_means_executed_is_recorded(bed):
    sim, expert = bed
    task = Task("stack", "red", "blue")
    steps = _run_phases(sim, expert, task, 32, np.random.default_rng(4))
    assert expert.done and sim.task_success(task)
    assert all(a.executed_arm is a.arm for _, a, _, _ in steps)
    # The generator is not drawn from without a detour: the same rollout as without one.
    again = _run_phases(sim, expert, task, 32, None)
    assert len(again) == len(steps)
    assert all(np.array_equal(a.arm, b.arm) for (_, a, _, _), (_, b, _, _) in zip(steps, again))


@pytest.mark.parametrize("detour", [-0.01, 0.08, float("nan")])
def test_detour_validation(detour):
    with pytest.raises(ExpertError, match="detour"):
        ExpertConfig(detour=detour)


@pytest.mark.parametrize("instruction, seed", [("pick up the blue cube", 41), ("put the green cube on the red cube", 42)])
def test_grasp_height_raises_the_grasp_and_the_task_still_succeeds(bed, instruction, seed):
    sim, _ = bed
    config = ExpertConfig(grasp_height=0.012)
    expert = ScriptedExpert(config, model=sim.model)
    task = Task.parse(instruction)
    steps = _run_phases(sim, expert, task, seed, None)
    assert expert.done and sim.task_success(task)
    phases = [phase for phase, *_ in steps]
    _, _, tcp, cube = steps[phases.index("close")]
    assert tcp[2] - cube[2] == pytest.approx(0.012, abs=config.fine_tolerance)


@pytest.mark.parametrize("grasp_height", [-0.001, 0.0225, float("inf")])
def test_grasp_height_validation(grasp_height):
    with pytest.raises(ExpertError, match="grasp_height"):
        ExpertConfig(grasp_height=grasp_height)


@pytest.mark.parametrize("retreat", [False, True])
def test_stack_ends_at_the_release_unless_a_retreat_is_asked_for(bed, retreat):
    sim, _ = bed
    expert = ScriptedExpert(ExpertConfig(grasp_height=0.012, retreat=retreat), model=sim.model)
    task = Task("stack", "blue", "green")
    steps = _run_phases(sim, expert, task, 43, None)
    assert expert.done and sim.task_success(task)
    phases = [phase for phase, *_ in steps]
    assert phases[-1] == ("retreat" if retreat else "release")
    release_height = steps[phases.index("release")][2][2]
    final_height = sim.tcp_position()[2]
    if retreat:
        assert final_height > release_height + 0.1
    else:
        # The open hand is still around the placed cube, and the stack stands on its own.
        assert abs(final_height - release_height) < 0.01
        sim.step(1.0)
        assert sim.task_success(task)
