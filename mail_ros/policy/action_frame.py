"""The frame the network predicts actions in: absolute, or relative to the current joint positions.

With ``relative_actions`` an arm action dimension that names an observed joint (``fr3_joint3``
in both :class:`ActionSpec.names` and :class:`ObservationSpec.joint_names`) is learned as the
offset ``a[t + k] - q[t]`` from that joint's position at the current observation ``t``; the
other dimensions (the gripper width) stay absolute. Why: a 10 Hz step moves a joint by 0.01 to
0.05 rad, while absolute targets spread over 0.1 to 0.5 rad across a dataset. Z-scored absolute
targets make the motion a small residual on top of "where the arm is", which behaviour cloning
learns last; offsets z-score to the motion itself.

The policy owns this: :meth:`MaILPolicy.predict_chunk` still returns absolute robot-unit
targets, so nothing outside the policy (executor, safety layer, replay) knows the frame.
The trainer uses the same object to compute the action statistics in the frame the network sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from mail_ros.policy.config import PolicyConfig

__all__ = ["ActionFrame"]

Array = TypeVar("Array", np.ndarray, torch.Tensor)


class ActionFrame:
    """Maps absolute actions to the network's frame and back, given the current joint positions.

    Args:
        action_names: the policy's action dimensions, in order.
        joint_names: the observed joint positions, in order.
        relative: learn arm dimensions as offsets from the current joint position.
    """

    def __init__(self, action_names: Sequence[str], joint_names: Sequence[str], relative: bool) -> None:
        joints = {name: j for j, name in enumerate(joint_names)}
        pairs = [(a, joints[name]) for a, name in enumerate(action_names) if relative and name in joints]
        self.relative = relative
        self.action_index = [a for a, _ in pairs]
        self.joint_index = [j for _, j in pairs]
        self.relative_names = tuple(action_names[a] for a in self.action_index)

    @classmethod
    def of(cls, config: "PolicyConfig") -> "ActionFrame":
        """The frame of a :class:`PolicyConfig`."""
        spec = config.spec
        return cls(spec.action.names, spec.observation.joint_names, config.relative_actions)

    def to_network(self, actions: Array, current_joints: Array) -> Array:
        """actions (..., A, action_dim) absolute; current_joints (..., J) -> the same shape, network frame."""
        return self._shift(actions, current_joints, -1.0)

    def to_robot(self, actions: Array, current_joints: Array) -> Array:
        """Inverse of :meth:`to_network`: network-frame actions back to absolute targets."""
        return self._shift(actions, current_joints, 1.0)

    def _shift(self, actions: Array, current_joints: Array, sign: float) -> Array:
        if not self.action_index:
            return actions
        offset = current_joints[..., None, self.joint_index]  # (..., 1, n_relative)
        if isinstance(actions, torch.Tensor):
            out = actions.clone()
            offset = offset.to(actions.dtype)
        else:
            out = np.array(actions, copy=True)
        out[..., self.action_index] += sign * offset
        return out
