"""From an aligned set of raw messages to the policy's Observation: one path for every consumer.

camera_sync_node (rclpy messages), the bag converter and offline replay (rosbags messages) all
call :class:`ObservationBuilder`; the messages are read by field name only (``encoding``,
``height``, ``width``, ``step``, ``data``, ``is_bigendian`` for sensor_msgs/Image; ``format`` and
``data`` for sensor_msgs/CompressedImage; ``name`` and ``position`` for sensor_msgs/JointState), so
rclpy and rosbags objects go through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mail_ros.control.robot_state import RobotStateError, joint_positions
from mail_ros.spec import Observation, ObservationSpec
from mail_ros.sync.alignment import AlignedSet
from mail_ros.sync.image import ImageConversionError, compressed_to_rgb, image_to_rgb, resize_rgb

JOINT_STATES = "joint_states"


class ObservationError(ValueError):
    """A message cannot become part of an observation (bad image, missing or non-finite joints)."""


def decode_image(msg) -> np.ndarray:
    """sensor_msgs/Image or sensor_msgs/CompressedImage -> (H, W, 3) uint8 RGB."""
    if hasattr(msg, "format"):
        return compressed_to_rgb(msg.format, msg.data)
    return image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.data, bool(msg.is_bigendian))


def select_joints(names: Sequence[str], positions: Sequence[float], wanted: Sequence[str]) -> np.ndarray:
    """Positions of ``wanted`` joints, in that order, from a JointState's name/position arrays.

    The robot-state gate (:func:`mail_ros.control.robot_state.joint_positions`) decides; its
    refusal becomes an ObservationError, so an invalid state never becomes an observation.
    """
    try:
        return joint_positions(names, positions, wanted)
    except RobotStateError as exc:
        raise ObservationError(str(exc)) from exc


class ObservationBuilder:
    """Prepares raw messages for the aligner and assembles aligned sets into Observations.

    Messages are converted when they arrive (:meth:`prepare`), before alignment, so a malformed
    image or a NaN joint state is rejected on its own (and counted) instead of spoiling a set, and
    each image is decoded and resized once.
    """

    def __init__(self, spec: ObservationSpec):
        self.spec = spec

    @property
    def streams(self) -> tuple[str, ...]:
        """Aligner streams: the cameras (the first is the reference) then the joint states."""
        return tuple(self.spec.cameras) + (JOINT_STATES,)

    def prepare(self, stream: str, msg) -> np.ndarray:
        """A camera message -> (H, W, 3) uint8 at model resolution; a JointState -> (J,) positions."""
        if stream == JOINT_STATES:
            return select_joints(list(msg.name), list(msg.position), self.spec.joint_names)
        if stream not in self.spec.cameras:
            raise ObservationError(f"unknown stream {stream!r}; expected one of {list(self.streams)}")
        try:
            return resize_rgb(decode_image(msg), self.spec.image_size)
        except ImageConversionError as exc:
            raise ObservationError(f"camera {stream!r}: {exc}") from exc

    def build(self, aligned: AlignedSet) -> Observation:
        images = {camera: aligned.members[camera][1] for camera in self.spec.cameras}
        joints = aligned.members[JOINT_STATES][1]
        return Observation(stamp=aligned.stamp, images=images, joint_positions=joints)
