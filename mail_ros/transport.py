"""Which environment variable loads a Fast DDS XML profile, per ROS 2 distribution.

Fast DDS reads its default XML profile file from an environment variable whose name changed
with Fast DDS 3: Humble (Fast DDS 2.6) and Jazzy (2.14) read ``FASTRTPS_DEFAULT_PROFILES_FILE``;
Kilted and later (Fast DDS 3) read ``FASTDDS_DEFAULT_PROFILES_FILE`` (their rmw_fastrtps still
honours the old name, with a deprecation warning on every node). Both are ignored by other RMWs,
so setting them never affects Cyclone DDS or Zenoh users.

The launch files apply ``config/fastdds_shm.xml`` (a shared-memory segment big enough for camera
images) through :func:`apply_dds_profile`; a profile the user has set already wins.
"""

from __future__ import annotations

from collections.abc import Mapping

FASTDDS_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"  # Fast DDS 3 (Kilted, Rolling)
FASTRTPS_VARIABLE = "FASTRTPS_DEFAULT_PROFILES_FILE"  # Fast DDS 2 (Humble, Iron, Jazzy)
FAST_DDS_2_DISTROS = ("humble", "iron", "jazzy")


def fastdds_profile_environment(profile: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to set so that processes started with ``environ`` load ``profile``.

    Empty when ``profile`` is empty or the user already points either variable at a profile of
    their own. ``ROS_DISTRO`` (set by a ROS 2 installation's setup file) chooses the name; without
    it (ROS 2 from PyPI wheels, which are Kilted) the Fast DDS 3 name is used.
    """
    if not profile or environ.get(FASTDDS_VARIABLE) or environ.get(FASTRTPS_VARIABLE):
        return {}
    distro = environ.get("ROS_DISTRO", "").strip().lower()
    return {FASTRTPS_VARIABLE if distro in FAST_DDS_2_DISTROS else FASTDDS_VARIABLE: profile}


def apply_dds_profile(context) -> list:
    """Launch actions (an ``OpaqueFunction``'s) setting the profile named by the ``dds_profile``
    launch argument for every process started after them: empty = mail_ros's
    ``config/fastdds_shm.xml``, ``none`` = leave the environment as it is."""
    from launch.actions import SetEnvironmentVariable
    from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
    from launch_ros.substitutions import FindPackageShare

    profile = LaunchConfiguration("dds_profile").perform(context)
    if profile == "none":
        return []
    share = FindPackageShare("mail_ros")
    profile = profile or PathJoinSubstitution([share, "config", "fastdds_shm.xml"]).perform(context)
    return [SetEnvironmentVariable(name, value)
            for name, value in fastdds_profile_environment(profile, context.environment).items()]


__all__ = ["FASTDDS_VARIABLE", "FASTRTPS_VARIABLE", "apply_dds_profile", "fastdds_profile_environment"]
