"""franka_gripper's action semantics over the simulated hand, without ROS.

The test bed's franka_gripper actions (served by franka_sim_node when franka_msgs is installed)
behave as franka_gripper's GripperActionServer over libfranka does:

- Every goal is accepted, as franka_gripper's goal callback accepts all. A goal that cannot run
  ends at once as a failure with an error, as when libfranka throws: parameters outside the
  hand's ranges, or another goal still running (move, grasp and homing block and cannot be
  pre-empted: stop first).
- A goal ends when the hand has settled: the commanded motion reached its target and the
  fingers moved less than ``SETTLE_TOLERANCE`` for ``SETTLE_TIME``. A hand that never settles
  ends by a timeout (the distance at the goal's speed plus ``TIMEOUT_MARGIN``) as a failure.
- Grasp closes at the goal's speed with at most its force and succeeds iff the final width is in
  the goal's epsilon window (:func:`mail_ros.control.gripper.grasp_holds`): closing on nothing,
  or on an object of another size, fails. Move succeeds iff the fingers settled within
  ``MOVE_TOLERANCE`` of the goal width (a move blocked by an object fails). Homing opens the hand
  fully (the real one also closes first to calibrate) and succeeds as a move would.
- Stop halts the fingers where they are and ends a running goal as a failure with no error
  (libfranka's "aborted" answer); a cancel does the same and reports the goal canceled.

Time is the simulation's, passed in by the caller, so tests drive it explicitly.
"""

from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass
from typing import Protocol

from mail_ros.control.gripper import grasp_holds
from mail_ros.spec import FR3_GRIPPER_MAX_WIDTH

SETTLE_TIME = 0.1  # s the fingers must rest before a goal ends
SETTLE_TOLERANCE = 5e-4  # m of finger motion that still counts as resting
MOVE_TOLERANCE = 0.005  # m between a settled move and its goal width that still counts as reached
TIMEOUT_MARGIN = 2.0  # s beyond the travel time at the goal's speed
HOMING_SPEED = 0.1  # m/s, franka_gripper's default_speed


class GoalKind(enum.Enum):
    HOMING = "homing"
    MOVE = "move"
    GRASP = "grasp"


@dataclass(frozen=True)
class GripperGoal:
    """One franka_msgs goal: Homing (no fields), Move (width, speed) or Grasp (all fields)."""

    kind: GoalKind
    width: float = FR3_GRIPPER_MAX_WIDTH
    speed: float = HOMING_SPEED
    force: float = 0.0
    epsilon_inner: float = 0.0
    epsilon_outer: float = 0.0


@dataclass(frozen=True)
class GripperOutcome:
    """How a goal ended: franka_msgs' result (success, error) and the width the fingers ended at."""

    success: bool
    error: str
    width: float
    canceled: bool = False


class Hand(Protocol):
    """What the action semantics need of a hand (FrankaSim provides it)."""

    def set_gripper(self, width: float, speed: float) -> None: ...  # raises ValueError when out of range
    def grasp(self, force: float, speed: float) -> None: ...  # raises ValueError when out of range
    def stop_gripper(self) -> None: ...
    def gripper_width(self) -> float: ...
    def gripper_command_done(self) -> bool: ...


class GoalRun:
    """A running goal; ``outcome`` is set (and ``finished`` set) once it ends."""

    def __init__(self, goal: GripperGoal, start: float, timeout: float) -> None:
        self.goal = goal
        self.start = start
        self.deadline = start + timeout
        self.outcome: GripperOutcome | None = None
        self.finished = threading.Event()
        self._rest_since = start
        self._rest_width = math.nan

    def _end(self, outcome: GripperOutcome) -> GripperOutcome:
        self.outcome = outcome
        self.finished.set()
        return outcome


class GripperActions:
    """franka_gripper's goals over ``hand``: start, stop, cancel, and ``update`` after each physics step.

    Not thread-safe: the caller serialises calls with the lock that guards the hand.
    """

    def __init__(self, hand: Hand) -> None:
        self.hand = hand
        self.running: GoalRun | None = None

    def start(self, goal: GripperGoal, now: float) -> GoalRun:
        """Start ``goal``; the returned run has already ended (as a failure) when it cannot run."""
        width = self.hand.gripper_width()
        timeout = abs(goal.width - width) / goal.speed + TIMEOUT_MARGIN if goal.speed > 0 else 0.0
        run = GoalRun(goal, now, timeout)
        if self.running is not None:
            kind = self.running.goal.kind.value
            run._end(GripperOutcome(False, f"the gripper is busy with a {kind} goal: a goal cannot be pre-empted, "
                                    "call ~/stop first", width))
            return run
        error = _invalid(goal)
        if not error:
            try:
                if goal.kind is GoalKind.GRASP:
                    self.hand.grasp(goal.force, goal.speed)
                else:
                    self.hand.set_gripper(goal.width, goal.speed)
            except ValueError as exc:
                error = str(exc)
        if error:
            run._end(GripperOutcome(False, f"{goal.kind.value} goal refused by the hand: {error}", width))
            return run
        self.running = run
        return run

    def stop(self, canceled: bool = False, error: str = "") -> GoalRun | None:
        """Halt the fingers where they are; end the running goal (returned) as a failure, if any."""
        self.hand.stop_gripper()
        run, self.running = self.running, None
        if run is not None:
            run._end(GripperOutcome(False, error, self.hand.gripper_width(), canceled=canceled))
        return run

    def update(self, now: float) -> GoalRun | None:
        """After a physics step: the run that ended now, if any."""
        run = self.running
        if run is None:
            return None
        width = self.hand.gripper_width()
        if not abs(width - run._rest_width) <= SETTLE_TOLERANCE:
            run._rest_since, run._rest_width = now, width
        settled = self.hand.gripper_command_done() and now - run._rest_since >= SETTLE_TIME
        if not settled and now < run.deadline:
            return None
        self.running = None
        goal = run.goal
        if not settled:
            outcome = GripperOutcome(False, f"{goal.kind.value} did not settle within {run.deadline - run.start:.1f} s "
                                     f"(fingers at {width * 100:.1f} cm)", width)
        elif goal.kind is GoalKind.GRASP:
            success = grasp_holds(goal.width, goal.epsilon_inner, goal.epsilon_outer, width)
            outcome = GripperOutcome(success, "", width)
        else:
            outcome = GripperOutcome(abs(width - goal.width) <= MOVE_TOLERANCE, "", width)
        run._end(outcome)
        return run


def _invalid(goal: GripperGoal) -> str:
    """Why the hand cannot take ``goal`` (its width, speed and force ranges are the hand's own)."""
    values = (goal.width, goal.speed, goal.force, goal.epsilon_inner, goal.epsilon_outer)
    if not all(math.isfinite(value) for value in values):
        return f"non-finite value in {goal}"
    if goal.kind is GoalKind.GRASP and (goal.epsilon_inner < 0 or goal.epsilon_outer < 0):
        return f"negative epsilon {goal.epsilon_inner}, {goal.epsilon_outer}"
    if goal.kind is GoalKind.GRASP and not 0.0 <= goal.width <= FR3_GRIPPER_MAX_WIDTH:
        return f"grasp width must be within [0, {FR3_GRIPPER_MAX_WIDTH}] m, got {goal.width}"
    return ""


def homing_goal() -> GripperGoal:
    return GripperGoal(GoalKind.HOMING, width=FR3_GRIPPER_MAX_WIDTH, speed=HOMING_SPEED)


__all__ = ["GoalKind", "GoalRun", "GripperActions", "GripperGoal", "GripperOutcome", "Hand", "homing_goal",
           "MOVE_TOLERANCE", "SETTLE_TIME", "SETTLE_TOLERANCE", "TIMEOUT_MARGIN"]
