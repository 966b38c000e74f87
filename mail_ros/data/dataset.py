"""Training samples from demonstrations: sliding windows, statistics, split, augmentation, language.

A sample is one window of T + A - 1 consecutive frames of an episode (MAIL_SPEC "Training"):
the T observations at frames s .. s+T-1 and the A target actions at frames s+T-1 .. s+T+A-2,
i.e. starting at the current (last observed) step. Every such window of every episode is a
sample, so an episode of N frames gives N - T - A + 2 samples. No padding at episode ends.

Samples are dicts in the policy's batch format (the default collate stacks them)::

    images           {camera: uint8 (T, H, W, 3)}
    joint_positions  float32 (T, J)
    language         float32 (L,)  (L = 0 without language)
    actions          float32 (A, action_dim), robot units (the policy normalises)
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch.utils.data import Dataset

from mail_ros.data.hdf5 import DataError, Episode
from mail_ros.policy.action_frame import ActionFrame
from mail_ros.policy.normalizer import Normalizer

__all__ = [
    "DemoWindows",
    "window_index",
    "split_episodes",
    "compute_stats",
    "random_shift",
    "shift_frames",
    "EmbeddingCache",
    "save_cache_file",
]

log = logging.getLogger(__name__)


def window_index(lengths: Sequence[int], obs_horizon: int, action_horizon: int) -> np.ndarray:
    """(K, 2) int64 rows (episode, first frame s) of every window; episodes too short give none."""
    span = obs_horizon + action_horizon - 1
    rows = [(e, s) for e, n in enumerate(lengths) for s in range(n - span + 1)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def split_episodes(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of episode indices into (train, validation), by episode.

    ``round(n * val_fraction)`` episodes go to validation, at least one when ``val_fraction > 0``
    and at least one always stays for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n < 1:
        raise DataError("no episodes to split")
    n_val = 0 if val_fraction == 0 else min(max(1, round(n * val_fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def compute_stats(windows: "DemoWindows", frame: ActionFrame) -> dict[str, dict[str, np.ndarray]]:
    """Mean/std/min/max of the target actions, the joint positions and the instruction embeddings.

    Actions: per dimension over every window's A targets, in the network's ``frame`` (offsets
    from the current joint positions for relative dimensions), i.e. exactly what the network is
    trained to output. Joint positions: per dimension over every frame of the episodes.
    Language (only when the windows carry embeddings): over every window's instruction, with
    one scale for all dimensions (:meth:`Normalizer.isotropic_stats_from_data`). Call it on the
    TRAINING windows only, so validation measures generalisation honestly.
    """
    if not windows.episodes:
        raise DataError("cannot compute statistics of zero episodes")
    targets = frame.to_network(windows.target_actions(), windows.current_joint_positions())  # (K, A, Da)
    stats = {
        "actions": Normalizer.stats_from_data(targets),
        "joint_positions": Normalizer.stats_from_data(np.concatenate([ep.joint_positions for ep in windows.episodes])),
    }
    if windows.language:
        embeddings = np.stack([windows.language[windows.episodes[e].instruction] for e, _ in windows.index])  # (K, L)
        stats["language"] = Normalizer.isotropic_stats_from_data(embeddings)
    return stats


def shift_frames(frames: np.ndarray, pad: int, offset: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) frames shifted as one: edge-padded by ``pad`` pixels, then cropped back to H x W at
    ``offset`` (dy, dx) in [0, 2 pad] each; (pad, pad) is no shift."""
    if pad == 0:
        return frames
    _, h, w, _ = frames.shape
    dy, dx = offset
    if not (0 <= dy <= 2 * pad and 0 <= dx <= 2 * pad):
        raise ValueError(f"a shift offset must lie in [0, {2 * pad}] pixels, got {offset}")
    padded = np.pad(frames, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[:, dy : dy + h, dx : dx + w]


def random_shift(frames: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Shift (T, H, W, 3) frames by one random offset in [-pad, pad] pixels (:func:`shift_frames`).

    The same offset for all T frames: a camera does not jump within one observation history.
    """
    if pad == 0:
        return frames
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    return shift_frames(frames, pad, (int(dy), int(dx)))


class DemoWindows(Dataset):
    """Every window of T observations and A actions of the given episodes.

    Args:
        episodes: demonstrations (all with the same cameras, image size, J and action_dim).
        cameras: the policy's camera names, in its order.
        obs_horizon: T. action_horizon: A.
        language: instruction -> embedding (L,); None or empty when the policy uses no language.
        augment_shift: random-shift augmentation in pixels (0 = off; use on training data only).
        seed: with ``epoch`` (set by the trainer before each epoch) and the sample index, seeds
            the augmentation of each sample: reproducible whatever the DataLoader workers.
        split: what the windows are for ("training", "validation"), named in errors.

    Episodes shorter than T + A - 1 frames are skipped with a warning naming them; if no
    window is left, :class:`DataError` lists the episodes and their lengths.
    """

    def __init__(
        self,
        episodes: Sequence[Episode],
        cameras: Sequence[str],
        obs_horizon: int,
        action_horizon: int,
        language: Mapping[str, np.ndarray] | None = None,
        augment_shift: int = 0,
        seed: int = 0,
        split: str = "training",
    ) -> None:
        if obs_horizon < 1 or action_horizon < 1:
            raise ValueError(f"horizons must be >= 1, got T={obs_horizon}, A={action_horizon}")
        if augment_shift < 0:
            raise ValueError(f"augment_shift must be >= 0 pixels, got {augment_shift}")
        self.episodes = list(episodes)
        self.cameras = tuple(cameras)
        self.obs_horizon = obs_horizon
        self.action_horizon = action_horizon
        self.augment_shift = augment_shift
        self.seed = seed
        self.epoch = 0
        span = obs_horizon + action_horizon - 1
        for ep in self.episodes:
            missing = [c for c in self.cameras if c not in ep.images]
            if missing:
                raise DataError(f"{ep.source}: no images for cameras {missing}; it has {sorted(ep.images)}")
        short = [f"{ep.source} ({len(ep)} frames)" for ep in self.episodes if len(ep) < span]
        self.index = window_index([len(ep) for ep in self.episodes], obs_horizon, action_horizon)
        if len(self.index) == 0:
            raise DataError(
                f"no {split} window: a window needs T + A - 1 = {span} frames but the episodes are "
                + ", ".join(f"{ep.source} ({len(ep)} frames)" for ep in self.episodes)
            )
        if short:
            log.warning("skipping %d episode(s) shorter than one window (%d frames): %s", len(short), span, ", ".join(short))
        self.language = dict(language or {})
        self.language_dim = len(next(iter(self.language.values()))) if self.language else 0
        if self.language:
            missing_text = sorted({ep.instruction for ep in self.episodes} - set(self.language))
            if missing_text:
                raise DataError(f"no language embedding for instructions {missing_text}")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        e, s = self.index[i]
        ep = self.episodes[e]
        t_end = s + self.obs_horizon  # observations s .. t_end - 1; the current step is t_end - 1
        images = {}
        rng = np.random.default_rng([self.seed, self.epoch, int(i)]) if self.augment_shift else None
        for cam in self.cameras:
            frames = ep.images[cam][s:t_end]  # (T, H, W, 3)
            if self.augment_shift:
                frames = random_shift(frames, self.augment_shift, rng)
            images[cam] = torch.from_numpy(np.ascontiguousarray(frames))
        language = self.language[ep.instruction] if self.language else np.zeros(0, dtype=np.float32)
        return {
            "images": images,
            "joint_positions": torch.from_numpy(ep.joint_positions[s:t_end]),  # (T, J)
            "language": torch.from_numpy(np.asarray(language, dtype=np.float32)),  # (L,)
            "actions": torch.from_numpy(ep.actions[t_end - 1 : t_end - 1 + self.action_horizon]),  # (A, action_dim)
        }

    def target_actions(self) -> np.ndarray:
        """The target actions of every window, (K, A, action_dim), without touching images."""
        A, T = self.action_horizon, self.obs_horizon
        return np.stack([self.episodes[e].actions[s + T - 1 : s + T - 1 + A] for e, s in self.index])

    def current_joint_positions(self) -> np.ndarray:
        """The joint positions at every window's current (last observed) step, (K, J)."""
        T = self.obs_horizon
        return np.stack([self.episodes[e].joint_positions[s + T - 1] for e, s in self.index])


def save_cache_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a cache entry as safetensors at ``path`` atomically: a reader sees the whole file or
    none. The temporary file is this call's own (not ``path`` + a fixed suffix), so processes that
    fill one cache at once (two trainings on the same data) never write into each other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EmbeddingCache:
    """On-disk instruction embeddings, one safetensors file per (encoder, text).

    Keyed by the encoder spec (``PolicyConfig.language.encoder``, the string the robot rebuilds
    the encoder from) and the exact text; the encoder is loaded only when a text is missing.
    ``folder=None`` keeps nothing on disk (every call encodes).
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder is None else Path(folder)

    def path(self, encoder: str, text: str) -> Path:
        digest = hashlib.sha256(f"{encoder}\n{text}".encode()).hexdigest()[:32]
        return self.folder / f"{digest}.safetensors"

    def embeddings(
        self, encoder: str, texts: Sequence[str], load_encoder: Callable[[str], object]
    ) -> dict[str, np.ndarray]:
        """``{text: (L,) float32}`` for each distinct text; ``load_encoder(spec)`` makes a TextEncoder."""
        table: dict[str, np.ndarray] = {}
        missing = []
        for text in dict.fromkeys(texts):
            path = None if self.folder is None else self.path(encoder, text)
            if path is not None and path.is_file():
                table[text] = load_file(path)["embedding"]
            else:
                missing.append(text)
        if missing:
            from mail_ros.language.encoders import embed_instructions

            computed = embed_instructions(load_encoder(encoder), missing)
            for text, vector in computed.items():
                table[text] = np.asarray(vector, dtype=np.float32)
                if self.folder is not None:
                    save_cache_file(self.path(encoder, text), {"embedding": table[text]},
                                    metadata={"encoder": encoder, "text": text})
        return {text: table[text] for text in dict.fromkeys(texts)}
