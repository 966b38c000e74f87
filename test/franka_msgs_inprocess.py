"""franka_msgs from the vendored prefix (test/vendor_ros2.py), importable inside the test process.

rclpy finds a message package's type support libraries through LD_LIBRARY_PATH, which the
dynamic loader reads only at process start. Loading the built libraries by path first (with
RTLD_GLOBAL) lets a later load by name find them already there, so in-process nodes can use
franka_msgs' actions without re-executing the test process. ``unload()`` forgets the Python
modules again, so later tests see the plain venv (where gripper_mode auto means trajectory).
"""

from __future__ import annotations

import ctypes
import sys

import vendor_ros2

# Dependencies first: each library's DT_NEEDED entries must already be loaded.
LIBRARIES = ("rosidl_generator_c", "rosidl_typesupport_fastrtps_c", "rosidl_typesupport_introspection_c",
             "rosidl_typesupport_c", "rosidl_typesupport_fastrtps_cpp", "rosidl_typesupport_introspection_cpp",
             "rosidl_typesupport_cpp", "rosidl_generator_py")


def load() -> str:
    """Make ``franka_msgs`` importable here; returns the sys.path entry added."""
    tools = vendor_ros2.prefix()
    for library in LIBRARIES:
        ctypes.CDLL(str(tools.install / "lib" / f"libfranka_msgs__{library}.so"), mode=ctypes.RTLD_GLOBAL)
    site = str(vendor_ros2._site_packages(tools.install))
    sys.path.insert(0, site)
    import franka_msgs.action  # noqa: F401  (fails here, not in a node, when the build is broken)

    return site


def unload(site: str) -> None:
    sys.path.remove(site)
    for name in [name for name in sys.modules if name == "franka_msgs" or name.startswith("franka_msgs.")]:
        del sys.modules[name]
