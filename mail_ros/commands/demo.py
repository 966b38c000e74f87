"""``mail-ros demo``: the trained policy closed-loop on the simulated FR3, through the real ROS 2 pipeline.

Real DDS, simulated time: franka_sim_node here, camera_sync_node, language_node, policy_node
and executor_node in processes of their own as the launch files run them (see
:mod:`mail_ros.nodes.demo_graph`). For every instruction,
``--episodes`` episodes with fresh random cube layouts (the simulator's ~/reset): the
instruction goes out on /mail/instruction, the policy acts until the simulator's ~/task_success
says yes or the step budget runs out. Prints the success per instruction, ``overall success``,
and the chunk latency; with ``--paraphrases`` a second table for instructions phrased unlike
the training data (informative, not part of the overall rate). Headless, CPU.

An ICIL checkpoint is taught each task by demonstrations instead of an instruction: ``--prompt
'INSTRUCTION=DEMO[,DEMO...]'`` (repeatable) hands the demonstrations to policy_node's
``~/set_prompt`` before that instruction's episodes (the instruction still tells the simulator
which task to judge and resets the policy's episode); ``--prompt-file DEMOS.hdf5 --prompt-k K``
teaches every instruction by K of its demonstrations in one file (the README's evaluation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mail_ros.control.executor import ExecutorConfig
from mail_ros.control.scheduler import SCHEDULER_MODES
from mail_ros.resources import ResourceError, demo_checkpoint, icil_demo_checkpoint
from mail_ros.sim import CAMERA_SIZE, SIM_TIME_COMMAND_LATENCY
from mail_ros.sim.collect import CollectError, SuccessTable, percentiles_ms, schedule
from mail_ros.sim.tasks import Task, TaskError, all_tasks

__all__ = ["PARAPHRASES", "parse_prompts", "prompts_from_file", "register", "run"]

PROG = "mail-ros demo"
# Instructions unlike the nine the demos use, with the task each one means.
PARAPHRASES: tuple[tuple[str, Task], ...] = (
    ("lift the red block", Task("pick", "red")),
    ("grab the green cube", Task("pick", "green")),
    ("raise the blue block", Task("pick", "blue")),
    ("stack red on blue", Task("stack", "red", "blue")),
    ("place the green block on top of the red one", Task("stack", "green", "red")),
    ("put the blue cube onto the green cube", Task("stack", "blue", "green")),
)
# Evaluation layouts start far from the seeds `mail-ros collect` uses (seed + 1, + 2, ...).
DEFAULT_SEED = 100_000
# How an ICIL checkpoint's chunks are executed unless --executor-mode says otherwise: the shipped
# one (a weight average) picked 0/9 with temporal ensembling, 4/9 and 5/9 executing whole chunks
# (docs/icil_experiments.md, section 5). MaIL checkpoints get executor_node's default.
ICIL_EXECUTOR_MODE = "receding_horizon"
# ... and how much of each chunk, unless --execute-steps says otherwise: its first 8 actions (0.8 s
# at the test bed's 10 Hz), the whole chunk of a policy that predicts 8. Without ROS, a policy that
# predicts 16 scored 62/144 executing 8 of them and 31/144 executing all 16; one that predicts 8
# scored 51/144 executing all 8 and 29/144 executing 4 (docs/icil_experiments.md, section 17).
ICIL_EXECUTE_STEPS = 8


def _executed(args: argparse.Namespace) -> str:
    """How much of each chunk a receding horizon runs, for the run's first line."""
    if args.executor_mode != "receding_horizon":
        return ""
    return f" (at most {args.execute_steps} actions of each chunk)" if args.execute_steps else " (whole chunks)"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mail-ros demo``."""
    p = subparsers.add_parser("demo", help="run a trained policy closed-loop on the simulated FR3 and print its success",
                              description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="policy checkpoint directory (default: the shipped demo policy, checkpoints/demo of a source "
                        "checkout or share/mail_ros/checkpoints/demo of a colcon install; with --prompt or "
                        "--prompt-file the shipped ICIL policy, checkpoints/icil_demo)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per instruction")
    p.add_argument("--instructions", nargs="+", default=None, help="test-bed instructions (default: all nine)")
    p.add_argument("--prompt", action="append", default=None, metavar="INSTRUCTION=DEMO[,DEMO...]",
                   help="ICIL checkpoints: a test-bed instruction and the demonstrations that teach it (HDF5 files, "
                        "FILE.hdf5:GROUP episodes, rosbag2 folders), set through policy_node's ~/set_prompt before "
                        "that instruction's episodes; repeatable, and it replaces --instructions")
    p.add_argument("--prompt-file", type=Path, default=None, metavar="DEMOS.hdf5",
                   help="ICIL checkpoints: teach every instruction (--instructions, default all nine) by K of its "
                        "demonstrations in this file (`mail-ros convert` output), the first after --prompt-skip")
    p.add_argument("--prompt-k", type=int, default=3, metavar="K", help="--prompt-file: demonstrations per prompt")
    p.add_argument("--prompt-skip", type=int, default=0, metavar="S",
                   help="--prompt-file: start at each instruction's S-th demonstration (another prompt of the same K)")
    p.add_argument("--paraphrases", action="store_true", help="also run paraphrased instructions (reported apart)")
    p.add_argument("--paraphrase-episodes", type=int, default=2, help="episodes per paraphrase")
    p.add_argument("--record", type=Path, default=None, metavar="DIR",
                   help="record the run (cameras, joints, instructions, chunks, commands) to this rosbag2 folder")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="cube layouts: episode k uses seed + k + 1")
    p.add_argument("--pick-seconds", type=float, default=10.0, help="simulated-time budget of a pick episode")
    p.add_argument("--stack-seconds", type=float, default=18.0, help="simulated-time budget of a stack episode")
    p.add_argument("--real-time-factor", type=float, default=1.5,
                   help="at most this many simulated seconds per wall second (the simulation slows down when the "
                        "computer cannot keep up)")
    p.add_argument("--executor-mode", default=None, choices=SCHEDULER_MODES,
                   help=f"how chunks become commands; default: executor_node's ({ExecutorConfig().mode}, which the "
                        f"launch files deploy) for a MaIL checkpoint, {ICIL_EXECUTOR_MODE} for an ICIL one")
    p.add_argument("--execute-steps", type=int, default=None,
                   help=f"receding horizon: actions executed per chunk (0 = the whole chunk); default: "
                        f"executor_node's ({ExecutorConfig().execute_steps}, which the launch files deploy) for a MaIL "
                        f"checkpoint, {ICIL_EXECUTE_STEPS} for an ICIL one")
    p.add_argument("--command-latency", type=float, default=SIM_TIME_COMMAND_LATENCY,
                   help="executor_node's command_latency (s): how late the simulated controller may apply a "
                        "command while the setpoint stays smooth; larger than on a robot because the nodes see "
                        "simulated time late (the launch files deploy %.2f s)" % ExecutorConfig().command_latency)
    p.add_argument("--camera-size", nargs=2, type=int, default=list(CAMERA_SIZE), metavar=("H", "W"),
                   help="rendered camera resolution (the simulated cameras' own, as in sim_policy.launch.py); "
                        "camera_sync_node resizes to the checkpoint's image_size")
    p.add_argument("--device", default="cpu", help="torch device of the policy")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch CPU threads; one leaves the other cores to the simulator and the nodes")
    p.add_argument("--domain-id", type=int, default=None, help="ROS domain (default: ROS_DOMAIN_ID)")
    p.set_defaults(func=run)


def parse_prompts(texts: list[str]) -> dict[str, tuple[Task, list[str]]]:
    """``--prompt`` values -> instruction -> (task, absolute demonstration paths), in the given order."""
    from mail_ros.data.prompts import absolute_prompt_path

    prompts = {}
    for text in texts:
        instruction, sep, demos = text.partition("=")
        if not sep or not demos:
            raise CollectError(f"--prompt expects 'INSTRUCTION=DEMO[,DEMO...]', got {text!r}")
        task = Task.parse(instruction)
        if task.instruction in prompts:
            raise CollectError(f"--prompt: {task.instruction!r} is taught twice")
        prompts[task.instruction] = (task, [absolute_prompt_path(d) for d in demos.split(",")])
    return prompts


def prompts_from_file(path: Path, tasks: list[Task], k: int, skip: int) -> dict[str, tuple[Task, list[str]]]:
    """``--prompt-file``: each task's demonstrations ``skip`` .. ``skip + k - 1`` in ``path`` (by the
    instruction recorded with them), as :func:`parse_prompts` returns them."""
    from mail_ros.data.prompts import episodes_by_instruction

    if k < 1 or skip < 0:
        raise CollectError(f"--prompt-k must be >= 1 and --prompt-skip >= 0, got {k} and {skip}")
    found = episodes_by_instruction(path)
    prompts = {}
    for task in tasks:
        demos = found.get(task.instruction, [])
        if len(demos) < skip + k:
            raise CollectError(f"--prompt-file {path}: {len(demos)} demonstrations of {task.instruction!r}, "
                               f"--prompt-skip {skip} --prompt-k {k} needs {skip + k}")
        prompts[task.instruction] = (task, demos[skip:skip + k])
    return prompts


def run(args: argparse.Namespace) -> int:
    # torch (the checkpoint's description) is imported here, not for `mail-ros --help`.
    from mail_ros.data.hdf5 import DataError
    from mail_ros.policy.checkpoint import CheckpointError, describe_checkpoint

    try:
        prompts = parse_prompts(args.prompt or [])
        if prompts and (args.instructions is not None or args.paraphrases or args.prompt_file is not None):
            raise CollectError("--prompt names the instructions it teaches: not with --instructions, --paraphrases "
                               "or --prompt-file")
        if prompts:
            tasks = [task for task, _ in prompts.values()]
        else:
            tasks = all_tasks() if args.instructions is None else [Task.parse(t) for t in args.instructions]
        if args.prompt_file is not None:
            if args.paraphrases:
                raise CollectError("--prompt-file teaches tasks by demonstrations: not with --paraphrases")
            prompts = prompts_from_file(args.prompt_file, tasks, args.prompt_k, args.prompt_skip)
        plan = schedule([(t.instruction, t) for t in tasks], args.episodes)
        if prompts:  # one prompt at a time, each episode on the layout `mail-ros demo` gives it for a MaIL policy
            order = {instruction: i for i, instruction in enumerate(prompts)}
            plan.sort(key=lambda spec: order[spec.instruction])
        paraphrases = schedule(list(PARAPHRASES), args.paraphrase_episodes, start=len(plan)) if args.paraphrases else []
        if not (args.pick_seconds > 0 and args.stack_seconds > 0 and args.real_time_factor > 0):
            raise CollectError("--pick-seconds, --stack-seconds and --real-time-factor must be positive")
        if args.checkpoint is None:
            args.checkpoint = icil_demo_checkpoint() if prompts else demo_checkpoint()
        if not (args.checkpoint / "config.json").is_file():
            raise CollectError(f"no checkpoint at {args.checkpoint} (config.json missing); train one or pass "
                               "--checkpoint DIR")
        icil = describe_checkpoint(args.checkpoint).policy_type == "icil"
        if icil and not prompts:
            raise CollectError(f"{args.checkpoint} is an ICIL checkpoint: teach each task with --prompt "
                               "'INSTRUCTION=DEMO[,DEMO...]' or --prompt-file DEMOS.hdf5")
        if prompts and not icil:
            raise CollectError(f"--prompt/--prompt-file need an ICIL checkpoint; {args.checkpoint} is a MaIL one (it follows "
                               "the instruction)")
        if args.executor_mode is None:
            args.executor_mode = ICIL_EXECUTOR_MODE if icil else ExecutorConfig().mode
        if args.execute_steps is None:
            args.execute_steps = ICIL_EXECUTE_STEPS if icil else ExecutorConfig().execute_steps
        if args.record is not None and args.record.exists():
            raise CollectError(f"--record {args.record} already exists; rosbag2 writes a new folder")
    except (TaskError, CollectError, ResourceError, CheckpointError, DataError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    # The rclpy edge is imported only here, so the rest of the CLI stays free of ROS.
    from mail_ros.nodes.demo_graph import DemoGraph
    from mail_ros.nodes.sim_session import SessionError

    budgets = {"pick": args.pick_seconds, "stack": args.stack_seconds}
    tables = {"main": SuccessTable(), "paraphrase": SuccessTable()}
    inference, ages, commands = [], [], 0
    setpoint_acceleration, setpoint_jerk, delays = 0.0, 0.0, []
    started = time.monotonic()
    main_seconds = None
    interrupted = False
    try:
        with DemoGraph(args.checkpoint, seed=args.seed, real_time_factor=args.real_time_factor, device=args.device,
                       executor_mode=args.executor_mode, execute_steps=args.execute_steps,
                       domain_id=args.domain_id, record=args.record, camera_size=args.camera_size,
                       torch_threads=args.torch_threads, command_latency=args.command_latency) as graph:
            print(f"{PROG}: {args.checkpoint} ({graph.config.variant}-{graph.config.head}), "
                  f"{len(plan)} episodes + {len(paraphrases)} paraphrased, real-time factor {args.real_time_factor:g}, "
                  f"executor mode {args.executor_mode}" + _executed(args), flush=True)
            for part, specs in (("main", plan), ("paraphrase", paraphrases)):
                if part == "paraphrase":
                    main_seconds = time.monotonic() - started
                prompted = None
                for spec in specs:
                    if prompts and spec.instruction != prompted:
                        prompted = spec.instruction
                        answer = graph.set_prompt(prompts[prompted][1])
                        print(f"prompt for {prompted!r}: {answer.message}", flush=True)
                        if not answer.success:
                            print(f"{PROG}: error: policy_node refused the prompt for {prompted!r}", file=sys.stderr)
                            return 1
                    outcome, trace = graph.run_episode(spec, budgets[spec.task.skill])
                    tables[part].add(outcome)
                    inference += trace.inference
                    ages += trace.chunk_age
                    commands += trace.commands
                    setpoint_acceleration = max(setpoint_acceleration, trace.setpoint_acceleration)
                    setpoint_jerk = max(setpoint_jerk, trace.setpoint_jerk)
                    delays += trace.command_delay
                    verdict = "success" if outcome.success else f"fail ({outcome.progress.message})"
                    print(f"episode {spec.index:4d} {spec.instruction!r}: {verdict} "
                          f"after {outcome.seconds:.1f} s ({len(trace.inference)} chunks, {trace.commands} commands, "
                          f"1 kHz setpoint peaks {trace.setpoint_acceleration:.1f} rad/s^2 "
                          f"{trace.setpoint_jerk:.0f} rad/s^3"
                          f"{', ' + outcome.note if outcome.note else ''}; {time.monotonic() - started:.0f} s elapsed)",
                          flush=True)
            recording = graph.recording
    except KeyboardInterrupt:
        interrupted = True
        recording = None
        print(f"\n{PROG}: interrupted; results so far", file=sys.stderr)
    except SessionError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    main = tables["main"]
    if not main.outcomes:
        return 1 if not interrupted else 130
    print()
    print(main.format("instruction (taught by prompt)" if prompts else "instruction"))
    if main_seconds is None:
        main_seconds = time.monotonic() - started
    print(f"overall success: {100 * main.rate():.1f} %  ({sum(o.success for o in main.outcomes)}/{len(main.outcomes)} "
          f"episodes in {main_seconds:.0f} s, start-up included)")
    p50, p99 = percentiles_ms(inference)
    a50, a99 = percentiles_ms(ages)
    print(f"chunk latency (policy inference, wall): p50 {p50:.1f} ms, p99 {p99:.1f} ms over {len(inference)} chunks")
    print(f"observation age at chunk arrival (simulated): p50 {a50:.1f} ms, p99 {a99:.1f} ms; "
          f"{commands} arm commands sent")
    print(f"arm setpoint at 1 kHz (the simulated JTC, every episode): worst acceleration {setpoint_acceleration:.2f} "
          f"rad/s^2, worst jerk {setpoint_jerk:.0f} rad/s^3 (FR3 limits: 10 rad/s^2, 5000 rad/s^3)")
    d50, d99 = percentiles_ms(delays)
    print(f"arm commands applied after their stamp (simulated): p50 {d50:.0f} ms, p99 {d99:.0f} ms, max "
          f"{1e3 * max(delays, default=float('nan')):.0f} ms")
    if tables["paraphrase"].outcomes:
        print()
        print(tables["paraphrase"].format("paraphrase (not in the training data)"))
        print(f"paraphrase success: {100 * tables['paraphrase'].rate():.1f} %")
    if recording is not None:
        counts = ", ".join(f"{topic} {n}" for topic, n in sorted(recording.counts.items()))
        print(f"\nrecorded to {args.record}: {counts}")
        print(f"  replay offline: mail-ros convert {args.record} -o demo_run.hdf5 --gripper-source measured "
              f"--image-size {' '.join(str(v) for v in graph.config.image_size)}")
    return 130 if interrupted else 0
