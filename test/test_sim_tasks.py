"""Task family: instruction round-trip, validation, and success checks on constructed states."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mail_ros.sim.tasks import (CUBE_SIZE, STAGES, SceneState, Task, TaskError, TaskProgress, all_tasks, check_success,
                                judge)


def test_nine_instructions_round_trip():
    tasks = all_tasks()
    assert len(tasks) == 9 and len({t.instruction for t in tasks}) == 9
    assert len(all_tasks("pick")) == 3 and len(all_tasks("stack")) == 6
    for task in tasks:
        assert Task.parse(task.instruction) == task
    assert Task.parse("  Put the RED cube on the  blue cube ") == Task("stack", "red", "blue")
    assert Task("pick", "green").instruction == "pick up the green cube"


@pytest.mark.parametrize(
    "text",
    ["pick up the purple cube", "put the red cube on the red cube", "stack red on blue", "pick up the red"],
)
def test_bad_instructions_are_rejected(text):
    with pytest.raises(TaskError):
        Task.parse(text)


def test_task_validation():
    with pytest.raises(TaskError, match="skill"):
        Task("push", "red")
    with pytest.raises(TaskError, match="target"):
        Task("pick", "red", "blue")
    with pytest.raises(TaskError, match="target"):
        Task("stack", "red")
    with pytest.raises(TaskError, match="skill"):
        all_tasks("push")


def state(red, blue, width=0.08, contacts=(), speed=0.0):
    return SceneState(
        cube_positions={"red": np.array(red), "green": np.array([0.4, 0.2, CUBE_SIZE / 2]), "blue": np.array(blue)},
        cube_speeds={"red": speed, "green": 0.0, "blue": 0.0},
        gripper_width=width,
        finger_contacts=frozenset(contacts),
    )


BOTH = (("red", "left"), ("red", "right"))
ON_TABLE = [0.5, -0.1, CUBE_SIZE / 2]


def test_pick_needs_height_and_both_fingers():
    pick = Task("pick", "red")
    assert check_success(pick, state([0.5, 0.0, 0.15], ON_TABLE, 0.045, BOTH))
    assert not check_success(pick, state([0.5, 0.0, 0.11], ON_TABLE, 0.045, BOTH))  # bottom below 10 cm
    assert not check_success(pick, state([0.5, 0.0, 0.15], ON_TABLE, 0.045, BOTH[:1]))


def test_stack_needs_resting_on_top_and_released():
    stack = Task("stack", "red", "blue")
    top = [0.5, -0.1 + 0.01, CUBE_SIZE * 1.5]
    assert check_success(stack, state(top, ON_TABLE))
    assert not check_success(stack, state([0.5, -0.1 + 0.03, CUBE_SIZE * 1.5], ON_TABLE))  # overhangs
    assert not check_success(stack, state([0.5, -0.1, CUBE_SIZE * 2.5], ON_TABLE))  # floating
    assert not check_success(stack, state(top, ON_TABLE, contacts=BOTH[:1]))  # still touched
    assert not check_success(stack, state(top, ON_TABLE, width=0.045))  # gripper closed
    assert not check_success(stack, state(top, ON_TABLE, speed=0.2))  # still moving
    assert not check_success(Task("stack", "blue", "red"), state(top, ON_TABLE))


def test_failures_name_the_stage_reached():
    pick = Task("pick", "red")
    assert judge(pick, state(ON_TABLE, [0.5, 0.1, CUBE_SIZE / 2], 0.08)).stage == "not grasped"
    low = judge(pick, state([0.5, 0.0, 0.06], ON_TABLE, 0.045, BOTH))
    assert (low.stage, low.detail) == ("held too low", "lifted 3.8 cm of 10")
    wrong = judge(pick, state(ON_TABLE, [0.5, 0.1, 0.1], 0.045, (("blue", "left"), ("blue", "right"))))
    assert (wrong.stage, wrong.detail) == ("wrong cube", "holding the blue cube")

    stack = Task("stack", "red", "blue")
    top = [0.5, -0.1 + 0.01, CUBE_SIZE * 1.5]
    assert judge(stack, state(top, ON_TABLE, contacts=BOTH[:1])).stage == "not released"
    off = judge(stack, state([0.5, -0.1 + 0.04, CUBE_SIZE / 2], ON_TABLE))
    assert off.stage == "off target" and off.detail.startswith("4.0 cm from the blue cube's centre, 0.0 cm above")
    assert judge(stack, state(top, ON_TABLE, width=0.045)).stage == "hand closed"
    assert judge(stack, state(top, ON_TABLE, speed=0.2)).message == "moving: 20.0 cm/s"
    assert judge(stack, state(top, ON_TABLE)) == TaskProgress(True, "success")


@given(st.floats(0.3, 0.7), st.floats(-0.3, 0.3), st.floats(0.0, 0.3), st.floats(0.0, 0.08), st.floats(0.0, 0.2),
       st.sets(st.sampled_from([(c, f) for c in ("red", "green", "blue") for f in ("left", "right")])),
       st.sampled_from(all_tasks()))
def test_judge_agrees_with_the_success_rule_and_round_trips(x, y, z, width, speed, contacts, task):
    scene = SceneState(
        cube_positions={"red": np.array([x, y, z]), "green": np.array([0.4, 0.2, CUBE_SIZE / 2]),
                        "blue": np.array([x + 0.01, y - 0.01, CUBE_SIZE / 2])},
        cube_speeds={"red": speed, "green": 0.0, "blue": 0.0}, gripper_width=width,
        finger_contacts=frozenset(contacts))
    progress = judge(task, scene)
    pos, held = scene.cube_positions[task.cube], scene.held(task.cube)
    if task.skill == "pick":
        expected = held and pos[2] - CUBE_SIZE / 2 > 0.10
    else:
        below = scene.cube_positions[task.target]
        expected = (np.linalg.norm(pos[:2] - below[:2]) < CUBE_SIZE / 2 and abs(pos[2] - below[2] - CUBE_SIZE) < 0.01
                    and max(scene.cube_speeds[task.cube], scene.cube_speeds[task.target]) < 0.05
                    and not scene.touched(task.cube) and width > CUBE_SIZE + 0.005)
    assert progress.success == expected and progress.stage in STAGES
    assert TaskProgress.from_message(progress.success, progress.message) == progress


def test_progress_rejects_unknown_or_contradictory_stages():
    with pytest.raises(TaskError, match="unknown task stage"):
        TaskProgress(False, "lost")
    with pytest.raises(TaskError, match="contradicts"):
        TaskProgress(True, "off target")
