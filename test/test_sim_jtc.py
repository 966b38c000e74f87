"""Joint trajectory controller semantics: interpolation, hold, replacement and rejection."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.sim.jtc import JointTrajectoryController, TrajectoryRejected

NAMES = ("a", "b", "c")
LOWER = np.array([-1.0, -2.0, 0.5])
UPPER = np.array([1.0, 2.0, 3.0])
Q0 = np.array([0.0, 0.0, 1.0])
Q1 = np.array([0.5, -1.0, 2.0])
Q2 = np.array([-0.5, 1.0, 3.0])


def make() -> JointTrajectoryController:
    return JointTrajectoryController(NAMES, LOWER, UPPER, Q0)


def test_linear_interpolation_from_the_current_setpoint_then_hold():
    jtc = make()
    jtc.set_trajectory(NAMES, [(0.5, Q1), (1.5, Q2)], start_time=1.0, now=1.0)
    np.testing.assert_allclose(jtc.setpoint(1.0), Q0)
    np.testing.assert_allclose(jtc.setpoint(1.25), 0.5 * (Q0 + Q1))
    np.testing.assert_allclose(jtc.setpoint(1.5), Q1)
    np.testing.assert_allclose(jtc.setpoint(2.0), 0.5 * (Q1 + Q2))
    np.testing.assert_allclose(jtc.setpoint(2.25), 0.25 * Q1 + 0.75 * Q2)
    np.testing.assert_allclose(jtc.setpoint(2.5), Q2)
    np.testing.assert_allclose(jtc.setpoint(100.0), Q2)
    assert jtc.end_time == pytest.approx(2.5)


def test_a_future_start_interpolates_from_arrival_to_the_first_point():
    # trajectory.cpp: before the first point, interpolate from the point before the trajectory
    # (taken at arrival) to the first point; the start time only places the points.
    jtc = make()
    jtc.set_trajectory(NAMES, [(1.0, Q1)], start_time=2.0, now=0.5)
    np.testing.assert_allclose(jtc.setpoint(0.5), Q0)
    np.testing.assert_allclose(jtc.setpoint(1.75), 0.5 * (Q0 + Q1))
    np.testing.assert_allclose(jtc.setpoint(3.0), Q1)


def test_a_first_point_at_zero_is_reached_at_the_start_time():
    jtc = make()
    jtc.set_trajectory(NAMES, [(0.0, Q1), (1.0, Q2)], start_time=1.0, now=0.0)
    np.testing.assert_allclose(jtc.setpoint(0.5), 0.5 * (Q0 + Q1))
    np.testing.assert_allclose(jtc.setpoint(1.0), Q1)
    np.testing.assert_allclose(jtc.setpoint(1.5), 0.5 * (Q1 + Q2))
    jtc.set_trajectory(NAMES, [(0.0, Q2)], start_time=None, now=3.0)  # zero stamp: a jump
    np.testing.assert_allclose(jtc.setpoint(3.0), Q2)


def test_joint_order_is_mapped_by_name():
    jtc = make()
    jtc.set_trajectory(("c", "a", "b"), [(0.0, [Q1[2], Q1[0], Q1[1]])], start_time=0.0, now=0.0)
    np.testing.assert_allclose(jtc.setpoint(0.0), Q1)


def test_replacement_mid_motion_starts_from_the_current_setpoint():
    jtc = make()
    jtc.set_trajectory(NAMES, [(1.0, Q1)], start_time=0.0, now=0.0)
    jtc.set_trajectory(NAMES, [(1.0, Q2)], start_time=0.5, now=0.5)
    mid = 0.5 * (Q0 + Q1)
    np.testing.assert_allclose(jtc.setpoint(0.5), mid)
    np.testing.assert_allclose(jtc.setpoint(1.0), 0.5 * (mid + Q2))
    np.testing.assert_allclose(jtc.setpoint(1.5), Q2)


def test_a_late_trajectory_joins_at_arrival_and_skips_the_points_already_due():
    jtc = make()
    jtc.set_trajectory(NAMES, [(1.0, Q1), (2.0, Q2)], start_time=0.0, now=0.5)
    np.testing.assert_allclose(jtc.setpoint(0.5), Q0)
    np.testing.assert_allclose(jtc.setpoint(0.75), 0.5 * (Q0 + Q1))
    jtc.set_trajectory(NAMES, [(1.0, Q1), (2.0, Q2)], start_time=0.0, now=1.5)
    np.testing.assert_allclose(jtc.setpoint(1.5), 0.5 * (Q1 + Q2))  # a jump: the segment is under way


def test_measured_join_starts_from_the_measured_state():
    jtc = JointTrajectoryController(NAMES, LOWER, UPPER, Q0, join="measured")
    jtc.set_trajectory(NAMES, [(1.0, Q1)], start_time=0.0, now=0.0, measured=(Q0, np.zeros(3)))
    measured = Q0 + 0.1
    jtc.set_trajectory(NAMES, [(1.0, Q2)], start_time=0.5, now=0.5, measured=(measured, np.zeros(3)))
    np.testing.assert_allclose(jtc.setpoint(0.5), measured)
    np.testing.assert_allclose(jtc.setpoint(1.0), 0.5 * (measured + Q2))


def test_cubic_and_quintic_segments_match_their_boundary_conditions():
    jtc = make()
    v1, a1 = np.array([0.3, -0.2, 0.1]), np.array([1.0, 0.0, -2.0])
    jtc.set_trajectory(NAMES, [(1.0, Q1, v1), (2.0, Q2, np.zeros(3))], start_time=0.0, now=0.0)
    q, v, a = jtc.sample(1.0)
    np.testing.assert_allclose(q, Q1)
    np.testing.assert_allclose(v, v1)
    q, v, a = jtc.sample(0.0)
    np.testing.assert_allclose(v, 0.0)  # the point before carries zero velocity (at rest)
    jtc = make()
    jtc.set_trajectory(NAMES, [(1.0, Q1, v1, a1), (2.0, Q2, np.zeros(3), np.zeros(3))], start_time=0.0, now=0.0)
    q, v, a = jtc.sample(1.0)
    np.testing.assert_allclose(q, Q1)
    np.testing.assert_allclose(v, v1)
    np.testing.assert_allclose(a, a1)
    np.testing.assert_allclose(jtc.setpoint(5.0), Q2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50.0, 50.0), min_size=4, max_size=4), st.floats(0.005, 0.2), st.floats(0.0, 1.0))
def test_a_quintic_reproduces_a_constant_jerk_motion_exactly(coefficients, duration, probe):
    # The executor plans in constant-jerk pieces and sends their ends with velocities and
    # accelerations: JTC's quintic through them is the planned motion itself.
    p0, v0, a0, jerk = coefficients
    p0 = 1.0 + p0 / 100.0

    def motion(t):
        return (p0 + v0 * t + a0 * t**2 / 2 + jerk * t**3 / 6, v0 + a0 * t + jerk * t**2 / 2, a0 + jerk * t)

    names, lower, upper = ("a",), np.array([-1e6]), np.array([1e6])
    jtc = JointTrajectoryController(names, lower, upper, np.array([p0]))
    jtc.set_trajectory(names, [(0.0, *[[x] for x in motion(0.0)]), (duration, *[[x] for x in motion(duration)])],
                       start_time=0.0, now=0.0)
    for value, expected in zip(jtc.sample(probe * duration), motion(probe * duration)):
        np.testing.assert_allclose(value, [expected], rtol=1e-9, atol=1e-9)


REJECTED = {
    "unknown name": (("a", "b", "x"), [(1.0, Q1)]),
    "missing joint": (("a", "b"), [(1.0, Q1[:2])]),
    "duplicate name": (("a", "b", "b"), [(1.0, Q1)]),
    "nan position": (NAMES, [(1.0, [0.0, math.nan, 1.0])]),
    "inf position": (NAMES, [(1.0, [0.0, math.inf, 1.0])]),
    "nan time": (NAMES, [(math.nan, Q1)]),
    "negative time": (NAMES, [(-0.1, Q1)]),
    "decreasing time": (NAMES, [(1.0, Q1), (0.5, Q2)]),
    "repeated time": (NAMES, [(1.0, Q1), (1.0, Q2)]),
    "below lower limit": (NAMES, [(1.0, [0.0, 0.0, 0.4])]),
    "above upper limit": (NAMES, [(1.0, [1.01, 0.0, 1.0])]),
    "empty": (NAMES, []),
    "wrong length": (NAMES, [(1.0, [0.0, 0.0])]),
    "malformed point": (NAMES, [Q1]),
    "mixed fields": (NAMES, [(1.0, Q1, Q0), (2.0, Q2)]),
    "nan velocity": (NAMES, [(1.0, Q1, [0.0, math.nan, 0.0])]),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_rejections_keep_the_active_trajectory(case):
    jtc = make()
    jtc.set_trajectory(NAMES, [(1.0, Q1)], start_time=0.0, now=0.0)
    times = [0.0, 0.3, 0.5, 1.0, 2.0]
    before = [jtc.setpoint(t) for t in times]
    names, points = REJECTED[case]
    with pytest.raises(TrajectoryRejected):
        jtc.set_trajectory(names, points, start_time=0.5, now=0.5)
    for t, expected in zip(times, before):
        np.testing.assert_array_equal(jtc.setpoint(t), expected)


def test_rejected_start_time_and_message_names_the_joint():
    jtc = make()
    with pytest.raises(TrajectoryRejected, match="start_time"):
        jtc.set_trajectory(NAMES, [(1.0, Q1)], start_time=math.inf, now=0.0)
    with pytest.raises(TrajectoryRejected, match=r"c = 3\.5000 rad is outside"):
        jtc.set_trajectory(NAMES, [(1.0, [0.0, 0.0, 3.5])], start_time=0.0, now=0.0)


positions = st.tuples(
    st.floats(-1.0, 1.0), st.floats(-2.0, 2.0), st.floats(0.5, 3.0)
).map(np.array)


@settings(max_examples=60, deadline=None)
@given(
    points=st.lists(st.tuples(st.floats(0.01, 1.0), positions), min_size=1, max_size=5),
    start=st.floats(0.0, 5.0),
    probe=st.floats(0.0, 1.0),
)
def test_knots_are_hit_and_segments_stay_between_their_ends(points, start, probe):
    jtc = make()
    offsets = np.cumsum([gap for gap, _ in points])
    trajectory = [(float(t), p) for t, (_, p) in zip(offsets, points)]
    jtc.set_trajectory(NAMES, trajectory, start_time=start, now=start)
    knots = [(start, Q0)] + [(start + t, p) for t, p in trajectory]
    for t, p in knots:
        np.testing.assert_allclose(jtc.setpoint(t), p, atol=1e-9)
    for (t0, p0), (t1, p1) in zip(knots, knots[1:]):
        value = jtc.setpoint(t0 + probe * (t1 - t0))
        assert np.all(value >= np.minimum(p0, p1) - 1e-9) and np.all(value <= np.maximum(p0, p1) + 1e-9)
    np.testing.assert_allclose(jtc.setpoint(knots[-1][0] + 10.0), knots[-1][1])
