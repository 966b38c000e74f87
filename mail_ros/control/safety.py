"""The executor's safety layer: margined FR3 limits, minimum-jerk ramps and the watchdog.

``SafetyConfig`` holds the margins, clamps, timeouts and ramp settings; ``SafetyFilter`` derives
the margined limits from the FR3 datasheet and clips gripper widths. The executor's planner
(mail_ros.control.executor) keeps every command within those limits, including jerk;
``ramp_duration`` and ``min_jerk`` give its homing motion.

``Watchdog`` decides, once per tick, whether commanding is allowed at all.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from mail_ros.control.limits import JointLimits, fr3_limits

__all__ = [
    "Decision",
    "SafetyConfig",
    "SafetyError",
    "SafetyFilter",
    "Verdict",
    "Watchdog",
    "check_fields",
    "min_jerk",
    "ramp_duration",
]

# Peak |s'|, |s''| and |s'''| of the minimum-jerk profile s(tau) = 10 tau^3 - 15 tau^4 + 6 tau^5.
MIN_JERK_PEAK_VELOCITY = 1.875
MIN_JERK_PEAK_ACCELERATION = 10.0 / math.sqrt(3.0)
MIN_JERK_PEAK_JERK = 60.0


class SafetyError(ValueError):
    """Unusable safety input: wrong shapes, non-finite robot state, or a bad configuration."""


@dataclass(frozen=True)
class SafetyConfig:
    """Margins, clamps, timeouts and ramp settings of the executor's safety layer."""

    # Limits: the FR3 datasheet limits shrunk / scaled by these.
    position_margin: float = 0.05  # rad kept clear of each position limit
    velocity_scale: float = 0.5  # fraction of the datasheet velocity limit
    acceleration_scale: float = 0.5  # fraction of the datasheet acceleration limit
    jerk_scale: float = 0.5  # fraction of the datasheet jerk limit
    max_step_delta: float = 0.05  # rad a joint may move per control tick
    # Watchdog.
    chunk_timeout: float = 0.3  # s without a fresh chunk -> HOLD
    joint_state_timeout: float = 0.2  # s without joint_states -> STOP
    # Ramps (first chunk, goal change, homing).
    ramp_speed: float = 0.3  # fraction of the margined velocity limits while ramping
    ramp_min_duration: float = 1.0  # s; never faster than this
    ramp_distance: float = 0.05  # rad; a target farther than this from the robot is ramped to

    def __post_init__(self) -> None:
        check_fields(self, "SafetyConfig.",
                     fractions=("velocity_scale", "acceleration_scale", "jerk_scale", "ramp_speed"),
                     positive=("max_step_delta", "chunk_timeout", "joint_state_timeout"),
                     non_negative=("position_margin", "ramp_min_duration", "ramp_distance"))


def check_fields(config, prefix: str, *, fractions=(), positive=(), non_negative=()) -> None:
    """Raise SafetyError naming the first field of ``config`` that is not finite and in its range:
    ``fractions`` in (0, 1], ``positive`` > 0, ``non_negative`` >= 0 (``prefix`` starts each name)."""
    for names, ok, what in ((fractions, lambda v: 0 < v <= 1, "in (0, 1]"), (positive, lambda v: v > 0, "positive"),
                            (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(config, name)
            if not (math.isfinite(value) and ok(value)):
                raise SafetyError(f"{prefix}{name} must be {what}, got {value}")


def _vector(value: np.ndarray, dof: int, what: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (dof,):
        raise SafetyError(f"{what} must have shape ({dof},), got {array.shape}")
    return array


class SafetyFilter:
    """The margined FR3 limits of a SafetyConfig, with the gripper-width clip and the ramp test."""

    def __init__(self, config: SafetyConfig | None = None, limits: JointLimits | None = None) -> None:
        self.config = config or SafetyConfig()
        self.hard_limits = limits or fr3_limits()
        self.limits = self.hard_limits.with_margins(
            position_margin=self.config.position_margin,
            velocity_scale=self.config.velocity_scale,
            acceleration_scale=self.config.acceleration_scale,
            jerk_scale=self.config.jerk_scale,
        )
        # Ramps (and the executor's recovery) cap the speed only. Acceleration and jerk stay the
        # margined limits, so a setpoint that was moving faster when a ramp begins brakes as hard
        # as it may: braking at a ramp's fraction of them let it overshoot by up to
        # v^2 / (2 ramp_speed a_max), past the position margin (executor core test).
        self.ramp_limits = self.limits.with_margins(0.0, velocity_scale=self.config.ramp_speed,
                                                    acceleration_scale=1.0, jerk_scale=1.0)

    def gripper_width(self, width: float) -> float | None:
        """Commanded gripper width clipped to the hand's range; None (keep the last command) if not finite."""
        if not math.isfinite(width):
            return None
        return float(min(max(width, self.limits.gripper_width_min), self.limits.gripper_width_max))

    def needs_ramp(self, q_current: np.ndarray, target: np.ndarray) -> bool:
        """Whether ``target`` is farther than ``ramp_distance`` from the robot on any joint."""
        dof = self.limits.dof
        gap = _vector(target, dof, "target") - _vector(q_current, dof, "q_current")
        return bool(np.max(np.abs(gap)) > self.config.ramp_distance)


def ramp_duration(q_start: np.ndarray, q_goal: np.ndarray, limits: JointLimits, *, min_duration: float = 0.0) -> float:
    """Shortest duration (>= ``min_duration``) of a minimum-jerk motion from rest at ``q_start`` to
    rest at ``q_goal`` whose peak velocity, acceleration and jerk stay within ``limits`` on every joint."""
    span = np.abs(_vector(q_goal, limits.dof, "q_goal") - _vector(q_start, limits.dof, "q_start"))
    if not np.isfinite(span).all():
        raise SafetyError(f"ramp endpoints must be finite, got {np.asarray(q_start).tolist()} -> "
                          f"{np.asarray(q_goal).tolist()}")
    if not (math.isfinite(min_duration) and min_duration >= 0):
        raise SafetyError(f"min_duration must be >= 0, got {min_duration}")
    return max(
        min_duration,
        float(np.max(MIN_JERK_PEAK_VELOCITY * span / limits.velocity_max)),
        float(np.max(np.sqrt(MIN_JERK_PEAK_ACCELERATION * span / limits.acceleration_max))),
        float(np.max(np.cbrt(MIN_JERK_PEAK_JERK * span / limits.jerk_max))),
    )


def min_jerk(q_start: np.ndarray, q_goal: np.ndarray, duration: float,
             times: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Position, velocity and acceleration (N, J) of the minimum-jerk motion at ``times`` (N,) in [0, duration]."""
    if duration <= 0.0:  # no motion: at rest on the goal
        shape = (len(times), len(q_goal))
        return np.broadcast_to(np.asarray(q_goal, dtype=np.float64), shape).copy(), np.zeros(shape), np.zeros(shape)
    tau = np.clip(np.asarray(times, dtype=np.float64) / duration, 0.0, 1.0)[:, None]  # (N, 1)
    s = tau**3 * (10.0 - 15.0 * tau + 6.0 * tau**2)
    ds = 30.0 * tau**2 * (1.0 - tau) ** 2 / duration
    dds = 60.0 * tau * (1.0 - tau) * (1.0 - 2.0 * tau) / duration**2
    span = np.asarray(q_goal, dtype=np.float64) - np.asarray(q_start, dtype=np.float64)  # (J,)
    return q_start + s * span, ds * span, dds * span


class Verdict(enum.Enum):
    """What the executor may do this tick."""

    COMMAND = "command"  # follow the scheduled action
    HOLD = "hold"  # keep streaming, but come to rest and stay in place
    STOP = "stop"  # stop streaming commands; the robot's controller holds on its own


@dataclass(frozen=True)
class Decision:
    """A watchdog verdict with a human-readable reason (empty for COMMAND)."""

    verdict: Verdict
    reason: str = ""
    clock_jump: bool = False  # time went backwards: everything timed before it is void

    @property
    def command(self) -> bool:
        return self.verdict is Verdict.COMMAND


class Watchdog:
    """Tick-by-tick go/no-go from message freshness and command-topic ownership; time is passed in.

    STOP (no state to command from, or someone else commanding) takes precedence over HOLD
    (nothing fresh to execute).
    """

    def __init__(self, config: SafetyConfig | None = None) -> None:
        self.config = config or SafetyConfig()
        self.reset()

    def reset(self) -> None:
        """Forget all timing (e.g. on activation): the first decision waits for fresh messages again."""
        self._last_chunk: float | None = None
        self._last_joint_state: float | None = None
        self._latest = -math.inf

    def chunk_received(self, now: float) -> None:
        """A fresh (accepted) action chunk arrived at receiver time ``now``."""
        self._last_chunk = self._observe(now)

    def joint_state_received(self, now: float) -> None:
        """A joint state arrived at receiver time ``now``."""
        self._last_joint_state = self._observe(now)

    def decide(self, now: float, command_publishers: int = 1) -> Decision:
        """Verdict for the tick at ``now``.

        ``command_publishers`` is the number of publishers on the command topic including the
        executor's own (the node passes ``Node.count_publishers(topic)``); more than one means
        another node drives the robot. Receipt times slightly after ``now`` (callbacks racing the
        tick) count as fresh; a jump back by more than ``joint_state_timeout`` is a clock reset
        (a restarted simulator, a looping bag, a stepped system clock): the watchdog forgets all
        timing and the decision says so (``clock_jump``), so the caller can drop what it timed
        before; fresh messages after the jump make commanding possible again.
        """
        if not math.isfinite(now):
            raise SafetyError(f"watchdog time must be finite, got {now}")
        cfg = self.config
        if command_publishers > 1:
            return Decision(
                Verdict.STOP,
                f"{command_publishers} publishers on the command topic; another node is commanding the robot",
            )
        if now < self._latest - cfg.joint_state_timeout:
            jump = self._latest - now
            self.reset()
            return Decision(Verdict.STOP, f"clock went backwards by {jump:.3f} s", clock_jump=True)
        if self._last_joint_state is None:
            return Decision(Verdict.STOP, "no joint_states received yet")
        age = now - self._last_joint_state
        if age > cfg.joint_state_timeout:
            return Decision(Verdict.STOP, f"joint_states stale: {age:.3f} s > {cfg.joint_state_timeout} s")
        if self._last_chunk is None:
            return Decision(Verdict.HOLD, "waiting for the first action chunk")
        age = now - self._last_chunk
        if age > cfg.chunk_timeout:
            return Decision(Verdict.HOLD, f"no fresh action chunk for {age:.3f} s > {cfg.chunk_timeout} s")
        return Decision(Verdict.COMMAND)

    def _observe(self, now: float) -> float:
        if not math.isfinite(now):
            raise SafetyError(f"watchdog time must be finite, got {now}")
        self._latest = max(self._latest, now)
        return now
