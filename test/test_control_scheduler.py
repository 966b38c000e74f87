"""Chunk scheduling: absolute action timing in every mode (hypothesis) and rejection rules."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.control.scheduler import Chunk, ChunkError, ChunkScheduler

DT = 0.1


def tagged(chunk_id: int, stamp: float, horizon: int, goal: str = "g", dt: float = DT) -> Chunk:
    """A chunk whose action i is (chunk_id, i), so every returned action names its origin."""
    actions = np.stack([np.full(horizon, chunk_id, float), np.arange(horizon, dtype=float)], axis=1)
    return Chunk(chunk_id, stamp, dt, actions, goal)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 10),  # A
    st.data(),
    st.floats(0.0, 0.99),  # tick phase within a slot
)
def test_receding_horizon_executes_exactly_k_actions_per_chunk(horizon, data, phase):
    k = data.draw(st.integers(1, horizon))
    sched = ChunkScheduler("receding_horizon", 2, execute_steps=k)
    n_chunks = 5
    executed = []
    for j in range(n_chunks):
        stamp = j * k * DT
        sched.add_chunk(tagged(j, stamp, horizon), now=stamp)
        for n in range(k):
            action = sched.next_action(stamp + (n + phase) * DT)
            executed.append(tuple(action))
    assert executed == [(j, i) for j in range(n_chunks) for i in range(k)]
    assert sched.next_action(n_chunks * k * DT + phase * DT) is None  # nothing left: hold


def test_receding_horizon_late_chunk_skips_past_slots_and_waits_for_the_switch():
    sched = ChunkScheduler("receding_horizon", 2, execute_steps=4)
    sched.add_chunk(tagged(0, 0.0, 8), now=0.0)
    assert tuple(sched.next_action(0.05)) == (0, 0)
    sched.add_chunk(tagged(1, 0.2, 8), now=0.25)  # waits: chunk 0 still has slots
    assert tuple(sched.next_action(0.35)) == (0, 3)
    assert tuple(sched.next_action(0.45)) == (1, 2)  # slots 0, 1 of chunk 1 ended during chunk 0
    assert tuple(sched.next_action(0.55)) == (1, 3)
    assert sched.next_action(0.65) is None  # chunk 1's window [0.2, 0.6) is over


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 10), st.data(), st.floats(0.0, 0.99))
def test_linear_blend_runs_to_the_chunks_next_action_also_in_the_last_executed_slot(horizon, data, phase):
    # Holding the last executed action for its whole slot would leave the arm one dt behind at
    # every receding-horizon switch; the chunk's next action is where the policy wants it next.
    k = data.draw(st.integers(1, horizon))
    sched = ChunkScheduler("receding_horizon", 2, execute_steps=k, interpolation="linear")
    sched.add_chunk(tagged(0, 0.0, horizon), now=0.0)
    target = sched.next_action((k - 1 + phase) * DT)
    blend = min(k - 1 + phase, horizon - 1)  # the chunk's last action holds (nothing after it)
    assert target == pytest.approx((0.0, blend), abs=1e-6)


def test_receding_horizon_newer_chunk_supersedes_a_waiting_one():
    sched = ChunkScheduler("receding_horizon", 2)
    sched.add_chunk(tagged(0, 0.0, 4), now=0.0)
    assert tuple(sched.next_action(0.0)) == (0, 0)
    sched.add_chunk(tagged(1, 0.1, 4), now=0.1)
    sched.add_chunk(tagged(2, 0.2, 4), now=0.2)
    assert tuple(sched.next_action(0.41)) == (2, 2)
    assert sched.counters["superseded"] == 1


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 0.3), st.floats(0.0, 0.25)), min_size=1, max_size=8),
    st.integers(2, 10),
    st.floats(0.001, 0.05),
)
def test_latency_compensation_never_returns_stale_actions(chunk_timing, horizon, tick):
    """chunk_timing: (time since the previous chunk's stamp, inference latency) per chunk."""
    sched = ChunkScheduler("latency_compensation", 2, max_chunk_age=10.0)
    events = []  # (arrival, stamp)
    stamp = 0.0
    for gap, latency in chunk_timing:
        stamp += gap + 1e-3
        events.append((stamp + latency, stamp))
    events.sort()
    stamps = {}
    first_allowed = {}
    now, e = 0.0, 0
    end = max(a for a, _ in events) + horizon * DT + 0.1
    while now < end:
        while e < len(events) and events[e][0] <= now:
            arrival, stamp = events[e]
            if sched.add_chunk(tagged(e, stamp, horizon), now=now):
                stamps[e] = stamp
                first_allowed[e] = math.ceil((now - stamp) / DT - 1e-9)  # first action not yet due
            e += 1
        action = sched.next_action(now)
        if action is not None:
            cid, i = int(action[0]), int(action[1])
            due = stamps[cid] + i * DT
            assert now - DT - 1e-9 < due <= now + 1e-9
            assert i >= first_allowed[cid]
        now += tick


def test_latency_compensation_switches_at_the_next_slot_of_a_new_chunk():
    sched = ChunkScheduler("latency_compensation", 2)
    sched.add_chunk(tagged(0, 0.0, 8), now=0.0)
    sched.add_chunk(tagged(1, 0.1, 8), now=0.25)  # its actions 0 (0.1) and 1 (0.2) are already due
    assert tuple(sched.next_action(0.26)) == (0, 2)
    assert tuple(sched.next_action(0.31)) == (1, 2)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(2, 8), st.floats(0.0, 0.99), st.floats(0.0, 0.2))
def test_ensemble_of_consistent_chunks_returns_the_trajectory(n_chunks, horizon, phase, decay):
    def trajectory(t):
        return np.array([np.sin(t), np.cos(3 * t), t])

    sched = ChunkScheduler("temporal_ensemble", 3, ensemble_decay=decay)
    for j in range(n_chunks):
        stamp = j * DT
        actions = np.stack([trajectory(stamp + i * DT) for i in range(horizon)])
        assert sched.add_chunk(Chunk(j, stamp, DT, actions, "g"), now=stamp)
    for n in range(n_chunks - 1, n_chunks + horizon - 1):
        now = (n + phase) * DT
        np.testing.assert_allclose(sched.next_action(now), trajectory(n * DT), atol=1e-12)


def test_ensemble_weights_favour_the_oldest_chunk():
    m = 0.5
    sched = ChunkScheduler("temporal_ensemble", 1, ensemble_decay=m)
    sched.add_chunk(Chunk(0, 0.0, DT, np.zeros((4, 1)), "g"), now=0.0)
    sched.add_chunk(Chunk(1, 0.1, DT, np.ones((4, 1)), "g"), now=0.1)
    value = sched.next_action(0.15)[0]
    assert value == pytest.approx(math.exp(-m) / (1 + math.exp(-m)))
    assert value < 0.5
    assert sched.next_action(0.35)[0] == pytest.approx(value)
    assert sched.next_action(0.45)[0] == 1.0  # the old chunk's window [0, 0.4) is over


@pytest.mark.parametrize("mode", ["receding_horizon", "temporal_ensemble", "latency_compensation"])
def test_reset_discards_old_chunks_and_goal(mode):
    sched = ChunkScheduler(mode, 2, instruction_id="pick")
    assert sched.add_chunk(tagged(0, 0.0, 8, goal="pick"), now=0.0)
    assert sched.next_action(0.05) is not None
    sched.reset("place", now=0.1)
    assert sched.instruction_id == "place"
    assert sched.next_action(0.15) is None
    assert not sched.add_chunk(tagged(1, 0.12, 8, goal="pick"), now=0.15)
    assert not sched.add_chunk(tagged(2, 0.05, 8, goal="place"), now=0.15)  # observed before the change
    assert sched.counters["rejected:instruction_mismatch"] == 1
    assert sched.counters["rejected:predates_reset"] == 1
    for now in np.arange(0.15, 1.0, 0.01):
        assert sched.next_action(now) is None
    assert sched.add_chunk(tagged(3, 0.2, 8, goal="place"), now=0.2)
    assert tuple(sched.next_action(0.21)) == (3, 0)


def test_rejections_are_counted():
    sched = ChunkScheduler("temporal_ensemble", 2, max_chunk_age=0.5, execute_steps=2, instruction_id="g")
    assert sched.add_chunk(tagged(0, 1.0, 4), now=1.0)
    assert not sched.add_chunk(tagged(1, 1.0, 4), now=1.0)  # same stamp: not newer
    assert not sched.add_chunk(tagged(2, 1.1, 4, goal="other"), now=1.1)
    bad = tagged(3, 1.1, 4).actions.copy()
    bad[1, 0] = np.nan
    assert not sched.add_chunk(Chunk(3, 1.1, DT, bad, "g"), now=1.1)
    assert not sched.add_chunk(tagged(4, 1.2, 4), now=1.45)  # its 2 slots [1.2, 1.4) are over
    assert not sched.add_chunk(tagged(5, 1.3, 4), now=1.81)
    assert dict(sched.counters) == {
        "accepted": 1,
        "rejected:not_newer": 1,
        "rejected:instruction_mismatch": 1,
        "rejected:non_finite": 1,
        "rejected:expired": 1,
        "rejected:too_old": 1,
    }
    with pytest.raises(ChunkError, match="action_dim 3, scheduler expects 2"):
        sched.add_chunk(Chunk(6, 2.0, DT, np.zeros((4, 3)), "g"), now=2.0)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["receding_horizon", "temporal_ensemble", "latency_compensation"]),
    st.floats(0.06, 1e6),  # how far ahead of the receiver's clock the bad chunk is stamped
    st.floats(0.0, 0.049),  # skew of a good chunk, within the tolerance
)
def test_a_chunk_from_the_future_is_rejected_and_blocks_nothing(mode, lead, skew):
    sched = ChunkScheduler(mode, 2, max_chunk_lead=0.05)
    assert not sched.add_chunk(tagged(0, 1.0 + lead, 4), now=1.0)
    assert sched.counters["rejected:from_future"] == 1
    assert sched.next_action(1.0) is None
    # The next chunk with a sane stamp is executed at once, not after the bad stamp has passed.
    assert sched.add_chunk(tagged(1, 1.0 + skew, 4), now=1.0)
    assert tuple(sched.next_action(1.0 + skew + 0.01)) == (1, 0)


@pytest.mark.parametrize("mode", ["receding_horizon", "temporal_ensemble", "latency_compensation"])
def test_a_chunk_spanning_too_long_is_rejected(mode):
    # dt sent in milliseconds: 8 actions 100 "s" apart would hold one chunk for 13 minutes.
    sched = ChunkScheduler(mode, 2, max_chunk_span=3.0)
    assert not sched.add_chunk(tagged(0, 1.0, 8, dt=100.0), now=1.0)
    assert sched.counters["rejected:too_long"] == 1
    assert sched.add_chunk(tagged(1, 1.0, 8, dt=0.375), now=1.0)  # exactly 3 s
    # Only the executed actions count: 4 of 8 at dt = 0.5 span 2 s.
    limited = ChunkScheduler(mode, 2, execute_steps=4, max_chunk_span=3.0)
    assert limited.add_chunk(tagged(0, 1.0, 8, dt=0.5), now=1.0)


def test_linear_interpolation_between_due_times():
    sched = ChunkScheduler("receding_horizon", 1, interpolation="linear")
    sched.add_chunk(Chunk(0, 0.0, DT, np.array([[0.0], [1.0], [3.0]]), "g"), now=0.0)
    assert sched.next_action(0.05)[0] == pytest.approx(0.5)
    assert sched.next_action(0.175)[0] == pytest.approx(2.5)
    assert sched.next_action(0.25)[0] == pytest.approx(3.0)  # last action is held


def test_action_offset_delays_due_times():
    sched = ChunkScheduler("receding_horizon", 2, action_offset=1.0)
    sched.add_chunk(tagged(0, 0.0, 4), now=0.0)
    assert sched.next_action(0.05) is None
    assert tuple(sched.next_action(0.15)) == (0, 0)


def test_bad_configuration_and_chunks():
    with pytest.raises(ChunkError, match="unknown scheduler mode"):
        ChunkScheduler("fifo", 2)
    with pytest.raises(ChunkError, match="execute_steps"):
        ChunkScheduler("receding_horizon", 2, execute_steps=0)
    with pytest.raises(ChunkError, match="max_chunk_span must be positive"):
        ChunkScheduler("receding_horizon", 2, max_chunk_span=0.0)
    with pytest.raises(ChunkError, match="max_chunk_lead must be >= 0"):
        ChunkScheduler("receding_horizon", 2, max_chunk_lead=math.nan)
    with pytest.raises(ChunkError, match="actions must be"):
        Chunk(0, 0.0, DT, np.zeros(4), "g")
    with pytest.raises(ChunkError, match="dt must be positive"):
        Chunk(0, 0.0, 0.0, np.zeros((4, 2)), "g")
    returned = ChunkScheduler("latency_compensation", 2)
    returned.add_chunk(tagged(0, 0.0, 4), now=0.0)
    action = returned.next_action(0.0)
    action[0] = 99.0  # callers get copies
    assert returned.next_action(0.0)[0] == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["receding_horizon", "temporal_ensemble", "latency_compensation"]),
    st.lists(st.tuples(st.floats(0.0, 0.3), st.integers(1, 8)), min_size=1, max_size=6),
    st.sampled_from(["hold", "linear"]),
)
def test_action_at_peeks_what_next_action_will_give(mode, arrivals, interpolation):
    # The executor plans ahead with action_at: without new chunks, next_action must agree.
    sched = ChunkScheduler(mode, 2, interpolation=interpolation, max_chunk_age=10.0)
    now = 0.0
    for i, (gap, horizon) in enumerate(arrivals):
        now += gap
        sched.add_chunk(tagged(i + 1, now - 0.01, horizon), now)
    times = now + 0.013 * np.arange(80)
    peeked = [sched.action_at(t) for t in times]
    for t, expected in zip(times, peeked):
        actual = sched.next_action(t)
        if expected is None:
            assert actual is None
        else:
            np.testing.assert_allclose(actual, expected)
