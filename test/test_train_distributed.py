"""torchrun + DistributedDataParallel on CPU (gloo, 2 processes): the same run as one process, one
run folder, Ctrl-C leaves a checkpoint that --resume continues; bf16 autocast trains."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mail_ros.policy.checkpoint import load_checkpoint
from mail_ros.train.trainer import EpochBatchSampler, Trainer, build_datasets
from test_train_trainer import EPISODES, TINY_YAML, make_run, write_demos

# Tiny preset on 32x32 frames; a global batch of 8 (4 per process), a log row every step.
COMMON = ["--config", TINY_YAML, "--no-progress", "--set", "policy.spec.observation.image_size=[32, 32]",
          "--set", "train.batch_size=8", "--set", "train.log_every=1", "--set", "train.num_workers=0"]
TIMEOUT = 600  # seconds; two torch imports on a busy 2-core machine take a while


def env() -> dict[str, str]:
    # Same threads for one and two processes (torchrun sets OMP_NUM_THREADS=1 itself). A rank that
    # dies on a signal (once in about 50 runs a rank aborted in C++, SIGABRT, at start-up) dumps every
    # thread's Python stack to stderr, which the failure message shows.
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1"}


def one_process(*args: str) -> list[str]:
    return [sys.executable, "-m", "mail_ros.cli", "train", *COMMON, *args]


def two_processes(*args: str, common: list[str] = COMMON) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "mail_ros.cli", "train", *common, *args]


def rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "log.csv")))


def check(cmd: list[str]) -> None:
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-12000:]


def test_sampler_shards_each_global_batch_across_ranks():
    for epoch in range(3):
        whole = list(EpochBatchSampler(50, 8, seed=4, epoch=epoch, skip=1))
        shards = [list(EpochBatchSampler(50, 8, seed=4, epoch=epoch, skip=1, rank=r, world_size=2)) for r in (0, 1)]
        assert [a + b for a, b in zip(*shards)] == whole
        assert all(len(batch) == 4 for shard in shards for batch in shard)


def test_two_processes_train_the_same_run_as_one(tmp_path):
    """Same global batches, so the loss curves agree up to float summation order.

    The only difference is where sums happen: each rank averages the loss of 4 samples and DDP
    averages the two ranks' gradients, where one process averages 8. That changes the last bits
    (~1e-7 relative); Adam scales each step by the gradient's own running size, so the weights
    and losses stay within ~1e-6 of each other over these steps. rtol 1e-4 leaves two orders of
    magnitude for BLAS differences, and is still far below the step-to-step loss changes (~10 %).
    """
    data = str(write_demos(tmp_path / "demos.hdf5", EPISODES))
    steps = ["--steps", "12", "--set", "train.val_every=4", "--set", "train.checkpoint_every=4"]
    check(one_process(data, "--out", str(tmp_path / "one"), *steps))
    check(two_processes(data, "--out", str(tmp_path / "two"), *steps))
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in two] == [str(s) for s in range(1, 13)]  # rank 0 alone logs: no duplicate rows
    for a, b in zip(one, two):
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-4)
        assert (a["val_loss"] == "") == (b["val_loss"] == "")
        if a["val_loss"]:  # validation over all windows, sharded over the ranks
            assert float(b["val_loss"]) == pytest.approx(float(a["val_loss"]), rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["best", "last", "log.csv", "summary.json", "tensorboard"]
    assert len(list((tmp_path / "two" / "tensorboard").iterdir())) == 1  # one event file: rank 0's
    for name in ("best", "last"):
        a, b = load_checkpoint(tmp_path / "one" / name), load_checkpoint(tmp_path / "two" / name)
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6, msg=key)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["step"] == 12


def test_ctrl_c_under_torchrun_leaves_a_checkpoint_that_resume_continues(tmp_path):
    data = str(write_demos(tmp_path / "demos.hdf5", EPISODES))
    run = tmp_path / "run"
    # Ctrl-C in a terminal signals torchrun's process group; torchrun then signals each rank's own
    # group, DataLoader workers included (one per rank here).
    proc = subprocess.Popen(two_processes(data, "--out", str(run), "--steps", "100000", "--set", "train.val_every=1000",
                                          "--set", "train.checkpoint_every=1000", "--set", "train.num_workers=1"),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((run / "log.csv").exists() and len(rows(run)) >= 2):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no training step logged"
            time.sleep(0.5)  # polling a file another process writes; not synchronising our own logic
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    saved = json.loads((run / "last" / "trainer.json").read_text())["step"]
    assert saved >= 2 and load_checkpoint(run / "last").config is not None
    check(two_processes("--resume", str(run), "--steps", str(saved + 3), "--no-progress", common=[]))
    assert json.loads((run / "last" / "trainer.json").read_text())["step"] == saved + 3
    steps = [int(r["step"]) for r in rows(run)]
    assert steps[-3:] == [saved + 1, saved + 2, saved + 3]


def test_bf16_autocast_trains(tmp_path):
    run = make_run("tiny-d_ma-bc", 4, precision="bf16", log_every=2, val_every=2)
    summary = Trainer(run, build_datasets(EPISODES, run), tmp_path, progress=False).fit()
    assert np.isfinite(summary.last_train_loss) and np.isfinite(summary.best_val_loss)
    weights = load_checkpoint(tmp_path / "last").state_dict().values()
    assert all(w.dtype == torch.float32 for w in weights if w.is_floating_point())  # autocast keeps fp32 weights
