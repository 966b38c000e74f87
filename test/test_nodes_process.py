"""NodeProcess (how `mail-ros demo` runs each node): a node does not outlive a killed parent.

The node is started while another thread of the parent loads shared libraries, the situation in
which a dlopen between fork and exec once aborted a demo's node (see node_process._PRCTL); that
race is too rare to reproduce here, so this checks that the death signal still works without it."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from ros_harness import wait_for

ROOT = Path(__file__).resolve().parents[1]

# The parent starts a node while another of its threads keeps loading shared libraries (as the
# simulator's renderer loads its GL driver while the demo starts its nodes), prints the node's
# pid and waits to be killed.
PARENT = """
import ctypes, shutil, sys, threading
from mail_ros.nodes.node_process import NodeProcess
folder = sys.argv[1]
def load():
    for i in range(300):
        copy = f"{folder}/libz{i}.so"
        shutil.copy("/lib/x86_64-linux-gnu/libz.so.1", copy)
        ctypes.CDLL(copy)
threading.Thread(target=load, daemon=True).start()
node = NodeProcess("camera_sync_node", {"cameras": ["agentview"]})
print(node.process.pid, flush=True)
threading.Event().wait()
"""


def _state(pid: int) -> str | None:
    """The process state letter from /proc (R, S, Z, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def test_a_node_ends_when_the_demo_that_started_it_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        child = int(parent.stdout.readline())
        # The node is up: running its own interpreter, not dead at start-up.
        wait_for(lambda: b"camera_sync_node" in Path(f"/proc/{child}/cmdline").read_bytes(), 60, "the node's process")
        assert _state(child) not in (None, "Z")
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=60)
        wait_for(lambda: _state(child) in (None, "Z"), 60, "the node to end with its killed parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
