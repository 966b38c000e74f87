"""ActionFrame: absolute <-> network-frame actions, in numpy and torch alike."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mail_ros.policy.action_frame import ActionFrame

ACTIONS = ("fr3_joint2", "fr3_joint1", "fr3_gripper_width")
JOINTS = ("fr3_joint1", "fr3_joint2", "fr3_finger_joint1")
finite = st.floats(-10, 10, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(actions=arrays(np.float64, (2, 4, 3), elements=finite), joints=arrays(np.float64, (2, 3), elements=finite))
def test_round_trip_and_offsets_by_name(actions, joints):
    frame = ActionFrame(ACTIONS, JOINTS, relative=True)
    network = frame.to_network(actions, joints)
    np.testing.assert_allclose(frame.to_robot(network, joints), actions, atol=1e-9)
    # Matched by name, not position: action 0 is fr3_joint2 (joint 1), action 1 is fr3_joint1.
    np.testing.assert_allclose(network[..., 0], actions[..., 0] - joints[:, None, 1], atol=1e-9)
    np.testing.assert_allclose(network[..., 1], actions[..., 1] - joints[:, None, 0], atol=1e-9)
    np.testing.assert_array_equal(network[..., 2], actions[..., 2])  # no joint of that name
    as_torch = frame.to_network(torch.from_numpy(actions), torch.from_numpy(joints))
    np.testing.assert_allclose(as_torch.numpy(), network, atol=1e-12)
    assert network is not actions  # never in place: callers keep their absolute actions


def test_absolute_frame_is_the_identity():
    frame = ActionFrame(ACTIONS, JOINTS, relative=False)
    actions, joints = np.ones((4, 3)), np.full(3, 5.0)
    assert frame.action_index == [] and frame.relative_names == ()
    np.testing.assert_array_equal(frame.to_network(actions, joints), actions)
    np.testing.assert_array_equal(frame.to_robot(actions, joints), actions)
