#!/usr/bin/env python3
"""Does an ICIL checkpoint use its prompt? Open-loop chunk error with the right and a wrong prompt.

For every instruction of DEMOS (an HDF5 file, as ``mail-ros convert`` writes it), the first
``--live`` episodes are played frame by frame through the policy's streaming path (exactly the
chunks policy_node computes: prefill the prompt, commit each live frame, predict), with three
prompts: K other demonstrations of the SAME instruction, K demonstrations of ANOTHER instruction
of the same skill (test-bed instructions; else any other), and none. Prints the mean absolute
error of the arm joints over each chunk against the recorded actions (rad). A policy that uses
its prompt does clearly better with its own task's demonstrations than with another's; equal
errors mean the live frames alone decide the chunks (the model has learned the episodes, or
infers the task from the arm's motion so far: ``--first`` scores only the start of each episode).

    scripts/icil_prompt_check.py --checkpoint runs/icil/last demos.hdf5 --k 3 --live 2
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demos", type=Path, help="HDF5 demonstrations (at least K + 1 per instruction)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="ICIL checkpoint directory")
    parser.add_argument("--k", type=int, default=3, help="prompt demonstrations")
    parser.add_argument("--live", type=int, default=2, help="live episodes per instruction")
    parser.add_argument("--first", type=int, default=0,
                        help="score only the chunks of each episode's first N frames (0: all), where the live "
                             "frames cannot yet tell the task (the arm has not moved towards a cube)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from mail_ros.data.prompts import episode_demonstration
    from mail_ros.policy.checkpoint import load_checkpoint
    from mail_ros.policy.icil_policy import ICILPolicy
    from mail_ros.sim.tasks import Task, TaskError
    from mail_ros.spec import GRIPPER_ACTION_NAME
    from mail_ros.train.trainer import load_demos

    torch.set_num_threads(1)
    policy = load_checkpoint(args.checkpoint).eval()
    if not isinstance(policy, ICILPolicy):
        print(f"{args.checkpoint} is not an ICIL checkpoint", file=sys.stderr)
        return 2
    # As a prompt file is read (mail_ros.data.prompts): images stay on disk until an episode is used.
    episodes = load_demos([args.demos], policy.config, {}, lazy=True)
    demonstration = functools.cache(lambda i: episode_demonstration(episodes[i]))
    by_task: dict[str, list[int]] = {}
    for i, episode in enumerate(episodes):
        by_task.setdefault(episode.instruction, []).append(i)
    arm = [j for j, name in enumerate(policy.config.spec.action.names) if name != GRIPPER_ACTION_NAME]

    def skill(instruction: str) -> str:
        try:
            return Task.parse(instruction).skill
        except TaskError:
            return ""

    def chunk_error(live: int, prompt: list[int]) -> float:
        if prompt:
            policy.set_prompt([demonstration(i) for i in prompt])
        else:
            policy.clear_prompt()
        episode, errors = demonstration(live), []
        frames = len(episode.observations)
        for t in range(min(frames, args.first or frames)):
            chunk = policy.predict_chunk(episode.observations[t])
            n = min(len(chunk), frames - t)
            errors.append(np.abs(chunk[:n, arm] - episode.actions[t:t + n, arm]).mean())
        return float(np.mean(errors))

    tasks = sorted(by_task)
    scored = f", first {args.first} frames" if args.first else ""
    print(f"{'instruction':40s} {'own prompt':>10s} {'other task':>10s} {'no prompt':>10s}  (rad, K={args.k}{scored})")
    for task in tasks:
        others = [t for t in tasks if t != task and skill(t) == skill(task)] or [t for t in tasks if t != task]
        if len(by_task[task]) < args.k + 1 or not others or len(by_task[others[0]]) < args.k:
            print(f"{task:40s} skipped: needs {args.k + 1} demonstrations and another instruction with {args.k}")
            continue
        rows = []
        for live in by_task[task][: args.live]:
            own = [i for i in by_task[task] if i != live][: args.k]
            rows.append((chunk_error(live, own), chunk_error(live, by_task[others[0]][: args.k]), chunk_error(live, [])))
        own_e, other_e, none_e = np.mean(rows, axis=0)
        print(f"{task:40s} {own_e:10.4f} {other_e:10.4f} {none_e:10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
