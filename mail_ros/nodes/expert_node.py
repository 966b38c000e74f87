"""expert_node: the scripted expert driving the robot through the topics a policy's executor uses.

Reads /joint_states; once per policy period (on the first joint state whose stamp reaches the
next tick, so ticks follow simulated time exactly) it asks :class:`~mail_ros.sim.expert.ScriptedExpert`
for arm targets and a gripper width and sends them as the executor would:

- /fr3_arm_controller/joint_trajectory: a one-point JointTrajectory reaching the target one
  period after the stamp of the joint state it answers (stamped with it, so the controller and
  the bag converter place it at the same time), with optional Gaussian noise on the EXECUTED
  target (``noise_std``, radians) and optional detours of the executed goals above a cube
  (``detour``, metres; see :mod:`mail_ros.sim.expert`) so demonstrations show recoveries;
- /fr3_gripper/joint_trajectory: fr3_finger_joint1 = width / 2, sent when the width changes.

The clean intent is published alongside, for recording: /mail/expert/arm_target (same stamp and
timing, without the noise) and /mail/expert/gripper_target (one joint ``fr3_gripper_width`` in
metres, every tick: the gripper command format :mod:`mail_ros.data.bags` reads). Convert such
bags with ``--arm-command-topic /mail/expert/arm_target --gripper-command-topic
/mail/expert/gripper_target``.

Privileged input: the cube poses come from the simulator object itself (``privileged``, e.g.
:meth:`FrankaSimNode.privileged_state` in the same process), never from a topic: a policy has no
such input, and a topic would invite a deployment to depend on it. Hence no ``main``: the node
lives in the process that owns the simulator (``mail-ros collect``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from std_msgs.msg import Header
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from mail_ros.nodes.common import COMMAND_QOS, declare, seconds_to_duration, seconds_to_stamp, stamp_to_seconds
from mail_ros.sim.expert import ExpertConfig, ExpertObservation, ScriptedExpert
from mail_ros.sim.franka_sim import CubePose
from mail_ros.sim.tasks import Task
from mail_ros.spec import (FR3_ARM_JOINTS, FR3_FINGER_JOINTS, GRIPPER_ACTION_NAME, GRIPPER_COMMAND_JOINT,
                           GRIPPER_COMMAND_PER_WIDTH)

__all__ = ["ARM_TARGET_TOPIC", "GRIPPER_TARGET_TOPIC", "ExpertNode", "PrivilegedState"]

ARM_TARGET_TOPIC = "/mail/expert/arm_target"
GRIPPER_TARGET_TOPIC = "/mail/expert/gripper_target"

# (ROS time now in seconds, cube poses by colour), read from the simulator.
PrivilegedState = Callable[[], tuple[float, dict[str, CubePose]]]


class ExpertNode(Node):
    """Runs one expert episode at a time: :meth:`start` it, then watch :attr:`done` / :attr:`steps`."""

    def __init__(self, privileged: PrivilegedState, model=None, **kwargs):
        super().__init__("expert_node", **kwargs)
        rate = declare(self, "rate_hz", 10.0, "Expert decisions per second of ROS time (the policy rate)",
                       low=0.0)
        noise_std = declare(self, "noise_std", 0.0, "Std (rad) of Gaussian noise on the executed, not the "
                            "recorded, arm targets", low=0.0)
        detour = declare(self, "detour", 0.0, "Radius (m) of the random horizontal offset of the executed, not the "
                         "recorded, goals above a cube (approach, carry), so demonstrations show the hand "
                         "corrected back over the cube", low=0.0)
        grasp_height = declare(self, "grasp_height", 0.0, "Height (m) of the grasp point above the cube's centre")
        retreat = declare(self, "retreat", False, "Stack: lift the open hand after the release (otherwise the "
                          "episode ends when the fingers have opened)")
        self.seed = declare(self, "seed", 0, "Seed of the execution noise and detours (combined with the episode number)",
                            low=0)
        config = ExpertConfig(rate_hz=rate, detour=detour, grasp_height=grasp_height, noise_std=noise_std,
                              retreat=retreat)
        self.expert = ScriptedExpert(config, model=model)
        self.period = config.period
        self.privileged = privileged
        self._lock = threading.Lock()
        self._task: Task | None = None
        self._not_before = 0.0
        self._next_tick: float | None = None
        self._width: float | None = None
        self._episode = 0
        self._rng = np.random.default_rng(self.seed)
        self.steps = 0
        self.done = False

        self.arm_publisher = self.create_publisher(JointTrajectory, "/fr3_arm_controller/joint_trajectory",
                                                   COMMAND_QOS)
        self.gripper_publisher = self.create_publisher(JointTrajectory, "/fr3_gripper/joint_trajectory", COMMAND_QOS)
        self.arm_target_publisher = self.create_publisher(JointTrajectory, ARM_TARGET_TOPIC, COMMAND_QOS)
        self.gripper_target_publisher = self.create_publisher(JointTrajectory, GRIPPER_TARGET_TOPIC, COMMAND_QOS)
        self.create_subscription(JointState, "/joint_states", self._on_joint_state, qos_profile_sensor_data)

    def start(self, task: Task) -> None:
        """Begin ``task`` from the next joint state stamped after now (the simulator's present)."""
        now, _ = self.privileged()
        with self._lock:
            self._task = task
            self._not_before = now
            self._next_tick = None
            self._width = None
            self._episode += 1
            self._rng = np.random.default_rng([self.seed, self._episode])
            self.steps = 0
            self.done = False

    def stop(self) -> None:
        """Send nothing more until the next :meth:`start`."""
        with self._lock:
            self._task = None

    def _on_joint_state(self, msg: JointState) -> None:
        stamp = stamp_to_seconds(msg.header.stamp)
        index = {name: i for i, name in enumerate(msg.name)}
        names = FR3_ARM_JOINTS + FR3_FINGER_JOINTS
        if any(name not in index for name in names):
            self.get_logger().error(f"joint state lacks some of {list(names)}", throttle_duration_sec=2.0)
            return
        with self._lock:
            if self._task is None or self.done or stamp < self._not_before:
                return
            if self._next_tick is not None and stamp + 1e-9 < self._next_tick:
                return
            positions = np.array([msg.position[index[name]] for name in names])  # (9,)
            _, cubes = self.privileged()
            observation = ExpertObservation(positions, cubes)
            if self._next_tick is None:
                self.expert.reset(self._task, observation, self._rng)
                self._next_tick = stamp
            arm, width, executed = self.expert.act(observation)
            # Behind by more than a period (a starved process): skip the missed ticks rather
            # than firing them back to back on the same state.
            self._next_tick = max(self._next_tick + self.period, stamp + 0.5 * self.period)
            self.steps += 1
            self.done = self.expert.done
            send_gripper = width != self._width
            self._width = width
        header = Header(stamp=seconds_to_stamp(stamp))
        self.arm_publisher.publish(self._trajectory(header, FR3_ARM_JOINTS, executed))
        self.arm_target_publisher.publish(self._trajectory(header, FR3_ARM_JOINTS, arm))
        self.gripper_target_publisher.publish(self._trajectory(header, (GRIPPER_ACTION_NAME,), [width]))
        if send_gripper:
            self.gripper_publisher.publish(self._trajectory(Header(), (GRIPPER_COMMAND_JOINT,), [width * GRIPPER_COMMAND_PER_WIDTH]))

    def _trajectory(self, header: Header, joints, positions) -> JointTrajectory:
        point = JointTrajectoryPoint(positions=[float(v) for v in positions], time_from_start=seconds_to_duration(self.period))
        return JointTrajectory(header=header, joint_names=list(joints), points=[point])
