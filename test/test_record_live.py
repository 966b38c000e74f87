"""`mail-ros record` against a live ROS graph: real publishers, real DDS (loopback, see conftest.py).

1. In-process: a publisher node (own context, executor thread) and the recorder (own context,
   thread) record cameras, joint states and instructions; the bag is read back with rosbags and
   every count and value compared. QoS adaptation is exercised: a transient-local instruction
   published before the recorder starts is recorded, and a best-effort camera is received.
2. The CLI in a subprocess stops cleanly on SIGINT and leaves a readable bag.
"""

from __future__ import annotations

import array
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rosbags.highlevel import AnyReader

from mail_ros.data.ros_types import typestore

pytestmark = pytest.mark.ros


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _read(path: Path) -> tuple[dict[str, int], list[tuple[str, int, object]]]:
    with AnyReader([path], default_typestore=typestore()) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        messages = [(c.topic, ns, reader.deserialize(raw, c.msgtype)) for c, ns, raw in reader.messages()]
    return counts, messages


def test_recorder_records_live_topics(tmp_path):
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    from mail_ros.data.recording import DEFAULT_TOPICS
    from mail_ros.nodes.common import GOAL_QOS
    from mail_ros.nodes.recorder import record

    out = tmp_path / "demo"
    publisher_context, recorder_context = rclpy.Context(), rclpy.Context()
    rclpy.init(context=publisher_context)
    rclpy.init(context=recorder_context)
    executor = SingleThreadedExecutor(context=publisher_context)
    recorded = {}
    try:
        node = rclpy.create_node("demo_publisher", context=publisher_context)
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        joints = node.create_publisher(JointState, "/joint_states", reliable)
        agentview = node.create_publisher(Image, "/cameras/agentview/image_raw", reliable)
        wrist = node.create_publisher(Image, "/cameras/wrist/image_raw", qos_profile_sensor_data)
        instruction = node.create_publisher(String, "/mail/instruction", GOAL_QOS)
        other = node.create_publisher(String, "/not/recorded", reliable)
        executor.add_node(node)
        threading.Thread(target=executor.spin, daemon=True).start()
        instruction.publish(String(data="first goal"))  # before the recorder exists

        started = time.time_ns()
        recorder = threading.Thread(target=lambda: recorded.setdefault("bag", record(
            str(out), DEFAULT_TOPICS, duration=4.0, context=recorder_context, discovery_period=0.2)))
        recorder.start()
        _wait(lambda: min(p.get_subscription_count() for p in (joints, agentview, wrist, instruction)) >= 1,
              10.0, "the recorder to subscribe")
        for k in range(20):
            joints.publish(JointState(name=["fr3_joint1", "fr3_joint2"], position=[0.01 * k, -0.01 * k]))
            if k % 2 == 0:
                image = Image(height=2, width=3, encoding="rgb8", step=9, data=array.array("B", [k] * 18))
                agentview.publish(image)
                wrist.publish(image)
            other.publish(String(data="ignored"))
            time.sleep(0.01)
        instruction.publish(String(data="second goal"))
        recorder.join(timeout=15.0)
        assert not recorder.is_alive()
        finished = time.time_ns()
    finally:
        executor.shutdown()
        rclpy.try_shutdown(context=publisher_context)
        rclpy.try_shutdown(context=recorder_context)

    counts, messages = _read(out)
    assert recorded["bag"].counts == counts
    assert counts["/joint_states"] == 20 and counts["/cameras/agentview/image_raw"] == 10
    assert counts["/mail/instruction"] == 2 and counts["/mail/episode"] == 3
    assert 1 <= counts["/cameras/wrist/image_raw"] <= 10  # best effort: matched, so received
    assert "/not/recorded" not in counts
    positions = [list(m.position) for topic, _, m in messages if topic == "/joint_states"]
    assert positions == [[0.01 * k, -0.01 * k] for k in range(20)]
    frames = [m for topic, _, m in messages if topic == "/cameras/agentview/image_raw"]
    assert [bytes(m.data) for m in frames] == [bytes([k] * 18) for k in range(0, 20, 2)]
    assert [m.encoding for m in frames] == ["rgb8"] * 10
    times = [ns for _, ns, _ in messages]
    assert times == sorted(times) and started <= times[0] and times[-1] <= finished  # receive time, node clock
    events = [(topic, m.data) for topic, _, m in messages if topic in ("/mail/instruction", "/mail/episode")]
    assert events == [("/mail/episode", "start"), ("/mail/instruction", "first goal"),
                      ("/mail/episode", "start"), ("/mail/instruction", "second goal"), ("/mail/episode", "stop")]


def test_instructions_from_volatile_and_transient_local_publishers_are_recorded_once_each(tmp_path):
    # A goal published transient-local before the recorder started, then one from a volatile
    # publisher (`ros2 topic pub` from Iron on) while the transient-local publisher still exists,
    # then another transient-local one: each recorded once, each starting an episode.
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String

    from mail_ros.data.recording import BagRecording
    from mail_ros.nodes.common import GOAL_QOS, GOAL_QOS_VOLATILE
    from mail_ros.nodes.recorder import RecorderNode

    out = tmp_path / "goals"
    publisher_context, recorder_context = rclpy.Context(), rclpy.Context()
    rclpy.init(context=publisher_context)
    rclpy.init(context=recorder_context)
    executors = [SingleThreadedExecutor(context=c) for c in (publisher_context, recorder_context)]
    recording = BagRecording(out)
    try:
        node = rclpy.create_node("goal_publishers", context=publisher_context)
        latched = node.create_publisher(String, "/mail/instruction", GOAL_QOS)
        latched.publish(String(data="early goal"))  # before the recorder exists
        recorder = RecorderNode(recording, ("/mail/instruction",), context=recorder_context, discovery_period=0.2)
        for executor, spun in zip(executors, (node, recorder)):
            executor.add_node(spun)
            threading.Thread(target=executor.spin, daemon=True).start()

        def recorded(n: int, what: str) -> None:
            _wait(lambda: recording.counts["/mail/instruction"] >= n, 30.0, what)

        recorded(1, "the goal published before the recorder started")
        volatile = node.create_publisher(String, "/mail/instruction", GOAL_QOS_VOLATILE)
        # Matched on the recorder's side (its volatile reader sees both publishers): a volatile
        # sample sent before that would be lost to any subscriber, as DDS defines it.
        _wait(lambda: max(s.get_publisher_count() for s in recorder.subscriptions) >= 2, 30.0,
              "the recorder's volatile reader to match the volatile publisher")
        volatile.publish(String(data="volatile goal"))
        recorded(2, "the goal from the volatile publisher")
        latched.publish(String(data="late goal"))
        recorded(3, "the second transient-local goal")
    finally:
        for executor in executors:
            executor.shutdown()
        recording.close()
        rclpy.try_shutdown(context=publisher_context)
        rclpy.try_shutdown(context=recorder_context)

    counts, messages = _read(out)
    goals = [m.data for topic, _, m in messages if topic == "/mail/instruction"]
    assert goals == ["early goal", "volatile goal", "late goal"]
    assert counts["/mail/episode"] == 4  # three starts and the stop


def test_cli_stops_cleanly_on_sigint(tmp_path):
    import rclpy
    from sensor_msgs.msg import JointState

    out = tmp_path / "bag"
    context = rclpy.Context()
    rclpy.init(context=context)
    process = subprocess.Popen(
        [sys.executable, "-m", "mail_ros.cli", "record", str(out), "--topics", "/joint_states"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )
    try:
        node = rclpy.create_node("sigint_publisher", context=context)
        publisher = node.create_publisher(JointState, "/joint_states", 10)
        _wait(lambda: publisher.get_subscription_count() >= 1 or process.poll() is not None, 20.0,
              "the recorder process to subscribe")
        assert process.poll() is None, process.communicate()
        for k in range(10):
            publisher.publish(JointState(name=["a"], position=[float(k)]))
            time.sleep(0.02)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
        rclpy.try_shutdown(context=context)
    assert process.returncode == 0, stderr
    assert f"wrote {out}: 10 messages on 1 topics, 0 episode(s)" in stdout
    # one status line refreshed in place ("\r" reads back as a newline in text mode)
    assert "] episodes 0 | /joint_states 10\x1b[K" in stderr
    counts, messages = _read(out)
    assert counts == {"/joint_states": 10}
    assert [m.position[0] for _, _, m in messages] == [float(k) for k in range(10)]
