"""Files the package ships beside its code, found where this copy of the package was installed.

In a source checkout (the venv's editable install, ``PYTHONPATH`` at a clone) they lie in the
tree next to ``mail_ros/``; in a colcon install, CMakeLists.txt puts them into
``share/mail_ros`` of the install prefix, found through the ament index (ament_index_python,
which every ROS 2 installation has; imported only then). No ROS import otherwise.
"""

from __future__ import annotations

from pathlib import Path

import mail_ros

__all__ = ["DEMO_CHECKPOINT", "ICIL_DEMO_CHECKPOINT", "ResourceError", "demo_checkpoint", "icil_demo_checkpoint",
           "package_share"]

DEMO_CHECKPOINT = "checkpoints/demo"  # the shipped demo policy, relative to the tree / share/mail_ros
ICIL_DEMO_CHECKPOINT = "checkpoints/icil_demo"  # the shipped ICIL policy, taught each task by a prompt
PACKAGE_DIR = Path(mail_ros.__file__).resolve().parent


class ResourceError(FileNotFoundError):
    """The package's shipped files cannot be found."""


def package_share(package_dir: Path = PACKAGE_DIR) -> Path:
    """The folder holding the shipped files of the mail_ros package at ``package_dir``: the
    source tree when that package lies in a checkout (package.xml beside it), else its ament
    share folder."""
    tree = Path(package_dir).parent
    if (tree / "package.xml").is_file():
        return tree
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError as exc:
        raise ResourceError(f"mail_ros at {package_dir} is neither in a source checkout nor findable: the "
                            f"ament_index_python package (ROS 2) is not installed: {exc}") from exc
    try:
        return Path(get_package_share_directory("mail_ros"))
    except PackageNotFoundError as exc:
        raise ResourceError(f"mail_ros at {package_dir} is not in a source checkout, and no ament prefix "
                            "(AMENT_PREFIX_PATH; source the workspace's install/setup.bash) holds it") from exc


def demo_checkpoint(package_dir: Path = PACKAGE_DIR) -> Path:
    """The shipped demo checkpoint (checkpoints/demo) of the mail_ros package at ``package_dir``."""
    return package_share(package_dir) / DEMO_CHECKPOINT


def icil_demo_checkpoint(package_dir: Path = PACKAGE_DIR) -> Path:
    """The shipped ICIL checkpoint (checkpoints/icil_demo) of the mail_ros package at ``package_dir``."""
    return package_share(package_dir) / ICIL_DEMO_CHECKPOINT
