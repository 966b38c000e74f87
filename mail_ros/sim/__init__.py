"""Simulated FR3 test bed (MuJoCo): scene and arm/gripper controllers, tasks, scripted expert.

MuJoCo chooses its OpenGL backend when it is first imported, so the headless EGL default is set
here, before any module of this package can import mujoco. A process that imports mujoco itself
before ``mail_ros.sim`` must set ``MUJOCO_GL`` on its own.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

# The test bed's camera resolution (H, W): rendered whatever the model's input size, which
# camera_sync_node and the bag converter resize to (as for a real camera).
CAMERA_SIZE = (128, 128)
# executor_node's command_latency (s) on simulated time: the nodes see the simulator's clock over
# /clock, late by the delivery and scheduling of a message on a CPU that also renders and steps the
# simulation (commands reached the simulated controller up to ~0.3 s after their stamp on a loaded
# 2-core machine), so each command keeps the previous one's motion this long. On a robot, where
# controller and executor share a clock, the launch files deploy ExecutorConfig's default.
SIM_TIME_COMMAND_LATENCY = 0.3
