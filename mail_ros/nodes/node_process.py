"""A mail_ros node in a process of its own, as ``ros2 launch`` starts it.

``mail-ros demo`` runs the pipeline nodes this way: each node has its own interpreter (its own
GIL), so the simulator, the policy's inference and the executor's ticks do not queue behind one
another as threads of one process would. The node is ``python -m mail_ros.nodes.<name>`` with
``--ros-args -p name:=value`` overrides, the same entry point as the installed executables.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from typing import Any

__all__ = ["NodeProcess", "NodeProcessError"]

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


# Looked up here, in the parent: between fork and exec the child may only call it. A dlopen there
# (ctypes.CDLL, even of the program itself) is not safe in the child of a multi-threaded parent:
# if another parent thread was inside dlopen at the fork (the simulator's renderer loading its GL
# driver while the demo starts its nodes), the child inherits the loader mid-update and ld.so
# aborts it ("dl_open_worker_begin: Assertion ... RT_CONSISTENT failed", exit code 127).
_PRCTL = _find_prctl()


class NodeProcessError(RuntimeError):
    """A node process could not start or ended on its own."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this child when the parent dies, so a killed demo leaves no node behind."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def ros_arg(name: str, value: Any) -> str:
    """``name:=value`` for ``--ros-args -p``, with the value written as YAML (JSON is YAML)."""
    return f"{name}:={json.dumps(list(value) if isinstance(value, tuple) else value)}"


class NodeProcess:
    """Starts ``mail_ros.nodes.<module>`` with ``parameters``; stops it with SIGINT (as launch does)."""

    def __init__(self, module: str, parameters: dict[str, Any], *, env: dict[str, str] | None = None) -> None:
        self.module = module
        command = [sys.executable, "-m", f"mail_ros.nodes.{module}", "--ros-args"]
        for name, value in parameters.items():
            command += ["-p", ros_arg(name, value)]
        environment = dict(os.environ)
        environment.update(env or {})
        try:
            self.process = subprocess.Popen(command, env=environment, preexec_fn=_die_with_parent)
        except OSError as exc:
            raise NodeProcessError(f"cannot start {module}: {exc}") from exc

    def check(self) -> None:
        """Raise if the process has ended."""
        code = self.process.poll()
        if code is not None:
            raise NodeProcessError(f"{self.module} exited with code {code} (see its log above)")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGINT, then SIGKILL after ``timeout`` s; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
