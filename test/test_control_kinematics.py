"""FR3 forward kinematics against MuJoCo's model of the same arm (an independent reference)."""

import mujoco
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.control.kinematics import fr3_tcp_poses
from mail_ros.control.limits import FR3_POSITION_MAX, FR3_POSITION_MIN
from mail_ros.sim.franka_sim import TCP_SITE, build_model
from mail_ros.spec import FR3_ARM_JOINTS

MODEL = build_model()
DATA = mujoco.MjData(MODEL)
QPOS = [MODEL.joint(name).qposadr[0] for name in FR3_ARM_JOINTS]
LINK0 = MODEL.body("fr3_link0").id


def mujoco_tcp_in_link0(q: np.ndarray) -> np.ndarray:
    DATA.qpos[QPOS] = q
    mujoco.mj_kinematics(MODEL, DATA)
    base = np.eye(4)
    base[:3, :3], base[:3, 3] = DATA.xmat[LINK0].reshape(3, 3), DATA.xpos[LINK0]
    tcp = np.eye(4)
    tcp[:3, :3], tcp[:3, 3] = DATA.site_xmat[MODEL.site(TCP_SITE).id].reshape(3, 3), DATA.site_xpos[MODEL.site(TCP_SITE).id]
    return np.linalg.inv(base) @ tcp


joint_vectors = st.tuples(*[st.floats(float(lo), float(hi)) for lo, hi in zip(FR3_POSITION_MIN, FR3_POSITION_MAX)])


@settings(max_examples=40, deadline=None)
@given(q=joint_vectors)
def test_tcp_pose_matches_mujoco_anywhere_in_the_joint_limits(q):
    q = np.asarray(q)
    np.testing.assert_allclose(fr3_tcp_poses(q), mujoco_tcp_in_link0(q), atol=1e-6)


def test_batched_poses_equal_one_at_a_time():
    q = np.random.default_rng(0).uniform(-1, 1, (5, 7))
    batch = fr3_tcp_poses(q)
    assert batch.shape == (5, 4, 4)
    for row, pose in zip(q, batch):
        np.testing.assert_allclose(pose, fr3_tcp_poses(row), atol=1e-12)
