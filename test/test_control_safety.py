"""Safety layer: FR3 limits, the target filter (hypothesis), ramps and the watchdog."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mail_ros.control.limits import JointLimits, LimitsError, fr3_limits
from mail_ros.control.safety import (
    SafetyConfig,
    SafetyError,
    SafetyFilter,
    Verdict,
    Watchdog,
    ramp_trajectory,
)

J = 7
FILTER = SafetyFilter()
LIM = FILTER.limits
REL = 1e-9


def test_fr3_limits_match_the_datasheet():
    lim = fr3_limits()
    assert lim.names == tuple(f"fr3_joint{i}" for i in range(1, 8))
    np.testing.assert_array_equal(lim.position_max, [2.7437, 1.7837, 2.9007, -0.1518, 2.8065, 4.5169, 3.0159])
    np.testing.assert_array_equal(lim.position_min, [-2.7437, -1.7837, -2.9007, -3.0421, -2.8065, 0.5445, -3.0159])
    np.testing.assert_array_equal(lim.velocity_max, [2.62, 2.62, 2.62, 2.62, 5.26, 4.18, 5.26])
    assert (lim.acceleration_max == 10).all() and (lim.jerk_max == 5000).all()
    assert (lim.gripper_width_min, lim.gripper_width_max) == (0.0, 0.08)
    with pytest.raises(ValueError):
        lim.position_max[0] = 0.0  # read-only


def test_with_margins():
    lim = fr3_limits()
    m = lim.with_margins()
    np.testing.assert_allclose(m.position_min, lim.position_min + 0.05)
    np.testing.assert_allclose(m.position_max, lim.position_max - 0.05)
    np.testing.assert_allclose(m.velocity_max, lim.velocity_max * 0.5)
    np.testing.assert_allclose(m.acceleration_max, 5.0)
    with pytest.raises(LimitsError, match="narrowest joint"):
        lim.with_margins(position_margin=1.5)
    with pytest.raises(LimitsError, match="velocity_scale"):
        lim.with_margins(velocity_scale=0.0)


def test_bad_limits():
    with pytest.raises(LimitsError, match="one value per joint"):
        JointLimits(("a", "b"), [0, 0], [1, 1], [1], [1, 1], [1, 1])
    with pytest.raises(LimitsError, match="below position_max"):
        JointLimits(("a",), [1], [0], [1], [1], [1])
    with pytest.raises(LimitsError, match="velocity_max must be positive"):
        JointLimits(("a",), [0], [1], [0], [1], [1])


def test_bad_config():
    with pytest.raises(SafetyError, match="velocity_scale"):
        SafetyConfig(velocity_scale=1.5)
    with pytest.raises(SafetyError, match="max_step_delta"):
        SafetyConfig(max_step_delta=0.0)


def inside(lim, fractions):
    return lim.position_min + np.asarray(fractions) * (lim.position_max - lim.position_min)


fractions = st.lists(st.floats(0.0, 1.0), min_size=J, max_size=J)
wild = st.floats(-10.0, 10.0) | st.just(math.nan) | st.just(math.inf)
targets = st.lists(st.lists(wild, min_size=J, max_size=J), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(fractions, targets, st.sampled_from([0.001, 0.01, 0.1]), st.floats(0.001, 0.3))
def test_any_target_sequence_respects_all_limits(start, target_seq, dt, step_delta):
    filt = SafetyFilter(SafetyConfig(max_step_delta=step_delta))
    lim = filt.limits
    q = inside(lim, start)
    v = np.zeros(J)
    for target in target_seq:
        out = filt.filter(np.array(target), q, v, dt)
        assert np.isfinite(out.position).all() and np.isfinite(out.velocity).all()
        assert out.hold == (not np.isfinite(target).all())
        step = out.position - q
        assert (out.position >= lim.position_min - 1e-9).all() and (out.position <= lim.position_max + 1e-9).all()
        assert (np.abs(step) <= step_delta + 1e-9).all()
        assert (np.abs(step / dt) <= lim.velocity_max * (1 + REL) + 1e-9).all()
        assert (np.abs(step / dt - v) <= lim.acceleration_max * dt * (1 + 1e-6) + 1e-9).all()
        np.testing.assert_allclose(out.velocity, step / dt, rtol=1e-6, atol=1e-7)
        q, v = out.position, out.velocity


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(0.3, 0.7), min_size=J, max_size=J),
    st.lists(st.floats(-1.0, 1.0), min_size=J, max_size=J),
    st.lists(st.floats(-1.0, 1.0), min_size=J, max_size=J),
    st.sampled_from([0.001, 0.004, 0.01]),
)
def test_reachable_target_passes_unchanged(start, v_frac, a_frac, dt):
    q = inside(LIM, start)
    cap = np.minimum(LIM.velocity_max, FILTER.config.max_step_delta / dt)
    v_prev = 0.9 * cap * np.asarray(v_frac)
    v_next = np.clip(v_prev + 0.9 * LIM.acceleration_max * dt * np.asarray(a_frac), -0.9 * cap, 0.9 * cap)
    assume(np.all(np.abs(v_next - v_prev) <= LIM.acceleration_max * dt))
    target = q + v_next * dt
    out = FILTER.filter(target, q, v_prev, dt)
    np.testing.assert_array_equal(out.position, target)
    assert not out.clipped and not out.hold


@pytest.mark.parametrize("dt", [0.001, 0.01, 0.1])
def test_step_target_is_reached_with_bounded_overshoot(dt):
    q0 = inside(LIM, [0.5] * J)
    goal = q0 + np.array([0.4, -0.3, 0.2, 0.1, -0.5, 1.0, 0.01])
    q, v = q0.copy(), np.zeros(J)
    history = [q]
    for _ in range(int(3.0 / dt)):
        out = FILTER.filter(goal, q, v, dt)
        q, v = out.position, out.velocity
        history.append(q)
    history = np.array(history)
    np.testing.assert_array_equal(history[-1], goal)
    beyond = (history - goal) * np.sign(goal - q0)
    assert (beyond <= 8 * LIM.acceleration_max * dt**2 * (1 + 1e-9)).all()


def test_out_of_range_target_is_clipped_to_margins_and_reported():
    q = inside(LIM, [0.5] * J)
    target = q.copy()
    target[0] = 99.0
    out = FILTER.filter(target, q, np.zeros(J), 0.001)
    assert out.active["position"][0] and out.active["lag"][0] and not out.active["lag"][1:].any()
    assert out.position[0] > q[0]
    np.testing.assert_array_equal(out.position[1:], q[1:])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_target_holds_and_decelerates(bad):
    q = inside(LIM, [0.5] * J)
    v = np.full(J, 0.3)
    target = q.copy()
    target[3] = bad
    out = FILTER.filter(target, q, v, 0.01)
    assert out.hold and "fr3_joint4" in out.reason
    assert np.isfinite(out.position).all()
    np.testing.assert_allclose(out.velocity, 0.3 - LIM.acceleration_max * 0.01)


def test_bad_state_raises():
    q = inside(LIM, [0.5] * J)
    with pytest.raises(SafetyError, match="robot state must be finite"):
        FILTER.filter(q, q + np.nan, np.zeros(J), 0.01)
    with pytest.raises(SafetyError, match="target must have shape \\(7,\\)"):
        FILTER.filter(q[:6], q, np.zeros(J), 0.01)
    with pytest.raises(SafetyError, match="dt must be positive"):
        FILTER.filter(q, q, np.zeros(J), 0.0)


def test_start_inside_margin_moves_back_smoothly():
    q = LIM.position_max + 0.02  # measured inside the margin, beyond the margined limit
    out = FILTER.filter(q + 1.0, q, np.zeros(J), 0.01)
    assert (out.position <= q).all()
    assert (np.abs(out.velocity) <= LIM.acceleration_max * 0.01 + 1e-12).all()


def test_gripper_width():
    assert FILTER.gripper_width(0.5) == 0.08
    assert FILTER.gripper_width(-1.0) == 0.0
    assert FILTER.gripper_width(0.03) == 0.03
    assert FILTER.gripper_width(math.nan) is None


@settings(max_examples=100, deadline=None)
@given(fractions, fractions, st.sampled_from([0.001, 0.01, 0.1]), st.floats(0.0, 2.0))
def test_ramp_respects_limits_and_ends_at_goal(start, goal, dt, min_duration):
    lim = LIM
    q0, q1 = inside(lim, start), inside(lim, goal)
    traj = ramp_trajectory(q0, q1, lim, dt, min_duration=min_duration)
    assert traj.shape[1] == J and len(traj) >= max(1, math.floor(min_duration / dt))
    np.testing.assert_array_equal(traj[-1], q1)
    assert all(lim.contains(row, atol=1e-12) for row in traj)
    # Finite differences from rest to rest, including the start and a held goal.
    path = np.vstack([q0, q0, traj, q1, q1])
    vel = np.diff(path, axis=0) / dt
    acc = np.diff(vel, axis=0) / dt
    assert (np.abs(vel) <= lim.velocity_max * (1 + 1e-6)).all()
    assert (np.abs(acc) <= lim.acceleration_max * (1 + 1e-6)).all()


def test_ramp_through_filter_is_untouched_and_rejects_bad_goal():
    q0 = inside(LIM, [0.2] * J)
    traj = FILTER.ramp(q0, inside(LIM, [0.8] * J), 0.01)
    assert len(traj) * 0.01 >= FILTER.config.ramp_min_duration
    q, v = q0, np.zeros(J)
    for row in traj:
        out = FILTER.filter(row, q, v, 0.01)
        np.testing.assert_array_equal(out.position, row)
        q, v = out.position, out.velocity
    with pytest.raises(SafetyError, match="outside the position limits"):
        ramp_trajectory(q0, LIM.position_max + 0.1, LIM, 0.01)
    assert FILTER.needs_ramp(q0, q0 + 0.06) and not FILTER.needs_ramp(q0, q0 + 0.04)


def test_watchdog_decisions():
    cfg = SafetyConfig(chunk_timeout=0.5, joint_state_timeout=0.1)
    dog = Watchdog(cfg)
    assert dog.decide(0.0).verdict is Verdict.STOP  # no joint states yet
    dog.joint_state_received(0.0)
    decision = dog.decide(0.05)
    assert decision.verdict is Verdict.HOLD and "first action chunk" in decision.reason
    dog.chunk_received(0.05)
    assert dog.decide(0.06).command
    assert dog.decide(0.06, command_publishers=2).verdict is Verdict.STOP
    assert "stale" in dog.decide(0.2).reason and dog.decide(0.2).verdict is Verdict.STOP
    dog.joint_state_received(0.5)
    assert dog.decide(0.5).command  # chunk 0.45 s old
    dog.joint_state_received(0.58)
    decision = dog.decide(0.6)
    assert decision.verdict is Verdict.HOLD and "no fresh action chunk" in decision.reason
    dog.chunk_received(0.61)
    assert dog.decide(0.605).command  # a callback racing the tick is still fresh
    jump = dog.decide(0.3)
    assert jump.verdict is Verdict.STOP and jump.clock_jump and "backwards" in jump.reason
    # Everything timed before the jump is forgotten: fresh messages after it allow commanding again.
    after = dog.decide(0.31)
    assert after.verdict is Verdict.STOP and not after.clock_jump and "no joint_states" in after.reason
    dog.joint_state_received(0.32)
    dog.chunk_received(0.32)
    assert dog.decide(0.33).command
