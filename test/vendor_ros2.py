"""The upstream ROS 2 tools of ../shared/vendor/ros2, in a prefix of the tests' own.

../shared/vendor/ros2 (beside the repository, not in it) holds what a ROS 2 machine has and the
package index lacks: wheels of launch, launch_ros, ros2cli (the ``ros2`` command and its verbs)
and rosidl_runtime_py; the sources of composition_interfaces (launch_ros imports it) and
franka_msgs; franka_bringup, franka_gripper and franka_description. This module installs the
wheels and their index dependencies (``vendor_ros2_requirements.txt``) with ``pip --target`` and
builds the two interface packages with colcon against the project venv's ROS 2 wheels, all under
``build/vendor-ros2/<hash of the inputs>``: the project venv is never written to, and a rerun
with the same inputs finds the prefix ready (a few seconds instead of about two minutes).

    tools = vendor_ros2.prefix()      # builds once; pytest.skip(skip_reason()) first
    subprocess.run(["ros2", "pkg", "list"], env=tools.env(), check=True)

A user's plain clone has no ../shared: tests call ``skip_reason()`` and skip with it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT.parent / "shared" / "vendor" / "ros2"
REQUIREMENTS = Path(__file__).with_name("vendor_ros2_requirements.txt")
# The same fix of the ROS wheels' CMake include dirs that mail_ros's own build uses.
WHEEL_INCLUDE_FIX = ROOT / "cmake" / "wheel_include_dirs.cmake"
INTERFACES = ("composition_interfaces", "franka_msgs")
CACHE = ROOT / "build" / "vendor-ros2"


def skip_reason() -> str | None:
    """Why the vendored tools cannot be used here (None when they can)."""
    needed = [VENDOR / "wheels", VENDOR / "franka"] + [VENDOR / "interfaces" / name for name in INTERFACES]
    missing = [path for path in needed if not path.is_dir()]
    if not missing:
        return None
    return (f"{VENDOR} is absent or incomplete (missing {', '.join(str(p) for p in missing)}): the upstream "
            "ROS 2 tools (launch, ros2cli, franka_ros2 sources) come only with the project's shared folder, "
            "not with a plain clone")


def _site_packages(prefix: Path) -> Path:
    """A colcon/CMake install prefix's Python directory, as ament_cmake_python lays it out."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return prefix / "lib" / version / "site-packages"


def _prepend(paths: list[Path | str], existing: str | None) -> str:
    return os.pathsep.join([str(p) for p in paths] + ([existing] if existing else []))


@dataclass(frozen=True)
class VendorRos2:
    """An installed prefix: ``site`` (the pip --target of the tools), ``install`` (colcon's merged
    install of composition_interfaces and franka_msgs) and ``franka`` (the franka_ros2 sources)."""

    root: Path

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def install(self) -> Path:
        return self.root / "install"

    @property
    def franka(self) -> Path:
        return VENDOR / "franka"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default os.environ) with the tools and interfaces found first, over the project
        venv (whose rclpy and messages stay the ones in use): what sourcing a ROS install does."""
        env = dict(os.environ if base is None else base)
        venv = Path(sys.prefix)
        env["PYTHONPATH"] = _prepend([_site_packages(self.install), self.site], env.get("PYTHONPATH"))
        env["PATH"] = _prepend([self.site / "bin", venv / "bin"], env.get("PATH"))
        env["AMENT_PREFIX_PATH"] = _prepend([self.install, venv], env.get("AMENT_PREFIX_PATH"))
        env["CMAKE_PREFIX_PATH"] = _prepend([self.install, venv], env.get("CMAKE_PREFIX_PATH"))
        env["LD_LIBRARY_PATH"] = _prepend([self.install / "lib"], env.get("LD_LIBRARY_PATH"))
        return env

    def colcon_build(self, base_paths: list[Path], workspace: Path, env: dict[str, str] | None = None,
                     cmake_args: list[str] = (), log: Path | None = None, timeout: float = 900) -> Path:
        """``colcon build --merge-install`` of the packages under ``base_paths`` into ``workspace``/
        {build,install,log} with the venv's Python; returns the install folder. Failure raises
        RuntimeError with the end of colcon's output (all of it in ``log``)."""
        workspace.mkdir(parents=True, exist_ok=True)
        log = log or workspace / "colcon.log"
        command = [
            str(self.site / "bin" / "colcon"), "--log-base", str(workspace / "log"), "build",
            "--base-paths", *map(str, base_paths),
            "--build-base", str(workspace / "build"), "--install-base", str(workspace / "install"),
            "--merge-install", "--parallel-workers", "1", "--event-handlers", "console_direct+",
            "--cmake-args", "-G", "Ninja", "-DBUILD_TESTING=OFF", f"-DPython3_EXECUTABLE={sys.executable}",
            *cmake_args,
        ]
        with open(log, "w") as out:
            result = subprocess.run(command, env=self.env() if env is None else env, cwd=workspace,
                                    stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        if result.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"colcon build failed (exit {result.returncode}; log {log}):\n{tail}")
        return workspace / "install"


def _inputs_hash() -> str:
    """Everything the prefix is built from: the vendored files, the pins, the CMake fix, this
    module and the interpreter (the prefix's scripts and built modules are tied to it)."""
    digest = hashlib.sha256()
    files = [REQUIREMENTS, WHEEL_INCLUDE_FIX, Path(__file__)]
    files += sorted((VENDOR / "wheels").glob("*.whl"))
    for name in INTERFACES:
        files += sorted(p for p in (VENDOR / "interfaces" / name).rglob("*") if p.is_file())
    for path in files:
        digest.update(str(path.relative_to(path.anchor)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"{sys.executable}\0{sys.version}\0{sysconfig.get_platform()}".encode())
    return digest.hexdigest()[:16]


def _build(tools: VendorRos2) -> None:
    log = tools.root / "pip.log"
    tools.root.mkdir(parents=True)
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
             "--no-compile", "--target", str(tools.site), *map(str, sorted((VENDOR / "wheels").glob("*.whl"))),
             "-r", str(REQUIREMENTS)],
            stdout=out, stderr=subprocess.STDOUT, timeout=900)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"installing the vendored ROS 2 tools failed (log {log}):\n{tail}")
    tools.colcon_build([VENDOR / "interfaces" / name for name in INTERFACES], tools.root,
                       cmake_args=[f"-DCMAKE_PROJECT_INCLUDE={WHEEL_INCLUDE_FIX}"])


@cache
def prefix() -> VendorRos2:
    """The prefix for the current inputs, built on first use (under a lock, so concurrent test
    sessions of one checkout build it once). Call only when ``skip_reason()`` is None."""
    reason = skip_reason()
    if reason is not None:
        raise RuntimeError(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    tools = VendorRos2(CACHE / _inputs_hash())
    stamp = tools.root / ".complete"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.is_file():
            # A prefix of other inputs, or one left half-built by a killed run, is out of date.
            for stale in CACHE.iterdir():
                if stale.is_dir():
                    shutil.rmtree(stale)
            _build(tools)
            stamp.write_text(_inputs_hash() + "\n")
    return tools


__all__ = ["VENDOR", "VendorRos2", "prefix", "skip_reason"]
