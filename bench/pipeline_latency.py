"""End-to-end latency and camera transport of the ROS 2 pipeline across separate processes.

Starts camera_sync_node, language_node, policy_node and executor_node as separate processes (the
installed console scripts, as `ros2 run` would) with a demo-size checkpoint, one camera publisher
process per camera (as camera drivers run; rgb8 Image, or JPEG CompressedImage with
--compressed), and plays the robot (joint states at 100 Hz that follow the commands) from this
process. It publishes an instruction and measures, per transport variant, in one run:

  frames received/sent  per camera: frames camera_sync_node received (its /diagnostics) / frames
                        the camera process published, over the whole camera run
  camera -> chunk       camera stamp of the newest observation in a chunk -> the chunk's arrival here
                        (alignment, conversion, policy inference, two DDS hops)
  chunk -> command      a chunk's arrival -> the next JointTrajectory's arrival (executor tick wait)
  camera -> command     the sum, per chunk: camera stamp -> the first command after the chunk
  tick interval         time between consecutive JointTrajectory messages

Variants (--variants): ``default`` (Fast DDS's built-in transports), ``shm`` (every process
loads config/fastdds_shm.xml, as mail_ros's launch files apply it), each with ``+jpeg`` for
CompressedImage input. Each variant runs in a fresh set of processes (Fast DDS reads its profile
at start-up); the summary gives ratios against the first variant.

    .venv/bin/python bench/pipeline_latency.py --cameras agentview,wrist,side --image-size 480x640 \\
        --camera-rate 30 --variants default,shm,shm+jpeg --seconds 20
"""

from __future__ import annotations

import argparse
import json
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

BIN = Path(sys.executable).parent
PROFILE = Path(__file__).resolve().parents[1] / "config" / "fastdds_shm.xml"
PROFILE_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")
JPEG_QUALITY = 90
WARM_UP = 8.0  # s of camera frames before the instruction (policy warm-up, ramp-in)


def percentiles(values_ms) -> str:
    v = np.asarray(values_ms)
    if v.size == 0:
        return "      -       -       -     0"
    return f"{np.percentile(v, 50):7.1f} {np.percentile(v, 99):7.1f} {v.max():7.1f} {v.size:5d}"


def size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


# --- one camera process -----------------------------------------------------------------------
def camera_frames(name: str, height: int, width: int, jpeg: bool) -> list[bytes]:
    """Eight rendered views of the test bed (so JPEG sizes are those of a real scene)."""
    from mail_ros.sim.franka_sim import CAMERAS, FrankaSim, SimConfig

    sim = FrankaSim(SimConfig(cameras=(CAMERAS[sum(map(ord, name)) % len(CAMERAS)],), image_size=(height, width)))
    frames = []
    for seed in range(8):
        sim.reset(seed)
        (rgb,) = sim.render().values()
        if jpeg:
            import cv2

            ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            frames.append(encoded.tobytes())
        else:
            frames.append(np.ascontiguousarray(rgb).tobytes())
    sim.close()
    return frames


def run_camera(args) -> int:
    """Publish --frames frames at --camera-rate from --start (wall clock), then report the count."""
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import Header

    height, width = size(args.image_size)
    frames = camera_frames(args.camera, height, width, args.jpeg)
    rclpy.init()
    node = rclpy.create_node(f"bench_camera_{args.camera}")
    topic = f"/cameras/{args.camera}/image_raw" + ("/compressed" if args.jpeg else "")
    publisher = node.create_publisher(CompressedImage if args.jpeg else Image, topic, qos_profile_sensor_data)
    while publisher.get_subscription_count() == 0 or time.time() < args.start:
        time.sleep(0.005)
    sent = 0
    for i in range(args.frames):
        time.sleep(max(0.0, args.start + i / args.camera_rate - time.time()))  # no busy wait: CPU is scarce
        header = Header(stamp=node.get_clock().now().to_msg(), frame_id=args.camera)
        data = frames[i % len(frames)]
        if args.jpeg:
            publisher.publish(CompressedImage(header=header, format="jpeg", data=data))
        else:
            publisher.publish(Image(header=header, height=height, width=width, encoding="rgb8", step=3 * width, data=data))
        sent += 1
    print(json.dumps({"camera": args.camera, "sent": sent, "bytes": int(np.mean([len(f) for f in frames]))}), flush=True)
    time.sleep(3.0)  # let the last frames drain before the participant goes
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def run_probe(args) -> int:
    """A subscriber in a process of its own that takes the serialized bytes (no deserialization,
    no conversion): what the transport delivers, without camera_sync_node's per-frame work (on a
    loaded machine the node may lose frames to CPU, not to DDS)."""
    import rclpy
    import rclpy.task
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CompressedImage, Image

    rclpy.init()
    node = rclpy.create_node("bench_transport_probe")
    counts = {name: 0 for name in args.probe.split(",")}
    for name in counts:
        topic = f"/cameras/{name}/image_raw" + ("/compressed" if args.jpeg else "")
        node.create_subscription(CompressedImage if args.jpeg else Image, topic,
                                 lambda msg, name=name: counts.__setitem__(name, counts[name] + 1), qos_profile_sensor_data,
                                 raw=True)
    rclpy.spin_until_future_complete(node, rclpy.task.Future(), timeout_sec=args.probe_seconds)
    print(json.dumps(counts), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


# --- one variant: the pipeline, the cameras and the robot ---------------------------------------
def run_variant(args) -> int:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Header, String
    from trajectory_msgs.msg import JointTrajectory

    from mail_ros.msg import ActionChunk
    from mail_ros.nodes.common import (COMMAND_QOS, GIL_SWITCH_INTERVAL, GOAL_QOS, PIPELINE_QOS, now_seconds,
                                       stamp_to_seconds)
    from mail_ros.spec import FR3_HOME
    from mail_ros.spec import FR3_ARM_JOINTS, FR3_FINGER_JOINTS

    jpeg = args.run.endswith("+jpeg")
    cameras = args.cameras.split(",")
    tmp = Path(tempfile.mkdtemp(prefix=f"mail_bench_{args.run.replace('+', '_')}_"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = str(tmp / "ckpt")
        subprocess.run([str(BIN / "mail-ros"), "checkpoint", "init", "--preset", args.preset, "--out", checkpoint,
                        "--set", 'language.encoder="minilm:all-MiniLM-L6-v2"', "--set", "language.dim=384",
                        "--set", f"spec.observation.cameras={json.dumps(cameras)}"],
                       check=True, stdout=subprocess.DEVNULL)
    nodes = {
        "camera_sync_node": ["-p", f"checkpoint:={checkpoint}", "-p", f"compressed:={str(jpeg).lower()}"],
        "language_node": [],
        "policy_node": ["-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu"],
        "executor_node": ["-p", f"mode:={args.mode}", "-p", "gripper_mode:=trajectory",
                          "-p", f"control_rate_hz:={args.control_rate}"],
    }
    if args.transport_only:  # frames delivered to camera_sync_node without the policy's CPU load
        nodes = {"camera_sync_node": nodes["camera_sync_node"]}
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
    received: dict[str, int] = {}  # camera -> frames camera_sync_node received, from its diagnostics
    measuring = threading.Event()
    joint_pub = node.create_publisher(JointState, "/joint_states", qos_profile_sensor_data)
    instruction_pub = node.create_publisher(String, "/mail/instruction", GOAL_QOS)
    now = lambda: now_seconds(node)  # noqa: E731

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

    def on_diagnostics(msg: DiagnosticArray):
        for status in msg.status:
            if status.name.endswith("camera_sync_node"):
                for kv in status.values:
                    camera = kv.key.removesuffix(".received")
                    if camera in cameras:
                        received[camera] = int(kv.value)

    node.create_timer(0.01, publish_joints)
    node.create_subscription(ActionChunk, "/mail/action_chunk", on_chunk, PIPELINE_QOS)
    node.create_subscription(JointTrajectory, "/fr3_arm_controller/joint_trajectory", on_command, COMMAND_QOS)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 50)
    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    sent, probed = {}, {}
    camera_procs = []
    try:
        deadline = time.monotonic() + 180
        while not args.transport_only and (node.count_subscribers("/mail/instruction") < 1
                                           or node.count_publishers("/mail/action_chunk") < 1) \
                or node.count_publishers("/mail/observation") < 1:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise SystemExit(f"pipeline did not come up; logs in {tmp}")
            time.sleep(0.2)
        frames = int((WARM_UP + args.seconds) * args.camera_rate)
        start = time.time() + 5.0  # the camera processes render their frames and discover the graph first
        probe = subprocess.Popen(
            [sys.executable, __file__, "--probe", args.cameras, "--probe-seconds", str(WARM_UP + args.seconds + 12.0)]
            + (["--jpeg"] if jpeg else []), stdout=subprocess.PIPE, stderr=open(tmp / "probe.log", "w"), text=True)
        camera_procs = [subprocess.Popen(
            [sys.executable, __file__, "--camera", name, "--frames", str(frames), "--start", str(start),
             "--camera-rate", str(args.camera_rate), "--image-size", args.image_size] + (["--jpeg"] if jpeg else []),
            stdout=subprocess.PIPE, stderr=open(tmp / f"camera_{name}.log", "w"), text=True) for name in cameras]
        time.sleep(max(0.0, start - time.time()) + WARM_UP - 5.0)
        instruction_pub.publish(String(data="pick up the red cube"))
        time.sleep(5.0)  # ramp-in and steady state
        measuring.set()
        time.sleep(args.seconds - 5.0)
        measuring.clear()
        for proc in camera_procs:
            out, _ = proc.communicate(timeout=120)
            report = json.loads(out.strip().splitlines()[-1])
            sent[report["camera"]] = report
        time.sleep(2.5)  # a diagnostics period after the last frame
        probed = json.loads(probe.communicate(timeout=120)[0].strip().splitlines()[-1])
    finally:
        for proc in camera_procs:
            if proc.poll() is None:
                proc.kill()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a starved machine; the measurement is already taken
                print(f"{process.args[0]} did not exit within 30 s of SIGTERM; killed", file=sys.stderr)
                process.kill()
                process.wait()

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
    print(f"[{args.run}] {args.checkpoint or args.preset}, executor {args.mode} at {args.control_rate:g} Hz, "
          f"cameras {cameras} {args.image_size} at {args.camera_rate:g} Hz, {args.seconds:g} s")
    print(f"{'':20s} {'p50 ms':>7s} {'p99 ms':>7s} {'max ms':>7s} {'n':>5s}")
    print(f"{'camera -> chunk':20s} {percentiles(camera_to_chunk)}")
    print(f"{'chunk -> command':20s} {percentiles(chunk_to_command)}")
    print(f"{'camera -> command':20s} {percentiles(camera_to_command)}")
    print(f"{'tick interval':20s} {percentiles(ticks)}   (nominal {period:.1f} ms)")
    for camera in cameras:
        print(f"{camera:20s} received {received.get(camera, 0)} (camera_sync_node), {probed.get(camera, 0)} (probe) "
              f"/ sent {sent.get(camera, {}).get('sent', 0)} frames")
    print(f"node logs: {tmp}")
    result = {"variant": args.run, "received": {c: received.get(c, 0) for c in cameras}, "probed": probed,
              "sent": {c: sent.get(c, {}).get("sent", 0) for c in cameras},
              "frame_bytes": int(np.mean([s.get("bytes", 0) for s in sent.values()])) if sent else 0,
              "camera_to_command_ms": camera_to_command, "chunks": len(chunks)}
    (Path(args.json)).write_text(json.dumps(result))
    return 0


# --- all variants -------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement duration after warm-up")
    parser.add_argument("--preset", default="demo-d_ma-bc", help="policy preset (untrained weights)")
    parser.add_argument("--checkpoint", default=None, help="use this checkpoint (its cameras) instead of a preset")
    parser.add_argument("--mode", default="receding_horizon", help="executor mode")
    parser.add_argument("--control-rate", type=float, default=20.0)
    parser.add_argument("--cameras", default="agentview,wrist", help="comma-separated camera names")
    parser.add_argument("--image-size", default="128x128", help="camera resolution HxW")
    parser.add_argument("--camera-rate", type=float, default=30.0)
    parser.add_argument("--transport-only", action="store_true", help="start only camera_sync_node (no policy, "
                        "executor or language node): frame delivery without the inference load; no latencies")
    parser.add_argument("--variants", default="default,shm", help="comma-separated: default, shm, default+jpeg, "
                        "shm+jpeg")
    # internal: one variant, or one camera process
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--camera", help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--jpeg", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.camera:
        return run_camera(args)
    if args.probe:
        return run_probe(args)
    if args.run:
        return run_variant(args)

    results = []
    forwarded = [a for a in sys.argv[1:]]
    for variant in args.variants.split(","):
        if variant.split("+")[0] not in ("default", "shm") or variant.split("+")[1:] not in ([], ["jpeg"]):
            parser.error(f"unknown variant {variant!r}")
        env = {k: v for k, v in os.environ.items() if k not in PROFILE_VARIABLES}
        if variant.startswith("shm"):
            env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(PROFILE)  # Kilted's Fast DDS 3 name (mail_ros.transport)
        out = Path(tempfile.mkstemp(suffix=".json")[1])
        subprocess.run([sys.executable, __file__, *forwarded, "--run", variant, "--json", str(out)], env=env, check=True)
        results.append(json.loads(out.read_text()))

    print(f"\ncamera transport: {args.cameras} {args.image_size} at {args.camera_rate:g} Hz, one process per camera, "
          f"{'camera_sync_node only' if args.transport_only else 'the whole pipeline'}, {args.seconds:g} s measured, ROS_AUTOMATIC_DISCOVERY_RANGE={os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE']}")
    print("received/sent: frames camera_sync_node received (and a plain subscriber process, 'probe') of those "
          "each camera process published")
    print(f"{'variant':12s} {'frame KiB':>9s} {'camera_sync_node recv/sent':>28s} {'probe recv/sent':>24s} "
          f"{'delivered':>9s} {'cam->cmd p50':>12s} {'p99':>7s} {'chunks':>6s}")
    base = None
    for r in results:
        lat = np.asarray(r["camera_to_command_ms"])
        p50, p99 = (np.percentile(lat, 50), np.percentile(lat, 99)) if lat.size else (np.nan, np.nan)
        node = " ".join(f"{r['received'][c]}/{r['sent'][c]}" for c in r["sent"])
        probe = " ".join(f"{r['probed'].get(c, 0)}/{r['sent'][c]}" for c in r["sent"])
        delivered = sum(r["received"].values()) / max(1, sum(r["sent"].values()))
        base = delivered if base is None else base
        print(f"{r['variant']:12s} {r['frame_bytes'] / 1024:9.0f} {node:>28s} {probe:>24s} {delivered:9.1%} "
              f"{p50:12.1f} {p99:7.1f} {r['chunks']:6d}")
    print("ratios against the first variant: delivered " + ", ".join(
        f"{r['variant']} {sum(r['received'].values()) / max(1, sum(r['sent'].values())) / max(base, 1e-9):.2f}x"
        for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
