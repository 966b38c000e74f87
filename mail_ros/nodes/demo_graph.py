"""The closed-loop demo graph: the simulated FR3 and the whole mail_ros pipeline, as launch runs it.

franka_sim_node (owning simulated time) and an operator run in this process
(:class:`~mail_ros.nodes.sim_session.SimSession`); camera_sync_node, language_node, policy_node
and executor_node each run in a process of their own (:class:`~mail_ros.nodes.node_process.NodeProcess`),
as ``sim_policy.launch.py`` starts them, with its parameters plus ``use_sim_time``. One process
for all of them would make every node wait for one GIL: the simulator's rendering and physics,
the policy's inference and the executor's ticks queued behind one another, and the lag between
the simulator's clock and the nodes' grew to hundreds of milliseconds, which no robot computer
running the launch files has. :meth:`DemoGraph.run_episode` drives one episode through public
interfaces only: executor_node's ``enabled`` parameter and its /diagnostics (the goal it holds),
``/mail/instruction``, the simulator's ``~/reset``, ``~/task`` (the task judged) and
``~/task_success``; with an ICIL checkpoint, policy_node's ``~/set_prompt`` (:meth:`DemoGraph.set_prompt`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters

from mail_ros.control.executor import ExecutorConfig
from mail_ros.msg import ActionChunk, InstructionEmbedding
from mail_ros.nodes.executor_node import goal_id
from mail_ros.nodes.common import GOAL_QOS, PIPELINE_QOS, now_seconds, stamp_to_seconds
from mail_ros.nodes.node_process import NodeProcess, NodeProcessError
from mail_ros.nodes.sim_session import SessionError, SimSession
from mail_ros.policy.checkpoint import describe_checkpoint
from mail_ros.sim import CAMERA_SIZE, SIM_TIME_COMMAND_LATENCY
from mail_ros.sim.collect import EpisodeOutcome, EpisodeSpec
from mail_ros.srv import SetPrompt

__all__ = ["DemoGraph", "EpisodeTrace"]

# How often (simulated seconds) the operator asks ~/task_success.
JUDGE_PERIOD = 0.25
# Wall seconds the pipeline may take to start (interpreters, torch, the text encoder, the checkpoint)
# on a busy 2-core machine.
START_TIMEOUT = 300.0


@dataclass
class EpisodeTrace:
    """What the pipeline did in one episode: chunk inference times (wall s), observation age at chunk arrival (sim s)."""

    inference: list[float] = field(default_factory=list)
    chunk_age: list[float] = field(default_factory=list)
    commands: int = 0
    # Worst arm setpoint acceleration (rad/s^2) and jerk (rad/s^3) of the simulated JTC sampled at 1 kHz.
    setpoint_acceleration: float = 0.0
    setpoint_jerk: float = 0.0
    command_delay: list[float] = field(default_factory=list)  # s from each arm command's stamp to its use


class DemoGraph:
    """Builds the graph: a :class:`SimSession` here, the pipeline nodes in their processes; a context manager."""

    def __init__(self, checkpoint: str | Path, *, seed: int, real_time_factor: float, device: str = "cpu",
                 executor_mode: str = ExecutorConfig.mode, execute_steps: int = ExecutorConfig.execute_steps,
                 domain_id: int | None = None,
                 record: str | Path | None = None, camera_size: tuple[int, int] | None = None,
                 torch_threads: int = 1, command_latency: float = SIM_TIME_COMMAND_LATENCY) -> None:
        config = describe_checkpoint(checkpoint)
        self.config = config
        # The simulated cameras keep their own resolution, whatever the model's (as on a robot, and as
        # in sim_policy.launch.py): camera_sync_node resizes, as the converter did for the training data.
        camera_size = tuple(camera_size) if camera_size is not None else CAMERA_SIZE
        self.session = SimSession(seed=seed, cameras=list(config.cameras), image_size=camera_size,
                                  real_time_factor=real_time_factor, domain_id=domain_id, threads=3)
        session, ckpt = self.session, str(Path(checkpoint).resolve())
        self._lock = threading.Lock()
        self.trace = EpisodeTrace()
        self._status: dict[str, tuple[int, str, dict[str, str]]] = {}  # node -> (level, message, values)
        self._goal: tuple[str, str] | None = None  # the newest (goal id, text) on /mail/instruction_embedding
        self.processes: list[NodeProcess] = []
        self.recording = None
        try:
            operator = session.operator
            operator.create_subscription(ActionChunk, "/mail/action_chunk", self._on_chunk, PIPELINE_QOS)
            operator.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 50)
            operator.create_subscription(InstructionEmbedding, "/mail/instruction_embedding", self._on_goal, GOAL_QOS)
            self._set_parameters = operator.create_client(SetParameters, "/executor_node/set_parameters")
            self._set_prompt = operator.create_client(SetPrompt, "/policy_node/set_prompt")
            env = {} if domain_id is None else {"ROS_DOMAIN_ID": str(domain_id)}
            common = {"use_sim_time": True}
            for module, parameters, extra_env in (
                    ("camera_sync_node", {"checkpoint": ckpt}, {}),
                    ("language_node", {"encoder": config.language_encoder or "minilm"}, {}),
                    ("policy_node", {"checkpoint": ckpt, "device": device},
                     {"OMP_NUM_THREADS": str(max(1, torch_threads))}),
                    ("executor_node", {"gripper_mode": "trajectory", "mode": executor_mode,
                                       "execute_steps": execute_steps, "command_latency": float(command_latency),
                                       "enabled": False}, {})):
                self.processes.append(NodeProcess(module, {**common, **parameters}, env={**env, **extra_env}))
            self._wait_for_pipeline()
            if record is not None:
                from mail_ros.data.recording import DEFAULT_TOPICS, BagRecording
                from mail_ros.nodes.recorder import RecorderNode

                self.recording = BagRecording(record)
                self.recorder = RecorderNode(self.recording, DEFAULT_TOPICS, context=session.context)
                self.recorder.set_parameters(session.parameters())
                session.add(self.recorder)
        except BaseException:
            self.close()
            raise

    def check(self) -> None:
        """Raise if a node callback here has raised or a node process has ended."""
        self.session.check()
        try:
            for process in self.processes:
                process.check()
        except NodeProcessError as exc:
            raise SessionError(str(exc)) from exc

    def _wait_until(self, predicate, timeout: float, what: str) -> None:
        """Poll ``predicate`` (wall ``timeout``), failing at once when a node process has ended."""
        def checked() -> bool:
            self.check()
            return predicate()

        self.session.wait_until(checked, timeout, what, period=0.01)

    def _wait_for_pipeline(self) -> None:
        """Until policy_node has loaded the checkpoint (or says why not), executor_node answers and
        language_node, the one reader of /mail/instruction, has loaded its encoder and subscribed."""
        def policy_done() -> bool:
            return "backend" in self._values("policy_node") or self._message("policy_node").startswith("no policy")

        self._wait_until(policy_done, START_TIMEOUT, "policy_node to load the checkpoint")
        if "backend" not in self._values("policy_node"):
            raise SessionError(f"policy_node: {self._message('policy_node')}")
        self._wait_until(lambda: self._set_parameters.service_is_ready() and bool(self._values("executor_node")),
                         START_TIMEOUT, "executor_node")
        self._wait_until(lambda: self.session.operator.count_subscribers("/mail/instruction") > 0, START_TIMEOUT,
                         "language_node to subscribe to /mail/instruction")

    def _on_chunk(self, msg: ActionChunk) -> None:
        age = now_seconds(self.session.operator) - stamp_to_seconds(msg.header.stamp)
        with self._lock:
            self.trace.inference.append(msg.inference_time)
            self.trace.chunk_age.append(age)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        with self._lock:
            for status in msg.status:
                values = {kv.key: kv.value for kv in status.values}
                self._status[status.name.removeprefix("mail_ros: /")] = (status.level, status.message, values)

    def _on_goal(self, msg: InstructionEmbedding) -> None:
        with self._lock:
            self._goal = (goal_id(msg.text, msg.header.stamp), msg.text)

    def _values(self, node: str) -> dict[str, str]:
        with self._lock:
            return self._status.get(node, (0, "", {}))[2]

    def _message(self, node: str) -> str:
        with self._lock:
            return self._status.get(node, (0, "", {}))[1]

    def _enable(self, enabled: bool) -> None:
        value = ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=enabled)
        future = self._set_parameters.call_async(SetParameters.Request(
            parameters=[ParameterMsg(name="enabled", value=value)]))
        self._wait_until(future.done, 60.0, f"executor_node to set enabled={enabled}")
        result = future.result().results[0]
        if not result.successful:
            raise SessionError(f"executor_node refused enabled={enabled}: {result.reason}")

    def set_prompt(self, paths: list[str]) -> SetPrompt.Response:
        """Hand policy_node (an ICIL checkpoint) the demonstrations at ``paths`` (absolute) through
        its ``~/set_prompt``, as ``mail-ros prompt`` does; returns its answer (success, K, message).
        The prompt stays in use for the following episodes, each a new episode of the same task."""
        self._wait_until(self._set_prompt.service_is_ready, 60.0, "policy_node's ~/set_prompt")
        future = self._set_prompt.call_async(SetPrompt.Request(paths=list(paths)))
        self._wait_until(future.done, START_TIMEOUT, "the answer of policy_node's ~/set_prompt")
        return future.result()

    def run_episode(self, spec: EpisodeSpec, budget: float) -> tuple[EpisodeOutcome, EpisodeTrace]:
        """Reset, instruct, let the policy act until success or ``budget`` simulated seconds."""
        session = self.session
        # Nothing may move the arm across the reset: the executor ramps in again afterwards.
        self._enable(False)
        session.reset()
        session.sleep(0.1)
        with self._lock:
            previous_goal = self._goal
            self.trace = EpisodeTrace()
        session.instruct(spec.instruction, spec.task)
        # Enable only once the executor holds the new goal, so no chunk of the old one is executed.
        self._wait_until(lambda: self._goal != previous_goal and self._goal[1] == spec.instruction, 60.0,
                         f"language_node to encode {spec.instruction!r}")
        self._wait_until(lambda: self._values("executor_node").get("goal") == self._goal[0], 60.0,
                         f"executor_node to receive the goal {spec.instruction!r}")
        self._take_setpoint_extremes()  # what the reset did to the setpoint is not the pipeline's
        self._enable(True)
        start = session.now()
        while True:
            session.sleep(JUDGE_PERIOD)
            self.check()
            progress = session.task_progress()
            if progress.success or session.now() - start >= budget:
                break
        seconds = session.now() - start
        self._enable(False)
        acceleration, jerk, delays = self._take_setpoint_extremes()
        with self._lock:
            trace = self.trace
            trace.setpoint_acceleration, trace.setpoint_jerk, trace.command_delay = acceleration, jerk, delays
            trace.commands = len(delays)  # every arm command the simulator applied
        note = "" if trace.commands else "no command reached the arm"
        return EpisodeOutcome(spec, progress.success, seconds, note=note, progress=progress), trace

    def _take_setpoint_extremes(self) -> tuple[float, float, list[float]]:
        sim_node = self.session.sim
        with sim_node._lock:
            delays, sim_node.command_delays = sim_node.command_delays, []
            return (*sim_node.sim.setpoint_monitor.take(), delays)

    def close(self) -> None:
        """Stop the node processes (SIGINT, as launch does), then the session here."""
        try:
            for process in reversed(self.processes):
                process.stop()
            self.session.close()
        finally:
            if self.recording is not None:
                self.recording.close()

    def __enter__(self) -> "DemoGraph":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
