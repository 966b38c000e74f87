"""Python packaging for mail_ros.

Two installs share this tree: colcon on a ROS 2 machine builds CMakeLists.txt (messages plus the
Python package through ament_cmake_python), and ``pip install -e .`` into a plain venv (training,
offline evaluation, the simulated demo and the tests) uses this file.
"""

from setuptools import find_packages, setup

NODES = [
    "camera_sync_node",
    "language_node",
    "policy_node",
    "executor_node",
    "franka_sim_node",
]

setup(
    name="mail_ros",
    version="0.1.0",
    description="MaIL (Mamba Imitation Learning) visuomotor policies on a Franka FR3 through ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["mail_ros", "mail_ros.*"]),
    # The CPU kernel's C source is built on first use (mail_ros/model/cpu_kernel.py).
    package_data={"mail_ros": ["sim/assets/*", "model/*.c"]},
    entry_points={
        "console_scripts": ["mail-ros = mail_ros.cli:main"]
        + [f"{name} = mail_ros.nodes.{name}:main" for name in NODES],
    },
    classifiers=["License :: OSI Approved :: Apache Software License"],
)
