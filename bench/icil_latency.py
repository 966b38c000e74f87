"""Per-control-step latency, memory and prefill time vs prompt size K for the ICIL twins.

The Mamba ICIL policy (streaming: the prompt is prefilled once into the recurrent state) and its
Transformer twin (K/V cache), same size preset, same process, measured K by K alternately so
that load on the machine hits both alike. Each prompt is K demonstrations of F frames (2 tokens
a frame + 1 per demonstration): K = 64 with the default F = 156 is 9 984 frames, 20 032 tokens.

Prompt frames are random observation tokens put through the real demonstration-token path
(ICILSequence.demo_tokens) and prefilled by ICILPolicy.set_encoded_prompt: the image encoders
cost the same per frame for both twins and whatever K is, so they are timed once, on one real
demonstration ("encode ms/frame"), instead of for ~20 000 frames per twin.

Columns:
  frames, tokens  prompt size
  prefill s       ICILPolicy.set_encoded_prompt: the sequence model over the whole prompt
                  (a full prefill = frames * encode ms/frame + this)
  state MB        what the stream holds after the prompt: Mamba conv + SSM states per layer,
                  Transformer its key/value buffer (allocated: every token + headroom)
  peak MB         CUDA only: peak allocated during the prefill
  step p50, cpu   ICILPolicy.predict_chunk with a real observation: validation, encoding of the
                  frame, one committed token, A action queries, denormalisation; wall time and
                  (CPU) the thread's CPU time, medians
  seq p50, cpu    the sequence model alone per step: commit one token + the A queries
  xK1             / the same twin's value at the smallest K (goal: Mamba <= 1.10)
  tr/ma           Transformer / Mamba at the same K
Ratios use the CPU-time medians on CPU and wall-time medians on CUDA.

Every (K, twin) is prefilled first (one policy each), then the control steps of all rows take
turns, the order rotated every call, so that load from other processes and clock changes hit
every row alike. With one torch thread (the default), a step's thread CPU time is its own
compute: on a machine shared with others, wall times swing with their load, CPU times and the
ratios much less.
Examples (the machine's load changes the absolute numbers, not much the ratios):
  .venv/bin/python bench/icil_latency.py --quick
  .venv/bin/python bench/icil_latency.py                    # K = 1..64, demo size, 1 thread
  .venv/bin/python bench/icil_latency.py --size tiny --K 1,4,16 --frames-per-demo 50 --repeats 10
  .venv/bin/python bench/icil_latency.py --devices cpu,cuda --json icil_latency.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tables import print_table, write_json

TWINS = ("ma", "tr")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class _Timer:
    """Wall time, and on CPU the thread's own CPU time (time.thread_time): with one torch thread
    that is the step's compute without the time other processes held the cores."""

    def __init__(self, sync) -> None:
        self.sync = sync

    def __enter__(self) -> "_Timer":
        self.sync()
        self.wall, self.cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self.wall = (time.perf_counter() - self.wall) * 1e3
        self.cpu = (time.thread_time() - self.cpu) * 1e3


def measure(args: argparse.Namespace, device_name: str) -> list[dict]:
    """All rows of one device: every (K, twin) prefilled first, then timed in turns."""
    import copy

    import numpy as np
    import torch

    from mail_ros.policy.icil_policy import Demonstration, EncodedPrompt, ICILPolicy
    from mail_ros.policy.presets import get_icil_preset
    from mail_ros.spec import Observation

    torch.set_num_threads(args.threads)
    device = torch.device(device_name)
    base = {}
    for twin in TWINS:
        torch.manual_seed(0)
        base[twin] = ICILPolicy(get_icil_preset(f"icil-{args.size}-{twin}")).to(device).eval()
    first = base["ma"]
    H, W = first.config.spec.observation.image_size
    rng = np.random.default_rng(0)
    pool = [{c: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for c in first.cameras} for _ in range(8)]
    joints = np.zeros(first.joint_dim)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # The encoders are the same for both twins and per frame: timed once on a real demonstration.
    F = args.frames_per_demo
    demo = Demonstration([Observation(100_000_000 * i, pool[i % 8], joints) for i in range(F)], np.zeros((F, first.action_dim)))
    first.encode_prompt([demo])  # warm-up
    with _Timer(sync) as timer:
        first.encode_prompt([demo])
    encode_ms = timer.wall / F

    # One policy per (K, twin), each holding its prompt, so that the timed steps can take turns.
    rows, policies = {}, {}
    D, Da = first.config.backbone.d_model, first.action_dim
    for K in args.K:
        generator = torch.Generator().manual_seed(K)
        obs_tokens = torch.randn(K, 1, F, D, generator=generator).to(device)
        actions = torch.randn(K, 1, F, Da, generator=generator).to(device)
        for twin in TWINS:
            policy = policies[(K, twin)] = copy.deepcopy(base[twin])
            with torch.inference_mode():
                tokens = torch.cat([policy.sequence.demo_tokens(obs_tokens[k], actions[k]) for k in range(K)], dim=1)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with _Timer(sync) as timer:
                info = policy.set_encoded_prompt(EncodedPrompt(tokens, K, K * F))
            rows[(K, twin)] = {
                "twin": twin,
                "device": device_name,
                "K": K,
                "frames": info.frames,
                "tokens": info.tokens,
                "prefill_s": timer.wall / 1e3,
                "prefill_cpu_s": timer.cpu / 1e3,
                "state_mb": policy.stream_state.nbytes() / 2**20,
                "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                "sequence_params": policy.num_parameters()["sequence"],
                "encode_ms_per_frame": encode_ms,
                "backend": policy.backend,
            }
            print(f"  {twin} K={K} {device_name}: prefill {timer.wall / 1e3:.2f} s", file=sys.stderr, flush=True)

    # Control steps in turns, the order rotated every call: load from other processes and drift
    # in clock speed hit every row alike. Each row's stream grows by one token a call.
    keys = list(policies)
    live = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(0)).to(device)
    states = {key: policy.stream_state for key, policy in policies.items()}
    samples = {key: {"step": [], "step_cpu": [], "seq": [], "seq_cpu": []} for key in keys}
    for call in range(args.warmup + args.repeats):
        obs = Observation(10**12 + 100_000_000 * call, pool[call % 8], joints)
        for key in keys[call % len(keys) :] + keys[: call % len(keys)]:
            policy, sequence = policies[key], policies[key].sequence
            with _Timer(sync) as step:
                policy.predict_chunk(obs)
            with torch.inference_mode(), _Timer(sync) as seq:
                states[key] = sequence.extend(sequence.live_tokens(live), states[key])
                sequence.predict(states[key])
            if call >= args.warmup:
                for name, timer in (("step", step), ("seq", seq)):
                    samples[key][name].append(timer.wall)
                    samples[key][f"{name}_cpu"].append(timer.cpu)
    results = []
    for key in keys:
        results.append(rows[key] | {f"{name}_p50": statistics.median(v) for name, v in samples[key].items()})
    return results


def _ratios(results: list[dict]) -> None:
    index = {(r["twin"], r["device"], r["K"]): r for r in results}
    for r in results:
        smallest = min(k for (twin, device, k) in index if twin == r["twin"] and device == r["device"])
        base, ma = index[(r["twin"], r["device"], smallest)], index[("ma", r["device"], r["K"])]
        for key in RATIO_KEYS:
            r[f"{key}_x_k1"] = r[key] / base[key]
            r[f"{key}_tr_over_ma"] = r[key] / ma[key]


# Ratios are taken of: CPU: the thread's CPU time (steady under load), CUDA: wall time.
RATIO_KEYS = ("step_p50", "step_cpu_p50", "seq_cpu_p50", "seq_p50")


def _keys(r: dict) -> tuple[str, str]:
    """The step and sequence keys compared across K and twins: wall clock on CUDA, CPU time on the CPU."""
    return ("step_p50", "seq_p50") if r["device"] != "cpu" else ("step_cpu_p50", "seq_cpu_p50")


def _cpu(r: dict, key: str) -> str | float:
    return "-" if r["device"] != "cpu" else r[key]


def _twin(r: dict, which: int) -> str | float:
    return "" if r["twin"] == "ma" else r[f"{_keys(r)[which]}_tr_over_ma"]


TABLE = [
    ("twin", "<", "twin"),
    ("device", "<", "device"),
    ("K", "d", "K"),
    ("frames", "d", "frames"),
    ("tokens", "d", "tokens"),
    ("prefill s", ".3f", "prefill_s"),
    ("state MB", ".3f", "state_mb"),
    ("peak MB", ".0f", lambda r: "-" if r["peak_mb"] is None else r["peak_mb"]),
    ("step p50", ".2f", "step_p50"),
    ("cpu", ".2f", lambda r: _cpu(r, "step_cpu_p50")),
    ("seq p50", ".2f", "seq_p50"),
    ("cpu", ".2f", lambda r: _cpu(r, "seq_cpu_p50")),
    ("|", "<", lambda r: "|"),
    ("xK1 step", ".2f", lambda r: r[f"{_keys(r)[0]}_x_k1"]),
    ("seq", ".2f", lambda r: r[f"{_keys(r)[1]}_x_k1"]),
    ("|", "<", lambda r: "|"),
    ("tr/ma step", ".2f", lambda r: _twin(r, 0)),
    ("seq", ".2f", lambda r: _twin(r, 1)),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="demo", help="ICIL preset size: tiny or demo (icil-SIZE-ma / -tr)")
    parser.add_argument("--K", default="1,2,4,8,16,32,64", help="prompt demonstrations")
    parser.add_argument("--frames-per-demo", type=int, default=156, help="frames of each prompt demonstration")
    parser.add_argument("--devices", default="cpu", help="cpu and/or cuda")
    parser.add_argument("--repeats", type=int, default=30, help="timed control steps per row")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: a shared machine)")
    parser.add_argument("--quick", action="store_true", help="K in {1, 8, 64}, 15 repeats")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.K, args.repeats = "1,8,64", 15
    args.K = sorted(int(k) for k in args.K.split(","))
    if args.K[0] < 1 or args.frames_per_demo < 1:
        parser.error("K and --frames-per-demo must be >= 1")
    results = []
    for device in args.devices.split(","):
        results.extend(measure(args, device))
    _ratios(results)
    first = results[0]
    print(
        f"icil-{args.size}-ma vs icil-{args.size}-tr, {args.frames_per_demo} frames per demonstration, "
        f"torch threads {args.threads}; sequence parameters ma {first['sequence_params']:,} / "
        f"tr {next(r['sequence_params'] for r in results if r['twin'] == 'tr'):,}; "
        f"encoders {first['encode_ms_per_frame']:.2f} ms/frame; backends: {sorted({r['backend'] for r in results})}"
    )
    print_table(TABLE, results)
    for device in args.devices.split(","):
        ma = [r for r in results if r["twin"] == "ma" and r["device"] == device]
        for key in ("step_p50", "seq_p50") if device != "cpu" else ("step_cpu_p50", "seq_cpu_p50"):
            worst = max(r[f"{key}_x_k1"] for r in ma)
            print(
                f"{device}: Mamba {key.removesuffix('_p50').replace('_', ' ')} p50 from K={ma[0]['K']} to "
                f"K={ma[-1]['K']}: at most x{worst:.2f} of K={ma[0]['K']} "
                f"(goal: flat within 10 %: {'met' if worst <= 1.10 else 'NOT met'})"
            )
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
