"""Synthetic rosbag2 demonstrations with a known ground truth, for tests.

``write_demo_bag(path, DemoBag(...))`` records what a teleoperated FR3 demo bag holds: cameras
(raw ``sensor_msgs/Image`` or ``CompressedImage``) at their own rates with stamp jitter and
dropped frames, ``/joint_states`` with the joints in a scrambled order plus an unrelated joint,
arm (and optionally gripper) ``JointTrajectory`` commands, instructions and optional episode
markers (given, or as ``mail-ros record`` writes them). Every value comes from a closed-form
function of time, so tests can compute exactly what a converter must produce:

- ``arm_target(t)`` / ``gripper_target(t)``: the commanded targets, LINEAR in t, so linear
  interpolation between trajectory points reproduces them exactly;
- ``measured_joints(t)``: the joint state at stamp t (arm lags the command by ``LAG`` s;
  each finger is half the commanded width);
- a teleoperation leader (``leader_topic``) publishes ``arm_target(t)`` under its own joint names
  (``LEADER_JOINTS``), as ``sensor_msgs/JointState`` stamped t or as the arm's JointTrajectory
  (``leader_trajectory``); a kinesthetic demo records no command topic (``command_topic=None``);
- camera frame k of camera c is a uniform image whose red channel is ``frame_code(k)`` and green
  channel ``40 * (c + 1)``: decode with ``decode_frame(img)`` after any resize or JPEG round trip.

Bags are written with ``rosbags`` and the project typestore, in MCAP or SQLite3 storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer

from mail_ros.data.ros_types import typestore
from mail_ros.spec import FR3_ARM_JOINTS, FR3_FINGER_JOINTS, FR3_HOME, GRIPPER_ACTION_NAME

LAG = 0.05  # seconds the measured arm position lags the command
ARM_OFFSET = np.array(FR3_HOME) + np.linspace(-0.6, 0.6, 7)  # a pose the FR3 can be in
ARM_SLOPE = np.linspace(0.05, 0.35, 7)  # rad/s


LEADER_JOINTS = tuple(f"leader_joint_{i}" for i in range(7))  # a leader arm's own joint names


def arm_target(t: float | np.ndarray) -> np.ndarray:
    """Commanded arm joint targets at absolute time t (s): (..., 7)."""
    t = np.asarray(t, dtype=np.float64)[..., None]
    return ARM_OFFSET + ARM_SLOPE * (t - 100.0)


def gripper_target(t: float | np.ndarray) -> np.ndarray:
    """Commanded gripper width at absolute time t (s), metres."""
    t = np.asarray(t, dtype=np.float64)
    return 0.08 - 0.01 * (t - 100.0)


def measured_joints(t: float | np.ndarray) -> np.ndarray:
    """Measured positions at stamp t in FR3 order (7 arm + 2 fingers): (..., 9)."""
    finger = gripper_target(t)[..., None] / 2.0
    return np.concatenate([arm_target(np.asarray(t) - LAG), finger, finger], axis=-1)


def frame_code(k: int) -> int:
    """Red value of camera frame k: distinct for 200 frames, far from 0 and 255 (JPEG-safe)."""
    return 20 + k % 200


def decode_frame(img: np.ndarray) -> int:
    """Frame index (mod 200) encoded in a (H, W, 3) RGB image by ``write_demo_bag``."""
    return int(round(float(img[..., 0].mean()))) - 20


@dataclass(frozen=True)
class Camera:
    """One simulated camera stream."""

    name: str
    rate_hz: float
    size: tuple[int, int] = (48, 64)  # (H, W) native
    encoding: str = "rgb8"  # rgb8 | bgr8 | jpeg | png (the last two as CompressedImage)
    jitter: float = 0.004  # max |stamp noise| in s
    drop: tuple[int, ...] = ()  # frame indices never recorded
    latency: float = 0.01  # receive time minus stamp
    offset: float = 0.0  # first frame at start + offset
    resize_at: int | None = None  # from this frame on the camera sends twice the size (a misconfiguration)
    unstamped: bool = False  # header stamps left zero (a driver that never sets them)

    @property
    def topic(self) -> str:
        suffix = "/compressed" if self.compressed else ""
        return f"/cameras/{self.name}/image_raw{suffix}"

    @property
    def compressed(self) -> bool:
        return self.encoding in ("jpeg", "png")


def default_cameras() -> tuple[Camera, ...]:
    return (
        Camera("agentview", 10.0, drop=(7,)),
        Camera("wrist", 30.0, size=(40, 40), encoding="bgr8", jitter=0.003, offset=0.013),
    )


@dataclass(frozen=True)
class DemoBag:
    """What to record. Times are absolute seconds; the bag starts at ``start``."""

    storage: str = "mcap"  # mcap | sqlite3
    start: float = 100.0
    duration: float = 3.0
    cameras: tuple[Camera, ...] = field(default_factory=default_cameras)
    joint_rate: float = 50.0
    command_rate: float = 20.0
    command_points: int = 4  # points per trajectory, 0.1 s apart, first at time_from_start 0
    command_topic: str | None = "/fr3_arm_controller/joint_trajectory"  # None: no arm commands (kinesthetic)
    leader_topic: str | None = None  # a teleoperation leader's targets, named LEADER_JOINTS
    leader_rate: float = 50.0
    leader_trajectory: bool = False  # the leader sends JointTrajectory (like the commands), else JointState
    leader_until: float | None = None  # the leader stops publishing at this time (a lost connection)
    gripper_topic: str | None = "/fr3_gripper/joint_trajectory"
    zero_command_stamps: bool = False  # header stamp 0: the trajectory starts when received
    instruction: str | None = "put the cube in the bowl"  # received at start - 0.5
    instruction_topic: str = "/mail/instruction"
    instructions: tuple[tuple[float, str], ...] = ()  # more (receive time, text)
    episodes: tuple[tuple[float, float], ...] = ()  # (start, stop) markers on episode_topic
    # markers as `mail-ros record` writes them: a "start" with every instruction, a "stop" at the end
    recorder_markers: bool = False
    episode_topic: str = "/mail/episode"
    nan_command_at: float | None = None  # first command at or after this time carries NaN
    seed: int = 0


@dataclass
class BagTruth:
    """Stamps as recorded, for computing expectations."""

    path: Path
    camera_stamps: dict[str, np.ndarray]  # kept frames only
    camera_frames: dict[str, np.ndarray]  # their frame indices
    joint_stamps: np.ndarray
    command_receive: np.ndarray
    command_start: np.ndarray  # header stamp (receive time when zero_command_stamps)


def _time(ts, t: float):
    sec = int(np.floor(t))
    return ts.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=int(round((t - sec) * 1e9)))


def _header(ts, t: float):
    return ts.types["std_msgs/msg/Header"](stamp=_time(ts, t), frame_id="")


def _duration(ts, d: float):
    sec = int(np.floor(d))
    return ts.types["builtin_interfaces/msg/Duration"](sec=sec, nanosec=int(round((d - sec) * 1e9)))


def camera_image(camera_index: int, frame: int, size: tuple[int, int]) -> np.ndarray:
    """The (H, W, 3) RGB frame a camera records (see module docstring)."""
    img = np.empty((*size, 3), dtype=np.uint8)
    img[..., 0] = frame_code(frame)
    img[..., 1] = 40 * (camera_index + 1)
    img[..., 2] = 128
    return img


def _image_msg(ts, cam: Camera, index: int, frame: int, stamp: float):
    size = cam.size if cam.resize_at is None or frame < cam.resize_at else (2 * cam.size[0], 2 * cam.size[1])
    rgb = camera_image(index, frame, size)
    if cam.compressed:
        ok, buf = cv2.imencode(".jpg" if cam.encoding == "jpeg" else ".png", rgb[..., ::-1])
        assert ok
        return "sensor_msgs/msg/CompressedImage", ts.types["sensor_msgs/msg/CompressedImage"](
            header=_header(ts, stamp), format=cam.encoding, data=buf.reshape(-1)
        )
    pixels = rgb if cam.encoding == "rgb8" else rgb[..., ::-1]
    h, w = size
    return "sensor_msgs/msg/Image", ts.types["sensor_msgs/msg/Image"](
        header=_header(ts, stamp), height=h, width=w, encoding=cam.encoding, is_bigendian=0,
        step=w * 3, data=np.ascontiguousarray(pixels).reshape(-1),
    )


def write_demo_bag(path: str | Path, demo: DemoBag = DemoBag()) -> BagTruth:
    """Record ``demo`` into a new rosbag2 folder at ``path``; return the recorded stamps."""
    ts = typestore()
    path = Path(path)
    rng = np.random.default_rng(demo.seed)
    # (receive time, topic, msgtype, message)
    records: list[tuple[float, str, str, object]] = []

    camera_stamps, camera_frames = {}, {}
    for index, cam in enumerate(demo.cameras):
        n = int(np.floor((demo.duration - cam.offset) * cam.rate_hz)) + 1
        stamps = demo.start + cam.offset + np.arange(n) / cam.rate_hz
        stamps = stamps + rng.uniform(-cam.jitter, cam.jitter, n)
        keep = np.array([k not in cam.drop for k in range(n)])
        for k in np.flatnonzero(keep):
            msgtype, msg = _image_msg(ts, cam, index, int(k), 0.0 if cam.unstamped else float(stamps[k]))
            records.append((float(stamps[k]) + cam.latency, cam.topic, msgtype, msg))
        camera_stamps[cam.name] = stamps[keep]
        camera_frames[cam.name] = np.flatnonzero(keep)

    joint_stamps = demo.start + np.arange(int(demo.duration * demo.joint_rate) + 1) / demo.joint_rate
    names = ["extra_joint"] + list(FR3_FINGER_JOINTS) + list(FR3_ARM_JOINTS)[::-1]
    order = [None] + [7, 8] + list(range(6, -1, -1))
    for t in joint_stamps:
        q = measured_joints(t)
        pos = np.array([0.5 if i is None else q[i] for i in order])
        msg = ts.types["sensor_msgs/msg/JointState"](
            header=_header(ts, float(t)), name=names, position=pos,
            velocity=np.zeros(0), effort=np.zeros(0),
        )
        records.append((float(t) + 0.002, "/joint_states", "sensor_msgs/msg/JointState", msg))

    # Commands start a little before the first camera frame, as a teleop loop would.
    command_start = demo.start - 0.03 + np.arange(int(demo.duration * demo.command_rate) + 1) / demo.command_rate
    command_receive = command_start + 0.001
    nan_sent = False
    point_type = ts.types["trajectory_msgs/msg/JointTrajectoryPoint"]
    for start, receive in zip(command_start, command_receive):
        offsets = 0.1 * np.arange(demo.command_points)
        arm = arm_target(start + offsets)  # (P, 7)
        if demo.nan_command_at is not None and start >= demo.nan_command_at and not nan_sent:
            arm = arm.copy()
            arm[0, 2] = np.nan
            nan_sent = True
        stamp = 0.0 if demo.zero_command_stamps else float(start)
        empty = np.zeros(0)
        points = [
            point_type(positions=arm[i], velocities=empty, accelerations=empty, effort=empty,
                       time_from_start=_duration(ts, float(offsets[i])))
            for i in range(len(offsets))
        ]
        for topic, names in ((demo.command_topic, FR3_ARM_JOINTS),
                             (demo.leader_topic if demo.leader_trajectory else None, LEADER_JOINTS)):
            if topic is not None and (demo.leader_until is None or topic == demo.command_topic or start < demo.leader_until):
                msg = ts.types["trajectory_msgs/msg/JointTrajectory"](
                    header=_header(ts, stamp), joint_names=list(names), points=points
                )
                records.append((float(receive), topic, "trajectory_msgs/msg/JointTrajectory", msg))
        if demo.gripper_topic is not None:
            width = gripper_target(start + offsets)
            gpoints = [
                point_type(positions=width[i : i + 1], velocities=empty, accelerations=empty,
                           effort=empty, time_from_start=_duration(ts, float(offsets[i])))
                for i in range(len(offsets))
            ]
            gmsg = ts.types["trajectory_msgs/msg/JointTrajectory"](
                header=_header(ts, stamp), joint_names=[GRIPPER_ACTION_NAME], points=gpoints
            )
            records.append((float(receive), demo.gripper_topic, "trajectory_msgs/msg/JointTrajectory", gmsg))
    if demo.zero_command_stamps:
        command_start = command_receive.copy()
    if demo.leader_topic is not None and not demo.leader_trajectory:
        end = demo.start + demo.duration if demo.leader_until is None else demo.leader_until
        for t in demo.start - 0.05 + np.arange(int((end - demo.start + 0.05) * demo.leader_rate) + 1) / demo.leader_rate:
            msg = ts.types["sensor_msgs/msg/JointState"](
                header=_header(ts, float(t)), name=list(LEADER_JOINTS), position=arm_target(t),
                velocity=np.zeros(0), effort=np.zeros(0),
            )
            records.append((float(t) + 0.003, demo.leader_topic, "sensor_msgs/msg/JointState", msg))

    string = ts.types["std_msgs/msg/String"]
    instructions = [(demo.start - 0.5, demo.instruction)] if demo.instruction is not None else []
    instructions += list(demo.instructions)
    for t, text in instructions:
        records.append((t, demo.instruction_topic, "std_msgs/msg/String", string(data=text)))
        if demo.recorder_markers:
            records.append((t, demo.episode_topic, "std_msgs/msg/String", string(data="start")))
    for start, stop in demo.episodes:
        for t, word in ((start, "start"), (stop, "stop")):
            records.append((t, demo.episode_topic, "std_msgs/msg/String", string(data=word)))

    records.sort(key=lambda r: r[0])
    if demo.recorder_markers and instructions:
        records.append((records[-1][0], demo.episode_topic, "std_msgs/msg/String", string(data="stop")))
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[demo.storage]
    with Writer(path, version=Writer.VERSION_LATEST, storage_plugin=plugin) as writer:
        connections = {}
        for receive, topic, msgtype, msg in records:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(connections[topic], int(round(receive * 1e9)), ts.serialize_cdr(msg, msgtype))
    return BagTruth(path, camera_stamps, camera_frames, joint_stamps, command_receive, command_start)
