"""The pipeline closed-loop on the simulated FR3 (franka_sim_node stands in for franka_ros2).

    ros2 launch mail_ros sim_policy.launch.py
    ros2 service call /language_node/set_goal mail_ros/srv/SetGoal "{instruction: 'pick up the red cube'}"
    ros2 service call /franka_sim_node/task_success std_srvs/srv/Trigger

Without checkpoint:=DIR it runs the demo checkpoint shipped with the package
(share/mail_ros/checkpoints/demo; see mail_ros.resources).
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
from mail_ros.resources import demo_checkpoint
from mail_ros.transport import apply_dds_profile

ARGUMENTS = [
    ("sigterm_timeout", "15", "Seconds every process started here has to exit after Ctrl-C (SIGINT) before launch "
     "sends SIGTERM (launch's own default is 5; policy_node may be releasing a GPU, and a busy CPU slows every exit)"),
    ("dds_profile", "", "Fast DDS XML profile for every process started here (empty = mail_ros/config/"
     "fastdds_shm.xml, a shared-memory segment for camera images; 'none' = leave the environment as it is)"),
    ("checkpoint", "", "MaIL checkpoint directory (empty = the installed demo checkpoint)"),
    ("device", "auto", "Torch device of the policy"),
    ("encoder", "minilm", "Text encoder of language_node"),
    ("executor_mode", ExecutorConfig.mode, " | ".join(SCHEDULER_MODES) + " (how chunks become commands; the "
     "default is executor_node's)"),
    ("execute_steps", str(ExecutorConfig.execute_steps), "receding_horizon: actions of each chunk executed before "
     "the next (0 = the whole chunk; the default is executor_node's; 8 for an ICIL checkpoint, as mail-ros demo)"),
    ("seed", "0", "Seed of the simulator's cube layout"),
    ("rviz", "false", "Start RViz with rviz/mail.rviz"),
]


def generate_launch_description():
    share = FindPackageShare("mail_ros")
    checkpoint = PythonExpression(["'", LaunchConfiguration("checkpoint"), "' or '", str(demo_checkpoint()), "'"])
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, default, description in ARGUMENTS]
        + [
            OpaqueFunction(function=apply_dds_profile),  # first: every process below inherits it
            Node(package="mail_ros", executable="franka_sim_node", name="franka_sim_node", output="screen",
                 parameters=[PathJoinSubstitution([share, "config", "franka_sim.yaml"]),
                             {"seed": LaunchConfiguration("seed")}]),
            IncludeLaunchDescription(
                PythonLaunchDescriptionSource(PathJoinSubstitution([share, "launch", "franka_policy.launch.py"])),
                launch_arguments={
                    "checkpoint": checkpoint,
                    "device": LaunchConfiguration("device"),
                    "encoder": LaunchConfiguration("encoder"),
                    "executor_mode": LaunchConfiguration("executor_mode"),
                    "execute_steps": LaunchConfiguration("execute_steps"),
                    "dds_profile": LaunchConfiguration("dds_profile"),
                    "bringup": "false",
                }.items(),
            ),
            Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
                 arguments=["-d", PathJoinSubstitution([share, "rviz", "mail.rviz"])],
                 condition=IfCondition(LaunchConfiguration("rviz"))),
        ]
    )
