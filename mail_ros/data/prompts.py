"""Prompt demonstrations for an ICIL policy, read from what the recording tools write.

A prompt path is one of:

* ``FILE.hdf5`` (or ``.h5``): every episode of a demo file written by ``mail-ros convert``
  (or robomimic/LIBERO), in file order;
* ``FILE.hdf5:demo_3`` (also ``FILE.hdf5:/data/demo_3`` or ``FILE.hdf5:data/demo_3``): one episode group;
* a rosbag2 folder (``mail-ros record``): its episodes, aligned at the policy's rate exactly as
  ``mail-ros convert`` does (:func:`mail_ros.data.bags.read_bag` with the policy's observation spec
  and action names).

Every file is checked against the policy's observation/action contract with the training
data's rule (:func:`mail_ros.train.trainer.load_demos`: cameras, image size, joint and action
names, action space, rate), so a prompt is accepted exactly when the same file could train
the policy. Anything else raises :class:`~mail_ros.data.hdf5.DataError` naming the path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mail_ros.data.hdf5 import DataError, DemoSet, Episode, episode_instructions
from mail_ros.spec import Observation
from mail_ros.sync.stamps import seconds_to_ns

if TYPE_CHECKING:  # the policy (torch) is imported where demonstrations are made, not by path handling
    from mail_ros.policy.icil_config import ICILConfig
    from mail_ros.policy.icil_policy import Demonstration

__all__ = ["PromptDemonstration", "read_prompt", "episode_demonstration", "split_prompt_path",
           "absolute_prompt_path", "episodes_by_instruction", "HDF5_SUFFIXES"]

HDF5_SUFFIXES = (".hdf5", ".h5")
_GROUP = re.compile(r"^(?P<file>.+?\.(?:hdf5|h5)):/?(?:data/)?(?P<key>demo_\d+)$")


@dataclass(frozen=True)
class PromptDemonstration:
    """One prompt demonstration and where it came from."""

    label: str  # "FILE.hdf5:demo_0", "BAG#2" (episode 2 of a bag)
    instruction: str  # the instruction recorded with it ("" when none)
    demonstration: "Demonstration"


def split_prompt_path(text: str) -> tuple[Path, str | None]:
    """A prompt path -> (file or folder, episode group key or None for all its episodes)."""
    group = _GROUP.match(text.strip())
    if group:
        return Path(group["file"]).expanduser(), group["key"]
    return Path(text.strip()).expanduser(), None


def absolute_prompt_path(text: str) -> str:
    """``text`` with its file or folder made absolute (the group key kept): what to send to a
    node whose working directory is not the caller's."""
    path, key = split_prompt_path(text)
    absolute = os.path.abspath(path)
    return absolute if key is None else f"{absolute}:{key}"


def episodes_by_instruction(path: str | Path) -> dict[str, list[str]]:
    """A demo file's episodes by recorded instruction, each list in file order, as prompt paths
    (``FILE.hdf5:demo_N``, the file made absolute). Reads the groups' attributes only."""
    path = Path(path).expanduser()
    if path.suffix not in HDF5_SUFFIXES:
        raise DataError(f"{path}: not an HDF5 demo file ({'/'.join(HDF5_SUFFIXES)})")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    found: dict[str, list[str]] = {}
    for key, instruction in episode_instructions(path):
        found.setdefault(instruction, []).append(absolute_prompt_path(f"{path}:{key}"))
    return found


def episode_demonstration(episode: Episode) -> "Demonstration":
    """An episode's frames as the policy's observations (stamps in ns) with its actions."""
    from mail_ros.policy.icil_policy import Demonstration

    frames = [
        Observation(
            stamp=seconds_to_ns(float(episode.timestamps[i])),
            images={camera: episode.images[camera][i] for camera in episode.images},
            joint_positions=episode.joint_positions[i].astype("float64"),
        )
        for i in range(len(episode))
    ]
    return Demonstration(frames, episode.actions.astype("float64"))


def _hdf5(path: Path, keys: list[str] | None, config: "ICILConfig") -> list[tuple[str, Episode]]:
    from mail_ros.train.trainer import load_demos

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    episodes = load_demos([path], config, {}, lazy=True)  # images stay on disk until used
    names = [key for key, _ in episode_instructions(path)]  # read_hdf5's episode order
    by_key = dict(zip(names, episodes))
    if keys is None:
        keys = names
    missing = [key for key in keys if key not in by_key]
    if missing:
        raise DataError(f"{path}: no episode group {missing[0]!r}; the file has {names}")
    return [(f"{path}:{key}", by_key[key]) for key in keys]


def _bag(path: Path, config: "ICILConfig") -> list[tuple[str, Episode]]:
    from mail_ros.data.bags import ACTION_SPACE, BagConfig, read_bag
    from mail_ros.train.trainer import _check_compatible

    spec = config.spec
    readout = read_bag(path, BagConfig(observation=spec.observation, action_names=spec.action.names))
    if not readout.episodes:
        detail = f" ({'; '.join(readout.failures)})" if readout.failures else ""
        raise DataError(f"{path}: no usable episode{detail}")
    demos = DemoSet(readout.episodes, spec.observation.cameras, spec.observation.joint_names, spec.action.names,
                    spec.observation.rate_hz, ACTION_SPACE, source=str(path))
    _check_compatible(demos, config)
    return [(f"{path}#{i}", episode) for i, episode in enumerate(readout.episodes)]


def read_prompt(paths: Sequence[str], config: "ICILConfig") -> list[PromptDemonstration]:
    """The demonstrations at ``paths`` (see the module docstring), in order; DataError on any problem."""
    if isinstance(paths, str):
        paths = [paths]
    out: list[PromptDemonstration] = []
    for text in paths:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"prompt path {text!r} is empty")
        text = text.strip()
        path, key = split_prompt_path(text)
        if key is not None:
            found = _hdf5(path, [key], config)
        elif path.suffix in HDF5_SUFFIXES:
            found = _hdf5(path, None, config)
        elif path.is_dir():
            found = _bag(path, config)
        else:
            raise DataError(f"{text}: not an HDF5 demo file ({'/'.join(HDF5_SUFFIXES)}), an episode group "
                            "(FILE.hdf5:demo_N) or a rosbag2 folder")
        for label, episode in found:
            out.append(PromptDemonstration(label, episode.instruction, episode_demonstration(episode)))
    return out
