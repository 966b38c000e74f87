"""franka_gripper over real DDS with the real franka_msgs types (built by test/vendor_ros2.py):
the test bed's franka_gripper actions behave as franka_gripper's, and the executor's bridge
drives them, stops before a new goal, and copes with refused goals, failed grasps and a server
that appears late. Skips, naming the folder, without ../shared/vendor/ros2."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest
import rclpy
from rclpy.action import ActionClient, ActionServer, GoalResponse
from std_srvs.srv import Trigger

import franka_msgs_inprocess
import vendor_ros2
from mail_ros.control.gripper import DEFAULT_GRASP_WINDOW
from mail_ros.nodes.franka_sim_node import FrankaSimNode
from mail_ros.nodes.gripper import GripperBridge
from mail_ros.spec import FR3_GRIPPER_MAX_WIDTH
from ros_harness import RosGraph, overrides, wait_for

pytestmark = [pytest.mark.ros, pytest.mark.skipif(vendor_ros2.skip_reason() is not None,
                                                  reason=str(vendor_ros2.skip_reason()))]
TIMEOUT = 30.0
# Each test serves its own namespace: a server of an earlier test's graph may still be known to DDS.


@pytest.fixture(scope="module")
def franka_msgs():
    site = franka_msgs_inprocess.load()
    import franka_msgs.action

    yield franka_msgs.action
    franka_msgs_inprocess.unload(site)


def sim_node(graph: RosGraph, namespace: str) -> FrankaSimNode:
    return graph.add(FrankaSimNode(context=graph.context, parameter_overrides=overrides(
        cameras=["wrist"], image_height=16, image_width=16, camera_rate_hz=5.0, gripper_action_namespace=namespace)))


def cube_between_the_fingers(node: FrankaSimNode) -> None:
    """Test set-up with privileged access: the red cube, axis-aligned, between the open fingers,
    gravity off (it would fall before the fingers reach it)."""
    with node._lock:
        sim = node.sim
        address = sim._cube_qadr["red"]
        sim.data.qpos[address:address + 3] = sim.tcp_position()
        sim.data.qpos[address + 3:address + 7] = [1.0, 0.0, 0.0, 0.0]
        sim.model.opt.gravity[:] = 0.0
        mujoco.mj_forward(sim.model, sim.data)


def send(graph, client, goal, timeout=TIMEOUT):
    """(status, result, feedback widths) of one goal."""
    assert client.wait_for_server(timeout_sec=TIMEOUT)
    feedback = []
    sent = client.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback.current_width))
    wait_for(sent.done, timeout, "the goal response", graph=graph)
    handle = sent.result()
    assert handle.accepted  # franka_gripper accepts every goal
    result = handle.get_result_async()
    wait_for(result.done, timeout, "the goal result", graph=graph)
    return result.result().status, result.result().result, feedback


def grasp_goal(action, window=DEFAULT_GRASP_WINDOW):
    goal = action.Goal(width=window.goal_width, speed=0.1, force=40.0)
    goal.epsilon.inner = goal.epsilon.outer = window.epsilon
    return goal


def test_sim_serves_franka_gripper_semantics(franka_msgs):
    from action_msgs.msg import GoalStatus

    Grasp, Move, Homing = franka_msgs.Grasp, franka_msgs.Move, franka_msgs.Homing
    with RosGraph() as graph:
        sim = sim_node(graph, "/franka_gripper")
        # Action clients and servers are made before their node spins (rclpy's constructors add
        # them to the node before they are complete).
        node = rclpy.create_node("gripper_client", context=graph.context)
        grasp = ActionClient(node, Grasp, "/franka_gripper/grasp")
        move = ActionClient(node, Move, "/franka_gripper/move")
        homing = ActionClient(node, Homing, "/franka_gripper/homing")
        stop = node.create_client(Trigger, "/franka_gripper/stop")
        graph.add(node)

        # Closing on nothing ends near 0, outside the window: aborted, success false, no error.
        status, result, feedback = send(graph, grasp, grasp_goal(Grasp))
        assert status == GoalStatus.STATUS_ABORTED and not result.success and result.error == ""
        assert feedback and feedback[0] > feedback[-1] and sim.sim.gripper_width() < 0.005
        # Homing opens; a move reaches its width.
        status, result, _ = send(graph, homing, Homing.Goal())
        assert status == GoalStatus.STATUS_SUCCEEDED and result.success
        assert sim.sim.gripper_width() > FR3_GRIPPER_MAX_WIDTH - 0.005
        status, result, _ = send(graph, move, Move.Goal(width=0.03, speed=0.1))
        assert status == GoalStatus.STATUS_SUCCEEDED and result.success and abs(sim.sim.gripper_width() - 0.03) < 0.005
        # Parameters the hand cannot take: aborted with libfranka-like error text.
        status, result, _ = send(graph, move, Move.Goal(width=0.12, speed=0.1))
        assert status == GoalStatus.STATUS_ABORTED and "width" in result.error

        # A goal while another runs is not pre-empted: it fails, the first goes on until stopped.
        assert move.wait_for_server(timeout_sec=TIMEOUT)
        slow = move.send_goal_async(Move.Goal(width=FR3_GRIPPER_MAX_WIDTH, speed=0.01))
        wait_for(lambda: slow.done() and sim.gripper_actions.running is not None, TIMEOUT, "the slow move", graph=graph)
        status, result, _ = send(graph, grasp, grasp_goal(Grasp))
        assert status == GoalStatus.STATUS_ABORTED and "stop" in result.error
        assert sim.gripper_actions.running is not None
        slow_result = slow.result().get_result_async()
        assert stop.wait_for_service(timeout_sec=TIMEOUT)
        stopped = stop.call_async(Trigger.Request())
        wait_for(lambda: stopped.done() and slow_result.done(), TIMEOUT, "stop and the slow move's end", graph=graph)
        assert stopped.result().success
        assert slow_result.result().status == GoalStatus.STATUS_ABORTED and not slow_result.result().result.success
        width = sim.sim.gripper_width()
        assert width < FR3_GRIPPER_MAX_WIDTH - 0.01  # stopped on its way

        # A cube between the fingers: the grasp holds it and succeeds; a window for bigger objects fails.
        send(graph, homing, Homing.Goal())
        cube_between_the_fingers(sim)
        status, result, _ = send(graph, grasp, grasp_goal(Grasp))
        assert status == GoalStatus.STATUS_SUCCEEDED and result.success
        assert DEFAULT_GRASP_WINDOW.holds(sim.sim.gripper_width())
        send(graph, homing, Homing.Goal())
        status, result, _ = send(graph, grasp, grasp_goal(Grasp, type(DEFAULT_GRASP_WINDOW)(0.06, 0.075)))
        assert status == GoalStatus.STATUS_ABORTED and not result.success
        graph.shutdown()


def bridge_on(graph: RosGraph, namespace: str) -> GripperBridge:
    """The executor's bridge on a node of its own (built before the node spins, as in executor_node)."""
    node = rclpy.create_node("executor_stand_in", context=graph.context)
    bridge = GripperBridge(node, "franka", "/unused", namespace, close_below=0.03, open_above=0.05)
    graph.add(node)
    return bridge


def test_bridge_drives_the_sim_and_stops_before_a_new_goal(franka_msgs):
    with RosGraph() as graph:
        sim = sim_node(graph, "/gripper_b")
        bridge = bridge_on(graph, "/gripper_b")
        assert bridge.mode == "franka" and "3.5-5.5 cm" in bridge.describe()
        wait_for(lambda: all(c.server_is_ready() for c in bridge.clients.values()), TIMEOUT, "the servers", graph=graph)

        # Close on nothing: the grasp runs, and fails with the reason.
        bridge.command(0.0)
        wait_for(lambda: bridge.counters["failed"] == 1, TIMEOUT, "the failed grasp", graph=graph)
        assert "outside the grasp window 3.5-5.5 cm" in bridge.last_failure

        # Open, then close again at once: the open move is stopped before the grasp is sent, so
        # the server never answers "busy".
        bridge.command(0.08)
        wait_for(lambda: sim.gripper_actions.running is not None, TIMEOUT, "the open move", graph=graph)
        bridge.command(0.0)
        wait_for(lambda: bridge.counters["succeeded"] + bridge.counters["failed"] >= 2 and bridge._active is None,
                 TIMEOUT, "the second grasp", graph=graph)
        assert "busy" not in bridge.last_failure and bridge.counters["refused"] == 0
        assert sim.sim.gripper_width() < 0.005  # the grasp (not the stopped open) ran last

        bridge.command(0.08)
        wait_for(lambda: sim.sim.gripper_width() > FR3_GRIPPER_MAX_WIDTH - 0.005 and bridge._active is None,
                 TIMEOUT, "the hand open", graph=graph)
        cube_between_the_fingers(sim)
        succeeded = bridge.counters["succeeded"]
        bridge.command(0.0)
        wait_for(lambda: bridge.counters["succeeded"] > succeeded, TIMEOUT, "the grasp of the cube", graph=graph)
        assert DEFAULT_GRASP_WINDOW.holds(sim.sim.gripper_width())

        # Homing (the executor's ~/home) opens the hand.
        bridge.home()
        wait_for(lambda: sim.sim.gripper_width() > FR3_GRIPPER_MAX_WIDTH - 0.005 and bridge._active is None,
                 TIMEOUT, "homing", graph=graph)
        graph.shutdown()


def test_bridge_waits_for_a_late_server_and_retries_refused_goals(franka_msgs):
    Grasp = franka_msgs.Grasp
    with RosGraph() as graph:
        bridge = bridge_on(graph, "/gripper_c")
        bridge.command(0.0)  # no server yet: not sent, tried again later
        assert bridge.counters["refused"] == 1 and "not available" in bridge.last_failure

        # A server that refuses every goal: refusals are counted and retried, never lost silently.
        refusing = rclpy.create_node("refusing_gripper", context=graph.context)
        server = ActionServer(refusing, Grasp, "/gripper_c/grasp", execute_callback=lambda handle: Grasp.Result(),
                              goal_callback=lambda goal: GoalResponse.REJECT)
        graph.add(refusing)
        wait_for(lambda: (bridge.command(0.0), "refused the grasp goal" in bridge.last_failure)[1], TIMEOUT,
                 "a refused grasp", graph=graph)
        server.destroy()
        graph.remove(refusing)

        # The test bed appears late: the wanted grasp goes through.
        sim_node(graph, "/gripper_c")
        wait_for(lambda: (bridge.command(0.0), bridge.counters["failed"] >= 1)[1], TIMEOUT, "the late grasp", graph=graph)
        assert "outside the grasp window" in bridge.last_failure
        graph.shutdown()


def test_executor_auto_mode_drives_the_test_beds_hand(franka_msgs):
    from std_msgs.msg import Header

    from mail_ros.msg import ActionChunk, InstructionEmbedding
    from mail_ros.nodes.common import GOAL_QOS, PIPELINE_QOS
    from mail_ros.nodes.executor_node import ExecutorNode
    from mail_ros.sim.franka_sim import HOME_Q
    from mail_ros.spec import FR3_ARM_JOINTS, GRIPPER_ACTION_NAME

    with RosGraph() as graph:
        sim = sim_node(graph, "/franka_gripper")  # it publishes /joint_states
        executor = graph.add(ExecutorNode(context=graph.context, parameter_overrides=overrides(
            gripper_mode="auto", joint_state_timeout=0.5)))
        assert executor.gripper.mode == "franka"
        policy = graph.node("policy_stand_in")
        goal_pub = policy.create_publisher(InstructionEmbedding, "/mail/instruction_embedding", GOAL_QOS)
        chunk_pub = policy.create_publisher(ActionChunk, "/mail/action_chunk", PIPELINE_QOS)
        goal = InstructionEmbedding(header=Header(stamp=policy.get_clock().now().to_msg()), text="pick up the red cube",
                                    encoder="minilm:all-MiniLM-L6-v2", embedding=[0.0] * 4)
        chunk_ids = iter(range(1, 1_000_000))

        def send_chunk(width: float) -> None:
            """Hold the arm where it stands, with this gripper width."""
            chunk_pub.publish(ActionChunk(
                header=Header(stamp=policy.get_clock().now().to_msg()), chunk_id=next(chunk_ids),
                instruction=goal.text, instruction_stamp=goal.header.stamp, action_space="joint_position",
                names=list(FR3_ARM_JOINTS) + [GRIPPER_ACTION_NAME], dt=0.1, horizon=8,
                actions=[float(v) for v in np.tile(np.append(HOME_Q, width), (8, 1)).astype(np.float32).ravel()]))

        wait_for(lambda: all(c.server_is_ready() for c in executor.gripper.clients.values())
                 and chunk_pub.get_subscription_count() > 0, TIMEOUT, "the servers and the executor", graph=graph)
        goal_pub.publish(goal)
        wait_for(lambda: executor.goal_id is not None, TIMEOUT, "the goal", graph=graph)
        cube_between_the_fingers(sim)
        # The policy closes the hand where the arm stands: a franka_gripper Grasp holds the cube.
        wait_for(lambda: (send_chunk(0.0), executor.gripper.counters["succeeded"] >= 1)[1],
                 TIMEOUT, "the grasp", graph=graph, period=0.1)
        assert DEFAULT_GRASP_WINDOW.holds(sim.sim.gripper_width()) and executor.gripper.counters["failed"] == 0
        wait_for(lambda: (send_chunk(0.08), sim.sim.gripper_width() > 0.075)[1],
                 TIMEOUT, "the hand open", graph=graph, period=0.1)
        graph.shutdown()
