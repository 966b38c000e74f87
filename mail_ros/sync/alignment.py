"""Approximate-time alignment of sensor streams at the policy rate.

The same ``StreamAligner`` runs inside camera_sync_node (online: ``push`` on every message,
``poll`` on a timer) and in the bag converter (offline: ``push`` in bag order, then ``flush``),
so training and deployment see identical observation sets.

Semantics
---------
* The first configured stream is the *reference* (a camera). Reference frames are decided one at
  a time, in stamp order.
* For every other stream the member is the message whose stamp is closest to the reference
  stamp (ties go to the earlier message). The choice for a stream is *final* once that stream
  holds a message with stamp >= the reference stamp (for a stream delivered in order, later
  messages can only be farther), or once the receiver time ``now`` passed to ``poll`` exceeds
  ``ref + max_skew + latency_allowance`` (whatever was late by more than the allowance is ignored).
* If some stream has no message within ``max_skew`` of the reference, the frame is dropped with
  reason ``"no_match:<stream>"`` (the first such stream in configuration order).
* Decimation to the policy rate keeps a stable time grid: the first emitted set anchors a target
  ``T = stamp + period``; a later reference frame is considered only if its stamp is
  ``>= T - tolerance / 2``; emitting at stamp ``r`` moves the target to ``T + period``, or
  re-anchors it to ``r + period`` when ``r >= T + tolerance / 2`` (a gap in the stream, e.g. after
  dropped frames). Consecutive emitted sets are therefore at least ``period - tolerance`` apart
  and the long-run rate is exactly ``1 / period`` while frames keep coming. ``tolerance`` defaults
  to one reference-camera interval (the median of the last 15 intervals between reference
  frames, at most ``period``), so the frame taken for a grid point is the one nearest to it even
  with a jittery camera. Frames skipped this way count as ``"decimated"`` (not an error).
* A reference frame not newer than the last decided one is dropped as ``"late"``; so is any
  other message that arrives when it can no longer be the closest match of any future reference
  frame. Non-monotonic stamps within a stream are otherwise fine (sorted insert).
* A non-reference message that leaves the buffer without having been a member of an emitted set
  counts as dropped ``"unused"``; a message may be a member of several sets and counts as used
  once. Every received message ends up counted exactly once: after ``flush``,
  ``received == used + sum(dropped)`` per stream.
* Buffers: a message that can never be chosen again is removed as soon as the reference cursor
  passes it; ``poll(now)`` also evicts messages older than ``now - buffer_seconds`` (which must
  exceed the worst reference latency plus ``max_skew``). ``push`` alone never evicts by time, so
  offline input pushed in bag order and flushed at the end yields the same sets as the online
  path whenever each stream arrives in stamp order within ``latency_allowance``.

Stamps and receiver times are integer nanoseconds (:mod:`mail_ros.sync.stamps`), so equal stamps
are equal and ties (closest partner, grid window, timeouts) resolve by the rules above, never by
how a float rounded; the configuration is in seconds, converted once. Skews are reported in
seconds. Not thread-safe: callers serialise ``push``/``poll`` (one callback group in the node).
"""

from __future__ import annotations

import bisect
import math
import numbers
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mail_ros.sync.stamps import ns_to_seconds, seconds_to_ns

__all__ = [
    "DEFAULT_MAX_SKEW",
    "AlignedSet",
    "AlignerConfig",
    "StreamAligner",
    "StreamStats",
    "SyncError",
    "SyncStats",
]

# Bounds memory of the skew statistics on a long-running node; percentiles use the newest samples.
SKEW_SAMPLES_KEPT = 10_000
# Number of reference intervals whose median estimates the camera interval (the default tolerance).
INTERVAL_WINDOW = 15
# Default max_skew (s) of every aligner: camera_sync_node, `mail-ros convert` and replay must pair
# the same messages, or the robot sees observations that training and offline evaluation never had.
DEFAULT_MAX_SKEW = 0.02


class SyncError(ValueError):
    """Bad input to the aligner: unknown stream, a stamp that is not integer ns, or an invalid configuration."""


@dataclass(frozen=True)
class AlignerConfig:
    """Which streams to align and how strictly; all times in seconds."""

    streams: tuple[str, ...]  # the first is the reference stream (a camera)
    max_skew: float  # every member stamp within this of the reference stamp
    period: float = 0.0  # emitted sets about this far apart (policy period); 0 = every reference frame
    latency_allowance: float = 0.05  # how long after ref + max_skew to wait (by `now`) for late arrivals
    buffer_seconds: float = 2.0  # history kept per stream by `poll`
    decimation_tolerance: float | None = None  # grid window; None = one measured reference interval

    def __post_init__(self) -> None:
        object.__setattr__(self, "streams", tuple(self.streams))
        if not self.streams or not all(isinstance(s, str) and s for s in self.streams):
            raise SyncError(f"streams must be a non-empty list of names, got {list(self.streams)}")
        if len(set(self.streams)) != len(self.streams):
            raise SyncError(f"stream names must be unique, got {list(self.streams)}")
        for name in ("max_skew", "period", "latency_allowance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SyncError(f"{name} must be a finite number >= 0, got {value}")
        minimum = 2 * self.max_skew + self.latency_allowance
        if not (math.isfinite(self.buffer_seconds) and self.buffer_seconds > minimum):
            raise SyncError(
                f"buffer_seconds must exceed 2 * max_skew + latency_allowance = {minimum:.3f} s, "
                f"got {self.buffer_seconds}"
            )
        tol = self.decimation_tolerance
        if tol is not None and not (math.isfinite(tol) and 0 <= tol <= self.period):
            raise SyncError(f"decimation_tolerance must be in [0, period={self.period}], got {tol}")

    @property
    def reference(self) -> str:
        return self.streams[0]

    @property
    def max_skew_ns(self) -> int:
        return seconds_to_ns(self.max_skew)

    @property
    def period_ns(self) -> int:
        return seconds_to_ns(self.period)

    @property
    def wait_ns(self) -> int:
        """How long after a reference stamp ``poll`` waits before deciding with what arrived."""
        return self.max_skew_ns + seconds_to_ns(self.latency_allowance)

    @property
    def buffer_ns(self) -> int:
        return seconds_to_ns(self.buffer_seconds)


@dataclass(frozen=True)
class AlignedSet:
    """One decided observation set: the reference frame and its closest partner in every stream."""

    stamp: int  # the reference message's stamp (ns)
    members: dict[str, tuple[int, Any]]  # stream -> (stamp in ns, payload); includes the reference

    @property
    def skew(self) -> dict[str, float]:
        """Member stamp minus reference stamp, per stream (seconds)."""
        return {name: ns_to_seconds(stamp - self.stamp) for name, (stamp, _) in self.members.items()}


@dataclass
class StreamStats:
    """Accounting of one stream: every received message is used once or dropped once."""

    received: int = 0
    used: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    skews: deque[float] = field(default_factory=lambda: deque(maxlen=SKEW_SAMPLES_KEPT))

    @property
    def pending(self) -> int:
        """Messages still buffered (neither used nor dropped yet); 0 after ``flush``."""
        return self.received - self.used - sum(self.dropped.values())


class SyncStats:
    """Per-stream counters and skew samples (member stamp - reference stamp) of emitted sets."""

    def __init__(self, streams: tuple[str, ...]) -> None:
        self.streams: dict[str, StreamStats] = {name: StreamStats() for name in streams}
        self.emitted = 0

    def __getitem__(self, stream: str) -> StreamStats:
        return self.streams[stream]

    def skew_percentiles_ms(self, stream: str, percentiles: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
        """Percentiles of |skew| in milliseconds, keyed ``"p50"`` etc.; empty without samples."""
        samples = self.streams[stream].skews
        if not samples:
            return {}
        values = np.percentile(np.abs(np.fromiter(samples, float)) * 1e3, percentiles)
        return {f"p{q:g}": float(v) for q, v in zip(percentiles, values)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (counts, drop reasons, skew percentiles and mean signed skew in ms)."""
        streams = {}
        for name, s in self.streams.items():
            entry: dict[str, Any] = {
                "received": s.received,
                "used": s.used,
                "dropped": dict(sorted(s.dropped.items())),
                "pending": s.pending,
                "skew_ms": self.skew_percentiles_ms(name),
            }
            if s.skews:
                entry["skew_ms"]["mean_signed"] = float(np.mean(np.fromiter(s.skews, float)) * 1e3)
            streams[name] = entry
        return {"emitted": self.emitted, "streams": streams}


@dataclass
class _Message:
    stamp: int
    payload: Any
    used: bool = False


class _SortedBuffer:
    """Messages of one stream sorted by stamp; equal stamps keep arrival order."""

    def __init__(self) -> None:
        self.stamps: list[int] = []
        self.messages: list[_Message] = []

    def __len__(self) -> int:
        return len(self.stamps)

    def insert(self, stamp: int, payload: Any) -> None:
        i = bisect.bisect_right(self.stamps, stamp)
        self.stamps.insert(i, stamp)
        self.messages.insert(i, _Message(stamp, payload))

    def pop_front(self, count: int) -> list[_Message]:
        removed = self.messages[:count]
        del self.stamps[:count], self.messages[:count]
        return removed


class StreamAligner:
    """Approximate-time aligner; see the module docstring for the exact semantics."""

    def __init__(self, config: AlignerConfig) -> None:
        self.config = config
        self._stats = SyncStats(config.streams)
        self._clear()

    @property
    def stats(self) -> SyncStats:
        return self._stats

    def push(self, stream: str, stamp: int, payload: Any) -> None:
        """Add one message stamped ``stamp`` (ns); sets decided by stamps alone are queued for the
        next ``poll``/``flush``."""
        if stream not in self._stats.streams:
            raise SyncError(f"unknown stream {stream!r}; configured streams: {list(self.config.streams)}")
        stamp = _ns(stamp, f"stamp on stream {stream!r}")
        stats = self._stats[stream]
        stats.received += 1
        if stream == self.config.reference:
            if stamp <= self._cursor:
                stats.dropped["late"] += 1
                return
            self._pending.insert(stamp, payload)
        else:
            buffer = self._buffers[stream]
            if self._is_dead(buffer, stamp):
                stats.dropped["late"] += 1
                return
            buffer.insert(stamp, payload)
        self._decide(now=None, final=False)

    def poll(self, now: int) -> list[AlignedSet]:
        """Decide what receiver time ``now`` (ns) allows, evict old history, return the newly decided sets."""
        now = _ns(now, "receiver time")
        self._decide(now=now, final=False)
        horizon = now - self.config.buffer_ns
        for name, buffer in self._buffers.items():
            self._discard(name, buffer.pop_front(bisect.bisect_left(buffer.stamps, horizon)))
        return self._take_ready()

    def flush(self) -> list[AlignedSet]:
        """End of input: decide every pending reference frame and release all buffered messages."""
        self._decide(now=None, final=True)
        for name, buffer in self._buffers.items():
            self._discard(name, buffer.pop_front(len(buffer)))
        return self._take_ready()

    def reset(self) -> None:
        """Forget all buffered messages and the decimation grid (e.g. after a clock jump).

        Buffered messages are counted as dropped ``"reset"``; sets decided but not yet returned
        are discarded too (their messages stay counted as used). Statistics are cumulative.
        """
        ref = self.config.reference
        self._stats[ref].dropped["reset"] += len(self._pending)
        for name, buffer in self._buffers.items():
            self._stats[name].dropped["reset"] += sum(not m.used for m in buffer.messages)
        self._clear()

    def _clear(self) -> None:
        self._pending = _SortedBuffer()
        self._buffers = {name: _SortedBuffer() for name in self.config.streams[1:]}
        self._ready: list[AlignedSet] = []
        self._cursor = -math.inf  # stamp of the last decided reference frame
        self._target: int | None = None  # next grid time for decimation (ns)
        self._intervals: deque[int] = deque(maxlen=INTERVAL_WINDOW)  # between reference frames (ns)

    def _take_ready(self) -> list[AlignedSet]:
        ready, self._ready = self._ready, []
        return ready

    def _is_dead(self, buffer: _SortedBuffer, stamp: int) -> bool:
        # Every future reference frame is newer than the cursor, so a message is useless if it is
        # too far before the cursor or if a newer message at or before the cursor exists.
        if stamp < self._cursor - self.config.max_skew_ns:
            return True
        after = bisect.bisect_right(buffer.stamps, stamp)
        return stamp <= self._cursor and after < len(buffer) and buffer.stamps[after] <= self._cursor

    def _discard(self, stream: str, messages: list[_Message]) -> None:
        self._stats[stream].dropped["unused"] += sum(not m.used for m in messages)

    def _tolerance(self, gap: int | None) -> float:
        """Grid window (ns) for judging a reference frame that follows the last decided one by ``gap``."""
        if self.config.decimation_tolerance is not None:
            return seconds_to_ns(self.config.decimation_tolerance)
        samples = [*self._intervals, gap] if gap is not None else list(self._intervals)
        if not samples:
            return 0
        # The median of an even count may end in .5 ns; comparisons of ints with it stay exact.
        return min(statistics.median(samples[-INTERVAL_WINDOW:]), self.config.period_ns)

    def _decide(self, now: int | None, final: bool) -> None:
        cfg = self.config
        while self._pending:
            ref = self._pending.stamps[0]
            gap = ref - self._cursor if self._cursor > -math.inf else None
            tolerance = self._tolerance(gap)
            decimated = self._target is not None and ref < self._target - tolerance / 2
            timed_out = now is not None and now > ref + cfg.wait_ns
            if not (final or timed_out or decimated):
                if any(bisect.bisect_left(b.stamps, ref) == len(b) for b in self._buffers.values()):
                    return
            (ref_message,) = self._pending.pop_front(1)
            if gap is not None:
                self._intervals.append(gap)
            self._cursor = ref
            if decimated:
                self._stats[cfg.reference].dropped["decimated"] += 1
            else:
                self._match(ref_message, tolerance)
            for name, buffer in self._buffers.items():
                self._prune(name, buffer)

    def _match(self, ref_message: _Message, tolerance: float) -> None:
        cfg = self.config
        ref = ref_message.stamp
        chosen: dict[str, _Message] = {}
        for name, buffer in self._buffers.items():
            best = _closest(buffer, ref)
            if best is None or abs(best.stamp - ref) > cfg.max_skew_ns:
                self._stats[cfg.reference].dropped[f"no_match:{name}"] += 1
                return
            chosen[name] = best
        self._stats[cfg.reference].used += 1
        members = {cfg.reference: (ref, ref_message.payload)}
        for name, message in chosen.items():
            stats = self._stats[name]
            if not message.used:
                message.used = True
                stats.used += 1
            stats.skews.append(ns_to_seconds(message.stamp - ref))
            members[name] = (message.stamp, message.payload)
        self._stats.emitted += 1
        self._ready.append(AlignedSet(ref, members))
        self._advance_grid(ref, tolerance)

    def _advance_grid(self, ref: int, tolerance: float) -> None:
        period = self.config.period_ns
        if period == 0:
            return
        if self._target is None or ref >= self._target + tolerance / 2:
            self._target = ref + period
        else:
            self._target += period

    def _prune(self, name: str, buffer: _SortedBuffer) -> None:
        # Keep the newest message at or before the cursor (it may still be closest to the next
        # reference frame) unless it is already more than max_skew behind.
        keep_from = max(
            bisect.bisect_right(buffer.stamps, self._cursor) - 1,
            bisect.bisect_left(buffer.stamps, self._cursor - self.config.max_skew_ns),
        )
        if keep_from > 0:
            self._discard(name, buffer.pop_front(keep_from))


def _ns(value: Any, what: str) -> int:
    # bool is an Integral too, but never a time.
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise SyncError(f"{what} must be integer nanoseconds, got {value!r}")
    return int(value)


def _closest(buffer: _SortedBuffer, stamp: int) -> _Message | None:
    i = bisect.bisect_left(buffer.stamps, stamp)
    before = buffer.messages[i - 1] if i > 0 else None
    after = buffer.messages[i] if i < len(buffer) else None
    if before is None or (after is not None and after.stamp - stamp < stamp - before.stamp):
        return after
    return before
