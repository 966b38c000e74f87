"""Pairing the two copies of a goal that arrives over a transient-local and a volatile subscription."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.language.goals import DuplicateGoalFilter

WINDOW = 2.0

# One publication: (goal text, published transient-local?, publish time, delay of each copy).
publication = st.tuples(st.sampled_from(["red", "blue", "green"]), st.booleans(),
                        st.floats(0.0, 20.0), st.floats(0.0, WINDOW * 0.99), st.floats(0.0, WINDOW * 0.99))


@settings(max_examples=300, deadline=None)
@given(st.lists(publication, max_size=12))
def test_every_publication_is_applied_exactly_once_in_any_interleaving(publications):
    arrivals = []  # (arrival time, channel, goal)
    for goal, transient_local, published, delay_volatile, delay_transient in publications:
        arrivals.append((published + delay_volatile, "volatile", goal))
        if transient_local:
            arrivals.append((published + delay_transient, "transient_local", goal))
    arrivals.sort()
    filter_ = DuplicateGoalFilter(WINDOW)
    applied = [goal for now, channel, goal in arrivals if filter_.accept(channel, goal, now)]
    assert sorted(applied) == sorted(goal for goal, *_ in publications)


def test_a_goal_from_the_publishers_history_arrives_once_and_is_applied():
    filter_ = DuplicateGoalFilter(WINDOW)
    assert filter_.accept("transient_local", "red", 0.0)
    # Later the same text is published again (volatile): past the window it is a new publication.
    assert filter_.accept("volatile", "red", WINDOW + 0.1)


def test_the_same_goal_published_twice_on_one_channel_is_applied_twice():
    filter_ = DuplicateGoalFilter(WINDOW)
    assert filter_.accept("volatile", "red", 0.0)
    assert filter_.accept("volatile", "red", 0.1)
    # Their copies on the other subscription are both paired.
    assert not filter_.accept("transient_local", "red", 0.2)
    assert not filter_.accept("transient_local", "red", 0.3)
    assert filter_.accept("transient_local", "red", 0.4)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="window"):
        DuplicateGoalFilter(0.0)
    with pytest.raises(ValueError, match="channel"):
        DuplicateGoalFilter().accept("best_effort", "red", 0.0)
