"""policy_node: /mail/observation + /mail/instruction_embedding -> /mail/action_chunk.

Subscriptions only validate and store; inference runs on a worker thread, so a slow chunk
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
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point, Vector3
from rclpy.node import Node
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker

from mail_ros.control.kinematics import arm_columns, fr3_tcp_poses
from mail_ros.language.encoders import same_encoder
from mail_ros.msg import ActionChunk, InstructionEmbedding
from mail_ros.msg import Observation as ObservationMsg
from mail_ros.nodes.common import (ERROR, GOAL_QOS, OK, PIPELINE_QOS, WARN, Diagnostics, declare, now_seconds,
                                   run_node, seconds_to_stamp, stamp_to_seconds)
from mail_ros.spec import Observation
from mail_ros.sync.alignment import DEFAULT_MAX_STAMP_LEAD
from mail_ros.sync.history import ObservationHistory
from mail_ros.sync.observation import ObservationError, decode_image, select_joints


def as_published(actions: np.ndarray) -> np.ndarray:
    """``actions`` in ActionChunk's float32; check finiteness on this, as a finite float64 beyond
    the float32 range becomes inf here."""
    with np.errstate(over="ignore"):
        return np.asarray(actions, np.float32)


class PolicyNode(Node):
    def __init__(self, **kwargs):
        super().__init__("policy_node", **kwargs)
        self.checkpoint_dir = declare(self, "checkpoint", "", "Checkpoint directory (config.json + model.safetensors)")
        device = declare(self, "device", "auto", "Torch device: auto (CUDA when available), cpu, cuda, cuda:N")
        self.max_age = declare(self, "max_observation_age", 0.3, "Observations older than this (s, by the node "
                               "clock) are refused")
        self.max_lead = declare(self, "max_observation_lead", DEFAULT_MAX_STAMP_LEAD, "Observations stamped further ahead of the "
                                "node clock than this (s) are refused: the clocks are out of sync")
        self.max_gap_periods = declare(self, "max_gap_periods", 3.0, "A gap between consecutive observations "
                                       "longer than this many policy periods restarts the history")
        self.seed = declare(self, "seed", 0, "Seed of the policy's sampler (DDPM); reset with every new goal")
        self.base_frame = declare(self, "base_frame", "fr3_link0", "Frame of the predicted hand path marker: the "
                                  "arm's base link (with any prefix your robot description uses)")
        self.diagnostics = Diagnostics(self)
        self.counters = {"chunks": 0, "refused_observations": 0, "refused_embeddings": 0, "inference_errors": 0,
                         "non_finite_chunks": 0, "out_of_order_observations": 0, "history_restarts": 0}
        # level -> latest message of the problems since the last report (see _problem)
        self._problems: dict[int, str] = {}
        self._problems_lock = threading.Lock()
        self.latencies: deque[float] = deque(maxlen=200)

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._history: ObservationHistory | None = None  # created once the checkpoint is known
        self._goal: InstructionEmbedding | None = None
        self._goal_vector: np.ndarray | None = None
        self._fresh = False
        self._reset_pending = False  # set by a new goal; the inference thread resets the policy
        self._chunk_id = 0
        self._stopping = False

        self.policy = None
        self.config = None
        self._arm_columns = None  # (action columns, joint columns) of fr3_joint1..7, for the path marker
        self._load(device)

        self.publisher = self.create_publisher(ActionChunk, "mail/action_chunk", PIPELINE_QOS)
        self.path_publisher = self.create_publisher(Marker, "mail/predicted_path", PIPELINE_QOS)
        self.create_subscription(ObservationMsg, "mail/observation", self._on_observation, PIPELINE_QOS)
        self.create_subscription(InstructionEmbedding, "mail/instruction_embedding", self._on_embedding, GOAL_QOS)
        self._worker = threading.Thread(target=self._inference_loop, name="mail_policy_inference", daemon=True)
        self._worker.start()
        self.create_timer(1.0, self._report)

    # --- start-up -------------------------------------------------------------------------------
    def _load(self, device: str) -> None:
        import torch

        from mail_ros.model.mamba import mamba_backend
        from mail_ros.policy.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            if not self.checkpoint_dir:
                raise CheckpointError("no checkpoint given (parameter 'checkpoint')")
            self.config = read_checkpoint_config(self.checkpoint_dir)
            self.policy = load_checkpoint(self.checkpoint_dir, device=device)
            latency = self._warm_up()
        except Exception as exc:  # noqa: BLE001 - whatever fails, the node must stay up to say so
            # Stay up in a safe state: no chunk is ever published, and the reason is visible.
            self.policy = None
            self.get_logger().error(f"cannot load policy: {exc}")
            self.diagnostics.set(ERROR, f"no policy loaded: {exc}")
            return
        self.device = device
        if self.config["action_space"] == "joint_position":
            action_columns = arm_columns(self.config["action_names"])
            joint_columns = arm_columns(self.config["joint_names"])
            if action_columns is not None and joint_columns is not None:
                self._arm_columns = (action_columns, joint_columns)
        self._history = ObservationHistory(self.config["obs_horizon"], 1.0 / self.config["rate_hz"],
                                           self.max_gap_periods)
        memory = ""
        if device.startswith("cuda"):
            memory = f", GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        self.get_logger().info(
            f"loaded {self.checkpoint_dir} on {device} ({mamba_backend(torch.device(device))}); cameras "
            f"{self.config['cameras']}, T={self.config['obs_horizon']}, A={self.config['action_horizon']}, "
            f"warm-up chunk {latency * 1e3:.1f} ms{memory}")
        self.diagnostics.set(OK, "policy loaded; waiting for a goal", device=device,
                             warmup_ms=f"{latency * 1e3:.1f}")

    def _warm_up(self) -> float:
        """Run a few chunks on synthetic input (allocations, kernels) and return the last latency.

        Raises CheckpointError when a chunk is not finite in the published precision: such a
        checkpoint (e.g. overflowing weights) would never produce a usable chunk.
        """
        from mail_ros.policy.checkpoint import CheckpointError

        height, width = self.config["image_size"]
        history = [
            Observation(stamp=(k + 1) / self.config["rate_hz"],
                        images={c: np.zeros((height, width, 3), np.uint8) for c in self.config["cameras"]},
                        joint_positions=np.zeros(len(self.config["joint_names"])))
            for k in range(self.config["obs_horizon"])
        ]
        embedding = np.zeros(self.config["language_dim"], np.float32)
        latency = 0.0
        for _ in range(3):
            start = time.perf_counter()
            actions = self.policy.predict_chunk(history, embedding)
            latency = time.perf_counter() - start
            if not np.all(np.isfinite(as_published(actions))):
                raise CheckpointError(f"{self.checkpoint_dir} predicts non-finite actions on a blank warm-up input")
        self.policy.reset(seed=self.seed)
        return latency

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

    def _refusal(self, msg: InstructionEmbedding, vector: np.ndarray) -> str | None:
        """Why the goal ``msg`` cannot be used, or None."""
        expected_encoder = self.config["language_encoder"]
        if expected_encoder is None:
            return None  # a policy without language: the goal only starts an episode
        if not same_encoder(msg.encoder, expected_encoder):
            return f"encoder {msg.encoder!r}, checkpoint expects {expected_encoder!r}"
        if vector.shape != (self.config["language_dim"],):
            return f"dimension {vector.size}, checkpoint expects {self.config['language_dim']}"
        if not np.all(np.isfinite(vector)):
            return "non-finite values"
        return None

    def _on_embedding(self, msg: InstructionEmbedding) -> None:
        if self.policy is None:
            return
        vector = np.asarray(msg.embedding, dtype=np.float32)
        if self.config["language_encoder"] is None:
            vector = np.zeros(0, np.float32)  # unused by the policy
        reason = self._refusal(msg, vector)
        if reason is not None:
            self._refuse("embeddings", reason)
            msg, vector = None, None
        with self._lock:
            previous = self._goal
            self._goal, self._goal_vector = msg, vector
            # A new goal starts a new episode: no observation of the old one conditions the new one.
            # A refused one ends the old episode all the same: the operator has moved on from it.
            # The policy itself is reset by the inference thread, the only one that uses it (it may
            # be in the middle of a chunk now).
            self._history.clear()
            self._fresh = False
            self._reset_pending = True
        if msg is not None:
            self.get_logger().info(f"new goal: {msg.text!r}")
        elif previous is not None:
            self.get_logger().warning(f"goal {previous.text!r} dropped: its replacement was refused ({reason}); "
                                      "no chunk until a valid goal arrives")

    def _on_observation(self, msg: ObservationMsg) -> None:
        if self.policy is None:
            return
        try:
            observation = self._to_observation(msg)
        except ObservationError as exc:
            self._refuse("observations", str(exc))
            return
        age = now_seconds(self) - observation.stamp
        if age > self.max_age:
            self._refuse("observations", f"observation is {age * 1e3:.0f} ms old (max_observation_age "
                                         f"{self.max_age * 1e3:.0f} ms)")
            return
        if -age > self.max_lead:
            # Accepted, it would outrank every correctly stamped frame after it (the history
            # only moves forward), and its chunk would look fresh to the executor for as long.
            self._refuse("observations", f"observation is stamped {-age * 1e3:.0f} ms ahead of the node clock "
                                         f"(max_observation_lead {self.max_lead * 1e3:.0f} ms): the clocks are out "
                                         "of sync")
            return
        with self._lock:
            outcome = self._history.add(observation)
            if outcome != "duplicate":
                self._fresh = True
                self._wake.notify()
        if outcome in ("duplicate", "backwards"):
            self.counters["out_of_order_observations"] += 1
        if outcome == "duplicate":
            self.get_logger().warning(f"ignoring an observation stamped {observation.stamp:.3f} s like the last one",
                                      throttle_duration_sec=2.0)
            self._problem(WARN, "ignoring observations stamped like the last one")
        elif outcome == "backwards":
            self.counters["history_restarts"] += 1
            self.get_logger().warning(f"observation stamped {observation.stamp:.3f} s, before the last one: time "
                                      "went backwards; restarting the history", throttle_duration_sec=2.0)
            self._problem(WARN, "time went backwards; history restarted")
        elif outcome == "restart":
            self.counters["history_restarts"] += 1
            self.get_logger().warning("observation gap; restarting the history")

    def _to_observation(self, msg: ObservationMsg) -> Observation:
        cameras = list(self.config["cameras"])
        if list(msg.camera_names) != cameras:
            raise ObservationError(f"cameras {list(msg.camera_names)}, checkpoint expects {cameras}")
        if len(msg.images) != len(cameras):
            raise ObservationError(f"{len(msg.images)} images for {len(cameras)} cameras")
        size = tuple(self.config["image_size"])
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
                               self.config["joint_names"])
        return Observation(stamp=stamp_to_seconds(msg.header.stamp), images=images, joint_positions=joints)

    # --- inference, off the subscription path ---------------------------------------------------
    def _inference_loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or (self._fresh and self._goal is not None)):
                    self._wake.wait(timeout=0.5)
                if self._stopping:
                    return
                history = self._history.window()
                goal, vector = self._goal, self._goal_vector
                self._fresh = False
                reset, self._reset_pending = self._reset_pending, False
            start = time.perf_counter()
            try:
                if reset:
                    self.policy.reset(seed=self.seed)
                actions = self.policy.predict_chunk(history, vector)
            except Exception as exc:  # noqa: BLE001 - this thread must outlive any one bad chunk
                # No chunk: the executor holds once the last one goes stale. The next chunk starts
                # from a reset policy, in case the failure left a cache half-written.
                self.get_logger().error(f"inference failed: {type(exc).__name__}: {exc}", throttle_duration_sec=2.0)
                self._problem(ERROR, f"inference failed: {type(exc).__name__}: {exc}")
                with self._lock:
                    self.counters["inference_errors"] += 1
                    self._reset_pending = True
                continue
            latency = time.perf_counter() - start
            published = as_published(actions)
            if not np.all(np.isfinite(published)):
                self.counters["non_finite_chunks"] += 1
                self.get_logger().error("policy produced non-finite actions (or beyond the float32 range); "
                                        "chunk dropped", throttle_duration_sec=2.0)
                self._problem(ERROR, "policy produced non-finite actions; chunks dropped")
                continue
            with self._lock:
                # Published under the lock destroy_node takes to stop this thread, so nothing is
                # published once the node is being destroyed, however long inference took.
                if self._stopping:
                    return
                if goal is not self._goal:
                    continue  # the goal changed during inference: this chunk belongs to the old one
                self._chunk_id += 1
                self.latencies.append(latency)
                self.publisher.publish(self._chunk_msg(self._chunk_id, goal, history, published, latency))
                self.counters["chunks"] += 1
                if self._arm_columns is not None:
                    self.path_publisher.publish(self._path_marker(history[-1], actions))

    def _chunk_msg(self, chunk_id, goal, history, actions, latency) -> ActionChunk:
        return ActionChunk(
            header=Header(stamp=seconds_to_stamp(history[-1].stamp)),
            chunk_id=chunk_id,
            instruction=goal.text,
            instruction_stamp=goal.header.stamp,
            action_space=self.config["action_space"],
            names=list(self.config["action_names"]),
            dt=float(self.config["dt"]),
            horizon=int(actions.shape[0]),
            actions=[float(v) for v in actions.reshape(-1)],
            history_length=len(history),
            inference_time=float(latency),
            checkpoint=str(self.checkpoint_dir),
        )

    def _path_marker(self, current: Observation, actions: np.ndarray) -> Marker:
        """LINE_STRIP of the TCP from the current joints through the chunk's targets, fading out."""
        action_columns, joint_columns = self._arm_columns
        q = np.vstack([np.asarray(current.joint_positions)[joint_columns], actions[:, action_columns]])  # (A + 1, 7)
        points = fr3_tcp_poses(q)[:, :3, 3]
        fade = np.linspace(1.0, 0.3, len(points))
        lifetime = float(self.config["dt"]) * len(actions)
        return Marker(
            header=Header(stamp=seconds_to_stamp(current.stamp), frame_id=self.base_frame),
            ns="mail_predicted_path", id=0, type=Marker.LINE_STRIP, action=Marker.ADD,
            lifetime=Duration(sec=int(lifetime), nanosec=int(lifetime % 1.0 * 1e9)),
            scale=Vector3(x=0.006), points=[Point(x=x, y=y, z=z) for x, y, z in points.tolist()],
            colors=[ColorRGBA(r=1.0, g=0.45, b=0.0, a=float(a)) for a in fade],
        )

    def _report(self) -> None:
        if self.policy is None:
            return
        values = dict(self.counters)
        if self.latencies:
            ms = np.asarray(self.latencies) * 1e3
            values.update(latency_p50_ms=f"{np.percentile(ms, 50):.1f}", latency_p99_ms=f"{np.percentile(ms, 99):.1f}")
        with self._problems_lock:
            problems, self._problems = self._problems, {}
            if problems:
                level = max(problems)
                message = problems[level]
            else:
                level, message = OK, "running" if self._goal is not None else "waiting for a goal"
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
