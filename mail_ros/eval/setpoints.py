"""Recorded arm commands as the FR3's 1 kHz controller runs them: the setpoint's worst acceleration and jerk.

The JointTrajectory commands of a bag are played, at their bag receive times, through the model
of ros2_controllers' JTC (:class:`mail_ros.sim.jtc.JointTrajectoryController`, joining each new
trajectory from its desired state as config/fr3_controllers.yaml configures it), and its
position setpoint is sampled every ``CONTROLLER_PERIOD`` into the
:class:`~mail_ros.control.smoothness.SetpointMonitor`: the code with which executor_node reports
its own commands in /diagnostics and ``make demo`` its summary. libfranka compares these second
and third differences with the FR3's limits; a positions-only command stream shows up here as
acceleration spikes at every segment boundary.

Before the first command the controller holds that command's first point (the commands do not
say where the arm was). Times are taken relative to the first command, so the 1 ms differences
are not drowned by the rounding of float seconds since the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mail_ros.control.limits import fr3_limits
from mail_ros.control.smoothness import CONTROLLER_PERIOD, SetpointMonitor
from mail_ros.sim.jtc import JointTrajectoryController, TrajectoryRejected

__all__ = ["SetpointPlayback", "SetpointSummary"]

# Once the active trajectory has ended its setpoint is constant: a few cycles past the end carry
# every difference, so a long pause between commands is not sampled cycle by cycle.
SETTLE_CYCLES = 4


@dataclass(frozen=True)
class SetpointSummary:
    """Worst 1 kHz setpoint acceleration (rad/s^2) and jerk (rad/s^3) per joint, with the FR3 limits."""

    joints: tuple[str, ...]
    acceleration: np.ndarray  # (J,)
    jerk: np.ndarray  # (J,)
    commands: int  # commands played
    rejected: list[str]  # why the controller would have refused the others

    def to_dict(self) -> dict[str, Any]:
        limits = fr3_limits()
        return {
            "commands": self.commands,
            "rejected": len(self.rejected),
            "rejected_reasons": self.rejected[:10],
            "acceleration_max": float(self.acceleration.max(initial=0.0)),
            "jerk_max": float(self.jerk.max(initial=0.0)),
            "acceleration_per_joint": dict(zip(self.joints, self.acceleration.tolist())),
            "jerk_per_joint": dict(zip(self.joints, self.jerk.tolist())),
            "fr3_acceleration_limit": dict(zip(self.joints, limits.acceleration_max.tolist())),
            "fr3_jerk_limit": dict(zip(self.joints, limits.jerk_max.tolist())),
        }


class SetpointPlayback:
    """Feed commands in receive order with :meth:`command`; :meth:`finish` gives the summary."""

    def __init__(self, joints: Sequence[str]) -> None:
        self.joints = tuple(joints)
        limits = fr3_limits()
        self._lower, self._upper = limits.position_min, limits.position_max
        self.monitor = SetpointMonitor(len(self.joints))
        self._jtc: JointTrajectoryController | None = None
        self._origin = 0  # ns, the first command's receive time rounded down to a whole cycle
        self._cycle = 0  # the last cycle sampled
        self.commands = 0
        self.rejected: list[str] = []

    def command(self, receive: int, stamp: int, names: Sequence[str], points: Sequence[tuple]) -> None:
        """A JointTrajectory received at ``receive`` (ns) with header ``stamp`` (ns, 0 = start on
        arrival): ``points`` are (time_from_start s, positions[, velocities[, accelerations]])."""
        cycle_ns = round(CONTROLLER_PERIOD * 1e9)
        if self._jtc is None:
            try:
                order = [list(names).index(j) for j in self.joints]
                initial = np.asarray(points[0][1], dtype=np.float64)[order]
                self._jtc = JointTrajectoryController(self.joints, self._lower, self._upper, initial, join="desired")
            except (ValueError, IndexError, TypeError) as exc:
                self.rejected.append(f"first command: {exc}")
                return
            self._origin = receive - receive % cycle_ns
        now = (receive - self._origin) * 1e-9
        self._sample_until(math.floor(now / CONTROLLER_PERIOD + 1e-9))
        start = None if stamp == 0 else (stamp - self._origin) * 1e-9
        try:
            self._jtc.set_trajectory(names, points, start, now)
        except TrajectoryRejected as exc:
            self.rejected.append(str(exc))
            return
        self.commands += 1

    def finish(self) -> SetpointSummary:
        """Run the last trajectory to its end and summarise."""
        if self._jtc is not None and math.isfinite(self._jtc.end_time):
            self._sample_until(math.ceil(self._jtc.end_time / CONTROLLER_PERIOD) + SETTLE_CYCLES)
        return SetpointSummary(self.joints, self.monitor.worst_acceleration.copy(), self.monitor.worst_jerk.copy(),
                               self.commands, list(self.rejected))

    def _sample_until(self, cycle: int) -> None:
        """Sample the setpoint of every cycle after the last sampled one up to ``cycle``."""
        end = self._jtc.end_time
        # Past the active trajectory's end (plus settling), or while the initial point is held,
        # the setpoint no longer changes: those cycles add no difference.
        settled = math.ceil(end / CONTROLLER_PERIOD) if math.isfinite(end) else self._cycle
        last = min(cycle, settled + SETTLE_CYCLES)
        if last > self._cycle:
            cycles = np.arange(self._cycle + 1, last + 1)
            self.monitor.add(self._jtc.sample_many(cycles * CONTROLLER_PERIOD)[0])
        self._cycle = max(self._cycle, cycle)
