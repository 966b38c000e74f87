"""Latency of MaILPolicy.predict_chunk: variant x head x DDPM time-token layout x history T x device x backend.

Each row runs in a fresh Python process (so its peak memory is its own) and simulates
open-loop chunk execution: every call sees a history window moved forward by A frames, so
min(A, T) new frames per camera are encoded per call and the rest come from the frame cache.

Columns:
  backend        Mamba variants on CPU run twice: "kernel" (the fused CPU kernel, the default) and
                 "ref" (the PyTorch reference scan, MAIL_ROS_CPU_KERNEL=0 in the row's process);
                 "cuda" for mamba_ssm's kernels, "-" for Transformers
  time           DDPM time-token layout (head.time_token): "first" (reference MaIL layout, the
                 K step contexts prefilled in one batched pass) or "after_obs"
                 ("after_observations": observation prefix prefilled once per chunk, each step
                 extends it by 1 + A tokens); decoder-only variants only, "-" for BC
  chunk p50/p99  whole predict_chunk per call, new frames included (default inference path)
  seq p50        same call repeated with every frame cached: sequence model + head only,
                 DDPM with the prefix reuse of its layout (see "time")
  plain p50      as seq, but every denoising step re-runs the whole sequence (reference path)
  peak MB        CPU: peak RSS of the row's process (model included); CUDA: peak allocated
  ratio          Mamba variant / its Transformer twin (d_ma/d_tr, ed_ma/ed_tr) with the same
                 layout, same run, on chunk p50 and on the best of seq/plain p50
  kernel x       on "kernel" rows: the "ref" row's chunk p50 / this row's (same run)

Examples:
  .venv/bin/python bench/policy_latency.py --quick
  .venv/bin/python bench/policy_latency.py --variants d_ma,d_tr --heads ddpm --T 5,200 --repeats 5
  .venv/bin/python bench/policy_latency.py --quick --size demo --time-tokens after_observations
  .venv/bin/python bench/policy_latency.py --devices cpu,cuda --size paper-goal --json out.json
  .venv/bin/python bench/policy_latency.py --size demo --variants d_ma --heads bc --backends kernel,ref
  .venv/bin/python bench/policy_latency.py --checkpoint checkpoints/demo --threads 1 --clock cpu

On a CPU shared with other work, use --threads 1 --clock cpu: with 2 OpenMP threads, a
descheduled thread stalls the other at every parallel region and rows vary by 10x (both families
alike), and wall time measures the other work too. --clock cpu times each call by this process's
CPU time (with one thread: the work of the call, whoever else runs); on an idle machine the
default wall clock gives latency.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from tables import print_table, write_json

TWINS = {"d_ma": "d_tr", "ed_ma": "ed_tr"}
BACKENDS = ("kernel", "ref")
SHORT = {"after_observations": "after_obs"}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_row(row: dict) -> dict:
    """Measure one configuration in this process; returns a JSON-able dict."""
    import numpy as np
    import torch

    from mail_ros.policy.checkpoint import load_checkpoint
    from mail_ros.policy.mail_policy import MaILPolicy
    from mail_ros.policy.presets import get_preset
    from mail_ros.spec import Observation

    torch.set_num_threads(row["threads"])
    device = torch.device(row["device"])
    T = row["T"]
    torch.manual_seed(0)
    if row.get("checkpoint"):
        policy = load_checkpoint(row["checkpoint"], device)
    else:
        overrides = {"spec.observation.obs_horizon": T}
        if row["time_token"] != "-":
            overrides["head.time_token"] = row["time_token"]
        policy = MaILPolicy(get_preset(row["preset"], overrides)).to(device).eval()
    A, calls = policy.A, row["warmup"] + row["repeats"]
    rng = np.random.default_rng(0)
    H, W = policy.image_size
    n_frames = T + A * calls
    # A small pool of images reused across stamps: the policy caches per Observation object, not
    # by content; each frame below is one object, passed again in every window that holds it.
    pool = [{c: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for c in policy.cameras} for _ in range(8)]
    frames = [Observation(100_000_000 * i, pool[i % 8], np.zeros(policy.joint_dim)) for i in range(n_frames)]  # 10 Hz, ns
    language = np.zeros(policy.config.language.dim) if policy.config.language.enabled else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    clock = time.process_time if row["clock"] == "cpu" else time.perf_counter

    def timed(history) -> float:
        sync()
        start = clock()
        policy.predict_chunk(history, language, seed=0)
        sync()
        return (clock() - start) * 1e3

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    chunk = []
    for call in range(calls):
        end = T + call * A
        elapsed = timed(frames[end - T : end])
        if call >= row["warmup"]:
            chunk.append(elapsed)
    window = frames[n_frames - T : n_frames]
    seq = [timed(window) for _ in range(row["repeats"])]
    policy.use_prefix_cache = False
    plain = [timed(window) for _ in range(row["repeats"])] if policy.is_ddpm else seq
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        **row,
        "params": policy.num_parameters()["total"],
        "backend": policy.backend,
        "chunk_p50": statistics.median(chunk),
        "chunk_p99": _percentile(chunk, 99),
        "seq_p50": statistics.median(seq),
        "plain_p50": statistics.median(plain),
        "peak_mb": peak_mb,
    }


def _run_isolated(row: dict) -> dict:
    env = dict(os.environ)
    if row["backend_choice"] == "ref":
        env["MAIL_ROS_CPU_KERNEL"] = "0"  # the kernel's documented switch
    out = subprocess.run(
        [sys.executable, __file__, "--row", json.dumps(row)], capture_output=True, text=True, check=False, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(f"row {row} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratios(results: list[dict]) -> None:
    index = {(r["variant"], r["head"], r["time_token"], r["T"], r["device"], r["backend_choice"]): r for r in results}
    for r in results:
        key = (r["head"], r["time_token"], r["T"], r["device"])
        twin = index.get((TWINS.get(r["variant"]), *key, "-"))
        reference = index.get((r["variant"], *key, "ref")) if r["backend_choice"] == "kernel" else None
        r["kernel_speedup"] = None if reference is None else reference["chunk_p50"] / r["chunk_p50"]
        if twin is None:
            r["ratio_chunk"] = r["ratio_seq"] = None
            continue
        r["ratio_chunk"] = r["chunk_p50"] / twin["chunk_p50"]
        r["ratio_seq"] = min(r["seq_p50"], r["plain_p50"]) / min(twin["seq_p50"], twin["plain_p50"])


def _ratio(value: float | None) -> str | float:
    return "" if value is None else value


TABLE = [
    ("variant", "<", "variant"),
    ("backend", "<", "backend_choice"),
    ("head", "<", "head"),
    ("time", "<", lambda r: SHORT.get(r["time_token"], r["time_token"])),
    ("T", "d", "T"),
    ("device", "<", "device"),
    ("params", ",", "params"),
    ("chunk p50", ".1f", "chunk_p50"),
    ("p99", ".1f", "chunk_p99"),
    ("seq p50", ".1f", "seq_p50"),
    ("plain p50", ".1f", "plain_p50"),
    ("peak MB", ".0f", "peak_mb"),
    ("ratio chunk", ".2f", lambda r: _ratio(r["ratio_chunk"])),
    ("ratio seq", ".2f", lambda r: _ratio(r["ratio_seq"])),
    ("kernel x", ".2f", lambda r: _ratio(r["kernel_speedup"])),
]


def _checkpoint_rows(args: argparse.Namespace) -> list[dict]:
    """The --checkpoint rows: the saved policy as it is, with each Mamba backend on CPU."""
    from mail_ros.policy.checkpoint import read_checkpoint_config

    data = read_checkpoint_config(args.checkpoint)
    config = data["policy"]
    variant, head = data.get("variant", "-"), config["head"]["kind"]
    time_token = config["head"].get("time_token", "first") if head == "ddpm" else "-"
    results = []
    for device in args.devices.split(","):
        choices = (args.backends.split(",") if device == "cpu" else ["cuda"]) if variant in TWINS else ["-"]
        for choice in choices:
            row = {
                "checkpoint": args.checkpoint, "preset": args.checkpoint, "variant": variant, "head": head,
                "time_token": time_token, "T": config["spec"]["observation"]["obs_horizon"], "device": device,
                "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads, "clock": args.clock,
                "backend_choice": choice,
            }
            results.append(_run_isolated(row))
            print(f"  {args.checkpoint} backend={choice} {device}: chunk p50 {results[-1]['chunk_p50']:.1f} ms "
                  f"({results[-1]['backend']})", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="paper-spatial", help="preset size (tiny, demo, paper-SUITE)")
    parser.add_argument("--variants", default="d_ma,ed_ma,d_tr,ed_tr")
    parser.add_argument("--heads", default="bc,ddpm")
    parser.add_argument("--T", default="1,5,10,50,200", help="history lengths")
    parser.add_argument(
        "--time-tokens", default="first,after_observations",
        help="DDPM time-token layouts (head.time_token) for the decoder-only variants",
    )
    parser.add_argument("--devices", default="cpu", help="cpu and/or cuda")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS),
        help="Mamba backends on CPU: kernel (fused CPU kernel) and/or ref (PyTorch reference scan)",
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time calls by the wall clock (latency) or by this process's CPU time")
    parser.add_argument("--quick", action="store_true", help="d_ma + d_tr, DDPM, T in {5, 200}, 3 repeats (both layouts)")
    parser.add_argument("--checkpoint", help="time this policy checkpoint (its own T, head and sizes) "
                        "instead of the presets; --variants, --heads, --T, --time-tokens and --size are ignored")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not set(args.backends.split(",")) <= set(BACKENDS):
        parser.error(f"--backends takes {' and/or '.join(BACKENDS)}, got {args.backends!r}")
    if args.row:
        print(json.dumps(run_row(json.loads(args.row))))
        return 0
    if args.quick:
        args.variants, args.heads, args.T, args.repeats, args.warmup = "d_ma,d_tr", "ddpm", "5,200", 3, 1
    results = []
    if args.checkpoint:
        results = _checkpoint_rows(args)
    for device in ([] if args.checkpoint else args.devices.split(",")):
        for head in args.heads.split(","):
            for T in (int(v) for v in args.T.split(",")):
                for variant in args.variants.split(","):
                    # Only DDPM heads have a time token, and only decoder-only variants can move it.
                    decoder_ddpm = head == "ddpm" and variant in ("d_ma", "d_tr")
                    for time_token in args.time_tokens.split(",") if decoder_ddpm else ["first" if head == "ddpm" else "-"]:
                        row = {
                            "preset": f"{args.size}-{variant}-{head}", "variant": variant, "head": head,
                            "time_token": time_token, "T": T, "device": device, "repeats": args.repeats,
                            "warmup": args.warmup, "threads": args.threads, "clock": args.clock,
                        }
                        if variant not in TWINS:
                            choices = ["-"]
                        elif device == "cpu":
                            choices = args.backends.split(",")
                        else:
                            choices = ["cuda"]
                        for choice in choices:
                            results.append(_run_isolated(copy.deepcopy(row) | {"backend_choice": choice}))
                            print(
                                f"  {row['preset']} backend={choice} time={time_token} T={T} {device}: "
                                f"chunk p50 {results[-1]['chunk_p50']:.1f} ms ({results[-1]['backend']})",
                                file=sys.stderr, flush=True,
                            )
    _ratios(results)
    print(f"size {args.checkpoint or args.size}, torch threads {args.threads}, {args.clock} clock (ms), "
          f"backends: {sorted({r['backend'] for r in results})}")
    print_table(TABLE, results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
