"""Test-session isolation: loopback-only DDS discovery and a ROS domain of this session's own.

Set before anything imports rclpy, and inherited by the subprocesses tests start, so parallel
test sessions (and other ROS graphs on the machine) never see each other's topics.
"""

import os

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
