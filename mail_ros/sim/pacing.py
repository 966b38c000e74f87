"""Pacing of the simulation against the wall clock: at most ``factor`` simulated seconds per wall
second, and never a burst.

The simulator steps as fast as the CPU allows and sleeps whenever it is ahead of its schedule
(``factor`` simulated seconds per wall second since the schedule's origin). When it is behind
by more than ``max_debt`` wall seconds (the computer could not keep up), the schedule restarts
from now instead of letting the simulation race to catch up: the nodes reading its /clock would
otherwise see simulated time leap past their timers and callbacks, and every command they send
would arrive late. So ``factor`` is a maximum rate, not an average the simulation makes up for.

Pure and clock-free: the caller passes the simulated and the wall time (``time.monotonic()``)
and sleeps for what :meth:`Pacer.delay` returns.
"""

from __future__ import annotations

__all__ = ["Pacer"]


class Pacer:
    """The schedule of one run of the simulation (restart it with :meth:`restart` on a reset)."""

    def __init__(self, factor: float, max_debt: float, sim_time: float, wall_time: float) -> None:
        """``factor`` simulated seconds per wall second (0: unpaced, as fast as the CPU goes);
        ``max_debt`` wall seconds behind the schedule tolerated before it restarts."""
        if factor < 0 or max_debt < 0:
            raise ValueError(f"factor and max_debt must be >= 0, got {factor} and {max_debt}")
        self.factor = factor
        self.max_debt = max_debt
        self.restart(sim_time, wall_time)

    def restart(self, sim_time: float, wall_time: float) -> None:
        """The schedule starts over at (``sim_time``, ``wall_time``)."""
        self._sim_origin, self._wall_origin = sim_time, wall_time

    def delay(self, sim_time: float, wall_time: float) -> float:
        """Wall seconds to sleep before the step after ``sim_time`` (0 when not ahead); restarts
        the schedule from now when it is behind by more than ``max_debt``."""
        if self.factor == 0:
            return 0.0
        ahead = (sim_time - self._sim_origin) / self.factor - (wall_time - self._wall_origin)
        if ahead < -self.max_debt:
            self.restart(sim_time, wall_time)
            return 0.0
        return max(ahead, 0.0)
