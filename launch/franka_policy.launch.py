"""The MaIL pipeline on a Franka FR3 (franka_ros2).

    ros2 launch mail_ros franka_policy.launch.py robot_ip:=172.16.0.2 checkpoint:=/path/to/ckpt
    ros2 service call /language_node/set_goal mail_ros/srv/SetGoal "{instruction: 'pick up the red cube'}"

Starts camera_sync_node, language_node, policy_node and executor_node with config/pipeline.yaml;
with bringup:=true it also includes franka_bringup's franka.launch.py with a controllers file that
declares the joint trajectory controller the executor commands (position interface under
use_fake_hardware, effort with PD gains on the real robot), and spawns that controller
(franka.launch.py spawns only the state broadcasters).

franka_ros2 versions: the arm type (fr3, whose joints the executor commands) goes to
franka.launch.py both as robot_type (its name from v3.2) and as arm_id (v0.1.15 to v3.1.1); an
include ignores the one the file does not declare.
controllers_yaml exists from v2.0.0, so bringup:=true needs franka_ros2 >= v2.0.0.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, PythonExpression
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from mail_ros.control.executor import ExecutorConfig
from mail_ros.control.scheduler import SCHEDULER_MODES
from mail_ros.transport import apply_dds_profile

ARGUMENTS = [
    ("sigterm_timeout", "15", "Seconds every process started here has to exit after Ctrl-C (SIGINT) before launch "
     "sends SIGTERM (launch's own default is 5; policy_node may be releasing a GPU, and a busy CPU slows every exit)"),
    ("dds_profile", "", "Fast DDS XML profile for every process started here (empty = mail_ros/config/"
     "fastdds_shm.xml, a shared-memory segment for camera images; 'none' = leave the environment as it is)"),
    ("robot_ip", "", "IP address of the FR3 (passed to franka_bringup)"),
    ("use_fake_hardware", "false", "Use franka_ros2's mock hardware (position-interface trajectory controller)"),
    ("load_gripper", "true", "Load the Franka Hand (passed to franka_bringup)"),
    ("bringup", "false", "Also include franka_bringup/franka.launch.py with mail_ros's controllers"),
    ("checkpoint", "", "MaIL checkpoint directory (config.json + model.safetensors)"),
    ("cameras", "", "Comma-separated camera names overriding the checkpoint's (empty = the checkpoint's)"),
    ("device", "auto", "Torch device of the policy: auto, cpu, cuda, cuda:N"),
    ("encoder", "minilm", "Text encoder of language_node; must match the checkpoint's language_encoder"),
    ("namespace", "", "Namespace of the mail_ros nodes (robot topics stay absolute)"),
    ("executor_mode", ExecutorConfig.mode, " | ".join(SCHEDULER_MODES) + " (how chunks become commands; the "
     "default is executor_node's)"),
    ("execute_steps", str(ExecutorConfig.execute_steps), "receding_horizon: actions of each chunk executed before "
     "the next (0 = the whole chunk; the default is executor_node's; 8 for an ICIL checkpoint, as mail-ros demo)"),
    ("executor_enabled", "true", "Let the executor command the robot"),
    ("use_sim_time", "false", "Use /clock (bag replay, simulation)"),
    ("params_file", "", "Parameter file of the pipeline nodes (empty = mail_ros/config/pipeline.yaml)"),
]


def generate_launch_description():
    share = FindPackageShare("mail_ros")
    default_params = PathJoinSubstitution([share, "config", "pipeline.yaml"])
    params_file = PythonExpression(["'", LaunchConfiguration("params_file"), "' or '", default_params, "'"])
    common = {"use_sim_time": LaunchConfiguration("use_sim_time")}
    checkpoint = {"checkpoint": LaunchConfiguration("checkpoint")}
    # Always a non-empty string list (an empty one would not be typed as strings); blanks are ignored.
    cameras = PythonExpression(["[c for c in '", LaunchConfiguration("cameras"), "'.split(',') if c] or ['']"])
    controllers = PathJoinSubstitution([share, "config", PythonExpression([
        "'fr3_controllers_fake.yaml' if '", LaunchConfiguration("use_fake_hardware"),
        "'.lower() == 'true' else 'fr3_controllers.yaml'"])])

    def node(executable, *overrides):
        return Node(package="mail_ros", executable=executable, name=executable,
                    namespace=LaunchConfiguration("namespace"), output="screen",
                    parameters=[params_file, common, *overrides])

    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, default, description in ARGUMENTS]
        + [
            OpaqueFunction(function=apply_dds_profile),  # first: every process below inherits it
            IncludeLaunchDescription(
                PythonLaunchDescriptionSource(
                    PathJoinSubstitution([FindPackageShare("franka_bringup"), "launch", "franka.launch.py"])),
                launch_arguments={
                    "robot_type": "fr3",  # franka_ros2 >= v3.2
                    "arm_id": "fr3",  # franka_ros2 v0.1.15 - v3.1.1
                    "robot_ip": LaunchConfiguration("robot_ip"),
                    "use_fake_hardware": LaunchConfiguration("use_fake_hardware"),
                    "load_gripper": LaunchConfiguration("load_gripper"),
                    "controllers_yaml": controllers,
                }.items(),
                condition=IfCondition(LaunchConfiguration("bringup")),
            ),
            # Loads and activates the trajectory controller declared in the controllers file; it
            # waits for franka.launch.py's controller manager.
            Node(package="controller_manager", executable="spawner", output="screen", arguments=["fr3_arm_controller", "--controller-manager-timeout", "60"],
                 condition=IfCondition(LaunchConfiguration("bringup"))),
            node("camera_sync_node", checkpoint, {"cameras": cameras}),
            node("language_node", {"encoder": LaunchConfiguration("encoder")}),
            node("policy_node", checkpoint, {"device": LaunchConfiguration("device")}),
            node("executor_node", {"mode": LaunchConfiguration("executor_mode"),
                                   "execute_steps": LaunchConfiguration("execute_steps"),
                                   "enabled": LaunchConfiguration("executor_enabled")}),
        ]
    )
