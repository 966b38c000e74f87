"""The ROS-free half of `mail-ros record`: BagRecording writes bags that rosbags and the converter read."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from rosbags.highlevel import AnyReader

from mail_ros.data.bags import BagConfig
from mail_ros.data.recording import BagRecording, RecordError, UnknownTypeError
from mail_ros.data.ros_types import typestore

TS = typestore()
STRING = "std_msgs/msg/String"
JOINTS = "sensor_msgs/msg/JointState"


def _joint_state(k: int) -> bytes:
    t = TS.types
    msg = t[JOINTS](header=t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=k, nanosec=5),
                                                   frame_id=""),
                    name=["fr3_joint1"], position=np.array([0.5 * k]), velocity=np.zeros(0), effort=np.zeros(0))
    return bytes(TS.serialize_cdr(msg, JOINTS))


def _string(text: str) -> bytes:
    return bytes(TS.serialize_cdr(TS.types[STRING](data=text), STRING))


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_recording_round_trips_with_episode_markers(tmp_path, storage):
    path = tmp_path / "demo"
    with BagRecording(path, storage=storage) as rec:
        rec.add_topic("/joint_states", JOINTS)
        rec.add_topic("/mail/instruction", STRING)
        rec.add_topic("/joint_states", JOINTS)  # idempotent
        for k in range(5):
            rec.write("/joint_states", _joint_state(k), 1_000_000_000 + k * 10_000_000)
        rec.write("/mail/instruction", _string("pick up the cube"), 1_020_000_000)
        rec.write("/mail/instruction", _string("stack it"), 1_035_000_000)
        assert rec.episodes == 2
        assert "episodes 2" in rec.status_line(1.0) and "/joint_states 5" in rec.status_line(1.0)
    assert rec.counts == {"/joint_states": 5, "/mail/instruction": 2, "/mail/episode": 2 + 1}

    with AnyReader([path], default_typestore=TS) as reader:
        assert {c.topic: (c.msgtype, c.msgcount) for c in reader.connections} == {
            "/joint_states": (JOINTS, 5), "/mail/instruction": (STRING, 2), "/mail/episode": (STRING, 3)}
        messages = [(c.topic, ns, reader.deserialize(raw, c.msgtype)) for c, ns, raw in reader.messages()]
    markers = [(ns, m.data) for topic, ns, m in messages if topic == BagConfig().episode_topic]
    # "stop" at the last message's time closes the second episode
    assert markers == [(1_020_000_000, "start"), (1_035_000_000, "start"), (1_040_000_000, "stop")]
    joints = [m for topic, _, m in messages if topic == "/joint_states"]
    assert [float(m.position[0]) for m in joints] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [m.header.stamp.sec for m in joints] == [0, 1, 2, 3, 4]
    assert [m.data for topic, _, m in messages if topic == "/mail/instruction"] == ["pick up the cube", "stack it"]


def test_close_time_and_no_markers_without_instruction(tmp_path):
    with BagRecording(tmp_path / "a") as rec:
        rec.add_topic("/mail/instruction", STRING)
        rec.write("/mail/instruction", _string("go"), 5_000)
        rec.close(time_ns=9_000)
    with AnyReader([tmp_path / "a"], default_typestore=TS) as reader:
        assert [(ns, reader.deserialize(raw, c.msgtype).data) for c, ns, raw in reader.messages()
                if c.topic == "/mail/episode"] == [(5_000, "start"), (9_000, "stop")]
    with BagRecording(tmp_path / "b") as rec:
        rec.add_topic("/joint_states", JOINTS)
        rec.write("/joint_states", _joint_state(1), 1)
    with AnyReader([tmp_path / "b"], default_typestore=TS) as reader:
        assert [c.topic for c in reader.connections] == ["/joint_states"]


def test_refusals_are_clear(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(RecordError, match="already exists"):
        BagRecording(tmp_path / "exists")
    with pytest.raises(RecordError, match="storage must be one of"):
        BagRecording(tmp_path / "x", storage="rosbag1")
    with BagRecording(tmp_path / "bag") as rec:
        unknown = r"cannot record /thing: message type acme_msgs/msg/Widget is unknown"
        with pytest.raises(UnknownTypeError, match=unknown):
            rec.add_topic("/thing", "acme_msgs/msg/Widget")
        with pytest.raises(RecordError, match="episode marker topic"):
            rec.add_topic("/mail/episode", STRING)
        rec.add_topic("/joint_states", JOINTS)
        with pytest.raises(RecordError, match="was added as sensor_msgs/msg/JointState"):
            rec.add_topic("/joint_states", STRING)
        with pytest.raises(RecordError, match="not added"):
            rec.write("/other", b"", 1)


def test_the_recording_core_imports_neither_the_command_nor_the_node():
    # The core sits below both edges (commands/record.py and nodes/recorder.py import it); an
    # import of either edge from the core would bring back the cycle between them.
    code = (
        "import sys, mail_ros.data.recording, mail_ros.nodes.recorder; "
        "print(sorted(m for m in sys.modules if m.startswith('mail_ros.commands')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = "import sys, mail_ros.data.recording; print(sorted(m for m in sys.modules if m.startswith(('rclpy', 'mail_ros.nodes'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_default_topics_follow_the_arm_source():
    from mail_ros.data.recording import DEFAULT_TOPICS, default_topics

    arm = "/fr3_arm_controller/joint_trajectory"
    assert default_topics() == DEFAULT_TOPICS and arm in DEFAULT_TOPICS
    kinesthetic = default_topics("kinesthetic")
    assert arm not in kinesthetic and "/joint_states" in kinesthetic and "/fr3_gripper/joint_trajectory" in kinesthetic
    assert default_topics("teleop", "/gello/joint_states") == kinesthetic + ("/gello/joint_states",)
    with pytest.raises(RecordError, match="arm source"):
        default_topics("spacemouse")
