"""The robot-state gate: one decision on joint states for every reader, and the target sanity check.

Reproduces the fault cases of issue 18 ("Why 6"): a fr3_joint1 of -3.3 rad that camera_sync_node
passed on, a JointState naming fr3_joint1 twice, and a rogue chunk of 1e30 values.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mail_ros.control.limits import fr3_limits
from mail_ros.control.robot_state import (STATE_LIMIT_TOLERANCE, TARGET_LIMIT_TOLERANCE, RobotStateError,
                                          check_joint_targets, joint_positions)
from mail_ros.spec import FR3_ARM_JOINTS, FR3_FINGER_JOINTS, GRIPPER_ACTION_NAME, ObservationSpec
from mail_ros.sync.observation import JOINT_STATES, ObservationBuilder, ObservationError

LIMITS = fr3_limits()
HOME = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])
NAMES = list(FR3_ARM_JOINTS) + list(FR3_FINGER_JOINTS)


def state(arm, fingers=(0.04, 0.04), names=NAMES):
    return SimpleNamespace(name=list(names), position=list(arm) + list(fingers))


def test_a_joint_beyond_its_limit_never_becomes_an_observation():
    # camera_sync_node, convert and replay build observations with ObservationBuilder.
    builder = ObservationBuilder(ObservationSpec(cameras=("agentview",), image_size=(8, 8)))
    q = HOME.copy()
    q[0] = -3.3
    with pytest.raises(ObservationError, match="fr3_joint1=-3.3"):
        builder.prepare(JOINT_STATES, state(q))
    np.testing.assert_array_equal(builder.prepare(JOINT_STATES, state(HOME))[:7], HOME)


def test_a_joint_named_twice_is_refused_whatever_its_values():
    msg = state(HOME)
    msg.name.append("fr3_joint1")
    msg.position.append(0.6)
    with pytest.raises(RobotStateError, match=r"\['fr3_joint1'\] more than once"):
        joint_positions(msg.name, msg.position, FR3_ARM_JOINTS)


def test_a_chunk_no_robot_could_mean_is_refused():
    names = list(FR3_ARM_JOINTS) + [GRIPPER_ACTION_NAME]
    rogue = np.full((8, 8), 1e30)
    with pytest.raises(RobotStateError, match="no robot could mean"):
        check_joint_targets(names, rogue)
    slightly_past = np.tile(np.append(LIMITS.position_max + 0.1, 0.08), (8, 1))
    check_joint_targets(names, slightly_past)  # clipped later by the safety filter, not refused
    check_joint_targets(names, np.tile(np.append(HOME, 0.1), (8, 1)))  # "open wide": clipped to 0.08
    with pytest.raises(RobotStateError, match="fr3_gripper_width"):
        check_joint_targets(names, np.tile(np.append(HOME, 0.5), (8, 1)))
    with pytest.raises(RobotStateError, match="non-finite"):
        check_joint_targets(names, np.tile(np.append(HOME, np.nan), (8, 1)))


@given(st.integers(0, 6), st.floats(-1.0, 3.0), st.booleans())
def test_the_gate_draws_the_line_at_the_hard_limits_plus_the_tolerance(joint, excess, upper):
    q = HOME.copy()
    limit = LIMITS.position_max[joint] if upper else LIMITS.position_min[joint]
    q[joint] = limit + (excess if upper else -excess)
    if excess <= STATE_LIMIT_TOLERANCE:
        np.testing.assert_array_equal(joint_positions(NAMES, list(q) + [0.04, 0.04], FR3_ARM_JOINTS), q)
    else:
        with pytest.raises(RobotStateError, match=FR3_ARM_JOINTS[joint]):
            joint_positions(NAMES, list(q) + [0.04, 0.04], FR3_ARM_JOINTS)
    targets = np.tile(q, (4, 1))
    if excess <= TARGET_LIMIT_TOLERANCE:
        check_joint_targets(FR3_ARM_JOINTS, targets)
    else:
        with pytest.raises(RobotStateError):
            check_joint_targets(FR3_ARM_JOINTS, targets)


@pytest.mark.parametrize("names,positions,match", [
    (NAMES[:-1], list(HOME) + [0.04, 0.04], "names but"),
    (NAMES[1:], list(HOME[1:]) + [0.04, 0.04], "lacks joints"),
    (NAMES, list(HOME) + [0.04, 0.2], "fr3_finger_joint2"),
    (NAMES, [np.inf] + list(HOME[1:]) + [0.04, 0.04], "non-finite"),
])
def test_malformed_states_are_refused(names, positions, match):
    with pytest.raises(RobotStateError, match=match):
        joint_positions(names, positions, NAMES)


def test_unknown_joints_are_only_checked_for_finiteness():
    np.testing.assert_array_equal(joint_positions(["x"], [1e6], ["x"]), [1e6])
