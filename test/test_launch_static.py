"""Launch files and parameter files, checked without `launch` (not installable here).

- every executable a launch file starts exists (setup.py console scripts and CMake's lib/mail_ros);
- every file a launch file names exists in this package;
- every launch argument has a description;
- every parameter in config/*.yaml, and every parameter a launch file sets, is declared by the node
  it is meant for (checked on the real nodes, instantiated with rclpy).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import rclpy
import yaml

from mail_ros.resources import DEMO_CHECKPOINT, ICIL_DEMO_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))
NODE_CONFIGS = [ROOT / "config" / "pipeline.yaml", ROOT / "config" / "franka_sim.yaml"]


def setup_py_nodes() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NODES":
            return [elt.value for elt in node.value.elts]
    raise AssertionError("setup.py has no NODES list")


def cmake_nodes() -> list[str]:
    match = re.search(r"foreach\(_node ([\w ]+)\)", (ROOT / "CMakeLists.txt").read_text())
    assert match, "CMakeLists.txt installs no node executables"
    return match.group(1).split()


def cmake_share_installs() -> set[str]:
    """Folders CMakeLists.txt installs into share/mail_ros (as written there: launch, checkpoints/demo)."""
    folders = set()
    for match in re.finditer(r"install\(DIRECTORY ([\w/ ]+) DESTINATION share/\$\{PROJECT_NAME\}",
                             (ROOT / "CMakeLists.txt").read_text()):
        folders.update(match.group(1).split())
    return folders


def launch_calls(path: Path, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
            and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]


def test_nodes_are_installed_for_ros2_run_and_pip():
    assert setup_py_nodes() == cmake_nodes()
    for name in setup_py_nodes():
        assert (ROOT / "mail_ros" / "nodes" / f"{name}.py").is_file(), name


@pytest.mark.parametrize("checkpoint", [DEMO_CHECKPOINT, ICIL_DEMO_CHECKPOINT])
def test_the_shipped_checkpoints_are_installed_where_the_package_looks_for_them(checkpoint):
    assert checkpoint in cmake_share_installs()
    assert (ROOT / checkpoint / "config.json").is_file()


@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_files_name_existing_executables_and_files(launch_file):
    text = launch_file.read_text()
    nodes = setup_py_nodes()
    started = []
    for call in launch_calls(launch_file, "Node") + launch_calls(launch_file, "node"):
        keywords = {k.arg: k.value for k in call.keywords}
        if "package" in keywords and keywords["package"].value != "mail_ros":
            continue  # another package's node (rviz2)
        executable = keywords["executable"] if "executable" in keywords else call.args[0]
        if not isinstance(executable, ast.Constant):
            continue  # the launch file's own helper forwarding its argument (checked at its call sites)
        executable = executable.value
        started.append(executable)
        assert executable in nodes, f"{launch_file.name} starts unknown executable {executable!r}"
    # Files of this package named in PathJoinSubstitution([share, "<dir>", "<file>"]) or expressions.
    assert 'FindPackageShare("mail_ros")' in text
    installed = cmake_share_installs()
    for folder, name in re.findall(r'share,\s*"(config|rviz|launch|checkpoints)",\s*"([\w.]+)"', text):
        assert (ROOT / folder / name).exists(), f"{launch_file.name} names missing {folder}/{name}"
        assert folder in installed or f"{folder}/{name}" in installed, \
            f"{launch_file.name} names share/mail_ros/{folder}/{name}, which CMakeLists.txt does not install"
    for name in re.findall(r"'([\w.]+\.(?:yaml|rviz))'", text):
        assert (ROOT / "config" / name).is_file() or (ROOT / "rviz" / name).is_file(), name
    for call in launch_calls(launch_file, "IncludeLaunchDescription"):
        source = ast.unparse(call)
        if "FindPackageShare('mail_ros')" in source or "share," in source:
            for name in re.findall(r"'([\w.]+\.launch\.py)'", source):
                assert (ROOT / "launch" / name).is_file(), name


def launch_arguments(launch_file: Path) -> list[tuple[str, str, str]]:
    """A launch file's ARGUMENTS table, evaluated with the mail_ros names it imports (defaults such
    as the executor's mode come from the core: one home)."""
    import importlib

    tree = ast.parse(launch_file.read_text())
    names = {alias.asname or alias.name: getattr(importlib.import_module(n.module), alias.name)
             for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("mail_ros")
             for alias in n.names}
    arguments = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], "id", "") == "ARGUMENTS")
    return eval(compile(ast.Expression(arguments), str(launch_file), "eval"), names)


@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_arguments_are_documented(launch_file):
    from mail_ros.control.executor import ExecutorConfig

    arguments = launch_arguments(launch_file)
    for entry in arguments:
        name, default, description = entry
        assert description.strip(), f"{launch_file.name}: launch argument {name!r} has no description"
        assert isinstance(default, str), f"{launch_file.name}: launch argument {name!r} default is not a string"
    assert dict((n, d) for n, d, _ in arguments).get("executor_mode", ExecutorConfig.mode) == ExecutorConfig.mode


@pytest.fixture(scope="module")
def declared_parameters():
    """{node name: declared parameter names}, from the real nodes."""
    from mail_ros.nodes.camera_sync_node import CameraSyncNode
    from mail_ros.nodes.executor_node import ExecutorNode
    from mail_ros.nodes.franka_sim_node import FrankaSimNode
    from mail_ros.nodes.language_node import LanguageNode
    from mail_ros.nodes.policy_node import PolicyNode

    context = rclpy.Context()
    rclpy.init(context=context)
    declared = {}
    try:
        for cls in (CameraSyncNode, LanguageNode, PolicyNode, ExecutorNode, FrankaSimNode):
            node = cls(context=context)
            declared[node.get_name()] = set(node._parameters)
            node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
    return declared


@pytest.mark.ros
@pytest.mark.parametrize("config", NODE_CONFIGS, ids=lambda p: p.name)
def test_every_yaml_parameter_is_declared(config, declared_parameters):
    for node_name, section in yaml.safe_load(config.read_text()).items():
        assert node_name in declared_parameters, f"{config.name}: no node named {node_name!r}"
        undeclared = set(section["ros__parameters"]) - declared_parameters[node_name]
        assert not undeclared, f"{config.name}: {node_name} does not declare {sorted(undeclared)}"


def node_parameter_dicts(path: Path) -> list[dict]:
    """The parameter dicts a launch file gives to Node(...) / its node(...) helper."""
    tree = ast.parse(path.read_text())
    named = {n.targets[0].id: n.value for n in ast.walk(tree)
             if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    dicts = []
    for call in launch_calls(path, "Node") + launch_calls(path, "node"):
        keywords = {k.arg: k.value for k in call.keywords}
        package = keywords.get("package")
        if isinstance(package, ast.Constant) and package.value != "mail_ros":
            continue
        candidates = list(call.args[1:])
        if isinstance(keywords.get("parameters"), ast.List):
            candidates += keywords["parameters"].elts
        for candidate in candidates:
            candidate = named.get(candidate.id, candidate) if isinstance(candidate, ast.Name) else candidate
            if isinstance(candidate, ast.Dict):
                dicts.append({k.value: v for k, v in zip(candidate.keys, candidate.values)})
    return dicts


@pytest.mark.ros
@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_parameters_set_in_launch_files_are_declared(launch_file, declared_parameters):
    everything = set().union(*declared_parameters.values())
    for parameters in node_parameter_dicts(launch_file):
        for key in parameters:
            assert key in everything, f"{launch_file.name} sets {key!r}, which no mail_ros node declares"
