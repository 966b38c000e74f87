"""Ctrl-C in the terminal of ``ros2 launch``: the node gets SIGINT from the terminal (to the whole
process group) and another from launch right after. run_node must end the spin, stop the node's
worker threads before the context goes (franka_sim_node publishes from its simulation thread)
and exit 0, without a traceback, whichever signal arrives during the clean-up.

test_front_door.py checks the same through ``ros2 launch`` for every node; this runs everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.ros


# (node, a line it logs once it spins)
NODES = [("franka_sim_node", "simulated FR3"), ("language_node", "text encoder")]


@contextlib.contextmanager
def _running(tmp_path, name: str, ready: str) -> Iterator[subprocess.Popen]:
    """The node in a process group of its own, its output in tmp_path/node.log, once it spins;
    killed on the way out if it still runs."""
    log = open(tmp_path / "node.log", "w+")
    node = subprocess.Popen([sys.executable, "-m", f"mail_ros.nodes.{name}"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_output(node, tmp_path, ready)
        yield node
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        log.close()


def _wait_for_output(node: subprocess.Popen, tmp_path, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in (tmp_path / "node.log").read_text():
        assert node.poll() is None and time.monotonic() < deadline, (tmp_path / "node.log").read_text()
        time.sleep(0.2)


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM,)],
                         ids=["sigint-twice", "sigterm"])
@pytest.mark.parametrize("name, ready", NODES, ids=[n for n, _ in NODES])
def test_a_node_exits_0_without_traceback(tmp_path, name, ready, signals):
    with _running(tmp_path, name, ready) as node:
        start = time.monotonic()
        for signum in signals:
            os.killpg(node.pid, signum)
            time.sleep(0.05)  # launch sends its SIGINT a moment after the terminal's
        returncode = node.wait(timeout=30)
        seconds = time.monotonic() - start
    output = (tmp_path / "node.log").read_text()
    assert returncode == 0, output
    for sign in ("Traceback", "KeyboardInterrupt", "RCLError", "never retrieved"):
        assert sign not in output, output
    assert seconds < 10.0


def test_sigusr1_prints_every_threads_stack_and_the_node_runs_on(tmp_path):
    """What a hang is diagnosed with (test_front_door.py sends it before SIGKILL)."""
    with _running(tmp_path, "language_node", "text encoder") as node:
        os.kill(node.pid, signal.SIGUSR1)
        _wait_for_output(node, tmp_path, "most recent call first", timeout=30)
        os.killpg(node.pid, signal.SIGINT)
        returncode = node.wait(timeout=30)
    output = (tmp_path / "node.log").read_text()
    assert returncode == 0, output
    # Every thread: the main one spinning in run_node, and the executor's.
    assert "run_node" in output and output.count("most recent call first") >= 2, output


@pytest.mark.slow
def test_the_demo_ends_cleanly():
    """``make demo`` (mail-ros demo) closes its in-process graph without a word on stderr about
    callbacks cut short ("exception was never retrieved", "coroutine ... was never awaited")."""
    result = subprocess.run([sys.executable, "-m", "mail_ros.cli", "demo", "--episodes", "1",
                             "--instructions", "pick up the red cube"], capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "overall success" in output
    for sign in ("Traceback", "never retrieved", "never awaited", "RCLError"):
        assert sign not in output, output[-4000:]
