"""Offline evaluation: replay a demo bag in bag time through the deployment pipeline and a policy.

What runs is what the robot runs, in the order the robot would see it:

* every camera and joint-state message, in LOG order, goes through
  :meth:`ObservationBuilder.prepare` (decode, resize, joint selection; a zero stamp or a bad
  message is dropped as ``"unstamped"`` / ``"invalid"``, and one stamped more than
  ``max_stamp_lead`` after its receive time as ``"future"``, as camera_sync_node does) and is pushed
  into a :class:`StreamAligner` at the checkpoint's policy rate, keyed by HEADER stamps, and
  polled with the message's log (receive) time as ``now``. Sets still pending at the end of the
  bag are decided by ``flush`` as if the node's poll timer fired at ``ref + max_skew +
  latency_allowance``;
* each aligned observation is handled by policy_node's own rules, the core
  :class:`~mail_ros.policy.runner.PolicyRunner` the node runs, with the time it was decided as
  the node clock: refused when older than ``max_observation_age`` (or stamped more than
  ``max_observation_lead`` after it), appended to the history of T observations (a gap longer
  than ``max_gap_periods`` periods, or a stamp earlier than the last one, restarts it; a
  repeated stamp is ignored), and a new instruction on ``/mail/instruction`` starts a new
  episode: history cleared and the policy reset with ``seed`` before its next chunk. The goal
  is embedded as language_node would embed it (``embed``, the checkpoint's encoder);
* a chunk is predicted for every aligned observation that has a goal (or every k-th, ``every``),
  and checked and kept as the node publishes it (float32; a non-finite one is counted as
  ``chunk_non_finite`` and dropped). As policy_node waits for a goal whether or not the policy
  reads language, observations before the bag's first instruction have none; only a bag without
  the instruction topic (and no ``instruction`` override) is replayed with a goal from the
  start, for policies without language. Unlike the node, which skips observations while
  inference is busy, nothing is skipped for latency: the replay is deterministic.

Ground truth. Action ``i`` of the chunk predicted at stamp ``t`` is compared with the training
label of a frame at ``t + i * dt``: :func:`mail_ros.data.bags.command_target` at that time, i.e.
the commanded target for ``t + (i + 1) * dt`` from the latest command received by
``t + i * dt`` (the measured finger-width sum for a bag without gripper commands). A step is
not compared (NaN) when no command was received yet, when ``t + i * dt`` lies past the bag's
last aligned frame (training windows never run past an episode's last frame; tolerance
``dt / 2``), or at or after the next instruction (another episode).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader
from tqdm import tqdm

from mail_ros.data import bags
from mail_ros.data.bags import BagConfig, DemonstratedActions, Trajectory
from mail_ros.data.hdf5 import DataError
from mail_ros.data.ros_types import typestore
from mail_ros.eval.setpoints import SetpointPlayback, SetpointSummary
from mail_ros.policy.runner import Goal, PolicyRunner, RunnerSettings
from mail_ros.sync.alignment import DEFAULT_MAX_SKEW, AlignedSet, AlignerConfig, StreamAligner
from mail_ros.sync.observation import JOINT_STATES, ObservationBuilder, ObservationError
from mail_ros.sync.stamps import DEFAULT_MAX_STAMP_LEAD, StampGate, ns_to_seconds, seconds_to_ns, stamp_to_ns

__all__ = [
    "BagReplay",
    "CameraMismatchError",
    "ChunkRecord",
    "ReplayConfig",
    "ReplayError",
    "bag_cameras",
    "replay_bag",
]

# Camera topics as camera_sync_node subscribes to them: /cameras/<name>/image_raw[/compressed].
CAMERA_TOPIC = re.compile(r"^/cameras/([^/]+)/image_raw(/compressed)?$")
# PolicyRunner observation outcomes -> the replay's counters (what policy_node counts and logs).
OBSERVATION_COUNTS = {
    "stale": "refused_stale",
    "future": "refused_future",
    "unstamped": "refused_unstamped",
    "no_clock": "refused_no_clock",
    "duplicate": "ignored_duplicate",
    "restart": "history_restarts",
    "backwards": "history_restarts_backwards",
}


class ReplayError(ValueError):
    """A bag cannot be replayed: unreadable, corrupt or truncated, or without the needed data."""


class CameraMismatchError(ReplayError):
    """The bag does not record the cameras the checkpoint was trained with."""


@dataclass(frozen=True)
class ReplayConfig:
    """How to replay: sync tolerances, the node's history rules, what to compare; times in seconds."""

    max_skew: float = DEFAULT_MAX_SKEW  # as `mail-ros convert`, so replayed frames are the training frames
    latency_allowance: float = 0.05
    buffer_seconds: float = 2.0
    every: int = 1  # predict on every k-th observation that has a goal
    # policy_node's settings (see PolicyRunner): the sampler seed, reset at every new instruction ...
    seed: int = RunnerSettings.seed
    max_observation_age: float = RunnerSettings.max_observation_age
    max_observation_lead: float = RunnerSettings.max_observation_lead
    max_gap_periods: float = RunnerSettings.max_gap_periods
    max_stamp_lead: float = DEFAULT_MAX_STAMP_LEAD  # camera_sync_node's max_stamp_lead
    instruction: str | None = None  # overrides /mail/instruction: one goal from the start
    camera_topics: tuple[tuple[str, str], ...] = ()  # camera -> topic; default: found by name
    gripper_source: str = "auto"  # see mail_ros.data.bags.BagConfig

    def __post_init__(self) -> None:
        object.__setattr__(self, "camera_topics", tuple(tuple(p) for p in dict(self.camera_topics).items()))
        if not (math.isfinite(self.max_skew) and self.max_skew > 0):
            raise ValueError(f"max_skew must be positive seconds, got {self.max_skew}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        self.runner_settings  # validates the policy_node settings
        if not (math.isfinite(self.max_stamp_lead) and self.max_stamp_lead >= 0):
            raise ValueError(f"max_stamp_lead must be >= 0 seconds, got {self.max_stamp_lead}")
        if self.instruction is not None and not self.instruction.strip():
            raise ValueError("instruction override is empty")

    @property
    def runner_settings(self) -> RunnerSettings:
        return RunnerSettings(max_observation_age=self.max_observation_age,
                              max_observation_lead=self.max_observation_lead,
                              max_gap_periods=self.max_gap_periods, seed=self.seed)


@dataclass
class ChunkRecord:
    """One predicted chunk and what the bag commanded over the same horizon."""

    stamp: int  # stamp (ns) of the current (last) observation of the history
    decided: int  # bag time (ns) at which its observation was decided (the node would publish then)
    predicted: np.ndarray  # (A, action_dim) robot units
    commanded: np.ndarray  # (A, action_dim); NaN where not compared (see module docstring)
    inference_ms: float
    history_length: int
    instruction: str | None


@dataclass
class BagReplay:
    """Everything one replay measured; :mod:`mail_ros.eval.report` turns it into the report."""

    path: Path
    camera_topics: dict[str, str]
    action_names: tuple[str, ...]
    dt: float
    gripper_source: str
    frames: int = 0  # aligned observations
    chunks: list[ChunkRecord] = field(default_factory=list)
    sync: dict[str, Any] = field(default_factory=dict)  # SyncStats.to_dict() with invalid messages folded in
    skews: dict[str, list[float]] = field(default_factory=dict)  # stream -> member minus reference (s)
    observations: Counter[str] = field(default_factory=Counter)  # refused / no_goal / skipped / restarts
    instructions: list[tuple[float, str]] = field(default_factory=list)  # (bag time ns, -inf: given; text) goals used
    setpoints: SetpointSummary | None = None  # the arm commands as the 1 kHz controller runs them


def bag_cameras(topics: dict[str, str]) -> dict[str, str]:
    """Camera name -> topic of the ``/cameras/<name>/image_raw[/compressed]`` topics of a bag (raw first)."""
    found: dict[str, str] = {}
    for topic in sorted(topics, key=lambda t: t.endswith("/compressed")):
        match = CAMERA_TOPIC.match(topic)
        if match:
            found.setdefault(match.group(1), topic)
    return found


def _open(path: Path) -> AnyReader:
    if not path.exists():
        raise ReplayError(f"bag {path} does not exist")
    try:
        reader = AnyReader([path], default_typestore=typestore())
        reader.open()
    # Opening parses the metadata and the storage's index from untrusted bytes (see _messages).
    except Exception as exc:
        raise ReplayError(
            f"{path}: cannot read as a rosbag2 (unreadable, corrupt or truncated): {type(exc).__name__}: {exc}"
        ) from exc
    return reader


def _messages(reader: AnyReader, path: Path, topics: list[str]) -> Iterator[tuple[Any, int, Any]]:
    """(connection, log time ns, message) of ``topics`` in log order, read by the converter's reader."""
    source = bags.read_messages(reader, path, topics)
    while True:
        try:
            item = next(source)
        except StopIteration:
            return
        except DataError as exc:
            raise ReplayError(str(exc)) from exc
        # The storage readers parse untrusted bytes and fail in many ways on a damaged file
        # (struct, unicode, sqlite, rosbags errors); whatever they raise means the same thing.
        except Exception as exc:
            raise ReplayError(f"{path}: corrupt or truncated bag: {type(exc).__name__}: {exc}") from exc
        yield item


def _resolve_cameras(
    path: Path, topics: dict[str, str], cameras: tuple[str, ...], config: ReplayConfig
) -> dict[str, str]:
    given = dict(config.camera_topics)
    unknown = sorted(set(given) - set(cameras))
    if unknown:
        raise ReplayError(f"camera topics given for {unknown}, which are not checkpoint cameras {list(cameras)}")
    present = bag_cameras(topics)
    resolved = {c: given.get(c, present.get(c)) for c in cameras}
    missing = [c for c, topic in resolved.items() if topic is None or topic not in topics]
    if missing:
        raise CameraMismatchError(
            f"{path}: checkpoint cameras {list(cameras)} but the bag records cameras {sorted(present)} "
            f"(no topic for {missing}; expected /cameras/<name>/image_raw[/compressed], or pass a camera topic)"
        )
    return resolved


def replay_bag(
    path: str | Path,
    policy,
    config: ReplayConfig = ReplayConfig(),
    embed: Callable[[str], np.ndarray] | None = None,
    progress: bool = False,
) -> BagReplay:
    """Replay one bag through alignment, the node's history rules and ``policy`` (a MaILPolicy).

    ``embed`` maps an instruction to the policy's language embedding; required when the policy
    is conditioned on language. Raises :class:`ReplayError` (or :class:`CameraMismatchError`)
    naming the bag and what is wrong.
    """
    path = Path(path)
    reader = _open(path)
    try:
        return _replay(reader, path, policy, config, embed, progress)
    finally:
        reader.close()


def _replay(reader: AnyReader, path: Path, policy, config: ReplayConfig, embed, progress: bool) -> BagReplay:
    spec = policy.config.spec
    language = policy.config.language.enabled
    if language and embed is None:
        encoder = policy.config.language.encoder
        raise ReplayError(f"the policy is conditioned on language ({encoder}): a text encoder is needed")
    topics = {c.topic: c.msgtype for c in reader.connections}
    cameras = _resolve_cameras(path, topics, spec.observation.cameras, config)
    bag_config = BagConfig(
        observation=spec.observation,
        camera_topics=tuple(cameras.items()),
        action_names=spec.action.names,
        gripper_source=config.gripper_source,
        max_skew=config.max_skew,
        latency_allowance=config.latency_allowance,
        buffer_seconds=config.buffer_seconds,
    )
    try:
        bags.check_topics(path, topics, bag_config)
    except DataError as exc:
        raise ReplayError(str(exc)) from exc
    gripper = bags.gripper_source(bag_config, topics)
    if config.instruction is None and language and bag_config.instruction_topic not in topics:
        raise ReplayError(
            f"{path}: no {bag_config.instruction_topic} topic, and the policy needs an instruction "
            "(give one with --instruction)"
        )
    dt = spec.action.dt
    result = BagReplay(path, cameras, spec.action.names, dt, gripper)

    # Pass 1: commands (and the measured finger widths), needed ahead of the replay position.
    demonstrated, result.setpoints = _read_commands(reader, path, bag_config, gripper, dt)

    # Pass 2: observations and instructions in log order, as the nodes would receive them.
    builder = ObservationBuilder(spec.observation)
    aligner = StreamAligner(AlignerConfig(
        streams=builder.streams,
        max_skew=config.max_skew,
        period=spec.observation.period,
        latency_allowance=config.latency_allowance,
        buffer_seconds=config.buffer_seconds,
    ))
    runner = PolicyRunner(policy, config.runner_settings)
    invalid: dict[str, Counter[str]] = {s: Counter() for s in builder.streams}
    # Every emitted set's skews (the aligner's own statistics keep only the most recent ones).
    result.skews = {name: [] for name in builder.streams[1:]}
    eligible = 0
    last_frame = -math.inf

    def set_goal(text: str | None, now: int) -> None:
        # The goal as policy_node receives it from language_node: the checkpoint's encoder.
        vector = embed(text) if language else None
        reason = runner.set_goal(Goal(text, vector, policy.config.language.encoder, max(now, 0)))
        if reason is not None:
            result.observations["refused_instruction"] += 1

    if config.instruction is not None:
        text = " ".join(config.instruction.split())
        set_goal(text, 0)
        result.instructions.append((-math.inf, text))
    elif bag_config.instruction_topic not in topics:
        set_goal(None, 0)  # a policy without language, a bag without instructions: a goal from the start

    def on_observation(aligned: AlignedSet, decided: int) -> None:
        nonlocal eligible, last_frame
        result.frames += 1
        last_frame = max(last_frame, aligned.stamp)
        for name, skew in aligned.skew.items():
            if name in result.skews:
                result.skews[name].append(skew)
        outcome = runner.observe(builder.build(aligned), decided)
        if not outcome.used:
            result.observations[OBSERVATION_COUNTS[outcome.kind]] += 1
            return
        if outcome.kind in OBSERVATION_COUNTS:
            result.observations[OBSERVATION_COUNTS[outcome.kind]] += 1
        if not runner.ready:
            result.observations["no_goal"] += 1
            return
        eligible += 1
        if (eligible - 1) % config.every:
            runner.skip()
            result.observations["skipped_every"] += 1
            return
        request = runner.take()
        start = time.perf_counter()
        actions = runner.predict(request)
        elapsed = (time.perf_counter() - start) * 1e3
        chunk, why = runner.finish(request, actions)
        if chunk is None:
            result.observations[f"chunk_{why}"] += 1
            return
        predicted = chunk.actions.astype(np.float64)  # as published
        result.chunks.append(ChunkRecord(chunk.stamp, decided, predicted, np.full_like(predicted, np.nan),
                                         elapsed, chunk.history_length, chunk.goal.text))

    sensor_gate = StampGate(config.max_stamp_lead)
    stream_of = {topic: camera for camera, topic in cameras.items()}
    stream_of[bag_config.joint_states_topic] = JOINT_STATES
    wanted = list(stream_of)
    if config.instruction is None and bag_config.instruction_topic in topics:
        wanted.append(bag_config.instruction_topic)
    total = sum(c.msgcount for c in reader.connections if c.topic in wanted)
    goal_times: list[int] = []  # ns
    with tqdm(total=total, unit="msg", desc=path.name, disable=not progress, leave=False) as bar:
        for conn, now, msg in _messages(reader, path, wanted):
            bar.update()
            if conn.topic == bag_config.instruction_topic:
                text = " ".join(str(msg.data).split())
                if not text:
                    result.observations["empty_instruction"] += 1
                    continue
                set_goal(text, now)  # a new episode, as in policy_node
                goal_times.append(now)
                result.instructions.append((now, text))
                continue
            stream = stream_of[conn.topic]
            stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
            refusal = sensor_gate.check(stamp, now)
            if refusal is not None:
                invalid[stream][refusal] += 1
                continue
            try:
                payload = builder.prepare(stream, msg)
            except ObservationError:
                invalid[stream]["invalid"] += 1
                continue
            aligner.push(stream, stamp, payload)
            for aligned in aligner.poll(now):
                on_observation(aligned, now)
        for aligned in aligner.flush():
            on_observation(aligned, aligned.stamp + aligner.config.wait_ns)

    result.sync = _sync_summary(aligner, invalid)
    if result.frames == 0:
        dropped = result.sync["streams"][builder.streams[0]]["dropped"]
        reference = builder.streams[0]
        raise ReplayError(f"{path}: no aligned observation (reference camera {reference!r} dropped: {dropped})")
    _fill_commanded(result, demonstrated, goal_times, last_frame)
    return result


def _read_commands(
    reader: AnyReader, path: Path, bag_config: BagConfig, gripper: str, dt: float
) -> tuple[DemonstratedActions, SetpointSummary]:
    """The demonstrated actions (arm and gripper commands, or the measured gripper widths) and the
    arm commands' 1 kHz setpoint summary."""
    arm = Trajectory(bag_config.arm_command_topic, joints=bag_config.arm_joints)
    playback = SetpointPlayback(bag_config.arm_joints)
    grip = Trajectory(bag_config.gripper_command_topic, joints=(bag_config.gripper_action,))
    finger_t: list[int] = []  # ns
    finger_w: list[float] = []
    topics = [bag_config.arm_command_topic]
    if gripper == "command":
        topics.append(bag_config.gripper_command_topic)
    elif gripper == "measured":
        topics.append(bag_config.joint_states_topic)
    try:
        for conn, ns, msg in _messages(reader, path, topics):
            where = f"{path}: {conn.topic} at t={ns_to_seconds(ns):.3f} s"
            if conn.topic == bag_config.arm_command_topic:
                arm.add(msg, ns, where)
                playback.command(ns, stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec), msg.joint_names,
                                 _trajectory_points(msg))
            elif conn.topic == bag_config.gripper_command_topic:
                grip.add(msg, ns, where)
            else:
                finger_t.append(stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec))
                finger_w.append(bags.finger_width(msg, bag_config))
    except (DataError, ObservationError) as exc:
        raise ReplayError(str(exc)) from exc
    if not arm.receive:
        raise ReplayError(f"{path}: no messages on {bag_config.arm_command_topic}; nothing to compare against")
    return DemonstratedActions(bag_config, arm, grip, gripper, finger_t, finger_w, dt), playback.finish()


def _trajectory_points(msg: Any) -> list[tuple]:
    """A JointTrajectory's points as the JTC model takes them: (time_from_start, positions[,
    velocities[, accelerations]]), with the fields the first point carries."""
    first = msg.points[0]
    fields = 1 + (len(first.velocities) > 0) + (len(first.velocities) > 0 and len(first.accelerations) > 0)
    return [(ns_to_seconds(stamp_to_ns(p.time_from_start.sec, p.time_from_start.nanosec)), p.positions,
             p.velocities, p.accelerations)[:fields + 1] for p in msg.points]


def _sync_summary(aligner: StreamAligner, invalid: dict[str, Counter[str]]) -> dict[str, Any]:
    """The aligner's statistics with the messages refused before alignment counted as dropped."""
    summary = aligner.stats.to_dict()
    for stream, counts in invalid.items():
        entry = summary["streams"][stream]
        entry["received"] += sum(counts.values())
        dropped = Counter(entry["dropped"]) + counts
        entry["dropped"] = dict(sorted(dropped.items()))
    return summary


def _fill_commanded(
    result: BagReplay, demonstrated: DemonstratedActions, goal_times: list[int], last_frame: float
) -> None:
    dt = seconds_to_ns(result.dt)
    for chunk in result.chunks:
        later = [g for g in goal_times if g > chunk.decided]
        episode_end = min(later) if later else math.inf
        for i in range(len(chunk.predicted)):
            t = chunk.stamp + i * dt
            if t > last_frame + dt // 2 or t >= episode_end:
                continue
            action, _ = demonstrated.at(t)
            if action is not None:
                chunk.commanded[i] = action
