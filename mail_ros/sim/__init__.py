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
