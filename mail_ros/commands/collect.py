"""``mail-ros collect OUT``: scripted demonstrations on the simulated FR3, recorded through the ROS graph.

One process, real DDS: ``franka_sim_node`` (owning /clock: simulated time, faster than real time),
``expert_node`` (the scripted expert, driving the arm and gripper controller topics; see
:mod:`mail_ros.nodes.expert_node`) and the ``mail-ros record`` recorder node; every node runs on
simulated time. Each episode is one rosbag2 folder ``OUT/episode_NNNN`` (MCAP) holding the
cameras, /joint_states, /mail/instruction (with the recorder's episode marker), the executed
commands and the expert's clean targets. Failed episodes are moved to ``OUT/failed/``.

Convert and train (the commands ``collect`` prints at the end)::

    mail-ros convert OUT/episode_* -o demos.hdf5 --image-size 64 64 \\
        --arm-command-topic /mail/expert/arm_target --gripper-command-topic /mail/expert/gripper_target
    mail-ros train --config config/train_sim_demo.yaml demos.hdf5 --out runs/demo
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from mail_ros.sim import CAMERA_SIZE
from mail_ros.sim.collect import CollectError, EpisodeOutcome, SuccessTable, schedule
from mail_ros.sim.tasks import Task, TaskError, all_tasks
from mail_ros.spec import ObservationSpec

__all__ = ["RECORDED_TOPICS", "register", "run"]

PROG = "mail-ros collect"
RECORDED_TOPICS = (
    "/cameras/*/image_raw",
    "/joint_states",
    "/mail/instruction",
    "/fr3_arm_controller/joint_trajectory",
    "/fr3_gripper/joint_trajectory",
    "/mail/expert/arm_target",
    "/mail/expert/gripper_target",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mail-ros collect``."""
    p = subparsers.add_parser("collect", help="record scripted-expert demos on the simulated FR3 (one bag per episode)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (created; must not hold episode bags yet)")
    p.add_argument("--episodes-per-instruction", type=int, default=20, help="episodes of each instruction")
    p.add_argument("--seed", type=int, default=0, help="the simulator's seed: episode k uses cube layout seed+k+1")
    p.add_argument("--instructions", nargs="+", default=None,
                   help="test-bed instructions (default: all nine), e.g. 'pick up the red cube'")
    p.add_argument("--noise-std", type=float, default=0.005,
                   help="std (rad) of noise on the executed (not recorded) arm targets")
    p.add_argument("--detour", type=float, default=0.0,
                   help="radius (m) of random horizontal detours of the executed (not recorded) goals above a "
                        "cube: the demonstrations then show the hand steered back over an off-centre cube")
    p.add_argument("--grasp-height", type=float, default=0.0,
                   help="height (m) of the expert's grasp point above the cube's centre: a higher grasp leaves a "
                        "policy's fingertips more room above the table")
    p.add_argument("--retreat", action="store_true",
                   help="stack demonstrations end with the open hand lifted off the stacked cube (default: they "
                        "end when the fingers have opened; a policy trained on retreats learned to rise from "
                        "a cube it should grasp)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="simulated-time budget of one episode")
    p.add_argument("--real-time-factor", type=float, default=1.5,
                   help="simulated seconds per wall second (0 = as fast as possible)")
    p.add_argument("--image-size", nargs=2, type=int, default=list(CAMERA_SIZE), metavar=("H", "W"),
                   help="rendered camera resolution (convert --image-size resizes to the model's)")
    p.add_argument("--cameras", nargs="+", default=list(ObservationSpec().cameras))
    p.add_argument("--domain-id", type=int, default=None, help="ROS domain (default: ROS_DOMAIN_ID)")
    p.set_defaults(func=run)


def _tasks(texts: list[str] | None) -> list[Task]:
    if texts is None:
        return all_tasks()
    return [Task.parse(text) for text in texts]


def _bag(out: Path, index: int) -> Path:
    return out / f"episode_{index:04d}"


def _switch(recorder, path: Path) -> None:
    """Point ``recorder`` at a new bag with the same topics; the caller closes the previous one."""
    from mail_ros.data.recording import BagRecording

    shutil.rmtree(path, ignore_errors=True)
    following = BagRecording(path)
    for topic, msgtype in list(recorder.subscribed.items()):
        following.add_topic(topic, msgtype)
    recorder.recording = following
    # A callback that fetched the previous recording just before the switch finishes its write.
    time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    try:
        tasks = _tasks(args.instructions)
        plan = schedule([(t.instruction, t) for t in tasks], args.episodes_per_instruction)
        if not args.max_seconds > 0 or args.real_time_factor < 0:
            raise CollectError(f"--max-seconds must be > 0 and --real-time-factor >= 0, got {args.max_seconds}, "
                               f"{args.real_time_factor}")
        if args.out.exists() and any(args.out.glob("episode_*")):
            raise CollectError(f"{args.out} already holds episode bags; choose a new folder")
    except (TaskError, CollectError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    # The rclpy edge is imported only here, so the rest of the CLI stays free of ROS.
    from mail_ros.data.recording import BagRecording
    from mail_ros.nodes.expert_node import ExpertNode
    from mail_ros.nodes.recorder import RecorderNode
    from mail_ros.nodes.sim_session import SessionError, SimSession

    table = SuccessTable()
    started = time.monotonic()
    scratch = args.out / ".between_episodes"
    recorder = None
    try:
        # Joint states at 50 Hz (half the default) spare the one Python process many callbacks;
        # alignment needs one within max_skew (20 ms) of each frame.
        with SimSession(seed=args.seed, cameras=args.cameras, image_size=tuple(args.image_size),
                        real_time_factor=args.real_time_factor, joint_state_rate_hz=50.0,
                        domain_id=args.domain_id) as session:
            expert = session.add(ExpertNode(session.sim.privileged_state, model=session.sim.sim.model,
                                            context=session.context, parameter_overrides=session.parameters(
                                                noise_std=args.noise_std, detour=args.detour,
                                                grasp_height=args.grasp_height, retreat=args.retreat,
                                                seed=args.seed)))
            # One recorder for the whole run, writing each episode to its own bag: nodes are not
            # removed from a spinning executor (rclpy may still hold their handles).
            recorder = RecorderNode(BagRecording(_bag(args.out, plan[0].index)), RECORDED_TOPICS,
                                    context=session.context, discovery_period=0.05)
            recorder.set_parameters(session.parameters())
            session.add(recorder, dedicated=True)
            wanted = {f"/cameras/{c}/image_raw" for c in args.cameras} | set(RECORDED_TOPICS[1:])
            session.wait_until(lambda: wanted <= set(recorder.subscribed) and recorder.get_clock().now().nanoseconds > 0,
                               20.0, f"the recorder to subscribe to {sorted(wanted)}")
            for k, spec in enumerate(plan):
                session.reset()
                recording = recorder.recording
                session.instruct(spec.instruction, spec.task)
                session.wait_until(lambda: recording.episodes == 1, 10.0, "the recorder to mark the episode")
                start = session.now()
                expert.start(spec.task)
                session.wait_until(lambda: expert.done or session.now() - start > args.max_seconds,
                                   60.0 + 10.0 * args.max_seconds, "the expert")
                expert.stop()
                seconds = session.now() - start
                progress = session.task_progress()
                success = progress.success
                # Frames of the final pose, so the last actions have observations after them.
                session.sleep(0.3)
                stop_ns = recorder.get_clock().now().nanoseconds
                following = _bag(args.out, plan[k + 1].index) if k + 1 < len(plan) else scratch
                _switch(recorder, following)
                recording.close(stop_ns)
                table.add(EpisodeOutcome(spec, success, seconds, note="" if success else "expert failed",
                                         progress=progress))
                if not success:
                    (args.out / "failed").mkdir(exist_ok=True)
                    shutil.move(str(recording.path), str(args.out / "failed" / recording.path.name))
                verdict = "ok" if success else f"FAILED ({progress.message})"
                print(f"episode {spec.index:4d} {spec.instruction!r}: {verdict} "
                      f"({seconds:.1f} s simulated, {expert.steps} steps, {time.monotonic() - started:.0f} s elapsed)",
                      flush=True)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
    except SessionError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if recorder is not None:  # the session has stopped: no callback writes any more
            recorder.recording.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if not table.outcomes:
        return 1
    print()
    print(table.format("expert demonstrations"))
    kept = sum(o.success for o in table.outcomes)
    print(f"\n{kept} successful episode bags in {args.out} ({time.monotonic() - started:.0f} s); next:")
    size = " ".join(str(v) for v in args.image_size)
    print(f"  mail-ros convert {args.out}/episode_* -o {args.out}/demos.hdf5 --image-size {size} "
          f"--cameras {' '.join(args.cameras)} --arm-command-topic /mail/expert/arm_target "
          f"--gripper-command-topic /mail/expert/gripper_target")
    return 0
