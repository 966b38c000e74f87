"""The observation history a policy conditions on: one set of rules for policy_node and replay."""

from __future__ import annotations

from collections import deque

from mail_ros.spec import Observation
from mail_ros.sync.stamps import seconds_to_ns


class ObservationHistory:
    """The last T observations the policy conditions on, shared by policy_node and offline replay.

    An observation stamped like the last one is ignored (a duplicate). One stamped earlier
    restarts the history with it: time went backwards (a simulator or bag restarted, a clock
    was reset), and waiting for the stream to pass the old stamps again would block the policy.
    One that follows the last by more than ``max_gap_periods`` policy periods also restarts the
    history (a stream outage must not leave stale frames in the window). Stamps are integer
    nanoseconds, so "stamped like the last one" is exact.
    """

    def __init__(self, obs_horizon: int, period: float, max_gap_periods: float = 3.0) -> None:
        if obs_horizon < 1:
            raise ValueError(f"obs_horizon must be >= 1, got {obs_horizon}")
        if not (period > 0 and max_gap_periods > 0):
            raise ValueError(f"period and max_gap_periods must be positive, got {period}, {max_gap_periods}")
        self.max_gap_ns = seconds_to_ns(max_gap_periods * period)
        self._window: deque[Observation] = deque(maxlen=obs_horizon)

    def __len__(self) -> int:
        return len(self._window)

    def clear(self) -> None:
        self._window.clear()

    def add(self, observation: Observation) -> str | None:
        """Append ``observation``; returns ``"duplicate"`` (ignored), ``"backwards"`` (restarted:
        stamped before the last), ``"restart"`` (restarted after a gap) or None."""
        outcome = None
        if self._window:
            last = self._window[-1].stamp
            if observation.stamp == last:
                return "duplicate"
            if observation.stamp < last:
                outcome = "backwards"
            elif observation.stamp - last > self.max_gap_ns:
                outcome = "restart"
        if outcome is not None:
            self._window.clear()
        self._window.append(observation)
        return outcome

    def window(self) -> list[Observation]:
        """Oldest first, at most T observations."""
        return list(self._window)
