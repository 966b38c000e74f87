"""A joint trajectory controller for a position interface, modelled on ros2_controllers' JTC.

The setpoint is computed as ``joint_trajectory_controller`` (trajectory.cpp, ``Trajectory::sample``
and ``interpolate_between_points``; the same in humble, jazzy and kilted) computes it, for the
fields a trajectory carries:

- A new trajectory replaces the active one. It is joined at the first update after it arrives
  (``set_trajectory``'s ``now``): the "point before the trajectory" is either the controller's
  commanded state at that update (``join="desired"``: kilted/jazzy's
  ``interpolate_from_desired_state: true``, humble's ``open_loop_control: true``) or the measured
  state at ``now`` (``join="measured"``, the default of every distro). Missing velocities or
  accelerations of that point count as zero when the trajectory carries them (jazzy and kilted;
  humble instead drops to the lower order for the first segment).
- Its start time is the header stamp, or the first update after it arrived for a zero stamp;
  points lie at ``start + time_from_start``.
- Before the first point the setpoint interpolates from the point before the trajectory to the
  first point; then between consecutive points. Per segment: positions only -> linear (the
  velocity steps at every point), positions + velocities -> cubic Hermite, + accelerations ->
  quintic; a field counts when both ends of the segment carry it.
- After the last point, the last point is held (its position; a velocity it carries is reported
  but the position no longer moves, so a last point with a velocity is a stop in one update).
- Sampled before the join time, the join state is held (JTC outputs nothing new there).
- A rejected trajectory raises :class:`TrajectoryRejected` and leaves the active one untouched.

``sample(t)`` is the controller's update at ``t``: (position, velocity, acceleration). The model
is stateless between updates, so it may be sampled at any times, in any order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["JOINS", "JointTrajectoryController", "TrajectoryPoint", "TrajectoryRejected", "interpolate"]

JOINS = ("desired", "measured")


class TrajectoryRejected(ValueError):
    """A joint trajectory was refused; the controller keeps its active trajectory."""


@dataclass(frozen=True)
class TrajectoryPoint:
    """One JointTrajectoryPoint in controller joint order; velocities/accelerations None when absent."""

    time: float  # absolute time (start + time_from_start) or, for the join point, when it was commanded
    positions: np.ndarray  # (J,)
    velocities: np.ndarray | None = None  # (J,)
    accelerations: np.ndarray | None = None  # (J,)


def interpolate(a: TrajectoryPoint, b: TrajectoryPoint, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, velocity, acceleration) at ``t`` on the segment a -> b, as JTC's
    ``interpolate_between_points``: linear, cubic or quintic by the fields both ends carry;
    clamped to the segment's ends (where the order drops to linear, as in JTC)."""
    duration = b.time - a.time
    s = t - a.time
    has_velocity = a.velocities is not None and b.velocities is not None
    has_acceleration = has_velocity and a.accelerations is not None and b.accelerations is not None
    if s < 0.0:
        s, has_velocity, has_acceleration = 0.0, False, False
    if s > duration:
        s, has_velocity, has_acceleration = duration, False, False
    p0, p1 = a.positions, b.positions
    if not has_velocity:
        slope = (p1 - p0) / duration if duration != 0.0 else np.zeros_like(p0)
        return p0 + s * slope, slope.copy(), np.zeros_like(p0)
    v0, v1 = a.velocities, b.velocities
    if duration == 0.0:
        return p0.copy(), v0.copy(), np.zeros_like(p0)
    T = duration
    if not has_acceleration:
        c2 = (-3.0 * p0 + 3.0 * p1 - 2.0 * v0 * T - v1 * T) / T**2
        c3 = (2.0 * p0 - 2.0 * p1 + v0 * T + v1 * T) / T**3
        return (p0 + v0 * s + c2 * s**2 + c3 * s**3, v0 + 2.0 * c2 * s + 3.0 * c3 * s**2, 2.0 * c2 + 6.0 * c3 * s)
    a0, a1 = a.accelerations, b.accelerations
    c2 = 0.5 * a0
    c3 = (-20.0 * p0 + 20.0 * p1 - 3.0 * a0 * T**2 + a1 * T**2 - 12.0 * v0 * T - 8.0 * v1 * T) / (2.0 * T**3)
    c4 = (30.0 * p0 - 30.0 * p1 + 3.0 * a0 * T**2 - 2.0 * a1 * T**2 + 16.0 * v0 * T + 14.0 * v1 * T) / (2.0 * T**4)
    c5 = (-12.0 * p0 + 12.0 * p1 - a0 * T**2 + a1 * T**2 - 6.0 * v0 * T - 6.0 * v1 * T) / (2.0 * T**5)
    position = p0 + v0 * s + c2 * s**2 + c3 * s**3 + c4 * s**4 + c5 * s**5
    velocity = v0 + 2.0 * c2 * s + 3.0 * c3 * s**2 + 4.0 * c4 * s**3 + 5.0 * c5 * s**4
    acceleration = 2.0 * c2 + 6.0 * c3 * s + 12.0 * c4 * s**2 + 20.0 * c5 * s**3
    return position, velocity, acceleration


class JointTrajectoryController:
    """Setpoint generator for a fixed set of joints with position limits.

    ``lower``/``upper`` are the (J,) position limits in the order of ``joint_names``; ``initial``
    is the (J,) setpoint held until the first trajectory arrives; ``join`` is how a new
    trajectory is joined (see the module docstring).
    """

    def __init__(self, joint_names: Sequence[str], lower: np.ndarray, upper: np.ndarray, initial: np.ndarray,
                 join: str = "desired") -> None:
        self._names = tuple(joint_names)
        self._index = {name: i for i, name in enumerate(self._names)}
        if len(self._index) != len(self._names):
            raise ValueError(f"controller joint names must be unique, got {list(self._names)}")
        if join not in JOINS:
            raise ValueError(f"join must be one of {list(JOINS)}, got {join!r}")
        self.join = join
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
        return self._points[-1].time if self._points else -math.inf

    def hold(self, positions: np.ndarray) -> None:
        """Drop any trajectory and hold ``positions`` (J,) at rest from now on (used on reset)."""
        positions = np.asarray(positions, dtype=np.float64).copy()
        if positions.shape != (len(self._names),):
            raise ValueError(f"hold positions must have shape ({len(self._names)},), got {positions.shape}")
        zero = np.zeros_like(positions)
        self._before = TrajectoryPoint(-math.inf, positions, zero, zero)
        self._points: list[TrajectoryPoint] = []

    def sample(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The controller update at ``t``: (position, velocity, acceleration), each (J,)."""
        return self._evaluate(t)

    def setpoint(self, t: float) -> np.ndarray:
        """The (J,) position setpoint of the update at ``t``."""
        return self.sample(t)[0]

    def _evaluate(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        before, points = self._before, self._points
        zero = np.zeros(len(self._names))
        if not points or t < before.time:
            return (before.positions.copy(), _or(before.velocities, zero), _or(before.accelerations, zero))
        if t < points[0].time:
            return interpolate(before, points[0], t)
        for a, b in zip(points, points[1:]):
            if a.time <= t < b.time:
                return interpolate(a, b, t)
        last = points[-1]
        return last.positions.copy(), _or(last.velocities, zero), _or(last.accelerations, zero)

    def set_trajectory(
        self,
        joint_names: Sequence[str],
        points: Sequence,
        start_time: float | None,
        now: float,
        measured: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Replace the active trajectory at the update at ``now``.

        ``points`` are (time_from_start [s], positions[, velocities[, accelerations]]) tuples, in
        the order of ``joint_names``, which must name every controlled joint exactly once. Every
        point carries the same fields. ``start_time`` None means "at ``now``" (a zero header
        stamp). ``measured`` is the (position, velocity) the controller reads at ``now``
        (required for ``join="measured"``). Raises :class:`TrajectoryRejected` (active
        trajectory unchanged) on any invalid input.
        """
        order = self._validate_names(joint_names)
        start = now if start_time is None else start_time
        if not math.isfinite(start):
            raise TrajectoryRejected(f"start_time must be finite, got {start_time}")
        if len(points) == 0:
            raise TrajectoryRejected("empty trajectory: at least one point is required")
        parsed: list[TrajectoryPoint] = []
        fields = None
        for k, point in enumerate(points):
            if not isinstance(point, (tuple, list)) or not 2 <= len(point) <= 4:
                raise TrajectoryRejected(f"point {k} must be (time_from_start, positions[, velocities[, "
                                         f"accelerations]]), got {point!r}")
            try:
                tfs = float(point[0])
                arrays = [np.asarray(values, dtype=np.float64) for values in point[1:]]
            except (TypeError, ValueError) as exc:
                raise TrajectoryRejected(f"point {k} has non-numeric values: {point!r}") from exc
            if fields is None:
                fields = len(arrays)
            elif len(arrays) != fields:
                raise TrajectoryRejected(f"point {k} carries {len(arrays)} fields, point 0 carries {fields}")
            if not math.isfinite(tfs) or tfs < 0.0:
                raise TrajectoryRejected(f"point {k}: time_from_start must be finite and >= 0, got {tfs}")
            if parsed and start + tfs <= parsed[-1].time:
                raise TrajectoryRejected(f"point {k}: time_from_start must increase strictly, got {tfs}")
            ordered = []
            for what, values in zip(("positions", "velocities", "accelerations"), arrays):
                if values.shape != (len(joint_names),):
                    raise TrajectoryRejected(f"point {k}: expected {len(joint_names)} {what}, got shape "
                                             f"{values.shape}")
                if not np.all(np.isfinite(values)):
                    raise TrajectoryRejected(f"point {k}: {what} must be finite, got {values.tolist()}")
                inner = np.empty(len(self._names))
                inner[order] = values
                ordered.append(inner)
            outside = (ordered[0] < self._lower) | (ordered[0] > self._upper)
            if np.any(outside):
                j = int(np.argmax(outside))
                raise TrajectoryRejected(
                    f"point {k}: {self._names[j]} = {ordered[0][j]:.4f} rad is outside its limits "
                    f"[{self._lower[j]:.4f}, {self._upper[j]:.4f}]"
                )
            ordered += [None] * (3 - len(ordered))
            parsed.append(TrajectoryPoint(start + tfs, *ordered))
        if self.join == "desired":
            # JTC joins at the state it commanded in the previous update, a cycle before; the
            # model takes the update at ``now`` itself (the same state for a cycle-exact caller).
            (q, v, a), join_time = self._evaluate(now), now
        else:
            if measured is None:
                raise ValueError("join='measured' needs the measured (position, velocity)")
            q, v = (np.asarray(x, dtype=np.float64) for x in measured)
            a, join_time = np.zeros_like(q), now
        first = parsed[0]
        self._before = TrajectoryPoint(join_time, q.copy(),
                                       None if first.velocities is None else v.copy(),
                                       None if first.accelerations is None else a.copy())
        self._points = parsed

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


def _or(values: np.ndarray | None, default: np.ndarray) -> np.ndarray:
    return default.copy() if values is None else values.copy()
