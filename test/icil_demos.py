"""Small demonstration files for ICIL tests: FR3 names, two 64x64 cameras, 10 Hz, a few tasks.

Each task's actions are near one constant joint target of its own (inside the FR3 limits), so
only a prompt tells the tasks apart; images and joints are noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mail_ros.data.hdf5 import DemoSet, Episode, write_hdf5
from mail_ros.spec import FR3_ARM_JOINTS, FR3_FINGER_JOINTS, FR3_HOME, GRIPPER_ACTION_NAME

CAMERAS = ("agentview", "wrist")
JOINTS = FR3_ARM_JOINTS + FR3_FINGER_JOINTS
ACTIONS = FR3_ARM_JOINTS + (GRIPPER_ACTION_NAME,)


def task_target(task_index: int) -> np.ndarray:
    """The joint target (8,) task ``task_index`` demonstrates: home with joint 1 turned, a gripper width."""
    target = np.array(FR3_HOME + (0.04,))
    target[0] += 0.3 * (task_index - 1)
    target[-1] = 0.02 * (task_index % 3)
    return target


def episode(task: str, task_index: int, n: int, rng: np.random.Generator, size=(64, 64)) -> Episode:
    return Episode(
        images={c: rng.integers(0, 256, (n, *size, 3), dtype=np.uint8) for c in CAMERAS},
        joint_positions=np.array(FR3_HOME + (0.04, 0.04)) + 0.01 * rng.normal(size=(n, len(JOINTS))),
        actions=task_target(task_index) + 0.001 * rng.normal(size=(n, len(ACTIONS))),
        instruction=task,
        timestamps=0.1 * np.arange(n),
    )


def write_demos(path: str | Path, tasks: dict[str, int], per_task: int, n: int = 10, seed: int = 0,
                size=(64, 64), rate_hz: float = 10.0, joint_names=JOINTS) -> Path:
    """An HDF5 demo file like `mail-ros convert` writes: ``per_task`` episodes of each task (name -> index)."""
    rng = np.random.default_rng(seed)
    episodes = [episode(task, index, n, rng, size) for task, index in tasks.items() for _ in range(per_task)]
    write_hdf5(path, DemoSet(episodes, CAMERAS, tuple(joint_names), ACTIONS, rate_hz, "joint_position"))
    return Path(path)
