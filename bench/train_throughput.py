"""Training throughput on CPU: per variant and head, or per dataset size, in memory vs lazy (HDF5).

Per preset (the default): synthetic episodes at the preset's image size go through the real
DemoWindows + DataLoader (data time: waiting for the next batch) and MaILPolicy.compute_loss +
backward + Adam step (compute time), median per step. One table row per preset.

    PYTHONPATH=. .venv/bin/python bench/train_throughput.py --size tiny demo --batch 32 --steps 10

Per dataset size (``--datasets``): synthetic demo files of 1x, 4x and 16x a base set (default the
shipped demo policy's data: 720 episodes of 79 frames, two 64x64 cameras; ``--base-episodes``
shrinks it), written by the real DemoWriter (per-frame chunks, gzip), each trained on with the
shipped demo policy's network (config/train_sim_demo.yaml, language off) through the trainer's
loader (EpochBatchSampler, DataLoader workers): images loaded into memory up front vs read lazily
from the file. Every (size, mode) loads in a fresh process, which reports its peak RSS and that of
its largest DataLoader worker, and how fast the DataLoader alone delivers samples. Training
throughput is measured on the 1x set with memory-fed and lazily fed steps alternating in one
process, so that both see the same machine load (reported as samples/s and their ratio).

    PYTHONPATH=. .venv/bin/python bench/train_throughput.py --datasets --base-episodes 90
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mail_ros.data.dataset import DemoWindows
from mail_ros.data.hdf5 import DemoWriter, Episode, read_hdf5
from mail_ros.policy.config import VARIANTS
from mail_ros.policy.mail_policy import MaILPolicy
from mail_ros.policy.presets import HEADS, get_preset


def episodes(config, count: int = 4, length: int = 60) -> list[Episode]:
    rng = np.random.default_rng(0)
    obs, action = config.spec.observation, config.spec.action
    return [
        Episode(
            images={c: rng.integers(0, 256, (length, *obs.image_size, 3), dtype=np.uint8) for c in obs.cameras},
            joint_positions=rng.normal(size=(length, len(obs.joint_names))),
            actions=rng.normal(size=(length, action.dim)),
            instruction="bench",
            timestamps=np.arange(length) / obs.rate_hz,
            source=f"synthetic{i}",
        )
        for i in range(count)
    ]


def measure(name: str, batch_size: int, steps: int, warmup: int = 2) -> dict[str, float]:
    config = get_preset(name)
    torch.manual_seed(0)
    policy = MaILPolicy(config).train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=5e-4)
    obs = config.spec.observation
    data = DemoWindows(episodes(config), obs.cameras, obs.obs_horizon, config.spec.action.horizon)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
    data_s, compute_s = [], []
    done = 0
    while done < warmup + steps:
        fetch = time.perf_counter()
        for batch in loader:
            start = time.perf_counter()
            loss, _ = policy.compute_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            end = time.perf_counter()
            if done >= warmup:
                data_s.append(start - fetch)
                compute_s.append(end - start)
            done += 1
            fetch = time.perf_counter()
            if done == warmup + steps:
                break
    # Medians: the machine may be shared, and a median shrugs off the odd stolen time slice.
    data, compute = float(np.median(data_s)), float(np.median(compute_s))
    return {
        "params": policy.num_parameters()["total"],
        "data_ms": 1e3 * data,
        "compute_ms": 1e3 * compute,
        "compute_sps": batch_size / compute,
        "total_sps": batch_size / (data + compute),
    }


# The shipped demo policy's network (config/train_sim_demo.yaml) without its language encoder.
DATASET_PRESET = "demo-d_ma-bc"
DATASET_OVERRIDES = {"spec.observation.image_size": [64, 64], "spec.observation.obs_horizon": 2,
                     "vision.resnet_stages": 2, "proprio": False, "relative_actions": True}
DEMO_EPISODES, DEMO_FRAMES = 720, 79  # checkpoints/demo: 720 demonstrations, 56777 frames


def scene_frames(config, length: int, seed: int) -> dict[str, np.ndarray]:
    """Camera frames that compress like rendered ones: flat table, shaded background, moving cubes."""
    rng = np.random.default_rng(seed)
    h, w = config.spec.observation.image_size
    frames = {}
    for c, cam in enumerate(config.spec.observation.cameras):
        base = np.empty((h, w, 3), np.uint8)
        base[:] = rng.integers(60, 200, 3)
        base[: h // 3] = np.linspace(90, 160, w, dtype=np.uint8)[None, :, None]
        video = np.repeat(base[None], length, axis=0)
        for cube in range(3):
            y, x = rng.integers(h // 3, h - 8), rng.integers(0, w - 8)
            vy, vx = rng.normal(0, 0.15, 2)
            colour = np.zeros(3, np.uint8)
            colour[cube] = 220
            for t in range(length):
                yy, xx = int(np.clip(y + vy * t, 0, h - 8)), int(np.clip(x + vx * t, 0, w - 8))
                video[t, yy : yy + 8, xx : xx + 8] = colour
        noise = rng.integers(-3, 4, video.shape)  # sensor noise: what keeps real frames from compressing away
        frames[cam] = np.clip(video.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return frames


def write_dataset(path: Path, config, episodes: int, length: int, pool: int = 16) -> None:
    """``episodes`` synthetic episodes; pixels cycle through ``pool`` distinct ones (writing cost)."""
    obs, action = config.spec.observation, config.spec.action
    scenes = [scene_frames(config, length, seed) for seed in range(pool)]
    rng = np.random.default_rng(0)
    with DemoWriter(path, obs.cameras, obs.joint_names, action.names, obs.rate_hz) as writer:
        for i in range(episodes):
            writer.add(Episode(
                images=scenes[i % pool],
                joint_positions=rng.normal(size=(length, len(obs.joint_names))),
                actions=rng.normal(size=(length, action.dim)),
                instruction="bench",
                timestamps=np.arange(length) / obs.rate_hz,
                source=f"synthetic{i}",
            ))


def _windows(config, path: Path, lazy: bool) -> DemoWindows:
    obs = config.spec.observation
    demos = read_hdf5(path, lazy=lazy)
    return DemoWindows(demos.episodes, obs.cameras, obs.obs_horizon, config.spec.action.horizon, augment_shift=2)


def _loader(data: DemoWindows, batch_size: int, workers: int, epoch: int = 0) -> DataLoader:
    from mail_ros.train.trainer import EpochBatchSampler  # the trainer's own batches

    sampler = EpochBatchSampler(len(data), batch_size, seed=0, epoch=epoch)
    return DataLoader(data, batch_sampler=sampler, num_workers=workers)


def measure_memory(path: Path, lazy: bool, batch_size: int, batches: int, workers: int) -> dict:
    """Load + DataLoader alone, in a fresh process: its peak RSS and its largest worker's."""
    config = get_preset(DATASET_PRESET, DATASET_OVERRIDES)
    start = time.perf_counter()
    data = _windows(config, path, lazy)
    load_s = time.perf_counter() - start
    it = iter(_loader(data, batch_size, workers))
    next(it)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    loader_sps = batches * batch_size / (time.perf_counter() - start)
    del it  # workers exit and are reaped: RUSAGE_CHILDREN covers them
    return {
        "frames": sum(len(ep) for ep in data.episodes),
        "load_s": load_s,
        "loader_sps": loader_sps,
        # ru_maxrss is in KiB on Linux
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def measure_training(path: Path, batch_size: int, steps: int, workers: int, warmup: int = 2) -> dict:
    """Training steps fed from memory and from the file, ALTERNATING in one process (one model).

    On a shared machine the load changes from second to second; alternating puts both modes under
    the same load, and the medians per step shrug off the odd stolen time slice.
    """
    config = get_preset(DATASET_PRESET, DATASET_OVERRIDES)
    torch.manual_seed(0)
    policy = MaILPolicy(config).train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=5e-4)
    loaders = {mode: iter(_loader(_windows(config, path, mode == "lazy"), batch_size, workers))
               for mode in ("memory", "lazy")}
    seconds: dict[str, list[float]] = {mode: [] for mode in loaders}
    for i in range(warmup + steps):
        for mode, it in loaders.items():
            start = time.perf_counter()
            loss, _ = policy.compute_loss(next(it))  # waiting for the batch counts
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= warmup:
                seconds[mode].append(time.perf_counter() - start)
    return {mode: batch_size / float(np.median(values)) for mode, values in seconds.items()}


def _child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def dataset_table(args: argparse.Namespace) -> None:
    config = get_preset(DATASET_PRESET, DATASET_OVERRIDES)
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="mail_ros_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    common = ["--batch", str(args.batch), "--workers", str(args.workers), "--threads", str(args.threads)]
    print(f"torch {torch.__version__}, {args.threads} CPU threads, {os.cpu_count()} cores, batch {args.batch}, "
          f"{args.workers} DataLoader workers; 1x = {args.base_episodes} episodes x {args.episode_frames} frames, "
          f"two 64x64 cameras (the demo set: {DEMO_EPISODES} x {DEMO_FRAMES})")
    print(f"\nMemory (fresh process per row; loader = DataLoader alone over {args.batches} batches):")
    header = (f"{'size':>4} {'frames':>8} {'file MiB':>9} {'mode':>7} {'load s':>7} {'loader sps':>11} "
              f"{'peak RSS MiB':>13} {'worker RSS MiB':>15}")
    print(header)
    print("-" * len(header))
    paths = {}
    for size in args.sizes:
        path = paths[size] = folder / f"synthetic_{size}x.hdf5"
        if not path.exists():
            write_dataset(path, config, size * args.base_episodes, args.episode_frames)
        for mode in ("memory", "lazy"):
            r = _child("--measure-memory", str(path), mode, "--batches", str(args.batches), *common)
            print(f"{size:>3}x {r['frames']:>8} {path.stat().st_size / 2**20:>9.0f} {mode:>7} {r['load_s']:>7.1f} "
                  f"{r['loader_sps']:>11.0f} {r['rss_mib']:>13.0f} {r['worker_rss_mib']:>15.0f}", flush=True)
    size = min(args.sizes)
    print(f"\nTraining ({DATASET_PRESET}, 64x64, T=2: the shipped demo network without language) on the {size}x set, "
          f"memory and lazy steps alternating, median of {args.steps} steps each:")
    r = _child("--measure-training", str(paths[size]), "--steps", str(args.steps), *common)
    print(f"in memory {r['memory']:.1f} samples/s, lazy {r['lazy']:.1f} samples/s: lazy / memory = "
          f"{r['lazy'] / r['memory']:.2f}")
    if not args.keep:
        for path in paths.values():
            path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", action="store_true", help="the dataset-size table (in memory vs lazy)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 16], help="--datasets: multiples of the base set")
    parser.add_argument("--base-episodes", type=int, default=DEMO_EPISODES, help="--datasets: episodes of the 1x set")
    parser.add_argument("--episode-frames", type=int, default=DEMO_FRAMES, help="--datasets: frames per episode")
    parser.add_argument("--workers", type=int, default=2, help="--datasets: DataLoader workers")
    parser.add_argument("--workdir", default=None, help="--datasets: where the synthetic files go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="--datasets: keep the synthetic files")
    parser.add_argument("--batches", type=int, default=30, help="--datasets: batches timed through the loader alone")
    parser.add_argument("--measure-memory", nargs=2, metavar=("FILE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-training", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--size", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        path, mode = args.measure_memory
        print(json.dumps(measure_memory(Path(path), mode == "lazy", args.batch, args.batches, args.workers)))
        return
    if args.measure_training:
        print(json.dumps(measure_training(Path(args.measure_training), args.batch, args.steps, args.workers)))
        return
    if args.datasets:
        dataset_table(args)
        return
    print(f"torch {torch.__version__}, {args.threads} CPU threads, batch {args.batch}, {args.steps} timed steps")
    header = f"{'preset':<20} {'params':>9} {'data ms':>8} {'compute ms':>11} {'compute sps':>12} {'total sps':>10}"
    print(header)
    print("-" * len(header))
    for size in args.size:
        for variant in args.variants:
            for head in args.heads:
                name = f"{size}-{variant}-{head}"
                r = measure(name, args.batch, args.steps)
                print(f"{name:<20} {r['params']:>9,} {r['data_ms']:>8.1f} {r['compute_ms']:>11.1f} "
                      f"{r['compute_sps']:>12.1f} {r['total_sps']:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
