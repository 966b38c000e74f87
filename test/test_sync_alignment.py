"""Approximate-time alignment: exact hand-built cases and randomised camera timing (hypothesis)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.sync.alignment import (
    AlignedSet,
    AlignerConfig,
    StreamAligner,
    SyncError,
)
from mail_ros.sync.stamps import seconds_to_ns as ns

STREAMS = ("agentview", "wrist", "joint_states")


def stamps_of(sets: list[AlignedSet]) -> list[int]:
    return [s.stamp for s in sets]


def assert_accounted(aligner: StreamAligner) -> None:
    for name, s in aligner.stats.streams.items():
        assert s.received == s.used + sum(s.dropped.values()), (name, s)


def test_hand_built_case_with_dropped_frame():
    cfg = AlignerConfig(("cam", "js"), max_skew=0.02)
    aligner = StreamAligner(cfg)
    # js at 0.00, 0.05, 0.10, 0.20 (0.15 lost); cam at 0.01, 0.09, 0.15, 0.21.
    for name, stamp in [
        ("js", 0.00), ("cam", 0.01), ("js", 0.05), ("cam", 0.09), ("js", 0.10),
        ("cam", 0.15), ("js", 0.20), ("cam", 0.21),
    ]:
        aligner.push(name, ns(stamp), f"{name}@{stamp}")
    sets = aligner.flush()
    assert [(s.stamp, {k: v[1] for k, v in s.members.items()}) for s in sets] == [
        (ns(0.01), {"cam": "cam@0.01", "js": "js@0.0"}),
        (ns(0.09), {"cam": "cam@0.09", "js": "js@0.1"}),
        (ns(0.21), {"cam": "cam@0.21", "js": "js@0.2"}),
    ]
    assert sets[1].skew["js"] == pytest.approx(0.01)
    cam, js = aligner.stats["cam"], aligner.stats["js"]
    assert (cam.received, cam.used, dict(cam.dropped)) == (4, 3, {"no_match:js": 1})
    assert (js.received, js.used, dict(js.dropped)) == (4, 3, {"unused": 1})


def test_choice_is_final_once_a_newer_message_exists():
    aligner = StreamAligner(AlignerConfig(("cam", "js"), max_skew=0.05))
    aligner.push("cam", ns(1.0), "c")
    aligner.push("js", ns(0.97), "a")
    assert aligner.poll(ns(1.0)) == []  # 0.97 might still be beaten by a message in (0.97, 1.03)
    aligner.push("js", ns(1.02), "b")
    (out,) = aligner.poll(ns(1.0))
    assert out.members["js"] == (ns(1.02), "b")


def test_timeout_decides_with_what_arrived():
    cfg = AlignerConfig(("cam", "js"), max_skew=0.02, latency_allowance=0.05)
    aligner = StreamAligner(cfg)
    aligner.push("cam", ns(1.0), "c")
    aligner.push("js", ns(0.99), "j")
    assert aligner.poll(ns(1.069)) == []
    (out,) = aligner.poll(ns(1.071))
    assert out.members["js"] == (ns(0.99), "j")
    aligner.push("cam", ns(2.0), "c2")
    assert aligner.poll(ns(2.1)) == []
    assert aligner.stats["cam"].dropped["no_match:js"] == 1


def test_late_reference_and_late_partner():
    aligner = StreamAligner(AlignerConfig(("cam", "js"), max_skew=0.02))
    aligner.push("js", ns(1.0), None)
    aligner.push("cam", ns(1.0), None)
    assert len(aligner.poll(ns(1.0))) == 1
    aligner.push("cam", ns(0.5), None)  # older than the last decided frame
    aligner.push("js", ns(0.9), None)  # can never be within max_skew of a future frame
    aligner.push("js", ns(0.995), None)  # 1.0 is closer to every future frame
    aligner.flush()
    assert aligner.stats["cam"].dropped["late"] == 1
    assert aligner.stats["js"].dropped["late"] == 2
    assert_accounted(aligner)


def test_out_of_order_stamps_within_a_stream_are_sorted():
    aligner = StreamAligner(AlignerConfig(("cam", "js"), max_skew=0.03))
    aligner.push("js", ns(1.05), "far")
    aligner.push("js", ns(1.01), "near")  # arrives after a newer one but is still usable
    aligner.push("cam", ns(1.0), "c")
    (out,) = aligner.flush()
    assert out.members["js"] == (ns(1.01), "near")


def test_decimation_keeps_the_grid_with_a_30hz_camera():
    cfg = AlignerConfig(("cam", "js"), max_skew=0.02, period=0.1)
    aligner = StreamAligner(cfg)
    for i in range(301):  # 10 s of a 30 Hz camera, joint states at 100 Hz
        aligner.push("cam", ns(i / 30), i)
    for i in range(1001):
        aligner.push("js", ns(i / 100), i)
    sets = aligner.flush()
    assert len(sets) == 101  # exactly 10 Hz over 10 s
    gaps = [b - a for a, b in zip(stamps_of(sets), stamps_of(sets)[1:])]
    assert min(gaps) >= ns(0.1) - ns(1 / 30) - 1
    assert aligner.stats["cam"].dropped["decimated"] == 200
    assert_accounted(aligner)


def test_bad_input_raises():
    aligner = StreamAligner(AlignerConfig(("cam", "js"), max_skew=0.02))
    with pytest.raises(SyncError, match="unknown stream 'depth'"):
        aligner.push("depth", ns(1.0), None)
    for bad in (math.nan, 1.0, True):
        with pytest.raises(SyncError, match="stamp on stream 'js' must be integer nanoseconds"):
            aligner.push("js", bad, None)
    with pytest.raises(SyncError, match="receiver time must be integer nanoseconds"):
        aligner.poll(math.inf)
    with pytest.raises(SyncError, match="unique"):
        AlignerConfig(("cam", "cam"), max_skew=0.02)
    with pytest.raises(SyncError, match="buffer_seconds"):
        AlignerConfig(("cam", "js"), max_skew=1.0, buffer_seconds=1.0)
    with pytest.raises(SyncError, match="decimation_tolerance"):
        AlignerConfig(("cam",), max_skew=0.0, period=0.1, decimation_tolerance=0.2)


def test_reset_counts_buffered_messages_and_restarts():
    aligner = StreamAligner(AlignerConfig(("cam", "js"), max_skew=0.02))
    aligner.push("cam", ns(5.0), None)
    aligner.push("js", ns(4.0), None)
    aligner.reset()
    aligner.push("cam", ns(1.0), None)  # older than before the reset, but accepted
    aligner.push("js", ns(1.0), None)
    assert len(aligner.flush()) == 1
    assert aligner.stats["cam"].dropped["reset"] == aligner.stats["js"].dropped["reset"] == 1
    assert_accounted(aligner)


def test_stats_to_dict_is_json_ready():
    import json

    aligner = StreamAligner(AlignerConfig(("cam", "js"), max_skew=0.02))
    for i in range(10):
        aligner.push("cam", ns(i * 0.1), None)
        aligner.push("js", ns(i * 0.1 + 0.005), None)
    aligner.flush()
    summary = json.loads(json.dumps(aligner.stats.to_dict()))
    assert summary["emitted"] == 10
    assert summary["streams"]["js"]["skew_ms"]["p50"] == pytest.approx(5.0)
    assert summary["streams"]["js"]["skew_ms"]["mean_signed"] == pytest.approx(5.0)


@st.composite
def recordings(draw):
    """Three streams with random rates, jitter, drops and per-stream in-order delivery latency."""
    rng_seed = draw(st.integers(0, 2**32 - 1))
    import random

    rng = random.Random(rng_seed)
    duration = draw(st.floats(0.5, 3.0))
    max_latency = draw(st.floats(0.0, 0.04))
    messages = []  # (arrival, stream, stamp)
    for name, rate_range in zip(STREAMS, [(10, 60), (10, 60), (20, 1000)]):
        rate = draw(st.floats(*rate_range))
        jitter = draw(st.floats(0.0, 0.4)) / rate
        drop = draw(st.floats(0.0, 0.3))
        offset = rng.uniform(0, 1 / rate)
        arrival = -math.inf
        for i in range(int(duration * rate)):
            if rng.random() < drop:
                continue
            stamp = ns(offset + i / rate + rng.uniform(0, jitter))
            arrival = max(arrival, stamp + ns(rng.uniform(0, max_latency)))  # in order per stream
            messages.append((arrival, name, stamp))
    messages.sort(key=lambda m: m[0])
    period = draw(st.sampled_from([0.0, 0.05, 0.1, 0.2]))
    tolerance = draw(st.none() | st.floats(0.0, 1.0).map(lambda f: f * period))
    cfg = AlignerConfig(
        STREAMS, max_skew=draw(st.floats(0.005, 0.05)), period=period, latency_allowance=0.05,
        decimation_tolerance=tolerance,
    )
    return cfg, messages


def run_online(cfg, messages):
    aligner = StreamAligner(cfg)
    sets = []
    for arrival, name, stamp in messages:
        sets += aligner.poll(arrival)
        aligner.push(name, stamp, (name, stamp))
    return aligner, sets + aligner.flush()


def run_offline(cfg, messages):
    aligner = StreamAligner(cfg)
    for _, name, stamp in messages:
        aligner.push(name, stamp, (name, stamp))
    return aligner, aligner.flush()


@settings(max_examples=60, deadline=None)
@given(recordings())
def test_random_recordings_satisfy_invariants_and_online_equals_offline(recording):
    cfg, messages = recording
    online, online_sets = run_online(cfg, messages)
    offline, offline_sets = run_offline(cfg, messages)
    assert [(s.stamp, s.members) for s in online_sets] == [(s.stamp, s.members) for s in offline_sets]
    for aligner in (online, offline):
        assert_accounted(aligner)
        assert aligner.stats.emitted == len(offline_sets)
    stamps = stamps_of(offline_sets)
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    if cfg.period > 0 and cfg.decimation_tolerance is not None:
        assert all(b - a >= ns(cfg.period) - ns(cfg.decimation_tolerance) for a, b in zip(stamps, stamps[1:]))
    for s in offline_sets:
        assert set(s.members) == set(STREAMS)
        assert s.members[STREAMS[0]][0] == s.stamp
        assert all(abs(stamp - s.stamp) <= ns(cfg.max_skew) for stamp, _ in s.members.values())
        # Payloads carry their own stamps: members are real messages of the right stream.
        assert all(payload == (name, stamp) for name, (stamp, payload) in s.members.items())


@given(st.integers(10**9, 2 * 10**18), st.integers(1, 20_000_000))
def test_exact_ties_resolve_by_the_documented_rules_at_any_epoch(ref, d):
    # Two joint states exactly d ns either side of the frame: the earlier one is the member.
    aligner = StreamAligner(AlignerConfig(("cam", "js"), max_skew=0.02))
    aligner.push("cam", ref, "c")
    aligner.push("js", ref - d, "before")
    aligner.push("js", ref + d, "after")
    (out,) = aligner.poll(ref)
    assert out.members["js"] == (ref - d, "before")
    # Deciding by timeout: not at exactly ref + max_skew + latency_allowance, one ns later.
    aligner = StreamAligner(AlignerConfig(("cam", "js"), max_skew=0.02, latency_allowance=0.05))
    aligner.push("cam", ref, "c")
    aligner.push("js", ref - d, "j")
    assert aligner.poll(ref + ns(0.07)) == []
    (out,) = aligner.poll(ref + ns(0.07) + 1)
    assert out.members["js"] == (ref - d, "j")
