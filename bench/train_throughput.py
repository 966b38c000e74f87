"""Training throughput on CPU per variant (d_ma, ed_ma, d_tr, ed_tr) and head (bc, ddpm).

Synthetic episodes at the preset's image size go through the real DemoWindows + DataLoader
(data time: waiting for the next batch) and MaILPolicy.compute_loss + backward + Adam step
(compute time), median per step. Prints one table row per preset.

    PYTHONPATH=. .venv/bin/python bench/train_throughput.py --size tiny demo --batch 32 --steps 10
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from mail_ros.data.dataset import DemoWindows
from mail_ros.data.hdf5 import Episode
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
