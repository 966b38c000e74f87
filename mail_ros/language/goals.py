"""Goals that arrive over two subscriptions: pairing the two copies of one publication.

A goal topic must match any publisher. ``ros2 topic pub`` publishes VOLATILE by default from Iron
on and TRANSIENT_LOCAL on Humble; a goal published before the pipeline starts survives only
transient-local, and only a transient-local subscription receives it. But a transient-local
subscription never matches a volatile publisher. So a node takes goals through two
subscriptions, one of each durability. A volatile publication then arrives once (volatile
subscription), a transient-local one twice (both), and a transient-local one published before
the node started once (transient-local subscription, from the publisher's history).

:class:`DuplicateGoalFilter` pairs the two copies of one publication so each is applied once. The
middleware gives no publication identity on every distro (rclpy's MessageInfo has no publisher
gid before Kilted, and Humble's subscriptions cannot receive MessageInfo at all), so copies pair
by content: a goal arriving on one subscription is the copy of an equal goal that arrived on the
other one less than ``window`` seconds earlier and is not yet paired. Pairing is one-to-one, so as
long as both copies of a publication arrive within the window, every publication is applied
exactly once, in any interleaving (test_language_goals.py). What the window costs: an equal goal
published volatile within ``window`` after a goal delivered only from the transient-local history
is taken for its copy (the goal is already that one; it is not restarted).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

CHANNELS = ("transient_local", "volatile")
# The two copies of one publication reach the node's two readers from one write: a few ms apart,
# up to about a second when executor threads are starved on a loaded machine.
DEFAULT_WINDOW = 2.0


class DuplicateGoalFilter:
    """``accept(channel, goal, now)``: True for a goal to apply, False for the copy of one applied.

    ``now`` is a monotonic time in seconds (the caller's clock; tests step it explicitly).
    """

    def __init__(self, window: float = DEFAULT_WINDOW):
        if not window > 0:
            raise ValueError(f"window must be positive, got {window}")
        self.window = float(window)
        self._unpaired: dict[str, deque[tuple[float, Hashable]]] = {channel: deque() for channel in CHANNELS}

    def accept(self, channel: str, goal: Hashable, now: float) -> bool:
        if channel not in self._unpaired:
            raise ValueError(f"unknown channel {channel!r}; expected one of {CHANNELS}")
        for pending in self._unpaired.values():
            while pending and now - pending[0][0] >= self.window:
                pending.popleft()
        other = self._unpaired[CHANNELS[1 - CHANNELS.index(channel)]]
        for index, (_, earlier) in enumerate(other):
            if earlier == goal:
                del other[index]
                return False
        self._unpaired[channel].append((now, goal))
        return True


__all__ = ["CHANNELS", "DEFAULT_WINDOW", "DuplicateGoalFilter"]
