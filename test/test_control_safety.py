"""Safety layer: FR3 limits, the target filter (hypothesis), ramps and the watchdog."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mail_ros.control.limits import JointLimits, LimitsError, fr3_limits
from mail_ros.control.safety import SafetyConfig, SafetyError, SafetyFilter, Verdict, Watchdog, min_jerk, ramp_duration

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


def test_gripper_width():
    assert FILTER.gripper_width(0.2) == 0.08 and FILTER.gripper_width(-1.0) == 0.0
    assert FILTER.gripper_width(0.03) == 0.03 and FILTER.gripper_width(math.nan) is None


@settings(max_examples=100, deadline=None)
@given(fractions, fractions, st.just(0.0) | st.floats(0.01, 2.0))
def test_min_jerk_ramp_respects_limits_and_ends_at_rest_on_the_goal(start, goal, min_duration):
    lim = LIM
    q0, q1 = inside(lim, start), inside(lim, goal)
    duration = ramp_duration(q0, q1, lim, min_duration=min_duration)
    assert duration >= min_duration
    dt = 0.001
    times = np.arange(0, duration + dt, dt)
    p, v, a = min_jerk(q0, q1, duration, times)
    np.testing.assert_allclose(p[-1], q1)
    np.testing.assert_allclose(v[[0, -1]], 0.0, atol=1e-12)
    assert all(lim.contains(row, atol=1e-12) for row in p)
    assert (np.abs(v) <= lim.velocity_max * (1 + 1e-6)).all()
    assert (np.abs(a) <= lim.acceleration_max * (1 + 1e-6)).all()
    jerk = np.diff(a, axis=0) / dt
    assert (np.abs(jerk) <= lim.jerk_max * (1 + 1e-3)).all()


def test_needs_ramp():
    q0 = inside(LIM, [0.2] * J)
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
