"""The closed-loop demo graph: the simulated FR3 and the whole mail_ros pipeline in one process.

franka_sim_node (owning simulated time), camera_sync_node, language_node, policy_node and
executor_node: the node classes the launch files start, with the parameters
``sim_policy.launch.py`` gives them plus ``use_sim_time``, spun by one MultiThreadedExecutor
(:class:`~mail_ros.nodes.sim_session.SimSession`). :meth:`DemoGraph.run_episode` drives one
episode through public interfaces only: the executor's ``enabled`` parameter, the simulator's
``~/reset``, ``/mail/instruction`` (``~/task`` for paraphrases) and ``~/task_success``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from rclpy.parameter import Parameter
from trajectory_msgs.msg import JointTrajectory

from mail_ros.msg import ActionChunk
from mail_ros.nodes.camera_sync_node import CameraSyncNode
from mail_ros.nodes.common import COMMAND_QOS, PIPELINE_QOS, now_seconds, stamp_to_seconds
from mail_ros.nodes.executor_node import ExecutorNode
from mail_ros.nodes.language_node import LanguageNode
from mail_ros.nodes.policy_node import PolicyNode
from mail_ros.nodes.sim_session import SessionError, SimSession
from mail_ros.policy.checkpoint import describe_checkpoint
from mail_ros.sim import CAMERA_SIZE
from mail_ros.sim.collect import EpisodeOutcome, EpisodeSpec

__all__ = ["DemoGraph", "EpisodeTrace"]

# How often (simulated seconds) the operator asks ~/task_success.
JUDGE_PERIOD = 0.25


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
    """Builds the graph on a :class:`SimSession`; use as a context manager."""

    def __init__(self, checkpoint: str | Path, *, seed: int, real_time_factor: float, device: str = "cpu",
                 executor_mode: str = "receding_horizon", execute_steps: int = 0, domain_id: int | None = None,
                 record: str | Path | None = None, camera_size: tuple[int, int] | None = None) -> None:
        config = describe_checkpoint(checkpoint)
        self.config = config
        # The simulated cameras keep their own resolution, whatever the model's (as on a robot, and as
        # in sim_policy.launch.py): camera_sync_node resizes, as the converter did for the training data.
        camera_size = tuple(camera_size) if camera_size is not None else CAMERA_SIZE
        self.session = SimSession(seed=seed, cameras=list(config.cameras), image_size=camera_size,
                                  real_time_factor=real_time_factor, domain_id=domain_id)
        session, ckpt = self.session, str(checkpoint)
        try:
            self.camera_sync = session.add(CameraSyncNode(
                context=session.context, parameter_overrides=session.parameters(checkpoint=ckpt)))
            self.language = session.add(LanguageNode(
                context=session.context,
                parameter_overrides=session.parameters(encoder=config.language_encoder or "minilm")))
            self.policy = session.add(PolicyNode(
                context=session.context, parameter_overrides=session.parameters(checkpoint=ckpt, device=device)))
            if self.policy.policy is None:
                raise SessionError(f"policy_node could not load {ckpt} (see its log)")
            self.executor = session.add(ExecutorNode(
                context=session.context, parameter_overrides=session.parameters(
                    gripper_mode="trajectory", mode=executor_mode, execute_steps=execute_steps, enabled=False)))
            self.recording = None
            if record is not None:
                from mail_ros.data.recording import DEFAULT_TOPICS, BagRecording
                from mail_ros.nodes.recorder import RecorderNode

                self.recording = BagRecording(record)
                self.recorder = RecorderNode(self.recording, DEFAULT_TOPICS, context=session.context)
                self.recorder.set_parameters(session.parameters())
                session.add(self.recorder)
        except BaseException:
            session.close()
            raise
        self._lock = threading.Lock()
        self.trace = EpisodeTrace()
        operator = session.operator
        operator.create_subscription(ActionChunk, "/mail/action_chunk", self._on_chunk, PIPELINE_QOS)
        operator.create_subscription(JointTrajectory, "/fr3_arm_controller/joint_trajectory", self._on_command,
                                     COMMAND_QOS)

    def _on_chunk(self, msg: ActionChunk) -> None:
        age = now_seconds(self.session.operator) - stamp_to_seconds(msg.header.stamp)
        with self._lock:
            self.trace.inference.append(msg.inference_time)
            self.trace.chunk_age.append(age)

    def _on_command(self, msg: JointTrajectory) -> None:
        with self._lock:
            self.trace.commands += 1

    def _enable(self, enabled: bool) -> None:
        result = self.executor.set_parameters([Parameter("enabled", value=enabled)])[0]
        if not result.successful:
            raise SessionError(f"executor_node refused enabled={enabled}: {result.reason}")

    def run_episode(self, spec: EpisodeSpec, budget: float) -> tuple[EpisodeOutcome, EpisodeTrace]:
        """Reset, instruct, let the policy act until success or ``budget`` simulated seconds."""
        session = self.session
        # Nothing may move the arm across the reset: the executor ramps in again afterwards.
        self._enable(False)
        session.reset()
        session.sleep(0.1)
        previous_goal = self.executor.goal_id
        with self._lock:
            self.trace = EpisodeTrace()
        judge = spec.task.instruction if spec.instruction != spec.task.instruction else None
        session.instruct(spec.instruction, judge=judge)
        # Enable only once the executor holds the new goal, so no chunk of the old one is executed.
        session.wait_until(lambda: self.executor.goal_id != previous_goal, 30.0,
                           f"executor_node to receive the goal {spec.instruction!r}")
        self._take_setpoint_extremes()  # what the reset did to the setpoint is not the pipeline's
        self._enable(True)
        start = session.now()
        while True:
            session.sleep(JUDGE_PERIOD)
            progress = session.task_progress()
            if progress.success or session.now() - start >= budget:
                break
        seconds = session.now() - start
        self._enable(False)
        acceleration, jerk, delays = self._take_setpoint_extremes()
        with self._lock:
            trace = self.trace
            trace.setpoint_acceleration, trace.setpoint_jerk, trace.command_delay = acceleration, jerk, delays
        note = "" if trace.commands else "no command reached the arm"
        return EpisodeOutcome(spec, progress.success, seconds, note=note, progress=progress), trace

    def _take_setpoint_extremes(self) -> tuple[float, float, list[float]]:
        sim_node = self.session.sim
        with sim_node._lock:
            delays, sim_node.command_delays = sim_node.command_delays, []
            return (*sim_node.sim.setpoint_monitor.take(), delays)

    def close(self) -> None:
        try:
            self.session.close()
        finally:
            if self.recording is not None:
                self.recording.close()

    def __enter__(self) -> "DemoGraph":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
