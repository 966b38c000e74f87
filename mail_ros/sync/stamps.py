"""Time in the core: integer nanoseconds, one conversion, and one gate for stamps ahead of the clock.

A ROS ``builtin_interfaces/Time`` (``sec``, ``nanosec``) and a rosbag2 receive time are integers
of nanoseconds. As float seconds since the epoch they resolve only about 0.24 us at 1.7e9 s, and
two conversions of the same instant (``n / 1e9`` and ``n * 1e-9``) can differ in the last bit, so
a rule such as "the latest command received at or before the frame's stamp" would resolve an
exact tie one way or the other depending on how each number rounded. The core therefore keeps
stamps and bag times as ``int`` nanoseconds and compares them exactly; float seconds are for
durations (a skew, a period, an age) and for display, and come from :func:`ns_to_seconds`.

The stamp gate (:class:`StampGate`) is the one rule every receiver applies to a header stamp
before using it: camera_sync_node, policy_node and the executor against their node clock,
``mail-ros convert`` and the replay against the bag's receive time. A zero stamp is refused
("unstamped": its age cannot be known), and so is a stamp further ahead of the receiver's clock
than ``max_lead`` ("future": the two clocks disagree, and anything keyed by that stamp would be
looked up off by as much).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_STAMP_LEAD",
    "NS_PER_SECOND",
    "StampError",
    "StampGate",
    "ns_to_seconds",
    "ns_to_stamp",
    "seconds_to_ns",
    "stamp_to_ns",
]

NS_PER_SECOND = 1_000_000_000
# How far (s) a stamp may lead the clock of whoever receives it before the two clocks are taken to
# disagree: camera_sync_node, policy_node, the executor, `mail-ros convert` and replay refuse more.
DEFAULT_MAX_STAMP_LEAD = 0.05


class StampError(ValueError):
    """A time that is not a valid stamp: nanosec out of range, non-integral or non-finite."""


def stamp_to_ns(sec: int, nanosec: int) -> int:
    """ROS ``Time``/``Duration`` fields to integer nanoseconds (exact)."""
    if not (isinstance(sec, numbers.Integral) and isinstance(nanosec, numbers.Integral)):
        raise StampError(f"stamp fields must be integers, got sec={sec!r} nanosec={nanosec!r}")
    if not 0 <= nanosec < NS_PER_SECOND:
        raise StampError(f"nanosec must be in [0, 1e9), got {nanosec}")
    return int(sec) * NS_PER_SECOND + int(nanosec)


def ns_to_stamp(ns: int) -> tuple[int, int]:
    """Integer nanoseconds to ``(sec, nanosec)`` with ``0 <= nanosec < 1e9`` (exact)."""
    if not isinstance(ns, numbers.Integral):
        raise StampError(f"a stamp in nanoseconds must be an integer, got {ns!r}")
    sec, nanosec = divmod(int(ns), NS_PER_SECOND)
    return sec, nanosec


def seconds_to_ns(seconds: float) -> int:
    """Float seconds to the nearest integer nanosecond (for durations and configured times)."""
    if not math.isfinite(seconds):
        raise StampError(f"cannot convert non-finite time {seconds} to nanoseconds")
    return round(seconds * NS_PER_SECOND)


def ns_to_seconds(ns: int) -> float:
    """Integer nanoseconds to float seconds, correctly rounded (Python's int / int)."""
    return ns / NS_PER_SECOND


@dataclass(frozen=True)
class StampGate:
    """Whether a receiver may use a message stamped ``stamp_ns`` when its clock reads ``now_ns``."""

    max_lead: float = DEFAULT_MAX_STAMP_LEAD  # s; a stamp further ahead of the receiver's clock is refused

    def __post_init__(self) -> None:
        if not (isinstance(self.max_lead, numbers.Real) and math.isfinite(self.max_lead) and self.max_lead >= 0):
            raise StampError(f"max stamp lead must be >= 0 seconds, got {self.max_lead}")

    @property
    def max_lead_ns(self) -> int:
        return seconds_to_ns(self.max_lead)

    def check(self, stamp_ns: int, now_ns: int) -> str | None:
        """None when the stamp may be used; else the reason: ``"unstamped"``, ``"no_clock"`` (the
        receiver's clock reads zero: simulated time before the first /clock) or ``"future"``."""
        if stamp_ns <= 0:
            return "unstamped"
        if now_ns <= 0:
            return "no_clock"
        if stamp_ns - now_ns > self.max_lead_ns:
            return "future"
        return None

    def explain(self, reason: str, stamp_ns: int, now_ns: int, parameter: str = "max_stamp_lead") -> str:
        """A log line for a refusal by :meth:`check`; ``parameter`` names the receiver's setting."""
        if reason == "unstamped":
            return "no header stamp (its age cannot be known)"
        if reason == "no_clock":
            return "the receiver's clock has not started (use_sim_time, and no /clock message yet)"
        return (f"stamped {ns_to_seconds(stamp_ns - now_ns) * 1e3:.0f} ms ahead of the receiver's clock "
                f"({parameter} {self.max_lead * 1e3:.0f} ms): the clocks disagree")
