"""The rclpy edge of ``mail-ros record``: discover topics, subscribe raw, hand bytes to the bag.

Topics are matched against the requested names/patterns on every discovery tick, so cameras and
controllers that come up after the recorder are still recorded. Each matching topic gets a raw
subscription (serialised CDR bytes, nothing deserialised) whose QoS is adapted to its publishers
at subscription time, as ``ros2 bag record`` does: reliable only if every publisher is reliable
(a reliable reader never matches a best-effort writer), transient-local only if every publisher
is. The instruction topic is the exception: it is subscribed from the start as the nodes take
goals (:func:`mail_ros.nodes.common.subscribe_goals_once`: a transient-local and a volatile
reader, the two copies of one publication paired), so a goal published before the recording
started is recorded, and so is one from a volatile publisher such as ``ros2 topic pub`` (Iron
on) that appears while a transient-local one exists, or publishes right after it matched.
The bag time of a message is its receive time on this node's clock.
"""

from __future__ import annotations

import fnmatch
import importlib
import sys
import threading
import time
from functools import partial
from typing import TextIO

import rclpy
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

from mail_ros.data.recording import STRING, BagRecording, RecordError
from mail_ros.nodes.common import ignore_stop_signals, stop_on_signals, subscribe_goals_once

__all__ = ["RecorderNode", "adapted_qos", "main", "message_class", "record"]

# Deep enough to absorb a burst of camera frames while the bag writer is busy.
RECORD_DEPTH = 100
STATUS_PERIOD = 0.5


def message_class(msgtype: str) -> type:
    """The rclpy message class of ``"pkg/msg/Type"`` (what rosidl_runtime_py's get_message does)."""
    package, _, name = msgtype.rpartition("/")
    module_name = package.replace("/", ".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RecordError(f"message type {msgtype} cannot be imported as {module_name}.{name}: {exc}") from exc


def adapted_qos(publishers) -> QoSProfile | None:
    """A subscription QoS compatible with every publisher (TopicEndpointInfo list); None without any."""
    if not publishers:
        return None
    profiles = [p.qos_profile for p in publishers]
    reliable = all(q.reliability == ReliabilityPolicy.RELIABLE for q in profiles)
    latched = all(q.durability == DurabilityPolicy.TRANSIENT_LOCAL for q in profiles)
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=RECORD_DEPTH,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
    )


class RecorderNode(Node):
    """Subscribes (raw) to every discovered topic matching ``patterns`` and writes to ``recording``."""

    def __init__(
        self,
        recording: BagRecording,
        patterns: tuple[str, ...],
        *,
        context: Context | None = None,
        discovery_period: float = 0.5,
    ) -> None:
        super().__init__("mail_recorder", context=context)
        self.recording = recording
        self.patterns = tuple(patterns)
        self.subscribed: dict[str, str] = {}  # topic -> msgtype
        self.refused: dict[str, str] = {}  # topic -> reason (reported once)
        if self.wanted(recording.instruction_topic):
            self._subscribe_instructions(recording.instruction_topic)
        self.create_timer(discovery_period, self.discover)
        self.discover()

    def wanted(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.patterns)

    def discover(self) -> None:
        """Subscribe to matching topics that now have publishers."""
        for topic, types in self.get_topic_names_and_types():
            if topic in self.subscribed or topic in self.refused or not self.wanted(topic):
                continue
            qos = adapted_qos(self.get_publishers_info_by_topic(topic))
            if qos is None:
                continue  # only subscribers so far; the QoS to offer is unknown until a publisher appears
            try:
                if len(types) != 1:
                    raise RecordError(f"topic {topic} is published with several types {types}")
                cls = message_class(types[0])
                self.recording.add_topic(topic, types[0])
            except RecordError as exc:
                self.refused[topic] = str(exc)
                self.get_logger().error(f"not recording {topic}: {exc}")
                continue
            self.create_subscription(cls, topic, partial(self._on_message, topic), qos, raw=True)
            self.subscribed[topic] = types[0]
            self.get_logger().info(f"recording {topic} ({types[0]}, {qos.reliability.name.lower()}, "
                                   f"{qos.durability.name.lower()})")

    def _subscribe_instructions(self, topic: str) -> None:
        """Goals (std_msgs/String) from publishers of either durability, each publication once."""
        self.recording.add_topic(topic, STRING)
        subscribe_goals_once(self, message_class(STRING), topic, partial(self._on_message, topic), raw=True)
        self.subscribed[topic] = STRING
        self.get_logger().info(f"recording {topic} ({STRING}, transient-local and volatile publishers)")

    def _on_message(self, topic: str, data: bytes) -> None:
        self.recording.write(topic, data, self.get_clock().now().nanoseconds)


def record(
    out: str,
    topics: tuple[str, ...],
    *,
    duration: float | None = None,
    storage: str = "mcap",
    context: Context | None = None,
    status: TextIO | None = None,
    discovery_period: float = 0.5,
    stop: threading.Event | None = None,
) -> BagRecording:
    """Record until ``duration`` seconds (wall clock) have passed, ``stop`` is set (Ctrl-C in
    :func:`main`) or ``context`` shuts down.

    ``context`` must be initialised (None: the default context). ``status`` receives one status
    line, refreshed in place. Returns the closed :class:`BagRecording` (its ``counts``).
    """
    recording = BagRecording(out, storage=storage)
    node = None
    executor = SingleThreadedExecutor(context=context)
    start = time.monotonic()
    try:
        node = RecorderNode(recording, topics, context=context, discovery_period=discovery_period)
        executor.add_node(node)
        ok = (context or rclpy.get_default_context()).ok
        next_status = start
        while ok() and not (stop is not None and stop.is_set()) and (
                duration is None or time.monotonic() - start < duration):
            executor.spin_once(timeout_sec=0.05)
            now = time.monotonic()
            if status is not None and now >= next_status:
                status.write("\r" + recording.status_line(now - start) + "\x1b[K")
                status.flush()
                next_status = now + STATUS_PERIOD
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        stop_ns = node.get_clock().now().nanoseconds if node is not None else None
        executor.shutdown(timeout_sec=1.0)
        if node is not None:
            node.destroy_node()
        recording.close(stop_ns)
        if status is not None:
            status.write("\r" + recording.status_line(time.monotonic() - start) + "\x1b[K\n")
            status.flush()
    return recording


def main(out: str, topics: tuple[str, ...], *, duration: float | None = None, storage: str = "mcap",
         status: TextIO | None = sys.stderr) -> int:
    """``mail-ros record``: init rclpy, record until SIGINT/SIGTERM (or ``duration``), shut down.

    The signals only set an event that the recording loop reads between spins, as for the nodes
    (:func:`~mail_ros.nodes.common.stop_on_signals`): rclpy's own handler shut the context down
    under the loop, which then failed to wait on it ("the given context is not valid").
    """
    stop = stop_on_signals()
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        recording = record(out, topics, duration=duration, storage=storage, status=status, stop=stop)
    finally:
        ignore_stop_signals()
        rclpy.try_shutdown()
    total = sum(recording.counts.values())
    print(f"wrote {out}: {total} messages on {len(recording.counts)} topics, {recording.episodes} episode(s)")
    if not recording.types:
        print(f"mail-ros record: warning: no topic matched {list(topics)}", file=sys.stderr)
    return 0
