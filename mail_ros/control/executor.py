"""The executor's control loop, without ROS: chunks and joint states in, joint trajectories out.

:class:`ExecutorCore` owns every decision executor_node makes; the node only converts messages
and calls it. All times are explicit arguments (the node passes its clock), so tests step a
simulated clock and get the same answer on any machine.

Once per control tick (:meth:`ExecutorCore.tick`) the watchdog decides whether commanding is
allowed (fresh joint states, fresh chunks, nobody else on the command topic); the arm must be
following the controller's setpoint (else stop); the ChunkScheduler gives the policy's target
trajectory; and a new command is planned from where the controller's setpoint will be.

Commands are smooth where a 1 kHz controller checks them. A command is a JointTrajectory of
points ``knot_spacing`` apart with positions, velocities and accelerations, so ros2_controllers'
JTC interpolates each segment as a quintic; the core plans the motion in pieces of constant jerk
between those points, which that quintic reproduces exactly (see mail_ros.sim.jtc). Every piece
keeps velocity, acceleration and jerk within the margined FR3 limits. A command consists of

1. the previous command's points up to ``command_latency`` ahead (the controller may apply the
   new command a little late; until then both agree, so the setpoint does not notice the switch),
2. the motion that tracks the policy's target trajectory from there (velocity feed-forward plus
   a braked approach), for two control periods (a late tick finds the arm still following),
3. a stop: braking to rest within the limits, so that when no further command comes (a stall,
   a stop, a crash of this node), the controller brings the arm to rest smoothly by itself.

Holding is planning the stop now. Stopping (stale joint states, the arm not following, another
commander) is sending nothing: the last command's stop completes. A restart continues from the
controller's setpoint (the last command), never from the measured position, which lags it. When
the arm did not follow (blocked by a contact, or far behind), the next commands move the setpoint
to the arm at the ramp speed before the policy is followed again. Only
when the setpoint is unknown (the first command, after a clock jump, another commander, or
re-enabling) does the plan start at rest at the measured position, ``FRESH_START`` ahead.

The header stamp of a command is the core's clock: the controller places the points at
``stamp + time_from_start`` (its clock must agree with this one, as for joint states; see
``max_clock_skew``). The controller must join a new trajectory from its desired state
(``interpolate_from_desired_state: true``, config/fr3_controllers.yaml); joined from the measured
state, each command's first segment absorbs the arm's tracking error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mail_ros.control.limits import JointLimits, fr3_limits
from mail_ros.control.robot_state import RobotStateError, check_joint_targets, joint_positions
from mail_ros.control.safety import (SafetyConfig, SafetyError, SafetyFilter, Verdict, Watchdog, check_fields,
                                     min_jerk, ramp_duration)
from mail_ros.control.scheduler import SCHEDULER_MODES, Chunk, ChunkScheduler
from mail_ros.control.smoothness import CONTROLLER_PERIOD, SetpointMonitor
from mail_ros.sim.jtc import JointTrajectoryController, TrajectoryRejected
from mail_ros.spec import FR3_HOME, GRIPPER_ACTION_NAME
from mail_ros.sync.stamps import DEFAULT_MAX_STAMP_LEAD, StampGate, seconds_to_ns

__all__ = ["Command", "ExecutorConfig", "ExecutorCore", "Plan", "TickResult"]

# s ahead of now at which a plan from the measured position begins: the controller's setpoint
# (held where the arm is, up to its static error) blends into it over this time.
FRESH_START = 0.1
# Planning stays this fraction inside the velocity limit: the velocity between two points of a
# constant-jerk piece can exceed its values at the points by a^2 / (2 j).
VELOCITY_HEADROOM = 0.97
# Time constants of the tracking law (s): velocity error -> acceleration, position error -> velocity.
VELOCITY_TIME_CONSTANT = 0.03
POSITION_TIME_CONSTANT = 0.08
# A stop has ended when every joint is slower than this (rad/s) and accelerates less (rad/s^2).
REST_VELOCITY = 1e-5
REST_ACCELERATION = 1e-4
MAX_STOP_DURATION = 5.0  # s; a stop from any allowed speed ends well within this
# After a stop for tracking loss the setpoint is brought to the arm until they are this fraction
# of max_tracking_error apart; then the policy is followed again (from a ramp).
RECOVERED = 0.5


@dataclass(frozen=True)
class ExecutorConfig:
    """Settings of the executor besides the safety layer's (:class:`SafetyConfig`)."""

    control_rate_hz: float = 20.0  # control ticks (JointTrajectory messages) per second
    # Chunk execution, one of SCHEDULER_MODES. Temporal ensembling: the demo policy scored 83/90
    # twice with it, 79-80/90 with receding_horizon (README, "The simulated demo").
    mode: str = "temporal_ensemble"
    execute_steps: int = 0  # receding horizon: actions executed per chunk (0 = the whole chunk, MaIL)
    ensemble_decay: float = 0.01  # temporal ensembling weight decay m in exp(-m*i)
    interpolation: str = "linear"  # between action due times: linear or hold
    max_chunk_age: float = 0.5  # s; chunks from older observations are discarded
    max_clock_skew: float = DEFAULT_MAX_STAMP_LEAD  # s; chunks and joint states stamped further ahead are refused
    max_chunk_span: float = 3.0  # s; chunks whose executed actions span longer are refused
    max_tracking_error: float = 0.25  # rad between the setpoint and the arm: it is not following
    home_position: tuple[float, ...] = FR3_HOME  # rad, the homing pose
    knot_spacing: float = 0.01  # s between the points of a command
    # s the controller may take to apply a command while its setpoint stays exactly smooth: a
    # command keeps the previous one's motion this long, which is also how late the arm reacts
    # to new chunks, holds and goals. A real controller on the same clock applies a command within
    # a few milliseconds of its stamp (DDS delivery plus one 1 kHz cycle). On simulated time the
    # nodes see the simulator's clock late (see mail_ros.sim.SIM_TIME_COMMAND_LATENCY).
    command_latency: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "home_position", tuple(float(v) for v in self.home_position))
        check_fields(self, "", positive=("control_rate_hz", "max_chunk_age", "max_chunk_span", "max_tracking_error",
                                         "knot_spacing"),
                     non_negative=("max_clock_skew", "command_latency", "ensemble_decay"))
        if self.mode not in SCHEDULER_MODES:
            raise SafetyError(f"mode must be one of {list(SCHEDULER_MODES)}, got {self.mode!r}")
        if self.execute_steps < 0:
            raise SafetyError(f"execute_steps must be >= 0 (0 = the whole chunk), got {self.execute_steps}")
        if self.knot_spacing > 0.5 / self.control_rate_hz:
            raise SafetyError(f"knot_spacing {self.knot_spacing} s must be at most half the control period")

    @property
    def period(self) -> float:
        return 1.0 / self.control_rate_hz


@dataclass(frozen=True)
class Command:
    """A joint trajectory for the arm's controller: points at ``stamp + times``."""

    stamp: float  # s, the clock of the core
    times: np.ndarray  # (K,) time_from_start, increasing, > 0
    positions: np.ndarray  # (K, J)
    velocities: np.ndarray  # (K, J)
    accelerations: np.ndarray  # (K, J)


@dataclass(frozen=True)
class TickResult:
    """What one tick decided: a command to send (or None), a gripper width to command (or None),
    and the status for /diagnostics (level 0 OK, 1 WARN, 2 ERROR) with its message."""

    command: Command | None
    gripper_width: float | None
    level: int
    message: str
    log: list[tuple[int, str]] = field(default_factory=list)  # (level, line) worth logging now


class Plan:
    """A motion through points on a fixed grid ``origin + k * spacing``, constant jerk between
    consecutive points and at rest (the last position) after the last one."""

    def __init__(self, origin: float, spacing: float, first: int, positions: np.ndarray, velocities: np.ndarray,
                 accelerations: np.ndarray) -> None:
        self.origin, self.spacing, self.first = origin, spacing, first
        self.positions, self.velocities, self.accelerations = positions, velocities, accelerations  # (K, J)

    @classmethod
    def at_rest(cls, position: np.ndarray, origin: float, spacing: float) -> Plan:
        zero = np.zeros((1, len(position)))
        return cls(origin, spacing, 0, np.asarray(position, dtype=np.float64)[None, :].copy(), zero, zero.copy())

    def time(self, k: int) -> float:
        return self.origin + k * self.spacing

    @property
    def last(self) -> int:
        return self.first + len(self.positions) - 1

    @property
    def end_time(self) -> float:
        return self.time(self.last)

    def knot(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position, velocity, acceleration) at the grid point ``k`` (>= first), exactly as stored."""
        i = k - self.first
        if i >= len(self.positions) - 1:
            zero = np.zeros(self.positions.shape[1])
            return self.positions[-1].copy(), zero, zero.copy()
        return self.positions[i].copy(), self.velocities[i].copy(), self.accelerations[i].copy()

    def state(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position, velocity, acceleration) at ``t``: the first point before it, rest after the last."""
        s = (t - self.origin) / self.spacing
        i = int(math.floor(s + 1e-9)) - self.first
        if i < 0:
            return self.positions[0].copy(), self.velocities[0].copy(), self.accelerations[0].copy()
        if i >= len(self.positions) - 1:
            zero = np.zeros(self.positions.shape[1])
            return self.positions[-1].copy(), zero, zero.copy()
        h = self.spacing
        tau = min(max(t - self.time(self.first + i), 0.0), h)
        p, v, a = self.positions[i], self.velocities[i], self.accelerations[i]
        jerk = (self.accelerations[i + 1] - a) / h
        return (p + v * tau + a * tau**2 / 2 + jerk * tau**3 / 6, v + a * tau + jerk * tau**2 / 2, a + jerk * tau)


class ExecutorCore:
    """The command loop of executor_node; see the module docstring. Not thread-safe: callers serialise."""

    def __init__(self, config: ExecutorConfig | None = None, safety: SafetyConfig | None = None,
                 limits: JointLimits | None = None, *, gripper: bool = True) -> None:
        self.config = config or ExecutorConfig()
        self.safety = SafetyFilter(safety or SafetyConfig(), limits or fr3_limits())
        self.limits = self.safety.limits  # margined
        self.arm_joints = list(self.limits.names)
        home = np.asarray(self.config.home_position, dtype=np.float64)
        if home.shape != (len(self.arm_joints),) or not self.limits.contains(home):
            raise SafetyError(f"home_position must be {len(self.arm_joints)} joint positions inside the margined "
                              f"limits {self.limits.position_min.round(3).tolist()} .. "
                              f"{self.limits.position_max.round(3).tolist()}, got {home.tolist()}")
        self.home = home
        self.watchdog = Watchdog(self.safety.config)
        self._stamp_gate = StampGate(self.config.max_clock_skew)  # for joint states (the scheduler has its own for chunks)
        # The gripper width is the last action column, unless the gripper is not driven at all.
        self.action_names = self.arm_joints + ([GRIPPER_ACTION_NAME] if gripper else [])
        cfg = self.config
        self.scheduler = ChunkScheduler(mode=cfg.mode, action_dim=len(self.action_names),
                                        # execute_steps is the receding horizon's; the other modes use whole chunks.
                                        execute_steps=(cfg.execute_steps or None) if cfg.mode == "receding_horizon"
                                        else None, ensemble_decay=cfg.ensemble_decay,
                                        max_chunk_age=cfg.max_chunk_age, max_chunk_lead=cfg.max_clock_skew,
                                        max_chunk_span=cfg.max_chunk_span, interpolation=cfg.interpolation,
                                        instruction_id="")  # accept nothing before the first goal
        self.enabled = True
        self.measured: np.ndarray | None = None  # (J,) latest valid measured arm position
        self.plan: Plan | None = None  # the motion last commanded (None: the controller's setpoint is unknown)
        self.commanding = False  # streaming commands (False: idle or stopped)
        self.needs_ramp = True
        self.ramp_until = -math.inf
        self.goal_id: str | None = None
        self.state_fault = False  # the last joint state was refused
        self.recovering = False  # bringing the setpoint back to an arm that did not follow
        self.last_verdict: Verdict | None = None
        self.counters = {"chunks_accepted": 0, "chunks_rejected": 0, "commands": 0, "holds": 0, "refused_plans": 0}
        self.worst_lag = 0.0  # rad, largest |setpoint - measured| since the last report
        # The commands as a controller joining from its desired state would run them, sampled at 1 kHz.
        self._jtc = JointTrajectoryController(self.arm_joints, self.safety.hard_limits.position_min,
                                              self.safety.hard_limits.position_max, home, join="desired")
        self.monitor = SetpointMonitor(len(self.arm_joints))
        self._monitor_cycle: int | None = None
        # The JTC model and the monitor run on the clock minus this whole second: ROS time is
        # seconds since 1970, where a float64 resolves 0.24 us, and 1 ms differences of positions
        # sampled there read as jerk (484 rad/s^3 for a steady 1 rad/s) that is not in the commands.
        self._time_origin: float | None = None

    # --- inputs ---------------------------------------------------------------------------------
    def joint_state(self, now: float, stamp: float, names, positions) -> str:
        """A /joint_states message at ``now``; returns why it was ignored ("" when used).

        An ignored state is not fresh: the watchdog sees the joint states go stale and stops.
        Meanwhile no chunk is accepted, and when states become valid again, chunks predicted
        before are void (a ramp or restart never aims at a target from before a fault cleared).
        """
        try:
            q = joint_positions(names, positions, self.arm_joints)
            stamp_ns, now_ns = seconds_to_ns(stamp), seconds_to_ns(now)
            refusal = self._stamp_gate.check(stamp_ns, now_ns)
            if refusal is not None:
                raise RobotStateError(self._stamp_gate.explain(refusal, stamp_ns, now_ns, "max_clock_skew"))
        except RobotStateError as exc:
            self.state_fault = True
            return str(exc)
        if self.state_fault:
            self.state_fault = False
            self.scheduler.reset(instruction_id=self.scheduler.instruction_id, now=now)
        self.measured = q
        self.watchdog.joint_state_received(min(stamp, now))
        return ""

    def goal(self, goal_id: str, now: float) -> bool:
        """A goal (instruction) at ``now``; True when it is new: old chunks are discarded."""
        if goal_id == self.goal_id:
            return False
        self.goal_id = goal_id
        # Chunks of the old goal, queued or in flight, must never move the arm again.
        self.scheduler.reset(instruction_id=goal_id, now=now)
        self.needs_ramp = True
        self.ramp_until = -math.inf
        return True

    def chunk(self, now: float, *, chunk_id: int, stamp: float, dt: float, names, actions: np.ndarray,
              instruction_id: str, action_space: str = "joint_position") -> str:
        """An ActionChunk at ``now`` (actions (A, len(names))); returns why it was refused ("" when accepted)."""
        reason = self._chunk_problem(names, actions, dt, action_space)
        if not reason and self.state_fault:
            # When in doubt, hold: nothing new is started while the arm's state is not known to be valid.
            reason = "the robot state is invalid (the last joint state was refused)"
        if not reason:
            names = list(names)
            chunk = Chunk(chunk_id=chunk_id, stamp=stamp, dt=float(dt),
                          actions=np.asarray(actions, dtype=np.float64)[:, [names.index(n) for n in self.action_names]],
                          instruction_id=instruction_id)
            before = self.scheduler.counters.copy()
            if self.scheduler.add_chunk(chunk, now):
                self.counters["chunks_accepted"] += 1
                self.watchdog.chunk_received(now)
                return ""
            reason = next(iter(self.scheduler.counters - before), "rejected").removeprefix("rejected:")
            reason = f"{reason} (observation {now - stamp:.3f} s old)"
        self.counters["chunks_rejected"] += 1
        return f"chunk {chunk_id}: {reason}"

    def _chunk_problem(self, names, actions, dt: float, action_space: str) -> str:
        if action_space != "joint_position":
            return f"unsupported action space {action_space!r}"
        names = list(names)
        actions = np.asarray(actions, dtype=np.float64)
        missing = [name for name in self.action_names if name not in names]
        if missing or len(set(names)) != len(names) or actions.ndim != 2 or actions.shape[0] == 0 \
                or actions.shape[1] != len(names):
            return f"malformed: names {names}, actions of shape {actions.shape}"
        if not (math.isfinite(dt) and dt > 0):
            return f"dt {dt} is not positive"
        try:
            check_joint_targets(names, actions)
        except RobotStateError as exc:
            return str(exc)
        return ""

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable commanding. Either way the next command starts afresh from the measured
        position: while disabled, anyone may have moved the arm or its controller."""
        self.enabled = enabled
        self._forget_plan()

    # --- the tick -------------------------------------------------------------------------------
    def tick(self, now: float, command_publishers: int = 1) -> TickResult:
        """Decide the tick at ``now``; ``command_publishers`` counts the publishers on the command
        topic, this executor's included."""
        log: list[tuple[int, str]] = []
        try:
            return self._decide(now, command_publishers, log)
        except TrajectoryRejected as exc:
            # The planner's own command failed the controller model's check (a planner defect, as
            # the position-limit overshoot the demo found was): it is not sent, the controller
            # finishes the last command, which ends at rest, and commanding starts anew.
            self._stop()
            self.counters["refused_plans"] += 1
            reason = f"stopped: a planned command failed the controller's check and was not sent: {exc}"
            log.append((2, reason))
            return TickResult(None, None, 2, reason, log)

    def _decide(self, now: float, command_publishers: int, log: list[tuple[int, str]]) -> TickResult:
        self._monitor_until(now)
        if not self.enabled:
            return TickResult(None, None, 1, "disabled", log)
        decision = self.watchdog.decide(now, command_publishers)
        if decision.verdict is not self.last_verdict:
            log.append((0, "commanding") if decision.command else (1, f"{decision.verdict.value}: {decision.reason}"))
            self.last_verdict = decision.verdict
        if decision.clock_jump:
            # Chunks accepted (and the newest stamp seen) before the jump belong to another timeline,
            # and so does the plan.
            self.scheduler.reset(instruction_id=self.scheduler.instruction_id, now=now)
            self._forget_plan()
        if command_publishers > 1:
            self._forget_plan()  # someone else moves the controller's setpoint
        if decision.verdict is Verdict.STOP:
            self._stop()
            return TickResult(None, None, 2, f"stopped: {decision.reason}", log)
        ramp_limits = self.safety.ramp_limits
        if self.plan is not None:
            lag = np.abs(self.plan.state(now)[0] - self.measured)
            self.worst_lag = max(self.worst_lag, float(lag.max()))
            joint = self.arm_joints[int(lag.argmax())]
            if self.recovering and lag.max() > RECOVERED * self.config.max_tracking_error:
                # Bring the setpoint to the arm (blocked by contact, or lagging far behind) from
                # where it is, at the ramp speed; the policy's targets wait until it is near.
                target = np.clip(self.measured, self.limits.position_min, self.limits.position_max)
                command = self._command(now, lambda times: np.tile(target, (len(times), 1)), ramp_limits)
                return TickResult(command, None, 1, f"recovering: moving the setpoint to the arm ({joint} "
                                  f"{lag.max():.3f} rad away)", log)
            self.recovering = False
            if lag.max() > self.config.max_tracking_error:
                reason = (f"the arm is not following: {joint} is {lag.max():.3f} rad from the setpoint "
                          f"(max_tracking_error {self.config.max_tracking_error})")
                log.append((2, reason))
                self._stop()
                self.recovering = True
                return TickResult(None, None, 2, f"stopped: {reason}", log)
        action = self.scheduler.next_action(now) if decision.command else None
        if action is None:
            reason = decision.reason or "no action due now"
            if not self.commanding:
                # Not commanding yet: leave the controller holding on its own rather than sending
                # "stay here" targets at a robot someone else may be moving.
                return TickResult(None, None, 1, f"idle: {reason}", log)
            if self.ramp_until > now:
                # The rest of this ramp leads to a target of the past: ramp anew on resuming.
                self.ramp_until = -math.inf
                self.needs_ramp = True
            self.counters["holds"] += 1
            return TickResult(self._command(now, None, self.limits), None, 1, f"holding: {reason}", log)
        if not self.commanding:
            self.commanding = True
            if self.plan is None:
                self._fresh_plan(now)
        arm = np.clip(action[: len(self.arm_joints)], self.limits.position_min, self.limits.position_max)
        width = self.safety.gripper_width(action[-1]) if len(action) > len(self.arm_joints) else None
        setpoint = self.plan.state(now)[0]
        if self.needs_ramp:
            # Once per start or goal: a policy whose next target is always a step ahead (fast
            # motion at 10 Hz) must not be slowed to a ramp at every chunk.
            self.needs_ramp = False
            if self.safety.needs_ramp(setpoint, arm):
                duration = ramp_duration(setpoint, arm, ramp_limits,
                                         min_duration=self.safety.config.ramp_min_duration)
                self.ramp_until = now + duration
                log.append((0, f"ramping to the first action over {duration:.2f} s"))
        ramping = self.ramp_until > now and np.max(np.abs(arm - setpoint)) > self.safety.config.ramp_distance
        if not ramping:
            self.ramp_until = -math.inf
        command = self._command(now, self._targets, ramp_limits if ramping else self.limits)
        return TickResult(command, None if ramping else width, 0, "ramping" if ramping else "commanding", log)

    def _targets(self, times: np.ndarray) -> np.ndarray:
        """(N, J) arm targets of the policy at ``times`` (the last one known where none is due).

        The setpoint reaches the action due at t one control period later, as a per-tick
        executor commanding "the action due now, reached at the next tick" does, and as the
        demonstrations' controller did: policies are trained on arms that lag their actions so.
        """
        out = np.empty((len(times), len(self.arm_joints)))
        last = None
        for i, t in enumerate(times):
            action = self.scheduler.action_at(float(t) - self.config.period)
            if action is not None:
                last = np.clip(action[: len(self.arm_joints)], self.limits.position_min, self.limits.position_max)
            if last is None:
                last = self.plan.state(float(t))[0]
            out[i] = last
        return out

    def _stop(self) -> None:
        self.commanding = False
        self.needs_ramp = True
        self.ramp_until = -math.inf

    def _fresh_plan(self, now: float) -> None:
        """The controller's setpoint is unknown: plan from rest at the measured position."""
        self.plan = Plan.at_rest(self.measured, now + max(FRESH_START, self.config.command_latency),
                                 self.config.knot_spacing)
        self._jtc.hold(self.measured)
        self.monitor.restart()

    def _controller_time(self, t: float) -> float:
        """``t`` on the clock of the JTC model and the 1 kHz monitor (see ``_time_origin``)."""
        if self._time_origin is None:
            self._time_origin = float(math.floor(t))
        return t - self._time_origin

    def _forget_plan(self) -> None:
        self.plan = None
        self.recovering = False
        self._stop()

    # --- planning -------------------------------------------------------------------------------
    def _command(self, now: float, targets, limits: JointLimits) -> Command:
        """Plan from the setpoint ``command_latency`` ahead: track ``targets`` (None: stop now) for
        two control periods, then stop; returns the points after ``now``."""
        old, cfg = self.plan, self.config
        h = cfg.knot_spacing
        k_now = max(old.first, math.floor((now - old.origin) / h + 1e-9))
        k_branch = max(k_now + 1, math.ceil((now + cfg.command_latency - old.origin) / h - 1e-9))
        kept = [old.knot(k) for k in range(k_now, k_branch + 1)]
        p, v, a = kept[-1]
        horizon = k_branch + (0 if targets is None else math.ceil(2 * cfg.period / h))
        track_times = old.origin + h * np.arange(k_branch + 1, horizon + 2)  # one beyond, for the feed-forward
        goal = targets(track_times) if targets is not None and len(track_times) else None
        speed = np.minimum(limits.velocity_max, self.safety.config.max_step_delta * cfg.control_rate_hz)
        speed = speed * VELOCITY_HEADROOM
        points = []
        k = k_branch
        while True:
            if k < horizon:
                i = k - k_branch
                r = goal[i]
                feed = np.clip((goal[i + 1] - goal[i]) / h, -speed, speed)
            else:
                if np.all(np.abs(v) < REST_VELOCITY) and np.all(np.abs(a) < REST_ACCELERATION):
                    break
                if (k - horizon) * h > MAX_STOP_DURATION:
                    raise SafetyError("a stop did not come to rest: the planner is broken")
                r, feed = None, None
            p, v, a = self._step(p, v, a, r, feed, speed, limits)
            points.append((p, v, a))
            k += 1
        # The stop ends at rest: drop the last residue of motion (below REST_* by construction).
        if points:
            p_end = points[-1][0]
            zero = np.zeros_like(p_end)
            points.append((p_end, zero, zero.copy()))
        positions = np.array([s[0] for s in kept] + [s[0] for s in points])
        velocities = np.array([s[1] for s in kept] + [s[1] for s in points])
        accelerations = np.array([s[2] for s in kept] + [s[2] for s in points])
        ks = np.arange(k_now, k_now + len(positions))
        times = (old.origin - now) + h * ks  # the offset first: every point exactly h apart
        after = times > 1e-9
        command = Command(stamp=now, times=times[after], positions=positions[after], velocities=velocities[after],
                          accelerations=accelerations[after])
        start = self._controller_time(now)
        # Raises TrajectoryRejected (and keeps the plan sent before) where the controller would refuse it.
        self._jtc.set_trajectory(self.arm_joints, list(zip(command.times, command.positions, command.velocities,
                                                               command.accelerations)), start_time=start, now=start)
        self.plan = Plan(old.origin, h, k_now, positions, velocities, accelerations)
        self.counters["commands"] += 1
        return command

    def _step(self, p, v, a, target, feed, speed, limits: JointLimits):
        """One piece of constant jerk over ``knot_spacing`` towards ``target`` (None: to rest).

        The law, per joint: a velocity goal (the target's velocity plus a braked approach to it,
        never faster than braking at half the acceleration limit allows, towards the target or
        a position limit), an acceleration goal that reaches the velocity goal within
        VELOCITY_TIME_CONSTANT, and the jerk that reaches it by the end of the piece, each clipped
        to its limit. (np.minimum/np.maximum rather than np.clip: this runs ~60 times a tick.)
        """
        h = self.config.knot_spacing
        amax, jmax = limits.acceleration_max, limits.jerk_max
        if target is None:
            v_goal = 0.0
        else:
            error = target - p
            distance = np.abs(error)
            approach = np.minimum(distance / POSITION_TIME_CONSTANT, np.sqrt(amax * distance))
            v_goal = np.maximum(np.minimum(feed + np.sign(error) * approach, speed), -speed)
            # Towards a position limit: braking at half the acceleration limit would stop at it, less
            # the way the velocity covers while it lags its goal (VELOCITY_TIME_CONSTANT).
            drift = np.abs(v) * VELOCITY_TIME_CONSTANT
            v_goal = np.minimum(v_goal, np.sqrt(amax * np.maximum(self.limits.position_max - p - drift, 0.0)))
            v_goal = np.maximum(v_goal, -np.sqrt(amax * np.maximum(p - self.limits.position_min - drift, 0.0)))
        a_goal = np.maximum(np.minimum((v_goal - v) / VELOCITY_TIME_CONSTANT, amax), -amax)
        # The velocity at the end of the piece, v + (a + a_next) h / 2, stays within the speed limit.
        a_goal = np.maximum(np.minimum(a_goal, 2 * (speed - v) / h - a), -2 * (speed + v) / h - a)
        # The jerk limit, then the acceleration limit at the end of the piece (which wins).
        jerk = np.maximum(np.minimum((a_goal - a) / h, jmax), -jmax)
        jerk = np.maximum(np.minimum(jerk, (amax - a) / h), (-amax - a) / h)
        return p + h * (v + h * (a / 2 + jerk * h / 6)), v + h * (a + jerk * h / 2), a + jerk * h

    # --- homing ---------------------------------------------------------------------------------
    def homing(self, now: float) -> Command:
        """A command that stops the commanded motion, then moves to the home pose along a minimum-jerk
        path at the ramp speed; commanding pauses (the caller disables the executor).

        Raises SafetyError without a measured position to start from.
        """
        if self.measured is None:
            raise SafetyError("no joint state received")
        if self.plan is None:
            self._fresh_plan(now)
        stop = self._command(now, None, self.limits)
        plan, h = self.plan, self.config.knot_spacing
        start = plan.positions[-1]
        duration = ramp_duration(start, self.home, self.safety.ramp_limits,
                                 min_duration=self.safety.config.ramp_min_duration)
        steps = max(1, math.ceil(duration / h - 1e-9))
        p, v, a = min_jerk(start, self.home, steps * h, np.arange(1, steps + 1) * h)
        p[-1], v[-1], a[-1] = self.home, 0.0, 0.0
        positions = np.vstack([plan.positions, p])
        velocities = np.vstack([plan.velocities, v])
        accelerations = np.vstack([plan.accelerations, a])
        self.plan = Plan(plan.origin, h, plan.first, positions, velocities, accelerations)
        times = np.concatenate([stop.times, stop.times[-1] + h * np.arange(1, steps + 1)])
        command = Command(stamp=now, times=times, positions=np.vstack([stop.positions, p]),
                          velocities=np.vstack([stop.velocities, v]), accelerations=np.vstack([stop.accelerations, a]))
        start = self._controller_time(now)
        self._jtc.set_trajectory(self.arm_joints, list(zip(command.times, command.positions, command.velocities,
                                                               command.accelerations)), start_time=start, now=start)
        self._stop()
        return command

    # --- diagnostics ----------------------------------------------------------------------------
    def _monitor_until(self, now: float) -> None:
        """Sample this executor's commands, as the controller runs them, every 1 ms up to ``now``."""
        cycle = math.floor(self._controller_time(now) / CONTROLLER_PERIOD)
        if self._monitor_cycle is None or cycle < self._monitor_cycle or cycle - self._monitor_cycle > 10_000:
            self._monitor_cycle = cycle  # first call, a clock jump, or a long pause: no difference across it
            self.monitor.restart()
            return
        if cycle > self._monitor_cycle:
            cycles = np.arange(self._monitor_cycle + 1, cycle + 1)
            self.monitor.add(self._jtc.sample_many(cycles * CONTROLLER_PERIOD)[0])
        self._monitor_cycle = cycle

    def report(self) -> dict[str, str | int]:
        """Counters and the worst values since the last report, for /diagnostics."""
        acceleration, jerk = self.monitor.take()
        values: dict[str, str | int] = dict(self.counters, mode=self.scheduler.mode, enabled=str(self.enabled),
                                            tracking_error_max_rad=f"{self.worst_lag:.3f}",
                                            setpoint_1khz_acceleration_max=f"{acceleration:.2f}",
                                            setpoint_1khz_jerk_max=f"{jerk:.0f}")
        self.worst_lag = 0.0
        values.update({f"scheduler.{key}": count for key, count in self.scheduler.counters.items()})
        return values
