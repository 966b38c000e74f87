"""Training loop: demos -> MaILPolicy checkpoints (best/ and last/), resumable, no pickle.

A run folder holds::

    best/             policy checkpoint with the lowest validation loss (save_checkpoint)
    last/             latest policy checkpoint, plus what resuming needs:
      trainer_state.safetensors   raw (non-EMA) weights and the Adam state (tensors)
      trainer.json                step, epoch, seeds, best loss, all configs, data files and
                                  their fingerprints (a resume refuses different data)
    log.csv           one row per logged step
    tensorboard/      the same scalars for TensorBoard
    summary.json      what the run did (TrainSummary)

A checkpoint folder is replaced in one step, resume state included, so a kill at any moment
leaves the old or the new one complete. A non-finite training or validation loss stops the run
with :class:`TrainError` before anything is saved.

With EMA (the DDPM default, as the reference) the checkpoints hold the EMA weights and
validation runs on them; the raw weights live only in ``trainer_state.safetensors``.

Determinism: batch order comes from ``default_rng([seed, epoch])`` permutations, augmentation
from ``default_rng([seed, epoch, sample])``, and torch's RNG (DDPM noise and steps, dropout) is
reseeded from (seed, step) before every step (and the rank, under DDP: the ranks see different
samples and draw different noise). A resumed run therefore continues exactly the run that was
interrupted (on CPU; CUDA kernels may differ in the last bits).

Data-parallel training (torchrun, :mod:`mail_ros.train.distributed`): ``train.batch_size`` is the
global batch; each rank computes the loss of its contiguous share of every global batch, DDP
averages the gradients, and rank 0 alone writes the run folder. Ctrl-C (SIGINT, or the SIGTERM
torchrun forwards) asks every rank to stop after the step in progress, agreed in the step's
all-reduce, so the ranks stop together and last/ is saved.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler

from mail_ros.data.dataset import DemoWindows, EmbeddingCache, compute_stats, split_episodes
from mail_ros.data.hdf5 import UNDECLARED_ACTION_SPACE, DataError, DemoSet, Episode, fingerprint_hdf5, read_hdf5
from mail_ros.policy.action_frame import ActionFrame
from mail_ros.policy.checkpoint import load_checkpoint, save_checkpoint
from mail_ros.policy.config import ConfigError, PolicyConfig, check, check_bool, check_float, check_int
from mail_ros.policy.mail_policy import MaILPolicy
from mail_ros.policy.normalizer import STD_FLOOR
from mail_ros.policy.presets import get_preset
from mail_ros.train.distributed import SINGLE, Distributed, all_mean, all_sum

__all__ = [
    "TrainConfig",
    "DataConfig",
    "RunConfig",
    "TrainError",
    "Trainer",
    "TrainSummary",
    "load_run_config",
    "load_demos",
    "build_datasets",
    "Datasets",
    "EMA",
    "learning_rate",
    "RUN_OUTPUTS",
    "run_outputs",
    "remove_run_outputs",
    "write_resume_state",
    "read_resume_info",
    "load_resume_state",
    "check_same_data",
    "interrupt_on_terminate",
    "restore_handlers",
]

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.safetensors"
TRAINER_JSON = "trainer.json"
DEFAULT_EMBEDDING_CACHE = Path("~/.cache/mail_ros/embeddings")


LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")
# What a run writes into its folder; a new run refuses a folder holding any of them (unless told to replace).
RUN_OUTPUTS = ("best", "last", "log.csv", "summary.json", "tensorboard")


class TrainError(ValueError):
    """A training configuration or run folder is invalid, or the training diverged."""


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def interrupt_on_terminate() -> dict:
    """From now on SIGTERM stops a one-process training run the way Ctrl-C does (a KeyboardInterrupt:
    last/ saved at the completed step, ``--resume`` continues). It is the signal that reaches a run
    started in the background, by nohup or a job scheduler (systemd, SLURM's preemption): a
    non-interactive shell starts background jobs with SIGINT ignored. Returns the handlers to put
    back with :func:`restore_handlers` ({} outside the main thread, where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}


def restore_handlers(previous: dict) -> None:
    """Put back signal handlers as returned by :func:`interrupt_on_terminate`."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextmanager
def _as_train_error() -> Iterator[None]:
    """Report a failed field check of the policy config's helpers as a TrainError."""
    try:
        yield
    except ConfigError as exc:
        raise TrainError(str(exc)) from None


def learning_rate(step: int, total_steps: int, lr: float, schedule: str, warmup_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    A pure function of the step, so a resumed run follows the same curve as an uninterrupted one.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the MaIL reference, except the step budget)."""

    steps: int | None = None  # total optimizer steps; exactly one of steps / epochs
    epochs: float | None = None
    batch_size: int = 256
    lr: float = 5e-4  # Adam, no weight decay, no clipping (reference)
    lr_schedule: str = "constant"  # constant (reference) | cosine: decay to 0 at the last step
    warmup_steps: int = 0  # linear ramp from 0 to lr over the first steps (either schedule)
    ema: bool | None = None  # None: on for DDPM, off for BC
    ema_decay: float = 0.995
    val_every: int = 500  # steps between validations (and best/ updates)
    log_every: int = 50
    checkpoint_every: int = 1000  # steps between last/ saves
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # bf16: the forward pass under torch.autocast (bfloat16 matmuls and convolutions, float32
    # weights, optimizer and EMA); for GPUs with bf16 units. fp32: no autocast.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        with _as_train_error():
            check((self.steps is None) != (self.epochs is None),
                   f"set exactly one of train.steps and train.epochs, got steps={self.steps!r} epochs={self.epochs!r}")
            if self.steps is not None:
                check_int(self.steps, "train.steps", 1)
            if self.epochs is not None:
                check_float(self.epochs, "train.epochs")
                check(self.epochs > 0, f"train.epochs must be positive, got {self.epochs!r}")
            for name in ("batch_size", "val_every", "log_every", "checkpoint_every"):
                check_int(getattr(self, name), f"train.{name}", 1)
            check_float(self.lr, "train.lr")
            check(self.lr > 0, f"train.lr must be positive, got {self.lr!r}")
            check(self.lr_schedule in LR_SCHEDULES, f"train.lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
            check_int(self.warmup_steps, "train.warmup_steps", 0)
            if self.ema is not None:
                check_bool(self.ema, "train.ema")
            check_float(self.ema_decay, "train.ema_decay")
            check(0.0 < self.ema_decay < 1.0, f"train.ema_decay must be in (0, 1), got {self.ema_decay!r}")
            check_int(self.num_workers, "train.num_workers", 0)
            check_int(self.seed, "train.seed", 0)
            check(self.seed < 2**64, f"train.seed must be below 2**64 (torch's seed range), got {self.seed!r}")
            check(isinstance(self.device, str) and (self.device == "auto" or _is_device(self.device)),
                   f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
            check(self.precision in PRECISIONS, f"train.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        # NumPy numbers pass the checks but not json.dumps (trainer.json).
        for name in ("batch_size", "val_every", "log_every", "checkpoint_every", "warmup_steps", "num_workers", "seed"):
            setattr(self, name, int(getattr(self, name)))
        self.steps = None if self.steps is None else int(self.steps)
        self.epochs = None if self.epochs is None else float(self.epochs)
        self.lr, self.ema_decay = float(self.lr), float(self.ema_decay)


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


@dataclass
class DataConfig:
    """How demo files become training samples."""

    camera_map: dict[str, str] = field(default_factory=dict)  # file camera -> policy camera
    val_fraction: float = 0.1  # of episodes, seeded by train.seed
    augment_shift: int = 0  # random-shift augmentation in pixels (training split only)
    embedding_cache: str | None = str(DEFAULT_EMBEDDING_CACHE)  # None: no on-disk cache
    # Images stay in the HDF5 files and DataLoader workers read each window's frames (memory does
    # not grow with the dataset); false loads every image into memory up front.
    lazy_images: bool = True

    def __post_init__(self) -> None:
        with _as_train_error():
            check(isinstance(self.camera_map, dict)
                   and all(isinstance(name, str) and name for item in self.camera_map.items() for name in item),
                   f"data.camera_map must map file camera names to policy camera names (strings), got {self.camera_map!r}")
            check_float(self.val_fraction, "data.val_fraction")
            check(0.0 <= self.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {self.val_fraction!r}")
            check_int(self.augment_shift, "data.augment_shift", 0)
            check_bool(self.lazy_images, "data.lazy_images")
            check(self.embedding_cache is None or (isinstance(self.embedding_cache, str) and self.embedding_cache != ""),
                   f"data.embedding_cache must be a folder name or null, got {self.embedding_cache!r}")
        self.val_fraction, self.augment_shift = float(self.val_fraction), int(self.augment_shift)


@dataclass
class RunConfig:
    """Everything a run is made of: the policy, the data handling and the optimisation."""

    policy: PolicyConfig
    data: DataConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "data": asdict(self.data), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """Rebuild a saved run config (``trainer.json``'s ``run``); anything malformed is a TrainError."""
        try:
            return cls(PolicyConfig.from_dict(data["policy"]), _dataclass(DataConfig, data["data"], "data"),
                       _dataclass(TrainConfig, data["train"], "train"))
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise TrainError(f"invalid saved run config: {detail}") from exc


def _dataclass(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise TrainError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TrainError(f"{where} has unknown keys {unknown}; known: {sorted(known)}")
    return cls(**data)


def read_run_yaml(path: Path) -> dict[str, Any]:
    """A training YAML as a mapping of preset, policy, data and train (nothing else)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TrainError(f"{path}: cannot read training config: {exc}") from exc
    if not isinstance(raw, dict):
        raise TrainError(f"{path}: a training config is a mapping with preset/policy/data/train")
    unknown = sorted(set(raw) - {"preset", "policy", "data", "train"})
    if unknown:
        raise TrainError(f"{path}: unknown top-level keys {unknown}; known: preset, policy, data, train")
    return raw


def split_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, dict]]:
    """(policy overrides, {"data": ..., "train": ...}) of a training YAML with ``overrides``
    ({"train.steps": 5, "policy.x": 1}) on top."""
    policy_overrides = dict(raw.get("policy") or {})
    sections = {"data": dict(raw.get("data") or {}), "train": dict(raw.get("train") or {})}
    for key, value in (overrides or {}).items():
        group, _, name = key.partition(".")
        if group == "policy":
            policy_overrides[name] = value
        elif group in sections and name:
            sections[group][name] = value
        else:
            raise TrainError(f"override {key!r} must start with policy., data. or train.")
    return policy_overrides, sections


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a training YAML: ``preset``, ``policy`` (dotted overrides), ``data``, ``train``.

    ``overrides`` ({"train.steps": 100, "policy.head.kind": "bc", ...}) apply on top.
    """
    path = Path(path)
    raw = read_run_yaml(path)
    if "preset" not in raw:
        raise TrainError(f"{path}: 'preset' is required (e.g. demo-d_ma-ddpm; see mail_ros.policy.presets)")
    policy_overrides, sections = split_overrides(raw, overrides)
    try:
        policy = get_preset(raw["preset"], policy_overrides)
        return RunConfig(policy, _dataclass(DataConfig, sections["data"], f"{path}: data"),
                         _dataclass(TrainConfig, sections["train"], f"{path}: train"))
    except (TypeError, ValueError) as exc:
        raise TrainError(f"{path}: {exc}") from exc


def load_demos(paths: Sequence[str | Path], policy: PolicyConfig, camera_map: dict[str, str],
               lazy: bool = False) -> list[Episode]:
    """Read demo files and check them against the policy's spec (cameras, sizes, names, rate, action space).

    ``lazy``: images stay on disk (:class:`~mail_ros.data.hdf5.LazyFrames`), see ``data.lazy_images``.

    A file given twice (the same resolved path) is refused: the episode split would put copies of
    its episodes in both training and validation.
    """
    if not paths:
        raise DataError("no demo files given")
    seen: dict[Path, str | Path] = {}
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            raise DataError(f"{resolved} is given twice (as {seen[resolved]} and {path}); that would put copies "
                            "of its episodes in both the training and the validation split")
        seen[resolved] = path
    spec = policy.spec
    episodes = []
    for path in paths:
        demos = read_hdf5(path, camera_map, cameras=spec.observation.cameras, lazy=lazy)
        _check_compatible(demos, policy)
        episodes.extend(demos.episodes)
    return episodes


def _check_compatible(demos: DemoSet, policy: PolicyConfig) -> None:
    obs, action = policy.spec.observation, policy.spec.action
    where = demos.source
    if demos.action_space == UNDECLARED_ACTION_SPACE:
        log.warning("%s does not declare its action space (robomimic/LIBERO); its actions are taken as the policy's %r "
                    "on the strength of their names and count", where, action.action_space)
    elif demos.action_space != action.action_space:
        raise DataError(
            f"{where}: the actions are {demos.action_space!r} but the policy's are {action.action_space!r}; convert the "
            f"data to {action.action_space!r} (only files that declare no action space, robomimic/LIBERO, read as "
            f"{UNDECLARED_ACTION_SPACE!r}, are accepted on the strength of their action names and count)"
        )
    size = demos.episodes[0].image_size
    if size != tuple(obs.image_size):
        raise DataError(
            f"{where}: images are {size[0]}x{size[1]} but the policy expects {obs.image_size[0]}x{obs.image_size[1]} "
            "(reconvert with --image-size, or override spec.observation.image_size)"
        )
    for what, names, expected in (("joint", demos.joint_names, obs.joint_names), ("action", demos.action_names, action.names)):
        if len(names) != len(expected):
            raise DataError(f"{where}: {len(names)} {what} values {list(names)}, the policy expects {len(expected)} {list(expected)}")
        generic = all(n == f"{what}_{i}" for i, n in enumerate(names))
        if not generic and tuple(names) != tuple(expected):
            raise DataError(f"{where}: {what} names {list(names)} differ from the policy's {list(expected)}")
    if not math.isclose(demos.rate_hz, obs.rate_hz, rel_tol=1e-6):
        raise DataError(
            f"{where}: recorded at {demos.rate_hz} Hz but the policy runs at {obs.rate_hz} Hz "
            "(override spec.observation.rate_hz and spec.action.dt, or reconvert with --rate)"
        )


@dataclass
class Datasets:
    """The training and validation windows of one run, the statistics and the episode split."""

    train: DemoWindows
    val: DemoWindows | None
    stats: dict[str, dict[str, np.ndarray]]
    train_episodes: list[int]
    val_episodes: list[int]


def build_datasets(episodes: list[Episode], run: RunConfig, language_loader: Callable[[str], object] | None = None) -> Datasets:
    """Split by episode, compute statistics on the training split, embed instructions once.

    Episodes shorter than one window (T + A - 1 frames) are dropped with a warning before the
    split, so that whether a split ends up without windows does not depend on the seed.
    ``train_episodes`` / ``val_episodes`` index ``episodes``.
    """
    policy, data = run.policy, run.data
    T, A = policy.spec.observation.obs_horizon, policy.spec.action.horizon
    span = T + A - 1
    usable = [i for i, ep in enumerate(episodes) if len(ep) >= span]
    short = [f"{ep.source} ({len(ep)} frames)" for ep in episodes if len(ep) < span]
    if not usable:
        raise DataError(f"no episode is long enough for one window of T + A - 1 = {span} frames: " + ", ".join(short))
    if short:
        log.warning("dropping %d episode(s) shorter than one window (%d frames) before the split: %s",
                    len(short), span, ", ".join(short))
    train_split, val_split = split_episodes(len(usable), data.val_fraction, run.train.seed)
    train_idx, val_idx = [usable[i] for i in train_split], [usable[i] for i in val_split]
    train_eps = [episodes[i] for i in train_idx]
    val_eps = [episodes[i] for i in val_idx]
    language = None
    if policy.language.enabled:
        from mail_ros.language.encoders import load_text_encoder

        cache = EmbeddingCache(os.path.expanduser(data.embedding_cache) if data.embedding_cache else None)
        texts = [ep.instruction for ep in train_eps + val_eps]
        loader = language_loader or load_text_encoder
        language = cache.embeddings(policy.language.encoder, texts, loader)
        dim = len(next(iter(language.values())))
        if dim != policy.language.dim:
            raise TrainError(f"text encoder {policy.language.encoder!r} gives {dim}-d embeddings, policy language.dim is {policy.language.dim}")
    cameras = policy.spec.observation.cameras
    train = DemoWindows(train_eps, cameras, T, A, language, augment_shift=data.augment_shift, seed=run.train.seed)
    val = DemoWindows(val_eps, cameras, T, A, language, split="validation") if val_eps else None
    return Datasets(train, val, compute_stats(train, ActionFrame.of(policy)), train_idx, val_idx)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one epoch from a seeded permutation, starting at batch ``skip``; drops the last partial batch.

    Under DDP each rank takes its contiguous share (``batch_size / world_size`` samples) of every
    global batch: the ranks together see exactly the batches one process would, every epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, skip: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.epoch, self.skip = n, batch_size, seed, epoch, skip
        self.rank, self.world_size = rank, world_size

    @staticmethod
    def batches_per_epoch(n: int, batch_size: int) -> int:
        return max(1, n // batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch(self.n, self.batch_size) - self.skip

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        size = min(self.batch_size, self.n)
        share = size // self.world_size
        for b in range(self.skip, self.batches_per_epoch(self.n, self.batch_size)):
            batch = order[b * size : (b + 1) * size]
            yield batch[self.rank * share : (self.rank + 1) * share].tolist()


class EMA:
    """Exponential moving average of a model's weights, decay min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, n: int) -> None:
        """Fold in ``model`` after its ``n``-th optimizer step (n counts from 0)."""
        decay = min(self.decay, (1 + n) / (10 + n))
        for avg, new in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(new, 1.0 - decay)
        for avg, new in zip(self.model.buffers(), model.buffers()):
            avg.copy_(new)


@dataclass
class TrainSummary:
    """What a run did; also written to ``summary.json`` in the run folder."""

    step: int
    epoch: int
    interrupted: bool
    best_val_loss: float | None
    last_val_loss: float | None
    last_train_loss: float | None
    mean_predictor_val_loss: float | None  # BC only: the loss of always predicting the mean action
    train_samples: int
    val_samples: int
    seconds: float
    samples_per_second: float
    out: str


def resolve_device(name: str, ctx: Distributed = SINGLE) -> torch.device:
    """``train.device`` as a torch device; under DDP a CUDA device is this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if ctx.enabled and name.startswith("cuda"):
        name = f"cuda:{ctx.local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} requested but CUDA is not available")
    return device


def _to_device(batch: dict, device: torch.device) -> dict:
    moved = {key: value.to(device, non_blocking=True) for key, value in batch.items() if key != "images"}
    moved["images"] = {cam: img.to(device, non_blocking=True) for cam, img in batch["images"].items()}
    return moved


def _step_seed(seed: int, step: int, rank: int = 0) -> int:
    return int(np.random.default_rng([seed, step] + ([rank] if rank else [])).integers(2**62))


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader worker init under DDP: torchrun stops a rank by signalling its process group,
    workers included; a worker killed by it would crash the rank before it saves. The rank stops
    its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _Loss(torch.nn.Module):
    """The policy's training loss as a forward(): DistributedDataParallel synchronises gradients
    of what runs through its wrapped module's forward, and compute_loss is not a forward."""

    def __init__(self, policy: MaILPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.policy.compute_loss(batch)


class Trainer:
    """Trains one policy on prepared datasets into a run folder.

    ``callbacks`` are called as ``callback(trainer, step, metrics)`` after every optimizer step
    (``step`` counts completed steps); raising KeyboardInterrupt from one stops the run the way
    Ctrl-C does (last/ saved, summary returned with ``interrupted=True``). ``data_files`` are
    fingerprinted (:func:`fingerprint_hdf5`) so that a resume can refuse different data.
    ``dist``: this process's rank in a torchrun job (:func:`mail_ros.train.distributed.init_from_env`).
    """

    def __init__(
        self,
        run: RunConfig,
        datasets: Datasets,
        out: str | Path,
        data_files: Sequence[str] = (),
        callbacks: Sequence[Callable[["Trainer", int, dict], None]] = (),
        progress: bool = True,
        dist: Distributed = SINGLE,
    ) -> None:
        self.run = run
        self.cfg = run.train
        self.dist = dist
        if self.cfg.batch_size % dist.world_size:
            raise TrainError(f"train.batch_size {self.cfg.batch_size} (the global batch) must be a multiple of the "
                             f"{dist.world_size} processes")
        self.data = datasets
        self.out = Path(out)
        self.data_files = [str(p) for p in data_files]
        self.data_fingerprints = [fingerprint_hdf5(p) for p in self.data_files]
        self.callbacks = list(callbacks)
        self.progress = progress and dist.is_main
        self.device = resolve_device(self.cfg.device, dist)
        torch.manual_seed(self.cfg.seed)
        self.policy = MaILPolicy(run.policy)
        self.policy.set_normalization(
            datasets.stats["actions"], datasets.stats["joint_positions"], datasets.stats.get("language")
        )
        self.policy.to(self.device).train()
        self.model: torch.nn.Module = _Loss(self.policy)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        self._stop_requested = False
        self._worker_init = _worker_ignores_stop_signals if dist.enabled else None
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.cfg.lr)
        use_ema = self.cfg.ema if self.cfg.ema is not None else run.policy.head.kind == "ddpm"
        self.ema = EMA(self.policy, self.cfg.ema_decay) if use_ema else None
        self.batches_per_epoch = EpochBatchSampler.batches_per_epoch(len(datasets.train), self.cfg.batch_size)
        if self.cfg.steps is not None:
            self.total_steps = self.cfg.steps
        else:
            self.total_steps = max(1, math.ceil(self.cfg.epochs * self.batches_per_epoch))
        self.step = 0
        self.best_val_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_train_loss: float | None = None

    # ------------------------------------------------------------------ state

    @property
    def eval_policy(self) -> MaILPolicy:
        """The weights that are validated and saved: the EMA copy when EMA is on."""
        return self.ema.model if self.ema is not None else self.policy

    @property
    def epoch(self) -> int:
        return self.step // self.batches_per_epoch

    def _save(self, name: str, with_state: bool) -> Path | None:
        if not self.dist.is_main:
            return None
        extra = {"val_loss": self.last_val_loss, "train_loss": self.last_train_loss, "ema": self.ema is not None,
                 "data_files": self.data_files}
        return save_checkpoint(self.out / name, self.eval_policy, step=self.step, epoch=self.epoch, extra=extra,
                               write_files=self._write_state if with_state else None)

    def _write_state(self, folder: Path) -> None:
        """Write what resuming needs into ``folder``, the checkpoint's temporary folder before its swap."""
        info = {
            "step": self.step,
            "epoch": self.epoch,
            "total_steps": self.total_steps,
            "seed": self.cfg.seed,
            "batches_per_epoch": self.batches_per_epoch,
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "run": self.run.to_dict(),
            "data_files": self.data_files,
            "data_fingerprints": self.data_fingerprints,
            "train_episodes": self.data.train_episodes,
            "val_episodes": self.data.val_episodes,
        }
        write_resume_state(folder, self.policy, self.optimizer, info)

    def load_state(self, run_dir: str | Path) -> None:
        """Continue the run saved in ``run_dir/last`` (same step counter, optimizer state, EMA)."""
        last = Path(run_dir) / "last"
        info = read_resume_info(last)
        saved = RunConfig.from_dict(info["run"])
        if saved.policy.to_dict() != self.run.policy.to_dict():
            raise TrainError(f"{last}: the policy config differs from this run's; resume with the same config")
        check_same_data(last, info, self.data_files, self.data_fingerprints)
        if info["train_episodes"] != self.data.train_episodes:
            raise TrainError(f"{last}: the training split differs (different data files or seed)")
        load_resume_state(last, self.policy, self.optimizer)
        if self.ema is not None:
            self.ema.model.load_state_dict(load_checkpoint(last, device="cpu").state_dict())
        self.step = int(info["step"])
        self.best_val_loss = info["best_val_loss"]
        self.last_val_loss = info["last_val_loss"]
        log.info("resuming %s at step %d (epoch %d)", run_dir, self.step, self.epoch)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss over the validation windows with fixed noise (comparable across calls)."""
        if self.data.val is None:
            return None
        policy = self.eval_policy
        was_training = policy.training
        policy.eval()
        total, count = 0.0, 0
        # Under DDP each rank takes every world_size-th window; the sums are added over ranks.
        windows = self.data.val
        if self.dist.enabled:
            windows = torch.utils.data.Subset(windows, range(self.dist.rank, len(windows), self.dist.world_size))
        batch_size = max(1, self.cfg.batch_size // self.dist.world_size)
        loader = DataLoader(windows, batch_size=batch_size, shuffle=False, num_workers=self.cfg.num_workers,
                            worker_init_fn=self._worker_init)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.cfg.seed)
            for batch in loader:
                with self._autocast():
                    loss, _ = policy.compute_loss(_to_device(batch, self.device))
                n = len(batch["actions"])
                total += loss.item() * n
                count += n
        policy.train(was_training)
        total, count = all_sum(self.dist, [total, count], self.device)
        return total / count

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def mean_predictor_loss(self) -> float | None:
        """Validation loss of always predicting the training mean (BC: z-scored MSE); None for DDPM."""
        if self.data.val is None or self.run.policy.head.kind != "bc":
            return None
        stats = self.data.stats["actions"]
        std = np.maximum(stats["std"], STD_FLOOR)
        val = self.data.val
        targets = ActionFrame.of(self.run.policy).to_network(val.target_actions(), val.current_joint_positions())
        return float(np.mean(((targets - stats["mean"]) / std) ** 2))

    # ------------------------------------------------------------------ loop

    def fit(self) -> TrainSummary:
        """Train up to ``total_steps``; Ctrl-C or SIGTERM saves last/ and returns with ``interrupted=True``."""
        from tqdm import tqdm

        csv_file, writer, tb = self._open_logs()
        log.info("training %s (%s) on %s: %d parameters, %d train / %d val windows, %d steps",
                 self.run.policy.variant, self.run.policy.head.kind, self.device, self.policy.num_parameters()["total"],
                 len(self.data.train), len(self.data.val) if self.data.val else 0, self.total_steps)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, dynamic_ncols=True, desc="train")
        start = time.perf_counter()
        start_step = self.step
        interrupted = False
        window_loss, window_n, data_s, compute_s, window_start = 0.0, 0, 0.0, 0.0, time.perf_counter()
        previous_handlers = self._catch_stop_signals()
        try:
            while self.step < self.total_steps:
                epoch = self.epoch
                self.data.train.epoch = epoch
                sampler = EpochBatchSampler(len(self.data.train), self.cfg.batch_size, self.cfg.seed, epoch,
                                            skip=self.step % self.batches_per_epoch, rank=self.dist.rank,
                                            world_size=self.dist.world_size)
                loader = DataLoader(self.data.train, batch_sampler=sampler, num_workers=self.cfg.num_workers,
                                    pin_memory=self.device.type == "cuda", worker_init_fn=self._worker_init)
                fetch = time.perf_counter()
                for batch in loader:
                    t0 = time.perf_counter()
                    data_s += t0 - fetch
                    torch.manual_seed(_step_seed(self.cfg.seed, self.step, self.dist.rank))
                    lr = learning_rate(self.step, self.total_steps, self.cfg.lr, self.cfg.lr_schedule,
                                       self.cfg.warmup_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    with self._autocast():
                        loss, metrics = self.model(_to_device(batch, self.device))
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    if self.ema is not None:
                        self.ema.update(self.policy, self.step)
                    self.step += 1
                    # One all-reduce: the global batch's loss, and whether any rank was asked to stop.
                    value, stop = all_mean(self.dist, [loss.item(), float(self._stop_requested)], self.device)
                    if not math.isfinite(value):
                        raise self._diverged(f"loss {value}")
                    fetch = time.perf_counter()
                    compute_s += fetch - t0
                    window_loss += value
                    window_n += 1
                    bar.update(1)
                    if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                        self.last_train_loss = window_loss / window_n
                        elapsed = time.perf_counter() - window_start
                        rate = window_n * self.cfg.batch_size / elapsed
                        val = None
                        if self.step % self.cfg.val_every == 0 or self.step == self.total_steps:
                            val = self._validate_and_keep_best()
                        if writer is not None:
                            writer.writerow([self.step, self.epoch, f"{self.last_train_loss:.6g}", "" if val is None else f"{val:.6g}",
                                         f"{lr:.6g}", f"{rate:.1f}", f"{data_s:.3f}", f"{compute_s:.3f}",
                                         f"{time.perf_counter() - start:.1f}"])
                            csv_file.flush()
                            tb.add_scalar("train/loss", self.last_train_loss, self.step)
                            tb.add_scalar("train/samples_per_s", rate, self.step)
                            tb.add_scalar("train/lr", lr, self.step)
                            if val is not None:
                                tb.add_scalar("val/loss", val, self.step)
                        bar.set_postfix(loss=f"{self.last_train_loss:.4f}",
                                        val="-" if self.last_val_loss is None else f"{self.last_val_loss:.4f}")
                        window_loss, window_n, data_s, compute_s, window_start = 0.0, 0, 0.0, 0.0, time.perf_counter()
                    elif self.step % self.cfg.val_every == 0:
                        self._validate_and_keep_best()
                    if self.step % self.cfg.checkpoint_every == 0:
                        self._save("last", with_state=True)
                    for callback in self.callbacks:
                        callback(self, self.step, metrics)
                    if stop:
                        raise KeyboardInterrupt
                    if self.step >= self.total_steps:
                        break
        except KeyboardInterrupt:
            interrupted = True
            if self.dist.is_main:
                log.warning("interrupted at step %d: saving %s", self.step, self.out / "last")
        finally:
            restore_handlers(previous_handlers)
            bar.close()
            if csv_file is not None:
                tb.close()
                csv_file.close()
        self._save("last", with_state=True)
        seconds = time.perf_counter() - start
        summary = TrainSummary(
            step=self.step,
            epoch=self.epoch,
            interrupted=interrupted,
            best_val_loss=self.best_val_loss,
            last_val_loss=self.last_val_loss,
            last_train_loss=self.last_train_loss,
            mean_predictor_val_loss=self.mean_predictor_loss(),
            train_samples=len(self.data.train),
            val_samples=len(self.data.val) if self.data.val else 0,
            seconds=seconds,
            samples_per_second=(self.step - start_step) * self.cfg.batch_size / max(seconds, 1e-9),
            out=str(self.out),
        )
        if self.dist.is_main:
            (self.out / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
        return summary

    def _open_logs(self):
        """(csv file, csv writer, TensorBoard writer) on rank 0; (None, None, None) on the other ranks."""
        if not self.dist.is_main:
            return None, None, None
        from torch.utils.tensorboard import SummaryWriter

        self.out.mkdir(parents=True, exist_ok=True)
        csv_path = self.out / "log.csv"
        new_csv = not csv_path.exists()
        csv_file = open(csv_path, "a", newline="")
        writer = csv.writer(csv_file)
        if new_csv:
            writer.writerow(["step", "epoch", "train_loss", "val_loss", "lr", "samples_per_s", "data_s", "compute_s", "elapsed_s"])
        return csv_file, writer, SummaryWriter(str(self.out / "tensorboard"))

    def _catch_stop_signals(self) -> dict:
        """Under DDP, SIGINT/SIGTERM only ask to stop; the ranks agree on it in the next step's all-reduce.

        A KeyboardInterrupt raised wherever a signal lands could leave one rank inside a collective
        the others have left. One process keeps Python's KeyboardInterrupt for SIGINT and gets one
        for SIGTERM too (:func:`interrupt_on_terminate`). Returns the handlers to put back.
        """
        if not self.dist.enabled:
            return interrupt_on_terminate()

        def request_stop(signum, frame) -> None:
            self._stop_requested = True

        return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _validate_and_keep_best(self) -> float | None:
        val = self.validate()
        if val is None:
            return None
        if not math.isfinite(val):
            raise self._diverged(f"validation loss {val}")
        self.last_val_loss = val
        if self.best_val_loss is None or val < self.best_val_loss:
            self.best_val_loss = val
            self._save("best", with_state=False)
        return val

    def _diverged(self, what: str) -> TrainError:
        # Raised before any save, so best/ and last/ keep the last finite weights.
        return TrainError(f"training diverged at step {self.step}: {what}; nothing was saved, the checkpoints in "
                          f"{self.out} are those of earlier steps (lower train.lr, or check the data)")


def run_outputs(out: str | Path) -> list[str]:
    """The names of :data:`RUN_OUTPUTS` present in ``out``: a run lives there."""
    return [name for name in RUN_OUTPUTS if (Path(out) / name).exists()]


def remove_run_outputs(out: str | Path) -> None:
    """Delete a previous run's :data:`RUN_OUTPUTS` from ``out``, to start a new run in its place."""
    for name in run_outputs(out):
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


# --- resume state: one format for the MaIL and the ICIL trainer ---------------------------------


def write_resume_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       info: dict[str, Any]) -> None:
    """Write :data:`STATE_FILE` (``model``'s raw weights and the optimizer's state) and
    :data:`TRAINER_JSON` (``info``: step, configs, data files ...) into ``folder``, a checkpoint's
    temporary folder before its swap (``save_checkpoint(write_files=...)``)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for index, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
    save_file(tensors, str(folder / STATE_FILE), metadata={"param_groups": json.dumps(state["param_groups"])})
    (folder / TRAINER_JSON).write_text(json.dumps(info, indent=2, allow_nan=False))


def read_resume_info(last: Path) -> dict[str, Any]:
    """The :data:`TRAINER_JSON` of the checkpoint ``last``; a TrainError when it holds no resume state."""
    info_path, state_path = last / TRAINER_JSON, last / STATE_FILE
    if not info_path.is_file() or not state_path.is_file():
        raise TrainError(f"{last} holds no resumable state ({TRAINER_JSON} and {STATE_FILE} expected)")
    return json.loads(info_path.read_text())


def load_resume_state(last: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put the weights and optimizer state that :func:`write_resume_state` saved in ``last`` back."""
    state_path = last / STATE_FILE
    tensors = load_file(str(state_path))
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    groups = json.loads(_safetensors_metadata(state_path)["param_groups"])
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    except ValueError as exc:  # another set of trainable parameters (e.g. saved by an older version)
        raise TrainError(f"{last}: the saved optimizer state does not fit the parameters this run trains: {exc}") from exc


def check_same_data(last: Path, info: dict[str, Any], data_files: Sequence[str], fingerprints: Sequence[str]) -> None:
    """Refuse to resume the run saved in ``last`` on other data than its own (TrainError)."""
    saved_files, saved = info["data_files"], info.get("data_fingerprints")
    if saved is None:
        log.warning("%s was saved without data fingerprints (an older mail_ros); cannot check that %s are its data",
                    last, list(data_files))
        return
    if len(saved) != len(fingerprints):
        raise TrainError(f"{last}: the run was trained on {len(saved)} data file(s) {saved_files}, "
                         f"got {len(data_files)} {list(data_files)}; resume with the run's data")
    differ = [f"{new} is not {old}" for new, old, print_new, print_old
              in zip(data_files, saved_files, fingerprints, saved) if print_new != print_old]
    if differ:
        raise TrainError(f"{last}: the demo data differ from the run's ({'; '.join(differ)}: other actions, "
                         f"joint states, timestamps or instructions); resume with the data files {saved_files}")
