"""Action sources: kinesthetic (measured joints at t + dt) and teleoperation (a leader's JointState or
JointTrajectory under its own joint names), checked exactly against the bag factory's truth; an
episode without its source is skipped with the reason; the source lands in the HDF5 and the summary."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bag_factory as bf
from mail_ros.cli import main
from mail_ros.data.action_sources import MeasuredArm
from mail_ros.sync.stamps import seconds_to_ns
from mail_ros.data.bags import BagConfig, read_bag
from mail_ros.data.hdf5 import DataError, read_hdf5
from mail_ros.data.ros_types import typestore
from mail_ros.spec import FR3_ARM_JOINTS, ObservationSpec

DT = 0.1
SPEC = ObservationSpec(cameras=("agentview", "wrist"), image_size=(24, 32), rate_hz=1 / DT)
LEADER_MAP = tuple(zip(bf.LEADER_JOINTS, FR3_ARM_JOINTS))
CONVERT_ARGS = ["--image-size", "24", "32", "--max-skew", "0.03", "--rate", "10"]


def config(**kw) -> BagConfig:
    return BagConfig(observation=SPEC, max_skew=0.03, **kw)


def test_kinesthetic_actions_are_the_measured_joints_at_t_plus_dt(tmp_path):
    truth = bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(command_topic=None, gripper_topic=None))
    readout = read_bag(tmp_path / "bag", config(arm_source="kinesthetic"))
    assert readout.failures == []
    (ep,) = readout.episodes
    # The arm is where the hand took it: the measured positions (LAG behind the factory's
    # "command", which nobody sent here), interpolated at t + dt; linear in t, so exact.
    np.testing.assert_allclose(ep.actions[:, :7], bf.arm_target(ep.timestamps + DT - bf.LAG), atol=1e-6)
    np.testing.assert_allclose(ep.actions[:, 7], bf.gripper_target(ep.timestamps + DT), atol=1e-6)
    late = int(np.sum(truth.camera_stamps["agentview"] + DT > truth.joint_stamps[-1]))
    assert late >= 1 and ep.sync_stats["frames_dropped"] == {"no_future_state": late}
    assert ep.action_source == "kinesthetic /joint_states; gripper measured"


def test_a_kinesthetic_lead_of_the_controllers_lag_gives_the_commands_back(tmp_path):
    # The factory's arm reaches each command LAG s after it: labelling the measured joints at
    # t + dt + LAG is what the (unrecorded) commands were, so a policy taught by hand leads the arm
    # as a commanded one does.
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(command_topic=None, gripper_topic=None))
    (ep,) = read_bag(tmp_path / "bag", config(arm_source="kinesthetic", kinesthetic_lead=bf.LAG)).episodes
    np.testing.assert_allclose(ep.actions[:, :7], bf.arm_target(ep.timestamps + DT), atol=1e-6)
    np.testing.assert_allclose(ep.actions[:, 7], bf.gripper_target(ep.timestamps + DT), atol=1e-6)
    assert ep.action_source == f"kinesthetic /joint_states lead {bf.LAG:g} s; gripper measured"
    with pytest.raises(ValueError, match="kinesthetic_lead applies to arm_source kinesthetic"):
        config(kinesthetic_lead=bf.LAG)
    with pytest.raises(ValueError, match="kinesthetic_lead must be >= 0"):
        config(arm_source="kinesthetic", kinesthetic_lead=-0.1)


def test_a_bag_without_commands_is_refused_as_command_source_with_the_way_out(tmp_path):
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(command_topic=None))
    with pytest.raises(DataError, match=r"missing topics \['/fr3_arm_controller/joint_trajectory'\].*--arm-source kinesthetic"):
        read_bag(tmp_path / "bag", config())


@pytest.mark.parametrize("trajectory", [False, True], ids=["joint_state", "joint_trajectory"])
def test_teleop_leader_targets_with_joint_name_map(tmp_path, trajectory):
    topic = "/gello/joint_states" if not trajectory else "/spacemouse/arm_targets"
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(command_topic=None, leader_topic=topic, leader_trajectory=trajectory))
    readout = read_bag(tmp_path / "bag", config(arm_source="teleop", teleop_topic=topic, teleop_joint_map=LEADER_MAP))
    assert readout.failures == []
    (ep,) = readout.episodes
    # The leader's target for t + dt (its JointState interpolated by stamp, or its trajectory by the command rule).
    np.testing.assert_allclose(ep.actions[:, :7], bf.arm_target(ep.timestamps + DT), atol=1e-6)
    np.testing.assert_allclose(ep.actions[:, 7], bf.gripper_target(ep.timestamps + DT), atol=1e-6)
    assert ep.action_source.startswith(f"teleop {topic} (leader_joint_0->fr3_joint1, ")
    assert ep.action_source.endswith("; gripper command")
    # Without the map, the leader's names are not the robot's: refused by name, not guessed.
    with pytest.raises(DataError, match=r"lacks joints \['fr3_joint1'"):
        read_bag(tmp_path / "bag", config(arm_source="teleop", teleop_topic=topic))


def test_an_episode_whose_leader_went_silent_is_skipped_with_the_reason(tmp_path):
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag(command_topic=None, leader_topic="/leader/joint_states",
                                                   episodes=((100.0, 101.4), (101.6, 103.0)), leader_until=101.5))
    readout = read_bag(tmp_path / "bag", config(arm_source="teleop", teleop_joint_map=LEADER_MAP))
    (ep,) = readout.episodes
    assert ep.timestamps[-1] < 101.4
    (failure,) = readout.failures
    assert "episode 1: 0 aligned frames with actions" in failure and "no_future_state" in failure


def test_a_bag_without_the_leader_topic_is_skipped_naming_it(tmp_path):
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag())
    with pytest.raises(DataError, match=r"missing topics \['/leader/joint_states'\]"):
        read_bag(tmp_path / "bag", config(arm_source="teleop"))


def joint_state(t: float, names, positions):
    ts = typestore()
    sec = int(np.floor(t))
    stamp = ts.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=int(round((t - sec) * 1e9)))
    return ts.types["sensor_msgs/msg/JointState"](
        header=ts.types["std_msgs/msg/Header"](stamp=stamp, frame_id=""), name=list(names),
        position=np.asarray(positions, dtype=np.float64), velocity=np.zeros(0), effort=np.zeros(0))


@settings(max_examples=60, deadline=None)  # a busy machine stalls any example now and then
@given(gaps=st.lists(st.floats(0.001, 0.3), min_size=1, max_size=12), at=st.floats(0.0, 1.0),
       slope=st.floats(-2.0, 2.0), max_gap=st.floats(0.01, 0.2), lead=st.sampled_from([0.0, 0.05, 0.137]))
def test_measured_arm_interpolates_only_across_short_gaps(gaps, at, slope, max_gap, lead):
    arm = MeasuredArm("kinesthetic", "/joint_states", ("b", "a"), max_state_gap=max_gap, lead=lead)
    for t in (10.0 + np.concatenate([[0.0], np.cumsum(gaps)]))[::-1]:  # out of order: interpolation is by stamp
        arm.add(joint_state(t, ("a", "b", "c"), (slope * t, 1.0, 7.0)), seconds_to_ns(t), "test")
    stamps = np.sort(np.asarray(arm.stamps))  # ns, as stored
    dt = seconds_to_ns(DT) + seconds_to_ns(lead)  # the lead adds to dt: t + dt + lead
    t = int(stamps[0] + round(at * int(stamps[-1] - stamps[0]))) - dt
    value, why = arm.at(t, seconds_to_ns(DT))
    when = t + dt
    k = int(np.searchsorted(stamps, when, side="left"))
    if when > stamps[-1]:
        assert (value, why) == (None, "no_future_state")
    elif stamps[k] == when or stamps[k] - stamps[k - 1] <= seconds_to_ns(max_gap):
        # The states hold slope * (their stamp in s, rounded to the message's nanoseconds).
        assert why == "" and value == pytest.approx([1.0, slope * when / 1e9], abs=1e-8)
    else:
        assert value is None and why == "state_gap"
    assert arm.at(int(stamps[0]) - dt - 10_000_000, seconds_to_ns(DT)) == (None, "no_state")
    assert arm.at(int(stamps[-1]) - dt + 10_000_000, seconds_to_ns(DT)) == (None, "no_future_state")


def test_convert_records_and_reports_each_episode_source(tmp_path, capsys):
    bf.write_demo_bag(tmp_path / "kin", bf.DemoBag(command_topic=None, gripper_topic=None))
    bf.write_demo_bag(tmp_path / "cmd", bf.DemoBag())
    out = tmp_path / "kin.hdf5"
    assert main(["convert", str(tmp_path / "kin"), "-o", str(out), "--arm-source", "kinesthetic", *CONVERT_ARGS]) == 0
    assert "actions from: kinesthetic /joint_states; gripper measured (1 episodes)" in capsys.readouterr().out
    with h5py.File(out) as f:
        assert f["data/demo_0"].attrs["action_source"] == "kinesthetic /joint_states; gripper measured"
    # Merged with commanded demos: each episode keeps its own source.
    assert main(["convert", str(tmp_path / "cmd"), "-o", str(tmp_path / "cmd.hdf5"), *CONVERT_ARGS]) == 0
    merged = tmp_path / "all.hdf5"
    assert main(["convert", str(out), str(tmp_path / "cmd.hdf5"), "-o", str(merged), *CONVERT_ARGS]) == 0
    text = capsys.readouterr().out
    assert ("actions from: command /fr3_arm_controller/joint_trajectory; gripper command (1 episodes), "
            "kinesthetic /joint_states; gripper measured (1 episodes)") in text
    assert [ep.action_source for ep in read_hdf5(merged).episodes] == [
        "kinesthetic /joint_states; gripper measured", "command /fr3_arm_controller/joint_trajectory; gripper command"]
    # With a lead, the attribute says so; a lead for commanded demos is refused.
    assert main(["convert", str(tmp_path / "kin"), "-o", str(tmp_path / "lead.hdf5"), "--arm-source", "kinesthetic",
                 "--kinesthetic-lead", "0.1", *CONVERT_ARGS]) == 0
    assert "actions from: kinesthetic /joint_states lead 0.1 s; gripper measured (1 episodes)" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "cmd"), "-o", str(tmp_path / "x.hdf5"), "--kinesthetic-lead", "0.1",
                 *CONVERT_ARGS]) == 2
    assert "kinesthetic_lead applies to arm_source kinesthetic" in capsys.readouterr().err
    # Kinesthetic bags given as command demos: skipped with the reason, not mislabelled.
    assert main(["convert", str(tmp_path / "kin"), "-o", str(tmp_path / "none.hdf5"), *CONVERT_ARGS]) == 1
    assert "--arm-source kinesthetic" in capsys.readouterr().err
