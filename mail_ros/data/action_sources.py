"""Where a demonstration's arm actions come from: commands, kinesthetic teaching or a teleoperation leader.

The action of a frame with reference stamp ``t`` is always the arm's target for ``t + dt``
(``dt = 1 / rate_hz``); the sources differ in what stands for that target:

- ``command`` (the default): the JointTrajectory the arm controller was sent (the test bed's
  expert, a policy, a planner); the rule is :func:`mail_ros.data.bags.command_target`.
- ``kinesthetic``: the arm is moved by hand (gravity compensation) and nothing commands it, so the
  target is where the hand took it: the MEASURED joint positions (``/joint_states``) at ``t + dt``,
  linearly interpolated between the joint states stamped around it. At run time the policy's
  target for ``t + dt`` is then where the demonstrator had the arm at that time. A robot's
  controller brings the arm to a target some time after it is commanded, so commanded
  demonstrations lead the measured arm (in the test bed, kinesthetic labels come closest to the
  command labels 0.05-0.1 s later); ``lead`` labels ``t + dt + lead`` instead, so that a policy
  taught by hand commands ahead of the arm as a commanded one does.
- ``teleop``: a leader device (a leader arm such as GELLO, a SpaceMouse or VR controller driver
  that solves IK) publishes joint targets the robot follows, either as ``sensor_msgs/JointState``
  (interpolated at ``t + dt`` by header stamp, as kinesthetic) or as ``JointTrajectory`` on any
  topic (the command rule). Leader joint names are renamed to the robot's with a joint map.

Measured series (kinesthetic, JointState leaders) hold a value only where the series is dense:
when the two states around ``t + dt`` are more than ``max_state_gap`` apart (a pause in the
recording, the gap between two episodes) the frame is dropped (reason ``"state_gap"``), as it is
before the first state (``"no_state"``) and after the last (``"no_future_state"``). An episode
left with no frame is reported with those counts and skipped: never labelled from another source.

The gripper action is independent of the arm's source (command topic or measured width, see
:class:`mail_ros.data.bags.BagConfig`). Every converted episode records its source in the HDF5
attribute ``action_source`` (see :func:`describe`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mail_ros.sync.observation import ObservationError, select_joints
from mail_ros.sync.stamps import DEFAULT_MAX_STAMP_LEAD, StampGate, seconds_to_ns, stamp_to_ns

__all__ = ["ARM_SOURCES", "DEFAULT_MAX_STATE_GAP", "MeasuredArm", "describe"]

ARM_SOURCES = ("command", "kinesthetic", "teleop")
# Joint states come at 100 Hz to 1 kHz from franka_ros2, leaders at 50 Hz and more: 0.1 s without a
# state means the recording paused (or an episode ended), not a slow publisher.
DEFAULT_MAX_STATE_GAP = 0.1


class MeasuredArm:
    """Joint positions stamped by their header, interpolated at ``t + dt`` (module docstring).

    ``joints``: the robot's arm joints, in action order. ``rename``: message joint name -> robot
    joint name (a leader's names), applied before selecting. Messages the bag's
    :class:`~mail_ros.sync.stamps.StampGate` refuses (unstamped, or stamped more than
    ``max_stamp_lead`` ahead of their receipt) are counted in ``refused`` like every other stream
    of a bag. ``lead``: seconds past ``t + dt`` the label is read at (module docstring). Times are
    integer nanoseconds (bag receive times, header stamps).
    """

    def __init__(self, kind: str, topic: str, joints: Sequence[str], rename: Mapping[str, str] | None = None,
                 max_state_gap: float = DEFAULT_MAX_STATE_GAP, max_stamp_lead: float = DEFAULT_MAX_STAMP_LEAD,
                 lead: float = 0.0) -> None:
        if not (math.isfinite(max_state_gap) and max_state_gap > 0):
            raise ValueError(f"max_state_gap must be positive seconds, got {max_state_gap}")
        if not (math.isfinite(lead) and lead >= 0):
            raise ValueError(f"lead must be >= 0 seconds, got {lead}")
        self.kind, self.topic, self.joints = kind, topic, tuple(joints)
        self.rename = dict(rename or {})
        self.max_state_gap = seconds_to_ns(max_state_gap)  # ns
        self.lead = seconds_to_ns(lead)  # ns
        self.gate = StampGate(max_stamp_lead)
        self.stamps: list[int] = []  # ns
        self.positions: list[np.ndarray] = []
        self.refused: Counter[str] = Counter()  # StampGate reason -> messages
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.stamps)

    def add(self, msg: Any, receive: int, where: str) -> None:
        """Add one ``sensor_msgs/JointState`` received (bag time, ns) at ``receive``."""
        from mail_ros.data.hdf5 import DataError

        stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
        refusal = self.gate.check(stamp, receive)
        if refusal is not None:
            self.refused[refusal] += 1
            return
        names = [self.rename.get(n, n) for n in msg.name]
        try:
            positions = select_joints(names, list(msg.position), self.joints)
        except ObservationError as exc:  # a missing joint, or a non-finite position
            raise DataError(f"{where}: {exc}") from exc
        self.stamps.append(stamp)
        self.positions.append(np.asarray(positions, dtype=np.float64))
        self._sorted = None

    def at(self, t: int, dt: int) -> tuple[np.ndarray | None, str]:
        """(positions (D,) at ``t + dt + lead`` (all ns), "") or (None, why: "no_state",
        "no_future_state", "state_gap")."""
        if self._sorted is None:
            order = np.argsort(self.stamps, kind="stable")
            self._sorted = (np.asarray(self.stamps, dtype=np.int64)[order],
                            np.stack(self.positions)[order] if self.positions else None)
        stamps, positions = self._sorted
        when = t + dt + self.lead
        if len(stamps) == 0 or when < stamps[0]:
            return None, "no_state"
        if when > stamps[-1]:
            return None, "no_future_state"
        k = int(np.searchsorted(stamps, when, side="left"))  # stamps[k-1] < when <= stamps[k]
        if stamps[k] == when:
            return positions[k].copy(), ""
        if stamps[k] - stamps[k - 1] > self.max_state_gap:
            return None, "state_gap"
        w = int(when - stamps[k - 1]) / int(stamps[k] - stamps[k - 1])
        return (1.0 - w) * positions[k - 1] + w * positions[k], ""


def describe(kind: str, topic: str, gripper: str, rename: Mapping[str, str] | None = None,
             lead: float = 0.0) -> str:
    """The ``action_source`` attribute of an episode, e.g. ``"kinesthetic /joint_states; gripper measured"``
    (``"kinesthetic /joint_states lead 0.1 s; ..."`` with a lead)."""
    text = f"{kind} {topic}"
    if lead:
        text += f" lead {lead:g} s"
    if rename:
        text += " (" + ", ".join(f"{a}->{b}" for a, b in rename.items()) + ")"
    return f"{text}; gripper {gripper}"
