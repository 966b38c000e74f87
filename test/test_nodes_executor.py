"""executor_node over real DDS: the wiring of the control core (mail_ros.control.executor).

Every timing decision (holds, stops, ramps, late ticks, clock jumps, smoothness at 1 kHz) is
tested on the core with a simulated clock (test_control_executor.py). These tests check that
the node feeds the core and publishes what it decides, so they wait on outcomes with generous
timeouts and assert nothing that a busy machine could make late.

A test node plays the robot: its joint trajectory controller is mail_ros.sim.jtc (joining from
the desired state), its joint states are that controller's setpoint (an arm that follows).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import JointState
from std_msgs.msg import Header
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from mail_ros.control.executor import ExecutorConfig
from mail_ros.control.limits import fr3_limits
from mail_ros.control.safety import SafetyConfig
from mail_ros.msg import ActionChunk, InstructionEmbedding
from mail_ros.nodes.common import COMMAND_QOS, GOAL_QOS, PIPELINE_QOS, now_seconds, seconds_to_stamp, stamp_to_seconds
from mail_ros.nodes.executor_node import ExecutorNode
from mail_ros.sim.jtc import JointTrajectoryController
from mail_ros.spec import FR3_ARM_JOINTS, FR3_HOME, GRIPPER_ACTION_NAME
from ros_harness import RosGraph, overrides, wait_for

pytestmark = pytest.mark.ros

ROOT = Path(__file__).resolve().parents[1]
HOME = np.array(FR3_HOME)
LIMITS = fr3_limits()
MARGINED = LIMITS.with_margins(0.05, 0.5, 0.5, 0.5)
# Generous: a loaded 2-core machine may run any callback late by a good fraction of a second.
JOINT_STATE_TIMEOUT = 0.5
CHUNK_TIMEOUT = 0.5
# The recorder keeps every command (a controller needs only the newest; this test audits them all).
RECORDER_QOS = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.VOLATILE)


class FakeRobotAndPolicy:
    """An arm whose joint trajectory controller runs the executor's commands; goals and chunks on demand."""

    def __init__(self, graph: RosGraph, use_sim_time: bool = False):
        self.node = graph.node("fake_robot_and_policy", parameter_overrides=overrides(use_sim_time=use_sim_time))
        self.jtc = JointTrajectoryController(FR3_ARM_JOINTS, LIMITS.position_min, LIMITS.position_max, HOME)
        self.messages: list[tuple[float, JointTrajectory]] = []  # (monotonic arrival, message)
        self.gripper_commands: list[float] = []
        self.lock = threading.Lock()
        self.publish_states = True
        self.state = None  # callable(names, positions) -> (names, positions): a broken reading
        self.unstamped = False
        self.follows = True
        self.joint_pub = self.node.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
        self.goal_pub = self.node.create_publisher(InstructionEmbedding, "/mail/instruction_embedding", GOAL_QOS)
        self.chunk_pub = self.node.create_publisher(ActionChunk, "/mail/action_chunk", PIPELINE_QOS)
        self.node.create_subscription(JointTrajectory, "/fr3_arm_controller/joint_trajectory", self._on_command,
                                      RECORDER_QOS)
        self.node.create_subscription(JointTrajectory, "/fr3_gripper/joint_trajectory",
                                      lambda m: self.gripper_commands.append(2 * m.points[-1].positions[0]),
                                      RECORDER_QOS)
        self.node.create_timer(0.01, self._publish_state)
        self.chunk_id = 0
        self.goal = None

    def now(self) -> float:
        return now_seconds(self.node)

    def _on_command(self, msg: JointTrajectory) -> None:
        assert list(msg.joint_names) == list(FR3_ARM_JOINTS)
        points = [(stamp_to_seconds(p.time_from_start), p.positions, p.velocities, p.accelerations)
                  for p in msg.points]
        with self.lock:
            self.messages.append((time.monotonic(), msg))
            self.jtc.set_trajectory(FR3_ARM_JOINTS, points, start_time=stamp_to_seconds(msg.header.stamp),
                                    now=self.now())

    def position(self) -> np.ndarray:
        with self.lock:
            return self.jtc.setpoint(self.now()) if self.follows else HOME.copy()

    def _publish_state(self) -> None:
        if not self.publish_states:
            return
        names, positions = list(FR3_ARM_JOINTS), self.position().tolist()
        if self.state is not None:
            names, positions = self.state(names, positions)
        stamp = seconds_to_stamp(0.0 if self.unstamped else self.now())
        self.joint_pub.publish(JointState(header=Header(stamp=stamp), name=names,
                                          position=positions, velocity=[0.0] * len(names),
                                          effort=[0.0] * len(names)))

    def set_goal(self, text: str) -> InstructionEmbedding:
        self.goal = InstructionEmbedding(header=Header(stamp=self.node.get_clock().now().to_msg()), text=text,
                                         encoder="minilm:all-MiniLM-L6-v2", embedding=[0.0] * 4)
        self.goal_pub.publish(self.goal)
        return self.goal

    def send_chunk(self, target=None, goal=None, horizon: int = 8, width: float = 0.08, values=None,
                   names=None, dt: float = 0.1) -> None:
        goal = goal or self.goal
        self.chunk_id += 1
        actions = np.tile(np.append(target, width), (horizon, 1)) if values is None else np.asarray(values)
        self.chunk_pub.publish(ActionChunk(
            header=Header(stamp=seconds_to_stamp(self.now())), chunk_id=self.chunk_id,
            instruction=goal.text, instruction_stamp=goal.header.stamp, action_space="joint_position",
            names=names or list(FR3_ARM_JOINTS) + [GRIPPER_ACTION_NAME], dt=dt, horizon=horizon,
            actions=[float(v) for v in actions.reshape(-1)]))

    def stream_until(self, target, done, timeout: float, **kwargs) -> None:
        """Send a chunk towards ``target`` every 0.1 s until ``done()`` (or fail after ``timeout`` s)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.send_chunk(target, **kwargs)
            time.sleep(0.1)  # the policy's pace, not a synchronisation: done() decides
            if done():
                return
        raise AssertionError(f"not done within {timeout} s; arm at {np.round(self.position(), 4).tolist()}")

    def stream(self, target, seconds: float, **kwargs) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.send_chunk(target, **kwargs)
            time.sleep(0.1)

    def message_count(self) -> int:
        with self.lock:
            return len(self.messages)


def assert_within_limits(first_points: np.ndarray, arrivals: np.ndarray) -> None:
    """The first points of consecutive commands (N, 7), received at ``arrivals`` (N,): inside the
    margined position limits, and no faster apart than the margined velocity limits allow
    (the smoothness of every command at 1 kHz is the core's test)."""
    assert first_points.size, "no commands"
    assert np.all(first_points >= MARGINED.position_min - 1e-3) and np.all(first_points <= MARGINED.position_max + 1e-3)
    gaps = np.diff(arrivals)[:, None] + 0.1  # (N-1, 1) s, plus a command's time ahead
    assert np.all(np.abs(np.diff(first_points, axis=0)) <= MARGINED.velocity_max * gaps + 1e-6)


def make_executor(graph, **values) -> ExecutorNode:
    settings = dict(joint_state_timeout=JOINT_STATE_TIMEOUT, chunk_timeout=CHUNK_TIMEOUT, gripper_mode="trajectory")
    settings.update(values)
    return graph.add(ExecutorNode(context=graph.context, parameter_overrides=overrides(**settings)))


@pytest.fixture
def rig():
    graph = RosGraph()
    robot = FakeRobotAndPolicy(graph)
    executor = make_executor(graph)
    wait_for(lambda: robot.chunk_pub.get_subscription_count() > 0
             and robot.joint_pub.get_subscription_count() > 0, 10, "executor subscriptions")
    wait_for(lambda: executor.measured is not None, 10, "joint states at the executor")
    yield robot, executor
    graph.shutdown()


def reached(robot, target, atol=1e-3):
    return lambda: np.allclose(robot.position(), target, atol=atol)


def test_follows_chunks_with_smooth_trajectories_and_commands_the_gripper(rig):
    robot, executor = rig
    target = HOME + np.array([0.3, 0.2, 0.0, 0.2, 0.0, -0.2, 0.1])
    robot.set_goal("pick up the red cube")
    wait_for(lambda: executor.goal_id is not None, 10, "the goal at the executor")
    robot.stream_until(target, reached(robot, target), 30.0, width=0.0)
    with robot.lock:
        messages = [m for _, m in robot.messages]
    for msg in messages:
        assert stamp_to_seconds(msg.header.stamp) > 0.0  # placed on the clock, not "whenever it arrives"
        assert all(len(p.velocities) == 7 and len(p.accelerations) == 7 for p in msg.points)
        assert list(msg.points[-1].velocities) == [0.0] * 7  # every command ends at rest
        positions = np.array([p.positions for p in msg.points])
        assert np.all(positions >= MARGINED.position_min - 1e-3) and np.all(positions <= MARGINED.position_max + 1e-3)
        velocities = np.array([p.velocities for p in msg.points])
        assert np.all(np.abs(velocities) <= MARGINED.velocity_max)
    # After the ramp, the gripper dimension (0 = close) becomes one close command (hysteresis).
    robot.stream(target, 0.5, width=0.0)
    assert robot.gripper_commands == [0.0]
    wait_for(lambda: "setpoint_1khz_jerk_max" in executor.diagnostics.values, 10, "the 1 kHz report")
    assert float(executor.diagnostics.values["setpoint_1khz_acceleration_max"]) <= MARGINED.acceleration_max.max()


@pytest.mark.parametrize("bad", ["rogue_1e30", "short", "duplicate_names", "other_goal"])
def test_bad_chunks_never_command(rig, bad):
    robot, executor = rig
    goal = robot.set_goal("pick up the red cube")
    wait_for(lambda: executor.goal_id is not None, 10, "the goal at the executor")
    names = list(FR3_ARM_JOINTS) + [GRIPPER_ACTION_NAME]
    for _ in range(10):
        if bad == "rogue_1e30":
            robot.send_chunk(values=np.full((8, 8), 1e30))
        elif bad == "short":
            robot.send_chunk(values=np.zeros((8, 5)), names=names)
        elif bad == "duplicate_names":
            robot.send_chunk(values=np.zeros((8, 9)), names=names + ["fr3_joint1"])
        else:
            other = InstructionEmbedding(header=Header(stamp=robot.node.get_clock().now().to_msg()), text="other")
            robot.send_chunk(HOME + 0.2, goal=other)
        time.sleep(0.05)
    wait_for(lambda: executor.counters["chunks_rejected"] >= 5, 10, "the rejections")
    assert robot.message_count() == 0
    assert goal is robot.goal


@pytest.mark.parametrize("reading", ["beyond_limits", "named_twice", "unstamped"])
def test_implausible_joint_states_stop_commanding(rig, reading):
    robot, executor = rig
    robot.set_goal("pick up the red cube")
    target = HOME + 0.05
    robot.stream_until(target, reached(robot, target), 30.0)
    if reading == "beyond_limits":
        robot.state = lambda names, positions: (names, [-3.3] + positions[1:])
    elif reading == "named_twice":
        robot.state = lambda names, positions: (names + ["fr3_joint1"], positions + [0.6])
    else:
        robot.unstamped = True
    # A state published just before the fault may still arrive: judge the last second of three.
    robot.stream(target + 0.05, 2.0)
    t_judge = time.monotonic()
    robot.stream(target + 0.05, 1.0)
    with robot.lock:
        assert not [t for t, _ in robot.messages if t >= t_judge]
    assert executor.diagnostics.message.startswith("stopped")


def test_second_publisher_on_the_command_topic_stops_commanding(rig):
    robot, executor = rig
    robot.set_goal("pick up the red cube")
    robot.stream_until(HOME + 0.05, reached(robot, HOME + 0.05), 30.0)
    intruder = robot.node.create_publisher(JointTrajectory, "/fr3_arm_controller/joint_trajectory", COMMAND_QOS)
    wait_for(lambda: "another node" in executor.diagnostics.message, 20, "the stop")
    count = robot.message_count()
    robot.stream(HOME + 0.1, 1.0)
    assert robot.message_count() <= count + 1
    assert intruder.get_subscription_count() >= 1


def call_home(robot: FakeRobotAndPolicy, executor: ExecutorNode) -> Trigger.Response:
    client = robot.node.create_client(Trigger, f"/{executor.get_name()}/home")
    wait_for(client.service_is_ready, 10, "the home service")
    future = client.call_async(Trigger.Request())
    wait_for(future.done, 10, "the home service's answer")
    return future.result()


def test_home_reaches_the_home_pose_and_pauses(rig):
    robot, executor = rig
    robot.set_goal("pick up the red cube")
    away = HOME + np.array([0.3, -0.2, 0.0, 0.2, 0.0, 0.0, 0.1])
    robot.stream_until(away, reached(robot, away), 30.0)
    answer = call_home(robot, executor)
    assert answer.success, answer.message
    wait_for(reached(robot, HOME, 1e-9), 30, "the home pose")
    assert not executor.enabled  # paused until re-enabled
    count = robot.message_count()
    robot.stream(away, 0.5)
    assert robot.message_count() == count
    assert call_home(robot, executor).success  # homing paused it; the operator did not disable it


def test_home_is_refused_when_disabled_or_without_fresh_joint_states(rig):
    robot, executor = rig
    robot.publish_states = False
    wait_for(lambda: "joint_states stale" in executor.diagnostics.message, 20, "stale joint states")
    answer = call_home(robot, executor)
    assert not answer.success and "joint_states stale" in answer.message
    robot.publish_states = True
    executor.set_parameters(overrides(enabled=False))
    answer = call_home(robot, executor)
    assert not answer.success and "enabled:=false" in answer.message
    assert robot.message_count() == 0


def test_re_asserting_enabled_does_not_interrupt_a_motion(rig):
    robot, executor = rig
    robot.set_goal("pick up the red cube")
    far = HOME + np.array([0.6, 0, 0, 0, 0, 0, 0])
    robot.stream(far, 0.8)
    wait_for(lambda: executor.core.plan is not None, 30, "a plan")
    origin = executor.core.plan.origin
    assert executor.set_parameters(overrides(enabled=True))[0].successful  # already enabled: nothing changes
    # A real change of 'enabled' forgets the plan, and the next one starts on a new time grid; the
    # replans that chunks and ticks make meanwhile (often, on a loaded machine) keep the grid.
    plan = executor.core.plan
    assert plan is not None and plan.origin == origin
    robot.stream_until(far, reached(robot, far), 30.0)


def test_a_home_position_outside_the_limits_is_refused_at_start_up(rig):
    robot, _ = rig
    with pytest.raises(SystemExit, match="home_position must be 7 joint positions"):
        ExecutorNode(context=robot.node.context, parameter_overrides=overrides(
            home_position=[0.0, -0.785, 0.0, 0.5, 0.0, 1.571, 0.785], gripper_mode="none"))


def test_declared_defaults_are_the_cores_and_pipeline_yaml_repeats_them(rig):
    robot, _ = rig
    node = ExecutorNode(context=robot.node.context)
    try:
        # (rclpy's own parameters aside)
        declared = {name: param.value for name, param in node._parameters.items()
                    if name not in ("use_sim_time", "start_type_description_service")}
    finally:
        node.destroy_node()
    core = {**vars(ExecutorConfig()), **vars(SafetyConfig())}
    core["home_position"] = list(core["home_position"])
    for name, value in core.items():
        assert declared[name] == value, f"executor_node declares {name}={declared[name]!r}, the core {value!r}"
    yaml_section = yaml.safe_load((ROOT / "config" / "pipeline.yaml").read_text())["executor_node"]["ros__parameters"]
    assert yaml_section == declared


def test_numeric_settings_declare_their_ranges_and_out_of_range_values_are_refused_at_start_up():
    graph = RosGraph()
    try:
        node = graph.add(ExecutorNode(context=graph.context, parameter_overrides=overrides(gripper_mode="none")))
        core = {**vars(ExecutorConfig()), **vars(SafetyConfig())}
        for name, value in core.items():
            if isinstance(value, (int, float)):
                descriptor = node.describe_parameter(name)
                assert descriptor.floating_point_range or descriptor.integer_range, f"{name} declares no range"
        assert node.describe_parameter("velocity_scale").floating_point_range[0].to_value == 1.0
        for name, value in (("velocity_scale", 1.5), ("chunk_timeout", -0.1), ("execute_steps", -1),
                            ("gripper_close_below", 0.2)):
            with pytest.raises(SystemExit, match=f"{name}.*out of range"):
                ExecutorNode(context=graph.context, parameter_overrides=overrides(gripper_mode="none", **{name: value}))
    finally:
        graph.shutdown()


def test_a_clock_jump_back_stops_then_recovers_with_fresh_messages():
    # Simulated time (a restarted simulator, a looping bag) jumps 10 s back: everything timed
    # before is void, and commanding resumes from fresh joint states and chunks, not 10 s later.
    graph = RosGraph()
    clock = {"now": 1000.0}
    clock_node = graph.node("sim_clock")
    clock_pub = clock_node.create_publisher(Clock, "/clock", 10)

    def advance():
        clock["now"] += 0.01
        clock_pub.publish(Clock(clock=seconds_to_stamp(clock["now"])))

    clock_node.create_timer(0.01, advance)  # wall-clock timer: the test's node owns sim time
    robot = FakeRobotAndPolicy(graph, use_sim_time=True)
    executor = make_executor(graph, use_sim_time=True, gripper_mode="none")
    try:
        wait_for(lambda: robot.chunk_pub.get_subscription_count() > 0 and now_seconds(executor) > 1000.0,
                 10, "executor subscriptions and sim time")
        robot.set_goal("pick up the red cube")
        target = HOME + np.array([0.03, 0, 0, 0, 0, 0, 0])
        robot.stream_until(target, reached(robot, target), 30.0)
        clock["now"] -= 10.0
        wait_for(lambda: "clock went backwards" in executor.diagnostics.message, 20, "the stop for the jump")
        with robot.lock:
            robot.jtc.hold(robot.jtc.setpoint(robot.now() + 10.0))  # the controller restarted too
        count = robot.message_count()
        robot.stream_until(target, lambda: robot.message_count() > count + 10, 30.0)
        assert executor.scheduler.counters["accepted"] > 0
        assert np.abs(robot.position() - target).max() < 0.01
    finally:
        graph.shutdown()
