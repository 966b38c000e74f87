"""Gripper core: the open/close hysteresis, franka_gripper's grasp rule and the grasp window, and
the test bed's franka_gripper action semantics (hypothesis over a kinematic hand, then the MuJoCo hand)."""

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mail_ros.control.gripper import DEFAULT_GRASP_WINDOW, GraspWindow, GripperCommand, GripperHysteresis, grasp_holds
from mail_ros.sim.gripper import (MOVE_TOLERANCE, SETTLE_TIME, TIMEOUT_MARGIN, GoalKind, GripperActions, GripperGoal,
                                  homing_goal)
from mail_ros.sim.tasks import CUBE_SIZE
from mail_ros.spec import FR3_GRIPPER_MAX_WIDTH

widths = st.floats(0.0, FR3_GRIPPER_MAX_WIDTH)
epsilons = st.floats(0.0, FR3_GRIPPER_MAX_WIDTH)
DT = 0.01


# --- hysteresis -------------------------------------------------------------------------------
def test_hysteresis_commands_only_crossings():
    h = GripperHysteresis(0.03, 0.05)
    assert [h.update(w) for w in (0.08, 0.07, 0.04, 0.02, 0.04, 0.01, 0.06, math.nan)] == [
        GripperCommand.OPEN, None, None, GripperCommand.CLOSE, None, None, GripperCommand.OPEN, None]
    h.reset()
    assert h.update(0.06) is GripperCommand.OPEN


# --- the grasp rule and window ----------------------------------------------------------------
@settings(deadline=None)  # a loaded machine must not fail a pure function on time
@given(goal=widths, inner=epsilons, outer=epsilons, width=widths)
def test_grasp_holds_iff_inside_the_epsilon_window(goal, inner, outer, width):
    assert grasp_holds(goal, inner, outer, width) == (goal - inner <= width <= goal + outer)
    # Widening either epsilon never turns a success into a failure.
    if grasp_holds(goal, inner, outer, width):
        assert grasp_holds(goal, inner + 0.01, outer + 0.01, width)


@settings(deadline=None)
@given(low=st.floats(1e-3, 0.07), span=st.floats(1e-3, 0.07), width=widths)
def test_grasp_window_goal_covers_exactly_its_range(low, span, width):
    assume(low + span < FR3_GRIPPER_MAX_WIDTH)
    window = GraspWindow(low, low + span)
    assert window.goal_width - window.epsilon == pytest.approx(low)
    assert window.goal_width + window.epsilon == pytest.approx(low + span)
    if not (math.isclose(width, low, abs_tol=1e-12) or math.isclose(width, low + span, abs_tol=1e-12)):
        assert window.holds(width) == (low < width < low + span)


@pytest.mark.parametrize("low, high", [(0.0, 0.05), (0.05, 0.04), (0.03, 0.08), (math.nan, 0.05), (-0.01, 0.02)])
def test_grasp_window_refuses_meaningless_ranges(low, high):
    with pytest.raises(ValueError, match="grasp window"):
        GraspWindow(low, high)


def test_default_window_holds_the_test_bed_cube_and_not_an_empty_hand():
    assert DEFAULT_GRASP_WINDOW.holds(CUBE_SIZE) and DEFAULT_GRASP_WINDOW.holds(CUBE_SIZE - 0.001)
    assert not DEFAULT_GRASP_WINDOW.holds(0.001) and not DEFAULT_GRASP_WINDOW.holds(FR3_GRIPPER_MAX_WIDTH)


# --- action semantics over a kinematic hand ---------------------------------------------------
class KinematicHand:
    """A test hand: the width follows the command at its speed and stops at an object (if any)."""

    def __init__(self, width=FR3_GRIPPER_MAX_WIDTH, obstacle=0.0):
        self.width, self.obstacle = width, obstacle
        self.target, self.speed = width, 0.1

    def set_gripper(self, width, speed):
        if not (0.0 <= width <= FR3_GRIPPER_MAX_WIDTH and 0.0 < speed <= 0.2):
            raise ValueError(f"out of range: width {width}, speed {speed}")
        self.target, self.speed = width, speed

    def grasp(self, force, speed):
        if not 0.0 < force <= 70.0:
            raise ValueError(f"force {force}")
        self.set_gripper(0.0, speed)

    def stop_gripper(self):
        self.target = self.width

    def gripper_width(self):
        return self.width

    def gripper_command_done(self):
        return self.width == max(self.target, self.obstacle) or self.width == self.obstacle

    def step(self, dt):
        goal = max(self.target, self.obstacle) if self.width >= self.obstacle else self.target
        self.width += max(-self.speed * dt, min(self.speed * dt, goal - self.width))


def run_to_end(actions, hand, run, now=0.0, limit=20.0):
    while not run.finished.is_set():
        assert now < limit, "goal never ended"
        hand.step(DT)
        now += DT
        actions.update(now)
    return run.outcome, now


@settings(max_examples=60, deadline=None)
@given(obstacle=st.sampled_from([0.0, 0.02, 0.045, 0.06]), goal=st.floats(0.0, 0.08),
       inner=st.floats(0.0, 0.03), outer=st.floats(0.0, 0.03))
def test_grasp_succeeds_iff_the_fingers_stop_inside_the_window(obstacle, goal, inner, outer):
    hand = KinematicHand(obstacle=obstacle)
    actions = GripperActions(hand)
    run = actions.start(GripperGoal(GoalKind.GRASP, goal, 0.1, 40.0, inner, outer), 0.0)
    outcome, end = run_to_end(actions, hand, run)
    assert outcome.width == pytest.approx(obstacle, abs=1e-9)
    assert outcome.success == grasp_holds(goal, inner, outer, outcome.width) and outcome.error == ""
    assert end >= (FR3_GRIPPER_MAX_WIDTH - obstacle) / 0.1 and actions.running is None


@settings(max_examples=40, deadline=None)
@given(start=widths, goal=widths, speed=st.floats(0.02, 0.2), obstacle=st.sampled_from([0.0, 0.045]))
def test_move_succeeds_iff_it_reaches_the_goal_width(start, goal, speed, obstacle):
    assume(start >= obstacle)
    hand = KinematicHand(width=start, obstacle=obstacle)
    actions = GripperActions(hand)
    outcome, end = run_to_end(actions, hand, actions.start(GripperGoal(GoalKind.MOVE, goal, speed), 0.0))
    assert outcome.success == (abs(outcome.width - goal) <= MOVE_TOLERANCE)
    assert outcome.success == (goal >= obstacle - MOVE_TOLERANCE)
    assert end <= abs(goal - start) / speed + SETTLE_TIME + 2 * DT


def test_homing_opens_the_hand():
    hand = KinematicHand(width=0.01)
    actions = GripperActions(hand)
    outcome, _ = run_to_end(actions, hand, actions.start(homing_goal(), 0.0))
    assert outcome.success and outcome.width == pytest.approx(FR3_GRIPPER_MAX_WIDTH)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from([GoalKind.MOVE, GoalKind.GRASP, GoalKind.HOMING]), after=st.floats(0.0, 0.3))
def test_a_running_goal_cannot_be_preempted_only_stopped(kind, after):
    hand = KinematicHand()
    actions = GripperActions(hand)
    first = actions.start(GripperGoal(GoalKind.GRASP, 0.045, 0.1, 40.0, 0.01, 0.01), 0.0)
    now = 0.0
    while now < after:
        hand.step(DT)
        now += DT
        actions.update(now)
    second = actions.start(GripperGoal(kind, 0.08, 0.1, 40.0), now)
    assert second.finished.is_set() and not second.outcome.success and "stop" in second.outcome.error
    assert actions.running is first and not first.finished.is_set()  # the first goal goes on
    stopped = actions.stop()
    assert stopped is first and not first.outcome.success and first.outcome.error == ""
    width = hand.width
    for _ in range(20):
        hand.step(DT)
    assert hand.width == width  # stop halts the fingers where they are
    third = actions.start(GripperGoal(GoalKind.MOVE, 0.08, 0.1), now)
    assert run_to_end(actions, hand, third, now)[0].success


def test_cancel_ends_the_goal_canceled_and_stop_when_idle_is_harmless():
    hand = KinematicHand()
    actions = GripperActions(hand)
    assert actions.stop() is None
    run = actions.start(GripperGoal(GoalKind.MOVE, 0.0, 0.1), 0.0)
    assert actions.stop(canceled=True) is run and run.outcome.canceled and not run.outcome.success


@pytest.mark.parametrize("goal, match", [
    (GripperGoal(GoalKind.MOVE, 0.09, 0.1), "out of range"),
    (GripperGoal(GoalKind.MOVE, 0.04, 0.0), "out of range"),
    (GripperGoal(GoalKind.GRASP, 0.04, 0.1, 0.0), "force"),
    (GripperGoal(GoalKind.GRASP, 0.04, 0.1, 40.0, -0.01, 0.01), "negative epsilon"),
    (GripperGoal(GoalKind.GRASP, 0.1, 0.1, 40.0, 0.01, 0.01), "grasp width"),
    (GripperGoal(GoalKind.MOVE, math.nan, 0.1), "non-finite"),
])
def test_goals_the_hand_cannot_take_fail_at_once_and_leave_it_idle(goal, match):
    hand = KinematicHand()
    actions = GripperActions(hand)
    run = actions.start(goal, 0.0)
    assert run.finished.is_set() and not run.outcome.success and match in run.outcome.error
    assert actions.running is None and hand.target == FR3_GRIPPER_MAX_WIDTH


def test_a_hand_that_never_settles_times_out():
    class Stuck(KinematicHand):
        def gripper_command_done(self):
            return False

    hand = Stuck()
    actions = GripperActions(hand)
    outcome, end = run_to_end(actions, hand, actions.start(GripperGoal(GoalKind.MOVE, 0.0, 0.1), 0.0))
    assert not outcome.success and "did not settle" in outcome.error
    assert end == pytest.approx(0.08 / 0.1 + TIMEOUT_MARGIN, abs=2 * DT)


# --- the MuJoCo hand --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim():
    from mail_ros.sim.franka_sim import FrankaSim, SimConfig

    sim = FrankaSim(SimConfig(cameras=()))
    yield sim
    sim.close()


def sim_run(sim, actions, goal):
    run = actions.start(goal, sim.time)
    while not run.finished.is_set():
        assert sim.time < 10.0
        sim.step(DT)
        actions.update(sim.time)
    return run.outcome


def test_simulated_hand_grasping_nothing_fails_and_a_move_and_homing_succeed(sim):
    sim.reset(0)
    actions = GripperActions(sim)
    window = DEFAULT_GRASP_WINDOW
    empty = sim_run(sim, actions, GripperGoal(GoalKind.GRASP, window.goal_width, 0.1, 40.0, window.epsilon, window.epsilon))
    assert not empty.success and empty.width < 0.005
    assert sim_run(sim, actions, GripperGoal(GoalKind.MOVE, 0.03, 0.1)).success
    assert sim_run(sim, actions, homing_goal()).success and sim.gripper_width() > 0.075
