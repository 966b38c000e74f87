"""Offline evaluation (`mail-ros eval-bag`) on synthetic bags whose every number is known.

The bags come from bag_factory: cameras at 10 and 30 Hz with stamp jitter and dropped frames,
joint states at 50 Hz, commands that are linear functions of time. The policy is a real MaILPolicy
checkpoint (tiny preset, written by `mail-ros checkpoint init`) whose output projection is zeroed
and whose action mean is set to CONSTANT, so every predicted chunk is exactly CONSTANT. Expected
frames, sync counts, skews and action errors are computed here from the recorded stamps and the
closed-form command functions, independently of the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer

from bag_factory import ARM_SLOPE, Camera, DemoBag, arm_target, gripper_target, write_demo_bag
from mail_ros import cli
from mail_ros.commands.checkpoint import limit_stats
from mail_ros.data.ros_types import typestore
from mail_ros.eval.replay import ReplayConfig, ReplayError, replay_bag
from mail_ros.policy.checkpoint import load_checkpoint, save_checkpoint
from mail_ros.spec import Observation
from mail_ros.sync.history import ObservationHistory
from mail_ros.sync.stamps import seconds_to_ns

torch.set_num_threads(1)

# Exactly representable in float32, so the denormalised output equals these bit for bit.
CONSTANT = np.array([0.125, -0.25, 0.375, -1.5, 0.25, 1.75, 0.5, 0.0625])
MAX_SKEW = 0.02
DT = 0.1
A = 4  # the tiny preset's action horizon


def constant_checkpoint(root: Path, *overrides: str) -> Path:
    init = root / "init"
    args = ["checkpoint", "init", "--preset", "tiny-d_tr-bc", "--out", str(init)]
    for override in overrides:
        args += ["--set", override]
    assert cli.main(args) == 0
    policy = load_checkpoint(init)
    with torch.no_grad():
        policy.action_out.weight.zero_()
        policy.action_out.bias.zero_()
    stats = limit_stats(policy.config.spec.action.names)
    stats["mean"] = CONSTANT.tolist()
    policy.set_normalization(stats)
    return save_checkpoint(root / "constant", policy)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return constant_checkpoint(tmp_path_factory.mktemp("ckpt"))


def dropping_bag(storage: str = "mcap", **kwargs) -> DemoBag:
    # agentview frame 7 never recorded; wrist frames 14 and 15 (around agentview frame 5) lost, so
    # agentview frame 5 has no wrist partner within MAX_SKEW.
    cameras = (Camera("agentview", 10.0, drop=(7,)),
               Camera("wrist", 30.0, size=(40, 40), encoding="bgr8", jitter=0.003, offset=0.013, drop=(14, 15)))
    return DemoBag(storage=storage, cameras=cameras, **kwargs)


def nearest(stamps: np.ndarray, t: float) -> float:
    return float(stamps[np.argmin(np.abs(stamps - t))])


def expected_sync(truth):
    """Frames the aligner must emit and each stream's used count and skews, from the stamps alone."""
    ref, wrist, joints = truth.camera_stamps["agentview"], truth.camera_stamps["wrist"], truth.joint_stamps
    frames, wrist_used, joint_used, wrist_skew = [], set(), set(), []
    for r in ref:
        w, j = nearest(wrist, r), nearest(joints, r)
        if abs(w - r) <= MAX_SKEW and abs(j - r) <= MAX_SKEW:
            frames.append(float(r))
            wrist_used.add(w)
            joint_used.add(j)
            wrist_skew.append(w - r)
    return np.array(frames), len(wrist_used), len(joint_used), np.array(wrist_skew)


def expected_commanded(truth, stamps: np.ndarray, measured_gripper: bool) -> np.ndarray:
    """(N, A, 8): arm_target / gripper_target at t + (i + 1) dt where step i is compared, else NaN."""
    out = np.full((len(stamps), A, len(CONSTANT)), np.nan)
    last = stamps.max()
    for n, t in enumerate(stamps):
        for i in range(A):
            frame_time, target_time = t + i * DT, t + (i + 1) * DT
            if frame_time > last + DT / 2 or frame_time < truth.command_receive[0]:
                continue
            if measured_gripper and not truth.joint_stamps[0] <= target_time <= truth.joint_stamps[-1]:
                continue
            out[n, i] = np.concatenate([arm_target(target_time), [gripper_target(target_time)]])
    return out


def run_eval(*args: str) -> int:
    return cli.main(["eval-bag", *args, "--no-progress"])


@pytest.mark.parametrize("storage, gripper_topic", [("mcap", "/fr3_gripper/joint_trajectory"), ("sqlite3", None)])
def test_report_matches_known_truth(tmp_path, checkpoint, storage, gripper_topic):
    truth = write_demo_bag(tmp_path / "bag", dropping_bag(storage, gripper_topic=gripper_topic))
    out = tmp_path / "report"
    assert run_eval(str(truth.path), "--checkpoint", str(checkpoint), "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())

    frames, wrist_used, joint_used, wrist_skew = expected_sync(truth)
    n_ref = len(truth.camera_stamps["agentview"])
    assert n_ref == 30 and len(frames) == 28  # 31 frames, 1 never recorded, 1 without a wrist partner
    assert report["frames"] == report["chunks"] == len(frames)
    sync = report["sync"]["streams"]
    assert sync["agentview"] == {"received": n_ref, "used": len(frames),
                                 "dropped": {"no_match:wrist": n_ref - len(frames)}, "skew_ms": {}}
    assert sync["wrist"]["received"] == len(truth.camera_stamps["wrist"]) == 88
    assert sync["wrist"]["used"] == wrist_used
    assert sync["wrist"]["dropped"] == {"unused": 88 - wrist_used}
    assert sync["joint_states"]["used"] == joint_used
    assert sync["joint_states"]["dropped"] == {"unused": len(truth.joint_stamps) - joint_used}
    p50, p99 = np.percentile(np.abs(wrist_skew) * 1e3, [50, 99])
    assert sync["wrist"]["skew_ms"]["p50"] == pytest.approx(p50, abs=1e-6)
    assert sync["wrist"]["skew_ms"]["p99"] == pytest.approx(p99, abs=1e-6)
    assert sync["wrist"]["skew_ms"]["mean_signed"] == pytest.approx(wrist_skew.mean() * 1e3, abs=1e-6)

    arrays = np.load(out / "bag0_chunks.npz")
    np.testing.assert_allclose(arrays["stamps"], frames, atol=1e-9)
    assert np.array_equal(arrays["predicted"], np.broadcast_to(CONSTANT, (len(frames), A, 8)))
    expected = expected_commanded(truth, frames, measured_gripper=gripper_topic is None)
    assert np.array_equal(np.isnan(arrays["commanded"]), np.isnan(expected))
    np.testing.assert_allclose(arrays["commanded"], expected, atol=1e-9)

    error = np.abs(CONSTANT - expected)  # (N, A, 8) with NaN where not compared
    err = report["action_error"]
    assert err["compared"] == int((~np.isnan(error)).sum())
    assert err["mae"] == pytest.approx(np.nanmean(error), abs=1e-9)
    assert err["max"] == pytest.approx(np.nanmax(error), abs=1e-9)
    assert err["per_step"] == pytest.approx(np.nanmean(error, axis=(0, 2)).tolist(), abs=1e-9)
    names = report["checkpoint"]["action_names"]
    assert list(err["per_dimension"]) == names
    assert list(err["per_dimension"].values()) == pytest.approx(np.nanmean(error, axis=(0, 1)).tolist(), abs=1e-9)
    assert report["bags"][0]["gripper_source"] == ("measured" if gripper_topic is None else "command")
    latency = report["inference_ms"]
    assert latency["count"] == len(frames) and latency["p99"] >= latency["p50"] > 0
    for name in ("report.html", "error_vs_step.png", "skew_histogram.png", "bag0_actions.png"):
        assert (out / name).stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "bag0_actions.png" in page and "no_match:wrist" in page

    # The commands are positions-only points on lines of slope ARM_SLOPE, each joining the last
    # on the line: the 1 kHz setpoint moves at constant velocity until the last point, where it
    # stops within one cycle: acceleration ARM_SLOPE / 1 ms and jerk ARM_SLOPE / (1 ms)^2.
    setpoint = report["bags"][0]["setpoint_1khz"]
    assert setpoint["commands"] == len(truth.command_receive) and setpoint["rejected"] == 0
    assert list(setpoint["acceleration_per_joint"].values()) == pytest.approx(ARM_SLOPE / 1e-3, rel=1e-6)
    assert list(setpoint["jerk_per_joint"].values()) == pytest.approx(ARM_SLOPE / 1e-6, rel=1e-5)
    assert report["setpoint_1khz"]["acceleration_max"] == pytest.approx(ARM_SLOPE.max() / 1e-3, rel=1e-6)
    assert report["setpoint_1khz"]["fr3_acceleration_limit_min"] == 10.0
    assert "1 kHz" in page


def test_replay_is_deterministic_and_storage_independent(tmp_path):
    """An untrained (random) policy: two replays, MCAP and SQLite3 copies, give identical chunks."""
    assert cli.main(["checkpoint", "init", "--preset", "tiny-d_ma-ddpm", "--out", str(tmp_path / "ck"),
                     "--set", "head.steps=4"]) == 0
    policy = load_checkpoint(tmp_path / "ck")
    demo = DemoBag(duration=1.5)
    mcap = write_demo_bag(tmp_path / "mcap", demo).path
    sqlite = write_demo_bag(tmp_path / "sqlite", DemoBag(storage="sqlite3", duration=1.5)).path
    runs = [replay_bag(path, policy, ReplayConfig(seed=3)) for path in (mcap, mcap, sqlite)]
    first = np.stack([c.predicted for c in runs[0].chunks])
    assert first.shape == (runs[0].frames, A, 8) and np.isfinite(first).all()
    for other in runs[1:]:
        assert np.array_equal(np.stack([c.predicted for c in other.chunks]), first)
        assert other.sync == runs[0].sync
    assert [c.history_length for c in runs[0].chunks][:3] == [1, 2, 2]


def add_messages(src: Path, dst: Path, extra: list[tuple[float, str, str, object]]) -> None:
    """Copy bag ``src`` to ``dst`` with ``extra`` (receive time, topic, type, message) merged in."""
    ts = typestore()
    with AnyReader([src], default_typestore=ts) as reader:
        records = [(ns, c.topic, c.msgtype, bytes(raw)) for c, ns, raw in reader.messages()]
    records += [(int(round(t * 1e9)), topic, msgtype, bytes(ts.serialize_cdr(msg, msgtype)))
                for t, topic, msgtype, msg in extra]
    records.sort(key=lambda r: r[0])
    with Writer(dst, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        for ns, topic, msgtype, raw in records:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(connections[topic], ns, raw)


def test_new_instruction_restarts_history_and_ends_the_compared_horizon(tmp_path, checkpoint):
    truth = write_demo_bag(tmp_path / "src", DemoBag(duration=2.0))
    source = truth.path
    switch = 101.03  # received between the frames at ~101.0 and ~101.1
    switch_ns = seconds_to_ns(switch)
    String = typestore().types["std_msgs/msg/String"]
    add_messages(source, tmp_path / "bag", [(switch, "/mail/instruction", "std_msgs/msg/String",
                                             String(data="now  stack the  blocks"))])
    policy = load_checkpoint(checkpoint)
    replay = replay_bag(tmp_path / "bag", policy, ReplayConfig(every=2))
    assert [text for _, text in replay.instructions] == ["put the cube in the bowl", "now stack the blocks"]
    before = [c for c in replay.chunks if c.decided < switch_ns]
    after = [c for c in replay.chunks if c.decided >= switch_ns]
    assert before[0].history_length == 1 and all(c.history_length == 2 for c in before[1:])
    assert after[0].history_length == 1 and after[0].instruction == "now stack the blocks"
    # every=2 counts the observations of both goals together
    frames = len(expected_sync(truth)[0])
    assert replay.frames == frames and len(replay.chunks) == (frames + 1) // 2
    assert replay.observations["skipped_every"] == frames // 2
    for chunk in before:
        compared = ~np.isnan(chunk.commanded[:, 0])
        assert np.array_equal(compared, chunk.stamp + np.arange(A) * seconds_to_ns(DT) < switch_ns)

    override = replay_bag(tmp_path / "bag", policy, ReplayConfig(instruction="pick"))
    assert [text for _, text in override.instructions] == ["pick"]
    assert [c.history_length for c in override.chunks] == [1] + [2] * (len(override.chunks) - 1)


def test_observation_history_follows_policy_node_rules():
    history = ObservationHistory(obs_horizon=3, period=0.1, max_gap_periods=3.0)

    def obs(ms):
        return Observation(ms * 1_000_000, {}, np.zeros(1))  # stamps in integer ns

    def window():
        return [o.stamp // 1_000_000 for o in history.window()]

    outcomes = [history.add(obs(ms)) for ms in (1000, 1100, 1100, 1200, 1300)]
    assert outcomes == [None, None, "duplicate", None, None]
    assert window() == [1100, 1200, 1300]
    assert history.add(obs(1600)) is None  # exactly max_gap_periods after the last: not yet a gap
    assert history.add(obs(1901)) == "restart" and window() == [1901]
    # Time went backwards (a simulator restart): the history restarts rather than waiting for 1.901.
    assert history.add(obs(200)) == "backwards" and window() == [200]
    assert [history.add(obs(ms)) for ms in (300, 300)] == [None, "duplicate"]
    assert window() == [200, 300]


def test_compressed_cameras_are_found_by_name(tmp_path, checkpoint):
    cameras = (Camera("agentview", 10.0, encoding="jpeg"), Camera("wrist", 30.0, encoding="png", offset=0.013))
    truth = write_demo_bag(tmp_path / "bag", DemoBag(cameras=cameras, duration=1.0))
    replay = replay_bag(truth.path, load_checkpoint(checkpoint))
    assert replay.camera_topics == {"agentview": "/cameras/agentview/image_raw/compressed",
                                    "wrist": "/cameras/wrist/image_raw/compressed"}
    assert replay.frames == len(expected_sync(truth)[0]) > 5


def _truncate(path: Path, fraction: float = 0.5) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as stream:
        stream.truncate(int(size * fraction))


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(2000, len(data) - 100, 997):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("storage, damage", [("mcap", _truncate), ("sqlite3", _truncate), ("mcap", _corrupt)])
def test_damaged_bags_fail_with_one_clear_line(tmp_path, checkpoint, capsys, storage, damage):
    bag = write_demo_bag(tmp_path / "bag", DemoBag(storage=storage, duration=1.0)).path
    damage(next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3")))
    assert run_eval(str(bag), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("mail-ros eval-bag: error: ") and str(bag) in err and "corrupt or truncated" in err


def test_missing_topics_and_camera_mismatch_and_bad_checkpoint(tmp_path, checkpoint, capsys):
    no_commands = write_demo_bag(tmp_path / "nocmd", DemoBag(duration=0.5, command_topic="/teleop/cmd")).path
    assert run_eval(str(no_commands), "--checkpoint", str(checkpoint)) == 2
    err = capsys.readouterr().err
    assert "missing topics ['/fr3_arm_controller/joint_trajectory']" in err and str(no_commands) in err

    cameras = (Camera("agentview", 10.0), Camera("side", 30.0))
    side = write_demo_bag(tmp_path / "side", DemoBag(duration=0.5, cameras=cameras)).path
    assert run_eval(str(side), "--checkpoint", str(checkpoint)) == 2
    err = capsys.readouterr().err
    assert "checkpoint cameras ['agentview', 'wrist'] but the bag records cameras ['agentview', 'side']" in err

    good = write_demo_bag(tmp_path / "good", DemoBag(duration=0.5)).path
    assert run_eval(str(good), "--checkpoint", str(tmp_path / "nowhere")) == 2
    assert "checkpoint directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    _truncate(broken / "model.safetensors")
    assert run_eval(str(good), "--checkpoint", str(broken)) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is corrupt or truncated" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_instruction_is_embedded_with_the_checkpoint_encoder(tmp_path, capsys):
    checkpoint = constant_checkpoint(tmp_path, 'language.encoder="minilm:all-MiniLM-L6-v2"', "language.dim=384")
    bag = write_demo_bag(tmp_path / "bag", DemoBag(duration=1.0)).path
    out = tmp_path / "report"
    assert run_eval(str(bag), "--checkpoint", str(checkpoint), "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["chunks"] == report["frames"] > 5
    assert report["bags"][0]["instructions"][0]["text"] == "put the cube in the bowl"
    assert report["checkpoint"]["language_encoder"] == "minilm:all-MiniLM-L6-v2"


def shift_sensors(src: Path, dst: Path, seconds: float) -> None:
    """Copy bag ``src`` to ``dst`` with every camera and joint-state message received ``seconds``
    earlier: their header stamps then lead the receiving clock (a sensor clock running ahead)."""
    with AnyReader([src], default_typestore=typestore()) as reader:
        records = [(ns - int(round(seconds * 1e9)) if c.topic.startswith("/cameras/") or c.topic == "/joint_states"
                    else ns, c.topic, c.msgtype, bytes(raw)) for c, ns, raw in reader.messages()]
    records.sort(key=lambda r: r[0])
    with Writer(dst, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        for ns, topic, msgtype, raw in records:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=typestore())
            writer.write(connections[topic], ns, raw)


def test_stamps_ahead_of_the_receiving_clock_are_refused_as_the_nodes_refuse_them(tmp_path, checkpoint):
    shift_sensors(write_demo_bag(tmp_path / "src", DemoBag(duration=1.5)).path, tmp_path / "bag", 0.25)
    policy = load_checkpoint(checkpoint)
    # camera_sync_node refuses every message stamped 0.25 s ahead: nothing to align.
    with pytest.raises(ReplayError, match="future"):
        replay_bag(tmp_path / "bag", policy, ReplayConfig())
    # Past camera_sync_node (a lead it tolerates), policy_node refuses each observation instead.
    tolerant = replay_bag(tmp_path / "bag", policy, ReplayConfig(max_stamp_lead=1.0))
    # (The last set is decided by the end-of-bag flush, as the node's timer would, not early.)
    assert tolerant.observations["refused_future"] >= tolerant.frames - 1 > 0
    assert all(c.stamp - c.decided <= seconds_to_ns(0.05) for c in tolerant.chunks)


def test_like_policy_node_no_chunk_before_the_first_instruction(tmp_path, checkpoint):
    policy = load_checkpoint(checkpoint)  # no language: the goal only starts the episode
    late = write_demo_bag(tmp_path / "late", DemoBag(duration=2.0, instruction=None,
                                                     instructions=((101.05, "pick up the cube"),))).path
    replay = replay_bag(late, policy, ReplayConfig())
    assert replay.chunks and min(c.decided for c in replay.chunks) >= seconds_to_ns(101.05)
    assert replay.observations["no_goal"] > 0
    assert all(len(skews) == replay.frames for skews in replay.skews.values())  # every emitted set's
    # A bag without the instruction topic: a goal from the start.
    untold = write_demo_bag(tmp_path / "untold", DemoBag(duration=2.0, instruction=None)).path
    replay = replay_bag(untold, policy, ReplayConfig())
    assert len(replay.chunks) == replay.frames and replay.observations["no_goal"] == 0
