"""The front door, as a user on a ROS 2 machine meets it, through the upstream ROS 2 tools.

With the launch/ros2cli wheels, composition_interfaces and franka_msgs of ../shared/vendor/ros2 in
a prefix of the tests' own (vendor_ros2.py), this runs the README's "On a ROS 2 machine" recipe
(every command it runs is checked to appear there verbatim):

a. ``colcon build`` of a scratch workspace holding this package, then ``source install/setup.bash``;
b. ``ros2 launch mail_ros sim_policy.launch.py`` through the real ``ros2`` command;
c. goals published with ``ros2 topic pub`` transient-local before the pipeline is up, volatile
   (the Jazzy+ default) and transient-local (Humble's) once it is, and set through
   ``ros2 service call .../set_goal``: each one is applied once and the simulated arm completes
   the task (franka_sim_node's ~/task_success) within a bound;
d. ``ros2 launch mail_ros franka_policy.launch.py bringup:=true use_fake_hardware:=true``
   against the vendored franka_bringup, with stand-ins (front_door/standin.py) for the C++
   executables: the FR3 URDF renders, ros2_control_node gets mail_ros's controllers file and a
   spawner activates the trajectory controller the executor commands;
e. SIGINT to each launch's process group (Ctrl-C in its terminal): every process exits 0 within
   10 s, with no traceback and no publishing after shutdown.

Skips, naming the folder, in a plain clone without ../shared/vendor/ros2.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from std_srvs.srv import Trigger

import vendor_ros2
from mail_ros.msg import InstructionEmbedding
from mail_ros.nodes.common import GOAL_QOS
from mail_ros.srv import SetGoal
from mail_ros.spec import FR3_ARM_JOINTS
from ros_harness import RosGraph, wait_for

pytestmark = [
    pytest.mark.skipif(vendor_ros2.skip_reason() is not None, reason=str(vendor_ros2.skip_reason())),
    pytest.mark.ros, pytest.mark.slow,
    # The first run builds the tools' prefix (minutes on a busy machine), every run a workspace.
    pytest.mark.timeout(2400),
]

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "front_door"

# The README's commands, run as written (test_the_readme_shows_these_commands).
BUILD = "colcon build --packages-select mail_ros"
SOURCE = "source install/setup.bash"
SIM_LAUNCH = "ros2 launch mail_ros sim_policy.launch.py"
EARLY_GOAL = ("ros2 topic pub --once -w 0 --keep-alive 120 --qos-durability transient_local /mail/instruction "
              "std_msgs/msg/String \"{data: 'pick up the red cube'}\"")
GOAL = ("ros2 topic pub --once -w 1 --keep-alive 3 --qos-durability volatile /mail/instruction "
        "std_msgs/msg/String \"{data: 'pick up the blue cube'}\"")
SET_GOAL = ("ros2 service call /language_node/set_goal mail_ros/srv/SetGoal "
            "\"{instruction: 'pick up the green cube'}\"")
TASK_SUCCESS = "ros2 service call /franka_sim_node/task_success std_srvs/srv/Trigger"
BRINGUP_LAUNCH = ("ros2 launch mail_ros franka_policy.launch.py bringup:=true use_fake_hardware:=true "
                  "checkpoint:=$(ros2 pkg prefix mail_ros)/share/mail_ros/checkpoints/demo")

# Bounds on a busy 2-core machine. A pick takes the demo policy about 6 s of simulated time.
PIPELINE_UP_S = 180.0
TASK_S = 120.0
# Every node exits 0 after Ctrl-C, without launch escalating to SIGTERM (its sigterm_timeout, 15 s
# in mail_ros's launch files). Within 10 s on an idle machine (issue 17); the bound is generous,
# as a busy one stretches every process's exit.
SHUTDOWN_S = 60.0
SERVICE_S = 120.0  # s for a service of the launched graph to answer on a busy machine

# Executables franka_bringup starts that are C++ (or packages the index lacks): stand-ins.
STANDINS = {
    "controller_manager": ["ros2_control_node", "spawner"],
    "robot_state_publisher": ["robot_state_publisher"],
    "joint_state_publisher": ["joint_state_publisher"],
    "franka_gripper": ["franka_gripper_node", "fake_gripper_state_publisher.py"],
}


def readme_ros2_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## On a ROS 2 machine.*?(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no 'On a ROS 2 machine' section"
    return match.group(0)


def test_the_readme_shows_these_commands():
    section = readme_ros2_section()
    for command in (BUILD, SOURCE, SIM_LAUNCH, EARLY_GOAL, GOAL, SET_GOAL, TASK_SUCCESS, BRINGUP_LAUNCH):
        assert command in section, f"README's ROS 2 section does not show: {command}"
    for durability in ("--qos-durability volatile", "--qos-durability transient_local"):
        assert durability in section


# --- the user's machine -------------------------------------------------------------------------
def franka_prefix(prefix: Path, records: Path) -> Path:
    """An install prefix with the vendored franka_ros2 shares and the stand-in executables."""
    index = prefix / "share" / "ament_index" / "resource_index" / "packages"
    index.mkdir(parents=True)
    franka = vendor_ros2.VENDOR / "franka"
    for package in ("franka_bringup", "franka_description", "franka_gripper"):
        (prefix / "share" / package).symlink_to(franka / package, target_is_directory=True)
        (index / package).touch()
    # franka_hardware's ros2_control xacro, which franka_arm.urdf.xacro includes, is not vendored.
    hardware = prefix / "share" / "franka_hardware" / "ros2_control"
    hardware.mkdir(parents=True)
    shutil.copy(HERE / "franka_arm.ros2_control.xacro", hardware)
    (index / "franka_hardware").touch()
    for package, executables in STANDINS.items():
        (index / package).touch()
        (prefix / "share" / package).mkdir(exist_ok=True)
        (prefix / "lib" / package).mkdir(parents=True)
        for executable in executables:
            wrapper = prefix / "lib" / package / executable
            wrapper.write_text(f"#!/bin/sh\nexport FRONT_DOOR_ROLE={package}/{executable} "
                               f"FRONT_DOOR_RECORDS={records}\nexec {sys.executable} {HERE / 'standin.py'} \"$@\"\n")
            wrapper.chmod(0o755)
    return prefix


def shell(command: str, env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """A ROS 2 machine: the tools, the franka_ros2 prefix, and mail_ros built and sourced."""
    started = time.monotonic()
    tools = vendor_ros2.prefix()
    base = tmp_path_factory.mktemp("front_door")
    records = base / "records"
    records.mkdir()
    franka = franka_prefix(base / "franka", records)
    # The user's shell with ROS sourced: the tools, franka_ros2; nothing of this checkout.
    env = tools.env({k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    for variable in ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH"):
        env[variable] = f"{env[variable]}{os.pathsep}{franka}"
    # a. the package in a workspace (as a clone would hold it: tracked and unignored files).
    workspace = base / "ros2_ws"
    source = workspace / "src" / "mail_ros"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = shell(BUILD, env, workspace, timeout=900)
    assert build.returncode == 0, f"{BUILD} failed:\n{build.stdout[-4000:]}\n{build.stderr[-2000:]}"
    sourced = shell(f"{SOURCE} && env -0", env, workspace, timeout=60)
    assert sourced.returncode == 0, sourced.stderr
    env = dict(line.split("=", 1) for line in sourced.stdout.split("\0") if "=" in line)
    # The nodes run from the install, not from this checkout.
    where = shell("python3 -c 'import mail_ros.nodes.language_node as m, mail_ros.srv; print(m.__file__)'",
                  env, workspace, timeout=60)
    assert where.stdout.startswith(str(workspace / "install")), where.stdout + where.stderr
    print(f"front door: tools, colcon build and sourcing took {time.monotonic() - started:.0f} s")
    return {"env": env, "workspace": workspace, "records": records}


# --- launching and interrupting -----------------------------------------------------------------
class Launch:
    """A command (``ros2 launch ...``) in a process group of its own, as in a terminal."""

    def __init__(self, command: str, machine: dict, log: Path):
        self.log_path = log
        self._log = open(log, "w")
        self.process = subprocess.Popen(["bash", "-c", f"exec {command}"], env=machine["env"],
                                        cwd=machine["workspace"], stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def interrupt(self) -> float:
        """Ctrl-C: SIGINT to the process group; returns the seconds until the launch exited, or
        after 60 s, with the stacks of what still runs in the log, until it was killed."""
        start = time.monotonic()
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.dump_stacks()
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self._log.close()
        return time.monotonic() - start

    def dump_stacks(self) -> None:
        """SIGUSR1 to every process launch started that still runs: a mail_ros node (run_node)
        prints its threads' stacks, which launch copies into the log, so a hang shows where it waits."""
        for pid in started_processes(self.output()).values():
            try:
                os.kill(int(pid), signal.SIGUSR1)
            except ProcessLookupError:
                continue
        try:
            wait_for(lambda: "most recent call first" in self.output(), 15, "the stacks in the launch log")
        except AssertionError:
            pass  # a launch that no longer forwards its children's output: the log has what there is

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()


def started_processes(output: str) -> dict[str, str]:
    """launch's "process started with pid [N]" lines: process name -> pid."""
    return dict(re.findall(r"\[INFO\] \[([\w.\-]+)\]: process started with pid \[(\d+)\]", output))


def assert_clean_shutdown(launch: Launch, seconds: float, records: Path | None = None) -> None:
    output = launch.output()
    # First, with a long tail: a launch that hung ends its log with the stacks of what still ran.
    assert seconds < SHUTDOWN_S, f"the launch took {seconds:.1f} s to exit after SIGINT:\n{output[-20000:]}"
    started = started_processes(output)
    assert started, output[-3000:]
    # On a busy machine asyncio's child watcher in launch sometimes finds a child already reaped
    # ("Unknown child process pid N, will report returncode 255") and launch reports it as died
    # with 255. A stand-in records how it really exited; a mail_ros node is never excused.
    lost = set(re.findall(r"Unknown child process pid (\d+), will report returncode 255", output))
    excused = {pid for pid in lost if records is not None and (records / f"exit--{pid}").is_file()}
    # launch's own "process has died [...]" names exit codes other than 0.
    died = re.findall(r"\]: process has died \[pid (\d+)", output)
    assert set(died) <= excused, output[-6000:]
    for name, pid in started.items():
        assert pid in excused or re.search(rf"\[INFO\] \[{re.escape(name)}\]: process has finished cleanly",
                                           output), f"{name} did not exit 0:\n{output[-6000:]}"
    for sign in ("Traceback", "KeyboardInterrupt", "RCLError", "never retrieved", "escalating to 'SIGTERM'",
                 "cannot use Destroyable"):
        assert sign not in output, f"{sign!r} in the output of the launch:\n{output[-6000:]}"
    assert launch.process.returncode == 0, launch.process.returncode


# The name rmw gives an endpoint whose participant's node names have not been discovered yet.
UNKNOWN_NODE = "_NODE_NAME_UNKNOWN_"


def instruction_readers(node) -> list[str]:
    """The names of the nodes subscribed to /mail/instruction, one entry per subscription."""
    return [info.node_name for info in node.get_subscriptions_info_by_topic("/mail/instruction")]


class Operator:
    """The test's own view of the running graph: task_success, reset, and every published goal."""

    def __init__(self, graph: RosGraph):
        self.node = graph.node("front_door_operator")
        self.graph = graph
        self.goals: list[str] = []
        self.node.create_subscription(InstructionEmbedding, "/mail/instruction_embedding",
                                      lambda msg: self.goals.append(msg.text), GOAL_QOS)
        self.success = self.node.create_client(Trigger, "/franka_sim_node/task_success")
        self.set_goal = self.node.create_client(SetGoal, "/language_node/set_goal")
        self.reset_client = self.node.create_client(Trigger, "/franka_sim_node/reset")
        self.parameters = self.node.create_client(SetParameters, "/executor_node/set_parameters")

    def new_episode(self) -> None:
        """As mail-ros demo does between episodes: nothing commands the arm across the reset (the
        executor would take the jump of the arm for a tracking fault)."""
        self.enable(False)
        assert self.call(self.reset_client).success

    def enable(self, enabled: bool) -> None:
        request = SetParameters.Request(parameters=[Parameter("enabled", value=enabled).to_parameter_msg()])
        future = self.parameters.call_async(request)
        wait_for(future.done, SERVICE_S, "executor_node's set_parameters", graph=self.graph)
        assert future.result().results[0].successful, future.result().results[0].reason

    def call(self, client, timeout: float = SERVICE_S) -> Trigger.Response:
        future = client.call_async(Trigger.Request())
        wait_for(future.done, timeout, f"an answer from {client.srv_name}", graph=self.graph)
        return future.result()

    def wait_for_success(self, what: str, launch: Launch) -> tuple[bool, float, str]:
        """(succeeded within TASK_S, seconds, the last answer of ~/task_success)."""
        start = time.monotonic()
        answer = None
        while time.monotonic() - start < TASK_S:
            assert launch.process.poll() is None, f"the launch exited:\n{launch.output()[-4000:]}"
            answer = self.call(self.success)
            if answer.success:
                break
            time.sleep(1.0)  # polling a service of another process, not synchronising with it
        return bool(answer and answer.success), time.monotonic() - start, answer.message if answer else ""


def test_sim_policy_goals_from_the_cli_and_clean_shutdown(machine, tmp_path):
    env, workspace = machine["env"], machine["workspace"]
    graph = RosGraph()
    operator = Operator(graph)
    published: list[str] = []  # every goal the test sent, in order: each must be applied once

    def complete(what: str, publish) -> None:
        """The goal ``publish()`` sends (it returns the text) completes the task; a second try (reset,
        publish again) is allowed because the policy itself is not what this test judges: on a
        loaded machine it sometimes misses a grasp (the demo measures its success rate)."""
        for attempt in (1, 2):
            if attempt > 1:
                operator.new_episode()
            published.append(publish(attempt))
            try:
                wait_for(lambda: operator.goals[-1:] == published[-1:], SERVICE_S, f"the goal of {what}", graph=graph)
            except AssertionError as exc:
                raise AssertionError(f"{exc} (goals applied: {operator.goals})\n{launch.output()[-4000:]}") from None
            operator.enable(True)
            succeeded, seconds, answer = operator.wait_for_success(what, launch)
            print(f"front door: {what} (try {attempt}): {answer!r} after {seconds:.1f} s")
            if succeeded:
                return
        raise AssertionError(f"{what}: no task success in two tries of {TASK_S:g} s (last: {answer!r})\n"
                             f"{launch.output()[-4000:]}")

    def cli_goal(durability: str, colour: str):
        def publish(attempt: int) -> str:
            command = GOAL.replace("volatile", durability).replace("blue", colour)
            result = shell(command, env, workspace, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
            return f"pick up the {colour} cube"
        return publish

    # c. A goal published transient-local before anything of the pipeline runs.
    early = Launch(EARLY_GOAL, machine, tmp_path / "early_goal.log")
    launch = Launch(SIM_LAUNCH, machine, tmp_path / "sim_policy.log")
    try:
        # language_node offers ~/set_goal once its text encoder is loaded: on a loaded machine that is
        # a minute after the simulator is up (seen at load ~10), and the early goal is applied then.
        wait_for(lambda: operator.success.service_is_ready() and operator.set_goal.service_is_ready(), PIPELINE_UP_S,
                 "franka_sim_node and language_node", graph=graph)
        # `-w 1` waits for language_node (the README) only while nothing else reads /mail/instruction.
        # A subscription is discovered before its node's name: wait until every reader is named.
        wait_for(lambda: len(readers := instruction_readers(operator.node)) >= 2 and UNKNOWN_NODE not in readers,
                 SERVICE_S, "language_node's two /mail/instruction subscriptions, named", graph=graph)
        assert set(instruction_readers(operator.node)) == {"language_node"}, instruction_readers(operator.node)
        complete("transient-local goal published before the pipeline started",
                 lambda attempt: "pick up the red cube" if attempt == 1 else cli_goal("transient_local", "red")(attempt))
        for durability, colour in (("volatile", "blue"), ("transient_local", "red")):
            operator.new_episode()
            complete(f"goal published {durability}", cli_goal(durability, colour))

        def set_goal(attempt: int) -> str:
            answer = shell(SET_GOAL, env, workspace, timeout=120)
            assert answer.returncode == 0 and "accepted=True" in answer.stdout, answer.stdout + answer.stderr
            return "pick up the green cube"

        operator.new_episode()
        complete("goal set through ~/set_goal", set_goal)
        checked = shell(TASK_SUCCESS, env, workspace, timeout=120)
        assert "success=True" in checked.stdout, checked.stdout + checked.stderr
        refused = shell(SET_GOAL.replace("pick up the green cube", "  "), env, workspace, timeout=120)
        assert "accepted=False" in refused.stdout and "instruction is empty" in refused.stdout, refused.stdout
        # Each goal applied exactly once (a transient-local one reaches language_node twice).
        wait_for(lambda: len(operator.goals) >= len(published), SERVICE_S, "every goal's embedding", graph=graph)
        assert operator.goals == published, (operator.goals, published)
    except BaseException:
        launch.kill()
        raise
    finally:
        early.kill()
        graph.shutdown()
    # e. Ctrl-C.
    assert_clean_shutdown(launch, launch.interrupt())


def records(machine: dict, role: str) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in sorted(machine["records"].glob(f"{role.replace('/', '--')}--*.json"))]


def test_franka_bringup_with_fake_hardware(machine, tmp_path):
    launch = Launch(BRINGUP_LAUNCH, machine, tmp_path / "franka_policy.log")
    try:
        wait_for(lambda: len(records(machine, "controller_manager/spawner")) >= 2
                 and all(records(machine, role) for role in (
                     "controller_manager/ros2_control_node", "robot_state_publisher/robot_state_publisher",
                     "joint_state_publisher/joint_state_publisher",
                     "franka_gripper/fake_gripper_state_publisher.py")),
                 PIPELINE_UP_S, "franka_bringup's nodes (stand-ins)")
        wait_for(lambda: re.search(r"\[policy_node\]: loaded ", launch.output())
                 and "[language_node]: text encoder" in launch.output(), PIPELINE_UP_S, "the mail_ros nodes")
    except BaseException:
        launch.kill()
        print(launch.output()[-6000:])
        raise
    seconds = launch.interrupt()
    # The FR3 URDF rendered, for the robot the executor commands.
    (state_publisher,) = records(machine, "robot_state_publisher/robot_state_publisher")
    description = next(p["/**"]["ros__parameters"]["robot_description"] if "/**" in p else
                       next(iter(p.values()))["ros__parameters"]["robot_description"]
                       for p in state_publisher["parameter_files"].values())
    urdf = ET.fromstring(description)
    joints = {j.get("name") for j in urdf.iter("joint")}
    assert set(FR3_ARM_JOINTS) <= joints, sorted(joints)
    plugin = urdf.find("ros2_control/hardware/plugin")
    assert plugin is not None and plugin.text == "mock_components/GenericSystem"
    # ros2_control_node got mail_ros's controllers file for fake hardware.
    (control,) = records(machine, "controller_manager/ros2_control_node")
    controllers = [path for path in control["parameter_files"] if path.endswith("fr3_controllers_fake.yaml")]
    assert controllers and controllers[0].startswith(str(machine["workspace"] / "install")), \
        control["parameter_files"].keys()
    declared = control["parameter_files"][controllers[0]]
    assert declared["controller_manager"]["ros__parameters"]["fr3_arm_controller"]["type"] == \
        "joint_trajectory_controller/JointTrajectoryController"
    assert declared["fr3_arm_controller"]["ros__parameters"]["joints"] == list(FR3_ARM_JOINTS)
    # A spawner activates it (not --inactive, not --load-only), and the executor commands it.
    spawned = [r["argv"] for r in records(machine, "controller_manager/spawner")]
    arm = [argv for argv in spawned if argv and argv[0] == "fr3_arm_controller"]
    assert arm and not {"--inactive", "--load-only"} & set(arm[0]), spawned
    (installed,) = (machine["workspace"] / "install").glob("**/share/mail_ros/config/pipeline.yaml")
    pipeline = yaml.safe_load(installed.read_text())
    assert pipeline["executor_node"]["ros__parameters"]["command_topic"] == "/fr3_arm_controller/joint_trajectory"
    assert_clean_shutdown(launch, seconds, machine["records"])
