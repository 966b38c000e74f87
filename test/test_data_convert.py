"""``mail-ros convert`` end to end: bags and HDF5 in, one HDF5 out, summary, exit status, atomicity."""

from __future__ import annotations

import numpy as np

import bag_factory as bf
from mail_ros.cli import main
from mail_ros.data.hdf5 import read_hdf5

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
