"""The vendored upstream ROS 2 tools install into the tests' own prefix and work there.

Skips (naming the folder) in a plain clone without ../shared/vendor/ros2.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import vendor_ros2

pytestmark = pytest.mark.skipif(vendor_ros2.skip_reason() is not None, reason=str(vendor_ros2.skip_reason()))


def test_prefix_has_the_tools_and_interfaces_and_leaves_the_venv_alone():
    tools = vendor_ros2.prefix()
    env = tools.env()
    packages = subprocess.run(["ros2", "pkg", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert packages.returncode == 0, packages.stderr
    listed = packages.stdout.split()
    assert {"composition_interfaces", "franka_msgs"} <= set(listed), listed
    probe = ("import launch_ros.actions, ros2cli, xacro\n"
             "from franka_msgs.action import Grasp\n"
             "from composition_interfaces.srv import LoadNode\n"
             "print(Grasp.Goal().epsilon.inner)")
    imported = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    # The project venv itself still has none of them.
    # (launch_ros, not launch: the repository's launch/ folder is a namespace package on PYTHONPATH)
    plain = subprocess.run([sys.executable, "-c", "import launch_ros"], capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0 and "No module named 'launch_ros'" in plain.stderr
