"""Joint limits of the Franka FR3 (datasheet values) and derived limits with safety margins."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from mail_ros.spec import FR3_ARM_JOINTS, FR3_GRIPPER_MAX_WIDTH

__all__ = ["JointLimits", "LimitsError", "fr3_limits"]

# FR3 datasheet (Franka Robotics, "FR3 robot and interface specifications"), rad, rad/s, rad/s^2, rad/s^3.
FR3_POSITION_MIN = (-2.7437, -1.7837, -2.9007, -3.0421, -2.8065, 0.5445, -3.0159)
FR3_POSITION_MAX = (2.7437, 1.7837, 2.9007, -0.1518, 2.8065, 4.5169, 3.0159)
FR3_VELOCITY_MAX = (2.62, 2.62, 2.62, 2.62, 5.26, 4.18, 5.26)
FR3_ACCELERATION_MAX = (10.0,) * 7
FR3_JERK_MAX = (5000.0,) * 7

_ARRAY_FIELDS = ("position_min", "position_max", "velocity_max", "acceleration_max", "jerk_max")


class LimitsError(ValueError):
    """Inconsistent limits, or margins that leave no room to move."""


@dataclass(frozen=True, eq=False)
class JointLimits:
    """Per-joint position, velocity, acceleration and jerk limits, plus the gripper width range.

    Arrays are (J,) float64 and read-only, ordered as ``names``.
    """

    names: tuple[str, ...]
    position_min: np.ndarray
    position_max: np.ndarray
    velocity_max: np.ndarray
    acceleration_max: np.ndarray
    jerk_max: np.ndarray
    gripper_width_min: float = 0.0
    gripper_width_max: float = FR3_GRIPPER_MAX_WIDTH

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        dof = len(self.names)
        if dof == 0 or len(set(self.names)) != dof:
            raise LimitsError(f"joint names must be non-empty and unique, got {list(self.names)}")
        for name in _ARRAY_FIELDS:
            value = np.array(getattr(self, name), dtype=np.float64)
            if value.shape != (dof,):
                raise LimitsError(f"{name} must have one value per joint ({dof}), got shape {value.shape}")
            if not np.isfinite(value).all():
                raise LimitsError(f"{name} must be finite, got {value.tolist()}")
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        if not (self.position_min < self.position_max).all():
            raise LimitsError(
                f"position_min must be below position_max for every joint, got "
                f"{self.position_min.tolist()} and {self.position_max.tolist()}"
            )
        for name in _ARRAY_FIELDS[2:]:
            if not (getattr(self, name) > 0).all():
                raise LimitsError(f"{name} must be positive, got {getattr(self, name).tolist()}")
        if not (math.isfinite(self.gripper_width_max) and 0 <= self.gripper_width_min < self.gripper_width_max):
            raise LimitsError(
                f"gripper width range must satisfy 0 <= min < max, got [{self.gripper_width_min}, "
                f"{self.gripper_width_max}]"
            )

    @property
    def dof(self) -> int:
        return len(self.names)

    def contains(self, q: np.ndarray, atol: float = 0.0) -> bool:
        """Whether a (J,) position lies within the position limits (widened by ``atol``)."""
        q = np.asarray(q, dtype=np.float64)
        return bool(((q >= self.position_min - atol) & (q <= self.position_max + atol)).all())

    def with_margins(
        self,
        position_margin: float = 0.05,
        velocity_scale: float = 0.5,
        acceleration_scale: float = 0.5,
        jerk_scale: float = 0.5,
    ) -> JointLimits:
        """Limits shrunk by ``position_margin`` rad at both ends and scaled by the given factors."""
        if not (math.isfinite(position_margin) and position_margin >= 0):
            raise LimitsError(f"position_margin must be >= 0 rad, got {position_margin}")
        for name, scale in (("velocity_scale", velocity_scale), ("acceleration_scale", acceleration_scale),
                            ("jerk_scale", jerk_scale)):
            if not (math.isfinite(scale) and 0 < scale <= 1):
                raise LimitsError(f"{name} must be in (0, 1], got {scale}")
        narrowest = float(np.min(self.position_max - self.position_min))
        if 2 * position_margin >= narrowest:
            raise LimitsError(
                f"position_margin {position_margin} rad leaves no range on the narrowest joint "
                f"({narrowest:.4f} rad wide)"
            )
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(
            position_min=self.position_min + position_margin,
            position_max=self.position_max - position_margin,
            velocity_max=self.velocity_max * velocity_scale,
            acceleration_max=self.acceleration_max * acceleration_scale,
            jerk_max=self.jerk_max * jerk_scale,
        )
        return JointLimits(**values)


def fr3_limits() -> JointLimits:
    """Datasheet limits of the FR3 arm joints fr3_joint1..7 and the Franka Hand width [0, 0.08] m."""
    return JointLimits(
        names=FR3_ARM_JOINTS,
        position_min=np.array(FR3_POSITION_MIN),
        position_max=np.array(FR3_POSITION_MAX),
        velocity_max=np.array(FR3_VELOCITY_MAX),
        acceleration_max=np.array(FR3_ACCELERATION_MAX),
        jerk_max=np.array(FR3_JERK_MAX),
    )
