"""``mail-ros convert``: rosbag2 demos (and robomimic/LIBERO HDF5 files) -> one robomimic-layout HDF5.

Bags are aligned with the policy node's aligner at ``--rate``; see :mod:`mail_ros.data.bags` for
the topics and the exact action rule. The output is written to a temp file and renamed at the
end. Bad episodes are skipped with a warning; the exit status is non-zero only when nothing
usable was found. The output keeps its inputs' action space (a bag's is joint_position); an
input whose action space differs from the earlier inputs' is skipped.

Arm actions come from ``--arm-source`` (see :mod:`mail_ros.data.action_sources`): ``command``
(the JointTrajectory on ``--arm-command-topic``), ``kinesthetic`` (the measured joint positions
at t + dt, for an arm moved by hand) or ``teleop`` (a leader's JointState or JointTrajectory
targets on ``--teleop-topic``, joint names mapped with ``--teleop-joint-map LEADER=ROBOT``).
Each episode's source is written to its ``action_source`` attribute and counted in the summary;
an episode that lacks it is skipped with the reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from mail_ros.commands import parse_pairs
from mail_ros.data.action_sources import ARM_SOURCES, DEFAULT_MAX_STATE_GAP
from mail_ros.data.bags import BagConfig
from mail_ros.spec import FR3_ARM_JOINTS, FR3_FINGER_JOINTS, GRIPPER_ACTION_NAME, ObservationSpec
from mail_ros.sync.alignment import DEFAULT_MAX_SKEW

HDF5_SUFFIXES = (".hdf5", ".h5")
log = logging.getLogger("mail_ros.convert")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert demo bags (MCAP/SQLite3) or robomimic/LIBERO HDF5 files to one HDF5 demo file",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="BAG", help="rosbag2 folders, or .hdf5 files to merge")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .hdf5 (replaced atomically)")
    p.add_argument("--cameras", nargs="+", default=list(ObservationSpec().cameras), help="policy camera names, reference first")
    p.add_argument("--camera-topic", action="append", default=[], metavar="NAME=TOPIC",
                   help="topic of a camera (default /cameras/NAME/image_raw)")
    p.add_argument("--camera-map", action="append", default=[], metavar="FILE=POLICY",
                   help="rename cameras of HDF5 inputs, e.g. eye_in_hand=wrist")
    p.add_argument("--rate", type=float, default=ObservationSpec().rate_hz, help="policy rate in Hz (frames and action dt)")
    p.add_argument("--image-size", nargs=2, type=int, default=list(ObservationSpec().image_size), metavar=("H", "W"))
    p.add_argument("--max-skew", type=float, default=DEFAULT_MAX_SKEW, help="max |member stamp - reference stamp| in s")
    p.add_argument("--joints", nargs="+", default=list(FR3_ARM_JOINTS + FR3_FINGER_JOINTS), help="observed joints, in order")
    p.add_argument("--actions", nargs="+", default=list(FR3_ARM_JOINTS + (GRIPPER_ACTION_NAME,)),
                   help=f"action names: arm joints of the trajectory topic, and {GRIPPER_ACTION_NAME} for the gripper")
    p.add_argument("--joint-states-topic", default="/joint_states")
    p.add_argument("--arm-command-topic", default="/fr3_arm_controller/joint_trajectory")
    p.add_argument("--arm-source", choices=ARM_SOURCES, default="command",
                   help="arm actions from commands, the measured joints (kinesthetic) or a leader's targets (teleop)")
    p.add_argument("--teleop-topic", default=BagConfig.teleop_topic,
                   help="--arm-source teleop: the leader's sensor_msgs/JointState or JointTrajectory topic")
    p.add_argument("--teleop-joint-map", action="append", default=[], metavar="LEADER=ROBOT",
                   help="--arm-source teleop: rename a leader joint to the robot's (repeat per joint)")
    p.add_argument("--max-state-gap", type=float, default=DEFAULT_MAX_STATE_GAP,
                   help="kinesthetic / JointState leader: drop frames whose t + dt falls in a longer gap between states (s)")
    p.add_argument("--kinesthetic-lead", type=float, default=0.0, metavar="S",
                   help="--arm-source kinesthetic: label the joints measured at t + dt + S, S the time the robot's "
                        "controller takes to bring the arm to a target (the test bed: 0.05-0.1 s), so the policy "
                        "commands ahead of the arm as commanded demonstrations do")
    p.add_argument("--gripper-command-topic", default="/fr3_gripper/joint_trajectory")
    p.add_argument("--gripper-source", choices=("auto", "command", "measured"), default="auto",
                   help="gripper width from the command topic, or measured (finger sum); auto: command if recorded")
    p.add_argument("--instruction-topic", default="/mail/instruction")
    p.add_argument("--episode-topic", default="/mail/episode", help="std_msgs/String start/stop markers (optional)")
    p.add_argument("--default-instruction", default=None, help="instruction for episodes whose bag has none")
    p.add_argument("--min-frames", type=int, default=1, help="skip episodes with fewer aligned frames")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mail_ros.data.bags import ACTION_SPACE, read_bag
    from mail_ros.data.hdf5 import DataError, DemoWriter, Episode, read_hdf5
    from mail_ros.sync.image import resize_rgb

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        observation = ObservationSpec(cameras=tuple(args.cameras), image_size=tuple(args.image_size),
                                      joint_names=tuple(args.joints), rate_hz=args.rate)
        config = BagConfig(
            observation=observation,
            camera_topics=tuple(parse_pairs(args.camera_topic, "--camera-topic").items()),
            joint_states_topic=args.joint_states_topic,
            action_names=tuple(args.actions),
            arm_command_topic=args.arm_command_topic,
            arm_source=args.arm_source,
            teleop_topic=args.teleop_topic,
            teleop_joint_map=tuple(parse_pairs(args.teleop_joint_map, "--teleop-joint-map").items()),
            max_state_gap=args.max_state_gap,
            kinesthetic_lead=args.kinesthetic_lead,
            gripper_command_topic=args.gripper_command_topic,
            gripper_source=args.gripper_source,
            instruction_topic=args.instruction_topic,
            episode_topic=args.episode_topic,
            default_instruction=args.default_instruction,
            max_skew=args.max_skew,
            min_frames=args.min_frames,
        )
        camera_map = parse_pairs(args.camera_map, "--camera-map")
    except ValueError as exc:
        print(f"mail-ros convert: {exc}", file=sys.stderr)
        return 2

    skipped: list[str] = []
    dropped: Counter[str] = Counter()
    decimated = 0
    skews: dict[str, list[float]] = {}
    gripper_sources: Counter[str] = Counter()
    action_sources: Counter[str] = Counter()  # per written episode
    action_space: str | None = None  # of the first input written; every other input must agree
    writer = DemoWriter(args.output, observation.cameras, observation.joint_names, config.action_names, args.rate)
    try:
        for source in args.inputs:
            path = Path(source)
            if path.suffix in HDF5_SUFFIXES:
                try:
                    demos = read_hdf5(path, camera_map, cameras=observation.cameras, lazy=True)  # one episode in memory at a time
                    if (demos.joint_names, demos.action_names) != (observation.joint_names, config.action_names):
                        raise DataError(f"{path}: joints {list(demos.joint_names)} / actions {list(demos.action_names)} "
                                        f"differ from --joints / --actions")
                    if abs(demos.rate_hz - args.rate) > 1e-9:
                        raise DataError(f"{path}: recorded at {demos.rate_hz} Hz, --rate is {args.rate} Hz")
                    if action_space not in (None, demos.action_space):
                        raise DataError(f"{path}: action space {demos.action_space!r} differs from the earlier "
                                        f"inputs' {action_space!r}")
                except DataError as exc:
                    log.warning("skipping %s", exc)
                    skipped.append(str(exc))
                    continue
                action_space = demos.action_space
                for ep in demos.episodes:
                    if ep.image_size != observation.image_size:
                        images = {c: np.stack([resize_rgb(f, observation.image_size) for f in v]) for c, v in ep.images.items()}
                        ep = Episode(images, ep.joint_positions, ep.actions, ep.instruction, ep.timestamps, ep.source, ep.sync_stats,
                                     ep.action_source)
                    action_sources[ep.action_source or "not recorded"] += 1
                    writer.add(ep)
                continue
            try:
                if action_space not in (None, ACTION_SPACE):
                    raise DataError(f"{path}: action space {ACTION_SPACE!r} (a bag) differs from the earlier "
                                    f"inputs' {action_space!r}")
                readout = read_bag(path, config)
            except DataError as exc:
                log.warning("skipping bag %s", exc)
                skipped.append(str(exc))
                continue
            if readout.episodes:
                action_space = ACTION_SPACE
            skipped.extend(readout.failures)
            gripper_sources[readout.gripper_source] += len(readout.episodes)
            for stream, values in readout.skews.items():
                skews.setdefault(stream, []).extend(values)
            for ep in readout.episodes:
                reference = ep.sync_stats["streams"][observation.cameras[0]]["dropped"]
                decimated += reference.get("decimated", 0)
                dropped.update({k: v for k, v in reference.items() if k != "decimated"})
                dropped.update(ep.sync_stats["frames_dropped"])
                dropped.update({f"stamped_ahead:{k}": v for k, v in ep.sync_stats["messages_stamped_ahead"].items()})
                dropped.update({f"unstamped:{k}": v for k, v in ep.sync_stats["messages_unstamped"].items()})
                action_sources[ep.action_source] += 1
                writer.add(ep)
        if writer.episodes == 0:
            writer.abort()
            print(f"mail-ros convert: no usable episode in {len(args.inputs)} input(s); {args.output} not written",
                  file=sys.stderr)
            for reason in skipped:
                print(f"  skipped: {reason}", file=sys.stderr)
            return 1
        writer.action_space = action_space
        writer.close()
    except BaseException:
        writer.abort()
        raise

    print(f"wrote {args.output}: {writer.episodes} episodes, {writer.frames} frames at {args.rate:g} Hz, "
          f"images {observation.image_size[0]}x{observation.image_size[1]}, action space {action_space}")
    print("actions from: " + ", ".join(f"{k} ({v} episodes)" for k, v in sorted(action_sources.items())))
    if gripper_sources:
        print("gripper width from: " + ", ".join(f"{k} ({v} episodes)" for k, v in sorted(gripper_sources.items())))
    print(f"skipped episodes/inputs: {len(skipped)}")
    for reason in skipped:
        print(f"  {reason}")
    print(f"reference frames decimated to the policy rate: {decimated}")
    print("dropped frames: " + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"))
    for stream, values in skews.items():
        if values:
            p50, p99 = np.percentile(np.abs(values) * 1e3, [50, 99])
            print(f"skew {stream}: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(values)} frames)")
    return 0
