"""The executor's control core on a simulated clock: no ROS, no sleeps, the same answer on any machine.

A bench plays everything around the core at 1 kHz of simulated time: the policy (chunks with
arrival jitter, stalls and goal changes), the arm's joint trajectory controller (mail_ros.sim.jtc,
joining from its desired state, applying each command up to ``command_latency`` late), an arm
that follows the setpoint (or lags it, or does not move), and /joint_states at 100 Hz. Every
controller setpoint is sampled every millisecond and checked against the margined FR3 limits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from mail_ros.control.executor import Command, ExecutorConfig, ExecutorCore, Plan
from mail_ros.control.limits import fr3_limits
from mail_ros.control.safety import SafetyConfig, SafetyError
from mail_ros.control.scheduler import SCHEDULER_MODES
from mail_ros.sim.jtc import JointTrajectoryController
from mail_ros.spec import FR3_ARM_JOINTS, FR3_HOME, GRIPPER_ACTION_NAME

HOME = np.array(FR3_HOME)
HARD = fr3_limits()
MARGINED = HARD.with_margins(0.05, 0.5, 0.5, 0.5)
NAMES = list(FR3_ARM_JOINTS) + [GRIPPER_ACTION_NAME]
MS = 0.001
T0 = 1000.0  # the simulated clock's start (s)


class Bench:
    """The world around one ExecutorCore, stepped in whole milliseconds of simulated time."""

    def __init__(self, core: ExecutorCore | None = None, *, seed: int = 0, latency: float = 0.02,
                 tick_jitter: float = 0.0, arm_delay: float = 0.0, follows: bool = True, t0: float = T0):
        self.core = core or ExecutorCore()
        self.rng = np.random.default_rng(seed)
        self.latency = latency  # s, the largest delay before the controller applies a command
        self.tick_jitter = tick_jitter  # s, the largest delay of a control tick
        self.arm_delay = arm_delay  # s the arm lags its setpoint
        self.follows = follows  # False: the arm stays where it is (a controller that is not running)
        self.jtc = JointTrajectoryController(FR3_ARM_JOINTS, HARD.position_min, HARD.position_max, HOME)
        self.cycle = round(t0 / MS)
        self.setpoints = {self.cycle: HOME.copy()}  # cycle -> controller setpoint
        self.pending: list[tuple[int, Command]] = []  # (cycle to apply at, command)
        self.commands: list[tuple[float, Command]] = []
        self.states_valid = True
        self.state_override = None  # callable(names, positions) -> (names, positions): a broken reading
        self.publish_states = True
        self.clock_offset = 0.0  # added to the core's clock (a clock jump)
        self.next_tick = self.cycle
        self.results = []

    @property
    def now(self) -> float:
        return self.cycle * MS

    def measured(self) -> np.ndarray:
        if not self.follows:
            return HOME.copy()
        lagged = self.cycle - round(self.arm_delay / MS)
        return self.setpoints[max(lagged, min(self.setpoints))].copy()

    def run(self, seconds: float, policy=None, chunk_period: float = 0.1, stall=None) -> None:
        """Advance ``seconds``; ``policy(now) -> (A, 8) actions`` is asked every ``chunk_period``
        (plus jitter) unless ``stall(now)`` says it is stalled."""
        end = self.cycle + round(seconds / MS)
        next_chunk = self.cycle
        while self.cycle < end:
            c, now = self.cycle, self.now
            for item in [p for p in self.pending if p[0] <= c]:
                self.pending.remove(item)
                command = item[1]
                self.jtc.set_trajectory(FR3_ARM_JOINTS, list(zip(command.times, command.positions,
                                                                 command.velocities, command.accelerations)),
                                        start_time=command.stamp - self.clock_offset, now=now)
            self.setpoints[c] = self.jtc.setpoint(now)
            clock = now + self.clock_offset
            if c % 10 == 0 and self.publish_states:
                names, positions = list(FR3_ARM_JOINTS), list(self.measured())
                if self.state_override is not None:
                    names, positions = self.state_override(names, positions)
                self.core.joint_state(clock, clock, names, positions)
            if policy is not None and c >= next_chunk:
                if stall is None or not stall(now):
                    actions = policy(now)
                    self.core.chunk(clock, chunk_id=c, stamp=clock - 0.05, dt=0.1, names=NAMES, actions=actions,
                                    instruction_id=self.core.goal_id or "")
                next_chunk = c + round((chunk_period + self.rng.uniform(0, 0.3 * chunk_period)) / MS)
            if c >= self.next_tick:
                result = self.core.tick(clock)
                self.results.append((now, result))
                if result.command is not None:
                    self.commands.append((now, result.command))
                    delay = round(self.rng.uniform(0, self.latency) / MS)
                    self.pending.append((c + max(delay, 1), result.command))
                jitter = self.rng.uniform(0, self.tick_jitter) if self.rng.random() < 0.3 else 0.0
                self.next_tick = c + round((self.core.config.period + jitter) / MS)
            self.cycle += 1

    def trace(self) -> np.ndarray:
        """(N, 7) every setpoint so far, one per millisecond."""
        return np.array([self.setpoints[c] for c in sorted(self.setpoints)])


def assert_smooth(trace: np.ndarray, tol: float = 1e-6) -> tuple[float, float]:
    """The 1 kHz setpoint within the margined position, velocity, acceleration and jerk limits."""
    assert np.all(trace >= MARGINED.position_min - 1e-3) and np.all(trace <= MARGINED.position_max + 1e-3)
    velocity = np.diff(trace, axis=0) / MS
    acceleration = np.diff(trace, n=2, axis=0) / MS**2
    jerk = np.diff(trace, n=3, axis=0) / MS**3
    assert np.all(np.abs(velocity) <= MARGINED.velocity_max * (1 + 1e-3)), np.abs(velocity).max(axis=0)
    assert np.all(np.abs(acceleration) <= MARGINED.acceleration_max * (1 + 1e-3) + tol), np.abs(acceleration).max(axis=0)
    assert np.all(np.abs(jerk) <= MARGINED.jerk_max * (1 + 1e-3) + tol), np.abs(jerk).max(axis=0)
    return float(np.abs(acceleration).max()), float(np.abs(jerk).max())


def constant(target, width=0.08, horizon=8):
    return lambda now: np.tile(np.append(target, width), (horizon, 1))


def sweep(joint, velocity, t0, horizon=8):
    """Targets moving ``joint`` away from home at ``velocity`` rad/s from ``t0`` on, without end."""
    def policy(now):
        times = now - 0.05 + 0.1 * np.arange(horizon)
        arm = np.tile(HOME, (horizon, 1))
        arm[:, joint] += velocity * np.maximum(times - t0, 0.0)
        return np.hstack([arm, np.full((horizon, 1), 0.08)])

    return policy


def wave(amplitude=0.4, frequency=0.4):
    shape = np.array([1.0, 0.5, 0.3, 0.4, 1.0, 0.5, 1.0])

    def policy(now):
        times = now - 0.05 + 0.1 * np.arange(16)
        arm = HOME + amplitude * np.sin(2 * np.pi * frequency * times)[:, None] * shape
        return np.hstack([arm, np.full((16, 1), 0.08)])

    return policy


def started(core=None, **kwargs) -> Bench:
    bench = Bench(core, **kwargs)
    bench.core.goal("goal-1", bench.now)
    return bench


# --- smoothness ---------------------------------------------------------------------------------
@settings(max_examples=18, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    latency=st.floats(0.0, 0.05),
    tick_jitter=st.floats(0.0, 0.08),
    events=st.lists(st.sampled_from(["jump", "stall", "goal", "far", "wave", "hold"]), min_size=2, max_size=5),
    mode=st.sampled_from(SCHEDULER_MODES),
    execute_steps=st.sampled_from([0, 1, 4]),
)
def test_the_1khz_setpoint_stays_within_the_limits_through_anything(seed, latency, tick_jitter, events, mode,
                                                                    execute_steps):
    core = ExecutorCore(ExecutorConfig(mode=mode, execute_steps=execute_steps))
    bench = started(core, seed=seed, latency=latency, tick_jitter=tick_jitter, arm_delay=0.02)
    rng = np.random.default_rng(seed)
    for event in events:
        target = np.clip(HOME + rng.uniform(-0.6, 0.6, 7), MARGINED.position_min, MARGINED.position_max)
        if event == "jump":  # the policy's target jumps every chunk
            bench.run(0.8, lambda now: np.tile(np.append(np.clip(HOME + rng.uniform(-0.5, 0.5, 7), -3, 3), 0.0),
                                               (8, 1)))
        elif event == "stall":
            bench.run(1.0, constant(target), stall=lambda now, t=bench.now: t + 0.2 < now < t + 0.8)
        elif event == "goal":
            bench.core.goal(f"goal-{bench.now}", bench.now)
            bench.run(0.6, constant(target))
        elif event == "far":  # beyond the limits: clipped
            bench.run(0.8, constant(np.clip(target * 1.5, HARD.position_min - 0.2, HARD.position_max + 0.2)))
        elif event == "wave":
            bench.run(1.0, wave())
        else:
            bench.run(0.5)
    if set(events) == {"hold"}:
        # No chunk ever came: the executor never starts commanding (the controller holds by itself).
        assert not bench.commands
    else:
        assert bench.commands, "no command"
    assert_smooth(bench.trace())


def test_a_policy_that_leads_the_arm_is_followed_after_one_ramp():
    bench = started(arm_delay=0.05)
    step = np.array([0.06, 0, 0, 0, 0, 0, 0])  # per 0.1 s: 0.6 rad/s on joint 1

    def leading(now):
        q = bench.measured()
        return np.array([np.append(q + (k + 1) * step, 0.08) for k in range(8)])

    bench.run(3.0, leading)
    assert_smooth(bench.trace())
    assert bench.trace()[-1][0] - HOME[0] > 1.0
    assert sum("ramping to the first action" in line for _, r in bench.results for _, line in r.log) == 1


def test_the_wave_is_tracked_closely():
    # Peak 0.75 rad/s: within max_step_delta * control_rate_hz (1 rad/s).
    bench = started()
    bench.run(4.0, wave(0.3))
    trace = bench.trace()[-2000:]
    times = (bench.cycle - 1 - np.arange(len(trace))[::-1]) * MS
    shape = np.array([1.0, 0.5, 0.3, 0.4, 1.0, 0.5, 1.0])
    # Each action is reached one control period after it is due.
    wanted = HOME + 0.3 * np.sin(2 * np.pi * 0.4 * (times - bench.core.config.period))[:, None] * shape
    assert np.abs(trace - wanted).max() < 0.01


def test_the_1khz_report_is_the_same_on_a_clock_since_1970():
    # ROS time on a robot is seconds since the epoch: 1 ms differences sampled there must not
    # read as acceleration and jerk that are not in the commands.
    reports = []
    for t0 in (T0, 1.7e9):
        bench = started(t0=t0)
        bench.run(3.0, wave(0.3))
        reports.append(bench.core.report())
    (near, epoch) = [(float(r["setpoint_1khz_acceleration_max"]), float(r["setpoint_1khz_jerk_max"])) for r in reports]
    assert epoch[0] <= MARGINED.acceleration_max.max() and epoch[1] <= MARGINED.jerk_max.max()
    assert epoch == pytest.approx(near, rel=0.02)


def test_identical_inputs_give_identical_commands():
    runs = []
    for _ in range(2):
        bench = started(seed=7, latency=0.03, tick_jitter=0.05)
        bench.run(2.0, wave(), stall=lambda now: T0 + 1.0 < now < T0 + 1.4)
        runs.append(bench.commands)
    assert len(runs[0]) == len(runs[1])
    for (t0, a), (t1, b) in zip(*runs):
        assert t0 == t1
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.accelerations, b.accelerations)


def test_every_command_ends_at_rest_so_a_stall_stops_the_arm_smoothly():
    bench = started()
    bench.run(1.5, wave(0.6, 0.5))
    for _, command in bench.commands:
        np.testing.assert_array_equal(command.velocities[-1], 0.0)
        np.testing.assert_array_equal(command.accelerations[-1], 0.0)
    bench.core.enabled = True
    last = bench.commands[-1][1]
    bench.run(2.0)  # no chunks, and the core is told nothing: the watchdog holds
    trace = bench.trace()
    assert_smooth(trace)
    assert np.abs(np.diff(trace[-100:], axis=0)).max() == 0.0  # at rest
    assert last.times[-1] < 1.0


# --- holds, stops, restarts ----------------------------------------------------------------------
def test_no_fresh_chunk_holds_at_rest():
    bench = started()
    target = HOME + 0.3
    target[3] = HOME[3]
    bench.run(2.0, constant(target))
    bench.run(1.5)
    held = [r for _, r in bench.results[-10:]]
    assert all(r.message.startswith("holding") for r in held)
    trace = bench.trace()
    assert np.ptp(trace[-500:], axis=0).max() < 1e-9


def test_stale_joint_states_stop_then_commanding_resumes_from_the_setpoint():
    bench = started()
    bench.run(1.5, constant(HOME + 0.2))
    bench.publish_states = False
    t_stop = bench.now
    bench.run(1.0, constant(HOME + 0.2))
    last = max(t for t, _ in bench.commands)
    assert last <= t_stop + bench.core.safety.config.joint_state_timeout + bench.core.config.period + 1e-9
    bench.publish_states = True
    bench.run(1.0, constant(HOME + 0.25))
    assert max(t for t, _ in bench.commands) > t_stop + 1.0
    assert_smooth(bench.trace())


def test_after_a_stop_for_tracking_loss_the_next_command_starts_at_the_setpoint():
    # An arm lagging its setpoint by 0.1 s: with a strict max_tracking_error the executor stops,
    # the controller brings the setpoint to rest, and the restart continues from that setpoint,
    # never from the measured position (issue 18: a 0.19 rad jump within one tick).
    core = ExecutorCore(ExecutorConfig(max_tracking_error=0.05))
    bench = started(core, arm_delay=0.1)
    bench.run(4.0, wave(0.6, 0.5))
    stops = [t for t, r in bench.results if "not following" in r.message]
    assert stops, "the lagging arm never tripped the tracking check"
    assert_smooth(bench.trace())
    for t, command in bench.commands:
        setpoint = bench.setpoints[round(t / MS)]
        # The first point is within one knot of motion at the velocity limit from the setpoint.
        assert np.all(np.abs(command.positions[0] - setpoint)
                      <= MARGINED.velocity_max * (command.times[0] + core.config.command_latency) + 1e-6)


def test_an_arm_that_does_not_follow_stops_the_commands_near_it():
    core = ExecutorCore(ExecutorConfig(max_tracking_error=0.25))
    bench = started(core, follows=False)
    bench.run(4.0, constant(HOME + np.array([0.8, 0, 0, 0, 0, 0, 0])))
    trace = bench.trace()
    assert np.abs(trace - HOME).max() <= 0.25 + MARGINED.velocity_max.max() * (core.config.period + 0.05)
    assert any("not following" in r.message for _, r in bench.results)
    assert_smooth(trace)


def test_an_arm_blocked_by_a_contact_gets_the_setpoint_back_then_follows_again():
    # The policy pushes into an obstacle: the arm stops short, the tracking check stops the
    # executor, the setpoint comes back to the arm (smoothly, from where it was), and commanding
    # resumes. (Stopping for good left the arm stuck in the demo.)
    core = ExecutorCore(ExecutorConfig(max_tracking_error=0.25))
    bench = started(core)
    blocked = HOME[1] + 0.2
    measured = bench.measured
    bench.measured = lambda: np.minimum(measured(), np.r_[np.inf, blocked, np.full(5, np.inf)])
    bench.run(4.0, constant(HOME + np.array([0, 0.6, 0, 0, 0, 0, 0])))
    messages = [r.message for _, r in bench.results]
    assert any(m.startswith("stopped: the arm is not following") for m in messages)
    assert any(m.startswith("recovering") for m in messages)
    assert_smooth(bench.trace())
    bench.measured = measured  # the obstacle is gone
    bench.run(4.0, constant(HOME + np.array([0, 0.6, 0, 0, 0, 0, 0])))
    assert abs(bench.trace()[-1][1] - (HOME[1] + 0.6)) < 1e-3
    assert_smooth(bench.trace())


@settings(max_examples=10, deadline=None)
@given(joint=st.integers(0, 6), upper=st.booleans(), short_of=st.floats(0.26, 0.5), speed=st.floats(0.3, 1.0),
       latency=st.floats(0.0, 0.05), seed=st.integers(0, 2**16))
@example(joint=5, upper=True, short_of=0.4, speed=0.5, latency=0.02, seed=0)  # the demo's: 2 mm past the hard limit
@example(joint=2, upper=False, short_of=0.3125, speed=0.5, latency=0.0, seed=0)  # 2 mm into the margin
def test_an_arm_blocked_short_of_a_position_limit_never_takes_the_setpoint_past_it(joint, upper, short_of, speed,
                                                                                   latency, seed):
    # Found by the demo: a policy drove fr3_joint6 towards its limit, the arm stopped short, and the
    # recovery braked the setpoint at the ramp's fraction of the acceleration limit from the speed it
    # had: 5 cm past the margin, a command the controller refused (and the executor node died).
    # Here the policy's targets sweep on through the limit at ``speed`` rad/s (clipped to it).
    limit = (MARGINED.position_max if upper else MARGINED.position_min)[joint]
    sign = 1.0 if upper else -1.0
    assume(abs(limit - HOME[joint]) > short_of + 0.1)
    core = ExecutorCore(ExecutorConfig(max_tracking_error=0.25))
    bench = started(core, seed=seed, latency=latency)
    block = np.full(7, np.inf)
    block[joint] = sign * limit - short_of  # the obstacle, short of the limit (in sign-flipped coordinates)
    measured = bench.measured
    bench.measured = lambda: sign * np.minimum(sign * measured(), block)
    policy = sweep(joint, sign * speed, bench.now)

    def stopped():
        return any(r.message.startswith("stopped: the arm is not following") for _, r in bench.results)

    for _ in range(30):  # up to 15 s: the farthest limits are 2.7 rad from home
        bench.run(0.5, policy)
        if stopped():
            break
    assert stopped()
    bench.run(1.5, policy)  # the recovery
    assert_smooth(bench.trace())


def test_a_planned_command_beyond_a_hard_limit_is_not_sent_and_the_core_keeps_going():
    # A planner defect (here: every piece 2 mm further towards joint 1's upper limit) must not reach
    # the controller, nor end the executor (the demo's executor node died of one).
    class DriftingCore(ExecutorCore):
        def _step(self, p, v, a, target, feed, speed, limits):
            p, v, a = super()._step(p, v, a, target, feed, speed, limits)
            return p + np.r_[0.002, np.zeros(6)], v, a

    bench = started(DriftingCore())
    bench.run(6.0, constant(np.r_[MARGINED.position_max[0], HOME[1:]]))
    refused = [r for _, r in bench.results if "failed the controller's check" in r.message]
    assert refused and all(r.command is None and r.level == 2 for r in refused)
    assert bench.core.counters["refused_plans"] == len(refused)
    for _, command in bench.commands:  # every command sent is one the controller accepts
        assert np.all(command.positions <= HARD.position_max) and np.all(command.positions >= HARD.position_min)
    assert bench.results[-1][0] == pytest.approx(bench.now - MS, abs=0.06)  # still ticking at the end


def test_a_second_commander_stops_and_the_restart_is_fresh():
    bench = started()
    bench.run(1.0, constant(HOME + 0.1))
    result = bench.core.tick(bench.now, command_publishers=2)
    assert result.command is None and "another node" in result.message
    assert bench.core.plan is None


def test_a_clock_jump_back_stops_then_recovers_with_fresh_messages():
    bench = started()
    target = HOME + np.array([0.03, 0, 0, 0, 0, 0, 0])
    bench.run(1.5, constant(target))
    bench.clock_offset = -10.0
    bench.run(0.3, constant(target))
    assert any("clock went backwards" in r.message for _, r in bench.results)
    n = len(bench.commands)
    bench.run(1.5, constant(target))
    assert len(bench.commands) > n + 10, "commanding did not resume after the clock jump"
    trace = bench.trace()
    assert np.abs(trace[-500:] - target).max() < 0.01
    assert_smooth(trace)


def test_a_goal_change_discards_the_old_goals_chunks():
    bench = started()
    up = HOME + np.array([0.6, 0, 0, 0, 0, 0, 0])
    bench.run(1.5, constant(up))
    old = bench.core.goal_id
    bench.core.goal("goal-2", bench.now)
    at_change = bench.trace()[-1][0]
    for i in range(5):
        reason = bench.core.chunk(bench.now, chunk_id=10**6 + i, stamp=bench.now, dt=0.1, names=NAMES,
                                  actions=constant(up)(0), instruction_id=old)
        assert "instruction_mismatch" in reason
        bench.run(0.1)
    # The committed command_latency of motion, then a stop: never on towards the old goal's target.
    latency = bench.core.config.command_latency
    speed = bench.core.safety.config.max_step_delta * bench.core.config.control_rate_hz
    bench.run(1.0)
    trace = bench.trace()
    assert trace[-1][0] <= at_change + speed * latency + speed**2 / MARGINED.acceleration_max[0]
    assert trace[-1][0] < up[0] - 0.05
    np.testing.assert_array_equal(trace[-1], trace[-2])  # at rest
    assert_smooth(trace)


def test_a_ramp_interrupted_by_a_hold_is_not_resumed():
    bench = started()
    far = HOME + np.array([0.8, 0, 0, 0, 0, 0, 0])
    bench.run(0.8, constant(far))
    bench.run(1.0)  # the policy stalls mid-ramp: hold
    here = bench.trace()[-1].copy()
    assert 0.005 < here[0] - HOME[0] < 0.7
    bench.run(1.5, constant(here))
    assert np.abs(bench.trace()[-1500:, 0] - here[0]).max() < 0.02


# --- the fault cases of issue 18 ----------------------------------------------------------------
def test_a_joint_beyond_its_limit_is_no_state_and_no_target_from_before_it_is_used():
    bench = started()
    bench.run(1.0, constant(HOME + 0.05))

    def beyond(names, positions):
        positions = list(positions)
        positions[0] = -3.3
        return names, positions

    bench.state_override = beyond
    t_bad = bench.now
    # The policy, fed the bad state, now aims at -3.299: such chunks arrive during the fault.
    aim = HOME.copy()
    aim[0] = -3.299
    bench.run(1.0, constant(aim))
    assert "beyond the hard limits" in bench.core.joint_state(bench.now, bench.now, FR3_ARM_JOINTS,
                                                             [-3.3] + list(HOME[1:]))
    assert max(t for t, _ in bench.commands) <= t_bad + 0.2 + 0.05 + 1e-9
    refusal = bench.core.chunk(bench.now, chunk_id=-1, stamp=bench.now - 0.05, dt=0.1, names=NAMES,
                               actions=constant(HOME)(bench.now), instruction_id=bench.core.goal_id)
    assert "robot state is invalid" in refusal  # nothing new starts during the fault
    bench.state_override = None
    n = len(bench.commands)
    bench.run(1.0)  # chunks predicted before the fault cleared are never executed
    assert len(bench.commands) == n
    trace = bench.trace()
    assert trace[:, 0].min() > HOME[0] - 0.01
    assert_smooth(trace)


def test_a_joint_named_twice_is_ignored():
    bench = started()
    bench.state_override = lambda names, positions: (names + ["fr3_joint1"], positions + [0.6])
    bench.run(1.0, constant(HOME + 0.1))
    assert not bench.commands
    assert "more than once" in bench.core.joint_state(bench.now, bench.now, FR3_ARM_JOINTS + ("fr3_joint1",),
                                                      list(HOME) + [0.6])


def test_a_rogue_chunk_of_1e30_is_refused_not_clipped():
    bench = started()
    bench.run(1.0, constant(HOME + 0.05))
    reason = bench.core.chunk(bench.now, chunk_id=99, stamp=bench.now, dt=0.1, names=NAMES,
                              actions=np.full((8, 8), 1e30), instruction_id=bench.core.goal_id)
    assert "no robot could mean" in reason
    bench.run(1.0)
    assert np.abs(bench.trace()[-1] - (HOME + 0.05)).max() < 1e-3


def test_bad_chunks_are_refused():
    core = ExecutorCore()
    core.goal("g", 0.0)
    good = np.tile(np.append(HOME, 0.08), (8, 1))
    assert core.chunk(0.0, chunk_id=1, stamp=0.0, dt=0.1, names=NAMES, actions=good, instruction_id="g") == ""
    cases = {
        "unsupported action space": dict(action_space="ee_pose"),
        "malformed": dict(names=NAMES[:-1]),
        "not positive": dict(dt=0.0),
        "non-finite": dict(actions=np.where(np.eye(8, dtype=bool), np.nan, good)),
        "instruction_mismatch": dict(instruction_id="other"),
        "from_future": dict(stamp=3600.0),
        "too_long": dict(dt=100.0),
    }
    for i, (reason, change) in enumerate(cases.items()):
        kwargs = dict(chunk_id=2 + i, stamp=0.01 * (i + 1), dt=0.1, names=NAMES, actions=good, instruction_id="g")
        kwargs.update(change)
        assert reason in core.chunk(0.1, **kwargs)
    duplicate = NAMES + ["fr3_joint1"]
    assert "malformed" in core.chunk(0.1, chunk_id=50, stamp=0.09, dt=0.1, names=duplicate,
                                     actions=np.zeros((8, 9)), instruction_id="g")


# --- homing, configuration ----------------------------------------------------------------------
def test_homing_stops_the_motion_then_reaches_home_smoothly():
    bench = started()
    bench.run(1.2, wave(0.5, 0.5))
    command = bench.core.homing(bench.core.plan and bench.now)
    bench.pending.append((bench.cycle + 5, command))
    bench.core.set_enabled(False)
    bench.run(8.0)
    trace = bench.trace()
    np.testing.assert_allclose(trace[-1], HOME, atol=1e-9)
    assert_smooth(trace)


def test_home_outside_the_limits_and_bad_settings_are_refused():
    with pytest.raises(SafetyError, match="home_position"):
        ExecutorCore(ExecutorConfig(home_position=(0.0, -0.785, 0.0, 0.5, 0.0, 1.571, 0.785)))
    with pytest.raises(SafetyError, match="knot_spacing"):
        ExecutorConfig(knot_spacing=0.04)
    with pytest.raises(SafetyError, match="mode"):
        ExecutorConfig(mode="yolo")


def test_the_plan_is_continuous_in_its_pieces():
    plan = Plan(0.0, 0.01, 0, np.array([[0.0], [0.001], [0.003]]), np.array([[0.0], [0.2], [0.2]]),
                np.array([[0.0], [20.0], [0.0]]))
    p, v, a = plan.state(0.01)
    assert p[0] == pytest.approx(0.001) and v[0] == pytest.approx(0.2) and a[0] == pytest.approx(20.0)
    np.testing.assert_array_equal(plan.state(1.0)[1], 0.0)  # at rest after the last point
    assert math.isclose(plan.end_time, 0.02)


def test_safety_defaults_are_the_deployed_ones():
    assert SafetyConfig().max_step_delta == 0.05
