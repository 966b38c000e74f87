"""policy_node with an ICIL checkpoint over real DDS: the prompt from the start-up parameter and
~/set_prompt, a prompt as a new goal on /mail/instruction_embedding that the chunks carry,
refused prompts that leave the previous one in use, no chunks without a prompt, and the
prompt's K, frames and prefill time on /diagnostics."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from mail_ros.cli import main as cli_main
from mail_ros.msg import ActionChunk, InstructionEmbedding
from mail_ros.msg import Observation as ObservationMsg
from mail_ros.nodes.common import GOAL_QOS, PIPELINE_QOS, now_seconds, seconds_to_stamp, stamp_ns
from mail_ros.nodes.policy_node import PolicyNode
from mail_ros.spec import FR3_HOME
from mail_ros.srv import SetPrompt
from ros_harness import RosGraph, overrides, wait_for

from icil_demos import JOINTS, write_demos

pytestmark = pytest.mark.ros
TIMEOUT = 30.0
TASKS = {"pick up the red cube": 0, "pick up the green cube": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("icil")
    assert cli_main(["checkpoint", "init", "--preset", "icil-tiny-ma", "--out", str(root / "icil")]) == 0
    assert cli_main(["checkpoint", "init", "--preset", "tiny-d_ma-bc", "--out", str(root / "mail")]) == 0
    write_demos(root / "demos.hdf5", TASKS, per_task=2, n=6)
    write_demos(root / "small.hdf5", TASKS, per_task=1, size=(32, 32))
    return root


class Client:
    """Streams observations (on request), records chunks, goals and diagnostics, calls ~/set_prompt."""

    def __init__(self, graph: RosGraph):
        self.graph = graph
        self.node = graph.node("icil_client")
        self.lock = threading.Lock()
        self.chunks: list[ActionChunk] = []
        self.goals: list[InstructionEmbedding] = []
        self.diagnostics: list = []
        self.streaming = False
        self.rng = np.random.default_rng(0)
        self.observation_pub = self.node.create_publisher(ObservationMsg, "/mail/observation", PIPELINE_QOS)
        self.node.create_subscription(ActionChunk, "/mail/action_chunk", self._on_chunk, PIPELINE_QOS)
        self.node.create_subscription(InstructionEmbedding, "/mail/instruction_embedding",
                                      lambda m: self._append(self.goals, m), GOAL_QOS)
        self.node.create_subscription(DiagnosticArray, "/diagnostics",
                                      lambda m: self._append(self.diagnostics, *m.status), 50)
        self.node.create_timer(0.1, lambda: self.streaming and self.observe())
        self.client = self.node.create_client(SetPrompt, "/policy_node/set_prompt")

    def _append(self, items: list, *values) -> None:
        with self.lock:
            items.extend(values)

    def _on_chunk(self, msg: ActionChunk) -> None:
        self._append(self.chunks, msg)

    def since(self, items: list, n: int) -> list:
        with self.lock:
            return items[n:]

    def observe(self) -> None:
        msg = ObservationMsg(header=Header(stamp=seconds_to_stamp(now_seconds(self.node))),
                             camera_names=["agentview", "wrist"])
        for _ in msg.camera_names:
            msg.images.append(Image(height=64, width=64, encoding="rgb8", step=64 * 3,
                                    data=self.rng.integers(0, 256, 64 * 64 * 3, dtype=np.uint8).tobytes()))
        msg.joint_state.name = list(JOINTS)
        msg.joint_state.position = list(FR3_HOME + (0.04, 0.04))
        self.observation_pub.publish(msg)

    def set_prompt(self, paths: list[str]) -> SetPrompt.Response:
        wait_for(self.client.service_is_ready, TIMEOUT, "the ~/set_prompt service", graph=self.graph)
        future = self.client.call_async(SetPrompt.Request(paths=paths))
        wait_for(future.done, TIMEOUT, "the answer of ~/set_prompt", graph=self.graph)
        return future.result()

    def status(self, key: str) -> list[str]:
        with self.lock:
            return [v.value for s in self.diagnostics if "policy_node" in s.name for v in s.values if v.key == key]


def _identity(msg) -> tuple[str, int]:
    if isinstance(msg, ActionChunk):
        return msg.instruction, stamp_ns(msg.instruction_stamp)
    return msg.text, stamp_ns(msg.header.stamp)


@pytest.fixture
def graph():
    graph = RosGraph(threads=4)
    yield graph
    graph.shutdown()


def _start(graph: RosGraph, checkpoint, **params) -> tuple[Client, PolicyNode]:
    client = Client(graph)
    policy = graph.add(PolicyNode(context=graph.context, parameter_overrides=overrides(
        checkpoint=str(checkpoint), device="cpu", max_observation_age=30.0, **params)))
    wait_for(lambda: client.observation_pub.get_subscription_count() > 0, TIMEOUT, "policy_node's subscription",
             graph=graph)
    return client, policy


def test_prompt_at_start_up_is_a_goal_that_the_chunks_carry(graph, files):
    demos = files / "demos.hdf5"
    client, policy = _start(graph, files / "icil", prompt=[f"{demos}:demo_2", f"{demos}:demo_3"])
    assert policy.icil and policy.runner.prompt.k == 2
    wait_for(lambda: client.since(client.goals, 0), TIMEOUT, "the prompt's goal announcement", graph=graph)
    (goal,) = client.since(client.goals, 0)
    assert goal.text == "pick up the green cube" and goal.encoder == "" and list(goal.embedding) == []
    client.streaming = True
    wait_for(lambda: len(client.since(client.chunks, 0)) >= 3, TIMEOUT, "chunks", graph=graph)
    assert {_identity(c) for c in client.since(client.chunks, 0)} == {_identity(goal)}
    wait_for(lambda: "12" in client.status("prompt_frames"), TIMEOUT, "the prompt on /diagnostics", graph=graph)
    assert "2" in client.status("prompt_k") and client.status("prompt_prefill_ms")
    assert len(client.since(client.goals, 0)) == 1  # its own announcement coming back is not a new goal
    # The parameter is the start-up prompt; changing it is refused with a pointer to the service.
    result = policy.set_parameters([Parameter("prompt", value=[str(demos)])])[0]
    assert not result.successful and policy.runner.prompt.k == 2


def test_set_prompt_swaps_refuses_and_clears(graph, files):
    demos, small = files / "demos.hdf5", files / "small.hdf5"
    client, policy = _start(graph, files / "icil")
    client.streaming = True
    # No prompt: observations are taken in, no chunk is made.
    wait_for(lambda: policy.runner.history.window(), TIMEOUT, "observations at policy_node", graph=graph)
    wait_for(lambda: any("waiting for a prompt" in s.message for s in client.since(client.diagnostics, 0)),
             TIMEOUT, "'waiting for a prompt' on /diagnostics", graph=graph)
    refused = client.set_prompt([str(small)])
    assert not refused.success and "images are 32x32 but the policy expects 64x64" in refused.message
    assert (refused.k, refused.frames, refused.prefill_ms) == (0, 0, 0.0) and policy.runner.prompt is None
    assert not client.since(client.chunks, 0)

    first = client.set_prompt([f"{demos}:demo_0"])
    assert first.success, first.message
    assert (first.k, first.frames) == (1, 6) and first.prefill_ms > 0 and "K=1" in first.message
    wait_for(lambda: client.since(client.goals, 0), TIMEOUT, "the first prompt's goal", graph=graph)
    first_goal = _identity(client.since(client.goals, 0)[-1])
    wait_for(lambda: client.since(client.chunks, 0), TIMEOUT, "chunks of the first prompt", graph=graph)

    second = client.set_prompt([str(demos)])  # all four demonstrations, two tasks
    assert second.success and (second.k, second.frames) == (4, 24)
    wait_for(lambda: len(client.since(client.goals, 0)) >= 2, TIMEOUT, "the second prompt's goal", graph=graph)
    second_goal = _identity(client.since(client.goals, 0)[-1])
    assert second_goal[0].startswith(f"prompt: {demos}:demo_0") and second_goal[1] > first_goal[1]
    n = len(client.since(client.chunks, 0))
    wait_for(lambda: any(_identity(c) == second_goal for c in client.since(client.chunks, n)), TIMEOUT,
             "chunks of the second prompt", graph=graph)
    later = client.since(client.chunks, n)
    first_new = next(i for i, c in enumerate(later) if _identity(c) == second_goal)
    assert all(_identity(c) == second_goal for c in later[first_new:])  # never the old goal again

    again = client.set_prompt([f"{demos}:demo_0", str(files / "missing.hdf5")])
    assert not again.success and "missing.hdf5: no such file" in again.message
    assert "the previous prompt (K=4" in again.message and (again.k, again.frames) == (4, 24)
    n = len(client.since(client.chunks, 0))
    wait_for(lambda: len(client.since(client.chunks, n)) >= 2, TIMEOUT, "chunks after the refusal", graph=graph)
    assert {_identity(c) for c in client.since(client.chunks, n)} == {second_goal}
    assert len(client.since(client.goals, 0)) == 2

    cleared = client.set_prompt([])
    assert cleared.success and "no chunks" in cleared.message and policy.runner.prompt is None
    n = len(client.since(client.chunks, 0))
    stamp = policy.runner.history.window()[-1].stamp
    wait_for(lambda: policy.runner.history.window() and policy.runner.history.window()[-1].stamp > stamp + 3 * 10**8,
             TIMEOUT, "more observations at policy_node", graph=graph)
    assert len(client.since(client.chunks, n)) <= 1  # at most the one being computed when it was cleared


def test_a_mail_checkpoint_refuses_prompts(graph, files):
    client, policy = _start(graph, files / "mail")
    assert not policy.icil
    answer = client.set_prompt([str(files / "demos.hdf5")])
    assert not answer.success and "is a mail checkpoint; prompts need an ICIL one" in answer.message


def test_mail_ros_prompt_calls_the_service_with_absolute_paths(graph, files, capsys, monkeypatch):
    _, policy = _start(graph, files / "icil")
    monkeypatch.chdir(files)  # relative paths: the node resolves them from the caller's folder
    assert cli_main(["prompt", "demos.hdf5:demo_1", "demos.hdf5:/data/demo_0"]) == 0
    out = capsys.readouterr().out
    assert "goal 'pick up the red cube'" in out and "K=2, 12 prompt frames, prefill" in out
    assert policy.runner.prompt.paths == (f"{files / 'demos.hdf5'}:demo_1", f"{files / 'demos.hdf5'}:demo_0")
    assert cli_main(["prompt", "small.hdf5"]) == 1
    assert "images are 32x32" in capsys.readouterr().err and policy.runner.prompt.k == 2
    assert cli_main(["prompt", "--clear"]) == 0 and policy.runner.prompt is None
    assert cli_main(["prompt"]) == 2
    assert cli_main(["prompt", "demos.hdf5", "--service", "/nobody/set_prompt", "--timeout", "0.5"]) == 2
    assert "no /nobody/set_prompt service within 0.5 s" in capsys.readouterr().err


def test_the_executor_takes_each_prompt_as_a_new_goal(graph, files):
    from mail_ros.nodes.executor_node import ExecutorNode

    demos = files / "demos.hdf5"
    client, policy = _start(graph, files / "icil")
    executor = graph.add(ExecutorNode(context=graph.context, parameter_overrides=overrides(enabled=False)))

    def executor_goal(msg) -> str:  # the executor's goal identity: "sec.nanosec:text"
        return f"{msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d}:{msg.text}"

    for k, paths in enumerate(([f"{demos}:demo_0"], [f"{demos}:demo_2", f"{demos}:demo_3"])):
        assert client.set_prompt(paths).success
        wait_for(lambda: len(client.since(client.goals, 0)) > k, TIMEOUT, f"prompt {k}'s goal", graph=graph)
        announced = client.since(client.goals, 0)[k]
        wait_for(lambda: executor.goal_id == executor_goal(announced), TIMEOUT,
                 f"executor_node on prompt {k}'s goal", graph=graph)
    assert executor.goal_id.endswith(":pick up the green cube")
