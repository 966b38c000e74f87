"""language_node over real DDS: goals from publishers of either durability, once each, and ~/set_goal.

The goal publishers here are what ``ros2 topic pub`` creates on Humble (transient-local) and from
Iron on (volatile); the front-door test (test_front_door.py) runs the real command.
"""

from __future__ import annotations

import pytest
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from mail_ros.msg import InstructionEmbedding
from mail_ros.nodes.common import GOAL_QOS
from mail_ros.nodes.language_node import LanguageNode
from mail_ros.srv import SetGoal
from ros_harness import RosGraph, wait_for

pytestmark = pytest.mark.ros

TIMEOUT = 60.0  # generous: encoding and discovery on a busy 2-core machine


def publisher_qos(durability: str) -> QoSProfile:
    """ros2 topic pub's profile: reliable, keep last, depth 1, with the distro's durability."""
    return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                      durability={"volatile": DurabilityPolicy.VOLATILE,
                                  "transient_local": DurabilityPolicy.TRANSIENT_LOCAL}[durability])


class Operator:
    """Publishes goals, records every embedding language_node publishes."""

    def __init__(self, graph: RosGraph, durability: str):
        self.node = graph.node(f"operator_{durability}")
        self.embeddings: list[str] = []
        self.node.create_subscription(InstructionEmbedding, "/mail/instruction_embedding",
                                      lambda msg: self.embeddings.append(msg.text), GOAL_QOS)
        self.publisher = self.node.create_publisher(String, "/mail/instruction", publisher_qos(durability))

    def publish(self, text: str, graph: RosGraph, subscriptions: int) -> None:
        wait_for(lambda: self.publisher.get_subscription_count() >= subscriptions, TIMEOUT,
                 "language_node's /mail/instruction subscriptions", graph=graph)
        self.publisher.publish(String(data=text))


@pytest.fixture(scope="module")
def graph():
    graph = RosGraph()
    yield graph
    graph.shutdown()


@pytest.fixture(scope="module")
def language(graph):
    return graph.add(LanguageNode(context=graph.context))


@pytest.mark.parametrize("durability, matched", [("volatile", 1), ("transient_local", 2)])
def test_a_goal_from_either_durability_is_applied_once(graph, language, durability, matched):
    operator = Operator(graph, durability)
    # A transient-local publisher matches both of the node's subscriptions, so its goal arrives twice.
    operator.publish(f"pick up the red cube ({durability})", graph, subscriptions=matched)
    wait_for(lambda: f"pick up the red cube ({durability})" in operator.embeddings, TIMEOUT,
             "the embedding of the goal", graph=graph)
    # A second goal after the first: had the first been applied twice, both copies were published
    # before this one (they leave the node in the order they arrived).
    operator.publish(f"pick up the blue cube ({durability})", graph, subscriptions=matched)
    wait_for(lambda: f"pick up the blue cube ({durability})" in operator.embeddings, TIMEOUT,
             "the embedding of the second goal", graph=graph)
    assert operator.embeddings.count(f"pick up the red cube ({durability})") == 1, operator.embeddings
    assert operator.embeddings[-1] == f"pick up the blue cube ({durability})"


def test_a_transient_local_goal_published_before_the_node_started_applies():
    graph = RosGraph()
    try:
        # In a namespace of its own: the module's language_node must not answer this goal.
        early = graph.node("early_operator")
        publisher = early.create_publisher(String, "/early/mail/instruction", publisher_qos("transient_local"))
        publisher.publish(String(data="put the red cube on the blue cube"))
        received: list[str] = []
        early.create_subscription(InstructionEmbedding, "/early/mail/instruction_embedding",
                                  lambda msg: received.append(msg.text), GOAL_QOS)
        graph.add(LanguageNode(context=graph.context, namespace="early"))
        wait_for(lambda: received == ["put the red cube on the blue cube"], TIMEOUT,
                 "the embedding of the goal published before language_node started", graph=graph)
    finally:
        graph.shutdown()


def test_set_goal_answers_accepted_or_refused_with_the_reason(graph, language):
    operator = Operator(graph, "volatile")
    client = operator.node.create_client(SetGoal, "/language_node/set_goal")
    wait_for(client.service_is_ready, TIMEOUT, "the ~/set_goal service", graph=graph)

    def call(instruction: str) -> SetGoal.Response:
        future = client.call_async(SetGoal.Request(instruction=instruction))
        wait_for(future.done, TIMEOUT, "the answer of ~/set_goal", graph=graph)
        return future.result()

    accepted = call("  stack   the green cube on the red cube ")
    assert accepted.accepted, accepted.message
    assert "'stack the green cube on the red cube'" in accepted.message
    wait_for(lambda: "stack the green cube on the red cube" in operator.embeddings, TIMEOUT,
             "the embedding of the goal set through the service", graph=graph)
    refused = call("   ")
    assert not refused.accepted and "instruction is empty" in refused.message
    refused = call("x" * 600)
    assert not refused.accepted and "more than max_chars=512" in refused.message
