"""What policy_node does between receiving an observation or a goal and publishing a chunk.

:class:`PolicyRunner` is that behaviour, with no ROS in it, shared by policy_node (online, with
inference on a worker thread) and the offline replay (:mod:`mail_ros.eval.replay`, in bag time),
so the offline evaluation is the node's behaviour by construction:

* goals: a goal for a policy conditioned on language must come from the checkpoint's text encoder,
  with its dimension and finite values; a policy without language takes any goal (it only starts
  an episode). Every goal, accepted or refused, starts a new episode: the history is cleared and
  the policy is reset with ``seed`` before its next chunk; a refused goal leaves no goal, so no
  chunk is made until a valid one arrives (the operator has moved on from the old one);
* observations: refused by the one stamp gate (:class:`~mail_ros.sync.stamps.StampGate`, with
  ``max_observation_lead``) or when older than ``max_observation_age`` by the receiver's clock;
  otherwise added to the :class:`~mail_ros.sync.history.ObservationHistory` (duplicate, backwards
  and gap rules);
* chunks: one per new observation while a goal is set (:meth:`take` -> :meth:`predict` ->
  :meth:`finish`); a chunk is published in ActionChunk's float32, and refused when that is not
  finite (a finite float64 beyond the float32 range becomes inf there) or when the goal changed
  while it was computed (it belongs to the old goal).

Times are integer nanoseconds (stamps and the receiver's clock). Not thread-safe: policy_node
serialises every call but :meth:`predict` under one lock; :meth:`predict` touches only the
policy, which only the inference thread uses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from mail_ros.language.encoders import same_encoder
from mail_ros.spec import Observation
from mail_ros.sync.history import ObservationHistory
from mail_ros.sync.stamps import DEFAULT_MAX_STAMP_LEAD, StampGate, ns_to_seconds, seconds_to_ns

__all__ = ["Chunk", "Goal", "ObservationOutcome", "PolicyRunner", "Request", "RunnerSettings", "as_published"]

# Outcomes of observe(): the observation is in the history (the last two restarted it) ...
USED = ("accepted", "restart", "backwards")
# ... or it is not.
REFUSED = ("unstamped", "no_clock", "future", "stale")


def as_published(actions: np.ndarray) -> np.ndarray:
    """``actions`` in ActionChunk's float32; check finiteness on this, as a finite float64 beyond
    the float32 range becomes inf here."""
    with np.errstate(over="ignore"):
        return np.asarray(actions, np.float32)


@dataclass(frozen=True)
class RunnerSettings:
    """policy_node's observation and episode settings (the node declares these defaults)."""

    max_observation_age: float = 0.3  # s by the receiver's clock; older observations are refused
    max_observation_lead: float = DEFAULT_MAX_STAMP_LEAD  # s; stamped further ahead: refused
    max_gap_periods: float = 3.0  # a longer gap between observations restarts the history
    seed: int = 0  # the policy's sampler seed, reset with every new goal

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_observation_age) and self.max_observation_age > 0):
            raise ValueError(f"max_observation_age must be positive seconds, got {self.max_observation_age}")
        if not (math.isfinite(self.max_gap_periods) and self.max_gap_periods > 0):
            raise ValueError(f"max_gap_periods must be positive, got {self.max_gap_periods}")
        StampGate(self.max_observation_lead)  # validates it


@dataclass(frozen=True)
class Goal:
    """An instruction as the policy receives it."""

    text: str | None  # None: no instruction (a policy without language, replayed without one)
    vector: np.ndarray | None = None  # the instruction embedding; ignored by a policy without language
    encoder: str | None = None  # the text encoder that made ``vector``
    stamp: int = 0  # ns; the goal message's stamp, carried by its chunks (instruction_stamp)


@dataclass(frozen=True)
class ObservationOutcome:
    """What :meth:`PolicyRunner.observe` did with an observation."""

    kind: str  # "accepted", "restart", "backwards" (in the history); "duplicate" (ignored); REFUSED
    message: str = ""  # for a log line, when not plainly accepted

    @property
    def used(self) -> bool:
        return self.kind in USED

    @property
    def refused(self) -> bool:
        return self.kind in REFUSED


@dataclass(frozen=True)
class Request:
    """The input of one chunk, taken from the runner's state at one instant."""

    history: list[Observation]  # oldest first, at most T
    goal: Goal
    reset: bool  # reset the policy (with the seed) before this chunk: a new episode or a failure


@dataclass(frozen=True)
class Chunk:
    """A chunk ready to publish."""

    chunk_id: int
    stamp: int  # ns; the newest observation it used
    goal: Goal
    actions: np.ndarray  # (A, action_dim) float32, as published
    history_length: int


class PolicyRunner:
    """The policy node's rules around ``policy`` (a MaILPolicy); see the module docstring."""

    def __init__(self, policy, settings: RunnerSettings = RunnerSettings()) -> None:
        self.policy = policy
        self.settings = settings
        observation = policy.config.spec.observation
        self.language = policy.config.language
        self.gate = StampGate(settings.max_observation_lead)
        self.history = ObservationHistory(observation.obs_horizon, observation.period, settings.max_gap_periods)
        self.goal: Goal | None = None
        self._fresh = False  # an observation arrived since the last chunk was taken
        self._reset = True  # reset the policy before the next chunk
        self._chunk_id = 0

    # --- goals ------------------------------------------------------------------------------------
    def refusal(self, goal: Goal) -> str | None:
        """Why ``goal`` cannot be used by this policy, or None."""
        if not self.language.enabled:
            return None  # a policy without language: the goal only starts an episode
        if goal.vector is None or goal.encoder is None:
            return "no instruction embedding"
        if not same_encoder(goal.encoder, self.language.encoder):
            return f"encoder {goal.encoder!r}, checkpoint expects {self.language.encoder!r}"
        vector = np.asarray(goal.vector)
        if vector.shape != (self.language.dim,):
            return f"dimension {vector.size}, checkpoint expects {self.language.dim}"
        if not np.all(np.isfinite(vector)):
            return "non-finite values"
        return None

    def set_goal(self, goal: Goal) -> str | None:
        """Start a new episode with ``goal``; returns why it was refused (then no goal is set), or None."""
        reason = self.refusal(goal)
        if reason is None and self.language.enabled:
            goal = Goal(goal.text, np.asarray(goal.vector, np.float32), goal.encoder, goal.stamp)
        elif reason is None:
            goal = Goal(goal.text, np.zeros(0, np.float32), goal.encoder, goal.stamp)  # unused by the policy
        # No observation of the old episode conditions the new one; the policy is reset before
        # its next chunk (on the inference thread, the only one that uses it).
        self.goal = goal if reason is None else None
        self.history.clear()
        self._fresh = False
        self._reset = True
        return reason

    # --- observations -----------------------------------------------------------------------------
    def observe(self, observation: Observation, now: int) -> ObservationOutcome:
        """Check ``observation`` (stamp in ns) against the receiver's clock ``now`` (ns) and keep it."""
        refusal = self.gate.check(observation.stamp, now)
        if refusal is not None:
            # Stamped ahead and accepted, it would outrank every correctly stamped frame after it
            # (the history only moves forward), and its chunk would look fresh to the executor.
            return ObservationOutcome(refusal, self.gate.explain(refusal, observation.stamp, now,
                                                                 "max_observation_lead"))
        age = ns_to_seconds(now - observation.stamp)
        if age > self.settings.max_observation_age:
            return ObservationOutcome("stale", f"observation is {age * 1e3:.0f} ms old (max_observation_age "
                                               f"{self.settings.max_observation_age * 1e3:.0f} ms)")
        when = f"{ns_to_seconds(observation.stamp):.3f} s"
        outcome = self.history.add(observation)
        if outcome == "duplicate":
            return ObservationOutcome("duplicate", f"ignoring an observation stamped {when} like the last one")
        self._fresh = True
        if outcome == "backwards":
            return ObservationOutcome("backwards", f"observation stamped {when}, before the last one: time went "
                                                   "backwards; restarting the history")
        if outcome == "restart":
            gap = f"{self.settings.max_gap_periods:g} policy periods"
            return ObservationOutcome("restart", f"observation gap longer than {gap}; restarting the history")
        return ObservationOutcome("accepted")

    # --- chunks -----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """A chunk is due: an observation arrived since the last one was taken, and a goal is set."""
        return self._fresh and self.goal is not None

    def skip(self) -> None:
        """Let the newest observation pass without a chunk (the replay's ``every``)."""
        self._fresh = False

    def take(self) -> Request:
        """The input of the next chunk; call when :attr:`ready`."""
        if not self.ready:
            raise RuntimeError("no chunk is due (no new observation, or no goal)")
        request = Request(self.history.window(), self.goal, self._reset)
        self._fresh = False
        self._reset = False
        return request

    def predict(self, request: Request) -> np.ndarray:
        """Run the policy on ``request``: (A, action_dim) in robot units. May raise whatever the
        policy raises; then call :meth:`failed`."""
        if request.reset:
            self.policy.reset(seed=self.settings.seed)
        return self.policy.predict_chunk(request.history, request.goal.vector)

    def failed(self) -> None:
        """A prediction raised: the next chunk starts from a reset policy, in case the failure left
        a cache half-written."""
        self._reset = True

    def finish(self, request: Request, actions: np.ndarray) -> tuple[Chunk | None, str]:
        """(the chunk to publish, "") or (None, why: "non_finite" or "goal_changed")."""
        published = as_published(actions)
        if not np.all(np.isfinite(published)):
            return None, "non_finite"
        if request.goal is not self.goal:
            return None, "goal_changed"  # the goal changed during inference: the chunk is the old goal's
        self._chunk_id += 1
        return Chunk(self._chunk_id, request.history[-1].stamp, request.goal, published, len(request.history)), ""

    def warm_up(self, repeats: int = 3) -> float:
        """Run ``repeats`` chunks on blank input (allocations, kernels) and reset the policy; returns
        the last chunk's latency (s). Raises ValueError when a chunk is not finite as published:
        such a checkpoint (e.g. overflowing weights) would never produce a usable chunk."""
        observation = self.policy.config.spec.observation
        height, width = observation.image_size
        period = seconds_to_ns(observation.period)
        history = [
            Observation(stamp=(k + 1) * period,
                        images={c: np.zeros((height, width, 3), np.uint8) for c in observation.cameras},
                        joint_positions=np.zeros(len(observation.joint_names)))
            for k in range(observation.obs_horizon)
        ]
        embedding = np.zeros(self.language.dim, np.float32)
        latency = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            published = as_published(self.policy.predict_chunk(history, embedding))
            latency = time.perf_counter() - start
            if not np.all(np.isfinite(published)):
                raise ValueError("the policy predicts non-finite actions on a blank warm-up input")
        self.policy.reset(seed=self.settings.seed)
        self._reset = True
        return latency
