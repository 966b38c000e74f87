"""The executor's safety layer: where action-chunk targets get clipped to the FR3's joint limits.

Every joint-position target the executor sends goes through ``SafetyFilter.filter`` once per
control tick. In order, per joint:

1. a non-finite target is not followed: the filter returns a *hold* (decelerate to rest);
2. the target is clipped to the position limits shrunk by ``position_margin``;
3. the velocity needed to reach it in one tick is limited by the scaled velocity limit, by
   ``max_step_delta / dt`` (the per-tick position step), by the speed from which the joint can
   still brake to rest before the position limit (one tick at v, then ``a dt`` less per tick), and by
   the scaled acceleration limit relative to the previous commanded velocity;
4. if the needed velocity fits all of those bounds the target passes through unchanged;
   otherwise the joint moves towards the target along the fastest profile that can still stop
   on it, so a jump in the target gives a braked approach. Because reachable targets always pass
   unchanged, the last tick of such an approach may land on the target faster than the braking
   profile would (up to 4.5 ``amax * dt``), so the joint overshoots by at most
   ``8 * amax * dt**2`` (0.4 mrad at 1 kHz, 4 mrad at 100 Hz) before it settles exactly. A
   smoothly moving target that stops abruptly overshoots by its braking distance likewise:
   the filter has no look-ahead.

Starting at rest inside the margined limits (or from any previous output of the filter), this
keeps every later output inside the position limits with |v| <= vmax and |a| <= amax, because
braking at full deceleration is always one of the allowed choices. Only a state that already
violates this (a measured start inside the margin while moving outward) can leave no allowed
velocity; then the acceleration limit wins, since the hardware aborts on it.

Jerk is not bounded here: between ticks the commanded acceleration may change by up to
``2 * amax``. Feed targets that are already smooth (interpolated chunks, ``ramp_trajectory``)
so that the clamps rarely act; the diagnostics in ``SafeTarget.active`` show when they do.

``Watchdog`` decides, once per tick, whether commanding is allowed at all.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from mail_ros.control.limits import JointLimits, fr3_limits

__all__ = [
    "Decision",
    "SafeTarget",
    "SafetyConfig",
    "SafetyError",
    "SafetyFilter",
    "Verdict",
    "Watchdog",
    "min_jerk",
    "ramp_duration",
    "ramp_trajectory",
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
    ramp_speed: float = 0.3  # fraction of the margined velocity/acceleration/jerk limits
    ramp_min_duration: float = 1.0  # s; never faster than this
    ramp_distance: float = 0.05  # rad; a target farther than this from the robot is ramped to

    def __post_init__(self) -> None:
        for name in ("velocity_scale", "acceleration_scale", "jerk_scale", "ramp_speed"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= 1):
                raise SafetyError(f"SafetyConfig.{name} must be in (0, 1], got {value}")
        for name in ("max_step_delta", "chunk_timeout", "joint_state_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SafetyError(f"SafetyConfig.{name} must be positive, got {value}")
        for name in ("position_margin", "ramp_min_duration", "ramp_distance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SafetyError(f"SafetyConfig.{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class SafeTarget:
    """The filter's output for one control tick.

    ``velocity`` is the commanded velocity implied by the step, (position - q_prev) / dt; pass it
    back as ``v_prev`` on the next tick. ``active`` maps each limit name ("position", "velocity",
    "step", "braking", "acceleration", "lag") to a (J,) bool mask of joints where it acted; "lag"
    marks joints that did not reach the requested target this tick.
    """

    position: np.ndarray  # (J,)
    velocity: np.ndarray  # (J,)
    hold: bool = False  # True when the requested target was not followed
    reason: str = ""  # why it was held
    active: dict[str, np.ndarray] = field(default_factory=dict)  # empty for a hold

    @property
    def clipped(self) -> bool:
        """Whether any limit changed the requested target."""
        return any(mask.any() for mask in self.active.values())


def _braking_speed(distance: np.ndarray, acceleration: np.ndarray, dt: float) -> np.ndarray:
    """Largest speed v from which one tick at v, then braking by ``acceleration * dt`` per tick,
    stops within ``distance``.

    Exact for the discrete motion: from v = (n + f) a dt (0 <= f < 1) the distance to rest,
    including the first tick, is dt * ((n + 1) v - a dt n (n + 1) / 2), which is increasing in v.
    The largest whole n with a dt**2 n (n + 1) / 2 <= distance fixes the segment, then v follows.
    """
    a_dt2 = acceleration * dt * dt
    distance = np.maximum(distance, 0.0)
    n = np.floor((np.sqrt(1.0 + 8.0 * distance / a_dt2) - 1.0) / 2.0)
    # Guard the floor against sqrt rounding right at a segment boundary.
    n = np.where(a_dt2 * n * (n + 1) / 2 > distance, n - 1, n)
    return distance / ((n + 1) * dt) + acceleration * dt * n / 2


def _vector(value: np.ndarray, dof: int, what: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (dof,):
        raise SafetyError(f"{what} must have shape ({dof},), got {array.shape}")
    return array


def _check_dt(dt: float) -> float:
    if not (math.isfinite(dt) and dt > 0):
        raise SafetyError(f"control period dt must be positive, got {dt}")
    return float(dt)


class SafetyFilter:
    """Clamps joint-position targets to margined limits with bounded velocity and acceleration."""

    def __init__(self, config: SafetyConfig | None = None, limits: JointLimits | None = None) -> None:
        self.config = config or SafetyConfig()
        self.hard_limits = limits or fr3_limits()
        self.limits = self.hard_limits.with_margins(
            position_margin=self.config.position_margin,
            velocity_scale=self.config.velocity_scale,
            acceleration_scale=self.config.acceleration_scale,
            jerk_scale=self.config.jerk_scale,
        )

    def filter(self, target: np.ndarray, q_prev: np.ndarray, v_prev: np.ndarray, dt: float) -> SafeTarget:
        """Safe joint positions for the next tick, given the desired ``target`` (J,).

        ``q_prev``/``v_prev`` are the previously commanded position and velocity (at start-up: the
        measured position and zero). A non-finite ``target`` yields a hold; a non-finite state
        raises ``SafetyError``.
        """
        dof = self.limits.dof
        target = _vector(target, dof, "target")
        if not np.isfinite(target).all():
            bad = [self.limits.names[i] for i in np.flatnonzero(~np.isfinite(target))]
            return self.hold(q_prev, v_prev, dt, reason=f"non-finite target for {', '.join(bad)}")
        q_prev, v_prev, dt = self._state(q_prev, v_prev, dt)
        lim = self.limits
        lo, hi, bounds = self._velocity_window(q_prev, v_prev, dt)

        clipped = np.clip(target, lim.position_min, lim.position_max)
        distance = clipped - q_prev
        v_track = distance / dt
        exact = (v_track >= lo) & (v_track <= hi)
        approach = np.sign(distance) * _braking_speed(np.abs(distance), lim.acceleration_max, dt)
        velocity = np.where(exact, v_track, np.clip(approach, lo, hi))
        position = np.where(exact, clipped, q_prev + velocity * dt)

        lagging = ~exact
        speed = np.abs(velocity)

        def at(value: np.ndarray, bound: np.ndarray) -> np.ndarray:
            return lagging & (np.abs(value - bound) <= 1e-9 * bound + 1e-12)

        active = {
            "position": clipped != target,
            "velocity": at(speed, lim.velocity_max),
            "step": at(speed, bounds["step"]),
            "braking": (velocity > 0) & at(speed, bounds["brake_up"]) | (velocity < 0) & at(speed, bounds["brake_down"]),
            "acceleration": at(np.abs(velocity - v_prev), lim.acceleration_max * dt),
            "lag": lagging,
        }
        return SafeTarget(position=position, velocity=velocity, active=active)

    def hold(self, q_prev: np.ndarray, v_prev: np.ndarray, dt: float, reason: str = "hold") -> SafeTarget:
        """Decelerate to rest as fast as the limits allow (stays put when already at rest)."""
        q_prev, v_prev, dt = self._state(q_prev, v_prev, dt)
        lo, hi, _ = self._velocity_window(q_prev, v_prev, dt)
        velocity = np.clip(0.0, lo, hi)
        return SafeTarget(position=q_prev + velocity * dt, velocity=velocity, hold=True, reason=reason)

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

    def ramp(self, q_start: np.ndarray, q_goal: np.ndarray, dt: float) -> np.ndarray:
        """A (N, J) min-jerk ramp from rest at ``q_start`` to rest at ``q_goal`` (clipped to the margined limits)."""
        goal = np.clip(_vector(q_goal, self.limits.dof, "q_goal"), self.limits.position_min, self.limits.position_max)
        speed = self.config.ramp_speed
        ramp_limits = self.limits.with_margins(0.0, speed, speed, speed)
        return ramp_trajectory(q_start, goal, ramp_limits, dt, min_duration=self.config.ramp_min_duration)

    def _state(self, q_prev: np.ndarray, v_prev: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray, float]:
        dof = self.limits.dof
        q_prev = _vector(q_prev, dof, "q_prev")
        v_prev = _vector(v_prev, dof, "v_prev")
        if not (np.isfinite(q_prev).all() and np.isfinite(v_prev).all()):
            raise SafetyError(f"robot state must be finite, got q_prev={q_prev.tolist()} v_prev={v_prev.tolist()}")
        return q_prev, v_prev, _check_dt(dt)

    def _velocity_window(
        self, q_prev: np.ndarray, v_prev: np.ndarray, dt: float
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Per-joint [lo, hi] of velocities allowed for the next tick, and the bounds that formed it."""
        lim = self.limits
        step = np.full(lim.dof, self.config.max_step_delta / dt)
        brake_up = _braking_speed(lim.position_max - q_prev, lim.acceleration_max, dt)
        brake_down = _braking_speed(q_prev - lim.position_min, lim.acceleration_max, dt)
        speed = np.minimum(lim.velocity_max, step)
        lo_v = np.maximum(-speed, -brake_down)
        hi_v = np.minimum(speed, brake_up)
        a_dt = lim.acceleration_max * dt
        lo = np.maximum(lo_v, v_prev - a_dt)
        hi = np.minimum(hi_v, v_prev + a_dt)
        empty = lo > hi
        if empty.any():
            # Only reachable from a state that already breaks the invariant (see module docstring).
            nearest = np.where(lo_v > v_prev + a_dt, v_prev + a_dt, v_prev - a_dt)
            lo = np.where(empty, nearest, lo)
            hi = np.where(empty, nearest, hi)
        return lo, hi, {"step": step, "brake_up": brake_up, "brake_down": brake_down}


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
    tau = np.clip(np.asarray(times, dtype=np.float64) / duration, 0.0, 1.0)[:, None]  # (N, 1)
    s = tau**3 * (10.0 - 15.0 * tau + 6.0 * tau**2)
    ds = 30.0 * tau**2 * (1.0 - tau) ** 2 / duration
    dds = 60.0 * tau * (1.0 - tau) * (1.0 - 2.0 * tau) / duration**2
    span = np.asarray(q_goal, dtype=np.float64) - np.asarray(q_start, dtype=np.float64)  # (J,)
    return q_start + s * span, ds * span, dds * span


def ramp_trajectory(
    q_start: np.ndarray, q_goal: np.ndarray, limits: JointLimits, dt: float, *, min_duration: float = 0.0
) -> np.ndarray:
    """Minimum-jerk joint motion from rest at ``q_start`` to rest at ``q_goal``, sampled every ``dt``.

    All joints share one duration, the shortest multiple of ``dt`` (and at least ``min_duration``)
    for which the profile's peak velocity, acceleration and jerk stay within ``limits`` on every
    joint (:func:`ramp_duration`). Returns (N, J) targets for t = dt, 2 dt, ..., N dt; the last row
    equals ``q_goal``. ``q_goal`` must lie within the limits; ``q_start`` is the measured position
    and may not.
    """
    dof = limits.dof
    start = _vector(q_start, dof, "q_start")
    goal = _vector(q_goal, dof, "q_goal")
    dt = _check_dt(dt)
    if not (np.isfinite(start).all() and np.isfinite(goal).all()):
        raise SafetyError(f"ramp endpoints must be finite, got {start.tolist()} -> {goal.tolist()}")
    if not limits.contains(goal):
        raise SafetyError(
            f"ramp goal {goal.tolist()} is outside the position limits "
            f"[{limits.position_min.tolist()}, {limits.position_max.tolist()}]"
        )
    duration = ramp_duration(start, goal, limits, min_duration=min_duration)
    # Rounding the duration up to whole ticks only lowers the peaks; 1e-9 absorbs float noise.
    steps = max(1, math.ceil(duration / dt - 1e-9))
    trajectory = min_jerk(start, goal, steps * dt, np.arange(1, steps + 1) * dt)[0]  # (N, J)
    trajectory[-1] = goal
    return trajectory


class Verdict(enum.Enum):
    """What the executor may do this tick."""

    COMMAND = "command"  # follow the scheduled action (through SafetyFilter.filter)
    HOLD = "hold"  # keep streaming, but SafetyFilter.hold: decelerate and stay in place
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
