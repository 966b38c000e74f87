"""policy_node: /mail/observation + /mail/instruction_embedding -> /mail/action_chunk.

With an ICIL checkpoint (``policy_type`` "icil") the task comes from a prompt of
demonstrations: the ``prompt`` parameter at start-up and the ``~/set_prompt`` service
(mail_ros/srv/SetPrompt) while running, e.g.

    ros2 service call /policy_node/set_prompt mail_ros/srv/SetPrompt "{paths: ['demos.hdf5']}"

An accepted prompt is a new goal: it is announced on /mail/instruction_embedding (text: the
demonstrations' instruction or their names; no embedding) so the executor drops older chunks,
and its K, frames and prefill time go to the log and /diagnostics. A refused prompt (files
that do not match the checkpoint's contract) is answered with the reason and leaves the
previous prompt in place; with no prompt there are no chunks. The rules are the core's
:class:`~mail_ros.policy.icil_runner.ICILRunner`.

The rules between a message and a chunk (goal checks, the stamp gate and age limit, the
history, chunk checks) are the core :class:`~mail_ros.policy.runner.PolicyRunner`, which the
offline replay runs too; this node converts messages, serialises the runner's calls and runs its
predictions on a worker thread. Subscriptions only validate and store, so a slow chunk
never blocks message handling. Every refusal (wrong cameras or resolution, wrong embedding
dimension or encoder, stale, future-stamped or non-finite observations) is logged, counted on
/diagnostics, and results in no chunk: downstream, the executor holds. A refused goal also
drops the current one, so the robot never keeps executing an instruction that was replaced.
Observations not newer than the last are counted (out_of_order_observations); one stamped
before the last restarts the history (time went backwards, e.g. a simulator restart). The
/diagnostics level reflects the last report period: WARN or ERROR only while problems recur.

For RViz, each chunk of FR3 joint targets is also drawn as the path of the hand's tool-centre
point (forward kinematics from the current joints through the A targets) on
/mail/predicted_path, in the arm's base frame; the marker expires when the chunk would end, so
a policy that stops publishing leaves no stale path on screen.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from geometry_msgs.msg import Point, Vector3
from rclpy.parameter import Parameter
from rclpy.node import Node
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker

from mail_ros.control.kinematics import arm_columns, fr3_tcp_poses
from mail_ros.msg import ActionChunk, InstructionEmbedding
from mail_ros.msg import Observation as ObservationMsg
from mail_ros.nodes.common import (ERROR, GOAL_QOS, OK, PIPELINE_QOS, WARN, Diagnostics, declare, now_ns,
                                   ns_to_time, run_node, seconds_to_duration, stamp_ns)
from mail_ros.policy.runner import Chunk, Goal, PolicyRunner, RunnerSettings
from mail_ros.spec import Observation
from mail_ros.srv import SetPrompt
from mail_ros.sync.observation import ObservationError, decode_image, select_joints


class PolicyNode(Node):
    def __init__(self, **kwargs):
        super().__init__("policy_node", **kwargs)
        defaults = RunnerSettings()
        self.checkpoint_dir = declare(self, "checkpoint", "", "Checkpoint directory (config.json + model.safetensors)")
        device = declare(self, "device", "auto", "Torch device: auto (CUDA when available), cpu, cuda, cuda:N")
        max_age = declare(self, "max_observation_age", defaults.max_observation_age, "Observations older than this "
                          "(s, by the node clock) are refused", low=0.0)
        max_lead = declare(self, "max_observation_lead", defaults.max_observation_lead, "Observations stamped further "
                           "ahead of the node clock than this (s) are refused: the clocks are out of sync",
                           low=0.0)
        max_gap_periods = declare(self, "max_gap_periods", defaults.max_gap_periods, "A gap between consecutive "
                                  "observations longer than this many policy periods restarts the history",
                                  low=0.0)
        seed = declare(self, "seed", defaults.seed, "Seed of the policy's sampler (DDPM); reset with every new goal",
                       low=0)
        try:
            self.settings = RunnerSettings(max_observation_age=max_age, max_observation_lead=max_lead,
                                           max_gap_periods=max_gap_periods, seed=seed)
        except ValueError as exc:
            raise SystemExit(f"policy_node: {exc}") from exc
        prompt = declare(self, "prompt", Parameter.Type.STRING_ARRAY, "ICIL checkpoints: the demonstrations to "
                         "imitate from start-up: HDF5 files from 'mail-ros convert', episode groups "
                         "(FILE.hdf5:demo_N) or rosbag2 folders; change them with ~/set_prompt",
                         read_only=True)
        self.base_frame = declare(self, "base_frame", "fr3_link0", "Frame of the predicted hand path marker: the "
                                  "arm's base link (with any prefix your robot description uses)")
        self.diagnostics = Diagnostics(self)
        self.counters = {"chunks": 0, "refused_observations": 0, "refused_embeddings": 0, "inference_errors": 0,
                         "non_finite_chunks": 0, "out_of_order_observations": 0, "history_restarts": 0}
        # level -> latest message of the problems since the last report (see _problem)
        self._problems: dict[int, str] = {}
        self._problems_lock = threading.Lock()
        self.latencies: deque[float] = deque(maxlen=200)

        # Guards the runner (all but its predict, which only the inference thread calls).
        self._lock = threading.Lock()
        # Guards the policy: the inference thread's predictions and prompt swaps (ICIL). Taken
        # before _lock when both are held.
        self._policy_lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False

        self.runner: PolicyRunner | None = None  # None: no policy loaded (the node stays up to say why)
        self.checkpoint = None  # CheckpointDescription, once loaded
        self._arm_columns = None  # (action columns, joint columns) of fr3_joint1..7, for the path marker
        self._load(device)

        # ICIL: a prompt's goal announcement, on the one goal channel the executor listens to.
        self.goal_publisher = None
        if self.icil:
            self.goal_publisher = self.create_publisher(InstructionEmbedding, "mail/instruction_embedding", GOAL_QOS)
        self.create_service(SetPrompt, "~/set_prompt", self._on_set_prompt)
        if prompt:
            self.set_prompt(list(prompt))
        self.publisher = self.create_publisher(ActionChunk, "mail/action_chunk", PIPELINE_QOS)
        self.path_publisher = self.create_publisher(Marker, "mail/predicted_path", PIPELINE_QOS)
        self.create_subscription(ObservationMsg, "mail/observation", self._on_observation, PIPELINE_QOS)
        self.create_subscription(InstructionEmbedding, "mail/instruction_embedding", self._on_embedding, GOAL_QOS)
        self._worker = threading.Thread(target=self._inference_loop, name="mail_policy_inference", daemon=True)
        self._worker.start()
        self.create_timer(1.0, self._report)

    @property
    def policy(self):
        """The loaded policy (a MaILPolicy, or an ICILPolicy behind its streaming adapter), or None."""
        return None if self.runner is None else self.runner.policy

    @property
    def icil(self) -> bool:
        """An ICIL checkpoint is loaded: it acts on a prompt of demonstrations."""
        from mail_ros.policy.icil_runner import ICILRunner

        return isinstance(self.runner, ICILRunner)

    # --- start-up -------------------------------------------------------------------------------
    def _load(self, device: str) -> None:
        import torch

        from mail_ros.policy.checkpoint import CheckpointError, describe_checkpoint, load_checkpoint

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            if not self.checkpoint_dir:
                raise CheckpointError("no checkpoint given (parameter 'checkpoint')")
            self.checkpoint = describe_checkpoint(self.checkpoint_dir)
            policy = load_checkpoint(self.checkpoint_dir, device=device)
            if self.checkpoint.policy_type == "icil":
                from mail_ros.policy.icil_runner import ICILRunner

                runner = ICILRunner(policy, self.settings)
            else:
                runner = PolicyRunner(policy, self.settings)
            latency = runner.warm_up()
        except Exception as exc:  # noqa: BLE001 - whatever fails, the node must stay up to say so
            # Stay up in a safe state: no chunk is ever published, and the reason is visible.
            self.get_logger().error(f"cannot load policy {self.checkpoint_dir}: {exc}")
            self.diagnostics.set(ERROR, f"no policy loaded: {exc}")
            return
        self.runner = runner
        self.device = device
        if self.checkpoint.action_space == "joint_position":
            action_columns = arm_columns(self.checkpoint.action_names)
            joint_columns = arm_columns(self.checkpoint.joint_names)
            if action_columns is not None and joint_columns is not None:
                self._arm_columns = (action_columns, joint_columns)
        memory = ""
        if device.startswith("cuda"):
            memory = f", GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        self.get_logger().info(
            f"loaded {self.checkpoint_dir} on {device} ({self.policy.backend}); cameras "
            f"{list(self.checkpoint.cameras)}, T={self.checkpoint.obs_horizon}, A={self.checkpoint.action_horizon}, "
            f"warm-up chunk {latency * 1e3:.1f} ms{memory}")
        self.diagnostics.set(OK, "policy loaded; " + self._waiting(), device=device,
                             backend=self.policy.backend, warmup_ms=f"{latency * 1e3:.1f}")

    def _waiting(self) -> str:
        if self.icil and self.runner.prompt is None:
            return "waiting for a prompt (parameter 'prompt' or ~/set_prompt)"
        return "waiting for a goal"

    # --- prompts (ICIL) -------------------------------------------------------------------------
    def _on_set_prompt(self, request: SetPrompt.Request, response: SetPrompt.Response) -> SetPrompt.Response:
        response.success, response.message = self.set_prompt(list(request.paths))
        prompt = self.runner.prompt if self.icil else None
        if prompt is not None:
            response.k, response.frames = prompt.k, prompt.frames
            response.prefill_ms = prompt.info.prefill_s * 1e3 if response.success else 0.0
        return response

    def set_prompt(self, paths: list[str]) -> tuple[bool, str]:
        """Make the demonstrations at ``paths`` the prompt (an empty list clears it): (accepted?, what
        happened or why not). A refused prompt leaves the previous one in place."""
        from mail_ros.policy.icil_runner import PromptError, prompt_goal

        if not self.icil:
            reason = ("no policy loaded" if self.runner is None else
                      f"{self.checkpoint_dir} is a {self.checkpoint.policy_type} checkpoint; prompts need an ICIL one")
            self.get_logger().error(f"refused prompt: {reason}")
            return False, f"refused prompt: {reason}"
        with self._policy_lock:
            if not paths:
                with self._lock:
                    self.runner.clear_prompt()
                self.get_logger().warning("prompt cleared: no chunks until a new prompt is set")
                self.diagnostics.set(WARN, "prompt cleared; " + self._waiting())
                return True, "prompt cleared; no chunks until a new prompt is set"
            try:
                prompt = self.runner.load_prompt(paths)
            except PromptError as exc:
                kept = "none" if self.runner.prompt is None else self.runner.prompt.describe()
                self.get_logger().error(f"refused prompt {paths}: {exc}; keeping the previous prompt ({kept})")
                self._problem(WARN, f"refused prompt: {exc}")
                return False, f"refused prompt: {exc}; the previous prompt ({kept}) stays in use"
            goal = prompt_goal(prompt, now_ns(self))
            with self._lock:
                self.runner.use_prompt(prompt, goal)
        self.goal_publisher.publish(InstructionEmbedding(header=Header(stamp=ns_to_time(goal.stamp)), text=goal.text,
                                                         encoder="", embedding=[]))
        self.get_logger().info(f"new prompt, goal {goal.text!r}: {prompt.describe()}")
        self.diagnostics.set(OK, f"new prompt: {goal.text}", **self._prompt_values())
        return True, f"prompt set, goal {goal.text!r}: {prompt.describe()}"

    def _prompt_values(self) -> dict[str, str]:
        prompt = self.runner.prompt if self.icil else None
        if prompt is None:
            return {"prompt_k": "0", "prompt_frames": "0"} if self.icil else {}
        return {"prompt_k": str(prompt.k), "prompt_frames": str(prompt.frames),
                "prompt_prefill_ms": f"{prompt.info.prefill_s * 1e3:.1f}",
                "prompt_encode_ms": f"{prompt.info.encode_s * 1e3:.1f}"}

    # --- subscriptions: validate and store ------------------------------------------------------
    def _problem(self, level: int, message: str) -> None:
        """Show a problem on /diagnostics now; _report keeps it there until a period passes without one."""
        with self._problems_lock:
            self._problems[level] = message
            worst = max(self._problems)
            self.diagnostics.set(worst, self._problems[worst], last_problem=message)

    def _refuse(self, kind: str, reason: str) -> None:
        self.counters[f"refused_{kind}"] += 1
        self.get_logger().error(f"refused {kind[:-1]}: {reason}", throttle_duration_sec=2.0)
        self._problem(WARN, f"refusing {kind}: {reason}")

    def _on_embedding(self, msg: InstructionEmbedding) -> None:
        if self.runner is None:
            return
        goal = Goal(text=msg.text, vector=np.asarray(msg.embedding, dtype=np.float32), encoder=msg.encoder,
                    stamp=stamp_ns(msg.header.stamp))
        with self._lock:
            previous = self.runner.goal
            reason = self.runner.set_goal(goal)
            if reason is None and self.runner.goal is previous:
                return  # the goal in use already (a prompt's own announcement)
        if reason is not None:
            self._refuse("embeddings", reason)
        if reason is None:
            self.get_logger().info(f"new goal: {msg.text!r}")
        elif previous is not None:
            self.get_logger().warning(f"goal {previous.text!r} dropped: its replacement was refused ({reason}); "
                                      "no chunk until a valid goal arrives")

    def _on_observation(self, msg: ObservationMsg) -> None:
        if self.runner is None:
            return
        try:
            observation = self._to_observation(msg)
        except ObservationError as exc:
            self._refuse("observations", str(exc))
            return
        with self._lock:
            outcome = self.runner.observe(observation, now_ns(self))
            if self.runner.ready:
                self._wake.notify()
        if outcome.refused:
            self._refuse("observations", outcome.message)
        elif outcome.kind in ("duplicate", "backwards"):
            self.counters["out_of_order_observations"] += 1
            self.get_logger().warning(outcome.message, throttle_duration_sec=2.0)
            self._problem(WARN, "ignoring observations stamped like the last one" if outcome.kind == "duplicate"
                          else "time went backwards; history restarted")
        if outcome.kind in ("backwards", "restart"):
            self.counters["history_restarts"] += 1
            if outcome.kind == "restart":
                self.get_logger().warning(outcome.message)

    def _to_observation(self, msg: ObservationMsg) -> Observation:
        cameras = list(self.checkpoint.cameras)
        if list(msg.camera_names) != cameras:
            raise ObservationError(f"cameras {list(msg.camera_names)}, checkpoint expects {cameras}")
        if len(msg.images) != len(cameras):
            raise ObservationError(f"{len(msg.images)} images for {len(cameras)} cameras")
        size = tuple(self.checkpoint.image_size)
        images = {}
        for camera, image in zip(cameras, msg.images):
            if (image.height, image.width) != size:
                raise ObservationError(f"camera {camera!r} image is {image.height}x{image.width}, checkpoint "
                                       f"expects {size[0]}x{size[1]}")
            try:
                images[camera] = decode_image(image)
            except ValueError as exc:
                raise ObservationError(f"camera {camera!r}: {exc}") from exc
        joints = select_joints(list(msg.joint_state.name), list(msg.joint_state.position),
                               self.checkpoint.joint_names)
        return Observation(stamp=stamp_ns(msg.header.stamp), images=images, joint_positions=joints)

    # --- inference, off the subscription path ---------------------------------------------------
    def _inference_loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or (self.runner is not None and self.runner.ready)):
                    self._wake.wait(timeout=0.5)
                if self._stopping:
                    return
                request = self.runner.take()
            start = time.perf_counter()
            try:
                with self._policy_lock:
                    actions = self.runner.predict(request)
            except Exception as exc:  # noqa: BLE001 - this thread must outlive any one bad chunk
                # No chunk: the executor holds once the last one goes stale.
                self.get_logger().error(f"inference failed: {type(exc).__name__}: {exc}", throttle_duration_sec=2.0)
                self._problem(ERROR, f"inference failed: {type(exc).__name__}: {exc}")
                with self._lock:
                    self.counters["inference_errors"] += 1
                    self.runner.failed()
                continue
            latency = time.perf_counter() - start
            with self._lock:
                chunk, why = self.runner.finish(request, actions)
            if why == "non_finite":
                self.counters["non_finite_chunks"] += 1
                self.get_logger().error("policy produced non-finite actions (or beyond the float32 range); "
                                        "chunk dropped", throttle_duration_sec=2.0)
                self._problem(ERROR, "policy produced non-finite actions; chunks dropped")
            if chunk is None:
                continue
            with self._lock:
                # Published under the lock destroy_node takes to stop this thread, so nothing is
                # published once the node is being destroyed, however long inference took.
                if self._stopping:
                    return
                self.latencies.append(latency)
                self.publisher.publish(self._chunk_msg(chunk, latency))
                self.counters["chunks"] += 1
                if self._arm_columns is not None:
                    self.path_publisher.publish(self._path_marker(request.history[-1], chunk.actions))

    def _chunk_msg(self, chunk: Chunk, latency: float) -> ActionChunk:
        # The goal's text and stamp as they came (int ns round-trip exactly): the executor
        # identifies the goal a chunk belongs to by them.
        return ActionChunk(
            header=Header(stamp=ns_to_time(chunk.stamp)),
            chunk_id=chunk.chunk_id,
            instruction=chunk.goal.text,
            instruction_stamp=ns_to_time(chunk.goal.stamp),
            action_space=self.checkpoint.action_space,
            names=list(self.checkpoint.action_names),
            dt=float(self.checkpoint.dt),
            horizon=int(chunk.actions.shape[0]),
            actions=[float(v) for v in chunk.actions.reshape(-1)],
            history_length=chunk.history_length,
            inference_time=float(latency),
            checkpoint=str(self.checkpoint_dir),
        )

    def _path_marker(self, current: Observation, actions: np.ndarray) -> Marker:
        """LINE_STRIP of the TCP from the current joints through the chunk's targets, fading out."""
        action_columns, joint_columns = self._arm_columns
        q = np.vstack([np.asarray(current.joint_positions)[joint_columns], actions[:, action_columns]])  # (A + 1, 7)
        points = fr3_tcp_poses(q)[:, :3, 3]
        fade = np.linspace(1.0, 0.3, len(points))
        lifetime = float(self.checkpoint.dt) * len(actions)
        return Marker(
            header=Header(stamp=ns_to_time(current.stamp), frame_id=self.base_frame),
            ns="mail_predicted_path", id=0, type=Marker.LINE_STRIP, action=Marker.ADD,
            lifetime=seconds_to_duration(lifetime),
            scale=Vector3(x=0.006), points=[Point(x=x, y=y, z=z) for x, y, z in points.tolist()],
            colors=[ColorRGBA(r=1.0, g=0.45, b=0.0, a=float(a)) for a in fade],
        )

    def _report(self) -> None:
        if self.runner is None:
            return
        values = dict(self.counters)
        values.update(self._prompt_values())
        if self.latencies:
            ms = np.asarray(self.latencies) * 1e3
            values.update(latency_p50_ms=f"{np.percentile(ms, 50):.1f}", latency_p99_ms=f"{np.percentile(ms, 99):.1f}")
        with self._problems_lock:
            problems, self._problems = self._problems, {}
            if problems:
                level = max(problems)
                message = problems[level]
            else:
                active = self.runner.goal is not None and (not self.icil or self.runner.prompt is not None)
                level, message = OK, "running" if active else self._waiting()
            self.diagnostics.set(level, message, **values)

    def destroy_node(self):
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._worker.join(timeout=2.0)
        return super().destroy_node()


def main(argv=None) -> int:
    return run_node(PolicyNode, argv)


if __name__ == "__main__":
    raise SystemExit(main())
