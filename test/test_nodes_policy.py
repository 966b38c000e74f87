"""policy_node and language_node on bad input over real DDS: clocks out of sync or going
backwards, refused goals, actions beyond the published precision, unusable checkpoints, a
failing text encoder. Each test starts the node under test and a client node in one graph."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from diagnostic_msgs.msg import DiagnosticArray
from safetensors.torch import load_file, save_file
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String

from mail_ros.cli import main as cli_main
from mail_ros.model.mamba import BACKEND_CPU
from mail_ros.msg import ActionChunk, InstructionEmbedding
from mail_ros.msg import Observation as ObservationMsg
from mail_ros.nodes.common import GOAL_QOS, PIPELINE_QOS, now_seconds, seconds_to_stamp, stamp_to_seconds
from mail_ros.nodes.language_node import LanguageNode
from mail_ros.nodes.policy_node import PolicyNode
from mail_ros.spec import FR3_ARM_JOINTS, FR3_FINGER_JOINTS, FR3_HOME
from ros_harness import RosGraph, overrides, wait_for

pytestmark = pytest.mark.ros

ENCODER = "minilm:all-MiniLM-L6-v2"
OK, WARN, ERROR = b"\x00", b"\x01", b"\x02"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Tiny language policy with relative arm actions: a finite but absurd joint reading gives
    finite float64 targets beyond the float32 range of ActionChunk."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert cli_main(["checkpoint", "init", "--preset", "tiny-d_ma-bc", "--out", str(out),
                     "--set", f'language.encoder="{ENCODER}"', "--set", "language.dim=384",
                     "--set", "relative_actions=true"]) == 0
    return out


class Client:
    """Publishes observations (64x64, the checkpoint's cameras) and goals; records chunks and diagnostics."""

    def __init__(self, graph: RosGraph):
        self.node = graph.node("client")
        self.chunks: list[ActionChunk] = []
        self.diagnostics: list = []
        self.lock = threading.Lock()
        self.streaming = False
        self.joints = np.array(FR3_HOME + (0.04, 0.04))  # a state the FR3 can be in
        self.rng = np.random.default_rng(0)
        self.observation_pub = self.node.create_publisher(ObservationMsg, "/mail/observation", PIPELINE_QOS)
        self.goal_pub = self.node.create_publisher(InstructionEmbedding, "/mail/instruction_embedding", GOAL_QOS)
        self.node.create_subscription(ActionChunk, "/mail/action_chunk", self._on_chunk, PIPELINE_QOS)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: self.diagnostics.extend(m.status), 50)
        self.node.create_timer(0.1, lambda: self.streaming and self.observe(now_seconds(self.node)))

    def _on_chunk(self, msg: ActionChunk) -> None:
        with self.lock:
            self.chunks.append(msg)

    def chunks_since(self, n: int) -> list[ActionChunk]:
        with self.lock:
            return self.chunks[n:]

    def observe(self, stamp: float) -> None:
        msg = ObservationMsg(header=Header(stamp=seconds_to_stamp(stamp)), camera_names=["agentview", "wrist"])
        for _ in msg.camera_names:
            msg.images.append(Image(height=64, width=64, encoding="rgb8", step=64 * 3,
                                    data=self.rng.integers(0, 256, 64 * 64 * 3, dtype=np.uint8).tobytes()))
        msg.joint_state.name = list(FR3_ARM_JOINTS + FR3_FINGER_JOINTS)
        msg.joint_state.position = self.joints.tolist()
        self.observation_pub.publish(msg)

    def goal(self, text: str, embedding) -> None:
        self.goal_pub.publish(InstructionEmbedding(header=Header(stamp=self.node.get_clock().now().to_msg()),
                                                   text=text, encoder=ENCODER, embedding=list(embedding)))

    def diagnostic(self, node: str, levels=(WARN, ERROR)) -> list[str]:
        return [s.message for s in list(self.diagnostics) if node in s.name and s.level in levels]


def _unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=384)
    return vector / np.linalg.norm(vector)


def _stamp(chunk: ActionChunk) -> float:
    return stamp_to_seconds(chunk.header.stamp)


@pytest.fixture
def running(checkpoint):
    graph = RosGraph(threads=4)
    client = Client(graph)
    # A generous age limit: these tests stamp observations in the past on purpose, on a busy machine.
    policy = graph.add(PolicyNode(context=graph.context, parameter_overrides=overrides(
        checkpoint=str(checkpoint), device="cpu", max_observation_age=30.0)))
    wait_for(lambda: client.observation_pub.get_subscription_count() > 0, 10, "policy_node's subscription",
             graph=graph)
    yield graph, client, policy
    graph.shutdown()


def test_future_stamped_observation_is_refused_and_later_ones_are_used(running):
    graph, client, policy = running
    client.goal("pick up the red cube", _unit(0))
    client.streaming = True
    wait_for(lambda: len(client.chunks_since(0)) >= 2, 20, "chunks", graph=graph)
    client.streaming = False
    client.observe(now_seconds(client.node) + 3600.0)
    wait_for(lambda: policy.counters["refused_observations"] == 1, 5, "the future observation refused", graph=graph)
    n = len(client.chunks_since(0))
    client.streaming = True
    wait_for(lambda: len(client.chunks_since(n)) >= 3, 20, "chunks after the future observation", graph=graph)
    assert all(_stamp(c) < now_seconds(client.node) for c in client.chunks_since(0))
    wait_for(lambda: any("ahead of the receiver's clock (max_observation_lead 50 ms)" in m
                         for m in client.diagnostic("policy_node")), 5, "a WARN diagnostic", graph=graph)


def test_repeated_stamps_are_counted_and_backwards_time_restarts_the_history(running):
    graph, client, policy = running
    client.goal("pick up the red cube", _unit(0))
    # Observations 0.1 s apart until one gets through: the first may go out before discovery ends.
    stamp, deadline = now_seconds(client.node) - 5.0, time.monotonic() + 20.0
    while not client.chunks_since(0):
        assert time.monotonic() < deadline, "no chunk"
        stamp += 0.1
        client.observe(stamp)
        time.sleep(0.2)
    time.sleep(0.5)
    n = len(client.chunks_since(0))
    assert policy.counters["out_of_order_observations"] == policy.counters["history_restarts"] == 0

    client.observe(stamp + 0.1)
    wait_for(lambda: len(client.chunks_since(n)) == 1, 20, "a chunk", graph=graph)
    assert client.chunks_since(n)[0].history_length == 2
    client.observe(stamp + 0.1)  # the same stamp again: ignored, but counted
    wait_for(lambda: policy.counters["out_of_order_observations"] == 1, 5, "the repeated stamp counted", graph=graph)
    # Time went backwards (a simulator restart): the history restarts with this observation
    # instead of ignoring everything until the clock passes stamp + 0.1 again.
    client.observe(stamp - 1.0)
    wait_for(lambda: len(client.chunks_since(n)) == 2, 20, "a chunk after time went backwards", graph=graph)
    chunk = client.chunks_since(n)[1]
    assert chunk.history_length == 1 and _stamp(chunk) == pytest.approx(stamp - 1.0, abs=1e-6)
    assert policy.counters["out_of_order_observations"] == 2 and policy.counters["history_restarts"] == 1
    client.observe(stamp - 0.9)
    wait_for(lambda: len(client.chunks_since(n)) == 3, 20, "the next chunk", graph=graph)
    assert client.chunks_since(n)[2].history_length == 2
    wait_for(lambda: any(k.key == "out_of_order_observations" and k.value == "2" for s in list(client.diagnostics)
                         if "policy_node" in s.name for k in s.values), 5, "the counter on /diagnostics", graph=graph)


def test_refused_goal_drops_the_current_one(running):
    graph, client, policy = running
    client.goal("pick up the red cube", _unit(0))
    client.streaming = True
    wait_for(lambda: len(client.chunks_since(0)) >= 2, 20, "chunks for the first goal", graph=graph)
    client.goal("put it back", [float("nan")] * 384)
    wait_for(lambda: policy.counters["refused_embeddings"] == 1, 5, "the refused goal", graph=graph)
    time.sleep(0.3)  # a chunk in flight when the goal was refused may still arrive
    n = len(client.chunks_since(0))
    time.sleep(1.5)
    assert client.chunks_since(n) == [], "chunks for a goal the operator replaced"
    client.goal("put it back", _unit(1))
    wait_for(lambda: len(client.chunks_since(n)) >= 2, 20, "chunks for the next valid goal", graph=graph)
    assert {c.instruction for c in client.chunks_since(n)} == {"put it back"}


def test_a_state_no_robot_could_be_in_yields_no_chunk_and_diagnostics_recover(running):
    # A joint far beyond its limit (issue 18: fr3_joint1 = -3.3 made the policy aim past the
    # limit; 1e39 overflowed float32) is refused by the robot-state gate: no chunk from it.
    graph, client, policy = running
    client.goal("pick up the red cube", _unit(0))
    client.joints[0] = 1e39
    client.streaming = True
    wait_for(lambda: policy.counters["refused_observations"] >= 3, 20, "refused observations", graph=graph)
    assert client.chunks_since(0) == []
    wait_for(lambda: any("beyond the hard limits" in m for m in client.diagnostic("policy_node", (WARN,))),
             5, "a WARN diagnostic", graph=graph)
    client.joints[0] = -3.3
    n_refused = policy.counters["refused_observations"]
    wait_for(lambda: policy.counters["refused_observations"] >= n_refused + 3, 20, "more refusals", graph=graph)
    assert client.chunks_since(0) == []
    client.joints[0] = 0.0
    wait_for(lambda: len(client.chunks_since(0)) >= 3, 20, "chunks once the joints are sane", graph=graph)
    assert all(np.all(np.isfinite(c.actions)) for c in client.chunks_since(0))
    # Problems are not sticky: with healthy input the status is OK again.
    n = len(client.diagnostics)
    wait_for(lambda: any(s.level == OK and s.message == "running" for s in client.diagnostics[n:]
                         if "policy_node" in s.name), 5, "an OK diagnostic", graph=graph)


def _overflowing_weights(path):
    tensors = load_file(str(path / "model.safetensors"))
    tensors["action_out.weight"] = torch.full_like(tensors["action_out.weight"], 3e38)
    save_file(tensors, str(path / "model.safetensors"))


def _float_layers(path):
    data = json.loads((path / "config.json").read_text())
    data["policy"]["backbone"]["n_layers"] = 2.0
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("corrupt,message", [
    (_overflowing_weights, "predicts non-finite actions"),
    (_float_layers, "backbone.n_layers must be an integer >= 1, got 2.0"),
])
def test_unusable_checkpoint_leaves_the_node_up_without_a_policy(checkpoint, tmp_path, corrupt, message):
    path = tmp_path / "broken"
    shutil.copytree(checkpoint, path)
    corrupt(path)
    graph = RosGraph(threads=2)
    try:
        client = Client(graph)
        policy = graph.add(PolicyNode(context=graph.context, parameter_overrides=overrides(
            checkpoint=str(path), device="cpu")))
        assert policy.policy is None
        wait_for(lambda: any(message in m for m in client.diagnostic("policy_node", (ERROR,))), 10,
                 "an ERROR diagnostic", graph=graph)
        client.goal("pick up the red cube", _unit(0))
        client.streaming = True
        time.sleep(1.0)
        assert client.chunks_since(0) == []
    finally:
        graph.shutdown()


class FailsOnce:
    """The packaged MiniLM, except that its first call fails as a GPU out of memory would."""

    def __init__(self, encoder):
        self.encoder, self.name, self.dim = encoder, encoder.name, encoder.dim
        self.failed = False

    def encode(self, texts):
        if not self.failed:
            self.failed = True
            raise RuntimeError("CUDA out of memory")
        return self.encoder.encode(texts)


def test_language_node_survives_an_encoder_failure():
    graph = RosGraph(threads=2)
    try:
        language = graph.add(LanguageNode(context=graph.context))
        language.encoder = FailsOnce(language.encoder)
        client = Client(graph)
        embeddings: list[InstructionEmbedding] = []
        client.node.create_subscription(InstructionEmbedding, "/mail/instruction_embedding", embeddings.append,
                                        GOAL_QOS)
        instruction_pub = client.node.create_publisher(String, "/mail/instruction", GOAL_QOS)
        instruction_pub.publish(String(data="pick up the red cube"))
        wait_for(lambda: any("text encoder failed: RuntimeError: CUDA out of memory" in m
                             for m in client.diagnostic("language_node", (ERROR,))), 10, "an ERROR diagnostic",
                 graph=graph)
        assert embeddings == []
        instruction_pub.publish(String(data="pick up the blue cube"))
        wait_for(lambda: embeddings, 10, "an embedding of the next instruction", graph=graph)
        assert embeddings[-1].text == "pick up the blue cube" and len(embeddings[-1].embedding) == 384
    finally:
        graph.shutdown()


def test_declared_defaults_are_the_runners(checkpoint):
    # One home: policy_node declares PolicyRunner's defaults (the replay uses them too).
    from mail_ros.policy.runner import RunnerSettings

    graph = RosGraph(threads=2)
    try:
        node = graph.add(PolicyNode(context=graph.context, parameter_overrides=overrides(
            checkpoint=str(checkpoint), device="cpu")))
        assert node.settings == RunnerSettings()
        for name in ("max_observation_age", "max_observation_lead", "max_gap_periods", "seed"):
            assert node.get_parameter(name).value == getattr(RunnerSettings(), name)
    finally:
        graph.shutdown()


def test_the_sequence_backend_is_reported_on_diagnostics(running):
    graph, client, policy = running
    # The tiny checkpoint is a D-Ma on the CPU: the fused kernel runs (test_model_cpu_kernel.py
    # covers the fallback to the reference and its reason in the same report).
    expected = f"Mamba: {BACKEND_CPU}"
    assert policy.policy.backend == expected
    wait_for(lambda: any(k.key == "backend" and k.value == expected for s in list(client.diagnostics)
                         if "policy_node" in s.name for k in s.values), 10, "the backend on /diagnostics", graph=graph)
