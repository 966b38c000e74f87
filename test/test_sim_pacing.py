"""The simulator's pacing (mail_ros.sim.pacing) on an explicit wall clock: a maximum rate, no bursts."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.sim.pacing import Pacer

STEP = 0.002  # s of simulated time per physics step, as franka_sim_node's default


def run(pacer: Pacer, compute: list[float]) -> list[tuple[float, float]]:
    """The simulator's loop: a step, ``compute[i]`` wall seconds of work, then the pacer's sleep.
    Returns (simulated, wall) time after every sleep."""
    sim = wall = 0.0
    points = [(sim, wall)]
    for work in compute:
        sim += STEP
        wall += work
        wall += pacer.delay(sim, wall)
        points.append((sim, wall))
    return points


# Wall seconds of work per step: mostly fast, sometimes a stall of up to half a second (a
# starved process), as on a loaded 2-core machine.
work = st.one_of(st.floats(0.0, 0.004), st.floats(0.004, 0.5))
factors = st.sampled_from([0.5, 1.0, 1.5, 3.0])


@settings(max_examples=200, deadline=None)
@given(factor=factors, max_debt=st.sampled_from([0.0, 0.02, 0.1]), compute=st.lists(work, min_size=1, max_size=300))
def test_simulated_time_never_runs_faster_than_the_factor_over_any_window(factor, max_debt, compute):
    points = run(Pacer(factor, max_debt, 0.0, 0.0), compute)
    for i, (sim_i, wall_i) in enumerate(points):
        for sim_j, wall_j in points[i + 1:]:
            # Within one schedule the simulation is at most max_debt behind and never ahead, so
            # over any window it advances at most factor * (wall + max_debt): a stall is never
            # made up in a burst.
            assert sim_j - sim_i <= factor * (wall_j - wall_i + max_debt) + 1e-9


@settings(max_examples=100, deadline=None)
@given(factor=factors, compute=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=200))
def test_a_computer_that_keeps_up_runs_exactly_at_the_factor(factor, compute):
    # Work within a step's budget: the simulation is never behind, so it sleeps to the schedule.
    points = run(Pacer(factor, 0.02, 0.0, 0.0), [fraction * STEP / factor for fraction in compute])
    for sim, wall in points:
        assert wall == pytest.approx(sim / factor, abs=1e-9)


def test_a_stall_is_made_up_only_without_a_debt_limit():
    # 0.3 s of stall in step 1, then a fast computer: on the wall clock (no debt limit) the
    # simulation catches up to real time; owning time (20 ms limit), it carries on from the stall.
    compute = [0.3] + [0.0] * 400
    caught_up = run(Pacer(1.0, math.inf, 0.0, 0.0), compute)
    slowed = run(Pacer(1.0, 0.02, 0.0, 0.0), compute)
    sim, wall = caught_up[-1]
    assert wall == pytest.approx(sim, abs=1e-9)  # back on schedule: 0.802 s simulated in 0.802 s
    sim, wall = slowed[-1]
    assert wall == pytest.approx(0.3 + (sim - STEP), abs=1e-9)  # the stall is lost, not raced through
    bursts = sum(1 for a, b in zip(caught_up[1:], caught_up[2:]) if b[1] == a[1])
    assert bursts > 100  # catching up: ~150 steps in no wall time at all
    assert all(b[1] - a[1] == pytest.approx(STEP) for a, b in zip(slowed[1:], slowed[2:]))

def test_factor_zero_is_unpaced_and_bad_settings_are_refused():
    assert all(Pacer(0.0, 0.02, 0.0, 0.0).delay(t, 0.0) == 0.0 for t in (0.0, 1.0, 100.0))
    with pytest.raises(ValueError):
        Pacer(-1.0, 0.02, 0.0, 0.0)
    with pytest.raises(ValueError):
        Pacer(1.0, -0.02, 0.0, 0.0)
