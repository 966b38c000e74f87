"""camera_sync_node over real DDS on a clock the test owns: stamps ahead of the node clock are
refused, and a clock that jumps back (a restarted simulator, a looping bag) restarts the
alignment instead of silencing the node until time passes the old stamps again."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from rclpy.qos import qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Header

from mail_ros.msg import Observation
from mail_ros.nodes.camera_sync_node import CameraSyncNode
from mail_ros.nodes.common import PIPELINE_QOS, seconds_to_stamp, stamp_to_seconds
from mail_ros.spec import FR3_ARM_JOINTS, FR3_FINGER_JOINTS, FR3_HOME
from ros_harness import RosGraph, overrides, wait_for

pytestmark = pytest.mark.ros

CAMERAS = ("agentview", "wrist")
PERIOD = 0.05  # cameras and joint states at 20 Hz of simulated time; observations at 10 Hz


class SimulatedSensors:
    """Owns /clock (advanced 10 ms every 10 ms of wall time) and publishes cameras and joint
    states stamped by it; ``joint_lead`` shifts the joint states' stamps (another clock)."""

    def __init__(self, graph: RosGraph, start: float = 1000.0):
        self.node = graph.node("sensors")
        self.lock = threading.Lock()
        self.now = start
        self.next_frame = start
        self.joint_lead = 0.0
        self.observations: list[Observation] = []
        self.clock_pub = self.node.create_publisher(Clock, "/clock", 10)
        self.camera_pubs = {c: self.node.create_publisher(Image, f"/cameras/{c}/image_raw", qos_profile_sensor_data)
                            for c in CAMERAS}
        self.joint_pub = self.node.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
        self.node.create_subscription(Observation, "/mail/observation", self._on_observation, PIPELINE_QOS)
        self.node.create_timer(0.01, self._advance)

    def _on_observation(self, msg: Observation) -> None:
        with self.lock:
            self.observations.append(msg)

    def jump(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds
            self.next_frame = self.now

    def observations_since(self, n: int) -> list[Observation]:
        with self.lock:
            return self.observations[n:]

    def _advance(self) -> None:
        with self.lock:
            self.now += 0.01
            now, publish = self.now, self.now >= self.next_frame - 1e-9
            if publish:
                self.next_frame = now + PERIOD
            lead = self.joint_lead
        self.clock_pub.publish(Clock(clock=seconds_to_stamp(now)))
        if not publish:
            return
        for camera, pub in self.camera_pubs.items():
            pub.publish(Image(header=Header(stamp=seconds_to_stamp(now), frame_id=camera), height=16, width=16,
                              encoding="rgb8", step=48, data=bytes(16 * 16 * 3)))
        names = list(FR3_ARM_JOINTS + FR3_FINGER_JOINTS)
        self.joint_pub.publish(JointState(header=Header(stamp=seconds_to_stamp(now + lead)), name=names,
                                          position=list(FR3_HOME) + [0.04, 0.04], velocity=[0.0] * len(names),
                                          effort=[0.0] * len(names)))


@pytest.fixture
def rig():
    graph = RosGraph()
    sensors = SimulatedSensors(graph)
    node = graph.add(CameraSyncNode(context=graph.context, parameter_overrides=overrides(
        use_sim_time=True, cameras=list(CAMERAS), image_height=16, image_width=16, rate_hz=10.0)))
    wait_for(lambda: sensors.joint_pub.get_subscription_count() > 0, 10, "camera_sync_node's subscriptions",
             graph=graph)
    yield graph, sensors, node
    graph.shutdown()


def test_a_clock_jump_back_restarts_the_alignment(rig):
    graph, sensors, node = rig
    wait_for(lambda: len(sensors.observations_since(0)) >= 5, 20, "observations", graph=graph)
    sensors.jump(-500.0)  # a simulator restarted at an earlier time
    n = len(sensors.observations_since(0))
    wait_for(lambda: len(sensors.observations_since(n)) >= 5, 10, "observations after the jump", graph=graph)
    stamps = [stamp_to_seconds(o.header.stamp) for o in sensors.observations_since(n)]
    assert stamps[-1] < 600.0, "still aligning against the stamps from before the jump"
    assert node.clock_resets == 1


def test_stamps_ahead_of_the_node_clock_are_refused(rig):
    graph, sensors, node = rig
    wait_for(lambda: len(sensors.observations_since(0)) >= 3, 20, "observations", graph=graph)
    # The joint states come from a machine whose clock runs 0.5 s ahead: an image paired with them
    # would be paired with joints measured 0.5 s earlier than their stamps claim.
    sensors.joint_lead = 0.5
    wait_for(lambda: node.invalid["joint_states:future"] >= 5, 10, "refused joint states", graph=graph)
    time.sleep(0.5)
    n = len(sensors.observations_since(0))
    time.sleep(1.0)
    assert sensors.observations_since(n) == []  # no joint state it can trust: no observation
    sensors.joint_lead = 0.0
    wait_for(lambda: len(sensors.observations_since(n)) >= 3, 10, "observations once the clocks agree", graph=graph)
    for msg in sensors.observations_since(n):
        assert abs(stamp_to_seconds(msg.joint_state.header.stamp) - stamp_to_seconds(msg.header.stamp)) <= 0.025
    assert np.all(np.isfinite([msg.joint_state_skew for msg in sensors.observations_since(n)]))


def test_a_value_outside_a_declared_range_is_refused_at_run_time(rig):
    _, _, node = rig
    assert node.describe_parameter("max_skew").floating_point_range[0].from_value == 0.0
    result = node.set_parameters(overrides(max_skew=-0.01, image_height=-1))
    assert [r.successful for r in result] == [False, False]
    assert "out of range" in result[0].reason
    assert node.get_parameter("max_skew").value >= 0.0 and node.get_parameter("image_height").value == 16
