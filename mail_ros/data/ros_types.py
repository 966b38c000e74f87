"""Message definitions for reading and writing bags without a ROS install (rosbags).

The rosbags typestore knows the standard ROS 2 messages; mail_ros's own messages are registered
from the .msg files of this package, so bag bytes stay identical to what rclpy publishes.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from rosbags.typesys import Stores, get_typestore, get_types_from_msg

MAIL_ROS_MESSAGES = ("ActionChunk", "Observation", "InstructionEmbedding")

# The standard message definitions bags are written with (Kilted; Humble/Jazzy definitions of the
# messages used here are identical on the wire).
TYPESTORE = Stores.ROS2_KILTED


def msg_dir() -> Path:
    """Folder holding mail_ros's .msg files: the source tree, or share/mail_ros/msg of an install."""
    candidates = [Path(__file__).resolve().parents[2] / "msg"]
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    candidates += [Path(p) / "share" / "mail_ros" / "msg" for p in prefixes + [sys.prefix]]
    for candidate in candidates:
        if all((candidate / f"{name}.msg").is_file() for name in MAIL_ROS_MESSAGES):
            return candidate
    raise FileNotFoundError(
        "mail_ros message definitions not found; looked in: " + ", ".join(str(c) for c in candidates)
    )


@lru_cache(maxsize=1)
def typestore():
    """A rosbags typestore with the standard ROS 2 types plus mail_ros/msg/*."""
    store = get_typestore(TYPESTORE)
    folder = msg_dir()
    types = {}
    for name in MAIL_ROS_MESSAGES:
        types.update(get_types_from_msg((folder / f"{name}.msg").read_text(), f"mail_ros/msg/{name}"))
    store.register(types)
    return store
