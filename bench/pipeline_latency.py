"""End-to-end latency of the ROS 2 pipeline across separate processes, and executor tick jitter.

Starts camera_sync_node, language_node, policy_node and executor_node as separate processes (the
installed console scripts, as `ros2 run` would) with a demo-size checkpoint, plays two cameras
(30 Hz, 128x128 bgr8) and a robot (joint states at 100 Hz that follow the commands) from this
process, publishes an instruction, and measures:

  camera -> chunk     camera stamp of the newest observation in a chunk -> the chunk's arrival here
                      (alignment, conversion, policy inference, two DDS hops)
  chunk -> command    a chunk's arrival -> the next JointTrajectory's arrival (executor tick wait)
  camera -> command   the sum, per chunk: camera stamp -> the first command after the chunk
  tick interval       time between consecutive JointTrajectory messages (jitter of the executor
                      timer plus transport), against the nominal control period

    .venv/bin/python bench/pipeline_latency.py [--seconds 30] [--preset demo-d_ma-bc] [--mode ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(120 + os.getpid() % 80))

import rclpy  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Header, String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from mail_ros.msg import ActionChunk  # noqa: E402
from mail_ros.nodes.common import (COMMAND_QOS, GIL_SWITCH_INTERVAL, GOAL_QOS, PIPELINE_QOS, now_seconds,  # noqa: E402
                                   stamp_to_seconds)
from mail_ros.nodes.executor_node import FR3_HOME  # noqa: E402
from mail_ros.spec import FR3_ARM_JOINTS, FR3_FINGER_JOINTS  # noqa: E402

BIN = Path(sys.executable).parent


def percentiles(values_ms) -> str:
    v = np.asarray(values_ms)
    if v.size == 0:
        return "      -       -       -     0"
    return f"{np.percentile(v, 50):7.1f} {np.percentile(v, 99):7.1f} {v.max():7.1f} {v.size:5d}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measurement duration after warm-up")
    parser.add_argument("--preset", default="demo-d_ma-bc", help="policy preset (untrained weights)")
    parser.add_argument("--checkpoint", default=None, help="use this checkpoint instead of a preset")
    parser.add_argument("--mode", default="receding_horizon", help="executor mode")
    parser.add_argument("--control-rate", type=float, default=20.0)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mail_bench_"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = str(tmp / "ckpt")
        subprocess.run([str(BIN / "mail-ros"), "checkpoint", "init", "--preset", args.preset, "--out", checkpoint,
                        "--set", 'language.encoder="minilm:all-MiniLM-L6-v2"', "--set", "language.dim=384"],
                       check=True, stdout=subprocess.DEVNULL)
    nodes = {
        "camera_sync_node": ["-p", f"checkpoint:={checkpoint}"],
        "language_node": [],
        "policy_node": ["-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu"],
        "executor_node": ["-p", f"mode:={args.mode}", "-p", "gripper_mode:=trajectory",
                          "-p", f"control_rate_hz:={args.control_rate}"],
    }
    logs = {name: open(tmp / f"{name}.log", "w") for name in nodes}
    processes = [subprocess.Popen([str(BIN / name), "--ros-args", *params], stdout=logs[name], stderr=subprocess.STDOUT)
                 for name, params in nodes.items()]

    sys.setswitchinterval(GIL_SWITCH_INTERVAL)  # as every node does (run_node)
    rclpy.init()
    node = rclpy.create_node("pipeline_latency_bench")
    lock = threading.Lock()
    q = np.asarray(FR3_HOME, dtype=float)
    chunks: list[tuple[float, float]] = []  # (camera stamp, arrival) in ROS seconds
    commands: list[float] = []  # arrivals
    measuring = threading.Event()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8).tobytes() for _ in range(8)]
    image_pubs = [node.create_publisher(Image, f"/cameras/{c}/image_raw", qos_profile_sensor_data)
                  for c in ("agentview", "wrist")]
    joint_pub = node.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
    instruction_pub = node.create_publisher(String, "/mail/instruction", GOAL_QOS)
    now = lambda: now_seconds(node)  # noqa: E731

    def publish_images():
        stamp = node.get_clock().now().to_msg()
        data = frames[int(time.monotonic() * 30) % len(frames)]
        for publisher in image_pubs:
            publisher.publish(Image(header=Header(stamp=stamp), height=128, width=128, encoding="bgr8",
                                    step=384, data=data))

    def publish_joints():
        with lock:
            positions = np.concatenate([q, [0.04, 0.04]]).tolist()
        names = list(FR3_ARM_JOINTS + FR3_FINGER_JOINTS)
        joint_pub.publish(JointState(header=Header(stamp=node.get_clock().now().to_msg()), name=names,
                                     position=positions, velocity=[0.0] * 9, effort=[0.0] * 9))

    def on_chunk(msg: ActionChunk):
        if measuring.is_set():
            chunks.append((stamp_to_seconds(msg.header.stamp), now()))

    def on_command(msg: JointTrajectory):
        nonlocal q
        with lock:
            if len(msg.points) == 1:
                q = np.array(msg.points[0].positions)
        if measuring.is_set():
            commands.append(now())

    node.create_timer(1 / 30, publish_images)
    node.create_timer(0.01, publish_joints)
    node.create_subscription(ActionChunk, "/mail/action_chunk", on_chunk, PIPELINE_QOS)
    node.create_subscription(JointTrajectory, "/fr3_arm_controller/joint_trajectory", on_command, COMMAND_QOS)
    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        deadline = time.monotonic() + 120
        while node.count_subscribers("/mail/instruction") < 1 or node.count_publishers("/mail/action_chunk") < 1:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise SystemExit(f"pipeline did not come up; logs in {tmp}")
            time.sleep(0.2)
        time.sleep(3.0)  # let the policy finish its warm-up
        instruction_pub.publish(String(data="pick up the red cube"))
        time.sleep(5.0)  # ramp-in and steady state
        measuring.set()
        time.sleep(args.seconds)
        measuring.clear()
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)

    arrivals = np.asarray(commands)
    camera_to_chunk, chunk_to_command, camera_to_command = [], [], []
    for stamp, arrival in chunks:
        later = arrivals[arrivals >= arrival]
        camera_to_chunk.append((arrival - stamp) * 1e3)
        if later.size:
            chunk_to_command.append((later[0] - arrival) * 1e3)
            camera_to_command.append((later[0] - stamp) * 1e3)
    ticks = np.diff(arrivals) * 1e3
    period = 1e3 / args.control_rate
    print(f"pipeline latency: {args.checkpoint or args.preset}, executor {args.mode} at {args.control_rate:g} Hz, "
          f"{args.seconds:g} s, separate processes, CPU")
    print(f"{'':20s} {'p50 ms':>7s} {'p99 ms':>7s} {'max ms':>7s} {'n':>5s}")
    print(f"{'camera -> chunk':20s} {percentiles(camera_to_chunk)}")
    print(f"{'chunk -> command':20s} {percentiles(chunk_to_command)}")
    print(f"{'camera -> command':20s} {percentiles(camera_to_command)}")
    print(f"{'tick interval':20s} {percentiles(ticks)}   (nominal {period:.1f} ms; "
          f"|jitter| p99 {np.percentile(np.abs(ticks - period), 99) if ticks.size else float('nan'):.1f} ms)")
    print(f"node logs: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
