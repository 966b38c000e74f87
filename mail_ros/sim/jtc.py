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

__all__ = ["JOINS", "JointTrajectoryController", "TrajectoryRejected", "interpolate"]

JOINS = ("desired", "measured")
ORDERS = {1: "linear", 2: "cubic", 3: "quintic"}  # fields a point carries -> interpolation


class TrajectoryRejected(ValueError):
    """A joint trajectory was refused; the controller keeps its active trajectory."""


def interpolate(fields: int, start: np.ndarray, end: np.ndarray, duration: np.ndarray,
                s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """JTC's ``interpolate_between_points`` inside a segment, for many samples at once.

    ``start``/``end`` are (3, ..., J) stacks of positions, velocities and accelerations at the
    segment's ends (the fields beyond ``fields`` are ignored), ``duration`` and ``s`` (time into
    the segment, 0 <= s <= duration) broadcast against (..., J). ``fields`` 1: linear, 2: cubic
    Hermite, 3: quintic. Returns (position, velocity, acceleration).
    """
    p0, v0, a0 = start
    p1, v1, a1 = end
    T = duration
    if fields == 1:
        slope = np.divide(p1 - p0, T, out=np.zeros(np.broadcast(p0, T).shape), where=T != 0.0)
        return p0 + s * slope, slope + 0.0 * s, np.zeros(np.broadcast(p0, s).shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        if fields == 2:
            c2 = (-3.0 * p0 + 3.0 * p1 - 2.0 * v0 * T - v1 * T) / T**2
            c3 = (2.0 * p0 - 2.0 * p1 + v0 * T + v1 * T) / T**3
            c4 = c5 = 0.0
        else:
            c2 = 0.5 * a0
            c3 = (-20.0 * p0 + 20.0 * p1 - 3.0 * a0 * T**2 + a1 * T**2 - 12.0 * v0 * T - 8.0 * v1 * T) / (2.0 * T**3)
            c4 = (30.0 * p0 - 30.0 * p1 + 3.0 * a0 * T**2 - 2.0 * a1 * T**2 + 16.0 * v0 * T
                  + 14.0 * v1 * T) / (2.0 * T**4)
            c5 = (-12.0 * p0 + 12.0 * p1 - a0 * T**2 + a1 * T**2 - 6.0 * v0 * T - 6.0 * v1 * T) / (2.0 * T**5)
    if np.any(T == 0.0):  # JTC leaves the higher coefficients at zero for a zero-length segment
        zero = T == 0.0
        c2 = np.where(zero, 0.5 * a0 if fields == 3 else 0.0, c2)
        c3, c4, c5 = (np.where(zero, 0.0, c) for c in (c3, c4, c5))
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
        return float(self._times[-1]) if len(self._times) > 1 else -math.inf

    def hold(self, positions: np.ndarray) -> None:
        """Drop any trajectory and hold ``positions`` (J,) at rest from now on (used on reset)."""
        positions = np.asarray(positions, dtype=np.float64).copy()
        if positions.shape != (len(self._names),):
            raise ValueError(f"hold positions must have shape ({len(self._names)},), got {positions.shape}")
        # Row 0 is the point before the trajectory (the join), then the trajectory's points.
        self._times = np.array([-math.inf])  # (K + 1,)
        self._states = np.zeros((3, 1, len(self._names)))  # (3, K + 1, J): positions, velocities, accelerations
        self._states[0, 0] = positions
        self._fields = 1  # fields every point carries (the join point is completed with zeros)

    def sample(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The controller update at ``t``: (position, velocity, acceleration), each (J,)."""
        q, v, a = self.sample_many(np.array([t], dtype=np.float64))
        return q[0], v[0], a[0]

    def setpoint(self, t: float) -> np.ndarray:
        """The (J,) position setpoint of the update at ``t``."""
        return self.sample(t)[0]

    def sample_many(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Updates at each of ``times`` (N,): (position, velocity, acceleration), each (N, J)."""
        times = np.asarray(times, dtype=np.float64)
        knots, states = self._times, self._states
        segment = np.searchsorted(knots, times, side="right") - 1  # (N,) knots[segment] <= t < knots[segment + 1]
        held = (segment < 0) | (segment >= len(knots) - 1)
        # Before the join: the join point; after the last point: the last point (its position held).
        held_row = np.where(segment < 0, 0, len(knots) - 1)
        out = [states[f, held_row].copy() for f in range(3)]
        if self._fields < 3:
            out[2][:] = 0.0
            if self._fields < 2:
                out[1][:] = 0.0
        inside = np.flatnonzero(~held)
        if len(inside):
            k = segment[inside]
            duration = (knots[k + 1] - knots[k])[:, None]  # (M, 1)
            s = (times[inside] - knots[k])[:, None]
            values = interpolate(self._fields, states[:, k], states[:, k + 1], duration, s)
            for f in range(3):
                out[f][inside] = values[f]
        return out[0], out[1], out[2]

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
        fields = None
        for k, point in enumerate(points):
            if not isinstance(point, (tuple, list)) or not 2 <= len(point) <= 4:
                raise TrajectoryRejected(f"point {k} must be (time_from_start, positions[, velocities[, "
                                         f"accelerations]]), got {point!r}")
            if fields is None:
                fields = len(point) - 1
            elif len(point) - 1 != fields:
                raise TrajectoryRejected(f"point {k} carries {len(point) - 1} fields, point 0 carries {fields}")
        try:
            offsets = np.array([float(point[0]) for point in points])
            values = np.array([[np.asarray(point[f + 1], dtype=np.float64) for f in range(fields)]
                               for point in points], dtype=np.float64)  # (K, F, n)
        except (TypeError, ValueError) as exc:
            raise TrajectoryRejected(f"points must hold numbers, {len(joint_names)} per field: {exc}") from exc
        if values.shape[2:] != (len(joint_names),) or values.ndim != 3:
            raise TrajectoryRejected(f"expected {len(joint_names)} values per field, got shape {values.shape[1:]}")
        bad_time = ~np.isfinite(offsets) | (offsets < 0.0)
        if bad_time.any():
            k = int(np.argmax(bad_time))
            raise TrajectoryRejected(f"point {k}: time_from_start must be finite and >= 0, got {offsets[k]}")
        times = start + offsets
        if np.any(np.diff(times) <= 0.0):
            k = int(np.argmax(np.diff(times) <= 0.0)) + 1
            raise TrajectoryRejected(f"point {k}: time_from_start must increase strictly, got {offsets[k]}")
        if not np.all(np.isfinite(values)):
            k, f = (int(i) for i in np.argwhere(~np.isfinite(values))[0][:2])
            what = ("positions", "velocities", "accelerations")[f]
            raise TrajectoryRejected(f"point {k}: {what} must be finite, got {values[k, f].tolist()}")
        ordered = np.zeros((3, len(points), len(self._names)))  # (3, K, J) in controller order
        ordered[:fields][:, :, order] = values.transpose(1, 0, 2)
        outside = (ordered[0] < self._lower) | (ordered[0] > self._upper)
        if np.any(outside):
            k, j = (int(i) for i in np.argwhere(outside)[0])
            raise TrajectoryRejected(
                f"point {k}: {self._names[j]} = {ordered[0, k, j]:.4f} rad is outside its limits "
                f"[{self._lower[j]:.4f}, {self._upper[j]:.4f}]"
            )
        if self.join == "desired":
            # JTC joins at the state it commanded in the previous update, a cycle before; the
            # model takes the update at ``now`` itself (the same state for a cycle-exact caller).
            join = np.stack(self.sample(now))
        else:
            if measured is None:
                raise ValueError("join='measured' needs the measured (position, velocity)")
            q, v = (np.asarray(x, dtype=np.float64) for x in measured)
            join = np.stack([q, v, np.zeros_like(q)])
        self._times = np.concatenate([[now], times])
        self._states = np.concatenate([join[:, None, :], ordered], axis=1)
        self._fields = fields

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
