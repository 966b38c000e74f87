"""The one gate robot state passes where it enters the package, and the one sanity check on targets.

Every reader of joint states (camera_sync_node, policy_node, the executor, ``mail-ros convert``,
the offline replay) takes positions through :func:`joint_positions`; nothing else decides whether
a joint state is usable. A state is refused, never repaired, when

- it names a joint twice (which value is the arm's is unknowable: taking the last one drove the
  executor into a stop-restart loop),
- it has a different number of names and positions, or lacks a wanted joint,
- a wanted position is not finite,
- a wanted position lies beyond the FR3's hard limits by more than ``STATE_LIMIT_TOLERANCE``: a
  broken reading, not the arm (a fr3_joint1 of -3.3 rad made the policy aim past the limit).

Finger joints are checked against half the hand's opening range; joints the FR3 does not have
are checked for finiteness only.

:func:`check_joint_targets` refuses action chunks whose joint targets no robot could mean
(beyond the hard limits by more than ``TARGET_LIMIT_TOLERANCE``, 1.5 rad, e.g. a chunk of 1e30): those
are refused as a whole rather than clipped into a drive to the limits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mail_ros.control.limits import fr3_limits
from mail_ros.spec import FR3_FINGER_JOINTS, FR3_GRIPPER_MAX_WIDTH, GRIPPER_ACTION_NAME

__all__ = [
    "STATE_LIMIT_TOLERANCE",
    "TARGET_LIMIT_TOLERANCE",
    "RobotStateError",
    "check_joint_targets",
    "joint_positions",
]

# rad (m for fingers) a measured position may lie beyond a hard limit: encoder noise and a
# controller's overshoot at a limit stay well inside this; a broken reading does not.
STATE_LIMIT_TOLERANCE = 0.05
# rad a commanded target may lie beyond a hard limit before the whole chunk counts as
# meaningless (broken values, not a policy reaching for a limit; an untrained policy's targets
# stay well within it): nearer targets are clipped to the margined limits by the executor.
TARGET_LIMIT_TOLERANCE = 1.5
# m a commanded gripper width may lie outside [0, 0.08]: the demo policy asks for 0.10 to open
# fully (clipped to 0.08), a broken one for anything.
_GRIPPER_WIDTH_TOLERANCE = 0.1


class RobotStateError(ValueError):
    """A joint state (or target) no robot could be in: refused as a whole."""


def _bounds() -> dict[str, tuple[float, float]]:
    limits = fr3_limits()
    bounds = {name: (float(lo), float(hi))
              for name, lo, hi in zip(limits.names, limits.position_min, limits.position_max)}
    bounds.update({name: (0.0, FR3_GRIPPER_MAX_WIDTH / 2) for name in FR3_FINGER_JOINTS})
    return bounds


_BOUNDS = _bounds()


def _outside(names: Sequence[str], values: np.ndarray, tolerance: float) -> list[str]:
    bad = []
    for name, value in zip(names, values):
        lo, hi = _BOUNDS.get(name, (-np.inf, np.inf))
        if not lo - tolerance <= value <= hi + tolerance:
            bad.append(f"{name}={value:.4g}" + ("" if np.isinf(lo) else f" (limits [{lo:.4f}, {hi:.4f}])"))
    return bad


def joint_positions(names: Sequence[str], positions: Sequence[float], wanted: Sequence[str],
                    tolerance: float = STATE_LIMIT_TOLERANCE) -> np.ndarray:
    """(len(wanted),) positions of the ``wanted`` joints from a JointState's name/position arrays.

    Raises :class:`RobotStateError` (see the module docstring) when the state is unusable.
    """
    names = list(names)
    if len(names) != len(positions):
        raise RobotStateError(f"joint state has {len(names)} names but {len(positions)} positions")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RobotStateError(f"joint state names {duplicates} more than once")
    index = {name: i for i, name in enumerate(names)}
    missing = [name for name in wanted if name not in index]
    if missing:
        raise RobotStateError(f"joint state lacks joints {missing} (has {names})")
    values = np.asarray([positions[index[name]] for name in wanted], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = [name for name, v in zip(wanted, values) if not np.isfinite(v)]
        raise RobotStateError(f"joint state has non-finite positions for {bad}")
    bad = _outside(wanted, values, tolerance)
    if bad:
        raise RobotStateError(f"joint state beyond the hard limits by more than {tolerance}: {', '.join(bad)}")
    return values


def check_joint_targets(names: Sequence[str], targets: np.ndarray,
                        tolerance: float = TARGET_LIMIT_TOLERANCE) -> None:
    """Raise :class:`RobotStateError` unless every row of ``targets`` (A, len(names)) is finite and
    within the hard limits plus ``tolerance`` (the gripper width within its range plus 10 cm)."""
    targets = np.asarray(targets, dtype=np.float64)
    if not np.all(np.isfinite(targets)):
        raise RobotStateError("non-finite targets")
    for column, name in enumerate(names):
        values = targets[:, column]
        if name == GRIPPER_ACTION_NAME:
            lo, hi, tol = 0.0, FR3_GRIPPER_MAX_WIDTH, _GRIPPER_WIDTH_TOLERANCE
        elif name in _BOUNDS:
            (lo, hi), tol = _BOUNDS[name], tolerance
        else:
            continue
        worst = values[np.argmax(np.maximum(lo - values, values - hi))]
        if not lo - tol <= worst <= hi + tol:
            raise RobotStateError(f"target {name}={worst:.4g} is beyond its limits [{lo:.4f}, {hi:.4f}] by more "
                                  f"than {tol}: no robot could mean it")
