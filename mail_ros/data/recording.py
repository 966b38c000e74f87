"""Recording demonstrations to a rosbag2 (MCAP or SQLite3): the ROS-free core of ``mail-ros record``.

:class:`BagRecording` takes serialised messages and writes a bag that ``rosbags``' AnyReader and
``mail-ros convert`` read. The live part (discovery, subscriptions, the spin loop) is the rclpy
edge in :mod:`mail_ros.nodes.recorder`; the command line is :mod:`mail_ros.commands.record`.

Conventions shared with :mod:`mail_ros.data.bags` (whose :class:`BagConfig` defaults are used):
the bag time of a message is its receive time on the recorder's node clock; every message on
the instruction topic (``/mail/instruction``) starts an episode, marked by a ``std_msgs/String``
``"start"`` on the episode topic (``/mail/episode``) at the same bag time (a start while an
episode is open also ends it), and ``"stop"`` is written when the recording ends with an episode
open. Connection message definitions come from the project typestore
(:func:`mail_ros.data.ros_types.typestore`), so a type it does not know cannot be recorded: such
a topic is refused with :class:`UnknownTypeError` naming the topic and the type.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from mail_ros.data.bags import BagConfig

__all__ = ["BagRecording", "DEFAULT_TOPICS", "RecordError", "STORAGES", "UnknownTypeError", "default_topics"]

STRING = "std_msgs/msg/String"
DEFAULT_TOPICS: tuple[str, ...] = (
    "/cameras/*/image_raw",
    BagConfig().joint_states_topic,
    BagConfig().instruction_topic,
    "/mail/action_chunk",
    BagConfig().arm_command_topic,
    BagConfig().gripper_command_topic,
)
STORAGES = ("mcap", "sqlite3")


def default_topics(arm_source: str = "command", teleop_topic: str = BagConfig().teleop_topic) -> tuple[str, ...]:
    """The topics a demonstration whose arm actions come from ``arm_source`` needs."""
    from mail_ros.data.action_sources import ARM_SOURCES

    if arm_source not in ARM_SOURCES:
        raise RecordError(f"arm source must be one of {list(ARM_SOURCES)}, got {arm_source!r}")
    if arm_source == "command":
        return DEFAULT_TOPICS
    topics = tuple(t for t in DEFAULT_TOPICS if t != BagConfig().arm_command_topic)
    return topics + ((teleop_topic,) if arm_source == "teleop" else ())


class RecordError(ValueError):
    """The recording cannot be made as asked (output exists, unknown topic, bad option)."""


class UnknownTypeError(RecordError):
    """A topic's message type is not in the typestore, so the bag could not describe it."""


class BagRecording:
    """A rosbag2 being written: connections from the project typestore, episode markers, counts.

    Use as a context manager, or call :meth:`close`. Not thread-safe: one executor thread writes.
    """

    def __init__(
        self,
        path: str | Path,
        storage: str = "mcap",
        instruction_topic: str = BagConfig().instruction_topic,
        episode_topic: str = BagConfig().episode_topic,
    ) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        from mail_ros.data.ros_types import typestore

        self.path = Path(path)
        if storage not in STORAGES:
            raise RecordError(f"storage must be one of {list(STORAGES)}, got {storage!r}")
        if self.path.exists():
            raise RecordError(f"output {self.path} already exists; rosbag2 writes a new folder")
        self.instruction_topic = instruction_topic
        self.episode_topic = episode_topic
        self.typestore = typestore()
        plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
        self._writer = Writer(self.path, version=Writer.VERSION_LATEST, storage_plugin=plugin)
        self._writer.open()
        self._connections: dict[str, object] = {}
        self.types: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.episodes = 0
        self._open_episode = False
        self._last_ns: int | None = None
        self._closed = False

    def __enter__(self) -> "BagRecording":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_topic(self, topic: str, msgtype: str) -> None:
        """Declare ``topic`` with ``msgtype`` ("pkg/msg/Type"); idempotent for the same type."""
        if topic == self.episode_topic:
            raise RecordError(f"{topic} is the episode marker topic, written by the recorder itself")
        known = self.types.get(topic)
        if known is not None:
            if known != msgtype:
                raise RecordError(f"topic {topic} was added as {known}, now offered as {msgtype}")
            return
        if msgtype not in self.typestore.fielddefs:
            raise UnknownTypeError(
                f"cannot record {topic}: message type {msgtype} is unknown to the bag typestore "
                "(standard ROS 2 Kilted messages + mail_ros/msg); register its definition in "
                "mail_ros/data/ros_types.py or leave the topic out"
            )
        self._connections[topic] = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
        self.types[topic] = msgtype

    def write(self, topic: str, data: bytes, time_ns: int) -> None:
        """Write one CDR-serialised message received at ``time_ns`` (bag time, nanoseconds)."""
        connection = self._connections.get(topic)
        if connection is None:
            raise RecordError(f"topic {topic} was not added to the recording")
        if topic == self.instruction_topic:
            self._marker("start", time_ns)
            self._open_episode = True
            self.episodes += 1
        self._writer.write(connection, int(time_ns), bytes(data))
        self.counts[topic] += 1
        self._last_ns = int(time_ns) if self._last_ns is None else max(self._last_ns, int(time_ns))

    def close(self, time_ns: int | None = None) -> None:
        """Close an open episode ("stop" at ``time_ns``, default the latest message time) and the bag."""
        if self._closed:
            return
        self._closed = True
        try:
            stop = time_ns if time_ns is not None else self._last_ns
            if self._open_episode and stop is not None:
                self._marker("stop", stop)
                self._open_episode = False
        finally:
            self._writer.close()

    def _marker(self, word: str, time_ns: int) -> None:
        if self.episode_topic not in self._connections:
            self._connections[self.episode_topic] = self._writer.add_connection(
                self.episode_topic, STRING, typestore=self.typestore
            )
        msg = self.typestore.types[STRING](data=word)
        data = self.typestore.serialize_cdr(msg, STRING)
        self._writer.write(self._connections[self.episode_topic], int(time_ns), data)
        self.counts[self.episode_topic] += 1

    def status_line(self, elapsed: float) -> str:
        """One line: elapsed time, episodes, messages per recorded topic."""
        counts = " | ".join(f"{topic} {self.counts[topic]}" for topic in sorted(self.types))
        return f"[{elapsed:6.1f} s] episodes {self.episodes} | {counts or 'waiting for topics'}"
