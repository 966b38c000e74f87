"""Shared plumbing of the mail_ros nodes: parameters, time, diagnostics and the ``main`` runner.

Only the nodes import this module (it imports rclpy); the algorithms live in the core.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import rclpy
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from mail_ros.sync.stamps import StampError, ns_to_seconds, ns_to_stamp, seconds_to_ns, stamp_to_ns

# Goals (instructions and their embeddings) must reach late joiners: a goal published before the
# policy node starts is not lost.
GOAL_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Pipeline data between mail_ros nodes: reliable, shallow (only the newest matters).
PIPELINE_QOS = QoSProfile(depth=2, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
# Commands to controllers: reliable and volatile, as ros2_controllers subscribe.
COMMAND_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)

GIL_SWITCH_INTERVAL = 2e-4  # seconds; see run_node

OK, WARN, ERROR, STALE = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR,
                          DiagnosticStatus.STALE)


def declare(node: Node, name: str, default: Any, description: str, *, read_only: bool = False) -> Any:
    """Declare a typed parameter with a description and return its value.

    ``default`` may be a ``Parameter.Type`` for a typed parameter without a default (used for
    optional array parameters, whose empty default would otherwise be typed as a byte array);
    its value is then None unless set.
    """
    descriptor = ParameterDescriptor(description=description, read_only=read_only)
    return node.declare_parameter(name, default, descriptor).value


def stamp_ns(stamp: Time) -> int:
    """A ROS stamp as integer nanoseconds, the core's time (exact)."""
    return stamp_to_ns(stamp.sec, stamp.nanosec)


def ns_to_time(ns: int) -> Time:
    """Integer nanoseconds as a ROS stamp (exact)."""
    sec, nanosec = ns_to_stamp(ns)
    return Time(sec=sec, nanosec=nanosec)


def stamp_to_seconds(stamp: Time) -> float:
    """A ROS stamp as float seconds (for durations and display; the core compares nanoseconds)."""
    return ns_to_seconds(stamp_ns(stamp))


def seconds_to_stamp(seconds: float) -> Time:
    """Float seconds as a ROS stamp, rounded to the nearest nanosecond."""
    try:
        return ns_to_time(seconds_to_ns(seconds))
    except StampError as exc:
        raise ValueError(f"cannot convert {seconds} s to a ROS stamp: {exc}") from exc


def seconds_to_duration(seconds: float) -> Duration:
    """Float seconds as a ROS Duration, rounded to the nearest nanosecond."""
    sec, nanosec = ns_to_stamp(seconds_to_ns(seconds))
    return Duration(sec=sec, nanosec=nanosec)


def now_ns(node: Node) -> int:
    """The node's clock in nanoseconds: ROS time (sim time under use_sim_time), like message stamps."""
    return node.get_clock().now().nanoseconds


def now_seconds(node: Node) -> float:
    """The node's clock in float seconds (for durations)."""
    return ns_to_seconds(now_ns(node))


class Diagnostics:
    """Publishes one DiagnosticStatus per node on /diagnostics at a fixed period.

    The node updates level, message and key/values whenever something happens; the timer
    publishes the latest state, so a node that stops updating is visible as unchanged output and
    a node that dies disappears (the aggregator marks it stale).
    """

    def __init__(self, node: Node, period: float = 1.0):
        self._node = node
        self._publisher = node.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.level = OK
        self.message = "starting"
        self.values: dict[str, str] = {}
        self._timer = node.create_timer(period, self.publish)

    def set(self, level: int, message: str, **values: Any) -> None:
        self.level = level
        self.message = message
        self.values.update({key: str(value) for key, value in values.items()})

    def publish(self) -> None:
        status = DiagnosticStatus(
            level=self.level,
            name=f"mail_ros: {self._node.get_fully_qualified_name()}",
            message=self.message,
            hardware_id="mail_ros",
            values=[KeyValue(key=k, value=v) for k, v in sorted(self.values.items())],
        )
        self._publisher.publish(DiagnosticArray(header=self._header(), status=[status]))

    def _header(self):
        from std_msgs.msg import Header

        return Header(stamp=self._node.get_clock().now().to_msg())


def run_node(factory: Callable[[], Node], argv: list[str] | None = None, threads: int = 2) -> int:
    """Standard ``main``: init, spin a multi-threaded executor, shut down cleanly.

    Uses try/finally with ``try_shutdown`` rather than ``with rclpy.init()`` so it works on
    Humble, Jazzy and Kilted.
    """
    # Executor threads and worker threads (inference, simulation) share the GIL; hand it over
    # every 0.2 ms instead of 5 ms so a subscription or timer is not kept waiting behind them
    # (measured in bench/pipeline_latency.py: with 5 ms the observation stream fell from 10 Hz
    # to ~2 Hz and the executor saw 400 ms tick gaps).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    rclpy.init(args=sys.argv if argv is None else argv)
    node = None
    try:
        node = factory()
        executor = MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


__all__ = [
    "COMMAND_QOS", "GIL_SWITCH_INTERVAL", "GOAL_QOS", "PIPELINE_QOS", "Diagnostics", "Parameter", "declare",
    "now_ns", "now_seconds", "ns_to_time", "run_node", "seconds_to_duration", "seconds_to_stamp", "stamp_ns", "stamp_to_seconds",
]
