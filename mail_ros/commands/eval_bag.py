"""``mail-ros eval-bag BAG... --checkpoint DIR``: offline evaluation of a policy on recorded demos.

Each bag is replayed in bag time through the nodes' alignment, observation and history code and
the policy (see :mod:`mail_ros.eval.replay`); every predicted chunk is compared with the actions
commanded in the bag over the same horizon, by the rule that makes training labels. The recorded
arm commands are also run through the model of the 1 kHz joint trajectory controller, and their
setpoint's worst acceleration and jerk reported against the FR3's limits
(:mod:`mail_ros.eval.setpoints`). Writes
``report.json``, PNG plots and ``report.html`` into ``--out`` (see :mod:`mail_ros.eval.report`).
Exit status 2 with one line on stderr for an unreadable, corrupt or truncated bag, missing
topics, cameras that differ from the checkpoint's, or a bad checkpoint or text encoder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mail_ros.commands import parse_pairs
from mail_ros.sync.alignment import DEFAULT_MAX_SKEW

PROG = "mail-ros eval-bag"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mail-ros eval-bag``."""
    p = subparsers.add_parser(
        "eval-bag",
        help="replay demo bags through the policy offline and report action error, sync and latency",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 folders (MCAP or SQLite3)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--out", default="eval_report", help="report directory (created; files replaced)")
    p.add_argument("--max-skew", type=float, default=DEFAULT_MAX_SKEW, help="max |member stamp - reference stamp| in s")
    p.add_argument("--latency-allowance", type=float, default=0.05, help="s to wait past ref + max skew")
    p.add_argument("--encoder", default=None,
                   help="text encoder spec (e.g. clip:<folder>); default: the checkpoint's language_encoder")
    p.add_argument("--instruction", default=None, help="use this instruction instead of /mail/instruction")
    p.add_argument("--every", type=int, default=1, metavar="K", help="predict on every K-th aligned observation")
    p.add_argument("--seed", type=int, default=0, help="policy sampler seed (reset at every new instruction)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--camera-topic", action="append", default=[], metavar="NAME=TOPIC",
                   help="topic of a camera (default /cameras/NAME/image_raw, else .../compressed)")
    p.add_argument("--gripper-source", choices=("auto", "command", "measured"), default="auto",
                   help="gripper ground truth from the command topic or the measured finger width")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mail_ros.data.hdf5 import DataError
    from mail_ros.language.encoders import TextEncoderError
    from mail_ros.policy.mail_policy import PolicyInputError

    try:
        return _evaluate(args)
    except (ValueError, DataError, TextEncoderError, PolicyInputError) as exc:
        # CheckpointError, ReplayError, ConfigError and bad options are ValueErrors too.
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    from mail_ros.eval.replay import ReplayConfig, replay_bag
    from mail_ros.eval.report import REPORT_HTML, write_report
    from mail_ros.policy.checkpoint import describe_checkpoint, load_checkpoint

    config = ReplayConfig(
        max_skew=args.max_skew,
        latency_allowance=args.latency_allowance,
        every=args.every,
        seed=args.seed,
        instruction=args.instruction,
        camera_topics=tuple(parse_pairs(args.camera_topic, "--camera-topic").items()),
        gripper_source=args.gripper_source,
    )
    checkpoint = describe_checkpoint(args.checkpoint)
    policy = load_checkpoint(args.checkpoint, device=args.device)
    embed = None
    if checkpoint.language_dim > 0:
        from mail_ros.language.encoders import load_text_encoder

        spec = args.encoder or checkpoint.language_encoder
        encoder = load_text_encoder(spec, device=args.device)
        if encoder.dim != checkpoint.language_dim:
            raise ValueError(
                f"text encoder {encoder.name} gives {encoder.dim}-d embeddings; the checkpoint expects "
                f"{checkpoint.language_dim}-d ({checkpoint.language_encoder})"
            )

        def embed(text: str):
            return encoder.encode([text])[0]

    replays = []
    for bag in args.bags:
        replays.append(replay_bag(bag, policy, config, embed=embed, progress=not args.no_progress))
    options = {
        "checkpoint": str(args.checkpoint),
        "bags": [str(b) for b in args.bags],
        "max_skew": config.max_skew,
        "latency_allowance": config.latency_allowance,
        "every": config.every,
        "seed": config.seed,
        "instruction": config.instruction,
        "encoder": args.encoder,
        "gripper_source": config.gripper_source,
        "device": args.device,
    }
    report = write_report(args.out, replays, checkpoint.summary(), options)
    error, latency, setpoint = report["action_error"], report["inference_ms"], report["setpoint_1khz"]
    mae = "n/a" if error["mae"] is None else f"{error['mae']:.4g}"
    print(
        f"{len(replays)} bag(s): {report['frames']} aligned frames, {report['chunks']} chunks, MAE {mae} over "
        f"{error['compared']} values, inference p50 {latency.get('p50', float('nan')):.1f} ms; "
        f"recorded arm commands at 1 kHz: worst acceleration {setpoint.get('acceleration_max', 0.0):.3g} rad/s^2, "
        f"jerk {setpoint.get('jerk_max', 0.0):.3g} rad/s^3; report: {Path(args.out) / REPORT_HTML}"
    )
    if report["chunks"] == 0:
        print(f"{PROG}: error: no chunk was predicted (observations: {report['observations']})", file=sys.stderr)
        return 1
    return 0
