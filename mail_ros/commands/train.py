"""``mail-ros train``: train a policy on demo files; checkpoints in OUT/best and OUT/last.

A config whose preset is an ICIL one (``icil-*``, e.g. config/train_icil_demo.yaml) trains a
prompt-conditioned policy instead (:mod:`mail_ros.train.icil_trainer`: tasks held out by name,
frozen-encoder features cached once per dataset; OUT/last only, one process; ``--resume DIR``
continues it in place).

The YAML config names a preset and overrides (see config/train_*.yaml and
:func:`mail_ros.train.trainer.load_run_config`). ``--resume DIR`` continues the run in DIR with
its saved config, data files, step counter and optimizer state (``--out`` defaults to DIR;
``--steps`` may extend it; different data are refused). A new run refuses an OUT that already
holds a run (best/, last/, log.csv, ...) unless ``--overwrite`` replaces it. Ctrl-C saves last/
and exits with status 130; a diverging run (non-finite loss) saves nothing more and exits with 1.

On several GPUs or machines, start it with torchrun (PyTorch's DistributedDataParallel; see
:mod:`mail_ros.train.distributed`)::

    torchrun --nproc_per_node 4 -m mail_ros.cli train --config CONFIG.yaml demos.hdf5 --out runs/x

``train.batch_size`` is the global batch (a multiple of the number of processes); rank 0 alone
writes OUT; ``--resume`` and Ctrl-C work as with one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a policy on HDF5 demos", description=__doc__,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", nargs="*", metavar="DATA", help="demo .hdf5 files (mail-ros convert, robomimic, LIBERO)")
    p.add_argument("--config", type=Path, help="training YAML (required unless --resume)")
    p.add_argument("--out", type=Path, help="run folder (required unless --resume)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the config's, else auto)")
    p.add_argument("--seed", type=int, default=None, help="overrides train.seed")
    p.add_argument("--steps", type=int, default=None, help="overrides the step budget (train.steps)")
    p.add_argument("--resume", type=Path, default=None, metavar="DIR", help="continue the run saved in DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (best/, last/, log.csv, summary.json, tensorboard/); "
                        "without it such an OUT is refused")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override, e.g. train.batch_size=64 or policy.head.kind=bc (value parsed as JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mail_ros.train.distributed import SINGLE, shutdown
    from mail_ros.train.icil_trainer import is_icil_config, is_icil_run
    from mail_ros.train.trainer import TrainError

    try:
        icil = is_icil_run(args.resume) if args.resume is not None else (
            args.config is not None and is_icil_config(args.config))
    except TrainError as exc:
        print(f"mail-ros train: {exc}", file=sys.stderr)
        return 2
    if icil:
        return _run_icil(args)

    joined = [SINGLE]  # the process group _run joins, left here whatever happens
    try:
        return _run(args, joined)
    finally:
        shutdown(joined[0])


def _run(args: argparse.Namespace, joined: list) -> int:
    from mail_ros.data.hdf5 import DataError
    from mail_ros.policy.checkpoint import CheckpointError
    from mail_ros.policy.presets import parse_override
    from mail_ros.train.distributed import init_from_env
    from mail_ros.train.trainer import (RunConfig, Trainer, TrainError, build_datasets, load_demos, load_run_config,
                                        remove_run_outputs, run_outputs)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = dict(parse_override(text) for text in args.set)
        if args.seed is not None:
            overrides["train.seed"] = args.seed
        if args.device is not None:
            overrides["train.device"] = args.device
        if args.steps is not None:
            overrides["train.steps"] = args.steps
            overrides["train.epochs"] = None
        if args.resume is not None:
            saved, data_files = _resumed_run(args, overrides)
            run_config = RunConfig.from_dict(saved)
            out = args.out or args.resume
        else:
            if args.config is None or args.out is None or not args.data:
                raise TrainError("give --config CONFIG.yaml, --out DIR and at least one DATA file (or --resume DIR)")
            run_config = load_run_config(args.config, overrides)
            data_files, out = args.data, args.out
        ctx = joined[0] = init_from_env(run_config.train.device)
        if not ctx.is_main:  # rank 0 tells the story once
            logging.getLogger().setLevel(logging.WARNING)
        in_place = args.resume is not None and out.resolve() == args.resume.resolve()
        if in_place and args.overwrite:
            raise TrainError(f"--overwrite replaces a run, --resume {args.resume} continues it in place; give one of them")
        replaced = [] if in_place else run_outputs(out)
        if replaced and not args.overwrite:
            raise TrainError(f"{out} already holds a run ({', '.join(replaced)}); continue it with --resume {out}, "
                             "choose another --out, or pass --overwrite to replace it")
        episodes = load_demos(data_files, run_config.policy, run_config.data.camera_map, run_config.data.lazy_images)
        datasets = build_datasets(episodes, run_config)
        trainer = Trainer(run_config, datasets, out, data_files=data_files, progress=not args.no_progress, dist=ctx)
        if args.resume is not None:
            trainer.load_state(args.resume)
    except (TrainError, DataError, ValueError) as exc:
        print(f"mail-ros train: {exc}", file=sys.stderr)
        return 2
    # Only now that the new run is set up: a typo in the command must not cost the old run.
    if replaced and ctx.is_main:
        remove_run_outputs(out)
    try:
        summary = trainer.fit()
    except (TrainError, CheckpointError) as exc:
        print(f"mail-ros train: {exc}", file=sys.stderr)
        return 1
    if not ctx.is_main:
        return 130 if summary.interrupted else 0
    lines = [
        f"{'interrupted' if summary.interrupted else 'finished'} at step {summary.step} (epoch {summary.epoch}) "
        f"in {summary.seconds:.1f} s, {summary.samples_per_second:.1f} samples/s",
        f"train loss {summary.last_train_loss}, val loss {summary.last_val_loss} (best {summary.best_val_loss})",
        f"windows: {summary.train_samples} train, {summary.val_samples} val",
        f"checkpoints: {Path(summary.out) / 'best'} (lowest val loss), {Path(summary.out) / 'last'}",
    ]
    if summary.mean_predictor_val_loss is not None:
        lines.insert(2, f"val loss of predicting the mean action: {summary.mean_predictor_val_loss:.4f}")
    print("\n".join(lines))
    return 130 if summary.interrupted else 0


def _resumed_run(args: argparse.Namespace, overrides: dict) -> tuple[dict, list[str]]:
    """For ``--resume DIR``: the saved run config (a dict) with the ``train.*`` overrides applied, and
    the data files (the command's, else the run's own)."""
    from mail_ros.train.trainer import TRAINER_JSON, TrainError

    info_path = args.resume / "last" / TRAINER_JSON
    if not info_path.is_file():
        raise TrainError(f"--resume {args.resume}: {info_path} not found")
    info = json.loads(info_path.read_text())
    saved = info["run"]
    for key, value in overrides.items():
        group, _, name = key.partition(".")
        if group != "train" or name not in saved["train"]:
            raise TrainError(f"--resume accepts train.* overrides only, got {key!r}")
        saved["train"][name] = value
    return saved, [str(f) for f in (args.data or info["data_files"])]


def _run_icil(args: argparse.Namespace) -> int:
    from mail_ros.data.hdf5 import DataError
    from mail_ros.policy.checkpoint import CheckpointError
    from mail_ros.policy.presets import parse_override
    from mail_ros.train.icil_trainer import ICILRunConfig, load_icil_run_config, train_icil
    from mail_ros.train.trainer import TrainError, remove_run_outputs, run_outputs

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        overrides = dict(parse_override(text) for text in args.set)
        for key, value in (("train.seed", args.seed), ("train.device", args.device), ("train.steps", args.steps)):
            if value is not None:
                overrides[key] = value
        if args.resume is not None:
            if args.out is not None and args.out.resolve() != args.resume.resolve():
                raise TrainError(f"an ICIL run is resumed in place: drop --out or give --out {args.resume}")
            if args.overwrite:
                raise TrainError(f"--overwrite replaces a run, --resume {args.resume} continues it; give one of them")
            saved, data_files = _resumed_run(args, overrides)
            run_config, out = ICILRunConfig.from_dict(saved), args.resume
        else:
            if args.out is None or not args.data:
                raise TrainError("give --config CONFIG.yaml, --out DIR and at least one DATA file (or --resume DIR)")
            run_config, data_files, out = load_icil_run_config(args.config, overrides), [str(f) for f in args.data], args.out
            replaced = run_outputs(out)
            if replaced and not args.overwrite:
                raise TrainError(f"{out} already holds a run ({', '.join(replaced)}); continue it with --resume {out}, "
                                 "choose another --out, or pass --overwrite to replace it")
            if replaced:
                remove_run_outputs(out)
        summary = train_icil(run_config, data_files, out, resume=args.resume is not None)
    except (TrainError, DataError, CheckpointError, ValueError) as exc:
        print(f"mail-ros train: {exc}", file=sys.stderr)
        return 2
    print(f"{'interrupted' if summary.interrupted else 'finished'} ICIL {run_config.preset} at step {summary.step} "
          f"in {summary.seconds:.1f} s (frame features {summary.feature_seconds:.1f} s)\n"
          f"train loss {summary.first_loss:.4f} -> {summary.last_loss:.4f} on {summary.episodes} episodes of "
          f"{len(summary.tasks)} tasks; held out {summary.held_out_tasks}\n"
          f"checkpoint: {Path(summary.out) / 'last'}")
    return 130 if summary.interrupted else 0
