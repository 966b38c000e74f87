"""What a 1 kHz controller sees of a position setpoint: its worst acceleration and jerk.

libfranka checks the commanded joint positions of every 1 ms cycle; their second and third
finite differences are the acceleration and jerk it compares with the FR3's limits (10 rad/s^2,
5000 rad/s^3 per joint). :class:`SetpointMonitor` takes setpoints one cycle apart (the executor
feeds its own commands through the JTC model, the test bed its controller's output) and keeps
the worst of both per joint.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONTROLLER_PERIOD", "SetpointMonitor"]

CONTROLLER_PERIOD = 0.001  # s, the FR3's control cycle (controller_manager's update_rate 1000)


class SetpointMonitor:
    """Worst |second| and |third| finite difference of (J,) setpoints ``dt`` apart."""

    def __init__(self, dof: int, dt: float = CONTROLLER_PERIOD) -> None:
        self.dof = dof
        self.dt = dt
        self.worst_acceleration = np.zeros(dof)  # (J,) rad/s^2
        self.worst_jerk = np.zeros(dof)  # (J,) rad/s^3
        self._recent = np.empty((0, dof))  # (<= 3, J) the last setpoints, for the next differences

    def restart(self) -> None:
        """The setpoint was reset by something else (a simulator reset): no difference across it."""
        self._recent = np.empty((0, self.dof))

    def add(self, setpoints: np.ndarray) -> None:
        """Setpoints (N, J), consecutive cycles continuing the previous call's."""
        q = np.concatenate([self._recent, np.asarray(setpoints, dtype=np.float64).reshape(-1, self.dof)])
        if len(q) >= 3:
            acceleration = np.abs(np.diff(q, n=2, axis=0)).max(axis=0) / self.dt**2
            self.worst_acceleration = np.maximum(self.worst_acceleration, acceleration)
        if len(q) >= 4:
            jerk = np.abs(np.diff(q, n=3, axis=0)).max(axis=0) / self.dt**3
            self.worst_jerk = np.maximum(self.worst_jerk, jerk)
        self._recent = q[-3:]

    def take(self) -> tuple[float, float]:
        """(worst acceleration, worst jerk) over all joints since the last take, then start afresh."""
        worst = float(self.worst_acceleration.max()), float(self.worst_jerk.max())
        self.worst_acceleration = np.zeros(self.dof)
        self.worst_jerk = np.zeros(self.dof)
        return worst
