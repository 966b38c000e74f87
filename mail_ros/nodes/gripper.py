"""Gripper output of the executor: franka_gripper actions when franka_msgs is installed, else a
JointTrajectory for a position-controlled gripper (the simulator, or a JTC on the fingers)."""

from __future__ import annotations

from rclpy.node import Node
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from mail_ros.control.gripper import GripperCommand, GripperHysteresis
from mail_ros.nodes.common import COMMAND_QOS
from mail_ros.spec import FR3_GRIPPER_MAX_WIDTH, GRIPPER_COMMAND_JOINT, GRIPPER_COMMAND_PER_WIDTH


class GripperBridge:
    def __init__(self, node: Node, mode: str, topic: str, action_namespace: str, close_below: float,
                 open_above: float, grasp_force: float = 40.0, speed: float = 0.1):
        self.node = node
        self.hysteresis = GripperHysteresis(close_below, open_above)
        self.grasp_force = grasp_force
        self.speed = speed
        self._pending = None  # franka goal handle future of the last goal
        if mode not in ("auto", "franka", "trajectory", "none"):
            raise SystemExit(f"gripper_mode must be auto, franka, trajectory or none, got {mode!r}")
        self.franka = None
        if mode in ("auto", "franka"):
            try:
                from franka_msgs.action import Grasp, Move
                from rclpy.action import ActionClient
                from std_srvs.srv import Trigger
            except ImportError as exc:
                if mode == "franka":
                    raise SystemExit("gripper_mode 'franka' needs the franka_msgs package (franka_ros2), which "
                                     f"is not installed: {exc}") from exc
                mode = "trajectory"
            else:
                self.franka = (Move, Grasp)
                self.move_client = ActionClient(node, Move, f"{action_namespace}/move")
                self.grasp_client = ActionClient(node, Grasp, f"{action_namespace}/grasp")
                self.stop_client = node.create_client(Trigger, f"{action_namespace}/stop")
                mode = "franka"
        self.mode = mode
        if mode == "trajectory":
            self.publisher = node.create_publisher(JointTrajectory, topic, COMMAND_QOS)
            self.topic = topic

    def describe(self) -> str:
        if self.mode == "trajectory":
            return f"JointTrajectory on {self.topic}"
        return {"franka": "franka_gripper move/grasp actions", "none": "disabled"}[self.mode]

    def stop(self) -> None:
        """Before a new goal: forget the hysteresis state and stop a running franka goal."""
        self.hysteresis.reset()
        if self.mode == "franka" and self.stop_client.service_is_ready():
            from std_srvs.srv import Trigger

            self.stop_client.call_async(Trigger.Request())

    def command(self, width: float) -> None:
        change = self.hysteresis.update(width)
        if change is None or self.mode == "none":
            return
        target = 0.0 if change is GripperCommand.CLOSE else FR3_GRIPPER_MAX_WIDTH
        if self.mode == "trajectory":
            point = JointTrajectoryPoint(positions=[target * GRIPPER_COMMAND_PER_WIDTH])
            point.time_from_start.nanosec = int(0.5e9)
            self.publisher.publish(JointTrajectory(joint_names=[GRIPPER_COMMAND_JOINT], points=[point]))
            return
        self._send_franka(change, target)

    def _send_franka(self, change: GripperCommand, target: float) -> None:
        Move, Grasp = self.franka
        # franka_gripper goals block and cannot be pre-empted: stop the running one first.
        self.stop()
        self.hysteresis.state = change
        if change is GripperCommand.CLOSE:
            goal = Grasp.Goal(width=0.0, speed=self.speed, force=self.grasp_force)
            goal.epsilon.inner = goal.epsilon.outer = FR3_GRIPPER_MAX_WIDTH
            client = self.grasp_client
        else:
            goal = Move.Goal(width=target, speed=self.speed)
            client = self.move_client
        if not client.server_is_ready():
            self.node.get_logger().error(f"franka_gripper {change.value} action server is not available",
                                         throttle_duration_sec=2.0)
            self.hysteresis.reset()  # not sent: the next tick that still wants it tries again
            return
        self._pending = client.send_goal_async(goal)
        self._pending.add_done_callback(lambda future: self._on_goal_response(future, change))

    def _on_goal_response(self, future, change: GripperCommand) -> None:
        handle = None if future.exception() is not None else future.result()
        if handle is None or not handle.accepted:
            self.node.get_logger().error(f"franka_gripper refused the {change.value} goal", throttle_duration_sec=2.0)
            if self.hysteresis.state is change:
                self.hysteresis.reset()
