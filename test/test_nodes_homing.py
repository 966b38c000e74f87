"""Homing with moveit_py and its min-jerk fallback.

moveit_py is not installable here, so its API is played by small classes written below that
behave as moveit_py's do on Humble (execute(group_name, robot_trajectory, blocking=True)) and on
Jazzy and later (execute(robot_trajectory, controllers)); they are stand-ins for MoveIt, not for
rclpy or DDS. The fallback is then exercised for real: the executor over DDS, with moveit_py
absent and with a planner that fails, sends the min-jerk trajectory home.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import yaml
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from std_msgs.msg import Header
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from mail_ros.control.limits import fr3_limits
from mail_ros.nodes.common import COMMAND_QOS
from mail_ros.nodes.executor_node import ExecutorNode
from mail_ros.spec import FR3_HOME
from mail_ros.spec import FR3_ARM_JOINTS
from mail_ros.nodes.homing import REQUIRED_KEYS, HomingFailed, MoveItApi, MoveItHoming, import_moveit
from ros_harness import RosGraph, overrides, wait_for

GROUP = "fr3_arm"


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "moveit.yaml"
    config = {key: f"<{key}>" for key in REQUIRED_KEYS}
    config.update(robot_description_kinematics={GROUP: {"kinematics_solver": "kdl"}}, planning_pipelines=["ompl"])
    path.write_text(yaml.safe_dump(config))
    return str(path)


class Status:
    """moveit_py's ExecutionStatus: truthy on success, ``status`` names the outcome."""

    def __init__(self, ok: bool):
        self.ok, self.status = ok, "SUCCEEDED" if ok else "ABORTED"

    def __bool__(self):
        return self.ok


class RobotState:
    def __init__(self, model):
        self.model, self.positions = model, None

    def set_joint_group_positions(self, group, positions):
        self.positions = (group, np.asarray(positions))

    def update(self):
        pass


class Plan:
    def __init__(self, ok: bool, trajectory="trajectory"):
        self.ok, self.trajectory = ok, trajectory

    def __bool__(self):
        return self.ok


class Component:
    def __init__(self, robot):
        self.robot = robot

    def set_start_state_to_current_state(self):
        pass

    def set_goal_state(self, robot_state=None):
        self.robot.goal = robot_state.positions

    def plan(self):
        if self.robot.plan_raises:
            raise RuntimeError("planning pipeline 'ompl' not found")
        return Plan(self.robot.plans)


class JazzyMoveItPy:
    """MoveItPy as on Jazzy and later; ``plans``/``executes``/``plan_raises`` choose how it fails."""

    constructed = 0
    plans, executes, plan_raises = True, True, False

    def __init__(self, node_name, config_dict):
        type(self).constructed += 1
        self.node_name, self.config = node_name, config_dict
        self.goal = self.executed = None

    def get_planning_component(self, name):
        assert name == GROUP
        return Component(self)

    def get_robot_model(self):
        return "model"

    def execute(self, robot_trajectory, controllers):
        self.executed = ("jazzy", robot_trajectory, controllers)
        return Status(self.executes)


class HumbleMoveItPy(JazzyMoveItPy):
    def execute(self, group_name, robot_trajectory, blocking=True):
        self.executed = ("humble", group_name, robot_trajectory, blocking)
        return Status(self.executes)


def api(cls):
    return lambda: MoveItApi(cls, RobotState)


@pytest.mark.parametrize("cls, executed", [(JazzyMoveItPy, ("jazzy", "trajectory", [])),
                                           (HumbleMoveItPy, ("humble", GROUP, "trajectory", True))])
def test_homes_with_either_distros_execute(config_file, cls, executed):
    homing = MoveItHoming(GROUP, config_file, api=api(cls))
    homing.home(np.asarray(FR3_HOME))
    robot = homing._robot
    assert robot.executed == executed and robot.node_name == "mail_ros_homing"
    assert robot.goal[0] == GROUP and np.allclose(robot.goal[1], FR3_HOME)
    assert robot.config["planning_pipelines"] == ["ompl"]  # the file's configuration, passed explicitly


def failing(**behaviour):
    return type("FailingMoveItPy", (HumbleMoveItPy,), dict(behaviour))


@pytest.mark.parametrize("cls, reason", [
    (failing(plans=False), "found no plan"),
    (failing(plan_raises=True), "planning raised RuntimeError: planning pipeline 'ompl' not found"),
    (failing(executes=False), "execution failed: ABORTED"),
    (type("NoSignature", (JazzyMoveItPy,), {"execute": lambda self, a, b, c, d: None}), "neither Jazzy's"),
])
def test_every_moveit_failure_is_a_reason(config_file, cls, reason):
    homing = MoveItHoming(GROUP, config_file, api=api(cls))
    with pytest.raises(HomingFailed, match=reason):
        homing.home(np.asarray(FR3_HOME))
    assert homing.configured  # a failed plan or execution may succeed next time


def test_construction_failure_is_a_reason_and_not_retried(config_file):
    class Broken(JazzyMoveItPy):
        constructed = 0

        def __init__(self, node_name, config_dict):
            type(self).constructed += 1
            raise RuntimeError("Unable to parse SRDF")

    homing = MoveItHoming(GROUP, config_file, api=api(Broken))
    for _ in range(2):
        with pytest.raises(HomingFailed, match="constructing MoveItPy failed: RuntimeError: Unable to parse SRDF"):
            homing.home(np.asarray(FR3_HOME))
    assert Broken.constructed == 1 and not homing.configured


def test_configuration_problems_are_reasons(tmp_path, config_file):
    assert MoveItHoming(GROUP, "").unavailable_reason == "moveit_config_file is not set"
    with pytest.raises(HomingFailed, match="cannot read moveit_config_file"):
        MoveItHoming(GROUP, str(tmp_path / "missing.yaml"), api=api(JazzyMoveItPy)).home(np.asarray(FR3_HOME))
    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump({"robot_description": "<robot/>"}))
    with pytest.raises(HomingFailed, match="lacks .*robot_description_semantic"):
        MoveItHoming(GROUP, str(partial), api=api(JazzyMoveItPy)).home(np.asarray(FR3_HOME))


def test_moveit_py_absent_is_a_reason():
    try:
        import moveit.planning  # noqa: F401
    except ImportError:
        with pytest.raises(HomingFailed, match="moveit_py .* is not installed"):
            import_moveit()
    else:
        pytest.skip("moveit_py is installed here")


# --- the executor over DDS ----------------------------------------------------------------------
AWAY = np.asarray(FR3_HOME) + np.array([0.3, -0.2, 0.0, 0.2, 0.0, 0.0, 0.1])


class StandingRobot:
    """Joint states of an arm standing at AWAY; records the trajectories the executor sends."""

    def __init__(self, graph: RosGraph):
        self.node = graph.node("standing_robot")
        self.trajectories: list[np.ndarray] = []
        self.lock = threading.Lock()
        self.joint_pub = self.node.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
        self.node.create_subscription(JointTrajectory, "/fr3_arm_controller/joint_trajectory", self._on_command,
                                      COMMAND_QOS)
        self.node.create_timer(0.01, self._publish_state)

    def _publish_state(self):
        self.joint_pub.publish(JointState(header=Header(stamp=self.node.get_clock().now().to_msg()),
                                          name=list(FR3_ARM_JOINTS), position=AWAY.tolist(), velocity=[0.0] * 7,
                                          effort=[0.0] * 7))

    def _on_command(self, msg: JointTrajectory):
        with self.lock:
            self.trajectories.append(np.array([p.positions for p in msg.points]))


@pytest.fixture
def homing_rig(config_file):
    graph = RosGraph()
    robot = StandingRobot(graph)
    executor = graph.add(ExecutorNode(context=graph.context, parameter_overrides=overrides(
        joint_state_timeout=0.5, gripper_mode="trajectory", moveit_config_file=config_file)))
    wait_for(lambda: executor.measured is not None, 10, "joint states at the executor")
    yield robot, executor
    graph.shutdown()


def call_home(robot: StandingRobot, executor: ExecutorNode) -> Trigger.Response:
    client = robot.node.create_client(Trigger, f"/{executor.get_name()}/home")
    wait_for(client.service_is_ready, 10, "the home service")
    future = client.call_async(Trigger.Request())
    wait_for(future.done, 10, "the home service's answer")
    return future.result()


@pytest.mark.ros
@pytest.mark.parametrize("planner, reason", [(None, "is not installed"), (failing(plans=False), "found no plan"),
                                             (failing(executes=False), "execution failed: ABORTED")])
def test_executor_falls_back_to_min_jerk_homing(homing_rig, config_file, planner, reason):
    robot, executor = homing_rig
    if planner is not None:
        executor.homing = MoveItHoming(GROUP, config_file, api=api(planner))
    answer = call_home(robot, executor)
    assert answer.success and "moveit_py" in answer.message, answer.message
    wait_for(lambda: robot.trajectories, 10, "the min-jerk trajectory")
    assert reason in executor.homing_result and "min-jerk" in executor.homing_result, executor.homing_result
    with robot.lock:
        (trajectory,) = robot.trajectories
    # From where the arm stands to home, inside the margined limits, in small steps.
    limits = fr3_limits().with_margins(position_margin=0.05, velocity_scale=0.5, acceleration_scale=0.5)
    np.testing.assert_allclose(trajectory[-1], FR3_HOME)
    assert np.abs(trajectory[0] - AWAY).max() < 0.05
    assert np.all(trajectory >= limits.position_min - 1e-6) and np.all(trajectory <= limits.position_max + 1e-6)
    assert np.abs(np.diff(np.vstack([AWAY, trajectory]), axis=0)).max() < 0.05
    assert not executor.enabled
