"""Scripted-expert success rate and simulator speed on the FR3 test bed.

    /work/main/.venv/bin/python bench/sim_expert.py --episodes 50

Runs ``--episodes`` randomised episodes per skill (seeds 0.., the skill's instructions in turn)
and prints one row per skill: success rate, mean control steps, render time of one camera pair
(median of five renders of the final state of every episode), raw physics steps per second (arm moving, no
rendering, no IK) and wall time per episode (physics plus the expert's IK, no rendering).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mail_ros.sim.expert import ExpertConfig, ScriptedExpert, run_episode
from mail_ros.sim.franka_sim import HOME_Q, FrankaSim, SimConfig
from mail_ros.sim.tasks import SKILLS, all_tasks
from mail_ros.spec import FR3_ARM_JOINTS


def physics_steps_per_second(sim: FrankaSim, seconds: float = 10.0) -> float:
    sim.reset(0)
    target = HOME_Q + np.array([0.4, 0.3, -0.3, 0.4, 0.3, -0.3, 0.4])
    sim.set_trajectory(FR3_ARM_JOINTS, [(seconds / 2, target), (seconds, HOME_Q)])
    start = time.perf_counter()
    sim.step(seconds)
    return seconds / sim.config.timestep / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=50, help="episodes per skill")
    parser.add_argument("--rate-hz", type=float, default=10.0, help="expert control rate")
    parser.add_argument("--noise", type=float, default=0.0, help="std of executed joint-target noise, rad")
    parser.add_argument("--detour", type=float, default=0.0, help="radius (m) of the executed approach/carry detours")
    parser.add_argument("--grasp-height", type=float, default=0.0, help="grasp point above the cube's centre, m")
    parser.add_argument("--retreat", action="store_true", help="stack: lift the open hand after the release")
    parser.add_argument("--image-size", type=int, default=128, help="square camera resolution")
    args = parser.parse_args()

    sim = FrankaSim(SimConfig(image_size=(args.image_size, args.image_size)))
    step_scale = 10.0 / args.rate_hz
    expert = ScriptedExpert(ExpertConfig(rate_hz=args.rate_hz, max_linear_step=0.035 * step_scale,
                                       detour=args.detour, grasp_height=args.grasp_height,
                                       noise_std=args.noise, retreat=args.retreat), sim.model)
    steps_per_second = physics_steps_per_second(sim)
    sim.render()  # create the GL context outside the timings

    print(f"{'skill':<6} {'episodes':>8} {'success %':>9} {'mean steps':>10} {'render ms/pair':>14} "
          f"{'physics steps/s':>15} {'wall s/episode':>14}")
    for skill in SKILLS:
        tasks = all_tasks(skill)
        successes, steps, render_ms, wall = [], [], [], []
        for seed in range(args.episodes):
            start = time.perf_counter()
            result = run_episode(sim, expert, tasks[seed % len(tasks)], seed)
            wall.append(time.perf_counter() - start)
            successes.append(result.success)
            steps.append(result.steps)
            for _ in range(5):
                start = time.perf_counter()
                sim.render()
                render_ms.append(1e3 * (time.perf_counter() - start))
            if not result.success:
                print(f"  failed: seed {seed} '{tasks[seed % len(tasks)].instruction}' in phase {expert.phase}")
        print(f"{skill:<6} {args.episodes:>8} {100 * np.mean(successes):>9.1f} {np.mean(steps):>10.1f} "
              f"{np.median(render_ms):>14.2f} {steps_per_second:>15.0f} {np.mean(wall):>14.2f}")
    sim.close()


if __name__ == "__main__":
    main()
