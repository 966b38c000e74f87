"""executor_node: /mail/action_chunk -> FR3 joint trajectory controller (and the gripper).

Once per control tick: the watchdog decides whether commanding is allowed (fresh joint states,
fresh chunks, nobody else on the command topic); the core ChunkScheduler picks the action due
now (receding horizon, ACT temporal ensembling or latency compensation); the core SafetyFilter
clips it to the FR3 limits with margins and bounds velocity, acceleration and the per-tick
step; the result goes out as a one-point JointTrajectory. The first chunk, every goal change and
every restart after a stop begin with a min-jerk ramp from the measured joint state (a ramp cut
short by a hold is planned anew). When in doubt, it holds; when the arm stops following its
commands, it stops.

Joint states count as fresh by their header stamp (not by when they arrived), and must lie
within the FR3's position limits; chunks and joint states stamped ahead of the node clock by more
than ``max_clock_skew`` are refused.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
from builtin_interfaces.msg import Duration
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from mail_ros.control.limits import fr3_limits
from mail_ros.control.robot_state import RobotStateError, check_joint_targets, joint_positions
from mail_ros.control.safety import SafetyConfig, SafetyError, SafetyFilter, Verdict, Watchdog
from mail_ros.control.scheduler import Chunk, ChunkScheduler
from mail_ros.msg import ActionChunk, InstructionEmbedding
from mail_ros.nodes.common import (COMMAND_QOS, ERROR, GOAL_QOS, OK, PIPELINE_QOS, WARN, Diagnostics, declare,
                                   now_seconds, run_node, stamp_to_seconds)
from mail_ros.nodes.gripper import GripperBridge
from mail_ros.spec import GRIPPER_ACTION_NAME
from mail_ros.sync.alignment import DEFAULT_MAX_STAMP_LEAD

FR3_HOME = [0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785]
# A control tick this many periods after the previous command finds the controller at rest (it
# reached that command a period after sending), so the next command starts from rest. A tick
# between one and two periods late also finds it at rest, for part of a period, which is not
# modelled: nearer 1 this would mistake timer jitter on a busy computer for a late tick.
LATE_TICK_PERIODS = 2.0


def _duration(seconds: float) -> Duration:
    nanoseconds = int(round(seconds * 1e9))
    return Duration(sec=nanoseconds // 1_000_000_000, nanosec=nanoseconds % 1_000_000_000)


class ExecutorNode(Node):
    def __init__(self, **kwargs):
        super().__init__("executor_node", **kwargs)
        self.enabled = declare(self, "enabled", True, "Send commands to the robot at all (false for replays); "
                               "can be changed at run time")
        mode = declare(self, "mode", "receding_horizon", "Chunk execution: receding_horizon, temporal_ensemble "
                       "or latency_compensation")
        execute_steps = declare(self, "execute_steps", 0, "Receding horizon: actions executed per chunk before "
                                "switching to the next (0 = the whole chunk, MaIL's default)")
        ensemble_decay = declare(self, "ensemble_decay", 0.01, "Temporal ensembling weight decay m in exp(-m*i)")
        interpolation = declare(self, "interpolation", "linear", "Between action due times: linear (blend "
                                "towards the next action, for ticks faster than the chunk dt) or hold")
        self.max_chunk_age = declare(self, "max_chunk_age", 0.5, "Chunks whose newest observation is older "
                                     "than this (s) are discarded")
        self.max_clock_skew = declare(self, "max_clock_skew", DEFAULT_MAX_STAMP_LEAD, "Chunks and joint states stamped further "
                                      "than this (s) ahead of the node clock are refused: the clocks disagree")
        max_chunk_span = declare(self, "max_chunk_span", 3.0, "Chunks whose executed actions span more than "
                                 "this (s) are refused (e.g. a dt sent in ms)")
        self.max_tracking_error = declare(self, "max_tracking_error", 0.25, "Stop commanding (then ramp in "
                                          "again from the measured state) when a joint is farther than this "
                                          "(rad) from its last command: the arm is not following")
        rate = declare(self, "control_rate_hz", 20.0, "Control tick rate (JointTrajectory messages per second)")
        if not (math.isfinite(rate) and rate > 0):
            raise SystemExit(f"control_rate_hz must be positive, got {rate}")
        self.command_topic = declare(self, "command_topic", "/fr3_arm_controller/joint_trajectory",
                                     "JointTrajectory topic of the arm's joint trajectory controller")
        gripper_mode = declare(self, "gripper_mode", "auto", "Gripper output: franka (franka_gripper Move/Grasp "
                               "actions), trajectory (JointTrajectory on gripper_topic), none, or auto (franka "
                               "when franka_msgs imports, else trajectory)")
        gripper_topic = declare(self, "gripper_topic", "/fr3_gripper/joint_trajectory",
                                "Gripper JointTrajectory topic (gripper_mode trajectory)")
        gripper_action_ns = declare(self, "gripper_action_namespace", "/franka_gripper",
                                    "Namespace of franka_gripper's move/grasp actions")
        close_below = declare(self, "gripper_close_below", 0.03, "Close (grasp) when the commanded width drops "
                              "below this (m)")
        open_above = declare(self, "gripper_open_above", 0.05, "Open when the commanded width rises above this (m)")
        self.home = np.asarray(declare(self, "home_position", FR3_HOME, "Joint positions (rad) of the homing "
                                       "pose, inside the margined position limits"), dtype=np.float64)
        self.moveit_group = declare(self, "moveit_group", "fr3_arm", "MoveIt planning group used for homing "
                                    "when moveit_py is installed")
        safety = SafetyConfig(
            position_margin=declare(self, "position_margin", 0.05, "Clearance (rad) kept from each joint limit"),
            velocity_scale=declare(self, "velocity_scale", 0.5, "Fraction of the FR3 velocity limits used"),
            acceleration_scale=declare(self, "acceleration_scale", 0.5, "Fraction of the FR3 acceleration limits used"),
            max_step_delta=declare(self, "max_step_delta", 0.05, "Largest joint motion (rad) per control tick"),
            chunk_timeout=declare(self, "chunk_timeout", 0.3, "Hold when no fresh chunk arrived for this long (s)"),
            joint_state_timeout=declare(self, "joint_state_timeout", 0.2, "Stop commanding when /joint_states is "
                                        "older than this (s)"),
            ramp_speed=declare(self, "ramp_speed", 0.3, "Ramp speed as a fraction of the margined limits"),
            ramp_distance=declare(self, "ramp_distance", 0.05, "Ramp first when the target is farther than this "
                                  "(rad) from the measured position"),
        )
        self.period = 1.0 / rate
        self.limits = fr3_limits()
        self.arm_joints = list(self.limits.names)
        self.safety = SafetyFilter(safety, self.limits)
        if self.home.shape != (len(self.arm_joints),) or not self.safety.limits.contains(self.home):
            raise SystemExit(f"home_position must be {len(self.arm_joints)} joint positions inside the margined "
                             f"limits {self.safety.limits.position_min.round(3).tolist()} .. "
                             f"{self.safety.limits.position_max.round(3).tolist()}, got {self.home.tolist()}")
        self.watchdog = Watchdog(safety)
        self.diagnostics = Diagnostics(self)
        self.gripper = GripperBridge(self, gripper_mode, gripper_topic, gripper_action_ns, close_below, open_above)
        # The gripper width is the last action column, unless the gripper is not driven at all.
        self.action_names = self.arm_joints + ([] if self.gripper.mode == "none" else [GRIPPER_ACTION_NAME])
        self.scheduler = ChunkScheduler(mode=mode, action_dim=len(self.action_names),
                                        execute_steps=execute_steps or None, ensemble_decay=ensemble_decay,
                                        max_chunk_age=self.max_chunk_age, max_chunk_lead=self.max_clock_skew,
                                        max_chunk_span=max_chunk_span, interpolation=interpolation,
                                        instruction_id="")  # accept nothing before the first goal

        self.measured: np.ndarray | None = None  # (7,) latest valid measured arm position
        self.q_cmd: np.ndarray | None = None  # (7,) last commanded position (None: not commanding)
        self.v_cmd = np.zeros(len(self.arm_joints))
        self.last_command_time = -math.inf  # node clock time of the last command sent
        self.ramp: deque[np.ndarray] = deque()
        self.needs_ramp = True
        self.goal_id: str | None = None
        self.last_verdict: Verdict | None = None
        self.counters = {"chunks_accepted": 0, "chunks_rejected": 0, "commands": 0, "clipped_ticks": 0,
                         "holds": 0}
        self.tick_times: deque[float] = deque(maxlen=500)
        self.worst_lag = 0.0  # rad, largest |command - measured| since the last report (to tune max_tracking_error)

        self.publisher = self.create_publisher(JointTrajectory, self.command_topic, COMMAND_QOS)
        self.create_subscription(JointState, "/joint_states", self._on_joint_state, qos_profile_sensor_data)
        self.create_subscription(ActionChunk, "mail/action_chunk", self._on_chunk, PIPELINE_QOS)
        self.create_subscription(InstructionEmbedding, "mail/instruction_embedding", self._on_goal, GOAL_QOS)
        self.create_service(Trigger, "~/home", self._on_home)
        self.add_on_set_parameters_callback(self._on_parameters)
        self.create_timer(self.period, self._tick)
        self.create_timer(1.0, self._report)
        self.get_logger().info(f"executing chunks in {mode} mode at {rate:g} Hz on {self.command_topic}; "
                               f"gripper: {self.gripper.describe()}; enabled={self.enabled}")

    # --- inputs ---------------------------------------------------------------------------------
    def _on_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name == "enabled":
                if bool(param.value) == self.enabled:
                    continue  # re-asserting the current state must not interrupt a motion
                self.enabled = bool(param.value)
                self._stop_commanding("disabled" if not self.enabled else "enabled: waiting to ramp in")
            elif param.name not in ("use_sim_time",):
                return SetParametersResult(successful=False, reason=f"{param.name} cannot change at run time")
        return SetParametersResult(successful=True)

    def _on_joint_state(self, msg: JointState) -> None:
        # An ignored state is not fresh: the watchdog sees the joint states go stale and stops commanding.
        try:
            q = joint_positions(msg.name, msg.position, self.arm_joints)
        except RobotStateError as exc:
            self.get_logger().error(f"ignoring joint state: {exc}", throttle_duration_sec=2.0)
            return
        problem = ""
        stamp, now = stamp_to_seconds(msg.header.stamp), now_seconds(self)
        if stamp <= 0.0:
            problem = "no header stamp (its age cannot be known)"
        elif stamp - now > self.max_clock_skew:
            problem = f"stamped {stamp - now:.3f} s ahead of this node's clock"
        if problem:
            self.get_logger().error(f"ignoring joint state with {problem}", throttle_duration_sec=2.0)
            return
        self.measured = q
        self.watchdog.joint_state_received(min(stamp, now))

    def _on_goal(self, msg: InstructionEmbedding) -> None:
        goal_id = self._goal_id(msg.text, msg.header.stamp)
        if goal_id == self.goal_id:
            return
        self.goal_id = goal_id
        # Chunks of the old goal, queued or in flight, must never move the arm again.
        self.scheduler.reset(instruction_id=goal_id, now=now_seconds(self))
        self.needs_ramp = True
        self.ramp.clear()
        self.gripper.stop()
        self.get_logger().info(f"new goal {msg.text!r}: old chunks discarded")

    @staticmethod
    def _goal_id(text: str, stamp) -> str:
        return f"{stamp.sec}.{stamp.nanosec:09d}:{text}"

    def _reject_chunk(self, reason: str) -> None:
        self.counters["chunks_rejected"] += 1
        self.get_logger().warning(f"rejected chunk: {reason}", throttle_duration_sec=2.0)

    def _on_chunk(self, msg: ActionChunk) -> None:
        if msg.action_space != "joint_position":
            self._reject_chunk(f"unsupported action space {msg.action_space!r}")
            return
        names = list(msg.names)
        missing = [name for name in self.action_names if name not in names]
        if missing or len(set(names)) != len(names) or msg.horizon == 0 or len(msg.actions) != msg.horizon * len(names):
            self._reject_chunk(f"malformed: names {names}, horizon {msg.horizon}, {len(msg.actions)} values")
            return
        if not (math.isfinite(msg.dt) and msg.dt > 0):
            self._reject_chunk(f"dt {msg.dt} is not positive")
            return
        actions = np.asarray(msg.actions, dtype=np.float64).reshape(msg.horizon, len(names))
        try:
            check_joint_targets(names, actions)
        except RobotStateError as exc:
            self._reject_chunk(str(exc))
            return
        chunk = Chunk(chunk_id=msg.chunk_id, stamp=stamp_to_seconds(msg.header.stamp), dt=float(msg.dt),
                      actions=actions[:, [names.index(name) for name in self.action_names]],
                      instruction_id=self._goal_id(msg.instruction, msg.instruction_stamp))
        now = now_seconds(self)
        rejected_before = self.scheduler.counters.copy()
        if not self.scheduler.add_chunk(chunk, now):
            reason = next(iter(self.scheduler.counters - rejected_before), "rejected")
            self._reject_chunk(f"chunk {msg.chunk_id} {reason.removeprefix('rejected:')} "
                               f"(goal {msg.instruction!r}, observation {now - chunk.stamp:.3f} s old)")
            return
        self.counters["chunks_accepted"] += 1
        self.watchdog.chunk_received(now)

    def _on_home(self, request, response):
        decision = self.watchdog.decide(now_seconds(self), self.count_publishers(self.command_topic))
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
        try:
            from moveit.core.robot_state import RobotState
            from moveit.planning import MoveItPy
        except ImportError:
            try:
                points = self._homing_trajectory()
            except SafetyError as exc:
                response.success, response.message = False, f"not homing: {exc}"
                self.get_logger().error(response.message)
                return response
            self.enabled = False
            self._stop_commanding("homing")
            self._publish_points(points, self.period)
            response.success = True
            response.message = (f"moveit_py not installed: homing with a {len(points) * self.period:.1f} s "
                                "min-jerk trajectory; executor paused until 'enabled' is set again")
            return response
        self.enabled = False
        self._stop_commanding("homing")
        robot = MoveItPy(node_name="mail_ros_homing")
        arm = robot.get_planning_component(self.moveit_group)
        arm.set_start_state_to_current_state()
        goal = RobotState(robot.get_robot_model())
        goal.set_joint_group_positions(self.moveit_group, self.home)
        arm.set_goal_state(robot_state=goal)
        plan = arm.plan()
        if not plan:
            response.success, response.message = False, "moveit_py found no plan to the home pose"
            return response
        robot.execute(plan.trajectory, controllers=[])
        response.success, response.message = True, "homed with moveit_py; executor paused until re-enabled"
        return response

    def _homing_trajectory(self) -> np.ndarray:
        """(N, 7) targets one period apart: brake the commanded motion to rest, then a min-jerk ramp home."""
        if self.q_cmd is None:
            return self.safety.ramp(self.measured, self.home, self.period)
        q, v = self.q_cmd, self.v_cmd
        braking = []
        while np.any(v != 0.0):  # hold() takes at least amax * dt off every joint's speed per tick
            safe = self.safety.hold(q, v, self.period)
            q, v = safe.position, safe.velocity
            braking.append(q)
        return np.vstack(braking + [self.safety.ramp(q, self.home, self.period)])

    # --- control tick ---------------------------------------------------------------------------
    def _stop_commanding(self, reason: str) -> None:
        self.q_cmd = None
        self.v_cmd[:] = 0.0
        self.ramp.clear()
        self.needs_ramp = True
        self.diagnostics.set(WARN, reason)

    def _tick(self) -> None:
        self.tick_times.append(time.monotonic())
        if not self.enabled:
            return
        now = now_seconds(self)
        decision = self.watchdog.decide(now, self.count_publishers(self.command_topic))
        if decision.verdict is not self.last_verdict:
            # (rclpy forbids one call site logging at two severities, hence two calls)
            if decision.command:
                self.get_logger().info("commanding")
            else:
                self.get_logger().warning(f"{decision.verdict.value}: {decision.reason}")
            self.last_verdict = decision.verdict
        if decision.clock_jump:
            # Chunks accepted (and the newest stamp seen) before the jump belong to another timeline.
            self.scheduler.reset(instruction_id=self.scheduler.instruction_id, now=now)
        if decision.verdict is Verdict.STOP:
            if self.q_cmd is not None:
                self._stop_commanding(f"stopped: {decision.reason}")
            self.diagnostics.set(ERROR, f"stopped: {decision.reason}")
            return
        if self.q_cmd is not None:
            lag = np.abs(self.q_cmd - self.measured)
            self.worst_lag = max(self.worst_lag, float(lag.max()))
            if lag.max() > self.max_tracking_error:
                joint = self.arm_joints[int(lag.argmax())]
                reason = (f"the arm is not following: {joint} is {lag.max():.3f} rad from its command "
                          f"(max_tracking_error {self.max_tracking_error})")
                self.get_logger().error(reason, throttle_duration_sec=2.0)
                self._stop_commanding(f"stopped: {reason}")
                self.diagnostics.set(ERROR, f"stopped: {reason}")
                return
            if now - self.last_command_time > LATE_TICK_PERIODS * self.period:
                # This tick is late: the controller reached the last command and stopped there.
                self.v_cmd[:] = 0.0
        action = self.scheduler.next_action(now) if decision.command else None
        if action is None:
            if self.q_cmd is None:
                # Not commanding yet: leave the controller holding on its own rather than sending
                # "stay here" targets at a robot someone else may be moving.
                self.diagnostics.set(WARN, f"idle: {decision.reason or 'no action due now'}")
            else:
                self._hold(decision.reason or "no action due now")
            return
        if self.q_cmd is None:
            self.q_cmd = self.measured.copy()
            self.v_cmd[:] = 0.0
        target = action[: len(self.arm_joints)]
        width = action[-1] if len(action) > len(self.arm_joints) else math.nan
        if self.needs_ramp:
            # Once per start or goal: a policy whose next target is always a step ahead (fast
            # motion at 10 Hz) must not be slowed to a ramp at every chunk.
            self.needs_ramp = False
            if self.safety.needs_ramp(self.measured, target):
                self.ramp.extend(self.safety.ramp(self.measured, target, self.period))
                self.get_logger().info(f"ramping to the first action over {len(self.ramp) * self.period:.2f} s")
        if self.ramp:
            target = self.ramp.popleft()
        else:
            self.gripper.command(width)
        try:
            safe = self.safety.filter(target, self.q_cmd, self.v_cmd, self.period)
        except SafetyError as exc:
            self._stop_commanding(f"safety error: {exc}")
            return
        if safe.clipped:
            self.counters["clipped_ticks"] += 1
        self._command(safe)
        self.diagnostics.set(OK, "ramping" if self.ramp else "commanding")

    def _hold(self, reason: str) -> None:
        if self.ramp:
            # The rest of this ramp leads to a target of the past: plan a new one on resuming.
            self.ramp.clear()
            self.needs_ramp = True
        safe = self.safety.hold(self.q_cmd, self.v_cmd, self.period, reason=reason)
        self.counters["holds"] += 1
        self._command(safe)
        self.diagnostics.set(WARN, f"holding: {reason}")

    def _command(self, safe) -> None:
        self.q_cmd, self.v_cmd = safe.position, safe.velocity
        self._publish_points([safe.position], self.period)
        self.last_command_time = now_seconds(self)
        self.counters["commands"] += 1

    def _publish_points(self, points, spacing: float) -> None:
        msg = JointTrajectory(joint_names=self.arm_joints)
        msg.points = [JointTrajectoryPoint(positions=[float(v) for v in q], time_from_start=_duration((i + 1) * spacing))
                      for i, q in enumerate(points)]
        self.publisher.publish(msg)

    def _report(self) -> None:
        values = dict(self.counters, mode=self.scheduler.mode, enabled=self.enabled,
                      tracking_error_max_rad=f"{self.worst_lag:.3f}")
        self.worst_lag = 0.0
        values.update({f"scheduler.{key}": count for key, count in self.scheduler.counters.items()})
        if len(self.tick_times) > 2:
            intervals = np.diff(np.asarray(self.tick_times)) * 1e3
            values.update(tick_p50_ms=f"{np.percentile(intervals, 50):.2f}",
                          tick_p99_ms=f"{np.percentile(intervals, 99):.2f}")
        self.diagnostics.set(self.diagnostics.level, self.diagnostics.message, **values)


def main(argv=None) -> int:
    return run_node(ExecutorNode, argv)


if __name__ == "__main__":
    raise SystemExit(main())
