"""Stand-in for the C++ executables of a franka_ros2 bring-up, in the front-door test.

ros2_control_node, spawner, robot_state_publisher, joint_state_publisher and franka_gripper's
nodes are not on this machine (C++, or packages the index lacks). test_front_door.py installs this
script under each of their names (lib/<package>/<executable> of a test prefix); each copy records
what it was started with (its arguments and the contents of the parameter files launch_ros wrote
for it, which launch deletes at exit) as one JSON file in $FRONT_DOOR_RECORDS, then behaves as
the real executable does at the level the test looks at: a spawner exits 0 once it has done its
job, the others run until SIGINT/SIGTERM and then exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import yaml


def parameter_files(argv: list[str]) -> dict[str, object]:
    """{path: parsed YAML} of every --params-file argument."""
    files = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "--params-file":
            # launch_ros writes sequences as !!python/tuple, which FullLoader (not SafeLoader) reads.
            files[value] = yaml.load(Path(value).read_text(), Loader=yaml.FullLoader)
    return files


def main() -> int:
    # First of all, as a node's signal handling is in place before it announces anything.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    role = os.environ["FRONT_DOOR_ROLE"]  # "<package>/<executable>", set by the wrapper
    records = Path(os.environ["FRONT_DOOR_RECORDS"])
    argv = sys.argv[1:]
    record = {"role": role, "argv": argv, "parameter_files": parameter_files(argv), "pid": os.getpid()}
    name = f"{role.replace('/', '--')}--{os.getpid()}.json"
    (records / f".{name}").write_text(json.dumps(record))
    (records / f".{name}").rename(records / name)  # whole files only
    if role == "controller_manager/spawner":
        return 0  # the real spawner loads, configures and activates, then exits
    stop.wait()
    # launch's SIGINT follows the terminal's: ignored from here on, as run_node does (Python puts
    # back the default action while it exits, and a signal then would end the process with -2).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    # How it exited, in its own words: launch may lose the exit code (see assert_clean_shutdown).
    (records / f"exit--{os.getpid()}").write_text("0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
