#!/usr/bin/env python3
"""The policy alone in closed loop: the simulated FR3 without ROS, one policy step every 0.1 s.

Each step renders the cameras at the simulator's resolution, resizes them to the model's with
camera_sync_node's function, asks the policy for a chunk and sends its first ``--execute``
actions, one per step (clipped to the executor's margined joint limits and gripper range), as
trajectory points 0.1 s apart, straight to the simulated controller. By default an ICIL
checkpoint's chunks run as ``mail-ros demo`` executes them (the first ICIL_EXECUTE_STEPS actions
of each: the whole chunk of a policy that predicts 8), and a MaIL checkpoint gets a new chunk
every step (``mail-ros demo`` ensembles its chunks). The mode matters: the shipped ICIL
policy, which predicts offsets from the joint positions, asked anew every step takes the hand
below its successful grasps and rarely closes it (docs/icil_experiments.md, section 13). No DDS,
no latency, no ensembling, no ramps: what fails here is the policy's own doing, what succeeds
here and fails in ``mail-ros demo`` is the runtime's. Works for MaIL checkpoints (taught by the
instruction) and ICIL ones (taught by ``--k`` demonstrations of each instruction in
``--prompt-file``, and by the instruction too where the checkpoint has ``language`` on).

Per episode: the judge's verdict; at the hand's lowest point its height above the table and its
horizontal distance to each cube (a reach that ends between cubes shows an averaged target, one at
another cube a wrong task, one high above its cube a hand that never went down); and the narrowest
gripper width the policy predicted (a hand that went down and never closed); how high the
cube the task moves was ever lifted (a stack that failed at its grasp, or at its target); and how
often the executed widths, read as executor_node reads them (GripperHysteresis), opened the hand
again after closing it before that cube was 2 cm up, and how many of those reopenings were the
first action of a new chunk (a chunk that, from the frame of a closing hand, starts open).

    scripts/policy_sync_rollout.py --checkpoint checkpoints/icil_demo --prompt-file prompts.hdf5 \\
        --episodes 4 "pick up the red cube" "pick up the blue cube"
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("instructions", nargs="*", help="test-bed instructions (default: all nine)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="MaIL or ICIL checkpoint directory")
    parser.add_argument("--prompt-file", type=Path, help="ICIL: demonstrations (`mail-ros convert` output)")
    parser.add_argument("--k", type=int, default=3, help="ICIL: demonstrations per prompt")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per instruction")
    parser.add_argument("--execute", type=int, default=None,
                        help="actions of each chunk executed before the next (default: as `mail-ros demo` executes "
                             "an ICIL checkpoint's chunks, at most their first 8; 1 for a MaIL checkpoint)")
    parser.add_argument("--seed", type=int, default=100000, help="first layout seed (the demo's default)")
    parser.add_argument("--pick-steps", type=int, default=110, help="step budget of a pick (0.1 s each)")
    parser.add_argument("--stack-steps", type=int, default=190, help="step budget of a stack")
    args = parser.parse_args(argv)

    os.environ.setdefault("MUJOCO_GL", "egl")
    import numpy as np
    import torch

    from mail_ros.sim.collect import CollectError  # mail_ros.sim before anything imports mujoco
    from mail_ros.sim.expert import observe
    from mail_ros.sim.franka_sim import FrankaSim, SimConfig
    from mail_ros.sim.tasks import TABLE_HEIGHT, Task, TaskError, all_tasks
    from mail_ros.commands.demo import ICIL_EXECUTE_STEPS, ICIL_EXECUTOR_MODE, prompts_from_file
    from mail_ros.control.gripper import GripperCommand, GripperHysteresis
    from mail_ros.control.safety import SafetyConfig, SafetyFilter
    from mail_ros.data.hdf5 import DataError
    from mail_ros.data.prompts import read_prompt
    from mail_ros.policy.checkpoint import load_checkpoint
    from mail_ros.policy.icil_policy import ICILPolicy
    from mail_ros.spec import FR3_ARM_JOINTS, Observation
    from mail_ros.sync.image import resize_rgb

    torch.set_num_threads(1)
    policy = load_checkpoint(args.checkpoint).eval()
    icil = isinstance(policy, ICILPolicy)
    if icil and args.prompt_file is None:
        print(f"{args.checkpoint} is an ICIL checkpoint: give --prompt-file", file=sys.stderr)
        return 2
    spec, horizon = policy.config.spec.observation, policy.config.spec.action.horizon
    if args.execute is None:  # as `mail-ros demo` runs it: receding horizon (its first actions), or a new chunk each step
        args.execute = min(ICIL_EXECUTE_STEPS, horizon) if icil and ICIL_EXECUTOR_MODE == "receding_horizon" else 1
    if not 1 <= args.execute <= horizon:
        print(f"--execute {args.execute}: a chunk holds 1 to {horizon} actions", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: {args.execute} of each chunk's {horizon} actions executed, then the next chunk",
          flush=True)
    try:
        tasks = [Task.parse(text) for text in args.instructions] or all_tasks()
        if icil:  # the prompts `mail-ros demo --prompt-file FILE --prompt-k K` hands to policy_node
            prompts = {text: [p.demonstration for p in read_prompt(paths, policy.config)]
                       for text, (_, paths) in prompts_from_file(args.prompt_file, tasks, args.k, 0).items()}
    except (TaskError, CollectError, DataError) as exc:
        print(exc, file=sys.stderr)
        return 2
    text_encoder = None
    if policy.config.language.enabled:  # MaIL, or ICIL with the instruction beside the prompt
        from mail_ros.language.encoders import load_text_encoder

        text_encoder = load_text_encoder(policy.config.language.encoder)
    safety = SafetyFilter(SafetyConfig())
    low, high = safety.limits.position_min, safety.limits.position_max
    sim = FrankaSim(SimConfig(cameras=tuple(spec.cameras)))
    period = 0.1
    held = 0.02  # m: a cube lifted this far is held; an open before that undoes a grasp
    successes = {}
    for index, task in enumerate(tasks):
        instruction = task.instruction
        embedding = text_encoder.encode([instruction])[0] if text_encoder is not None else None
        budget = args.pick_steps if task.skill == "pick" else args.stack_steps
        successes[instruction] = 0
        for episode in range(args.episodes):
            seed = args.seed + len(tasks) * episode + index
            sim.reset(seed)
            state = observe(sim)
            if icil:
                policy.set_prompt(prompts[instruction], embedding)
            else:
                policy.reset(seed)
            history, chunk, lowest, narrowest = [], None, (np.inf, {}), np.inf
            rest, lift = state.cube_poses[task.cube].position[2], 0.0  # the cube the task moves
            hysteresis, closed, reopened, by_new_chunk = GripperHysteresis(), False, 0, 0
            for step in range(budget):
                images = {c: resize_rgb(v, tuple(spec.image_size)) for c, v in sim.render().items()}
                observation = Observation(stamp=(step + 1) * 100_000_000, images=images,
                                          joint_positions=state.joint_positions.astype(np.float64))
                history = (history + [observation])[-spec.obs_horizon:]
                if step % args.execute == 0:
                    chunk = policy.predict_chunk(observation) if icil else policy.predict_chunk(history, embedding)
                elif icil:
                    policy.observe(observation)  # the live stream takes every frame
                action = chunk[step % args.execute]
                tcp = sim.tcp_position()
                if tcp[2] < lowest[0]:
                    lowest = (tcp[2], {c: float(np.hypot(*(tcp - p.position)[:2])) for c, p in state.cube_poses.items()})
                sim.set_trajectory(FR3_ARM_JOINTS, [(period, np.clip(action[: len(FR3_ARM_JOINTS)], low, high))])
                predicted = float(action[-1])  # the gripper width
                narrowest = min(narrowest, predicted)
                command = hysteresis.update(predicted)
                if command is GripperCommand.OPEN and closed and lift < held:
                    reopened += 1
                    by_new_chunk += step % args.execute == 0
                closed = closed or command is GripperCommand.CLOSE
                width = safety.gripper_width(predicted)
                if width is not None:
                    sim.set_gripper(width)
                sim.step(period)
                state = observe(sim)
                lift = max(lift, float(state.cube_poses[task.cube].position[2] - rest))
                if sim.task_success(task):
                    break
            progress = sim.task_progress(task)
            successes[instruction] += progress.success
            near = ", ".join(f"{c} {d * 100:.0f} cm" for c, d in lowest[1].items())
            verdict = "success" if progress.success else f"fail ({progress.stage}: {progress.detail})"
            print(f"{instruction:36s} seed {seed}: {verdict} after {step + 1} steps; hand at its lowest "
                  f"{(lowest[0] - TABLE_HEIGHT) * 100:.1f} cm above the table, {near} from the cubes; "
                  f"narrowest width predicted {narrowest * 100:.1f} cm; the {task.cube} cube lifted at most "
                  f"{lift * 100:.1f} cm; opened again before it was {held * 100:.0f} cm up {reopened} times "
                  f"({by_new_chunk} by a new chunk)", flush=True)
    print(f"\n{'instruction':36s} success")
    for instruction, count in successes.items():
        print(f"{instruction:36s} {count}/{args.episodes}")
    total = sum(successes.values())
    print(f"{'overall':36s} {total}/{args.episodes * len(successes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
