"""The observation/action contract shared by the policy, the datasets, checkpoints and ROS adapters.

One spec drives everything that must agree between training and deployment: which cameras are
read and at what resolution, which joints form the proprioceptive state, the action space and
its dimension names, how many observations the policy sees (T) and how many actions it
predicts (A), and the control period. Letters used for shapes across the project:
B batch, T observation steps, A action steps, C cameras, H/W image size, D model width.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FR3_ARM_JOINTS: tuple[str, ...] = tuple(f"fr3_joint{i}" for i in range(1, 8))
FR3_FINGER_JOINTS: tuple[str, ...] = ("fr3_finger_joint1", "fr3_finger_joint2")
# The FR3's home pose (rad): where the simulator starts an episode and the executor homes to.
FR3_HOME: tuple[float, ...] = (0.0, -math.pi / 4, 0.0, -3 * math.pi / 4, 0.0, math.pi / 2, math.pi / 4)
# The gripper action dimension is the commanded opening width between the fingers in metres.
GRIPPER_ACTION_NAME = "fr3_gripper_width"
FR3_GRIPPER_MAX_WIDTH = 0.08
# A position-controlled gripper (the simulator, a trajectory controller on the fingers) is
# commanded through this one finger joint; each finger moves half the opening width.
GRIPPER_COMMAND_JOINT = FR3_FINGER_JOINTS[0]
GRIPPER_COMMAND_PER_WIDTH = 0.5  # GRIPPER_COMMAND_JOINT position (m) per metre of opening width

ACTION_SPACES = ("joint_position",)


class SpecError(ValueError):
    """An observation/action spec, or data checked against it, is inconsistent."""


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer as configs need it (Python or NumPy): a float like 2.0 (a
    JSON "2.0") is not, and neither is a bool (an int subclass in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number (Python or NumPy; not a bool or a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_names(names: tuple, what: str) -> None:
    if not all(isinstance(name, str) and name for name in names):
        raise SpecError(f"{what} must be non-empty strings, got {list(names)}")


@dataclass(frozen=True)
class ObservationSpec:
    """What the policy observes at each step."""

    cameras: tuple[str, ...] = ("agentview", "wrist")
    image_size: tuple[int, int] = (128, 128)  # (H, W) at model resolution
    joint_names: tuple[str, ...] = FR3_ARM_JOINTS + FR3_FINGER_JOINTS
    obs_horizon: int = 1  # T: observations in the history the policy conditions on
    rate_hz: float = 10.0  # policy rate: one observation every 1 / rate_hz seconds

    def __post_init__(self) -> None:
        for name in ("cameras", "image_size", "joint_names"):
            if isinstance(getattr(self, name), str):
                raise SpecError(f"{name} must be a list, got the string {getattr(self, name)!r}")
        object.__setattr__(self, "cameras", tuple(self.cameras))
        object.__setattr__(self, "image_size", tuple(self.image_size))
        object.__setattr__(self, "joint_names", tuple(self.joint_names))
        if not self.cameras:
            raise SpecError("observation spec needs at least one camera")
        _check_names(self.cameras, "camera names")
        if len(set(self.cameras)) != len(self.cameras):
            raise SpecError(f"camera names must be unique, got {list(self.cameras)}")
        if len(self.image_size) != 2 or not all(is_integer(v) and v >= 8 for v in self.image_size):
            raise SpecError(f"image_size must be [height, width], integers >= 8, got {list(self.image_size)}")
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))  # NumPy ints -> JSON-safe
        _check_names(self.joint_names, "joint names")
        if len(set(self.joint_names)) != len(self.joint_names):
            raise SpecError(f"joint names must be unique, got {list(self.joint_names)}")
        if not (is_integer(self.obs_horizon) and self.obs_horizon >= 1):
            raise SpecError(f"obs_horizon must be >= 1 and an integer, got {self.obs_horizon!r}")
        object.__setattr__(self, "obs_horizon", int(self.obs_horizon))
        if not (is_finite_number(self.rate_hz) and self.rate_hz > 0):
            raise SpecError(f"rate_hz must be positive, got {self.rate_hz!r}")

    @property
    def period(self) -> float:
        return 1.0 / self.rate_hz


@dataclass(frozen=True)
class ActionSpec:
    """What the policy commands: a chunk of A actions, one every ``dt`` seconds."""

    action_space: str = "joint_position"
    names: tuple[str, ...] = FR3_ARM_JOINTS + (GRIPPER_ACTION_NAME,)
    horizon: int = 8  # A
    dt: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.names, str):
            raise SpecError(f"action names must be a list, got the string {self.names!r}")
        object.__setattr__(self, "names", tuple(self.names))
        if self.action_space not in ACTION_SPACES:
            raise SpecError(f"unknown action_space {self.action_space!r}; known: {list(ACTION_SPACES)}")
        _check_names(self.names, "action names")
        if not self.names or len(set(self.names)) != len(self.names):
            raise SpecError(f"action names must be non-empty and unique, got {list(self.names)}")
        if not (is_integer(self.horizon) and self.horizon >= 1):
            raise SpecError(f"action horizon must be >= 1 and an integer, got {self.horizon!r}")
        object.__setattr__(self, "horizon", int(self.horizon))
        if not (is_finite_number(self.dt) and self.dt > 0):
            raise SpecError(f"dt must be positive, got {self.dt!r}")

    @property
    def dim(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class PolicySpec:
    """Observation and action contract of one policy, saved in every checkpoint."""

    observation: ObservationSpec = field(default_factory=ObservationSpec)
    action: ActionSpec = field(default_factory=ActionSpec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicySpec":
        try:
            return cls(ObservationSpec(**data["observation"]), ActionSpec(**data["action"]))
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed policy spec: {exc}") from exc


@dataclass
class Observation:
    """One time-aligned observation as the policy consumes it (the core type behind Observation.msg).

    ``images`` holds one (H, W, 3) uint8 RGB array per camera at model resolution; the joint
    positions are ordered as ``ObservationSpec.joint_names``. ``stamp`` is the set's reference
    time in integer nanoseconds (ROS time in the nodes, bag time offline; see
    :mod:`mail_ros.sync.stamps`), so the stamp a chunk carries is exactly its observation's.
    """

    stamp: int
    images: dict[str, np.ndarray]
    joint_positions: np.ndarray
