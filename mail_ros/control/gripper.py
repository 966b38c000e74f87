"""Gripper command from the policy's continuous width action: open/close with hysteresis.

The policy predicts a width every step; a real gripper (franka_gripper's Move/Grasp actions)
takes seconds per goal and cannot be pre-empted, so only crossings of two separate thresholds
become commands. Between the thresholds the last command stands, so noise around one threshold
never makes the gripper chatter.
"""

from __future__ import annotations

import enum
import math


class GripperCommand(enum.Enum):
    OPEN = "open"
    CLOSE = "close"


class GripperHysteresis:
    def __init__(self, close_below: float, open_above: float):
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
