"""Online replay of a recorded session through the pipeline, on bag time.

    ros2 launch mail_ros replay.launch.py checkpoint:=/path/to/ckpt
    ros2 bag play --clock 100 BAG

Every node runs with use_sim_time:=true. The executor is DISABLED by default: a replay must
never command a robot. Its decisions stay visible on /diagnostics; the predicted chunks are on
/mail/action_chunk (record them with `mail-ros record`, or compare offline with `mail-ros eval-bag`).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = [
    ("checkpoint", "", "MaIL checkpoint directory"),
    ("device", "auto", "Torch device of the policy"),
    ("encoder", "minilm", "Text encoder of language_node"),
    ("executor_enabled", "false", "Let the executor send commands (leave false: never command a robot from a replay)"),
]


def generate_launch_description():
    pipeline = PathJoinSubstitution([FindPackageShare("mail_ros"), "launch", "franka_policy.launch.py"])
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, default, description in ARGUMENTS]
        + [
            IncludeLaunchDescription(
                PythonLaunchDescriptionSource(pipeline),
                launch_arguments={
                    "checkpoint": LaunchConfiguration("checkpoint"),
                    "device": LaunchConfiguration("device"),
                    "encoder": LaunchConfiguration("encoder"),
                    "executor_enabled": LaunchConfiguration("executor_enabled"),
                    "use_sim_time": "true",
                    "bringup": "false",
                }.items(),
            )
        ]
    )
