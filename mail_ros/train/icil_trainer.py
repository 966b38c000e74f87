"""Training of prompt-conditioned (ICIL) policies: ``mail-ros train`` with an ``icil-*`` preset.

The YAML has MaIL's shape (``preset``, ``policy`` dotted overrides, ``data``, ``train``; see
config/train_icil_demo.yaml) with ICIL's own ``data`` and ``train`` groups
(:class:`ICILDataConfig`, :class:`ICILTrainConfig`). A run:

1. reads the demo files and checks them against the policy's contract (the MaIL trainer's
   :func:`~mail_ros.train.trainer.load_demos`);
2. groups the episodes by task (their instruction) and drops ``data.held_out_tasks``, named
   exactly (a name that matches no task is an error: :func:`~mail_ros.data.icil_data.task_groups`);
3. sets the normalisation statistics from the kept episodes' actions and joint positions;
4. freezes the image encoders' trunks and keypoint layers (as initialised from ``train.seed``, or
   taken over from a trained MaIL or ICIL checkpoint with ``train.encoder_from``) and computes every
   frame's keypoints once, cached on disk per (encoder weights and settings, episode) in
   ``data.feature_cache`` (:class:`~mail_ros.data.icil_data.FrameFeatureCache`); the steps
   after that run the encoders' projections, the proprio projection and the sequence model;
   with ``data.augment_shift`` also ``data.shift_views`` views of shifted images
   (:func:`~mail_ros.data.icil_data.shift_views`), from which samples draw each episode;
5. each step draws ``train.batch_size`` live episodes, each with a prompt of K ~ U{1 .. k_max}
   other demonstrations of its task (:class:`~mail_ros.data.icil_data.ICILSampler`), and
   minimises the chunk MSE at every ``data.cut_stride``-th live frame (the first one drawn);
   with ``train.ema`` an exponential moving average of the weights is kept beside them (the
   MaIL trainer's :class:`~mail_ros.train.trainer.EMA`) and is what the checkpoint holds.

The run folder holds ``last/`` (the checkpoint, ``policy_type`` "icil", with the held-out and
trained task names in its ``extra``, and the resume state (the raw weights and the Adam state) of the MaIL trainer's format:
:func:`~mail_ros.train.trainer.write_resume_state`), ``log.csv`` and ``summary.json``. There is no
validation split: what matters is behaviour on held-out tasks, which the test bed measures.

Every step draws its batch and dropout from ``(train.seed, step)`` alone and the Adam state is
saved with the weights, so a run stopped by Ctrl-C (last/ saved at the completed step) and
continued with ``--resume`` follows the uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from mail_ros.data.hdf5 import fingerprint_hdf5
from mail_ros.data.icil_data import (FrameFeatureCache, ICILSampler, episode_digest, feature_digest, shift_views,
                                     task_groups)
from mail_ros.policy.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config, save_checkpoint
from mail_ros.policy.config import ConfigError, check, check_bool, check_float, check_int
from mail_ros.policy.icil_config import ICILConfig
from mail_ros.policy.icil_policy import ICILPolicy
from mail_ros.policy.normalizer import Normalizer
from mail_ros.policy.presets import get_icil_preset
from mail_ros.train.trainer import (DEFAULT_EMBEDDING_CACHE, EMA, LR_SCHEDULES, TrainError, _as_train_error, _dataclass,
                                    _is_device, check_same_data, interrupt_on_terminate, learning_rate, load_demos,
                                    load_resume_state, read_resume_info, read_run_yaml, resolve_device,
                                    restore_handlers, split_overrides, write_resume_state)

__all__ = ["ICILDataConfig", "ICILTrainConfig", "ICILRunConfig", "ICILSummary", "is_icil_config", "is_icil_run",
           "load_icil_run_config", "train_icil"]

log = logging.getLogger(__name__)

DEFAULT_FEATURE_CACHE = "~/.cache/mail_ros/icil_features"


@dataclass
class ICILDataConfig:
    """How demo files become ICIL training sequences."""

    camera_map: dict[str, str] = field(default_factory=dict)  # file camera -> policy camera
    held_out_tasks: list[str] = field(default_factory=list)  # instructions never trained on
    feature_cache: str | None = DEFAULT_FEATURE_CACHE  # frozen-encoder features; None: in memory only
    embedding_cache: str | None = str(DEFAULT_EMBEDDING_CACHE)  # instruction embeddings (language on)
    cut_stride: int = 4  # predict a chunk after every cut_stride-th live frame (first cut drawn per sample)
    # Random-shift augmentation on cached features: shift_views more views of every episode, each
    # camera's frames shifted by up to augment_shift pixels (one offset per episode and view, drawn
    # from train.seed), encoded and cached beside the unshifted one; a sample takes each episode
    # from one of its 1 + shift_views views. 0 pixels: off. Each view costs one more encoder pass.
    augment_shift: int = 0
    shift_views: int = 4

    def __post_init__(self) -> None:
        with _as_train_error():
            check(isinstance(self.camera_map, dict), f"data.camera_map must be a mapping, got {self.camera_map!r}")
            check(isinstance(self.held_out_tasks, list) and all(isinstance(t, str) and t for t in self.held_out_tasks),
                  f"data.held_out_tasks must be a list of instructions, got {self.held_out_tasks!r}")
            for name in ("feature_cache", "embedding_cache"):
                value = getattr(self, name)
                check(value is None or (isinstance(value, str) and value != ""),
                      f"data.{name} must be a folder name or null, got {value!r}")
            check_int(self.cut_stride, "data.cut_stride", 1)
            check_int(self.augment_shift, "data.augment_shift", 0)
            check_int(self.shift_views, "data.shift_views", 1)


@dataclass
class ICILTrainConfig:
    """Optimisation settings: Adam on the sequence model and the proprio projection."""

    steps: int = 2000
    batch_size: int = 8  # live episodes (each with its own prompt) per step
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine: decay to 0 at the last step
    warmup_steps: int = 0  # linear ramp from 0 to lr over the first steps (either schedule)
    ema: bool = False  # checkpoint an exponential moving average of the weights, not the last ones
    ema_decay: float = 0.995  # per step, ramped in as min(ema_decay, (1 + n) / (10 + n))
    log_every: int = 50
    checkpoint_every: int = 500  # steps between last/ saves (and at the end)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # A trained MaIL or ICIL checkpoint whose image encoders the run takes over (trunks frozen, as always; see
    # ICILPolicy.load_encoder_from); None: the encoders stay at their seeded initialisation.
    encoder_from: str | None = None
    # A trained ICIL checkpoint the run starts from, every weight and statistic (a fine-tune; see
    # ICILPolicy.load_weights_from: the same settings, or joints added, or a longer chunk); None: a new policy.
    init_from: str | None = None

    def __post_init__(self) -> None:
        with _as_train_error():
            check(self.encoder_from is None or (isinstance(self.encoder_from, str) and self.encoder_from != ""),
                  f"train.encoder_from must be a MaIL or ICIL checkpoint folder or null, got {self.encoder_from!r}")
            check(self.init_from is None or (isinstance(self.init_from, str) and self.init_from != ""),
                  f"train.init_from must be an ICIL checkpoint folder or null, got {self.init_from!r}")
            check(self.encoder_from is None or self.init_from is None,
                  "train.encoder_from and train.init_from are both set: init_from brings the encoders too")
            for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
                check_int(getattr(self, name), f"train.{name}", 1)
            check_int(self.seed, "train.seed", 0)
            check_int(self.warmup_steps, "train.warmup_steps", 0)
            check(self.lr_schedule in LR_SCHEDULES,
                  f"train.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
            check_float(self.lr, "train.lr")
            check(self.lr > 0, f"train.lr must be positive, got {self.lr!r}")
            check_bool(self.ema, "train.ema")
            check_float(self.ema_decay, "train.ema_decay")
            check(0.0 < self.ema_decay < 1.0, f"train.ema_decay must be in (0, 1), got {self.ema_decay!r}")
            check(isinstance(self.device, str) and (self.device == "auto" or _is_device(self.device)),
                  f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class ICILRunConfig:
    preset: str
    policy: ICILConfig
    data: ICILDataConfig
    train: ICILTrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "policy": self.policy.to_dict(), "data": asdict(self.data),
                "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ICILRunConfig":
        """Rebuild a saved run config (``trainer.json``'s ``run``); anything malformed is a TrainError."""
        try:
            return cls(str(data["preset"]), ICILConfig.from_dict(data["policy"]),
                       _dataclass(ICILDataConfig, data["data"], "data"), _dataclass(ICILTrainConfig, data["train"], "train"))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise TrainError(f"invalid saved ICIL run config: {detail}") from exc

    def same_curve_as(self, other: "ICILRunConfig") -> list[str]:
        """The settings in which ``other`` differs from this run in a way that changes its loss curve
        (all but logging, checkpointing, device and cache folders, and the step budget where the
        learning rate does not depend on it): empty to resume."""
        mine, theirs = self.to_dict(), other.to_dict()
        free = {"train": {"log_every", "checkpoint_every", "device"} | ({"steps"} if self.train.lr_schedule == "constant" else set()),
                "data": {"feature_cache", "embedding_cache"}}
        differ = [group for group in ("preset", "policy") if mine[group] != theirs[group]]
        for group, names in free.items():
            differ += [f"{group}.{key}" for key in mine[group] if key not in names and mine[group][key] != theirs[group][key]]
        return differ


@dataclass
class ICILSummary:
    out: str
    step: int
    seconds: float
    first_loss: float
    last_loss: float
    tasks: list[str]
    held_out_tasks: list[str]
    episodes: int
    feature_seconds: float  # encoding the frames (0 when every episode was cached)
    interrupted: bool = False  # stopped by Ctrl-C: last/ holds the completed steps, --resume continues


def is_icil_config(path: str | Path) -> bool:
    """Whether the training YAML at ``path`` names an ICIL preset (``icil-*``)."""
    return str(read_run_yaml(Path(path)).get("preset", "")).startswith("icil-")


def is_icil_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir/last`` is an ICIL checkpoint (what ``--resume run_dir`` continues)."""
    last = Path(run_dir) / "last"
    try:
        return (last / "config.json").is_file() and read_checkpoint_config(last)["policy_type"] == "icil"
    except (OSError, ValueError):
        return False


def load_icil_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ICILRunConfig:
    """Read an ICIL training YAML; ``overrides`` ({"train.steps": 5, "policy.prompt.k_max": 2}) on top."""
    path = Path(path)
    raw = read_run_yaml(path)
    policy_overrides, sections = split_overrides(raw, overrides)
    try:
        policy = get_icil_preset(str(raw.get("preset")), policy_overrides)
        return ICILRunConfig(str(raw["preset"]), policy, _dataclass(ICILDataConfig, sections["data"], f"{path}: data"),
                             _dataclass(ICILTrainConfig, sections["train"], f"{path}: train"))
    except (TypeError, ValueError) as exc:
        raise TrainError(f"{path}: {exc}") from exc


def _load_from(setting: str, policy: ICILPolicy, checkpoint: Path) -> None:
    """``train.encoder_from`` (``policy.load_encoder_from`` a MaIL or ICIL checkpoint) or
    ``train.init_from`` (``policy.load_weights_from`` an ICIL one); any misfit is a TrainError."""
    try:
        source = load_checkpoint(checkpoint)
    except (OSError, CheckpointError) as exc:
        raise TrainError(f"train.{setting}: cannot load {checkpoint}: {exc}") from exc
    try:
        if setting == "encoder_from":
            policy.load_encoder_from(source)
        elif isinstance(source, ICILPolicy):
            policy.load_weights_from(source)
        else:
            raise ValueError(f"a {type(source).__name__} checkpoint, not an ICIL one (train.encoder_from takes "
                             "its image encoders)")
    except ValueError as exc:
        raise TrainError(f"train.{setting}: {checkpoint}: {exc}") from exc
    what = "image encoders" if setting == "encoder_from" else "weights and statistics"
    log.info("%s from the %s checkpoint %s", what, type(source).__name__, checkpoint)


def _folder(name: str | None) -> str | None:
    return None if name is None else os.path.expanduser(name)


def train_icil(run: ICILRunConfig, data_files: list[str], out: str | Path, language_loader=None,
               resume: bool = False, callbacks: Sequence[Callable[[int, dict], None]] = ()) -> ICILSummary:
    """Train ``run`` on ``data_files`` into ``out`` (see the module docstring); raises TrainError or DataError.

    ``resume``: continue the run saved in ``out/last`` up to ``run.train.steps`` (the same data and,
    but for the step budget, logging and device, the same settings; else a TrainError).
    ``callbacks`` are called as ``callback(step, info)`` after every optimizer step; a
    KeyboardInterrupt (Ctrl-C, SIGTERM, or raised by a callback) saves last/ at the completed step and
    returns the summary with ``interrupted=True``.
    """
    out = Path(out)
    config, data, cfg = run.policy, run.data, run.train
    device = resolve_device(cfg.device)
    episodes = load_demos(data_files, config, data.camera_map, lazy=True)
    groups = task_groups(episodes, data.held_out_tasks)
    kept = sorted(index for ids in groups.values() for index in ids)
    log.info("ICIL %s on %d episodes of %d tasks (held out: %s) on %s", run.preset, len(kept), len(groups),
             data.held_out_tasks or "none", device)

    torch.manual_seed(cfg.seed)
    policy = ICILPolicy(config)
    if cfg.encoder_from is not None and not resume:  # a resumed run's encoders come with its last/
        _load_from("encoder_from", policy, Path(cfg.encoder_from).expanduser())
    language_stats, embeddings = None, None
    if config.language.enabled:
        from mail_ros.data.dataset import EmbeddingCache
        from mail_ros.language.encoders import load_text_encoder

        embeddings = EmbeddingCache(_folder(data.embedding_cache)).embeddings(
            config.language.encoder, list(groups), language_loader or load_text_encoder)
        language_stats = Normalizer.stats_from_data(np.stack(list(embeddings.values())))
    policy.set_normalization(
        Normalizer.stats_from_data(torch.cat([
            policy.chunk_targets(torch.from_numpy(episodes[i].actions), torch.from_numpy(episodes[i].joint_positions))
            for i in kept]).numpy()),
        Normalizer.stats_from_data(np.concatenate([episodes[i].joint_positions for i in kept])),
        language_stats,
    )
    if cfg.init_from is not None and not resume:  # after the data's statistics: the checkpoint's replace them
        _load_from("init_from", policy, Path(cfg.init_from).expanduser())
    policy.to(device)
    policy.freeze_features()
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    fingerprints = [fingerprint_hdf5(f) for f in data_files]
    done, first, seconds_before = 0, None, 0.0
    if resume:
        done, first, seconds_before = _load_resume(out / "last", run, policy, optimizer, data_files, fingerprints)
    ema = EMA(policy, cfg.ema_decay) if cfg.ema else None
    if ema is not None and resume:  # the checkpoint's weights are the average so far
        ema.model.load_state_dict(load_checkpoint(out / "last", device="cpu").state_dict())

    def encode(images):
        with torch.inference_mode():
            batch = {c: torch.from_numpy(np.ascontiguousarray(v)).to(device) for c, v in images.items()}
            return policy.eval().frame_features(batch).float().cpu().numpy()

    start = time.perf_counter()
    kept_episodes = [episodes[i] for i in kept]
    cache, digest = FrameFeatureCache(_folder(data.feature_cache)), feature_digest(policy)
    # The episodes' image digests, hashed once: cache keys of every view and the views' offsets.
    digests = [episode_digest(e) for e in kept_episodes] if data.feature_cache or data.augment_shift else None
    features = cache.features(kept_episodes, encode, digest, digests=digests)
    views = [cache.features(kept_episodes, encode, digest, shifts=shifts, digests=digests)
             for shifts in (shift_views(digests, policy.cameras, data.augment_shift, data.shift_views, cfg.seed)
                            if data.augment_shift else [])]
    feature_seconds = time.perf_counter() - start
    remap = {index: position for position, index in enumerate(kept)}
    sampler = ICILSampler(kept_episodes, features, {task: [remap[i] for i in ids] for task, ids in groups.items()},
                          k_max=config.prompt.k_max, dilation=config.prompt.dilation, action_horizon=policy.A,
                          cut_stride=data.cut_stride, embeddings=embeddings, views=views)

    extra = {"preset": run.preset, "seed": cfg.seed, "tasks": sorted(groups),
             "held_out_tasks": list(data.held_out_tasks), "data_files": [str(f) for f in data_files],
             "encoder_from": cfg.encoder_from, "init_from": cfg.init_from, "ema": cfg.ema,
             **({"ema_decay": cfg.ema_decay} if cfg.ema else {})}
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    started = time.perf_counter()
    last = float("nan")  # the newest step's loss

    def save(step: int) -> None:  # also at step 0 (Ctrl-C during the first step): no loss yet
        info = {"policy_type": "icil", "step": step, "run": run.to_dict(), "data_files": [str(f) for f in data_files],
                "data_fingerprints": fingerprints, "first_loss": first,
                "seconds": seconds_before + time.perf_counter() - started}
        weights = ema.model if ema is not None else policy.eval()
        save_checkpoint(out / "last", weights, step=step, epoch=None, extra={**extra, "train_loss": None if math.isnan(last) else last},
                        write_files=lambda folder: write_resume_state(folder, policy, optimizer, info))

    interrupted = False
    previous_handlers = interrupt_on_terminate()
    with _open_log(out / "log.csv", done) as (stream, writer):
        try:
            for step in range(done + 1, cfg.steps + 1):
                torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout, reproducible per step
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step - 1, cfg.steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps)
                rng = np.random.default_rng([cfg.seed, step])
                batch = [sampler.sample(int(live), rng, device) for live in rng.choice(sampler.live, size=cfg.batch_size)]
                policy.train()
                policy.encoder.eval()  # frozen: its features are the cached ones
                loss, info = policy.compute_loss(batch)
                if not torch.isfinite(loss):
                    raise TrainError(f"the training loss is not finite at step {step}; nothing more is saved")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if ema is not None:
                    ema.update(policy, step - 1)
                done, last = step, info["loss"]
                first = last if first is None else first
                if step % cfg.log_every == 0 or step == cfg.steps:
                    seconds = seconds_before + time.perf_counter() - started
                    writer.writerow([step, f"{last:.6f}", int(info["chunks"]), f"{seconds:.1f}"])
                    stream.flush()
                    agreement = f" (task agreement {info['agreement']:.4f})" if "agreement" in info else ""
                    log.info("step %d/%d loss %.4f%s (%.1f s)", step, cfg.steps, last, agreement, seconds)
                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    save(step)
                for callback in callbacks:
                    callback(step, info)
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted at step %d: saving %s", done, out / "last")
        finally:
            restore_handlers(previous_handlers)
    save(done)
    summary = ICILSummary(str(out), done, seconds_before + time.perf_counter() - started,
                          float("nan") if first is None else first, last, sorted(groups),
                          list(data.held_out_tasks), len(kept), feature_seconds, interrupted)
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _load_resume(last_dir: Path, run: ICILRunConfig, policy: ICILPolicy, optimizer: torch.optim.Optimizer,
                 data_files: list[str], fingerprints: list[str]) -> tuple[int, float | None, float]:
    """Load the state saved in ``last_dir`` into ``policy`` and ``optimizer``: (step, first loss, seconds)."""
    info = read_resume_info(last_dir)
    if info.get("policy_type") != "icil":
        raise TrainError(f"{last_dir} is not an ICIL run; resume it without an ICIL config")
    differ = ICILRunConfig.from_dict(info["run"]).same_curve_as(run)
    if differ:
        raise TrainError(f"{last_dir}: this run's {', '.join(differ)} differ from the saved run's; resume with its "
                         f"settings (only train.log_every, checkpoint_every, device and, at a constant learning rate, steps may change)")
    check_same_data(last_dir, info, data_files, fingerprints)
    load_resume_state(last_dir, policy, optimizer)
    log.info("resuming %s at step %d", last_dir.parent, info["step"])
    return int(info["step"]), info["first_loss"], float(info["seconds"])


LOG_HEADER = ["step", "loss", "chunks", "seconds"]


@contextmanager
def _open_log(path: Path, step: int) -> Iterator[tuple[Any, Any]]:
    """``log.csv`` opened for writing rows after ``step``, as (stream, csv writer): the header and the
    rows up to ``step`` are kept; rows of later steps (logged before a kill, after the checkpoint being
    resumed) are dropped, so no step appears twice."""
    rows = []
    if step and path.is_file():
        with open(path, newline="") as stream:
            rows = [row for row in csv.reader(stream) if row and row != LOG_HEADER and int(row[0]) <= step]
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerows([LOG_HEADER, *rows])
        yield stream, writer
