"""Turns predicted action chunks into one target per control tick.

Timing is absolute in every mode: action ``i`` of a chunk is due at
``stamp + (i + action_offset) * dt``, where ``stamp`` is the time of the newest observation the
chunk was computed from, and it may only be executed during its slot
``[due, due + dt)``. A slot that has ended is never executed later, so an action returned by
``next_action(now)`` was due at most ``dt`` ago, whatever the inference latency. Only the first
``execute_steps`` actions of each chunk (all of them by default) have slots.

Modes:
* ``"receding_horizon"``: execute the current chunk until its last slot ends, then switch to the
  newest chunk received meanwhile (MaIL's default with ``execute_steps = A``). A chunk that
  arrives late starts at the slot containing ``now``: its actions for slots already over are
  skipped, so it executes fewer than ``execute_steps`` actions; one whose slots are all over is
  dropped as ``"expired"``. A newer chunk arriving before the switch replaces a waiting one
  (``"superseded"``).
* ``"temporal_ensemble"`` (ACT): the weighted mean of every chunk's action for ``now``, with
  weight ``exp(-ensemble_decay * i)`` where ``i = 0`` is the OLDEST contributing chunk.
* ``"latency_compensation"``: switch to a new chunk as soon as it arrives, skipping its actions
  due before arrival (including the one whose slot is running); until its first remaining
  slot starts, the previous chunk continues.

Between due times the target is the action of the running slot (``interpolation="hold"``) or
the linear blend towards the next action of the same chunk (``"linear"``; also in the last
executed slot when the chunk has a next action), for control ticks faster than ``dt``.

All times are explicit arguments (no clock inside). Not thread-safe: the node serialises calls.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from mail_ros.sync.stamps import StampGate, seconds_to_ns

__all__ = ["SCHEDULER_MODES", "Chunk", "ChunkError", "ChunkScheduler"]

SCHEDULER_MODES = ("receding_horizon", "temporal_ensemble", "latency_compensation")
INTERPOLATIONS = ("hold", "linear")
# Slot arithmetic tolerance: a tick computed as stamp + i * dt may land a few ulps before the slot.
SLOT_EPSILON = 1e-9


class ChunkError(ValueError):
    """A malformed chunk or scheduler configuration (shape, dt, mode)."""


@dataclass(frozen=True, eq=False)
class Chunk:
    """A chunk of A actions predicted from observations up to ``stamp``, one action every ``dt`` s."""

    chunk_id: int
    stamp: float  # time of the newest observation used (s)
    dt: float  # s between consecutive actions
    actions: np.ndarray  # (A, action_dim)
    instruction_id: str  # identity of the goal it was predicted for

    def __post_init__(self) -> None:
        actions = np.array(self.actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1] == 0:
            raise ChunkError(f"chunk {self.chunk_id}: actions must be (A, action_dim) with A >= 1, got {actions.shape}")
        actions.setflags(write=False)
        object.__setattr__(self, "actions", actions)
        if not math.isfinite(self.stamp):
            raise ChunkError(f"chunk {self.chunk_id}: stamp must be finite, got {self.stamp}")
        if not (math.isfinite(self.dt) and self.dt > 0):
            raise ChunkError(f"chunk {self.chunk_id}: dt must be positive, got {self.dt}")

    @property
    def horizon(self) -> int:
        """A, the number of actions."""
        return self.actions.shape[0]


class _Scheduled:
    """A chunk with its slot range: actions ``first .. end - 1`` are executable."""

    def __init__(self, chunk: Chunk, start: float, first: int, end: int) -> None:
        self.chunk = chunk
        self.start = start  # due time of action 0
        self.first = first
        self.end = end

    def slot(self, now: float) -> int:
        return math.floor((now - self.start) / self.chunk.dt + SLOT_EPSILON)

    def over(self, now: float) -> bool:
        """Whether the last slot has ended (same rounding as ``slot``)."""
        return self.slot(now) >= self.end

    def action(self, now: float, linear: bool) -> np.ndarray | None:
        i = self.slot(now)
        if not self.first <= i < self.end:
            return None
        actions = self.chunk.actions
        # The blend runs towards the chunk's next action even past the executed slots (the last
        # executed slot of a receding horizon): it is where the policy wants the arm at the next
        # due time, and holding instead would lag the arm one dt behind at every switch.
        if not linear or i + 1 >= self.chunk.horizon:
            return actions[i]
        frac = min(max((now - self.start) / self.chunk.dt - i, 0.0), 1.0)
        return actions[i] + frac * (actions[i + 1] - actions[i])


class ChunkScheduler:
    """Keeps the accepted chunks of the current goal and answers "what to command now"."""

    def __init__(
        self,
        mode: str,
        action_dim: int,
        execute_steps: int | None = None,
        ensemble_decay: float = 0.01,
        *,
        action_offset: float = 0.0,
        max_chunk_age: float = 1.0,
        max_chunk_lead: float = 0.05,
        max_chunk_span: float = 5.0,
        interpolation: str = "hold",
        instruction_id: str | None = None,
    ) -> None:
        """
        Args:
            mode: one of ``SCHEDULER_MODES``.
            action_dim: expected width of every chunk's actions.
            execute_steps: slots per chunk (receding horizon's k); None = the whole chunk.
            ensemble_decay: m in the temporal-ensemble weights exp(-m * i).
            action_offset: action i is due at stamp + (i + action_offset) * dt.
            max_chunk_age: chunks whose stamp is older than this (s) when added are rejected.
            max_chunk_lead: chunks stamped further than this (s) after ``now`` are rejected: the
                clocks disagree, and such a chunk would block every later one until ``now``
                caught up with it.
            max_chunk_span: chunks whose executable actions span more than this (s) are
                rejected (a dt in the wrong unit would keep one chunk running for minutes).
            interpolation: ``"hold"`` or ``"linear"`` between due times.
            instruction_id: the current goal; None accepts chunks of any goal.
        """
        if mode not in SCHEDULER_MODES:
            raise ChunkError(f"unknown scheduler mode {mode!r}; expected one of {list(SCHEDULER_MODES)}")
        if action_dim < 1:
            raise ChunkError(f"action_dim must be >= 1, got {action_dim}")
        if execute_steps is not None and execute_steps < 1:
            raise ChunkError(f"execute_steps must be >= 1 or None, got {execute_steps}")
        if not (math.isfinite(ensemble_decay) and ensemble_decay >= 0):
            raise ChunkError(f"ensemble_decay must be >= 0, got {ensemble_decay}")
        if not math.isfinite(action_offset):
            raise ChunkError(f"action_offset must be finite, got {action_offset}")
        for name, value in (("max_chunk_age", max_chunk_age), ("max_chunk_span", max_chunk_span)):
            if not (math.isfinite(value) and value > 0):
                raise ChunkError(f"{name} must be positive, got {value}")
        if not (math.isfinite(max_chunk_lead) and max_chunk_lead >= 0):
            raise ChunkError(f"max_chunk_lead must be >= 0, got {max_chunk_lead}")
        if interpolation not in INTERPOLATIONS:
            raise ChunkError(f"unknown interpolation {interpolation!r}; expected one of {list(INTERPOLATIONS)}")
        self.mode = mode
        self.action_dim = action_dim
        self.execute_steps = execute_steps
        self.ensemble_decay = ensemble_decay
        self.action_offset = action_offset
        self.max_chunk_age = max_chunk_age
        self.max_chunk_lead = max_chunk_lead
        self._stamp_gate = StampGate(max_chunk_lead)
        self.max_chunk_span = max_chunk_span
        self.interpolation = interpolation
        self.counters: Counter[str] = Counter()  # "accepted", "rejected:<reason>", "superseded", "expired"
        self.reset(instruction_id)

    @property
    def instruction_id(self) -> str | None:
        """The current goal (None: any)."""
        return self._instruction_id

    def reset(self, instruction_id: str | None = None, now: float | None = None) -> None:
        """Goal change: discard every chunk; only chunks for ``instruction_id`` (None: any) are accepted.

        With ``now``, chunks whose stamp predates it are rejected as well (they were predicted
        from observations taken before the change).
        """
        self._instruction_id = instruction_id
        self._not_before = -math.inf if now is None else float(now)
        self._chunks: list[_Scheduled] = []  # ensemble / latency compensation: accepted, oldest first
        self._current: _Scheduled | None = None  # receding horizon: the chunk being executed
        self._waiting: _Scheduled | None = None  # receding horizon: the newest chunk received meanwhile
        self._newest_stamp = -math.inf

    def add_chunk(self, chunk: Chunk, now: float) -> bool:
        """Offer a chunk at receiver time ``now``; False (and a counted reason) if rejected.

        Raises ``ChunkError`` for a chunk of the wrong action width (a configuration bug).
        """
        if chunk.actions.shape[1] != self.action_dim:
            raise ChunkError(
                f"chunk {chunk.chunk_id} has action_dim {chunk.actions.shape[1]}, scheduler expects {self.action_dim}"
            )
        start = chunk.stamp + self.action_offset * chunk.dt
        first = 0
        if self.mode == "latency_compensation":
            # Skip every action due before arrival, including the one whose slot is running.
            first = max(0, math.floor((now - start) / chunk.dt - SLOT_EPSILON) + 1)
        end = chunk.horizon if self.execute_steps is None else min(self.execute_steps, chunk.horizon)
        scheduled = _Scheduled(chunk, start, first, end)
        reason = self._rejection(chunk, scheduled, now)
        if reason:
            self.counters[f"rejected:{reason}"] += 1
            return False
        self.counters["accepted"] += 1
        self._newest_stamp = chunk.stamp
        if self.mode != "receding_horizon":
            self._chunks.append(scheduled)
        else:
            if self._waiting is not None:
                self.counters["superseded"] += 1
            self._waiting = scheduled
        return True

    def next_action(self, now: float) -> np.ndarray | None:
        """The (action_dim,) target for the tick at ``now``, or None when nothing valid is due (hold)."""
        if not math.isfinite(now):
            raise ChunkError(f"next_action time must be finite, got {now}")
        linear = self.interpolation == "linear"
        if self.mode == "receding_horizon":
            return self._receding_horizon(now, linear)
        self._chunks = [c for c in self._chunks if not c.over(now)]
        candidates = [a for c in self._chunks if (a := c.action(now, linear)) is not None]
        if not candidates:
            return None
        if self.mode == "latency_compensation":
            return candidates[-1].copy()
        weights = np.exp(-self.ensemble_decay * np.arange(len(candidates)))  # oldest first, weighted most
        return weights @ np.stack(candidates) / weights.sum()  # (K,) @ (K, action_dim)

    def action_at(self, t: float) -> np.ndarray | None:
        """The target :meth:`next_action` would give at ``t`` (at or after the last call) with the
        chunks accepted so far, without advancing: the executor plans ahead with it."""
        if not math.isfinite(t):
            raise ChunkError(f"action_at time must be finite, got {t}")
        linear = self.interpolation == "linear"
        if self.mode == "receding_horizon":
            running = [c for c in (self._current, self._waiting) if c is not None and not c.over(t)]
            action = running[0].action(t, linear) if running else None
            return None if action is None else action.copy()
        candidates = [a for c in self._chunks if not c.over(t) and (a := c.action(t, linear)) is not None]
        if not candidates:
            return None
        if self.mode == "latency_compensation":
            return candidates[-1].copy()
        weights = np.exp(-self.ensemble_decay * np.arange(len(candidates)))
        return weights @ np.stack(candidates) / weights.sum()

    def _receding_horizon(self, now: float, linear: bool) -> np.ndarray | None:
        if self._current is not None and self._current.over(now):
            self._current = None
        if self._current is None and self._waiting is not None:
            self._current, self._waiting = self._waiting, None
            if self._current.over(now):
                self.counters["expired"] += 1
                self._current = None
        if self._current is None:
            return None
        action = self._current.action(now, linear)
        return None if action is None else action.copy()

    def _rejection(self, chunk: Chunk, scheduled: _Scheduled, now: float) -> str:
        if self._instruction_id is not None and chunk.instruction_id != self._instruction_id:
            return "instruction_mismatch"
        if not np.isfinite(chunk.actions).all():
            return "non_finite"
        if self._stamp_gate.check(seconds_to_ns(chunk.stamp), seconds_to_ns(now)) == "future":
            return "from_future"
        if scheduled.end * chunk.dt > self.max_chunk_span:
            return "too_long"
        if chunk.stamp < self._not_before:
            return "predates_reset"
        if chunk.stamp <= self._newest_stamp:
            return "not_newer"
        if now - chunk.stamp > self.max_chunk_age:
            return "too_old"
        if scheduled.over(now) or scheduled.first >= scheduled.end:
            return "expired"
        return ""
