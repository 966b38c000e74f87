"""Task family: instruction round-trip, validation, and success checks on constructed states."""

import numpy as np
import pytest

from mail_ros.sim.tasks import CUBE_SIZE, SceneState, Task, TaskError, all_tasks, check_success


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
