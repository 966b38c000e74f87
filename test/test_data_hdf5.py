"""HDF5 demo files: round trip, atomic replacement, LIBERO layout, clear errors."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import h5py
import numpy as np
import pytest

from mail_ros.data.hdf5 import (UNDECLARED_ACTION_SPACE, DataError, DemoSet, DemoWriter, Episode, fingerprint_hdf5,
                                read_hdf5, write_hdf5)


def episode(n: int, seed: int, size=(16, 20), cams=("agentview", "wrist"), instruction="stack", source=None) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(
        images={c: rng.integers(0, 256, (n, *size, 3), dtype=np.uint8) for c in cams},
        joint_positions=rng.normal(size=(n, 9)),
        actions=rng.normal(size=(n, 8)),
        instruction=instruction,
        timestamps=100.0 + 0.1 * np.arange(n),
        source=source or f"bag{seed}",
        sync_stats={"streams": {"wrist": {"skew_ms": {"p50": 1.5}}}},
    )


def demo_set(episodes) -> DemoSet:
    return DemoSet(episodes, ("agentview", "wrist"), [f"j{i}" for i in range(9)], [f"a{i}" for i in range(8)], 10.0)


def test_round_trip_is_exact(tmp_path):
    demos = demo_set([episode(5, 0), episode(7, 1, instruction="open the drawer")])
    write_hdf5(tmp_path / "d.hdf5", demos)
    back = read_hdf5(tmp_path / "d.hdf5")
    assert (back.cameras, back.joint_names, back.action_names, back.rate_hz) == (
        demos.cameras, demos.joint_names, demos.action_names, 10.0)
    for a, b in zip(demos.episodes, back.episodes):
        for cam in demos.cameras:
            np.testing.assert_array_equal(a.images[cam], b.images[cam])
        np.testing.assert_array_equal(a.joint_positions, b.joint_positions)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.timestamps, b.timestamps)
        assert (a.instruction, a.source, a.sync_stats) == (b.instruction, b.source, b.sync_stats)
    with h5py.File(tmp_path / "d.hdf5") as f:  # the robomimic layout
        assert f["data/demo_1/obs/wrist_rgb"].shape == (7, 16, 20, 3)
        assert f["data/demo_1/obs/joint_states"].shape == (7, 9)
        assert f["data/demo_0/actions"].dtype == np.float32
        assert f["data"].attrs["total"] == 12 and f["data/demo_0"].attrs["num_samples"] == 5


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "d.hdf5"
    write_hdf5(path, demo_set([episode(5, 0)]))
    before = path.read_bytes()
    with pytest.raises(DataError, match="images are"):
        with DemoWriter(path, ("agentview", "wrist"), [f"j{i}" for i in range(9)], [f"a{i}" for i in range(8)], 10.0) as w:
            w.add(episode(4, 1))
            w.add(episode(4, 2, size=(8, 8)))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.hdf5"]


def test_libero_layout_with_camera_map(tmp_path):
    path = tmp_path / "libero.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": "open the top drawer"})
        for i, n in enumerate((6, 4)):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("obs/agentview_rgb", data=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
            g.create_dataset("obs/eye_in_hand_rgb", data=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))
            g.create_dataset("obs/joint_states", data=rng.normal(size=(n, 7)))
            g.create_dataset("actions", data=rng.normal(size=(n, 7)))
    demos = read_hdf5(path, camera_map={"eye_in_hand": "wrist"}, cameras=("agentview", "wrist"))
    assert demos.cameras == ("agentview", "wrist") and demos.rate_hz == 20.0
    assert [len(ep) for ep in demos.episodes] == [6, 4]
    assert demos.episodes[0].instruction == "open the top drawer"
    assert demos.joint_names[0] == "joint_0" and demos.action_names[-1] == "action_6"
    assert demos.action_space == UNDECLARED_ACTION_SPACE  # LIBERO does not say (its actions are OSC deltas)
    np.testing.assert_allclose(demos.episodes[1].timestamps, np.arange(4) / 20.0)
    with pytest.raises(DataError, match=r"cameras \['wrist'\] not found; the file has \['agentview', 'eye_in_hand'\]"):
        read_hdf5(path, cameras=("agentview", "wrist"))


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="cannot open as HDF5"):
        read_hdf5(tmp_path / "missing.hdf5")
    ep = episode(5, 0)
    ep.actions[2, 3] = np.nan
    with pytest.raises(DataError, match=r"bag0: non-finite actions at frame 2 \(t=100\.200 s\)"):
        Episode(ep.images, ep.joint_positions, ep.actions, "x", ep.timestamps, "bag0")
    with pytest.raises(DataError, match="mismatched image sizes: bag1 camera 'agentview' is \\(8, 8\\)"):
        demo_set([episode(5, 0), episode(5, 1, size=(8, 8))])


def _edit_episode(ep: Episode, what: str) -> None:
    if what == "actions":
        ep.actions[2, 3] += 1e-3
    elif what == "joint_states":
        ep.joint_positions[0, 0] += 1e-3
    elif what == "timestamps":
        ep.timestamps += 1e-3
    else:
        ep.instruction = "stack the cube"


def test_fingerprint_follows_actions_states_stamps_not_images_or_storage(tmp_path):
    def episodes():
        return [episode(5, 0), episode(7, 1, instruction="open the drawer")]

    write_hdf5(tmp_path / "a.hdf5", demo_set(episodes()))
    fingerprint = fingerprint_hdf5(tmp_path / "a.hdf5")
    with h5py.File(tmp_path / "a.hdf5") as src, h5py.File(tmp_path / "gzip.hdf5", "w") as dst:
        data = dst.create_group("data")
        data.attrs.update(src["data"].attrs)
        for key, group in src["data"].items():
            data.create_group(key).attrs.update(group.attrs)
            for name in ["actions", "timestamps"] + [f"obs/{obs}" for obs in group["obs"]]:
                data[key].create_dataset(name, data=group[name][()], compression="gzip")
    assert fingerprint_hdf5(tmp_path / "gzip.hdf5") == fingerprint  # same content, other storage
    other_images = episodes()
    other_images[1].images["wrist"][:] = 0
    write_hdf5(tmp_path / "images.hdf5", demo_set(other_images))
    assert fingerprint_hdf5(tmp_path / "images.hdf5") == fingerprint
    for what in ("actions", "joint_states", "timestamps", "instruction"):
        changed = episodes()
        _edit_episode(changed[1], what)
        write_hdf5(tmp_path / f"{what}.hdf5", demo_set(changed))
        assert fingerprint_hdf5(tmp_path / f"{what}.hdf5") != fingerprint, what
    with pytest.raises(DataError, match="cannot open as HDF5"):
        fingerprint_hdf5(tmp_path / "missing.hdf5")


def test_images_are_chunked_per_frame_and_compressed(tmp_path):
    write_hdf5(tmp_path / "d.hdf5", demo_set([episode(5, 0)]))
    with h5py.File(tmp_path / "d.hdf5") as f:
        ds = f["data/demo_0/obs/wrist_rgb"]
        assert ds.chunks == (1, 16, 20, 3) and ds.compression == "gzip"


def test_lazy_read_gives_the_same_windows_through_dataloader_workers(tmp_path):
    """Lazy frames read the same pixels as an in-memory load, also in forked and spawned workers."""
    import pickle

    import torch
    from torch.utils.data import DataLoader

    from mail_ros.data.dataset import DemoWindows
    from mail_ros.data.hdf5 import LazyFrames

    demos = demo_set([episode(9, 0), episode(12, 1, instruction="open the drawer")])
    demos.episodes[1].action_source = "kinesthetic"
    write_hdf5(tmp_path / "d.hdf5", demos)
    eager = read_hdf5(tmp_path / "d.hdf5")
    lazy = read_hdf5(tmp_path / "d.hdf5", lazy=True)
    assert all(isinstance(img, LazyFrames) for ep in lazy.episodes for img in ep.images.values())
    assert [ep.action_source for ep in lazy.episodes] == ["", "kinesthetic"]
    frames = lazy.episodes[1].images["wrist"]
    np.testing.assert_array_equal(np.asarray(frames), eager.episodes[1].images["wrist"])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(frames))[3:5], eager.episodes[1].images["wrist"][3:5])

    def batches(episodes, workers, context=None):
        windows = DemoWindows(episodes, ("agentview", "wrist"), 2, 3, augment_shift=2, seed=5)
        loader = DataLoader(windows, batch_size=4, num_workers=workers, multiprocessing_context=context)
        return list(loader)

    expected = batches(eager.episodes, 0)
    for workers, context in ((0, None), (2, "fork"), (1, "spawn")):
        got = batches(lazy.episodes, workers, context)
        assert len(got) == len(expected)
        for a, b in zip(expected, got):
            for cam in ("agentview", "wrist"):
                assert torch.equal(a["images"][cam], b["images"][cam])
            assert torch.equal(a["actions"], b["actions"])


@pytest.mark.parametrize("layout", ["writer", "uncompressed_frames", "contiguous", "gzip_blocks", "shuffled"])
def test_lazy_fast_path_reads_what_h5py_reads(tmp_path, layout):
    """The chunk-by-chunk fast path against h5py slicing, for every layout a file may have."""
    from mail_ros.data.hdf5 import LazyFrames

    frames = np.random.default_rng(3).integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)
    frames[4] = 7  # a frame that compresses to almost nothing
    path = tmp_path / "f.hdf5"
    options = {"writer": dict(chunks=(1, 6, 5, 3), compression="gzip", compression_opts=1),
               "uncompressed_frames": dict(chunks=(1, 6, 5, 3)),
               "contiguous": {},
               "gzip_blocks": dict(chunks=(4, 6, 5, 3), compression="gzip"),
               "shuffled": dict(chunks=(1, 6, 5, 3), compression="gzip", shuffle=True)}[layout]
    with h5py.File(path, "w") as f:
        f.create_dataset("obs/cam_rgb", data=frames, **options)
    with h5py.File(path) as f:
        lazy = LazyFrames.of(path, f["obs/cam_rgb"])
    assert lazy.codec == {"writer": "gzip", "uncompressed_frames": "raw"}.get(layout)
    for index in (slice(2, 6), slice(None), slice(9, 20), slice(5, 5), slice(-3, None), 0, 4, -1, np.int64(10),
                  slice(0, 10, 3), [1, 3]):
        np.testing.assert_array_equal(lazy[index], frames[index])


def first_two(frames) -> np.ndarray:
    return frames[0:2]


def test_lazy_frames_never_read_a_replaced_file(tmp_path):
    """Frames of a file replaced (by convert's rename) after its episodes were read: refused, not
    mixed with the old actions; a handle opened before the replacement keeps reading the old file."""
    path = tmp_path / "d.hdf5"
    write_hdf5(path, demo_set([episode(5, 0), episode(5, 2)]))
    first, second = (ep.images["wrist"] for ep in read_hdf5(path, lazy=True).episodes)
    np.testing.assert_array_equal(first[0:2], episode(5, 0).images["wrist"][0:2])  # opens the file
    write_hdf5(path, demo_set([episode(5, 1)]))
    np.testing.assert_array_equal(second[0:2], episode(5, 2).images["wrist"][0:2])  # the old file, still open
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # e.g. a DataLoader worker
        with pytest.raises(DataError, match="was replaced after its episodes were read"):
            pool.submit(first_two, first).result()
    new = read_hdf5(path, lazy=True).episodes[0].images["wrist"]
    np.testing.assert_array_equal(new[0:2], episode(5, 1).images["wrist"][0:2])
