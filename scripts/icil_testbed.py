#!/usr/bin/env python3
"""An ICIL checkpoint closed-loop in the test bed, each task taught by a prompt of demonstrations.

The graph is ``mail-ros demo``'s (:class:`mail_ros.nodes.demo_graph.DemoGraph`: the simulated
FR3 and the whole pipeline on real DDS, simulated time). For each ``--task
'INSTRUCTION=DEMO[,DEMO...]'`` the demonstrations go to policy_node through its ``~/set_prompt``
service, exactly as ``mail-ros prompt`` sends them, then ``--episodes`` episodes of that
instruction run as in ``mail-ros demo`` (reset, the instruction on /mail/instruction, which the
simulator judges and which starts a new episode of the prompted policy, the prompt kept).
Prints each prompt's answer (K, frames, prefill time), each episode and the success table.

    mail-ros collect teach --instructions "pick up the blue cube" --episodes-per-instruction 3 --seed 5000
    mail-ros convert teach/episode_* -o teach.hdf5 --image-size 64 64 \\
        --arm-command-topic /mail/expert/arm_target --gripper-command-topic /mail/expert/gripper_target
    scripts/icil_testbed.py --checkpoint runs/icil/last --task "pick up the blue cube=teach.hdf5" --episodes 5
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="ICIL checkpoint directory")
    parser.add_argument("--task", action="append", required=True, metavar="INSTRUCTION=DEMO[,DEMO...]",
                        help="a test-bed instruction and its prompt (repeatable)")
    parser.add_argument("--episodes", type=int, default=5, help="episodes per task")
    parser.add_argument("--seed", type=int, default=100_000, help="cube layouts: episode k uses seed + k + 1")
    parser.add_argument("--pick-seconds", type=float, default=10.0)
    parser.add_argument("--stack-seconds", type=float, default=18.0)
    parser.add_argument("--real-time-factor", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from mail_ros.data.prompts import absolute_prompt_path
    from mail_ros.sim.collect import CollectError, SuccessTable, schedule
    from mail_ros.sim.tasks import Task, TaskError

    try:
        prompts = {}
        for text in args.task:
            instruction, sep, demos = text.partition("=")
            if not sep or not demos:
                raise CollectError(f"--task expects 'INSTRUCTION=DEMO[,DEMO...]', got {text!r}")
            task = Task.parse(instruction)
            prompts[task.instruction] = (task, [absolute_prompt_path(d) for d in demos.split(",")])
        plans = {name: schedule([(name, task)], args.episodes, start=i * args.episodes)
                 for i, (name, (task, _)) in enumerate(prompts.items())}
    except (TaskError, CollectError) as exc:
        print(f"icil_testbed: error: {exc}", file=sys.stderr)
        return 2

    from mail_ros.nodes.demo_graph import DemoGraph
    from mail_ros.nodes.sim_session import SessionError
    from mail_ros.srv import SetPrompt

    table = SuccessTable()
    budgets = {"pick": args.pick_seconds, "stack": args.stack_seconds}
    try:
        with DemoGraph(args.checkpoint, seed=args.seed, real_time_factor=args.real_time_factor,
                       device=args.device) as graph:
            session = graph.session
            client = session.operator.create_client(SetPrompt, "/policy_node/set_prompt")
            session.wait_until(client.service_is_ready, 60.0, "policy_node's ~/set_prompt")
            for name, (task, paths) in prompts.items():
                future = client.call_async(SetPrompt.Request(paths=paths))
                session.wait_until(future.done, 300.0, "the answer of ~/set_prompt")
                answer = future.result()
                print(f"prompt for {name!r}: {answer.message}", flush=True)
                if not answer.success:
                    return 1
                for spec in plans[name]:
                    outcome, trace = graph.run_episode(spec, budgets[task.skill])
                    table.add(outcome)
                    verdict = "success" if outcome.success else f"fail ({outcome.progress.message})"
                    print(f"episode {spec.index:4d} {name!r} (K={answer.k}): {verdict} after {outcome.seconds:.1f} s, "
                          f"{len(trace.inference)} chunks, {trace.commands} commands", flush=True)
    except SessionError as exc:
        print(f"icil_testbed: error: {exc}", file=sys.stderr)
        return 1
    print()
    print(table.format("instruction (taught by prompt)"))
    print(f"overall success: {100 * table.rate():.1f} % ({sum(o.success for o in table.outcomes)}/"
          f"{len(table.outcomes)} episodes)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MUJOCO_GL", "egl")
    sys.exit(main())
