"""mail_ros: MaIL (Mamba Imitation Learning) policies on a Franka arm through ROS 2.

The package has a pure core (``model``, ``policy``, ``sync``, ``control``, ``data``, ``train``,
``language``, ``eval``, ``sim``) that never imports rclpy, and thin ROS 2 adapters in ``nodes``.
"""

# The ROS interface code generated from msg/ (``mail_ros.msg``) is installed by CMake into the
# interpreter's site-packages, while this source tree may be installed editable from elsewhere.
# Extending the package path lets both halves form one ``mail_ros`` package, as they do when
# colcon installs them side by side.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)

__version__ = "0.1.0"
