"""``mail-ros checkpoint``: create untrained checkpoints, inspect them, list presets.

* ``init --preset NAME --out DIR [--seed N] [--set group.field=value ...] [--overwrite]``: untrained weights
  (a MaIL preset, or an ICIL one: ``icil-*``)
  with normalisation statistics derived from the FR3 joint limits (mean = middle of the range,
  std = half the range, min/max = the limits), so a fresh checkpoint already commands
  positions inside the limits; useful for wiring tests and latency checks before training.
  With ``relative_actions`` the arm dimensions are offsets instead: mean 0, bounded by what the
  joint's velocity limit covers in one chunk, so an untrained policy stays near the arm.
  An existing DIR is refused unless ``--overwrite`` (it may hold a trained checkpoint).
* ``info DIR``: the policy type, spec, variant, parameter counts and file sizes (reads no model code).
* ``presets``: the preset names, MaIL then ICIL (``--params`` also builds each one to count its parameters).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mail_ros.control.limits import FR3_POSITION_MAX, FR3_POSITION_MIN, FR3_VELOCITY_MAX
from mail_ros.spec import (FR3_ARM_JOINTS, FR3_FINGER_JOINTS, FR3_GRIPPER_MAX_WIDTH, GRIPPER_ACTION_NAME,
                           GRIPPER_COMMAND_PER_WIDTH)

if TYPE_CHECKING:
    from mail_ros.policy.config import PolicyConfig
    from mail_ros.policy.icil_config import ICILConfig

# Position limits per name: the arm's from the datasheet table in control/limits.py, radians;
# each finger joint moves half the gripper's opening width, metres.
FR3_POSITION_LIMITS: dict[str, tuple[float, float]] = {
    **{name: (lo, hi) for name, lo, hi in zip(FR3_ARM_JOINTS, FR3_POSITION_MIN, FR3_POSITION_MAX)},
    **{name: (0.0, GRIPPER_COMMAND_PER_WIDTH * FR3_GRIPPER_MAX_WIDTH) for name in FR3_FINGER_JOINTS},
    GRIPPER_ACTION_NAME: (0.0, FR3_GRIPPER_MAX_WIDTH),
}


def limit_stats(names: list[str] | tuple[str, ...]) -> dict[str, list[float]]:
    """Statistics from the FR3 limits of ``names``: mean = middle, std = half range, min/max = limits."""
    unknown = [name for name in names if name not in FR3_POSITION_LIMITS]
    if unknown:
        raise ValueError(f"no FR3 position limits for {unknown}; known: {sorted(FR3_POSITION_LIMITS)}")
    low = [FR3_POSITION_LIMITS[name][0] for name in names]
    high = [FR3_POSITION_LIMITS[name][1] for name in names]
    return {
        "mean": [(lo + hi) / 2 for lo, hi in zip(low, high)],
        "std": [(hi - lo) / 2 for lo, hi in zip(low, high)],
        "min": low,
        "max": high,
    }


def action_stats(config: "PolicyConfig | ICILConfig") -> dict[str, list[float]]:
    """Untrained action statistics of a MaIL or ICIL config: limit_stats, or chunk-sized offsets for the
    dimensions its ActionFrame makes relative (see the module docstring)."""
    from mail_ros.policy.action_frame import ActionFrame

    names = config.spec.action.names
    stats = limit_stats(names)
    chunk_seconds = config.spec.action.horizon * config.spec.action.dt
    for a in ActionFrame.of(config).action_index:
        if names[a] not in FR3_ARM_JOINTS:
            raise ValueError(f"no FR3 velocity limit for relative action {names[a]!r}")
        reach = FR3_VELOCITY_MAX[FR3_ARM_JOINTS.index(names[a])] * chunk_seconds
        stats["mean"][a], stats["std"][a], stats["min"][a], stats["max"][a] = 0.0, reach / 2, -reach, reach
    return stats


def _build(name: str, overrides: dict | None = None):
    """The untrained policy of preset ``name``: an ICILPolicy for ``icil-*``, else a MaILPolicy."""
    from mail_ros.policy.presets import get_icil_preset, get_preset

    if name.startswith("icil-"):
        from mail_ros.policy.icil_policy import ICILPolicy

        return ICILPolicy(get_icil_preset(name, overrides))
    from mail_ros.policy.mail_policy import MaILPolicy

    return MaILPolicy(get_preset(name, overrides))


def _init(args: argparse.Namespace) -> int:
    import torch

    from mail_ros.policy.checkpoint import CheckpointError, save_checkpoint
    from mail_ros.policy.presets import parse_override

    if Path(args.out).exists() and not args.overwrite:
        raise CheckpointError(f"{args.out} already exists; pass --overwrite to replace it")
    torch.manual_seed(args.seed)
    policy = _build(args.preset, dict(parse_override(text) for text in args.set))
    config = policy.config
    policy.set_normalization(action_stats(config), limit_stats(config.spec.observation.joint_names))
    path = save_checkpoint(args.out, policy, step=0, epoch=0, extra={"preset": args.preset, "seed": args.seed})
    print(f"wrote untrained {args.preset} ({policy.num_parameters()['total']:,} parameters) to {path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from mail_ros.policy.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint_config, read_weight_shapes

    root = Path(args.dir)
    data = read_checkpoint_config(root)
    counts: dict[str, int] = {}
    for key, shape in read_weight_shapes(root).items():
        part = key.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + math.prod(shape)
    policy = data["policy"]
    icil = data["policy_type"] == "icil"
    print(f"checkpoint     {root}")
    print(f"format         v{data['format_version']} (mail_ros {data['mail_ros_version']})")
    if icil:
        print("policy type    icil (in-context imitation: prompted with demonstrations, see 'mail-ros prompt')")
        print(f"variant/head   {data['variant']} / {data['head']}")
        print(f"prompt         {json.dumps(policy['prompt'])}")
    else:
        print("policy type    mail")
        print(f"variant/head   {data['variant']} / {data['head']}  (init {policy['init']})")
    print(f"backbone       {json.dumps(policy['backbone'])}")
    print(f"vision         {json.dumps(policy['vision'])}")
    print(f"cameras        {data['cameras']} at {data['image_size'][0]}x{data['image_size'][1]} (H x W)")
    print(f"history T      {data['obs_horizon']} at {data['rate_hz']} Hz; joints {data['joint_names']}")
    print(f"actions A      {data['action_horizon']} x {data['action_space']} {data['action_names']}, dt {data['dt']} s")
    print(f"language       {data['language_encoder']} ({data['language_dim']}-d)")
    print(f"proprio        {policy['proprio']}")
    relative = policy["relative_actions"]
    print(f"action frame   {'offsets from the current joint positions (arm)' if relative else 'absolute'}")
    print(f"training       {data['training']}")
    print("tensors        " + ", ".join(f"{part} {n:,}" for part, n in sorted(counts.items())) + f"; total {sum(counts.values()):,}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        print(f"file           {name} {(root / name).stat().st_size:,} bytes")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from mail_ros.policy.presets import list_icil_presets, list_presets

    for name in list_presets() + list_icil_presets():
        if args.params:
            import torch

            with torch.device("meta"):
                total = _build(name).num_parameters()["total"]
            print(f"{name:28s} {total:>12,}")
        else:
            print(name)
    return 0


def _reporting_errors(func):
    """Run ``func``; bad presets, overrides and checkpoints print one clear line and exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ValueError as exc:  # CheckpointError, ConfigError, SpecError are ValueErrors
            print(f"mail-ros checkpoint {args.checkpoint_command}: error: {exc}", file=sys.stderr)
            return 2

    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mail-ros checkpoint`` and its sub-commands."""
    parser = subparsers.add_parser("checkpoint", help="create, inspect and list policy checkpoints")
    commands = parser.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)

    init = commands.add_parser("init", help="write an untrained checkpoint from a preset")
    init.add_argument("--preset", required=True, help="preset name (see 'mail-ros checkpoint presets')")
    init.add_argument("--out", required=True, help="checkpoint directory to write")
    init.add_argument("--seed", type=int, default=0, help="torch seed for the initial weights")
    init.add_argument(
        "--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
        help="override a config field, e.g. spec.observation.obs_horizon=1 (repeatable; JSON values)",
    )
    init.add_argument("--overwrite", action="store_true",
                      help="replace whatever is at --out (without it an existing --out is refused)")
    init.set_defaults(func=_reporting_errors(_init))

    info = commands.add_parser("info", help="print a checkpoint's spec, sizes and parameter counts")
    info.add_argument("dir", help="checkpoint directory")
    info.set_defaults(func=_reporting_errors(_info))

    presets = commands.add_parser("presets", help="list preset names")
    presets.add_argument("--params", action="store_true", help="also count each preset's parameters")
    presets.set_defaults(func=_reporting_errors(_presets))
