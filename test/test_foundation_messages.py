"""The foundation is real: mail_ros's messages cross processes over DDS and survive rosbag2 files.

- One process publishes ActionChunk, Observation and InstructionEmbedding; this process receives
  them over Fast DDS on loopback (the session's own ROS_DOMAIN_ID, see conftest.py) and compares
  every field.
- The same messages, serialised by rclpy, are written to MCAP and SQLite3 bags with rosbags and
  read back using only the message definitions embedded in the bag.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ros_samples import sample_messages, to_plain

HERE = Path(__file__).resolve().parent

PUBLISHER = r"""
import sys, time
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy, DurabilityPolicy
from ros_samples import sample_messages
rclpy.init()
node = rclpy.create_node("foundation_publisher")
qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
msgs = sample_messages()
pubs = {key: node.create_publisher(type(msg), f"/foundation/{key}", qos) for key, msg in msgs.items()}
for key, msg in msgs.items():
    pubs[key].publish(msg)
print("published", flush=True)
deadline = time.monotonic() + 60
try:
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
finally:
    node.destroy_node()
    rclpy.try_shutdown()
"""


@pytest.mark.ros
def test_messages_cross_processes_over_dds():
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    expected = sample_messages()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    context = rclpy.Context()
    rclpy.init(context=context)
    received = {}
    try:
        node = rclpy.create_node("foundation_subscriber", context=context)
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
        for key, msg in expected.items():
            node.create_subscription(type(msg), f"/foundation/{key}",
                                     lambda m, key=key: received.setdefault(key, m), qos)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        deadline = time.monotonic() + 30
        while len(received) < len(expected) and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
            assert publisher.poll() is None, publisher.communicate()[1]
        executor.shutdown()
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
        publisher.kill()
        publisher.wait()

    assert set(received) == set(expected), f"missing over DDS: {set(expected) - set(received)}"
    for key, msg in expected.items():
        assert type(received[key]) is type(msg)
        assert to_plain(received[key]) == to_plain(msg), key


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_messages_round_trip_through_bags(tmp_path, storage):
    from rclpy.serialization import deserialize_message, serialize_message
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer

    from mail_ros.data.ros_types import typestore

    expected = sample_messages()
    msgtypes = {
        "chunk": "mail_ros/msg/ActionChunk",
        "observation": "mail_ros/msg/Observation",
        "embedding": "mail_ros/msg/InstructionEmbedding",
    }
    bag = tmp_path / "bag"
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(bag, version=9, storage_plugin=plugin) as writer:
        for i, (key, msg) in enumerate(expected.items()):
            connection = writer.add_connection(f"/mail/{key}", msgtypes[key], typestore=typestore())
            writer.write(connection, 1_000_000_000 * (i + 1), serialize_message(msg))

    # Read with no typestore of ours: the definitions come from the bag itself.
    with AnyReader([bag]) as reader:
        assert {c.msgtype for c in reader.connections} == set(msgtypes.values())
        assert all(c.msgdef.data for c in reader.connections)
        seen = {}
        for connection, _, raw in reader.messages():
            key = connection.topic.rsplit("/", 1)[1]
            seen[key] = (reader.deserialize(raw, connection.msgtype), bytes(raw))

    assert set(seen) == set(expected)
    for key, msg in expected.items():
        from_bag, raw = seen[key]
        assert to_plain(from_bag) == to_plain(msg), key
        # rosbags' bytes are rclpy's bytes: rclpy reads back what the bag holds.
        assert to_plain(deserialize_message(raw, type(msg))) == to_plain(msg), key
        # ...and rclpy reads what rosbags writes (byte equality is too strict: Fast CDR leaves
        # alignment padding uninitialised).
        rewritten = typestore().serialize_cdr(from_bag, msgtypes[key]).tobytes()
        assert to_plain(deserialize_message(rewritten, type(msg))) == to_plain(msg), key
