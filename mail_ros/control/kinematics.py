"""Forward kinematics of the FR3 arm: joint positions -> tool-centre-point poses in fr3_link0.

Used to show where a predicted chunk would take the hand (the policy node's RViz path) without
tf2 or a URDF parser. Franka's published kinematic parameters, modified Denavit-Hartenberg
(Craig) convention: each joint's transform is Rot_x(alpha) Trans_x(a) Rot_z(q) Trans_z(d). The
flange sits 0.107 m along joint 7's axis; the Franka Hand is rotated -45 deg about it and its
tool-centre point (between the fingertips) is 0.1034 m further.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mail_ros.spec import FR3_ARM_JOINTS

__all__ = ["FR3_DH", "FLANGE_D", "HAND_YAW", "TCP_OFFSET", "arm_columns", "fr3_tcp_poses"]

# (a, d, alpha) per joint, metres and radians.
FR3_DH = np.array(
    [
        (0.0, 0.333, 0.0),
        (0.0, 0.0, -np.pi / 2),
        (0.0, 0.316, np.pi / 2),
        (0.0825, 0.0, np.pi / 2),
        (-0.0825, 0.384, -np.pi / 2),
        (0.0, 0.0, np.pi / 2),
        (0.088, 0.0, np.pi / 2),
    ]
)
FLANGE_D = 0.107
HAND_YAW = -np.pi / 4
TCP_OFFSET = 0.1034


def _dh(a: float, d: float, alpha: float, q: np.ndarray) -> np.ndarray:
    """(N, 4, 4) transforms Rot_x(alpha) Trans_x(a) Rot_z(q) Trans_z(d) for joint angles q (N,)."""
    ca, sa = np.cos(alpha), np.sin(alpha)
    cq, sq = np.cos(q), np.sin(q)
    T = np.zeros((len(q), 4, 4))
    T[:, 0, 0], T[:, 0, 1], T[:, 0, 3] = cq, -sq, a
    T[:, 1, 0], T[:, 1, 1], T[:, 1, 2], T[:, 1, 3] = sq * ca, cq * ca, -sa, -sa * d
    T[:, 2, 0], T[:, 2, 1], T[:, 2, 2], T[:, 2, 3] = sq * sa, cq * sa, ca, ca * d
    T[:, 3, 3] = 1.0
    return T


def fr3_tcp_poses(joint_positions: np.ndarray) -> np.ndarray:
    """Tool-centre-point poses of the FR3 with a Franka Hand, in the fr3_link0 frame.

    joint_positions: (N, 7) fr3_joint1..7 in radians (or (7,)). Returns (N, 4, 4) homogeneous
    transforms (or (4, 4)).
    """
    q = np.asarray(joint_positions, dtype=np.float64)
    single = q.ndim == 1
    q = q.reshape(-1, 7)
    pose = np.broadcast_to(np.eye(4), (len(q), 4, 4)).copy()
    for j, (a, d, alpha) in enumerate(FR3_DH):
        pose = pose @ _dh(a, d, alpha, q[:, j])
    pose = pose @ _dh(0.0, FLANGE_D + TCP_OFFSET, 0.0, np.full(len(q), HAND_YAW))
    return pose[0] if single else pose


def arm_columns(names: Sequence[str]) -> list[int] | None:
    """Columns of fr3_joint1..7 (in kinematic order) among ``names``; None if any is missing."""
    index = {name: i for i, name in enumerate(names)}
    if not all(name in index for name in FR3_ARM_JOINTS):
        return None
    return [index[name] for name in FR3_ARM_JOINTS]
