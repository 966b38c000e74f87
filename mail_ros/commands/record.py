"""``mail-ros record OUT [--topics ...] [--duration S]``: record demonstrations to a rosbag2 (MCAP).

The bag writer and its conventions (episode markers, bag time = receive time) are the ROS-free
core :mod:`mail_ros.data.recording`; the live part (discovery, subscriptions, the spin loop) is
the rclpy edge :mod:`mail_ros.nodes.recorder`. Both are imported by this command, neither imports it.

``--arm-source`` picks the topics a demonstration of that kind needs
(:func:`mail_ros.data.recording.default_topics`): ``command`` records the arm and gripper
commands; ``kinesthetic`` (the arm moved by hand) leaves the arm command topic out, so that
nothing on it can be mistaken for the demonstration; ``teleop`` records the leader's
``--teleop-topic`` instead. Convert with the same ``--arm-source`` (see
:mod:`mail_ros.data.action_sources`).
"""

from __future__ import annotations

import argparse
import sys

from mail_ros.data.action_sources import ARM_SOURCES
from mail_ros.data.bags import BagConfig
from mail_ros.data.recording import DEFAULT_TOPICS, STORAGES, RecordError, default_topics

__all__ = ["register", "run"]

PROG = "mail-ros record"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mail-ros record``."""
    p = subparsers.add_parser(
        "record",
        help="record live demo topics (cameras, joints, commands, instruction) to a rosbag2 with episode markers",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out", help="bag folder to create")
    p.add_argument("--topics", nargs="+", default=None,
                   help="topics or shell-style patterns (e.g. '/cameras/*/image_raw'); discovered while recording "
                        f"(default: those --arm-source needs; for command: {' '.join(DEFAULT_TOPICS)})")
    p.add_argument("--arm-source", choices=ARM_SOURCES, default="command",
                   help="how the demonstrations move the arm: commands, by hand (kinesthetic) or a leader device (teleop)")
    p.add_argument("--teleop-topic", default=BagConfig().teleop_topic,
                   help="--arm-source teleop: the leader's JointState or JointTrajectory topic")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    p.add_argument("--storage", choices=STORAGES, default="mcap", help="rosbag2 storage plugin")
    p.add_argument("--quiet", action="store_true", help="no live status line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.duration is not None and not args.duration > 0:
        print(f"{PROG}: error: --duration must be positive seconds, got {args.duration}", file=sys.stderr)
        return 2
    # The rclpy edge is imported only here, so the rest of the CLI stays free of ROS.
    from mail_ros.nodes.recorder import main

    try:
        topics = tuple(args.topics) if args.topics else default_topics(args.arm_source, args.teleop_topic)
        return main(args.out, topics, duration=args.duration, storage=args.storage,
                    status=None if args.quiet else sys.stderr)
    except RecordError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
