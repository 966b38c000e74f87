"""executor_node: /mail/action_chunk -> FR3 joint trajectory controller (and the gripper).

A thin adapter over the control core (mail_ros.control.executor.ExecutorCore), which makes every
decision: parameters, QoS, message conversions, a control timer and one ``tick`` call. Each tick
may send a JointTrajectory of points with positions, velocities and accelerations (smooth at the
controller's 1 kHz; see the core's docstring) and a gripper command. The arm's controller must
join new trajectories from its desired state (config/fr3_controllers.yaml).

Joint states are used only through the robot-state gate and must be stamped; chunks and joint
states stamped ahead of the node clock by more than ``max_clock_skew`` are refused. Every
default below is the core's (ExecutorConfig, SafetyConfig); config/pipeline.yaml repeats them.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from mail_ros.control.executor import Command, ExecutorConfig, ExecutorCore
from mail_ros.control.gripper import CLOSE_BELOW, OPEN_ABOVE
from mail_ros.control.safety import SafetyConfig, SafetyError, Verdict
from mail_ros.msg import ActionChunk, InstructionEmbedding
from mail_ros.nodes.common import (COMMAND_QOS, ERROR, GOAL_QOS, OK, PIPELINE_QOS, WARN, Diagnostics, declare,
                                   now_seconds, run_node, seconds_to_duration, seconds_to_stamp, stamp_to_seconds)
from mail_ros.nodes.gripper import GripperBridge
from mail_ros.nodes.homing import HomingFailed, MoveItHoming
from mail_ros.spec import FR3_GRIPPER_MAX_WIDTH

LEVELS = {0: OK, 1: WARN, 2: ERROR}

# ExecutorConfig's fields: (description, low, high). ROS ranges are inclusive; the core refuses 0
# where a value must be positive.
CORE_PARAMETERS = {
    "mode": ("Chunk execution: receding_horizon, temporal_ensemble or latency_compensation", None, None),
    "execute_steps": ("Receding horizon: actions executed per chunk before switching to the next (0 = the whole "
                      "chunk, MaIL's default)", 0, None),
    "ensemble_decay": ("Temporal ensembling weight decay m in exp(-m*i)", 0.0, None),
    "interpolation": ("Between action due times: linear (blend towards the next action) or hold", None, None),
    "max_chunk_age": ("Chunks whose newest observation is older than this (s) are discarded", 0.0, None),
    "max_clock_skew": ("Chunks and joint states stamped further than this (s) ahead of the node clock are "
                       "refused: the clocks disagree", 0.0, None),
    "max_chunk_span": ("Chunks whose executed actions span more than this (s) are refused (e.g. a dt sent in ms)",
                       0.0, None),
    "max_tracking_error": ("Stop commanding when a joint is farther than this (rad) from the controller's "
                           "setpoint: the arm is not following; resume from the setpoint once it is near again",
                           0.0, None),
    "control_rate_hz": ("Control tick rate (JointTrajectory messages per second)", 0.0, None),
    "home_position": ("Joint positions (rad) of the homing pose, inside the margined position limits", None, None),
    "knot_spacing": ("Time (s) between the points of a command (each piece between them has constant jerk)",
                     0.0, None),
    "command_latency": ("Largest delay (s) until the controller applies a command for which the setpoint stays "
                        "exactly smooth", 0.0, None),
}
# SafetyConfig's fields: (description, low, high).
SAFETY_PARAMETERS = {
    "position_margin": ("Clearance (rad) kept from each joint limit", 0.0, None),
    "velocity_scale": ("Fraction of the FR3 velocity limits used", 0.0, 1.0),
    "acceleration_scale": ("Fraction of the FR3 acceleration limits used", 0.0, 1.0),
    "jerk_scale": ("Fraction of the FR3 jerk limits used", 0.0, 1.0),
    "max_step_delta": ("Largest joint motion (rad) per control tick (a speed limit of max_step_delta * "
                       "control_rate_hz)", 0.0, None),
    "chunk_timeout": ("Hold when no fresh chunk arrived for this long (s)", 0.0, None),
    "joint_state_timeout": ("Stop commanding when /joint_states is older than this (s)", 0.0, None),
    "ramp_speed": ("Ramp speed as a fraction of the margined velocity limits (acceleration and jerk keep the margined limits)", 0.0, 1.0),
    "ramp_min_duration": ("Shortest ramp (s)", 0.0, None),
    "ramp_distance": ("Ramp first when the target is farther than this (rad) from the setpoint", 0.0, None),
}


def _default(config: ExecutorConfig | SafetyConfig, name: str):
    value = getattr(config, name)
    return list(value) if isinstance(value, tuple) else value  # a ROS array parameter is a list


class ExecutorNode(Node):
    def __init__(self, **kwargs):
        super().__init__("executor_node", **kwargs)
        core, safe = ExecutorConfig(), SafetyConfig()  # the defaults
        self.enabled = declare(self, "enabled", True, "Send commands to the robot at all (false for replays); "
                               "can be changed at run time")
        # The core's settings, declared with the core's defaults (None: unbounded on that side).
        config = {name: declare(self, name, _default(core, name), description, low=low, high=high)
                  for name, (description, low, high) in CORE_PARAMETERS.items()}
        safety = {name: declare(self, name, _default(safe, name), description, low=low, high=high)
                  for name, (description, low, high) in SAFETY_PARAMETERS.items()}
        self.command_topic = declare(self, "command_topic", "/fr3_arm_controller/joint_trajectory",
                                     "JointTrajectory topic of the arm's joint trajectory controller")
        gripper_mode = declare(self, "gripper_mode", "auto", "Gripper output: franka (franka_gripper Move/Grasp "
                               "actions), trajectory (JointTrajectory on gripper_topic), none, or auto (franka "
                               "when franka_msgs imports, else trajectory)")
        gripper_topic = declare(self, "gripper_topic", "/fr3_gripper/joint_trajectory",
                                "Gripper JointTrajectory topic (gripper_mode trajectory)")
        gripper_action_ns = declare(self, "gripper_action_namespace", "/franka_gripper",
                                    "Namespace of franka_gripper's move/grasp actions")
        close_below = declare(self, "gripper_close_below", CLOSE_BELOW, "Close (grasp) when the commanded width drops "
                              "below this (m)", low=0.0, high=FR3_GRIPPER_MAX_WIDTH)
        open_above = declare(self, "gripper_open_above", OPEN_ABOVE, "Open when the commanded width rises above this (m)",
                             low=0.0, high=FR3_GRIPPER_MAX_WIDTH)
        self.homing = MoveItHoming(
            declare(self, "moveit_group", "fr3_arm", "MoveIt planning group used for homing with moveit_py"),
            declare(self, "moveit_config_file", "", "YAML file of MoveItPy's config_dict (robot description, SRDF, "
                    "kinematics, planning pipeline, controllers) for homing with moveit_py; '' = min-jerk homing"))
        self._homing_thread: threading.Thread | None = None
        self.homing_result = ""  # how the last moveit_py homing ended (also logged)
        self.diagnostics = Diagnostics(self)
        self.gripper = GripperBridge(self, gripper_mode, gripper_topic, gripper_action_ns, close_below, open_above)
        try:
            self.core = ExecutorCore(ExecutorConfig(**config), SafetyConfig(**safety),
                                     gripper=self.gripper.mode != "none")
        except (SafetyError, ValueError) as exc:
            raise SystemExit(f"executor_node: {exc}") from exc
        self.core.set_enabled(self.enabled)
        self.period = self.core.config.period
        self.arm_joints = self.core.arm_joints
        self.home = self.core.home
        self.tick_times: deque[float] = deque(maxlen=500)

        self.publisher = self.create_publisher(JointTrajectory, self.command_topic, COMMAND_QOS)
        self.create_subscription(JointState, "/joint_states", self._on_joint_state, qos_profile_sensor_data)
        self.create_subscription(ActionChunk, "mail/action_chunk", self._on_chunk, PIPELINE_QOS)
        self.create_subscription(InstructionEmbedding, "mail/instruction_embedding", self._on_goal, GOAL_QOS)
        self.create_service(Trigger, "~/home", self._on_home)
        self.add_on_set_parameters_callback(self._on_parameters)
        self.create_timer(self.period, self._tick)
        self.create_timer(1.0, self._report)
        self.get_logger().info(f"executing chunks in {self.core.config.mode} mode at "
                               f"{self.core.config.control_rate_hz:g} Hz on {self.command_topic}; "
                               f"gripper: {self.gripper.describe()}; enabled={self.enabled}")

    # The core's state, for tests and tools.
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def goal_id(self) -> str | None:
        return self.core.goal_id

    @property
    def measured(self) -> np.ndarray | None:
        return self.core.measured

    @property
    def counters(self) -> dict[str, int]:
        return self.core.counters

    # --- inputs ---------------------------------------------------------------------------------
    def _on_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name == "enabled":
                if bool(param.value) == self.enabled:
                    continue  # re-asserting the current state must not interrupt a motion
                self.enabled = bool(param.value)
                self.core.set_enabled(self.enabled)
                self.diagnostics.set(WARN, "disabled" if not self.enabled else "enabled: waiting to ramp in")
            elif param.name not in ("use_sim_time",):
                return SetParametersResult(successful=False, reason=f"{param.name} cannot change at run time")
        return SetParametersResult(successful=True)

    def _on_joint_state(self, msg: JointState) -> None:
        problem = self.core.joint_state(now_seconds(self), stamp_to_seconds(msg.header.stamp), list(msg.name),
                                        list(msg.position))
        if problem:
            self.get_logger().error(f"ignoring joint state: {problem}", throttle_duration_sec=2.0)

    def _on_goal(self, msg: InstructionEmbedding) -> None:
        if self.core.goal(goal_id(msg.text, msg.header.stamp), now_seconds(self)):
            self.gripper.stop()
            self.get_logger().info(f"new goal {msg.text!r}: old chunks discarded")
            # At once, not at the next report: an operator waits for the executor to hold the goal.
            self.diagnostics.set(self.diagnostics.level, self.diagnostics.message, goal=self.core.goal_id)
            self.diagnostics.publish()

    def _on_chunk(self, msg: ActionChunk) -> None:
        names = list(msg.names)
        if msg.horizon == 0 or len(msg.actions) != msg.horizon * len(names):
            problem = f"chunk {msg.chunk_id}: malformed: {len(msg.actions)} values for horizon {msg.horizon} " \
                      f"and names {names}"
            self.core.counters["chunks_rejected"] += 1
        else:
            problem = self.core.chunk(
                now_seconds(self), chunk_id=msg.chunk_id, stamp=stamp_to_seconds(msg.header.stamp), dt=float(msg.dt),
                names=names, actions=np.asarray(msg.actions, dtype=np.float64).reshape(msg.horizon, len(names)),
                instruction_id=goal_id(msg.instruction, msg.instruction_stamp), action_space=msg.action_space)
        if problem:
            self.get_logger().warning(f"rejected {problem} (goal {msg.instruction!r})", throttle_duration_sec=2.0)

    def _on_home(self, request, response):
        decision = self.core.watchdog.decide(now_seconds(self), self.count_publishers(self.command_topic))
        refusal = ""
        # The parameter, not self.enabled: homing itself pauses the executor, and may be repeated.
        if not self.get_parameter("enabled").value:
            refusal = "the executor is disabled (enabled:=false), so it sends no commands at all"
        elif self.measured is None:
            refusal = "no joint state received"
        elif decision.verdict is Verdict.STOP:
            refusal = decision.reason
        if refusal:
            response.success, response.message = False, f"not homing: {refusal}"
            self.get_logger().error(response.message)
            return response
        if self.homing.configured:
            if self._homing_thread is not None and self._homing_thread.is_alive():
                response.success, response.message = False, "not homing: homing with moveit_py is under way"
                return response
            # MoveIt plans and executes for seconds: on a thread of its own, while this node's
            # callbacks go on (joint states stay fresh for a fallback); ticks pause until re-enabled.
            self.enabled = False
            self._stop_commanding("homing")
            self.gripper.home()
            self._homing_thread = threading.Thread(target=self._home_with_moveit, name="moveit_homing", daemon=True)
            self._homing_thread.start()
            response.success = True
            response.message = ("homing with moveit_py (the min-jerk trajectory if it fails; see the log); executor "
                                "paused until 'enabled' is set again")
            return response
        try:
            points = self._homing_trajectory()
        except SafetyError as exc:
            response.success, response.message = False, f"not homing: {exc}"
            self.get_logger().error(response.message)
            return response
        self.enabled = False
        self._stop_commanding("homing")
        self.gripper.home()
        self._publish(points)
        response.success = True
        response.message = (f"min-jerk homing ({self.homing.unavailable_reason}) over {points.times[-1]:.1f} s; "
                            "executor paused until 'enabled' is set again")
        return response

    def _home_with_moveit(self) -> None:
        """The moveit_homing thread: moveit_py, or the min-jerk trajectory from the measured state."""
        try:
            self.homing.home(self.home)
        except HomingFailed as exc:
            reason = str(exc)
        else:
            self.homing_result = "homed with moveit_py"
            self.get_logger().info(self.homing_result)
            return
        decision = self.core.watchdog.decide(now_seconds(self), self.count_publishers(self.command_topic))
        if self.enabled:
            self.homing_result = f"moveit_py failed ({reason}); not falling back: the executor was re-enabled"
        elif decision.verdict is Verdict.STOP:
            self.homing_result = f"moveit_py failed ({reason}); not falling back: {decision.reason}"
        else:
            try:
                # Not commanding since homing began, so from the measured state, at rest by now.
                points = self._homing_trajectory()
            except SafetyError as exc:
                self.homing_result = f"moveit_py failed ({reason}); not falling back: {exc}"
            else:
                if not self.context.ok():
                    return  # shut down while MoveIt ran: nothing may be published any more
                self._publish(points)
                self.homing_result = (f"moveit_py failed ({reason}); homing with a {points.times[-1]:.1f} s "
                                      "min-jerk trajectory instead")
                self.get_logger().warning(self.homing_result)
                return
        self.get_logger().error(self.homing_result)

    def _homing_trajectory(self) -> Command:
        """Brake the commanded motion to rest, then a min-jerk motion home (the core plans it)."""
        return self.core.homing(now_seconds(self))

    def _stop_commanding(self, reason: str) -> None:
        self.core.set_enabled(self.enabled)
        self.diagnostics.set(WARN, reason)

    # --- control tick ---------------------------------------------------------------------------
    def _tick(self) -> None:
        self.tick_times.append(time.monotonic())
        result = self.core.tick(now_seconds(self), self.count_publishers(self.command_topic))
        for level, line in result.log:
            # (rclpy forbids one call site logging at two severities, hence three calls)
            if level == 0:
                self.get_logger().info(line)
            elif level == 1:
                self.get_logger().warning(line)
            else:
                self.get_logger().error(line, throttle_duration_sec=2.0)
        if result.command is not None:
            self._publish(result.command)
        if result.gripper_width is not None:
            self.gripper.command(result.gripper_width)
        self.diagnostics.set(LEVELS[result.level], result.message)

    def _publish(self, command: Command) -> None:
        msg = JointTrajectory(joint_names=self.arm_joints)
        msg.header.stamp = seconds_to_stamp(command.stamp)
        msg.points = [JointTrajectoryPoint(positions=p.tolist(), velocities=v.tolist(), accelerations=a.tolist(),
                                           time_from_start=seconds_to_duration(t))
                      for t, p, v, a in zip(command.times, command.positions, command.velocities,
                                            command.accelerations)]
        self.publisher.publish(msg)

    def _report(self) -> None:
        values = self.core.report()
        values.update(enabled=str(self.enabled), goal=self.core.goal_id or "")
        if len(self.tick_times) > 2:
            intervals = np.diff(np.asarray(self.tick_times)) * 1e3
            values.update(tick_p50_ms=f"{np.percentile(intervals, 50):.2f}",
                          tick_p99_ms=f"{np.percentile(intervals, 99):.2f}")
        self.diagnostics.set(self.diagnostics.level, self.diagnostics.message, **values)


def goal_id(text: str, stamp) -> str:
    """The identity of a goal: its instruction and the stamp language_node gave it (the same
    instruction given again is a new goal)."""
    return f"{stamp.sec}.{stamp.nanosec:09d}:{text}"


def main(argv=None) -> int:
    return run_node(ExecutorNode, argv)


if __name__ == "__main__":
    raise SystemExit(main())
