"""franka_sim_node: the MuJoCo FR3 test bed behind franka_ros2's interface.

Publishes /joint_states (fr3_joint1..7 + fingers) and /cameras/<name>/image_raw at their rates
with stamps of the simulated time, accepts /fr3_arm_controller/joint_trajectory with joint
trajectory controller semantics (invalid trajectories are rejected with a log; the arm holds),
a gripper JointTrajectory (fr3_finger_joint1 = half the opening width), and offers ~/reset and
~/task_success (std_srvs/Trigger; the task is the latest /mail/instruction; the message is
"success" or the stage the task is stuck at, e.g. "off target: 3.1 cm from the blue cube's centre, ...").

Judging instructions outside the test bed's grammar (paraphrases such as "lift the red block"):
a test-bed instruction on ~/task (std_msgs/String) names the task to judge until the next
~/reset, whatever /mail/instruction says. In-process tools with privileged access (the scripted
expert of ``mail-ros collect``) read the cube poses with :meth:`FrankaSimNode.privileged_state`.

Time: with publish_clock:=true the simulator owns ROS time: it publishes /clock and runs as fast
as real_time_factor allows (0 = as fast as the CPU goes); every other node then runs with
use_sim_time:=true. Without it, it runs in real time and stamps with the node clock.
"""

from __future__ import annotations

import array
import threading
import time

from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Header, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from mail_ros.nodes.common import COMMAND_QOS, GOAL_QOS, OK, WARN, Diagnostics, declare, run_node, seconds_to_stamp, stamp_to_seconds
from mail_ros.sim import CAMERA_SIZE
from mail_ros.sim.franka_sim import CubePose, FrankaSim, SimConfig, SimError
from mail_ros.sim.jtc import TrajectoryRejected
from mail_ros.sim.tasks import Task, TaskError
from mail_ros.spec import GRIPPER_COMMAND_JOINT, GRIPPER_COMMAND_PER_WIDTH
from mail_ros.sync.image import rgb_to_image_fields

# Simulated time starts here rather than at 0, so stamps are never the "unset" zero stamp.
CLOCK_EPOCH = 1000.0


class FrankaSimNode(Node):
    def __init__(self, **kwargs):
        super().__init__("franka_sim_node", **kwargs)
        self.seed = declare(self, "seed", 0, "Seed of the first episode's cube layout; each reset uses the next")
        self.camera_rate = declare(self, "camera_rate_hz", 20.0, "Camera publish rate (simulated time)")
        self.joint_rate = declare(self, "joint_state_rate_hz", 100.0, "Joint state publish rate (simulated time)")
        self.publish_clock = declare(self, "publish_clock", False, "Own ROS time: publish /clock from the simulation")
        self.real_time_factor = declare(self, "real_time_factor", 1.0, "Simulated seconds per wall second with "
                                        "publish_clock (0 = as fast as possible); 1 without it")
        cameras = declare(self, "cameras", ["agentview", "wrist"], "Cameras to render and publish")
        height = declare(self, "image_height", CAMERA_SIZE[0], "Rendered image height")
        width = declare(self, "image_width", CAMERA_SIZE[1], "Rendered image width")
        self.step_period = declare(self, "physics_period", 0.01, "Simulated seconds advanced per loop iteration")
        self.sim = FrankaSim(SimConfig(cameras=tuple(cameras), image_size=(height, width)))
        self.sim.reset(self.seed)
        self.episode_seed = self.seed
        self.task: Task | None = None
        self.judged_task: Task | None = None  # from ~/task, overrides `task` until the next reset
        self.rejected = 0
        # How late (s) each stamped arm command was applied: a command applied later than the
        # executor's command_latency after its stamp makes the setpoint jump.
        self.command_delays: list[float] = []
        self._lock = threading.Lock()
        self._running = True
        self._was_reset = False
        # Simulated time of the current episode starts at epoch_offset (monotonic across resets).
        self.epoch_offset = CLOCK_EPOCH if self.publish_clock else 0.0

        self.diagnostics = Diagnostics(self)
        self.joint_publisher = self.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
        self.image_publishers = {
            c: self.create_publisher(Image, f"/cameras/{c}/image_raw", qos_profile_sensor_data) for c in cameras}
        self.clock_publisher = self.create_publisher(Clock, "/clock", 10) if self.publish_clock else None
        self.create_subscription(JointTrajectory, "/fr3_arm_controller/joint_trajectory", self._on_arm, COMMAND_QOS)
        self.create_subscription(JointTrajectory, "/fr3_gripper/joint_trajectory", self._on_gripper, COMMAND_QOS)
        self.create_subscription(String, "/mail/instruction", self._on_instruction, GOAL_QOS)
        self.create_subscription(String, "~/task", self._on_task, GOAL_QOS)
        self.create_service(Trigger, "~/reset", self._on_reset)
        self.create_service(Trigger, "~/task_success", self._on_task_success)
        self._thread = threading.Thread(target=self._loop, name="franka_sim", daemon=True)
        self._thread.start()
        self.get_logger().info(f"simulated FR3 with cameras {list(cameras)} at {self.camera_rate:g} Hz, "
                               f"{'owning /clock' if self.publish_clock else 'real time'}, seed {self.seed}")

    # --- time -----------------------------------------------------------------------------------
    def now(self) -> float:
        """ROS time of the simulation's present, in seconds."""
        if self.publish_clock:
            return self.epoch_offset + self.sim.time
        return self.get_clock().now().nanoseconds * 1e-9

    def _loop(self) -> None:
        next_camera = next_joint = 0.0
        wall_start, sim_start = time.monotonic(), self.sim.time
        while self._running:
            with self._lock:
                if self._was_reset:  # a new episode: restart the publishing schedule and the pacing
                    self._was_reset = False
                    next_camera = next_joint = 0.0
                    wall_start, sim_start = time.monotonic(), self.sim.time
                self.sim.step(self.step_period)
                sim_time = self.sim.time
                if self.clock_publisher is not None:
                    self.clock_publisher.publish(Clock(clock=seconds_to_stamp(self.now())))
                if sim_time + 1e-9 >= next_joint:
                    self._publish_joint_state()
                    next_joint = sim_time + 1.0 / self.joint_rate
                if sim_time + 1e-9 >= next_camera:
                    self._publish_images()
                    next_camera = sim_time + 1.0 / self.camera_rate
            factor = self.real_time_factor if self.publish_clock else 1.0
            if factor > 0:
                ahead = (sim_time - sim_start) / factor - (time.monotonic() - wall_start)
                if ahead > 0:
                    time.sleep(ahead)
        # The OpenGL context is current on this thread: release it here, not from another thread.
        self.sim.close()

    def _header(self, frame_id: str = "") -> Header:
        return Header(stamp=seconds_to_stamp(self.now()), frame_id=frame_id)

    def _publish_joint_state(self) -> None:
        names, positions, velocities = self.sim.joint_state()
        self.joint_publisher.publish(JointState(
            header=self._header("base"), name=list(names), position=positions.tolist(),
            velocity=velocities.tolist(), effort=[0.0] * len(names)))

    def _publish_images(self) -> None:
        header = self._header()
        for camera, rgb in self.sim.render().items():
            fields = rgb_to_image_fields(rgb)
            msg = Image(header=Header(stamp=header.stamp, frame_id=camera), height=fields["height"],
                        width=fields["width"], encoding=fields["encoding"], is_bigendian=0, step=fields["step"])
            msg.data = array.array("B", fields["data"])
            self.image_publishers[camera].publish(msg)

    # --- commands -------------------------------------------------------------------------------
    def _on_arm(self, msg: JointTrajectory) -> None:
        # A point carries velocities (accelerations) when the list is not empty, as for JTC.
        points = [(stamp_to_seconds(p.time_from_start), list(p.positions))
                  + ((list(p.velocities),) if len(p.velocities) else ())
                  + ((list(p.accelerations),) if len(p.accelerations) and len(p.velocities) else ())
                  for p in msg.points]
        stamp = stamp_to_seconds(msg.header.stamp)
        with self._lock:
            # A zero stamp means "start now", as for ros2_controllers' JTC.
            start = None if stamp == 0.0 else stamp - (self.now() - self.sim.time)
            if stamp != 0.0:
                self.command_delays.append(self.now() - stamp)
            try:
                self.sim.set_trajectory(list(msg.joint_names), points, start_time=start)
            except TrajectoryRejected as exc:
                self.rejected += 1
                self.get_logger().error(f"rejected arm trajectory: {exc}", throttle_duration_sec=1.0)
                self.diagnostics.set(WARN, f"rejected arm trajectory: {exc}", rejected=self.rejected)

    def _on_gripper(self, msg: JointTrajectory) -> None:
        if list(msg.joint_names) != [GRIPPER_COMMAND_JOINT] or not msg.points or len(msg.points[-1].positions) != 1:
            self.get_logger().error(f"rejected gripper trajectory: expected one joint {GRIPPER_COMMAND_JOINT!r} with "
                                    f"positions, got {list(msg.joint_names)}")
            return
        width = msg.points[-1].positions[0] / GRIPPER_COMMAND_PER_WIDTH
        with self._lock:
            try:
                if width < 0.5 * self.sim.gripper_width():
                    self.sim.grasp()
                else:
                    self.sim.set_gripper(width)
            except SimError as exc:
                self.get_logger().error(f"rejected gripper command: {exc}")

    def _on_instruction(self, msg: String) -> None:
        try:
            self.task = Task.parse(msg.data)
        except TaskError as exc:
            self.task = None
            self.get_logger().warning(f"instruction is not a test-bed task (success cannot be judged): {exc}")

    def _on_task(self, msg: String) -> None:
        try:
            self.judged_task = Task.parse(msg.data)
        except TaskError as exc:
            self.get_logger().error(f"ignoring ~/task: {exc}")

    def privileged_state(self) -> tuple[float, dict[str, CubePose]]:
        """(ROS time of the present in seconds, cube poses): ground truth no real robot provides."""
        with self._lock:
            return self.now(), self.sim.cube_poses()

    def _on_reset(self, request, response):
        with self._lock:
            self.judged_task = None
            if self.publish_clock:
                # ROS time keeps going forward across episodes (with a 1 s gap between them).
                self.epoch_offset += self.sim.time + 1.0
            self.episode_seed += 1
            self.sim.reset(self.episode_seed)
            self._was_reset = True
        response.success, response.message = True, f"reset with seed {self.episode_seed}"
        self.diagnostics.set(OK, f"episode seed {self.episode_seed}")
        return response

    def _on_task_success(self, request, response):
        task = self.judged_task or self.task
        if task is None:
            response.success, response.message = False, "no test-bed task: publish /mail/instruction first"
            return response
        with self._lock:
            progress = self.sim.task_progress(task)
        # "success", or the stage the task is stuck at ("off target: 3.1 cm from ..."; see TaskProgress).
        response.success, response.message = progress.success, progress.message
        return response

    def destroy_node(self):
        self._running = False
        self._thread.join(timeout=5.0)
        return super().destroy_node()


def main(argv=None) -> int:
    return run_node(FrankaSimNode, argv)


if __name__ == "__main__":
    raise SystemExit(main())
