"""Demonstrations from rosbag2 recordings (MCAP or SQLite3), aligned exactly as the policy node aligns.

What a demo bag holds (topics are configurable, see :class:`BagConfig`):

- cameras: ``sensor_msgs/Image`` or ``sensor_msgs/CompressedImage``, one topic per camera;
- ``/joint_states`` (``sensor_msgs/JointState``): joints selected and ordered by name;
- ``/fr3_arm_controller/joint_trajectory`` (``trajectory_msgs/JointTrajectory``): arm commands
  (or, with ``arm_source`` kinesthetic / teleop, the measured joints or a leader's targets: see
  :mod:`mail_ros.data.action_sources`);
- gripper width: ``/fr3_gripper/joint_trajectory`` (``JointTrajectory`` over the single joint
  ``fr3_gripper_width``, metres) when the bag has it, else the MEASURED width: the sum of the two
  finger joints of ``/joint_states`` (each finger moves half the opening), see :class:`BagConfig`;
- ``/mail/instruction`` (``std_msgs/String``): the task instruction;
- ``/mail/episode`` (``std_msgs/String``, optional): "start"/"stop" markers. Without markers one
  bag is one episode; with them, each start..stop span (by receive time) is one episode (a start
  while an episode is open ends it and opens the next; an open episode ends with the bag).

Observations. Camera and joint-state messages of an episode are fed to the same
:class:`~mail_ros.sync.alignment.StreamAligner` the policy node runs, at the policy rate
(``period = 1 / rate_hz``), keyed by HEADER stamps, polled with the bag RECEIVE time as ``now``,
and prepared by the same :class:`~mail_ros.sync.observation.ObservationBuilder` (decode, resize,
joint selection). A training frame is therefore exactly an observation the node would publish.

Actions (the rule offline evaluation compares against). For an aligned frame with reference
stamp ``t`` and ``dt = 1 / rate_hz``, the action is the commanded target for time ``t + dt``:

1. take the latest command message RECEIVED (bag time) at or before ``t``; frames before the
   first command are dropped (reason ``"no_command"``);
2. its trajectory starts at its header stamp, or at its receive time if the stamp is zero
   (what JointTrajectoryController does with a zero stamp);
3. with point ``k`` at ``start + time_from_start[k]``, the target at ``t + dt`` is the linear
   interpolation between the two points around it; before the first point it is the first
   point, after the last point it is the last point (the controller holds it).

The arm and the commanded gripper width follow this rule on their own topics. The measured
gripper width (no gripper command topic) is the finger-width sum at ``t + dt``, linearly
interpolated between the joint states of the episode around it; frames whose ``t + dt`` is past
the episode's last joint state are dropped (reason ``"no_future_state"``).

Messages stamped more than ``max_stamp_lead`` after they were received, or not stamped at all,
are refused by the :class:`~mail_ros.sync.stamps.StampGate` camera_sync_node applies (counted
per stream in ``messages_stamped_ahead`` and ``messages_unstamped``).

Instructions. Like policy_node and the replay, which take the goal last received, the
instruction of an episode is chosen by RECEIVE times only: the one in effect when the episode's
first observation message was received, i.e. the last instruction received at or before then
(for a ``mail-ros record`` bag, the one whose "start" marker opened the episode); if none, the
first received later in the episode (not at its end: an instruction there opens the next one);
if none at all, ``BagConfig.default_instruction``. Frames whose reference stamp predates the
receipt of the episode's instruction are dropped (reason ``"predates_instruction"``, see
:func:`_finish`).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader, AnyReaderError

from mail_ros.data.action_sources import ARM_SOURCES, DEFAULT_MAX_STATE_GAP, MeasuredArm, describe
from mail_ros.data.hdf5 import DataError, Episode
from mail_ros.data.ros_types import typestore
from mail_ros.spec import (FR3_ARM_JOINTS, FR3_FINGER_JOINTS, GRIPPER_ACTION_NAME, GRIPPER_COMMAND_JOINT,
                           GRIPPER_COMMAND_PER_WIDTH, ObservationSpec)
from mail_ros.sync.alignment import DEFAULT_MAX_SKEW, AlignerConfig, StreamAligner
from mail_ros.sync.observation import JOINT_STATES, ObservationBuilder, ObservationError, select_joints
from mail_ros.sync.stamps import DEFAULT_MAX_STAMP_LEAD, NS_PER_SECOND, StampGate, ns_to_seconds, seconds_to_ns, stamp_to_ns

__all__ = [
    "BagConfig",
    "BagReadout",
    "DemonstratedActions",
    "Trajectory",
    "read_bag",
    "command_target",
    "arm_actions",
    "finger_width",
    "gripper_source",
    "ACTION_SPACE",
    "GRIPPER_SOURCES",
]

log = logging.getLogger(__name__)

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
JOINT_STATE = "sensor_msgs/msg/JointState"
TRAJECTORY = "trajectory_msgs/msg/JointTrajectory"
STRING = "std_msgs/msg/String"
GRIPPER_SOURCES = ("auto", "command", "measured")
ACTION_SPACE = "joint_position"  # of the actions read from a bag: commanded joint positions (and width)


@dataclass(frozen=True)
class BagConfig:
    """Which topics make a demo, and how to align them (defaults: the FR3 set-up of FRANKA_ROS2.md)."""

    observation: ObservationSpec = field(default_factory=ObservationSpec)
    # camera name -> topic; cameras not listed use /cameras/<name>/image_raw, or its
    # image_transport sub-topic .../image_raw/compressed when the bag has only that
    camera_topics: tuple[tuple[str, str], ...] = ()
    joint_states_topic: str = "/joint_states"
    action_names: tuple[str, ...] = FR3_ARM_JOINTS + (GRIPPER_ACTION_NAME,)
    arm_command_topic: str = "/fr3_arm_controller/joint_trajectory"
    # command | kinesthetic | teleop (mail_ros.data.action_sources)
    arm_source: str = "command"
    teleop_topic: str = "/leader/joint_states"  # JointState or JointTrajectory targets of a leader
    teleop_joint_map: tuple[tuple[str, str], ...] = ()  # leader joint name -> robot joint name
    max_state_gap: float = DEFAULT_MAX_STATE_GAP  # s; kinesthetic and JointState leaders
    kinesthetic_lead: float = 0.0  # s; kinesthetic labels are the joints at t + dt + lead (action_sources)
    gripper_action: str = GRIPPER_ACTION_NAME  # the action name that is the gripper width
    gripper_command_topic: str = "/fr3_gripper/joint_trajectory"
    # "auto": the command topic when the bag has it, else measured; or force one of them
    gripper_source: str = "auto"
    finger_joints: tuple[str, ...] = FR3_FINGER_JOINTS
    instruction_topic: str = "/mail/instruction"
    episode_topic: str = "/mail/episode"
    default_instruction: str | None = None
    max_skew: float = DEFAULT_MAX_SKEW
    latency_allowance: float = 0.05
    buffer_seconds: float = 2.0
    # camera_sync_node's: a message stamped further ahead of its receive time is refused (its
    # clock disagrees with the recorder's, and its action labels would be looked up off by as much)
    max_stamp_lead: float = DEFAULT_MAX_STAMP_LEAD
    min_frames: int = 1  # episodes with fewer aligned frames are reported bad

    def __post_init__(self) -> None:
        object.__setattr__(self, "camera_topics", tuple(tuple(p) for p in dict(self.camera_topics).items()))
        object.__setattr__(self, "action_names", tuple(self.action_names))
        object.__setattr__(self, "teleop_joint_map", tuple(tuple(p) for p in dict(self.teleop_joint_map).items()))
        if self.arm_source not in ARM_SOURCES:
            raise ValueError(f"arm_source must be one of {list(ARM_SOURCES)}, got {self.arm_source!r}")
        unknown = sorted(set(dict(self.camera_topics)) - set(self.observation.cameras))
        if unknown:
            raise ValueError(f"camera_topics names {unknown} are not cameras of the spec {list(self.observation.cameras)}")
        if self.gripper_source not in GRIPPER_SOURCES:
            raise ValueError(f"gripper_source must be one of {list(GRIPPER_SOURCES)}, got {self.gripper_source!r}")
        if not self.arm_joints:
            raise ValueError(f"action_names {list(self.action_names)} hold no arm joint")
        if not (math.isfinite(self.max_skew) and self.max_skew > 0):
            raise ValueError(f"max_skew must be positive seconds, got {self.max_skew}")
        if not (math.isfinite(self.kinesthetic_lead) and self.kinesthetic_lead >= 0):
            raise ValueError(f"kinesthetic_lead must be >= 0 seconds, got {self.kinesthetic_lead}")
        if self.kinesthetic_lead and self.arm_source != "kinesthetic":
            raise ValueError(f"kinesthetic_lead applies to arm_source kinesthetic, not {self.arm_source!r}")
        if not (math.isfinite(self.max_stamp_lead) and self.max_stamp_lead >= 0):
            raise ValueError(f"max_stamp_lead must be >= 0 seconds, got {self.max_stamp_lead}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be >= 1, got {self.min_frames}")

    @property
    def arm_joints(self) -> tuple[str, ...]:
        return tuple(n for n in self.action_names if n != self.gripper_action)

    @property
    def arm_topic(self) -> str:
        """The topic the arm actions are read from (the joint states for kinesthetic demos)."""
        return {"command": self.arm_command_topic, "kinesthetic": self.joint_states_topic,
                "teleop": self.teleop_topic}[self.arm_source]

    @property
    def has_gripper(self) -> bool:
        return self.gripper_action in self.action_names

    def camera_topic(self, camera: str) -> str:
        return dict(self.camera_topics).get(camera, f"/cameras/{camera}/image_raw")

    @property
    def dt(self) -> float:
        return self.observation.period


@dataclass
class Trajectory:
    """The commands of one JointTrajectory topic, for :func:`command_target`."""

    topic: str
    receive: list[int] = field(default_factory=list)  # bag receive time of each message (ns)
    start: list[int] = field(default_factory=list)  # trajectory start (header stamp, or receive; ns)
    offsets: list[np.ndarray] = field(default_factory=list)  # (P,) time_from_start in s, increasing
    positions: list[np.ndarray] = field(default_factory=list)  # (P, D) in the order of `joints`
    joints: tuple[str, ...] = ()
    rename: dict[str, str] = field(default_factory=dict)  # message joint name -> ours (a leader's names)

    def __len__(self) -> int:
        return len(self.receive)

    def at(self, t: int, dt: int) -> tuple[np.ndarray | None, str]:
        """(target at ``t + dt`` (both ns), "") or (None, "no_command"); see :func:`command_target`."""
        target, _ = command_target(self, t, dt)
        return (target, "") if target is not None else (None, "no_command")

    def add(self, msg: Any, receive: int, where: str) -> None:
        names = [self.rename.get(n, n) for n in msg.joint_names]
        columns = {j: _column(j, names) for j in self.joints}
        missing = [j for j, column in columns.items() if column is None]
        if missing:
            raise DataError(f"{where}: trajectory lacks joints {missing} (has {names})")
        if not msg.points:
            raise DataError(f"{where}: trajectory has no points")
        cols = [columns[j][0] for j in self.joints]
        scales = np.array([columns[j][1] for j in self.joints])
        offsets = np.array([_seconds(p.time_from_start) for p in msg.points])
        if np.any(np.diff(offsets) <= 0):
            raise DataError(f"{where}: time_from_start must increase, got {offsets.tolist()}")
        if any(len(p.positions) != len(names) for p in msg.points):
            raise DataError(f"{where}: every point needs {len(names)} positions (one per joint name)")
        positions = np.stack([np.asarray(p.positions, dtype=np.float64) for p in msg.points])[:, cols] * scales
        if not np.all(np.isfinite(positions)):
            point, col = np.argwhere(~np.isfinite(positions))[0]
            raise DataError(f"{where}: non-finite position of {self.joints[col]} in point {point}")
        stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
        self.receive.append(int(receive))
        self.start.append(stamp if stamp != 0 else int(receive))
        self.offsets.append(offsets)
        self.positions.append(positions)


# A position-controlled gripper is commanded through one finger joint at half the opening width
# (what executor_node and franka_sim_node use); it stands for the width action when the bag has
# no fr3_gripper_width command.
FINGER_FOR_WIDTH = {GRIPPER_ACTION_NAME: (GRIPPER_COMMAND_JOINT, 1.0 / GRIPPER_COMMAND_PER_WIDTH)}


def _column(joint: str, names: list[str]) -> tuple[int, float] | None:
    """(index in ``names``, scale to ``joint``'s unit) of a trajectory's column for ``joint``."""
    if joint in names:
        return names.index(joint), 1.0
    finger, scale = FINGER_FOR_WIDTH.get(joint, (None, 1.0))
    if finger in names:
        return names.index(finger), scale
    return None


def command_target(traj: Trajectory, t: int, dt: int) -> tuple[np.ndarray | None, int]:
    """Target in effect at ``t + dt`` from the latest command received at or before ``t`` (both ns).

    Returns (positions (D,), message index), or (None, -1) when no command was received yet.
    See the module docstring for the rule; a command received exactly at ``t`` is in effect.
    """
    m = bisect.bisect_right(traj.receive, t) - 1
    if m < 0:
        return None, -1
    rel = ns_to_seconds(t + dt - traj.start[m])  # seconds into the trajectory
    offsets, positions = traj.offsets[m], traj.positions[m]
    # np.interp holds the end values outside [first, last] point: the controller's behaviour.
    return np.array([np.interp(rel, offsets, positions[:, d]) for d in range(positions.shape[1])]), m


def gripper_source(config: BagConfig, topics: dict[str, str]) -> str:
    """Where this bag's gripper action comes from: "command", "measured" or "none"."""
    if not config.has_gripper:
        return "none"
    if config.gripper_source == "auto":
        return "command" if config.gripper_command_topic in topics else "measured"
    return config.gripper_source


def finger_width(msg: Any, config: BagConfig) -> float:
    """Measured gripper opening of a JointState: the sum of the finger joint positions."""
    return float(np.sum(select_joints(list(msg.name), list(msg.position), config.finger_joints)))


class DemonstratedActions:
    """The action a bag demonstrates at a time t (the rule in the module docstring).

    The arm target at ``t + dt`` from its source (a :class:`Trajectory` of commands, or a
    :class:`~mail_ros.data.action_sources.MeasuredArm`), the gripper command in effect at
    ``t + dt``, or without gripper commands the measured finger width at ``t + dt``, interpolated
    between joint states. Shared by the converter (the training targets) and the replay evaluation
    (what the policy is compared against).
    """

    def __init__(self, config: BagConfig, arm: Trajectory | MeasuredArm, grip: Trajectory, gripper: str,
                 finger_stamps: list[int], finger_widths: list[float], dt: float) -> None:
        order = np.argsort(finger_stamps, kind="stable")
        self.finger_t = np.asarray(finger_stamps, dtype=np.int64)[order]  # ns
        self.finger_w = np.asarray(finger_widths, dtype=np.float64)[order]
        # Seconds after the first joint state: small enough for float64 to interpolate in exactly.
        self.finger_s = (self.finger_t - self.finger_t[:1]) / NS_PER_SECOND
        self.arm, self.grip, self.gripper = arm, grip, gripper
        self.dt = seconds_to_ns(dt)  # ns
        # parts are [arm joints..., gripper]; the gripper may sit anywhere in action_names
        produced = config.arm_joints + ((config.gripper_action,) if config.has_gripper else ())
        self.order = [produced.index(n) for n in config.action_names]

    def at(self, t: int) -> tuple[np.ndarray | None, str]:
        """(action in ``action_names`` order, "") or (None, why: "no_command", "no_future_state", ...) for
        a frame stamped ``t`` (ns)."""
        target, why = self.arm.at(t, self.dt)
        if target is None:
            return None, why
        parts = [target]
        if self.gripper == "command":
            width, _ = command_target(self.grip, t, self.dt)
            if width is None:
                return None, "no_command"
            parts.append(width)
        elif self.gripper == "measured":
            if len(self.finger_t) == 0 or not self.finger_t[0] <= t + self.dt <= self.finger_t[-1]:
                return None, "no_future_state"
            when = ns_to_seconds(t + self.dt - int(self.finger_t[0]))
            parts.append(np.array([np.interp(when, self.finger_s, self.finger_w)]))
        return np.concatenate(parts)[self.order], ""


@dataclass
class BagReadout:
    """Episodes read from one bag, and the episodes that had to be skipped (one message each)."""

    path: Path
    episodes: list[Episode]
    failures: list[str]
    gripper_source: str  # "command", "measured" or "none"
    skews: dict[str, list[float]]  # stream -> member minus reference stamp (s), all kept episodes


@dataclass
class _EpisodeState:
    aligner: StreamAligner
    sets: list = field(default_factory=list)
    failure: str | None = None
    native_size: dict[str, tuple[int, int]] = field(default_factory=dict)
    finger_stamps: list[int] = field(default_factory=list)  # ns
    finger_widths: list[float] = field(default_factory=list)
    first_receive: float = math.inf  # bag time (ns) of the episode's first observation message; inf: none yet
    # StampGate reason -> stream -> messages refused before alignment
    refused: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))


def _seconds(duration: Any) -> float:
    """A ROS Duration (time_from_start) in seconds."""
    return ns_to_seconds(stamp_to_ns(duration.sec, duration.nanosec))


def check_topics(path: Path, topics: dict[str, str], config: BagConfig) -> dict[str, str]:
    """Topic -> stream name of the observation topics; raise on missing topics or wrong types."""
    wanted = {}
    for camera in config.observation.cameras:
        topic = config.camera_topic(camera)
        # image_transport's compressed topic, when only that was recorded
        if topic not in topics and f"{topic}/compressed" in topics:
            topic = f"{topic}/compressed"
        wanted[topic] = camera
    wanted[config.joint_states_topic] = JOINT_STATES
    required = list(wanted) + [config.arm_topic]
    if config.has_gripper and config.gripper_source == "command":
        required.append(config.gripper_command_topic)
    missing = [t for t in required if t not in topics]
    if missing:
        hint = ""
        if config.arm_source == "command" and config.arm_command_topic in missing:
            hint = ("; without arm commands, label the actions from the measured joints (--arm-source kinesthetic) "
                    "or a leader's topic (--arm-source teleop --teleop-topic TOPIC)")
        raise DataError(f"{path}: missing topics {missing}; the bag has {sorted(topics)}{hint}")
    # Observation topics last: they win if a topic is (mis)configured for two roles.
    expected = {config.instruction_topic: (STRING,), config.episode_topic: (STRING,)}
    expected[config.gripper_command_topic] = (TRAJECTORY,)
    expected[config.arm_command_topic] = (TRAJECTORY,)
    if config.arm_source == "teleop":
        expected[config.teleop_topic] = (JOINT_STATE, TRAJECTORY)
    expected.update({t: (IMAGE, COMPRESSED) for t, s in wanted.items() if s != JOINT_STATES})
    expected[config.joint_states_topic] = (JOINT_STATE,)
    for topic, types in expected.items():
        if topic in topics and topics[topic] not in types:
            raise DataError(f"{path}: topic {topic} has message type {topics[topic]}, expected {' or '.join(types)}")
    return wanted


def _episode_spans(markers: list[tuple[int, str]], path: Path, topic: str) -> list[tuple[float, float]]:
    """(start, stop) bag times (ns; -inf/inf for open ends) of the episodes the markers delimit."""
    spans, open_at = [], None
    for t, word in markers:
        word = word.strip().lower()
        if word == "start":
            if open_at is not None:
                spans.append((open_at, t))
            open_at = t
        elif word == "stop":
            if open_at is not None:
                spans.append((open_at, t))
            open_at = None
        else:
            raise DataError(f"{path}: {topic} at t={ns_to_seconds(t):.3f} s says {word!r}; expected 'start' or 'stop'")
    if open_at is not None:
        spans.append((open_at, math.inf))
    return spans


def read_bag(path: str | Path, config: BagConfig = BagConfig()) -> BagReadout:
    """Read the episodes of one demo bag (a rosbag2 folder, or a single .mcap/.db3 file's folder).

    Raises :class:`DataError` when the bag as a whole is unusable (unreadable, missing topics,
    wrong message types, a malformed or non-finite command); a bad episode is reported in ``failures`` instead, naming the topic and
    time, and reading goes on with the next.
    """
    path = Path(path)
    try:
        reader = AnyReader([path], default_typestore=typestore())
        reader.open()
    except (AnyReaderError, FileNotFoundError, OSError) as exc:
        raise DataError(f"{path}: cannot read as a rosbag2: {exc}") from exc
    try:
        return _read(reader, path, config)
    finally:
        reader.close()


def _read(reader: AnyReader, path: Path, config: BagConfig) -> BagReadout:
    topics = {c.topic: c.msgtype for c in reader.connections}
    streams = check_topics(path, topics, config)
    gripper = gripper_source(config, topics)
    arm = arm_actions(config, topics)
    grip = Trajectory(config.gripper_command_topic, joints=(config.gripper_action,))

    # Pass 1: the small topics (commands or a leader's targets, instruction, episode markers).
    small = [config.instruction_topic, config.episode_topic]
    if config.arm_source != "kinesthetic":  # kinesthetic: the joint states, read with the observations
        small.append(config.arm_topic)
    if gripper == "command":
        small.append(config.gripper_command_topic)
    instructions: list[tuple[int, str]] = []  # (receive ns, text)
    markers: list[tuple[int, str]] = []
    for conn, t, msg in read_messages(reader, path, small):
        where = f"{path}: {conn.topic} at t={ns_to_seconds(t):.3f} s"
        if conn.topic == config.arm_topic:
            arm.add(msg, t, where)
        elif conn.topic == config.gripper_command_topic:
            grip.add(msg, t, where)
        elif conn.topic == config.instruction_topic:
            instructions.append((t, msg.data))
        else:
            markers.append((t, msg.data))
    if config.arm_source != "kinesthetic" and not len(arm):
        raise DataError(f"{path}: no {config.arm_source} messages on {config.arm_topic}")
    if markers:
        spans = _episode_spans(markers, path, config.episode_topic)
    else:
        spans = [(-math.inf, math.inf)]

    # Pass 2: observations, in receive order through one aligner per episode.
    builder = ObservationBuilder(config.observation)
    aligner_config = AlignerConfig(
        streams=builder.streams,
        max_skew=config.max_skew,
        period=config.observation.period,
        latency_allowance=config.latency_allowance,
        buffer_seconds=config.buffer_seconds,
    )
    states = [_EpisodeState(StreamAligner(aligner_config)) for _ in spans]
    ends = [stop for _, stop in spans]
    gate = StampGate(config.max_stamp_lead)
    for conn, t, msg in read_messages(reader, path, list(streams)):
        e = _span_of(spans, t)
        if e is None or states[e].failure is not None:
            continue
        state, stream = states[e], streams[conn.topic]
        state.first_receive = min(state.first_receive, t)
        stamp = stamp_to_ns(msg.header.stamp.sec, msg.header.stamp.nanosec)
        refusal = gate.check(stamp, t)
        if refusal is not None:
            state.refused[refusal][stream] += 1
            continue
        where = f"{path}: {conn.topic} at t={ns_to_seconds(t):.3f} s (stamp {ns_to_seconds(stamp):.3f})"
        try:
            if stream == JOINT_STATES and gripper == "measured":
                state.finger_stamps.append(stamp)
                state.finger_widths.append(finger_width(msg, config))
            if stream == JOINT_STATES and config.arm_source == "kinesthetic":
                arm.add(msg, t, where)
            if conn.msgtype == IMAGE:
                size = (int(msg.height), int(msg.width))
                first = state.native_size.setdefault(stream, size)
                if size != first:
                    raise DataError(f"mismatched image size {size} (H, W); this camera's earlier frames are {first}")
            payload = builder.prepare(stream, msg)
        except (ObservationError, DataError) as exc:
            state.failure = f"{where}: {exc}"
            continue
        state.aligner.push(stream, stamp, payload)
        state.sets.extend(state.aligner.poll(t))
    for state in states:
        state.sets.extend(state.aligner.flush())

    episodes, failures = [], []
    skews: dict[str, list[float]] = {stream: [] for stream in builder.streams[1:]}
    for i, (state, end) in enumerate(zip(states, ends)):
        label = f"{path} episode {i}" if len(states) > 1 else str(path)
        if state.failure is not None:
            failures.append(state.failure)
            continue
        try:
            episodes.append(_finish(state, label, config, arm, grip, gripper, instructions, end))
        except DataError as exc:
            failures.append(str(exc))
            continue
        for stream in skews:
            skews[stream].extend(state.aligner.stats[stream].skews)
    for failure in failures:
        log.warning("skipping episode: %s", failure)
    return BagReadout(path, episodes, failures, gripper, skews)


def arm_actions(config: BagConfig, topics: dict[str, str]) -> Trajectory | MeasuredArm:
    """An empty holder of the bag's arm actions, by ``config.arm_source`` (and the teleop topic's type)."""
    if config.arm_source == "kinesthetic":
        return MeasuredArm("kinesthetic", config.joint_states_topic, config.arm_joints,
                           max_state_gap=config.max_state_gap, max_stamp_lead=config.max_stamp_lead,
                           lead=config.kinesthetic_lead)
    rename = dict(config.teleop_joint_map) if config.arm_source == "teleop" else {}
    if config.arm_source == "teleop" and topics.get(config.teleop_topic) == JOINT_STATE:
        return MeasuredArm("teleop", config.teleop_topic, config.arm_joints, rename,
                           max_state_gap=config.max_state_gap, max_stamp_lead=config.max_stamp_lead)
    return Trajectory(config.arm_topic, joints=config.arm_joints, rename=rename)


def read_messages(reader: AnyReader, path: Path, topics: Iterable[str]):
    wanted = set(topics)
    connections = [c for c in reader.connections if c.topic in wanted]
    if not connections:
        return
    for conn, ns, raw in reader.messages(connections=connections):
        try:
            msg = reader.deserialize(raw, conn.msgtype)
        except (AnyReaderError, KeyError) as exc:
            raise DataError(f"{path}: {conn.topic} at t={ns_to_seconds(ns):.3f} s: cannot decode {conn.msgtype}: {exc}") from exc
        yield conn, ns, msg


def _span_of(spans: list[tuple[float, float]], t: int) -> int | None:
    for i, (start, stop) in enumerate(spans):
        if start <= t <= stop:
            return i
    return None


def _instruction(instructions: list[tuple[int, str]], opened: float, end: float) -> tuple[int, str] | None:
    """(receive time, text) of the instruction in effect for an episode whose first observation
    message was received at ``opened`` and which ends at ``end`` (module docstring); None if none."""
    before = [item for item in instructions if item[0] <= opened]
    if before:
        return before[-1]
    return next((item for item in instructions if opened < item[0] < end), None)


def _finish(
    state: _EpisodeState,
    label: str,
    config: BagConfig,
    arm: Trajectory,
    grip: Trajectory,
    gripper: str,
    instructions: list[tuple[int, str]],
    end: float,
) -> Episode:
    builder = ObservationBuilder(config.observation)
    demonstrated = DemonstratedActions(config, arm, grip, gripper, state.finger_stamps, state.finger_widths, config.dt)
    goal = _instruction(instructions, state.first_receive, end)
    # A frame captured before the goal was received is never acted on with that goal at run time:
    # the executor rejects chunks stamped before its goal change ("predates_reset"). So it is not
    # trained with it either; nor with the previous goal, whose episode ended before the frame was
    # received. Like the executor, this compares a header stamp with a receive time; the nodes
    # already require the two clocks to agree (policy_node's max_observation_lead).
    since = goal[0] if goal is not None else -math.inf
    dropped: Counter[str] = Counter()
    frames, actions = [], []
    for aligned in state.sets:
        if aligned.stamp < since:
            dropped["predates_instruction"] += 1
            continue
        action, why = demonstrated.at(aligned.stamp)
        if action is None:
            dropped[why] += 1
            continue
        actions.append(action)
        frames.append(builder.build(aligned))
    stats = state.aligner.stats.to_dict()
    stats["frames_dropped"] = dict(dropped)
    stats["messages_stamped_ahead"] = dict(state.refused["future"])
    stats["messages_unstamped"] = dict(state.refused["unstamped"])
    stats["gripper_source"] = gripper
    source = describe(config.arm_source, config.arm_topic, gripper, dict(config.teleop_joint_map),
                      config.kinesthetic_lead)
    if len(frames) < config.min_frames:
        ahead = "".join(f", messages {what}: {dict(state.refused[reason])}" for reason, what in
                        (("future", "stamped ahead of their receipt"), ("unstamped", "without a stamp"))
                        if state.refused[reason])
        raise DataError(
            f"{label}: {len(frames)} aligned frames with actions, need at least {config.min_frames} "
            f"(aligner dropped: {stats['streams'][config.observation.cameras[0]]['dropped']}, "
            f"after alignment: {dict(dropped)}{ahead})"
        )
    if goal is not None:
        instruction = goal[1]
    elif config.default_instruction is not None:
        instruction = config.default_instruction
    else:
        raise DataError(f"{label}: no instruction on {config.instruction_topic} and no default instruction given")
    return Episode(
        images={c: np.stack([f.images[c] for f in frames]) for c in config.observation.cameras},
        joint_positions=np.stack([f.joint_positions for f in frames]),
        actions=np.asarray(actions),
        instruction=instruction,
        timestamps=np.array([ns_to_seconds(f.stamp) for f in frames]),
        source=label,
        sync_stats=stats,
        action_source=source,
    )
