"""ObservationBuilder: the one conversion from raw messages to the policy's Observation.

Messages are read by field name, so plain objects with the ROS field names stand for both rclpy
and rosbags messages (the node and bag tests run the same code on the real types)."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from mail_ros.spec import ObservationSpec
from mail_ros.sync.alignment import AlignerConfig, StreamAligner
from mail_ros.sync.observation import JOINT_STATES, ObservationBuilder, ObservationError, select_joints

SPEC = ObservationSpec(cameras=("agentview", "wrist"), image_size=(32, 48), joint_names=("a", "b", "c"))


def raw_image(pixels: np.ndarray, encoding: str = "rgb8", pad: int = 0):
    height, width, channels = pixels.shape
    rows = np.zeros((height, width * channels + pad), np.uint8)
    rows[:, : width * channels] = pixels.reshape(height, -1)
    return SimpleNamespace(encoding=encoding, height=height, width=width, step=width * channels + pad,
                           data=rows.tobytes(), is_bigendian=0)


def test_cameras_are_converted_and_resized_on_arrival():
    builder = ObservationBuilder(SPEC)
    rgb = np.random.default_rng(0).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    out = builder.prepare("agentview", raw_image(rgb[..., ::-1].copy(), "bgr8", pad=4))
    expected = cv2.resize(rgb, (48, 32), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out, expected)
    ok, png = cv2.imencode(".png", rgb[..., ::-1])
    compressed = SimpleNamespace(format="png", data=png.tobytes())
    np.testing.assert_array_equal(builder.prepare("wrist", compressed), expected)


def test_joints_are_selected_by_name_in_spec_order():
    msg = SimpleNamespace(name=["c", "x", "a", "b"], position=[3.0, 9.0, 1.0, 2.0])
    np.testing.assert_array_equal(ObservationBuilder(SPEC).prepare(JOINT_STATES, msg), [1.0, 2.0, 3.0])


@pytest.mark.parametrize("names,positions,match", [
    (["a", "b"], [1.0, 2.0], "lacks joints"),
    (["a", "b", "c"], [1.0, float("nan"), 3.0], "non-finite"),
    (["a", "b", "c"], [1.0, 2.0], "names but"),
])
def test_bad_joint_states_are_rejected(names, positions, match):
    with pytest.raises(ObservationError, match=match):
        select_joints(names, positions, SPEC.joint_names)


def test_bad_images_and_unknown_streams_are_rejected():
    builder = ObservationBuilder(SPEC)
    image = raw_image(np.zeros((4, 4, 3), np.uint8))
    image.data = image.data[:-1]
    with pytest.raises(ObservationError, match="agentview"):
        builder.prepare("agentview", image)
    with pytest.raises(ObservationError, match="unknown stream"):
        builder.prepare("depth", raw_image(np.zeros((4, 4, 3), np.uint8)))


def test_aligned_set_becomes_an_observation():
    builder = ObservationBuilder(SPEC)
    aligner = StreamAligner(AlignerConfig(streams=builder.streams, max_skew=0.01))
    frame = np.full((8, 8, 3), 7, np.uint8)
    joints = SimpleNamespace(name=["a", "b", "c"], position=[0.1, 0.2, 0.3])
    aligner.push("agentview", 1_000_000_000, builder.prepare("agentview", raw_image(frame)))  # stamps in ns
    aligner.push("wrist", 1_004_000_000, builder.prepare("wrist", raw_image(frame)))
    aligner.push(JOINT_STATES, 998_000_000, builder.prepare(JOINT_STATES, joints))
    (aligned,) = aligner.flush()
    observation = builder.build(aligned)
    assert observation.stamp == 1_000_000_000
    assert set(observation.images) == {"agentview", "wrist"}
    assert observation.images["wrist"].shape == (32, 48, 3)
    np.testing.assert_array_equal(observation.joint_positions, [0.1, 0.2, 0.3])
