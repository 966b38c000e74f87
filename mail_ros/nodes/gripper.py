"""Gripper output of the executor: franka_gripper actions when franka_msgs is installed, else a
JointTrajectory for a position-controlled gripper (the simulator, or a JTC on the fingers).

franka_gripper (franka_ros2) serves franka_msgs' Move, Grasp and Homing actions and a
std_srvs/Trigger ``stop`` service. Its goals block and cannot be pre-empted, so the bridge never
sends a goal while another of its goals is running: it asks ``stop`` and sends the newest wanted
goal once the running one has ended. A Grasp states what counts as holding an object with a
:class:`mail_ros.control.gripper.GraspWindow`; a grasp that ends outside it (nothing, or the wrong
object, between the fingers) is reported as failed. Refused goals and a server that is missing
(or appears late) are logged and retried at most every ``RETRY_PERIOD``.
"""

from __future__ import annotations

import threading
import time

from rclpy.node import Node
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from mail_ros.control.gripper import DEFAULT_GRASP_WINDOW, GraspWindow, GripperCommand, GripperHysteresis
from mail_ros.nodes.common import COMMAND_QOS, declare
from mail_ros.spec import FR3_GRIPPER_MAX_WIDTH, GRIPPER_COMMAND_JOINT, GRIPPER_COMMAND_PER_WIDTH

RETRY_PERIOD = 0.5  # s (wall) between attempts to send a goal that was refused or had no server
GOAL_TIMEOUT = 15.0  # s (wall) after which a goal without a result is given up (server gone)
HOMING = "homing"
# franka_gripper's bounds on a Grasp's force (N) and the fingers' speed (m/s); both must be positive.
MAX_GRASP_FORCE = 70.0
MAX_FINGER_SPEED = 0.2


class GripperBridge:
    def __init__(self, node: Node, mode: str, topic: str, action_namespace: str, close_below: float,
                 open_above: float):
        self.node = node
        self.hysteresis = GripperHysteresis(close_below, open_above)
        if mode not in ("auto", "franka", "trajectory", "none"):
            raise SystemExit(f"gripper_mode must be auto, franka, trajectory or none, got {mode!r}")
        self.franka = None
        self._declare_franka_parameters()  # always, so a parameter file is valid whatever the mode resolves to
        if mode in ("auto", "franka"):
            try:
                from franka_msgs.action import Grasp, Homing, Move
                from rclpy.action import ActionClient
                from std_srvs.srv import Trigger
            except ImportError as exc:
                if mode == "franka":
                    raise SystemExit("gripper_mode 'franka' needs the franka_msgs package (franka_ros2), which "
                                     f"is not installed: {exc}") from exc
                mode = "trajectory"
            else:
                self.franka = {GripperCommand.OPEN: Move, GripperCommand.CLOSE: Grasp, HOMING: Homing}
                self.clients = {what: ActionClient(node, action, f"{action_namespace}/{name}") for what, action, name in
                                ((GripperCommand.OPEN, Move, "move"), (GripperCommand.CLOSE, Grasp, "grasp"),
                                 (HOMING, Homing, "homing"))}
                self.stop_client = node.create_client(Trigger, f"{action_namespace}/stop")
                self.trigger = Trigger
                self.namespace = action_namespace
                mode = "franka"
        self.mode = mode
        if mode == "trajectory":
            self.publisher = node.create_publisher(JointTrajectory, topic, COMMAND_QOS)
            self.topic = topic
        # franka mode: the goal in flight (what, handle or None while unanswered, sent at), the
        # goal wanted next, and when a refused or unsendable goal may be tried again.
        self._active: list | None = None
        self._wanted = None
        self._retry_at = 0.0
        self._stop_requested = False
        self._width = float("nan")  # last width reported by franka_gripper's feedback
        self.counters = {"succeeded": 0, "failed": 0, "refused": 0}
        self.last_failure = ""
        # Goal responses and results arrive on executor threads, beside the control tick.
        self._lock = threading.RLock()

    def _declare_franka_parameters(self) -> None:
        node = self.node
        low = declare(node, "gripper_grasp_min_width", DEFAULT_GRASP_WINDOW.min_width, "Smallest object width (m) "
                      "a franka_gripper Grasp may end on and count as holding it (gripper_mode franka)",
                      low=0.0, high=FR3_GRIPPER_MAX_WIDTH)
        high = declare(node, "gripper_grasp_max_width", DEFAULT_GRASP_WINDOW.max_width, "Largest object width (m) "
                       "a franka_gripper Grasp may end on and count as holding it (gripper_mode franka)",
                       low=0.0, high=FR3_GRIPPER_MAX_WIDTH)
        try:
            self.window = GraspWindow(low, high)
        except ValueError as exc:
            raise SystemExit(f"gripper_grasp_min_width/max_width: {exc}") from exc
        self.grasp_force = declare(node, "gripper_grasp_force", 40.0, f"franka_gripper Grasp force (N), in "
                                   f"(0, {MAX_GRASP_FORCE:g}]", low=0.0, high=MAX_GRASP_FORCE)
        self.speed = declare(node, "gripper_speed", 0.1, f"franka_gripper Move/Grasp finger speed (m/s), in "
                             f"(0, {MAX_FINGER_SPEED:g}]", low=0.0, high=MAX_FINGER_SPEED)
        if self.grasp_force == 0.0 or self.speed == 0.0:  # (the declared ranges bound the rest)
            raise SystemExit(f"gripper_grasp_force and gripper_speed must be positive, got {self.grasp_force} and "
                             f"{self.speed}")

    def describe(self) -> str:
        if self.mode == "trajectory":
            return f"JointTrajectory on {self.topic}"
        if self.mode == "franka":
            return (f"franka_gripper actions under {self.namespace} (a grasp holds "
                    f"{self.window.min_width * 100:.1f}-{self.window.max_width * 100:.1f} cm)")
        return "disabled"

    def stop(self) -> None:
        """Before a new goal of the executor: forget the hysteresis state and stop a running goal."""
        with self._lock:
            self.hysteresis.reset()
            self._wanted = None
            if self.mode == "franka" and self._active is not None:
                self._request_stop()

    def home(self) -> None:
        """Open the hand: franka_gripper's Homing (which ends fully open), or an open command."""
        with self._lock:
            self.hysteresis.reset()
            if self.mode == "franka":
                self._wanted = HOMING
                self._progress()
            elif self.mode == "trajectory":
                self._publish_width(FR3_GRIPPER_MAX_WIDTH)

    def command(self, width: float) -> None:
        """The policy's width action of this tick."""
        with self._lock:
            change = self.hysteresis.update(width)
            if self.mode == "trajectory" and change is not None:
                self._publish_width(0.0 if change is GripperCommand.CLOSE else FR3_GRIPPER_MAX_WIDTH)
            elif self.mode == "franka":
                if change is not None:
                    self._wanted = change
                self._progress()

    def _publish_width(self, width: float) -> None:
        point = JointTrajectoryPoint(positions=[width * GRIPPER_COMMAND_PER_WIDTH])
        point.time_from_start.nanosec = int(0.5e9)
        self.publisher.publish(JointTrajectory(joint_names=[GRIPPER_COMMAND_JOINT], points=[point]))

    # --- franka_gripper -------------------------------------------------------------------------
    def _progress(self) -> None:
        """Send the wanted goal when no goal runs (and no retry is pending), else stop the running one."""
        if self._active is not None and time.monotonic() - self._active[2] > GOAL_TIMEOUT:
            what, self._active = self._active[0], None
            self._report_failure(f"franka_gripper gave no result for the {_name(what)} goal within "
                                 f"{GOAL_TIMEOUT:g} s; giving it up")
        if self._wanted is None:
            return
        if self._active is not None:
            self._request_stop()  # goals cannot be pre-empted: the wanted one goes when this one ends
        elif time.monotonic() >= self._retry_at:
            self._send_wanted()

    def _request_stop(self) -> None:
        if self._stop_requested:
            return
        if not self.stop_client.service_is_ready():
            self.node.get_logger().error(f"cannot stop the running gripper goal: {self.namespace}/stop is not "
                                         "available; the next goal waits for it to end", throttle_duration_sec=2.0)
            return
        self._stop_requested = True
        self.stop_client.call_async(self.trigger.Request())

    def _send_wanted(self) -> None:
        what = self._wanted
        action = self.franka[what]
        if what is GripperCommand.CLOSE:
            goal = action.Goal(width=self.window.goal_width, speed=self.speed, force=self.grasp_force)
            goal.epsilon.inner = goal.epsilon.outer = self.window.epsilon
        elif what is GripperCommand.OPEN:
            goal = action.Goal(width=FR3_GRIPPER_MAX_WIDTH, speed=self.speed)
        else:
            goal = action.Goal()
        if not self.clients[what].server_is_ready():
            self._not_sent(f"the franka_gripper {_name(what)} action server ({self.namespace}) is not available")
            return
        self._wanted = None
        self._active = [what, None, time.monotonic()]
        self._stop_requested = False
        self._width = float("nan")
        future = self.clients[what].send_goal_async(goal, feedback_callback=self._on_feedback)
        future.add_done_callback(lambda f: self._on_goal_response(f, what))

    def _not_sent(self, reason: str) -> None:
        """A wanted goal that did not run: log it and keep wanting it, tried again after RETRY_PERIOD."""
        self.counters["refused"] += 1
        self.last_failure = reason
        self.node.get_logger().error(f"{reason}; trying again in {RETRY_PERIOD:g} s", throttle_duration_sec=2.0)
        self._retry_at = time.monotonic() + RETRY_PERIOD

    def _report_failure(self, reason: str) -> None:
        self.counters["failed"] += 1
        self.last_failure = reason
        self.node.get_logger().error(reason)

    def _on_goal_response(self, future, what) -> None:
        with self._lock:
            handle = None if future.cancelled() or future.exception() is not None else future.result()
            if self._active is None or self._active[0] is not what:
                return
            if handle is None or not handle.accepted:
                self._active = None
                self._wanted = self._wanted or what
                self._not_sent(f"franka_gripper refused the {_name(what)} goal")
                return
            self._active[1] = handle
            handle.get_result_async().add_done_callback(lambda f: self._on_result(f, what))

    def _on_feedback(self, feedback) -> None:
        self._width = float(feedback.feedback.current_width)

    def _on_result(self, future, what) -> None:
        from action_msgs.msg import GoalStatus

        with self._lock:
            if self._active is None or self._active[0] is not what:
                return
            self._active = None
            response = None if future.cancelled() or future.exception() is not None else future.result()
            if response is not None and response.status == GoalStatus.STATUS_SUCCEEDED and response.result.success:
                self.counters["succeeded"] += 1
            else:
                error = response.result.error if response is not None else "no result"
                reason = f"franka_gripper {_name(what)} failed" + (f": {error}" if error else "")
                if what is GripperCommand.CLOSE and not error:
                    reason += (f" (the fingers stopped at {self._width * 100:.1f} cm, outside the grasp window "
                               f"{self.window.min_width * 100:.1f}-{self.window.max_width * 100:.1f} cm: nothing, "
                               "or another object, is held)")
                if self._stop_requested:  # ended by our own stop: expected
                    self.node.get_logger().info(f"{reason} (stopped for the next goal)")
                else:
                    self._report_failure(reason)
            self._progress()


def _name(what) -> str:
    """The franka_gripper action behind a wanted goal."""
    return {GripperCommand.CLOSE: "grasp", GripperCommand.OPEN: "move"}.get(what, HOMING)
