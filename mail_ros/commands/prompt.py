"""``mail-ros prompt DEMO [DEMO ...]``: hand demonstrations to a running ICIL policy_node.

Calls policy_node's ``~/set_prompt`` (mail_ros/srv/SetPrompt) with the paths made absolute (the
node's working directory is not yours) and prints its answer: the goal the prompt starts, K,
the prompt frames and the prefill time, or why it was refused (the previous prompt then stays
in use). A DEMO is an HDF5 file from ``mail-ros convert`` (all its episodes), one episode group
of it (``demos.hdf5:demo_2``) or a rosbag2 folder from ``mail-ros record``. ``--clear`` removes
the prompt (no chunks until the next one). The same from any ROS 2 shell::

    ros2 service call /policy_node/set_prompt mail_ros/srv/SetPrompt "{paths: ['/abs/demos.hdf5']}"

Exit status: 0 accepted, 1 refused, 2 no such service or no answer within ``--timeout``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register", "run"]

PROG = "mail-ros prompt"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mail-ros prompt``."""
    p = subparsers.add_parser("prompt", help="give a running ICIL policy_node demonstrations to imitate (~/set_prompt)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("demos", nargs="*", metavar="DEMO",
                   help="HDF5 demo files, FILE.hdf5:demo_N episode groups or rosbag2 folders")
    p.add_argument("--clear", action="store_true", help="remove the prompt instead (no chunks until the next one)")
    p.add_argument("--service", default="/policy_node/set_prompt", help="the SetPrompt service to call")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the service and for its answer (reading and prefilling take time)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.demos) == args.clear:
        print(f"{PROG}: error: give DEMO paths, or --clear alone", file=sys.stderr)
        return 2
    from mail_ros.data.prompts import absolute_prompt_path

    paths = [absolute_prompt_path(text) for text in args.demos]
    # The rclpy edge is imported only here, so the rest of the CLI stays free of ROS.
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor

    from mail_ros.srv import SetPrompt

    context = Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node("mail_ros_prompt", context=context)
        client = node.create_client(SetPrompt, args.service)
        if not client.wait_for_service(timeout_sec=args.timeout):
            print(f"{PROG}: error: no {args.service} service within {args.timeout:g} s (is policy_node running "
                  "with an ICIL checkpoint, in this ROS_DOMAIN_ID?)", file=sys.stderr)
            return 2
        future = client.call_async(SetPrompt.Request(paths=paths))
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        executor.spin_until_future_complete(future, timeout_sec=args.timeout)
        if not future.done() or future.result() is None:
            print(f"{PROG}: error: no answer from {args.service} within {args.timeout:g} s", file=sys.stderr)
            return 2
        answer = future.result()
        stream = sys.stdout if answer.success else sys.stderr
        print(answer.message, file=stream)
        if answer.success and paths:
            print(f"K={answer.k}, {answer.frames} prompt frames, prefill {answer.prefill_ms:.1f} ms")
        return 0 if answer.success else 1
    finally:
        rclpy.try_shutdown(context=context)
