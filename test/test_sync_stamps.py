"""Time in the core: exact nanosecond stamps, one conversion, one gate for stamps ahead of the clock."""

import math

import pytest
from builtin_interfaces.msg import Time
from hypothesis import given
from hypothesis import strategies as st

from mail_ros.nodes.common import ns_to_time, seconds_to_stamp, stamp_ns, stamp_to_seconds
from mail_ros.sync.stamps import (DEFAULT_MAX_STAMP_LEAD, NS_PER_SECOND, StampError, StampGate, ns_to_seconds,
                                  ns_to_stamp, seconds_to_ns, stamp_to_ns)


@given(st.integers(-(2**31), 2**32 - 1), st.integers(0, NS_PER_SECOND - 1))
def test_stamps_round_trip_exactly_through_nanoseconds(sec, nanosec):
    assert ns_to_stamp(stamp_to_ns(sec, nanosec)) == (sec, nanosec)


@given(st.integers(1, 2**31 - 1), st.integers(0, NS_PER_SECOND - 1), st.integers(1, 10**6))
def test_nanoseconds_order_stamps_exactly_where_float_seconds_cannot(sec, nanosec, delta):
    # Float seconds since the epoch resolve ~0.24 us at 1.7e9 s; integer nanoseconds never tie
    # two different instants nor split one.
    a = stamp_to_ns(sec, nanosec)
    b = a + delta
    assert a < b and ns_to_stamp(b) != ns_to_stamp(a)
    assert stamp_to_ns(*ns_to_stamp(a)) == a


def test_seconds_conversions_round_once():
    assert ns_to_seconds(1_700_000_000_123_456_789) == 1_700_000_000_123_456_789 / NS_PER_SECOND
    assert seconds_to_ns(0.1) == 100_000_000
    assert seconds_to_ns(-0.05) == -50_000_000
    assert seconds_to_ns(ns_to_seconds(123_456_789)) == 123_456_789


@pytest.mark.parametrize("bad", [(1, -1), (1, NS_PER_SECOND), (1.5, 0), (1, 2.0)])
def test_invalid_stamp_fields_are_refused(bad):
    with pytest.raises(StampError):
        stamp_to_ns(*bad)


def test_non_finite_seconds_and_fractional_nanoseconds_are_refused():
    with pytest.raises(StampError, match="non-finite"):
        seconds_to_ns(math.nan)
    with pytest.raises(StampError, match="integer"):
        ns_to_stamp(1.5)


@given(st.integers(1, 2**62), st.integers(-(10**10), 10**10), st.floats(0, 1))
def test_gate_refuses_exactly_what_leads_the_clock_by_more_than_the_limit(now, lead, max_lead):
    gate = StampGate(max_lead)
    stamp = now + lead
    expected = "unstamped" if stamp <= 0 else "future" if lead > seconds_to_ns(max_lead) else None
    assert gate.check(stamp, now) == expected


def test_gate_boundary_is_inclusive_and_the_default_is_shared():
    gate = StampGate()
    assert gate.max_lead == DEFAULT_MAX_STAMP_LEAD
    now = stamp_to_ns(1_700_000_000, 0)
    assert gate.check(now + gate.max_lead_ns, now) is None  # exactly at the limit: accepted
    assert gate.check(now + gate.max_lead_ns + 1, now) == "future"
    assert gate.check(0, now) == "unstamped"
    # Simulated time before the first /clock: nothing can be judged yet, and the log says so.
    assert gate.check(now, 0) == "no_clock"
    assert "/clock" in gate.explain("no_clock", now, 0)
    assert "ahead of the receiver's clock" in gate.explain("future", now + 10**8, now, "max_stamp_lead")
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(StampError):
            StampGate(bad)


@given(st.integers(0, 2**31 - 1), st.integers(0, NS_PER_SECOND - 1))
def test_the_nodes_convert_stamps_as_the_core_does(sec, nanosec):
    # The nodes' helpers are the core's conversion behind a ROS message type, not a second formula
    # (n * 1e-9 and n / 1e9 disagree in the last bit for some stamps).
    stamp = Time(sec=sec, nanosec=nanosec)
    assert stamp_ns(stamp) == stamp_to_ns(sec, nanosec)
    assert stamp_to_seconds(stamp) == ns_to_seconds(stamp_to_ns(sec, nanosec))
    assert ns_to_time(stamp_ns(stamp)) == stamp
    back = seconds_to_stamp(stamp_to_seconds(stamp))
    assert abs(stamp_to_ns(back.sec, back.nanosec) - stamp_to_ns(sec, nanosec)) <= 256  # float seconds: ~0.24 us
