"""Reading demo bags: alignment, actions and instructions checked exactly against the bag factory's truth."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

import bag_factory as bf
from mail_ros.data.bags import BagConfig, Trajectory, command_target, read_bag
from mail_ros.data.hdf5 import DataError
from mail_ros.spec import FR3_HOME, ObservationSpec
from mail_ros.sync.stamps import seconds_to_ns

DT = 0.1
SPEC = ObservationSpec(cameras=("agentview", "wrist"), image_size=(24, 32), rate_hz=1 / DT)


def config(**kw) -> BagConfig:
    kw.setdefault("max_skew", 0.03)
    return BagConfig(observation=kw.pop("observation", SPEC), **kw)


def nearest(stamps: np.ndarray, t: float) -> int:
    """Index of the stamp closest to t, ties to the earlier one (the aligner's documented rule)."""
    d = np.abs(stamps - t)
    return int(np.flatnonzero(d == d.min())[0])


def check_exact(ep, truth: bf.BagTruth) -> None:
    ref = truth.camera_stamps["agentview"]
    # Reference camera at the policy rate: every recorded frame becomes one aligned frame.
    np.testing.assert_allclose(ep.timestamps, ref[: len(ep)], atol=1e-8)
    for i, t in enumerate(ep.timestamps):
        assert bf.decode_frame(ep.images["agentview"][i]) == truth.camera_frames["agentview"][i]
        w = nearest(truth.camera_stamps["wrist"], t)
        assert bf.decode_frame(ep.images["wrist"][i]) == truth.camera_frames["wrist"][w]
        j = nearest(truth.joint_stamps, t)
        np.testing.assert_allclose(ep.joint_positions[i], bf.measured_joints(truth.joint_stamps[j]), atol=1e-6)
        # Action rule: latest command received at or before t, evaluated at t + dt.
        # The factory's targets are linear in time, so interpolating the points is exact.
        assert np.searchsorted(truth.command_receive, t, side="right") > 0
        expected = np.append(bf.arm_target(t + DT), bf.gripper_target(t + DT))
        np.testing.assert_allclose(ep.actions[i], expected, atol=1e-6)
    assert ep.images["agentview"].shape[1:] == (24, 32, 3)
    assert ep.instruction == "put the cube in the bowl"


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_bag_aligned_exactly(tmp_path, storage):
    cams = (
        bf.Camera("agentview", 10.0, drop=(7,)),
        bf.Camera("wrist", 30.0, size=(40, 40), encoding="bgr8" if storage == "mcap" else "png", jitter=0.003, offset=0.013),
    )
    truth = bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(storage=storage, cameras=cams))
    readout = read_bag(tmp_path / "bag", config())
    assert readout.failures == [] and readout.gripper_source == "command"
    (ep,) = readout.episodes
    assert len(ep) == len(truth.camera_stamps["agentview"]) == 30  # 31 frames, frame 7 dropped
    assert 7 not in [bf.decode_frame(img) for img in ep.images["agentview"]]
    check_exact(ep, truth)
    stats = ep.sync_stats["streams"]
    assert stats["agentview"]["used"] == 30 and stats["wrist"]["used"] == 30
    assert stats["wrist"]["received"] == stats["wrist"]["used"] + sum(stats["wrist"]["dropped"].values())


def test_zero_command_stamps_start_at_receive_time(tmp_path):
    truth = bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(zero_command_stamps=True))
    (ep,) = read_bag(tmp_path / "bag", config()).episodes
    for t, action in zip(ep.timestamps, ep.actions):
        m = int(np.searchsorted(truth.command_receive, t, side="right")) - 1
        # The factory computed the points from the publish time; the converter starts the
        # trajectory at the receive time, 1 ms later, so it reads the targets 1 ms earlier.
        np.testing.assert_allclose(action[:7], bf.arm_target(t + DT - 0.001), atol=1e-6)
        assert truth.command_start[m] == truth.command_receive[m]


def test_measured_gripper_width_without_command_topic(tmp_path):
    truth = bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(gripper_topic=None))
    readout = read_bag(tmp_path / "bag", config())
    assert readout.gripper_source == "measured"
    (ep,) = readout.episodes
    # Finger joints sum to the commanded width at the same stamp; linear, so interpolation is exact.
    np.testing.assert_allclose(ep.actions[:, 7], bf.gripper_target(ep.timestamps + DT), atol=1e-6)
    late = int(np.sum(truth.camera_stamps["agentview"] + DT > truth.joint_stamps[-1]))
    assert late >= 1 and ep.sync_stats["frames_dropped"] == {"no_future_state": late}
    assert len(ep) == len(truth.camera_stamps["agentview"]) - late


def test_decimation_to_policy_rate(tmp_path):
    cams = (bf.Camera("agentview", 30.0, jitter=0.003), bf.Camera("wrist", 30.0, offset=0.01))
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(cameras=cams))
    (ep,) = read_bag(tmp_path / "bag", config()).episodes
    gaps = np.diff(ep.timestamps)
    assert np.all(gaps > DT - 1 / 30) and abs(np.mean(gaps) - DT) < 0.01
    ref = ep.sync_stats["streams"]["agentview"]
    assert ref["received"] == ref["used"] + sum(ref["dropped"].values())
    assert ref["dropped"]["decimated"] > 0


def test_episode_markers_split_one_bag(tmp_path):
    truth = bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(episodes=((100.45, 101.5), (102.0, 102.85))))
    readout = read_bag(tmp_path / "bag", config())
    assert len(readout.episodes) == 2 and "episode 1" in readout.episodes[1].source
    for ep, (start, stop) in zip(readout.episodes, ((100.45, 101.5), (102.0, 102.85))):
        # Messages are assigned by receive time (stamp + 10 ms latency for the cameras).
        assert start - 0.011 <= ep.timestamps[0] and ep.timestamps[-1] <= stop
        for t, action in zip(ep.timestamps, ep.actions):
            np.testing.assert_allclose(action, np.append(bf.arm_target(t + DT), bf.gripper_target(t + DT)), atol=1e-6)
    assert len(truth.camera_stamps["agentview"]) > sum(len(ep) for ep in readout.episodes)


@pytest.mark.parametrize("switch", [102.005, 102.02])
def test_recorded_episodes_keep_their_own_instruction(tmp_path, switch):
    # The second instruction arrives with agentview frame 20 (stamp 102.0 +- 4 ms, received 10 ms
    # later): at 102.005 between its capture and its receipt, at 102.02 after both.
    demo = bf.DemoBag(duration=4.0, instruction=None, recorder_markers=True,
                      instructions=((99.5, "pick up the red cube"), (switch, "open the drawer")))
    truth = bf.write_demo_bag(tmp_path / "bag", demo)
    readout = read_bag(tmp_path / "bag", config())
    assert readout.failures == []
    first, second = readout.episodes
    assert (first.instruction, second.instruction) == ("pick up the red cube", "open the drawer")
    ref = truth.camera_stamps["agentview"]
    latency = demo.cameras[0].latency
    # Frames go to the episode open when they were received; one captured before the instruction
    # and received after it is in neither: the runtime never acts on it with the new goal.
    straddling = (ref < switch) & (ref + latency >= switch)
    assert straddling.sum() == (1 if switch == 102.005 else 0)
    np.testing.assert_allclose(first.timestamps, ref[ref + latency < switch], atol=1e-8)
    np.testing.assert_allclose(second.timestamps, ref[ref >= switch], atol=1e-8)
    assert second.sync_stats["frames_dropped"] == ({"predates_instruction": 1} if straddling.any() else {})
    assert first.sync_stats["frames_dropped"] == {}
    for ep in readout.episodes:
        for t, action in zip(ep.timestamps, ep.actions):
            np.testing.assert_allclose(action, np.append(bf.arm_target(t + DT), bf.gripper_target(t + DT)), atol=1e-6)


def test_instruction_in_effect_when_observations_start(tmp_path):
    # Without markers the bag is one episode; a correction sent before the cameras start wins.
    bf.write_demo_bag(tmp_path / "corrected", bf.DemoBag(instructions=((99.8, "put the cube in the box"),)))
    (ep,) = read_bag(tmp_path / "corrected", config()).episodes
    assert ep.instruction == "put the cube in the box" and ep.sync_stats["frames_dropped"] == {}
    # The only instruction arrives mid-bag: the frames captured before it had no goal at run time.
    truth = bf.write_demo_bag(tmp_path / "late", bf.DemoBag(instruction=None, instructions=((101.05, "wave"),)))
    (ep,) = read_bag(tmp_path / "late", config()).episodes
    ref = truth.camera_stamps["agentview"]
    assert ep.instruction == "wave"
    np.testing.assert_allclose(ep.timestamps, ref[ref >= 101.05], atol=1e-8)
    assert ep.sync_stats["frames_dropped"] == {"predates_instruction": int(np.sum(ref < 101.05))}


def test_missing_topic_names_file_and_topic(tmp_path):
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag())
    with pytest.raises(DataError, match=r"bag: missing topics \['/cameras/side/image_raw'\]"):
        read_bag(tmp_path / "bag", config(camera_topics={"wrist": "/cameras/side/image_raw"}))
    with pytest.raises(DataError, match="not a|cannot read"):
        read_bag(tmp_path / "nothing", config())


def test_wrong_or_unknown_message_type(tmp_path):
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag())
    with pytest.raises(DataError, match="/mail/instruction has message type std_msgs/msg/String, expected sensor_msgs/msg/Image"):
        read_bag(tmp_path / "bag", config(camera_topics={"wrist": "/mail/instruction"}))
    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg("int32 x", "my_pkg/msg/Foo"))
    with Writer(tmp_path / "odd", version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/joint_states", "my_pkg/msg/Foo", typestore=store)
        writer.write(conn, 1, store.serialize_cdr(store.types["my_pkg/msg/Foo"](x=1), "my_pkg/msg/Foo"))
        writer.add_connection("/cameras/agentview/image_raw", "sensor_msgs/msg/Image", typestore=store)
        writer.add_connection("/cameras/wrist/image_raw", "sensor_msgs/msg/Image", typestore=store)
        writer.add_connection("/fr3_arm_controller/joint_trajectory", "trajectory_msgs/msg/JointTrajectory", typestore=store)
    with pytest.raises(DataError, match="/joint_states has message type my_pkg/msg/Foo"):
        read_bag(tmp_path / "odd", config())


def test_nan_command_names_file_topic_and_time(tmp_path):
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(nan_command_at=101.0))
    with pytest.raises(DataError, match=r"bag: /fr3_arm_controller/joint_trajectory at t=101\.021 s: non-finite position of fr3_joint3"):
        read_bag(tmp_path / "bag", config())


def test_image_size_change_is_an_error(tmp_path):
    cams = (bf.Camera("agentview", 10.0), bf.Camera("wrist", 30.0, resize_at=20))
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(cameras=cams))
    (failure,) = read_bag(tmp_path / "bag", config()).failures
    assert "/cameras/wrist/image_raw at t=" in failure and "mismatched image size (96, 128)" in failure


def test_messages_stamped_ahead_of_their_receipt_are_refused_as_the_node_refuses_them(tmp_path):
    # The wrist camera's clock runs 0.25 s ahead of the recorder's: camera_sync_node would refuse
    # every wrist frame, so no aligned frame exists, and the report says why.
    cams = (bf.Camera("agentview", 10.0), bf.Camera("wrist", 30.0, latency=-0.25))
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(cameras=cams))
    (failure,) = read_bag(tmp_path / "bag", config()).failures
    assert "0 aligned frames" in failure and "messages stamped ahead of their receipt: {'wrist': " in failure
    # Within the tolerance (a clock 30 ms ahead) nothing is refused.
    cams = (bf.Camera("agentview", 10.0), bf.Camera("wrist", 30.0, latency=-0.03))
    bf.write_demo_bag(tmp_path / "near", bf.DemoBag(cameras=cams))
    (ep,) = read_bag(tmp_path / "near", config()).episodes
    assert ep.sync_stats["messages_stamped_ahead"] == {} and ep.sync_stats["messages_unstamped"] == {}


def test_unstamped_messages_are_refused_as_the_node_refuses_them(tmp_path):
    # A wrist driver that leaves header stamps zero: camera_sync_node refuses every such frame
    # (the same StampGate), so convert aligns nothing and says why.
    cams = (bf.Camera("agentview", 10.0), bf.Camera("wrist", 30.0, unstamped=True))
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(cameras=cams))
    (failure,) = read_bag(tmp_path / "bag", config()).failures
    assert "0 aligned frames" in failure and "messages without a stamp: {'wrist': " in failure


def test_short_episode_and_missing_instruction(tmp_path):
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(duration=0.5, instruction=None))
    (failure,) = read_bag(tmp_path / "bag", config(min_frames=10)).failures
    assert "6 aligned frames with actions, need at least 10" in failure
    (failure,) = read_bag(tmp_path / "bag", config()).failures
    assert "no instruction on /mail/instruction" in failure
    (ep,) = read_bag(tmp_path / "bag", config(default_instruction="wave")).episodes
    assert ep.instruction == "wave"


@settings(max_examples=60, deadline=None)
@given(
    offsets=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=6, unique=True).map(sorted),
    t=st.floats(-1.0, 4.0),
    start=st.floats(0.0, 1.0),
)
def test_command_target_interpolates_and_holds(offsets, t, start):
    traj = Trajectory("/cmd", joints=("a",))
    offsets = np.asarray(offsets)
    values = np.sin(3 * offsets) + offsets  # arbitrary, distinct per point
    t, start = seconds_to_ns(t), seconds_to_ns(start)  # the core's times: integer ns
    traj.receive, traj.start = [start], [start]
    traj.offsets, traj.positions = [offsets], [values[:, None]]
    target, m = command_target(traj, t, seconds_to_ns(0.1))
    if t < start:
        assert target is None and m == -1
        return
    rel = (t + seconds_to_ns(0.1) - start) / 1e9
    if rel <= offsets[0]:
        assert target[0] == pytest.approx(values[0])
    elif rel >= offsets[-1]:
        assert target[0] == pytest.approx(values[-1])
    else:
        k = int(np.searchsorted(offsets, rel)) - 1
        lo, hi = sorted((values[k], values[k + 1]))
        assert lo - 1e-12 <= target[0] <= hi + 1e-12


def test_gripper_commanded_through_a_finger_joint_reads_as_the_width():
    from types import SimpleNamespace

    from mail_ros.data.bags import Trajectory, command_target

    point = SimpleNamespace(positions=[0.015], time_from_start=SimpleNamespace(sec=0, nanosec=500_000_000))
    msg = SimpleNamespace(joint_names=["fr3_finger_joint1"], points=[point],
                          header=SimpleNamespace(stamp=SimpleNamespace(sec=0, nanosec=0)))
    grip = Trajectory("/fr3_gripper/joint_trajectory", joints=("fr3_gripper_width",))
    grip.add(msg, receive=10_000_000_000, where="test")
    target, _ = command_target(grip, 10_500_000_000, 100_000_000)
    assert target.tolist() == [0.03]


def write_tie_bag(path, start_sec: int, frames: int) -> list[float]:
    """One camera at 10 Hz and joint states at 50 Hz from ``start_sec`` (whole seconds since the
    epoch), and an arm command received EXACTLY (to the nanosecond) at every frame's stamp, with
    another one received halfway between frames. Returns the value each command holds."""
    ts = bf.typestore()
    ns = lambda k_ms: start_sec * 1_000_000_000 + k_ms * 1_000_000  # noqa: E731 - ms after start, exact
    time = lambda t: ts.types["builtin_interfaces/msg/Time"](sec=t // 10**9, nanosec=t % 10**9)  # noqa: E731
    header = lambda t: ts.types["std_msgs/msg/Header"](stamp=time(t), frame_id="")  # noqa: E731
    empty = np.zeros(0)
    records, values = [], []
    for k in range(frames):
        t = ns(123 + 100 * k)  # off the whole second, where float seconds since the epoch round
        image = bf.camera_image(0, k, (16, 16))
        records.append((t + 5_000_000, "/cameras/agentview/image_raw", "sensor_msgs/msg/Image",
                        ts.types["sensor_msgs/msg/Image"](header=header(t), height=16, width=16, encoding="rgb8",
                                                          is_bigendian=0, step=48, data=image.reshape(-1))))
        for receive in (t - 50_000_000, t):  # halfway before the frame, then exactly at its stamp
            value = 0.001 * len(values)
            values.append(value)
            point = ts.types["trajectory_msgs/msg/JointTrajectoryPoint"](
                positions=np.full(7, value), velocities=empty, accelerations=empty, effort=empty,
                time_from_start=ts.types["builtin_interfaces/msg/Duration"](sec=0, nanosec=0))
            records.append((receive, "/fr3_arm_controller/joint_trajectory", "trajectory_msgs/msg/JointTrajectory",
                            ts.types["trajectory_msgs/msg/JointTrajectory"](header=header(receive),
                                                                            joint_names=list(bf.FR3_ARM_JOINTS),
                                                                            points=[point])))
    for j in range(frames * 5):
        t = ns(103 + 20 * j)
        records.append((t + 2_000_000, "/joint_states", "sensor_msgs/msg/JointState",
                        ts.types["sensor_msgs/msg/JointState"](header=header(t), name=list(bf.FR3_ARM_JOINTS),
                                                               position=np.asarray(FR3_HOME), velocity=empty,
                                                               effort=empty)))  # a pose an FR3 can be in
    records.append((ns(0), "/mail/instruction", "std_msgs/msg/String", ts.types["std_msgs/msg/String"](data="tie")))
    records.sort(key=lambda r: r[0])
    with Writer(path, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        for receive, topic, msgtype, msg in records:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(connections[topic], receive, ts.serialize_cdr(msg, msgtype))
    return values


@pytest.mark.parametrize("start_sec", [100, 1_700_000_000, 1_765_432_109])
def test_a_command_received_exactly_at_a_frame_stamp_labels_that_frame(tmp_path, start_sec):
    # The documented rule: the latest command received AT OR BEFORE the frame's stamp. A command
    # received at exactly the stamp is that command, for every frame, whatever the epoch.
    values = write_tie_bag(tmp_path / "bag", start_sec, frames=30)
    spec = ObservationSpec(cameras=("agentview",), image_size=(16, 16), joint_names=bf.FR3_ARM_JOINTS, rate_hz=10.0)
    (ep,) = read_bag(tmp_path / "bag", BagConfig(observation=spec, action_names=bf.FR3_ARM_JOINTS,
                                                  max_skew=0.03)).episodes
    frames = [bf.decode_frame(image) for image in ep.images["agentview"]]
    assert frames == list(range(30))
    np.testing.assert_array_equal(ep.actions[:, 0], np.float32([values[2 * k + 1] for k in frames]))
