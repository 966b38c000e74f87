"""Known instances of mail_ros's messages and a field-by-field comparison, shared by the tests
that send them over DDS or through bags. Float values are exactly representable in float32 so
"equal" means bit-equal after any round trip."""

from __future__ import annotations

import array

import numpy as np


def sample_messages():
    """One ActionChunk, Observation and InstructionEmbedding with every field set (rclpy types)."""
    from builtin_interfaces.msg import Time
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Header

    from mail_ros.msg import ActionChunk, InstructionEmbedding, Observation

    names = [f"fr3_joint{i}" for i in range(1, 8)] + ["fr3_gripper_width"]
    horizon = 4
    chunk = ActionChunk(
        header=Header(stamp=Time(sec=17, nanosec=250_000_000), frame_id="base"),
        chunk_id=2**40 + 3,
        instruction="pick up the red cube",
        instruction_stamp=Time(sec=12, nanosec=5),
        action_space="joint_position",
        names=names,
        dt=0.125,
        horizon=horizon,
        actions=[0.25 * i - 3.0 for i in range(horizon * len(names))],
        history_length=5,
        inference_time=0.0078125,
        checkpoint="/ckpt/demo",
    )

    rng = np.random.default_rng(0)
    images = []
    for k, name in enumerate(("agentview", "wrist")):
        pixels = rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
        images.append(
            Image(
                header=Header(stamp=Time(sec=17, nanosec=250_000_000 - 1_000_000 * k), frame_id=name),
                height=8, width=6, encoding="rgb8", is_bigendian=0, step=18,
                data=array.array("B", pixels.tobytes()),
            )
        )
    observation = Observation(
        header=Header(stamp=Time(sec=17, nanosec=250_000_000), frame_id=""),
        camera_names=["agentview", "wrist"],
        images=images,
        camera_skew=[0.0, -0.0009765625],
        joint_state=JointState(
            header=Header(stamp=Time(sec=17, nanosec=248_000_000)),
            name=[f"fr3_joint{i}" for i in range(1, 8)],
            position=[0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785],
            velocity=[0.0] * 7,
            # Every float64[] filled: Fast CDR 2 (Kilted wheels) pads an EMPTY float64 sequence to
            # 8-byte alignment and rosbags does not, so such messages do not read back from bags.
            effort=[0.125] * 7,
        ),
        joint_state_skew=-0.001953125,
    )

    embedding = InstructionEmbedding(
        header=Header(stamp=Time(sec=12, nanosec=5)),
        text="put the red cube on the blue cube",
        encoder="minilm:all-MiniLM-L6-v2",
        embedding=[float(v) for v in np.linspace(-1.0, 1.0, 384, dtype=np.float32)],
    )
    return {"chunk": chunk, "observation": observation, "embedding": embedding}


def to_plain(value):
    """Nested plain-Python view of an rclpy message or a rosbags message dataclass."""
    if hasattr(value, "get_fields_and_field_types"):
        return {name: to_plain(getattr(value, name)) for name in value.get_fields_and_field_types()}
    if hasattr(value, "__dataclass_fields__"):
        return {name: to_plain(getattr(value, name)) for name in value.__dataclass_fields__
                if not name.startswith("__")}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return list(bytes(value))
    if isinstance(value, (np.ndarray, array.array)):
        return [to_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
