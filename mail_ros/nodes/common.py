"""Shared plumbing of the mail_ros nodes: parameters, time, diagnostics and the ``main`` runner.

Only the nodes import this module (it imports rclpy); the algorithms live in the core.
"""

from __future__ import annotations

import faulthandler
import math
import signal
import sys
import threading
import time
from typing import Any, Callable

import rclpy
from builtin_interfaces.msg import Duration, Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidParameterValueException
from rclpy.executors import Executor, ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

from mail_ros.language.goals import DEFAULT_WINDOW, DuplicateGoalFilter
from mail_ros.sync.stamps import StampError, ns_to_seconds, ns_to_stamp, seconds_to_ns, stamp_to_ns

# Goals (instructions and their embeddings) must reach late joiners: a goal published before the
# policy node starts is not lost.
GOAL_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
# The second subscription of a goal topic that people publish to (see subscribe_goals).
GOAL_QOS_VOLATILE = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                               durability=DurabilityPolicy.VOLATILE)
# Pipeline data between mail_ros nodes: reliable, shallow (only the newest matters).
PIPELINE_QOS = QoSProfile(depth=2, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)
# Commands to controllers: reliable and volatile, as ros2_controllers subscribe, and deep enough
# that none is lost: each executor command continues the one before it exactly, so a controller
# that missed one would jump to the next. (With depth 1 a reader busy for a few control periods
# lost all but the newest: setpoint jumps of 1e4 rad/s^2 in the test bed under load.)
COMMAND_QOS = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)

GIL_SWITCH_INTERVAL = 2e-4  # seconds; see run_node
SPIN_WAKE_PERIOD = 0.1  # seconds: run_node's main thread notices SIGINT/SIGTERM within this

OK, WARN, ERROR, STALE = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR,
                          DiagnosticStatus.STALE)


INT64_MAX = 2**63 - 1  # an IntegerRange without an upper bound ends here


def declare(node: Node, name: str, default: Any, description: str, *, read_only: bool = False,
            low: float | None = None, high: float | None = None) -> Any:
    """Declare a typed parameter with a description and return its value.

    ``default`` may be a ``Parameter.Type`` for a typed parameter without a default (used for
    optional array parameters, whose empty default would otherwise be typed as a byte array);
    its value is then None unless set.

    ``low`` and/or ``high`` declare the parameter's range (an IntegerRange for an integer
    default, else a FloatingPointRange; None = unbounded on that side): ``ros2 param describe``
    shows it, and rclpy refuses values outside it, at start-up (a clear SystemExit naming the
    parameter) and on every later set. ROS ranges are inclusive: a value that must be strictly
    positive is declared from 0, and the core that takes it refuses 0 itself.
    """
    descriptor = ParameterDescriptor(description=description, read_only=read_only)
    if low is not None or high is not None:
        integer = (isinstance(default, int) and not isinstance(default, bool)) or default == Parameter.Type.INTEGER
        if integer:
            descriptor.integer_range = [IntegerRange(from_value=-INT64_MAX if low is None else int(low),
                                                     to_value=INT64_MAX if high is None else int(high))]
        else:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=-math.inf if low is None else float(low), to_value=math.inf if high is None else float(high))]
    try:
        return node.declare_parameter(name, default, descriptor).value
    except InvalidParameterValueException as exc:
        raise SystemExit(f"{node.get_name()}: {exc}") from exc


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


def subscribe_goals(node: Node, msg_type: type, topic: str, callback: Callable[[Any, str], None], *,
                    raw: bool = False) -> None:
    """Subscribe ``callback(msg, channel)`` to a goal topic that any publisher matches.

    Two subscriptions, ``channel`` "transient_local" (GOAL_QOS: receives a goal published before
    this node started, from a transient-local publisher's history) and "volatile" (matches the
    volatile publishers a transient-local subscription never matches: ``ros2 topic pub`` from
    Iron on). A transient-local publication arrives on both; a node to which applying a goal twice
    matters pairs the copies (subscribe_goals_once). ``raw``: ``msg`` is the serialised bytes.
    """
    try:
        from rclpy.event_handler import SubscriptionEventCallbacks  # Iron and later
    except ImportError:  # Humble
        from rclpy.qos_event import SubscriptionEventCallbacks
    # A volatile publisher is incompatible with the transient-local subscription by design (the
    # volatile one takes its goals): no "incompatible QoS, no messages will be received" warning.
    quiet = SubscriptionEventCallbacks(incompatible_qos=lambda event: None)
    node.create_subscription(msg_type, topic, lambda msg: callback(msg, "transient_local"), GOAL_QOS,
                             event_callbacks=quiet, raw=raw)
    node.create_subscription(msg_type, topic, lambda msg: callback(msg, "volatile"), GOAL_QOS_VOLATILE, raw=raw)


def subscribe_goals_once(node: Node, msg_type: type, topic: str, callback: Callable[[Any], None],
                         window: float = DEFAULT_WINDOW, *, raw: bool = False) -> None:
    """:func:`subscribe_goals` with the two copies of a transient-local publication paired by
    content (mail_ros.language.goals.DuplicateGoalFilter, ``window`` s on a steady clock):
    ``callback(msg)`` once per publication. Raises ValueError for a window that is not positive."""
    duplicates = DuplicateGoalFilter(window)

    def on_goal(msg: Any, channel: str) -> None:
        if duplicates.accept(channel, msg, time.monotonic()):
            callback(msg)

    subscribe_goals(node, msg_type, topic, on_goal, raw=raw)


def shutdown_executor(executor: Executor) -> None:
    """Let the callbacks in flight finish, then shut the executor down.

    rclpy's Executor.shutdown destroys the executor's guard condition without waiting for the
    callbacks in flight (its wait for them is skipped on Jazzy and Kilted); those callbacks then
    fail with "cannot use Destroyable because destruction was requested", printed as "The following
    exception was never retrieved" when the process exits. Its thread pool is waited for first.
    """
    pool = getattr(executor, "_executor", None)  # MultiThreadedExecutor's ThreadPoolExecutor
    if pool is not None:
        pool.shutdown(wait=True)
    executor.shutdown(timeout_sec=5.0)
    # Callbacks taken from the wait set but never started (the spin stopped first) are cancelled,
    # which closes their coroutines; else Python warns "coroutine ... was never awaited" at exit.
    for task, *_ in list(getattr(executor, "_tasks", [])):
        if not (task.done() or task.executing()):
            task.cancel()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set from now on, for a loop that spins until it is set.

    Initialise rclpy without its own handlers (``SignalHandlerOptions.NO``): they shut the context
    down under the spinning loop, which then fails to wait on it. Python runs this handler in the
    main thread between bytecodes; the loop's spin timeout bounds how long it stays in rclpy's
    wait without looking.
    """
    stop = threading.Event()
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: stop.set())
    return stop


def ignore_stop_signals() -> None:
    """From now on SIGINT and SIGTERM are ignored: the clean-up after a stop runs to its end."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def run_node(factory: Callable[[], Node], argv: list[str] | None = None, threads: int = 2) -> int:
    """Standard ``main``: init, spin a multi-threaded executor, shut down in order; returns 0.

    SIGINT and SIGTERM end the spin; the node is then destroyed (its worker threads stopped, see
    each node's destroy_node) before the context shuts down, and further signals are ignored. Ctrl-C
    in the terminal of ``ros2 launch`` sends SIGINT to the whole process group and launch sends its
    own right after: with rclpy's handlers the first one shut the context down under threads still
    publishing (RCLError) and the second raised KeyboardInterrupt in the middle of the clean-up.
    Uses try/finally with ``try_shutdown`` rather than ``with rclpy.init()`` so it works on Humble,
    Jazzy and Kilted.
    """
    # Executor threads and worker threads (inference, simulation) share the GIL; hand it over
    # every 0.2 ms instead of 5 ms so a subscription or timer is not kept waiting behind them
    # (measured in bench/pipeline_latency.py: with 5 ms the observation stream fell from 10 Hz
    # to ~2 Hz and the executor saw 400 ms tick gaps).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # A crash in native code (rclpy, DDS, torch) prints every thread's Python stack to stderr, so
    # the node's launch log says where it was; without it launch reports only "exit code -11".
    # A node that hangs instead prints them on SIGUSR1 (`kill -USR1 PID`) and runs on.
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    stop = stop_on_signals()
    rclpy.init(args=sys.argv if argv is None else argv, signal_handler_options=SignalHandlerOptions.NO)
    node = executor = None
    try:
        node = factory()
        executor = MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=SPIN_WAKE_PERIOD)
    except ExternalShutdownException:
        pass
    finally:
        ignore_stop_signals()
        if executor is not None:
            shutdown_executor(executor)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


__all__ = [
    "COMMAND_QOS", "GIL_SWITCH_INTERVAL", "GOAL_QOS", "GOAL_QOS_VOLATILE", "PIPELINE_QOS", "Diagnostics", "Parameter",
    "declare", "ignore_stop_signals", "now_ns", "now_seconds", "ns_to_time", "run_node", "seconds_to_duration",
    "seconds_to_stamp", "shutdown_executor", "stamp_ns", "stamp_to_seconds", "stop_on_signals", "subscribe_goals",
    "subscribe_goals_once",
]
