"""The gripper side of execution, without ROS: the open/close decision and franka_gripper's rules.

GripperHysteresis turns the policy's continuous width action into open/close commands. The
policy predicts a width every step; a real gripper (franka_gripper's Move/Grasp actions) takes
seconds per goal and cannot be pre-empted, so only crossings of two separate thresholds become
commands. Between the thresholds the last command stands, so noise around one threshold never
makes the gripper chatter.

``grasp_holds`` is franka_gripper's Grasp success rule (libfranka ``Gripper::grasp``), and
GraspWindow is how the executor states what a successful grasp means: the range of object widths
the task expects between the fingers. Both the executor's bridge and the test bed's action server
use them, so the test bed judges grasps as the robot does.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from mail_ros.spec import FR3_GRIPPER_MAX_WIDTH


class GripperCommand(enum.Enum):
    OPEN = "open"
    CLOSE = "close"


# executor_node's defaults: between the demonstrations' open (0.08 m) and closed (0.0) labels, with
# a band between them where the last command stands.
CLOSE_BELOW = 0.03  # m: close (grasp) when the commanded width drops below this
OPEN_ABOVE = 0.05  # m: open when it rises above this


class GripperHysteresis:
    def __init__(self, close_below: float = CLOSE_BELOW, open_above: float = OPEN_ABOVE):
        if not (math.isfinite(close_below) and math.isfinite(open_above) and close_below < open_above):
            raise ValueError(f"need close_below < open_above, got {close_below} and {open_above}")
        self.close_below = close_below
        self.open_above = open_above
        self.state: GripperCommand | None = None

    def reset(self) -> None:
        self.state = None

    def update(self, width: float) -> GripperCommand | None:
        """The command to send now (a change of state), or None to leave the gripper as it is."""
        if not math.isfinite(width):
            return None
        if width < self.close_below:
            wanted = GripperCommand.CLOSE
        elif width > self.open_above:
            wanted = GripperCommand.OPEN
        else:
            return None
        if wanted is self.state:
            return None
        self.state = wanted
        return wanted


def grasp_holds(goal_width: float, epsilon_inner: float, epsilon_outer: float, width: float) -> bool:
    """franka_msgs Grasp's success rule: the fingers stopped at ``width`` (m) with
    ``goal_width - epsilon_inner <= width <= goal_width + epsilon_outer``.

    libfranka documents the bounds as strict; the difference is a set of measure zero for a
    measured width, and inclusive bounds make a window of zero epsilon meaningful.
    """
    return goal_width - epsilon_inner <= width <= goal_width + epsilon_outer


@dataclass(frozen=True)
class GraspWindow:
    """The object widths (m) a grasp must end on to count as holding something.

    Sent as a franka_msgs Grasp goal: ``width`` the window's centre, ``epsilon.inner`` and
    ``epsilon.outer`` half its span. A window that reaches 0 would call closing on nothing a
    success, and one that reaches the hand's full opening would call a blocked hand one, so both
    are refused.
    """

    min_width: float
    max_width: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_width) and math.isfinite(self.max_width)
                and 0.0 < self.min_width < self.max_width < FR3_GRIPPER_MAX_WIDTH):
            raise ValueError(f"a grasp window needs 0 < min_width < max_width < {FR3_GRIPPER_MAX_WIDTH} m, got "
                             f"{self.min_width} .. {self.max_width}")

    @property
    def goal_width(self) -> float:
        return 0.5 * (self.min_width + self.max_width)

    @property
    def epsilon(self) -> float:
        """Inner and outer epsilon of the goal (the window is symmetric about goal_width)."""
        return 0.5 * (self.max_width - self.min_width)

    def holds(self, width: float) -> bool:
        return grasp_holds(self.goal_width, self.epsilon, self.epsilon, width)


# The test bed's cubes are 4.5 cm (mail_ros.sim.tasks.CUBE_SIZE) and read 4.4 cm squeezed between
# the fingers; 1 cm either side allows for a cube held slightly askew. Closing on nothing ends
# near 0, far outside. Real tasks set the executor's gripper_grasp_min/max_width to their objects.
DEFAULT_GRASP_WINDOW = GraspWindow(min_width=0.035, max_width=0.055)

__all__ = ["DEFAULT_GRASP_WINDOW", "GraspWindow", "GripperCommand", "GripperHysteresis", "grasp_holds"]
