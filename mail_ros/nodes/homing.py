"""Homing with moveit_py: the executor's edge to MoveIt, used when it is installed and configured.

MoveItPy gets its configuration explicitly, from one YAML file (``moveit_config_file``): the
dictionary ``MoveItPy(node_name=..., config_dict=...)`` takes, i.e. what
``MoveItConfigsBuilder(...).to_dict()`` of moveit_configs_utils returns for the robot's MoveIt
config package (robot_description, robot_description_semantic, robot_description_kinematics,
planning_pipelines and its pipeline's parameters, plan_request_params, the controller manager).
Nothing is taken from the parameters a launch file happened to give the process.

moveit_py's API differs between distros: Humble executes with ``execute(group_name,
robot_trajectory, blocking=True)``, Jazzy and later with ``execute(robot_trajectory,
controllers=[])``; both are handled. Every failure (moveit_py not installed, no or an incomplete
configuration, an exception while constructing MoveItPy, planning or executing, no plan, an
execution status other than success) comes back as a reason, and the executor then homes with its
own limit-respecting min-jerk trajectory, logging the reason. A MoveItPy that failed to construct
is not tried again until the node restarts (its construction initialises rclcpp in this process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

# What MoveItPy cannot plan without; the rest (pipeline parameters, controllers) MoveIt validates itself.
REQUIRED_KEYS = ("robot_description", "robot_description_semantic", "robot_description_kinematics",
                 "planning_pipelines")


class HomingFailed(Exception):
    """moveit_py could not home the arm; the message is the reason."""


@dataclass(frozen=True)
class MoveItApi:
    """The two moveit_py classes homing uses (a test stands in for them with its own)."""

    moveit_py: Callable[..., Any]  # moveit.planning.MoveItPy
    robot_state: Callable[..., Any]  # moveit.core.robot_state.RobotState


def import_moveit() -> MoveItApi:
    try:
        from moveit.core.robot_state import RobotState
        from moveit.planning import MoveItPy
    except ImportError as exc:
        raise HomingFailed(f"moveit_py (MoveIt 2's Python API) is not installed: {exc}") from exc
    return MoveItApi(MoveItPy, RobotState)


def load_config(path: str) -> dict:
    """The config_dict for MoveItPy from ``path`` (YAML); HomingFailed names what is missing."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise HomingFailed(f"cannot read moveit_config_file {path!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise HomingFailed(f"moveit_config_file {path!r} is not a mapping of MoveItPy parameters")
    missing = [key for key in REQUIRED_KEYS if not config.get(key)]
    if missing:
        raise HomingFailed(f"moveit_config_file {path!r} lacks {missing} (write it from "
                           "MoveItConfigsBuilder(...).to_dict() of the robot's MoveIt config package)")
    return config


def execute(robot, group: str, trajectory):
    """Execute ``trajectory`` with whichever signature this moveit_py has; returns its status.

    pybind11 raises TypeError for a call that matches no signature before anything runs, so
    trying Jazzy's form first and Humble's second never executes twice.
    """
    try:
        return robot.execute(trajectory, controllers=[])  # Jazzy, Kilted, Rolling
    except TypeError as jazzy:
        try:
            return robot.execute(group, trajectory, blocking=True)  # Humble
        except TypeError as humble:
            raise HomingFailed(f"MoveItPy.execute takes neither Jazzy's (robot_trajectory, controllers) nor "
                               f"Humble's (group_name, robot_trajectory, blocking) arguments: {jazzy}; {humble}") from humble


class MoveItHoming:
    """Plans and executes a motion of ``group`` to a joint position with moveit_py."""

    def __init__(self, group: str, config_file: str, node_name: str = "mail_ros_homing",
                 api: Callable[[], MoveItApi] = import_moveit) -> None:
        self.group = group
        self.config_file = config_file
        self.node_name = node_name
        self._api_loader = api
        self._api: MoveItApi | None = None
        self._robot = None
        self._broken = "" if config_file else "moveit_config_file is not set"

    @property
    def configured(self) -> bool:
        """Whether an attempt is worth making (configured, and not failed to construct before)."""
        return not self._broken

    @property
    def unavailable_reason(self) -> str:
        return self._broken

    def _connect(self):
        if self._broken:
            raise HomingFailed(self._broken)
        if self._robot is None:
            try:
                config = load_config(self.config_file)
                self._api = self._api_loader()
                self._robot = self._api.moveit_py(node_name=self.node_name, config_dict=config)
            except Exception as exc:  # any failure, as the reason; never tried again
                self._broken = str(exc) if isinstance(exc, HomingFailed) else \
                    f"constructing MoveItPy failed: {type(exc).__name__}: {exc}"
                raise HomingFailed(self._broken) from exc
        return self._robot

    def home(self, positions: np.ndarray) -> None:
        """Move ``group`` to ``positions`` (rad); raises HomingFailed with the reason on any failure."""
        robot = self._connect()
        try:
            component = robot.get_planning_component(self.group)
            component.set_start_state_to_current_state()
            goal = self._api.robot_state(robot.get_robot_model())
            goal.set_joint_group_positions(self.group, np.asarray(positions, dtype=np.float64))
            goal.update()
            component.set_goal_state(robot_state=goal)
            plan = component.plan()
        except Exception as exc:
            raise HomingFailed(f"moveit_py planning raised {type(exc).__name__}: {exc}") from exc
        if not plan:
            raise HomingFailed(f"moveit_py found no plan for {self.group!r} to the home pose")
        try:
            status = execute(robot, self.group, plan.trajectory)
        except HomingFailed:
            raise
        except Exception as exc:
            raise HomingFailed(f"moveit_py execution raised {type(exc).__name__}: {exc}") from exc
        if not status:
            raise HomingFailed(f"moveit_py execution failed: {getattr(status, 'status', status)}")


__all__ = ["HomingFailed", "MoveItApi", "MoveItHoming", "REQUIRED_KEYS", "execute", "import_moveit", "load_config"]
