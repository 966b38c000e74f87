"""``mail-ros convert`` end to end: bags and HDF5 in, one HDF5 out, summary, exit status, atomicity."""

from __future__ import annotations

import dataclasses

import numpy as np

import bag_factory as bf
from mail_ros.cli import main
from mail_ros.data.hdf5 import read_hdf5, write_hdf5

ARGS = ["--image-size", "24", "32", "--max-skew", "0.03", "--rate", "10"]


def test_convert_bags_and_merge(tmp_path, capsys):
    good = bf.write_demo_bag(tmp_path / "good", bf.DemoBag(storage="sqlite3"))
    bf.write_demo_bag(tmp_path / "nan", bf.DemoBag(nan_command_at=101.0))
    bf.write_demo_bag(tmp_path / "split", bf.DemoBag(episodes=((100.3, 101.3), (101.5, 101.7)), seed=1))
    out = tmp_path / "demos.hdf5"
    assert main(["convert", str(tmp_path / "good"), str(tmp_path / "nan"), str(tmp_path / "split"), "-o", str(out),
                 "--min-frames", "5", *ARGS]) == 0
    text = capsys.readouterr().out
    assert "2 episodes" in text and "skipped episodes/inputs: 2" in text
    assert "non-finite position of fr3_joint3" in text and "2 aligned frames with actions, need at least 5" in text
    assert "skew wrist: p50" in text and "skew joint_states: p50" in text
    demos = read_hdf5(out)
    assert demos.cameras == ("agentview", "wrist") and demos.rate_hz == 10.0
    assert demos.action_names[-1] == "fr3_gripper_width" and len(demos.joint_names) == 9
    ep = demos.episodes[0]
    assert ep.source == str(tmp_path / "good") and ep.instruction == "put the cube in the bowl"
    np.testing.assert_allclose(ep.timestamps, good.camera_stamps["agentview"], atol=1e-8)
    assert ep.sync_stats["streams"]["wrist"]["skew_ms"]["p99"] < 30

    # HDF5 inputs merge (camera names mapped); an input with nothing usable leaves the output alone.
    merged = tmp_path / "merged.hdf5"
    assert main(["convert", str(out), str(out), "-o", str(merged), "--camera-map", "wrist=wrist", *ARGS]) == 0
    assert len(read_hdf5(merged).episodes) == 4
    before = out.read_bytes()
    assert main(["convert", str(tmp_path / "nan"), "-o", str(out), *ARGS]) == 1
    assert "no usable episode" in capsys.readouterr().err and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_merge_keeps_the_inputs_action_space(tmp_path, capsys):
    bf.write_demo_bag(tmp_path / "bag", bf.DemoBag())
    joint = tmp_path / "joint.hdf5"
    assert main(["convert", str(tmp_path / "bag"), "-o", str(joint), *ARGS]) == 0
    assert read_hdf5(joint).action_space == "joint_position"
    ee = tmp_path / "ee.hdf5"
    write_hdf5(ee, dataclasses.replace(read_hdf5(joint), action_space="ee_delta"))
    merged = tmp_path / "merged.hdf5"
    assert main(["convert", str(ee), str(ee), "-o", str(merged), *ARGS]) == 0
    assert read_hdf5(merged).action_space == "ee_delta" and len(read_hdf5(merged).episodes) == 2
    assert "action space ee_delta" in capsys.readouterr().out

    # The first input written decides; HDF5 files and bags of another action space are refused.
    assert main(["convert", str(ee), str(joint), str(tmp_path / "bag"), "-o", str(merged), *ARGS]) == 0
    text = capsys.readouterr().out
    assert "1 episodes" in text and "skipped episodes/inputs: 2" in text
    assert f"{joint}: action space 'joint_position' differs from the earlier inputs' 'ee_delta'" in text
    bag = tmp_path / "bag"
    assert f"{bag}: action space 'joint_position' (a bag) differs from the earlier inputs' 'ee_delta'" in text
    demos = read_hdf5(merged)
    assert demos.action_space == "ee_delta" and len(demos.episodes) == 1
    assert main(["convert", str(tmp_path / "bag"), str(ee), "-o", str(merged), *ARGS]) == 0
    assert read_hdf5(merged).action_space == "joint_position" and "'ee_delta' differs" in capsys.readouterr().out
