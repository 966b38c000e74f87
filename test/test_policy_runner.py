"""PolicyRunner: policy_node's rules between an observation or a goal and a chunk, on an explicit clock."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.policy.mail_policy import MaILPolicy
from mail_ros.policy.presets import get_preset
from mail_ros.policy.runner import Goal, PolicyRunner, RunnerSettings
from mail_ros.spec import Observation
from mail_ros.sync.stamps import seconds_to_ns

torch.set_num_threads(1)
MS = 1_000_000  # ns
EPOCH = 1_700_000_000 * 1_000_000_000  # stamps at a realistic epoch, where float seconds would round


@pytest.fixture(scope="module")
def policies():
    torch.manual_seed(0)
    plain = MaILPolicy(get_preset("tiny-d_ma-bc")).eval()
    torch.manual_seed(0)
    language = MaILPolicy(get_preset("tiny-d_ma-bc", {"language.encoder": "clip-test", "language.dim": 8})).eval()
    return plain, language


def observation(policy, stamp: int, value: float = 0.0) -> Observation:
    H, W = policy.image_size
    images = {c: np.full((H, W, 3), int(value * 100) % 256, np.uint8) for c in policy.cameras}
    return Observation(stamp, images, np.full(policy.joint_dim, value))


def goal(text="pick", vector=None, encoder="clip-test", stamp=EPOCH):
    return Goal(text, np.linspace(-1, 1, 8) if vector is None else vector, encoder, stamp)


def test_goals_for_a_language_policy_must_come_from_its_encoder(policies):
    runner = PolicyRunner(policies[1])
    assert runner.set_goal(goal()) is None and runner.goal.text == "pick"
    for bad, reason in [(goal(encoder="minilm"), "encoder 'minilm', checkpoint expects 'clip-test'"),
                        (goal(vector=np.zeros(4)), "dimension 4, checkpoint expects 8"),
                        (goal(vector=np.full(8, np.nan)), "non-finite values"),
                        (Goal("pick"), "no instruction embedding")]:
        assert runner.set_goal(goal()) is None
        assert runner.set_goal(bad) == reason
        assert runner.goal is None  # a refused goal drops the old one too
    # A policy without language takes any goal: it only starts an episode.
    plain = PolicyRunner(policies[0])
    assert plain.set_goal(Goal("anything", None, None)) is None and plain.goal.vector.shape == (0,)


def test_observations_are_refused_by_the_stamp_gate_and_the_age_limit(policies):
    policy = policies[0]
    runner = PolicyRunner(policy, RunnerSettings(max_observation_age=0.3, max_observation_lead=0.05))
    now = EPOCH
    assert runner.observe(observation(policy, now + 50 * MS), now).kind == "accepted"  # at the lead limit
    ahead = runner.observe(observation(policy, now + 50 * MS + 1), now)
    assert ahead.refused and ahead.kind == "future" and "max_observation_lead 50 ms" in ahead.message
    assert runner.observe(observation(policy, 0), now).kind == "unstamped"
    stale = runner.observe(observation(policy, now - 300 * MS - 1), now)
    assert stale.kind == "stale" and "max_observation_age 300 ms" in stale.message
    assert runner.observe(observation(policy, now - 300 * MS), now).kind == "backwards"  # at the age limit


def test_history_rules_in_exact_nanoseconds(policies):
    policy = policies[0]
    runner = PolicyRunner(policy, RunnerSettings(max_gap_periods=3.0))
    period = seconds_to_ns(policy.config.spec.observation.period)
    t = EPOCH
    kinds = [runner.observe(observation(policy, s), s).kind for s in (t, t + period, t + period, t + 4 * period,
                                                                      t + 7 * period + 1, t)]
    assert kinds == ["accepted", "accepted", "duplicate", "accepted", "restart", "backwards"]


def test_no_chunk_without_a_goal_and_one_per_new_observation(policies):
    policy = policies[0]
    runner = PolicyRunner(policy)
    runner.observe(observation(policy, EPOCH), EPOCH)
    assert not runner.ready  # no goal yet
    runner.set_goal(Goal("pick"))
    assert not runner.ready  # the goal cleared the history: wait for a new observation
    runner.observe(observation(policy, EPOCH + 100 * MS), EPOCH + 100 * MS)
    request = runner.take()
    assert not runner.ready and [o.stamp for o in request.history] == [EPOCH + 100 * MS] and request.reset
    chunk, why = runner.finish(request, runner.predict(request))
    assert why == "" and chunk.chunk_id == 1 and chunk.stamp == EPOCH + 100 * MS
    assert chunk.actions.dtype == np.float32 and chunk.goal is runner.goal
    with pytest.raises(RuntimeError, match="no chunk is due"):
        runner.take()


def test_chunk_checks_refuse_non_finite_and_stale_goal_chunks(policies):
    policy = policies[0]
    runner = PolicyRunner(policy)
    runner.set_goal(Goal("pick"))
    runner.observe(observation(policy, EPOCH), EPOCH)
    request = runner.take()
    actions = runner.predict(request)
    # Finite in float64, but beyond float32: inf as published.
    assert runner.finish(request, np.full_like(actions, 1e39)) == (None, "non_finite")
    runner.set_goal(Goal("place"))  # the goal changed during inference
    assert runner.finish(request, actions) == (None, "goal_changed")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("goal"), st.sampled_from(["pick", "place"])),
                          st.tuples(st.just("obs"), st.integers(-20, 400)),  # ms after the previous stamp
                          st.just(("chunk", 0))), min_size=1, max_size=25))
def test_every_chunk_is_what_a_fresh_episode_predicts_from_its_own_goals_observations(policies, events):
    # Whatever the order of goals, observations and chunk requests: a chunk uses only observations
    # received after its goal, newest last, and equals a freshly reset policy's prediction on that
    # history (the reset at every goal and the seed are applied before the goal's first chunk).
    policy = policies[0]
    runner = PolicyRunner(policy, RunnerSettings(seed=3))
    reference = MaILPolicy(policy.config).eval()
    reference.load_state_dict(policy.state_dict())
    stamp, since_goal, first_of_goal = EPOCH, [], True
    for kind, value in events:
        if kind == "goal":
            runner.set_goal(Goal(value))
            since_goal, first_of_goal = [], True
        elif kind == "obs":
            stamp += value * MS
            if runner.observe(observation(policy, stamp, value / 400), stamp).used:
                since_goal.append(stamp)
        elif runner.ready:
            request = runner.take()
            assert [o.stamp for o in request.history][-1] == since_goal[-1]
            assert set(o.stamp for o in request.history) <= set(since_goal)
            assert request.reset == first_of_goal
            chunk, why = runner.finish(request, runner.predict(request))
            if first_of_goal:
                reference.reset(seed=3)
                expected = reference.predict_chunk(request.history, request.goal.vector)
                np.testing.assert_array_equal(chunk.actions, expected.astype(np.float32))
            first_of_goal = False
            assert why == "" and chunk.stamp == since_goal[-1]


def test_the_node_and_the_replay_declare_the_runner_defaults():
    from mail_ros.eval.replay import ReplayConfig

    defaults, replay = RunnerSettings(), ReplayConfig()
    assert replay.runner_settings == defaults
    with pytest.raises(ValueError, match="max_observation_age"):
        RunnerSettings(max_observation_age=0.0)
    with pytest.raises(ValueError, match="max stamp lead"):
        RunnerSettings(max_observation_lead=-1.0)
