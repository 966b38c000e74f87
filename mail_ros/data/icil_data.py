"""ICIL training data: demonstrations grouped by task, prompts drawn from the same task, and
frame features of frozen image encoders computed once per dataset and cached.

* Task: an episode's instruction (what every recorder and converter stores with it). Held-out
  tasks are left out by name; a name that matches no task is an error (a typo would otherwise
  train on the task meant to be held out).
* Sample (:class:`ICILSampler`): a live episode, K ~ U{1 .. min(k_max, n - 1)} OTHER episodes of
  its task as the prompt (dilated as the policy's ``prompt.dilation``), and the cuts of the
  live episode at which the next chunk is predicted: every ``cut_stride``-th frame from a first
  cut drawn in 0 .. cut_stride - 1, so that over the samples every frame is a cut, as every frame
  can be one at run time. The live episode runs at the policy rate, undilated, as on the robot.
* Features (:class:`FrameFeatureCache`): with the image encoders frozen, each frame's
  features depend only on the encoder weights and the images, so they are computed once and
  kept, one safetensors file per (encoder weights, episode). What it costs: one encoder pass
  over the dataset (demo size, 2 cameras at 64x64: ~3-5 ms a frame on one core of the shared
  development CPU) and N x D float32 per episode on disk (64-d: 256 bytes a frame); every
  training step after that runs the sequence model only.
* Augmentation (:class:`ImageShift`, :func:`shift_views`): MaIL's random shift cannot act on
  cached features, so a few shifted views of every episode (each camera's frames shifted by one
  offset per episode and view) are encoded and cached beside the unshifted one, and a sample
  takes each of its episodes from a view drawn at random. Each view costs one more encoder
  pass over the dataset and as much disk again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import nn

from mail_ros.data.dataset import save_cache_file, shift_frames
from mail_ros.data.hdf5 import DataError, Episode
from mail_ros.policy.icil_policy import ICILPolicy, ICILSample, dilated_indices

__all__ = ["task_groups", "module_digest", "feature_digest", "episode_digest", "ImageShift", "shift_views",
           "FrameFeatureCache", "ICILSampler"]

log = logging.getLogger(__name__)


def task_groups(episodes: Sequence[Episode], held_out: Sequence[str] = ()) -> dict[str, list[int]]:
    """Task (instruction) -> indices of its episodes, without the ``held_out`` tasks.

    Tasks with a single episode cannot be prompted by another demonstration of themselves and
    are left out with a warning. Raises :class:`DataError` for an unknown held-out name or when
    no task is left.
    """
    tasks: dict[str, list[int]] = {}
    for index, episode in enumerate(episodes):
        tasks.setdefault(episode.instruction, []).append(index)
    unknown = sorted(set(held_out) - set(tasks))
    if unknown:
        raise DataError(f"held-out tasks {unknown} are not in the data; its tasks are {sorted(tasks)}")
    groups = {task: ids for task, ids in tasks.items() if task not in held_out}
    single = sorted(task for task, ids in groups.items() if len(ids) < 2)
    if single:
        log.warning("tasks with one demonstration give no prompt and are left out: %s", single)
    groups = {task: ids for task, ids in groups.items() if len(ids) >= 2}
    if not groups:
        raise DataError(f"no task with two or more demonstrations is left (held out: {sorted(held_out)})")
    return groups


def module_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and values): the encoder part of a cache key."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def feature_digest(policy: ICILPolicy) -> str:
    """The encoder part of a cache key: what ``policy.frame_features`` computes, i.e. the weights
    of its feature modules, the vision settings (some, as the keypoint temperature, hold no
    weights) and whether they are keypoints or trunk maps (``prompt.film``)."""
    settings = json.dumps(asdict(policy.config.vision), sort_keys=True)
    if policy.config.prompt.film:  # the trunks' maps, not keypoints
        settings += "\nmaps"
    modules = module_digest(nn.ModuleList(policy.feature_modules()))
    return hashlib.sha256(f"{modules}\n{settings}".encode()).hexdigest()


def episode_digest(episode: Episode) -> str:
    """SHA-256 of what the encoders see of an episode (its images, camera by camera)."""
    digest = hashlib.sha256()
    for camera in sorted(episode.images):
        images = np.ascontiguousarray(episode.images[camera])
        digest.update(f"{camera}:{images.shape}".encode())
        digest.update(images.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageShift:
    """One shifted view of a dataset: every frame of camera c shifted by ``offsets[c]`` (dy, dx), in
    [0, 2 pad] pixels (:func:`~mail_ros.data.dataset.shift_frames`; (pad, pad) is no shift)."""

    pad: int
    offsets: Mapping[str, tuple[int, int]]

    def apply(self, images: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """camera -> (n, H, W, 3) frames, shifted."""
        return {camera: shift_frames(frames, self.pad, self.offsets[camera]) for camera, frames in images.items()}

    def key(self) -> str:
        """What the view adds to a feature cache key."""
        return json.dumps({"pad": self.pad, "offsets": {c: list(o) for c, o in sorted(self.offsets.items())}})


def shift_views(digests: Sequence[str], cameras: Sequence[str], pad: int, count: int, seed: int) -> list[list[ImageShift]]:
    """``count`` shifted views of every episode (given by its :func:`episode_digest`): in view v, each
    camera of an episode is shifted by an offset drawn uniformly from [0, 2 pad]^2 by (``seed``, v,
    the episode's images), so the offsets differ from episode to episode and a run draws the same
    ones again."""
    views: list[list[ImageShift]] = [[] for _ in range(count)]
    for digest in digests:
        images = int(digest[:16], 16)
        for view in range(count):
            rng = np.random.default_rng([seed, view, images])
            views[view].append(ImageShift(pad, {camera: tuple(int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
                                                for camera in sorted(cameras)}))
    return views


class FrameFeatureCache:
    """Per-episode frame features (N, D) float32 of frozen encoders, on disk when ``folder`` is set."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder is None else Path(folder)

    def features(
        self,
        episodes: Sequence[Episode],
        encode: Callable[[Mapping[str, np.ndarray]], np.ndarray],
        encoder_digest: str,
        batch: int = 256,
        shifts: Sequence[ImageShift] | None = None,
        digests: Sequence[str] | None = None,
    ) -> list[np.ndarray]:
        """Features of every episode (of its frames shifted by ``shifts``, one per episode, when
        given); ``encode`` maps camera -> uint8 (n, H, W, 3) to (n, D) and runs only for episodes
        not cached under ``encoder_digest`` (see :func:`feature_digest`) and their shift.
        ``digests``: the episodes' :func:`episode_digest` s, when the caller has them (reading every
        image to hash it again for each view would cost as much as a view's encoder pass's I/O)."""
        for name, values in (("shifts", shifts), ("digests", digests)):
            if values is not None and len(values) != len(episodes):
                raise ValueError(f"{len(values)} {name} for {len(episodes)} episodes")
        out = []
        for index, episode in enumerate(episodes):
            shift = None if shifts is None else shifts[index]
            path = None
            if self.folder is not None:
                view = "" if shift is None else f"\n{shift.key()}"
                images = episode_digest(episode) if digests is None else digests[index]
                key = hashlib.sha256(f"{encoder_digest}\n{images}{view}".encode()).hexdigest()[:32]
                path = self.folder / f"{key}.safetensors"
                if path.is_file():
                    out.append(load_file(path)["features"])
                    continue
            n = len(episode)
            chunks = []
            for s in range(0, n, batch):
                images = {c: episode.images[c][s : s + batch] for c in episode.images}
                chunks.append(np.asarray(encode(images if shift is None else shift.apply(images)), dtype=np.float32))
            features = np.concatenate(chunks)
            if features.ndim != 2 or features.shape[0] != n:
                raise DataError(f"encoder gave features of shape {features.shape} for an episode of {n} frames")
            if path is not None:
                save_cache_file(path, {"features": features})
            out.append(features)
        return out


class ICILSampler:
    """Draws :class:`ICILSample` s from episodes and their cached frame features.

    ``groups`` from :func:`task_groups`; ``k_max`` and ``dilation`` as the policy's
    ``prompt`` config; ``action_horizon`` the policy's A; live episodes shorter than A frames
    give no sample and are not drawn. ``embeddings`` (instruction -> (L,) embedding, e.g. from
    :class:`mail_ros.data.dataset.EmbeddingCache`) for policies with language. ``views``: more
    feature arrays of every episode (of shifted images: :class:`ImageShift`); then each episode of
    a sample, prompt and live, takes its frames from ``features`` or one of the views, drawn
    uniformly (without views the draws, so the samples, are those of a sampler without them).
    """

    def __init__(
        self,
        episodes: Sequence[Episode],
        features: Sequence[np.ndarray],
        groups: Mapping[str, Sequence[int]],
        *,
        k_max: int,
        dilation: int,
        action_horizon: int,
        cut_stride: int = 1,
        embeddings: Mapping[str, np.ndarray] | None = None,
        views: Sequence[Sequence[np.ndarray]] = (),
    ) -> None:
        self.views = [features, *views]
        for view in self.views:
            if len(view) != len(episodes):
                raise DataError(f"{len(view)} feature arrays for {len(episodes)} episodes")
            for episode, array in zip(episodes, view):
                if array.shape[0] != len(episode):
                    raise DataError(f"features of {array.shape[0]} frames for an episode of {len(episode)}")
        if k_max < 1 or dilation < 1 or action_horizon < 1 or cut_stride < 1:
            raise ValueError("k_max, dilation, action_horizon and cut_stride must be >= 1")
        self.episodes, self.embeddings = episodes, embeddings
        self.k_max, self.dilation, self.A, self.cut_stride = k_max, dilation, action_horizon, cut_stride
        self.task_of = {index: task for task, ids in groups.items() for index in ids}
        self.groups = {task: list(ids) for task, ids in groups.items()}
        self.live = sorted(index for index in self.task_of if len(episodes[index]) >= action_horizon)
        if not self.live:
            raise DataError(f"no episode of the kept tasks has the {action_horizon} frames of one chunk")
        if embeddings is not None:
            missing = sorted(set(self.groups) - set(embeddings))
            if missing:
                raise DataError(f"no instruction embedding for tasks {missing}")

    def sample(self, live: int, rng: np.random.Generator, device: torch.device | str = "cpu") -> ICILSample:
        """The sample of live episode ``live`` with a prompt drawn by ``rng`` (reproducible per seed)."""
        others = [index for index in self.groups[self.task_of[live]] if index != live]
        K = int(rng.integers(1, min(self.k_max, len(others)) + 1))
        prompt = []
        for index in rng.choice(others, size=K, replace=False):
            kept = dilated_indices(len(self.episodes[index]), self.dilation)
            prompt.append(self._frames(int(index), kept, device, rng))
        episode = self.episodes[live]
        features, joints, actions = self._frames(live, list(range(len(episode))), device, rng)
        # The first cut is drawn: with fixed cuts 0, s, 2s, ... the chunks at the other frames were
        # never trained (their error measured 18-28 % higher on training episodes at s = 4).
        last = len(episode) - self.A  # the last frame a whole chunk of recorded actions follows
        cuts = list(range(int(rng.integers(min(self.cut_stride, last + 1))), last + 1, self.cut_stride))
        language = None
        if self.embeddings is not None:
            language = torch.from_numpy(np.asarray(self.embeddings[self.task_of[live]], dtype=np.float32)).to(device)
        return ICILSample(prompt, features, joints, actions, cuts, language, task=self.task_of[live])

    def _frames(self, index: int, kept: list[int], device, rng: np.random.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        episode = self.episodes[index]
        view = self.views[int(rng.integers(len(self.views)))] if len(self.views) > 1 else self.views[0]
        return tuple(
            torch.from_numpy(np.ascontiguousarray(array[kept], dtype=np.float32)).to(device)
            for array in (view[index], episode.joint_positions, episode.actions)
        )
