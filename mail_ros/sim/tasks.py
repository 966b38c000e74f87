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
    "SceneState",
    "Task",
    "TaskError",
    "all_tasks",
    "check_success",
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


def check_success(task: Task, state: SceneState) -> bool:
    """Whether ``task`` is accomplished in ``state``.

    pick: the cube's bottom is more than ``PICK_LIFT_HEIGHT`` above the table and it is held by
    both fingers. stack: the cube rests on the target (centres within half a cube in x/y, one cube
    height apart in z, both slow), no finger touches it and the hand is open.
    """
    pos = state.cube_positions[task.cube]
    if task.skill == "pick":
        bottom = pos[2] - 0.5 * CUBE_SIZE
        return bool(bottom - TABLE_HEIGHT > PICK_LIFT_HEIGHT and state.held(task.cube))
    below = state.cube_positions[task.target]
    on_top = (
        np.linalg.norm(pos[:2] - below[:2]) < STACK_XY_TOLERANCE
        and abs(pos[2] - below[2] - CUBE_SIZE) < STACK_Z_TOLERANCE
    )
    resting = state.cube_speeds[task.cube] < REST_SPEED and state.cube_speeds[task.target] < REST_SPEED
    released = not state.touched(task.cube) and state.gripper_width > CUBE_SIZE + OPEN_MARGIN
    return bool(on_top and resting and released)
