"""Training windows, statistics, the episode split, augmentation and the embedding cache."""

from __future__ import annotations

import logging
import multiprocessing

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from mail_ros.data.dataset import (DemoWindows, EmbeddingCache, compute_stats, random_shift, save_cache_file,
                                   split_episodes, window_index)
from mail_ros.data.hdf5 import DataError, Episode
from mail_ros.policy.action_frame import ActionFrame


def counting_episode(n: int, offset: int, instruction: str = "stack") -> Episode:
    """Frame f of this episode has value offset + f everywhere (images mod 256)."""
    f = offset + np.arange(n)
    images = np.broadcast_to((f % 256).astype(np.uint8)[:, None, None, None], (n, 8, 8, 3)).copy()
    return Episode({"agentview": images, "wrist": images.copy()}, np.repeat(f[:, None], 3, 1), np.repeat(f[:, None], 2, 1),
                   instruction, 0.1 * np.arange(n), f"ep{offset}")


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(0, 12), max_size=5), T=st.integers(1, 4), A=st.integers(1, 5))
def test_window_index_counts_every_window(lengths, T, A):
    index = window_index(lengths, T, A)
    assert len(index) == sum(max(0, n - T - A + 2) for n in lengths)
    for e, s in index:
        assert 0 <= s and s + T + A - 1 <= lengths[e]


def test_window_content_matches_spec():
    T, A = 3, 4
    ds = DemoWindows([counting_episode(9, 0), counting_episode(7, 100)], ("agentview", "wrist"), T, A)
    assert len(ds) == (9 - 6 + 1) + (7 - 6 + 1)
    for i, (e, s) in enumerate(ds.index):
        item = ds[i]
        base = 100 * e + s
        # observations s .. s+T-1, actions from the current step s+T-1 on
        np.testing.assert_array_equal(item["images"]["wrist"][:, 0, 0, 0].numpy(), base + np.arange(T))
        np.testing.assert_array_equal(item["joint_positions"][:, 0].numpy(), base + np.arange(T))
        np.testing.assert_array_equal(item["actions"][:, 0].numpy(), base + T - 1 + np.arange(A))
        assert item["images"]["agentview"].shape == (T, 8, 8, 3) and item["language"].shape == (0,)
    np.testing.assert_array_equal(ds.target_actions()[:, :, 0], np.stack([ds[i]["actions"][:, 0].numpy() for i in range(len(ds))]))


def test_short_episodes_skipped_or_error(caplog):
    with caplog.at_level(logging.WARNING):
        ds = DemoWindows([counting_episode(9, 0), counting_episode(3, 100)], ("agentview",), 2, 4)
    assert len(ds) == 9 - 5 + 1 and "ep100 (3 frames)" in caplog.text
    with pytest.raises(DataError, match=r"a window needs T \+ A - 1 = 5 frames but the episodes are ep0 \(3 frames\)"):
        DemoWindows([counting_episode(3, 0)], ("agentview",), 2, 4)
    with pytest.raises(DataError, match=r"no validation window: a window needs"):
        DemoWindows([counting_episode(3, 0)], ("agentview",), 2, 4, split="validation")
    with pytest.raises(DataError, match=r"no images for cameras \['side'\]"):
        DemoWindows([counting_episode(9, 0)], ("side",), 2, 4)


def test_split_is_by_episode_seeded_and_stats_use_train_only():
    train, val = split_episodes(10, 0.2, seed=3)
    assert sorted(train + val) == list(range(10)) and len(val) == 2
    assert split_episodes(10, 0.2, seed=3) == (train, val) and split_episodes(10, 0.2, seed=4) != (train, val)
    assert split_episodes(1, 0.5, 0) == ([0], []) and split_episodes(3, 0.0, 0) == ([0, 1, 2], [])
    eps = [counting_episode(5, 10 * i) for i in range(10)]
    # T = A = 1: one window per frame, so the action statistics are those of every frame.
    windows = DemoWindows([eps[i] for i in train], ("agentview",), 1, 1)
    stats = compute_stats(windows, ActionFrame(("a", "b"), ("j0", "j1", "j2"), relative=False))
    values = np.concatenate([eps[i].actions for i in train])
    np.testing.assert_allclose(stats["actions"]["mean"], values.mean(0))
    np.testing.assert_allclose(stats["actions"]["std"], values.std(0))
    np.testing.assert_allclose(stats["joint_positions"]["max"], np.concatenate([eps[i].joint_positions for i in train]).max(0))


def test_relative_stats_are_over_offsets_from_the_current_step():
    # Frame f has joints and actions = f; with T = 2, A = 3 the window at s targets frames
    # s+1 .. s+3 from the current frame s+1, so the offsets of dimension "j1" are 0, 1, 2.
    windows = DemoWindows([counting_episode(8, 0), counting_episode(6, 50)], ("agentview",), 2, 3)
    stats = compute_stats(windows, ActionFrame(("j1", "width"), ("j0", "j1", "j2"), relative=True))
    np.testing.assert_allclose([stats["actions"]["min"][0], stats["actions"]["max"][0]], [0, 2])
    np.testing.assert_allclose(stats["actions"]["mean"][0], 1.0)
    absolute = windows.target_actions()[..., 1]
    np.testing.assert_allclose(stats["actions"]["mean"][1], absolute.mean())  # "width" is no joint: absolute


def test_language_stats_are_over_windows_with_one_scale():
    # Two instructions, 5 + 3 windows (T = 2, A = 3): the mean weighs each by its windows.
    language = {"stack": np.array([1.0, 0.0, 2.0], np.float32), "pick": np.array([0.0, 3.0, 2.0], np.float32)}
    episodes = [counting_episode(8, 0, "stack"), counting_episode(6, 50, "pick")]
    windows = DemoWindows(episodes, ("agentview",), 2, 3, language)
    stats = compute_stats(windows, ActionFrame(("a", "b"), ("j0", "j1", "j2"), relative=False))["language"]
    rows = np.stack([language["stack"]] * 5 + [language["pick"]] * 3)
    np.testing.assert_allclose(stats["mean"], rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], np.full(3, np.sqrt(((rows - rows.mean(0)) ** 2).mean())), rtol=1e-6)
    assert "language" not in compute_stats(DemoWindows(episodes, ("agentview",), 2, 3), ActionFrame(("a", "b"), ("j0",), relative=False))


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(2, 12), dim=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_isotropic_stats_centre_and_keep_the_geometry(rows, dim, seed):
    from mail_ros.policy.normalizer import Normalizer

    data = np.random.default_rng(seed).normal(0.5, 0.1, (rows, dim)) * np.linspace(0.01, 1.0, dim)
    stats = Normalizer.isotropic_stats_from_data(data)
    assert np.ptp(stats["std"]) == 0 and stats["std"][0] > 0
    z = (data - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-9)
    distances = lambda x: np.linalg.norm(x[:, None] - x[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(distances(z) * stats["std"][0], distances(data), atol=1e-9)
    if np.sqrt(((data - data.mean(0)) ** 2).mean()) > 1e-3:
        np.testing.assert_allclose(np.sqrt((z**2).mean()), 1.0, rtol=1e-6)


def test_random_shift_moves_whole_history_and_is_seeded():
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    frames[:, 6:10, 6:10] = 255
    shifted = random_shift(frames, 3, np.random.default_rng(0))
    assert shifted.shape == frames.shape
    np.testing.assert_array_equal(shifted[0], shifted[1])
    moved = [np.argwhere(random_shift(frames, 3, np.random.default_rng(s))[0, :, :, 0])[0] for s in range(20)]
    assert len({tuple(m) for m in moved}) > 3 and all(3 <= m[0] <= 9 for m in moved)
    ds = DemoWindows([counting_episode(9, 0)], ("agentview",), 2, 2, augment_shift=2, seed=1)
    np.testing.assert_array_equal(ds[3]["images"]["agentview"], ds[3]["images"]["agentview"])


class CountingEncoder:
    """A deterministic stand-in text encoder that records what it was asked to encode."""

    name, dim = "test:counting", 4

    def __init__(self):
        self.seen = []

    def encode(self, texts):
        self.seen.extend(texts)
        return np.array([[len(t), t.count("e"), 1.0, -1.0] for t in texts], dtype=np.float32)


def _fill_cache_entry(path, times: int) -> None:
    for _ in range(times):
        save_cache_file(path, {"features": np.arange(250_000, dtype=np.float32)})


def test_processes_filling_one_cache_entry_at_once_neither_fail_nor_tear_it(tmp_path):
    # Two trainings on the same data compute the same cache files at the same time.
    path = tmp_path / "cache" / "entry.safetensors"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_fill_cache_entry, args=(path, 20)) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert [writer.exitcode for writer in writers] == [0, 0, 0, 0]
    np.testing.assert_array_equal(load_file(path)["features"], np.arange(250_000, dtype=np.float32))
    assert [p.name for p in path.parent.iterdir()] == ["entry.safetensors"]  # no temporary file left


def test_embedding_cache_encodes_each_text_once(tmp_path):
    encoder = CountingEncoder()
    cache = EmbeddingCache(tmp_path / "emb")
    table = cache.embeddings("test:counting", ["stack", "open the door", "stack"], lambda spec: encoder)
    assert list(table) == ["stack", "open the door"] and encoder.seen == ["stack", "open the door"]
    np.testing.assert_array_equal(table["stack"], [5, 0, 1, -1])
    again = EmbeddingCache(tmp_path / "emb").embeddings("test:counting", ["open the door", "stack"], lambda spec: pytest.fail("loaded"))
    np.testing.assert_array_equal(again["open the door"], table["open the door"])
    assert len(list((tmp_path / "emb").iterdir())) == 2
    other = EmbeddingCache(tmp_path / "emb").embeddings("test:other", ["stack"], lambda spec: encoder)
    assert encoder.seen[-1] == "stack" and other["stack"].shape == (4,)
    ds = DemoWindows([counting_episode(5, 0, "stack")], ("agentview",), 1, 1, language=table)
    np.testing.assert_array_equal(ds[0]["language"], [5, 0, 1, -1])
    with pytest.raises(DataError, match=r"no language embedding for instructions \['wave'\]"):
        DemoWindows([counting_episode(5, 0, "wave")], ("agentview",), 1, 1, language=table)
