"""Seconds per ICIL training step (loss, backward, Adam) for a training config, both twins.

A step is what mail_ros.train.icil_trainer runs after the frame features are cached: draw
``train.batch_size`` samples with the real ICILSampler (prompts of K in 1..k_max other
demonstrations of the task, dilated, cuts every ``data.cut_stride`` live frames), then
ICILPolicy.compute_loss, backward and an Adam step on the trainable parameters. The frame
features are random (the step's cost does not depend on their values), the episodes have the
test bed's length (56 frames by default: a 5.5 s pick at 10 Hz; the collected demonstrations
are 49 to 80 frames).

Columns:
  preset            the config's preset and its Transformer/Mamba twin (same settings)
  chunks, tokens    chunks predicted and stream tokens (prompt + live) per step, means
  step s, cpu s     median wall time and the thread's CPU time of one step (one torch thread
                    by default: on a shared machine the CPU time is the step's own compute)
  fwd s, bwd s      median CPU time of compute_loss and of backward + Adam
  tr/ma             this twin's CPU s / the Mamba twin's

The rows take turns step by step, so that load from other processes hits both alike.
Examples:
  PYTHONPATH=. .venv/bin/python bench/icil_train_step.py --steps 5
  PYTHONPATH=. .venv/bin/python bench/icil_train_step.py --config config/train_icil_demo.yaml --twins ma --steps 3
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import statistics
import sys
import time

from tables import print_table, write_json


def _twin(preset: str, twin: str) -> str:
    return preset.rsplit("-", 1)[0] + "-" + twin


def measure(args: argparse.Namespace) -> list[dict]:
    import numpy as np
    import torch

    from mail_ros.data.hdf5 import Episode
    from mail_ros.data.icil_data import ICILSampler
    from mail_ros.policy.icil_policy import ICILPolicy
    from mail_ros.policy.presets import get_icil_preset
    from mail_ros.train.icil_trainer import load_icil_run_config

    torch.set_num_threads(args.threads)
    run = load_icil_run_config(args.config)
    config, data, train = run.policy, run.data, run.train
    rng = np.random.default_rng(0)
    F = ICILPolicy(config).feature_dim  # what the frozen encoders give per frame
    J, Da = len(config.spec.observation.joint_names), config.spec.action.dim
    episodes, features, groups = [], [], {}
    for task in range(args.tasks):
        for _ in range(args.episodes_per_task):
            n = args.frames
            groups.setdefault(f"task {task}", []).append(len(episodes))
            episodes.append(Episode({"c": np.zeros((n, 1, 1, 3), np.uint8)}, rng.normal(size=(n, J)),
                                    rng.normal(size=(n, Da)), f"task {task}", 0.1 * np.arange(n)))
            features.append(rng.normal(size=(n, F)).astype(np.float32))
    policies, optimizers, rows = {}, {}, {}
    for twin in args.twins:
        name = _twin(run.preset, twin)
        torch.manual_seed(train.seed)
        # The config's settings with the twin's backbone (a twin differs in its backbone only).
        policy = policies[twin] = ICILPolicy(replace(config, backbone=get_icil_preset(name).backbone))
        policy.freeze_features()
        optimizers[twin] = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=train.lr)
        rows[twin] = {"preset": name, "step": [], "cpu": [], "fwd": [], "bwd": [], "chunks": [], "tokens": []}
    A = policies[args.twins[0]].A
    sampler = ICILSampler(episodes, features, groups, k_max=config.prompt.k_max, dilation=config.prompt.dilation,
                          action_horizon=A, cut_stride=data.cut_stride)

    for step in range(args.warmup + args.steps):
        batch_rng = np.random.default_rng([train.seed, step])
        live = batch_rng.choice(sampler.live, size=train.batch_size)
        batch = [sampler.sample(int(index), batch_rng) for index in live]
        tokens = sum(sum(2 * len(p[0]) + 1 for p in s.prompt) + len(s.live_features) for s in batch)
        order = args.twins if step % 2 == 0 else args.twins[::-1]
        for twin in order:
            policy, optimizer = policies[twin], optimizers[twin]
            policy.train()
            policy.encoder.eval()
            wall, cpu = time.perf_counter(), time.thread_time()
            loss, info = policy.compute_loss(batch)
            forward = time.thread_time() - cpu
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            row = rows[twin]
            if step >= args.warmup:
                row["step"].append(time.perf_counter() - wall)
                row["cpu"].append(time.thread_time() - cpu)
                row["fwd"].append(forward)
                row["bwd"].append(row["cpu"][-1] - forward)
                row["chunks"].append(info["chunks"])
                row["tokens"].append(tokens)
            print(f"  {twin} step {step}: {time.perf_counter() - wall:.2f} s, loss {info['loss']:.4f}",
                  file=sys.stderr, flush=True)
    out = []
    for twin in args.twins:
        row = rows[twin]
        out.append({
            "preset": row["preset"],
            "batch": train.batch_size,
            "chunks": statistics.mean(row["chunks"]),
            "tokens": statistics.mean(row["tokens"]),
            "step_s": statistics.median(row["step"]),
            "cpu_s": statistics.median(row["cpu"]),
            "fwd_s": statistics.median(row["fwd"]),
            "bwd_s": statistics.median(row["bwd"]),
        })
    base = next((r for r in out if r["preset"].endswith("-ma")), out[0])
    for row in out:
        row["ratio"] = row["cpu_s"] / base["cpu_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/train_icil_demo.yaml", help="ICIL training YAML")
    parser.add_argument("--twins", default="ma,tr", type=lambda s: s.split(","), help="ma, tr or both")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per twin")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--tasks", type=int, default=7, help="tasks in the synthetic data")
    parser.add_argument("--episodes-per-task", type=int, default=10)
    parser.add_argument("--frames", type=int, default=56, help="frames per episode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args()
    rows = measure(args)
    print(f"{args.config}: {args.steps} steps (median), {args.threads} torch thread(s), "
          f"{args.frames}-frame episodes")
    print_table([
        ("preset", "<", "preset"), ("batch", "d", "batch"), ("chunks", ".0f", "chunks"), ("tokens", ".0f", "tokens"),
        ("step s", ".2f", "step_s"), ("cpu s", ".2f", "cpu_s"), ("fwd s", ".2f", "fwd_s"), ("bwd s", ".2f", "bwd_s"),
        ("tr/ma", ".2f", "ratio"),
    ], rows)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
