"""A joint trajectory controller for a position interface, after ros2_controllers' JTC.

Semantics (what the simulated arm and the ROS wrapper rely on):

- ``set_trajectory`` replaces the active trajectory as a whole. The new one starts from the
  setpoint the controller holds when it is called (the "anchor"), at ``start_time``; its points
  lie at ``start_time + time_from_start``.
- The setpoint interpolates LINEARLY in time between consecutive points (and between the anchor
  and the first point), as JTC does when a trajectory carries positions only: continuous in
  position, stepwise constant in velocity. A first point at ``time_from_start == 0`` makes the
  setpoint jump to it at ``start_time``.
- Before ``start_time`` the anchor is held; after the last point the last point is held.
- A ``start_time`` in the past is accepted and sampled at the elapsed time (a late trajectory
  catches up instead of being stretched), as JTC does for a stale header stamp.
- A rejected trajectory raises :class:`TrajectoryRejected` and leaves the active one untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["JointTrajectoryController", "TrajectoryRejected"]


class TrajectoryRejected(ValueError):
    """A joint trajectory was refused; the controller keeps its active trajectory."""


class JointTrajectoryController:
    """Setpoint generator for a fixed set of joints with position limits.

    ``lower``/``upper`` are the (J,) position limits in the order of ``joint_names``; ``initial``
    is the (J,) setpoint held until the first trajectory arrives.
    """

    def __init__(
        self,
        joint_names: Sequence[str],
        lower: np.ndarray,
        upper: np.ndarray,
        initial: np.ndarray,
    ) -> None:
        self._names = tuple(joint_names)
        self._index = {name: i for i, name in enumerate(self._names)}
        if len(self._index) != len(self._names):
            raise ValueError(f"controller joint names must be unique, got {list(self._names)}")
        self._lower = np.asarray(lower, dtype=np.float64)
        self._upper = np.asarray(upper, dtype=np.float64)
        if self._lower.shape != (len(self._names),) or self._upper.shape != self._lower.shape:
            raise ValueError(f"limits must have shape ({len(self._names)},)")
        self.hold(initial)

    @property
    def joint_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def end_time(self) -> float:
        """Time from which the last point is held (-inf while only holding)."""
        return float(self._times[-1])

    def hold(self, positions: np.ndarray) -> None:
        """Drop any trajectory and hold ``positions`` (J,) from now on (used on reset)."""
        positions = np.asarray(positions, dtype=np.float64).copy()
        if positions.shape != (len(self._names),):
            raise ValueError(f"hold positions must have shape ({len(self._names)},), got {positions.shape}")
        self._before = positions
        self._times = np.array([-math.inf])
        self._points = positions[None, :].copy()  # (K, J)

    def setpoint(self, t: float) -> np.ndarray:
        """The (J,) position setpoint at time ``t``."""
        times = self._times
        if t < times[0]:
            return self._before.copy()
        if t >= times[-1]:
            return self._points[-1].copy()
        k = int(np.searchsorted(times, t, side="right"))  # times[k-1] <= t < times[k]
        alpha = (t - times[k - 1]) / (times[k] - times[k - 1])
        return (1.0 - alpha) * self._points[k - 1] + alpha * self._points[k]

    def set_trajectory(
        self,
        joint_names: Sequence[str],
        points: Sequence[tuple[float, Sequence[float]]],
        start_time: float,
        now: float,
    ) -> None:
        """Replace the active trajectory.

        ``points`` are (time_from_start [s], positions ordered as ``joint_names``) pairs;
        ``joint_names`` must name every controlled joint exactly once, in any order. ``now`` is
        the current time, at which the anchor setpoint is sampled. Raises
        :class:`TrajectoryRejected` (active trajectory unchanged) on any invalid input.
        """
        order = self._validate_names(joint_names)
        if not math.isfinite(start_time):
            raise TrajectoryRejected(f"start_time must be finite, got {start_time}")
        if len(points) == 0:
            raise TrajectoryRejected("empty trajectory: at least one point is required")
        offsets = np.empty(len(points))
        targets = np.empty((len(points), len(self._names)))  # (K, J) in controller order
        for k, point in enumerate(points):
            try:
                tfs, positions = point
                tfs = float(tfs)
                positions = np.asarray(positions, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise TrajectoryRejected(
                    f"point {k} must be (time_from_start, positions), got {point!r}"
                ) from exc
            if not math.isfinite(tfs) or tfs < 0.0:
                raise TrajectoryRejected(f"point {k}: time_from_start must be finite and >= 0, got {tfs}")
            if k > 0 and tfs <= offsets[k - 1]:
                raise TrajectoryRejected(
                    f"point {k}: time_from_start must increase strictly, got {tfs} after {offsets[k - 1]}"
                )
            if positions.shape != (len(joint_names),):
                raise TrajectoryRejected(
                    f"point {k}: expected {len(joint_names)} positions, got shape {positions.shape}"
                )
            if not np.all(np.isfinite(positions)):
                raise TrajectoryRejected(f"point {k}: positions must be finite, got {positions.tolist()}")
            offsets[k] = tfs
            targets[k, order] = positions
            outside = (targets[k] < self._lower) | (targets[k] > self._upper)
            if np.any(outside):
                j = int(np.argmax(outside))
                raise TrajectoryRejected(
                    f"point {k}: {self._names[j]} = {targets[k, j]:.4f} rad is outside its limits "
                    f"[{self._lower[j]:.4f}, {self._upper[j]:.4f}]"
                )
        anchor = self.setpoint(now)
        times = start_time + offsets
        if offsets[0] > 0.0:
            times = np.concatenate([[start_time], times])
            targets = np.concatenate([anchor[None, :], targets])
        self._before, self._times, self._points = anchor, times, targets

    def _validate_names(self, joint_names: Sequence[str]) -> np.ndarray:
        names = list(joint_names)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise TrajectoryRejected(f"duplicate joint names {duplicates}")
        unknown = [n for n in names if n not in self._index]
        if unknown:
            raise TrajectoryRejected(f"unknown joint names {unknown}; expected {list(self._names)}")
        missing = [n for n in self._names if n not in names]
        if missing:
            raise TrajectoryRejected(f"missing joints {missing}: a trajectory must command all of {list(self._names)}")
        return np.array([self._index[n] for n in names])
