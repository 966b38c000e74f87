"""The simulated test bed's task family: two skills over three coloured cubes, nine instructions.

``pick``: "pick up the <colour> cube" (3 instructions); ``stack``: "put the <colour> cube on the
<other colour> cube" (6 instructions). A :class:`Task` round-trips through its instruction text.
Success is judged from a :class:`SceneState` (cube positions and speeds, the gripper opening and
which cubes touch which finger), so the checks are pure functions that tests can drive directly.
This module has no MuJoCo dependency; the scene geometry it names (cube size, table height) is
what ``franka_sim`` builds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLOURS",
    "CUBE_SIZE",
    "TABLE_HEIGHT",
    "SKILLS",
    "STAGES",
    "SceneState",
    "Task",
    "TaskError",
    "TaskProgress",
    "all_tasks",
    "check_success",
    "judge",
]

COLOURS: tuple[str, ...] = ("red", "green", "blue")
CUBE_SIZE = 0.045  # edge length in metres: fits the 0.08 m hand opening with margin for yaw error
TABLE_HEIGHT = 0.0  # z of the table top in the world frame (the robot base stands on it)
SKILLS: tuple[str, ...] = ("pick", "stack")

# Success thresholds.
PICK_LIFT_HEIGHT = 0.10  # the cube's bottom face must be this far above the table top
STACK_XY_TOLERANCE = 0.5 * CUBE_SIZE  # centre offset that still leaves the cube resting on top
STACK_Z_TOLERANCE = 0.01
REST_SPEED = 0.05  # m/s: a cube moving slower than this counts as resting
OPEN_MARGIN = 0.005  # the hand counts as open when wider than the cube by this much

_PICK_RE = re.compile(r"^pick up the (\w+) cube$")
_STACK_RE = re.compile(r"^put the (\w+) cube on the (\w+) cube$")


class TaskError(ValueError):
    """An instruction or task does not belong to the test bed's task family."""


@dataclass(frozen=True)
class Task:
    """One instruction of the family: ``skill`` acting on ``cube`` (and, to stack, onto ``target``)."""

    skill: str
    cube: str
    target: str | None = None

    def __post_init__(self) -> None:
        if self.skill not in SKILLS:
            raise TaskError(f"unknown skill {self.skill!r}; expected one of {list(SKILLS)}")
        if self.cube not in COLOURS:
            raise TaskError(f"unknown cube colour {self.cube!r}; expected one of {list(COLOURS)}")
        if self.skill == "pick" and self.target is not None:
            raise TaskError(f"a pick task takes no target cube, got target={self.target!r}")
        if self.skill == "stack":
            if self.target not in COLOURS:
                raise TaskError(f"a stack task needs a target colour in {list(COLOURS)}, got {self.target!r}")
            if self.target == self.cube:
                raise TaskError(f"cannot stack the {self.cube} cube on itself")

    @property
    def instruction(self) -> str:
        """The natural-language instruction this task is given by."""
        if self.skill == "pick":
            return f"pick up the {self.cube} cube"
        return f"put the {self.cube} cube on the {self.target} cube"

    @classmethod
    def parse(cls, instruction: str) -> "Task":
        """Parse one of the nine instructions (case and surrounding whitespace are ignored)."""
        text = " ".join(instruction.lower().split())
        if match := _PICK_RE.match(text):
            return cls("pick", match.group(1))
        if match := _STACK_RE.match(text):
            return cls("stack", match.group(1), match.group(2))
        raise TaskError(
            f"unrecognised instruction {instruction!r}; expected 'pick up the <colour> cube' or "
            f"'put the <colour> cube on the <colour> cube' with colours {list(COLOURS)}"
        )


def all_tasks(skill: str | None = None) -> list[Task]:
    """The nine tasks (or those of one skill), in a fixed order."""
    if skill is not None and skill not in SKILLS:
        raise TaskError(f"unknown skill {skill!r}; expected one of {list(SKILLS)}")
    tasks = [Task("pick", c) for c in COLOURS]
    tasks += [Task("stack", c, t) for c in COLOURS for t in COLOURS if t != c]
    return [t for t in tasks if skill is None or t.skill == skill]


@dataclass(frozen=True)
class SceneState:
    """What the success checks read from the simulator.

    ``cube_positions`` maps colour to the (3,) centre in the world frame, ``cube_speeds`` to the
    linear speed in m/s; ``finger_contacts`` holds (colour, finger) pairs with finger in
    {"left", "right"} for every cube touching a finger.
    """

    cube_positions: dict[str, np.ndarray]
    cube_speeds: dict[str, float]
    gripper_width: float
    finger_contacts: frozenset[tuple[str, str]]

    def held(self, colour: str) -> bool:
        """Whether the cube is squeezed between both fingers."""
        return {(colour, "left"), (colour, "right")} <= self.finger_contacts

    def touched(self, colour: str) -> bool:
        return any(c == colour for c, _ in self.finger_contacts)


@dataclass(frozen=True)
class TaskProgress:
    """The verdict on a task in one state: success, or the stage it failed at and the numbers behind it.

    ``stage`` is one of :data:`STAGES`. ``message`` is what ``franka_sim_node``'s ``~/task_success``
    answers; :meth:`from_message` reads it back on the other side of the service.
    """

    success: bool
    stage: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TaskError(f"unknown task stage {self.stage!r}; expected one of {list(STAGES)}")
        if self.success != (self.stage == "success"):
            raise TaskError(f"success={self.success} contradicts stage {self.stage!r}")

    @property
    def message(self) -> str:
        return f"{self.stage}: {self.detail}" if self.detail else self.stage

    @classmethod
    def from_message(cls, success: bool, message: str) -> "TaskProgress":
        stage, _, detail = message.partition(": ")
        return cls(bool(success), stage, detail)


# Why a task is not (yet) done, from the state alone: the stage the episode stopped at.
STAGES: tuple[str, ...] = (
    "success",
    "not grasped",  # pick: the named cube is not between both fingers
    "wrong cube",  # another cube is held instead of the named one
    "held too low",  # pick: held, but not lifted PICK_LIFT_HEIGHT
    "not released",  # stack: a finger still touches the cube
    "off target",  # stack: released, but not resting on the target cube
    "hand closed",  # stack: on the target and untouched, but the hand has not opened
    "moving",  # stack: on the target, released, not yet at rest
)


def judge(task: Task, state: SceneState) -> TaskProgress:
    """Whether ``task`` is accomplished in ``state`` and, if not, where it stands.

    pick: the cube's bottom is more than ``PICK_LIFT_HEIGHT`` above the table and it is held by
    both fingers. stack: the cube rests on the target (centres within half a cube in x/y, one cube
    height apart in z, both slow), no finger touches it and the hand is open.
    """
    pos = state.cube_positions[task.cube]
    others = [c for c in COLOURS if c != task.cube and state.held(c)]
    if task.skill == "pick":
        lift = pos[2] - 0.5 * CUBE_SIZE - TABLE_HEIGHT
        if state.held(task.cube):
            if lift > PICK_LIFT_HEIGHT:
                return TaskProgress(True, "success")
            return TaskProgress(False, "held too low", f"lifted {100 * lift:.1f} cm of {100 * PICK_LIFT_HEIGHT:.0f}")
        if others:
            return TaskProgress(False, "wrong cube", f"holding the {others[0]} cube")
        return TaskProgress(False, "not grasped", f"{task.cube} cube {100 * lift:.1f} cm above the table, "
                                                  f"hand {100 * state.gripper_width:.1f} cm open")
    below = state.cube_positions[task.target]
    offset = np.linalg.norm(pos[:2] - below[:2])
    height = pos[2] - below[2]
    where = f"{100 * offset:.1f} cm from the {task.target} cube's centre, {100 * height:.1f} cm above it"
    if state.touched(task.cube):
        return TaskProgress(False, "not released", where)
    if not (offset < STACK_XY_TOLERANCE and abs(height - CUBE_SIZE) < STACK_Z_TOLERANCE):
        if others:
            return TaskProgress(False, "wrong cube", f"holding the {others[0]} cube; the {task.cube} cube is {where}")
        return TaskProgress(False, "off target", where)
    if state.gripper_width <= CUBE_SIZE + OPEN_MARGIN:
        return TaskProgress(False, "hand closed", f"hand {100 * state.gripper_width:.1f} cm open")
    speed = max(state.cube_speeds[task.cube], state.cube_speeds[task.target])
    if speed >= REST_SPEED:
        return TaskProgress(False, "moving", f"{100 * speed:.1f} cm/s")
    return TaskProgress(True, "success")


def check_success(task: Task, state: SceneState) -> bool:
    """Whether ``task`` is accomplished in ``state`` (see :func:`judge`)."""
    return judge(task, state).success
