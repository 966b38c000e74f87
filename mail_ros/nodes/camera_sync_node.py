"""camera_sync_node: N cameras + /joint_states -> time-aligned /mail/observation at the policy rate.

Each incoming message is converted on arrival (decode, rgb8, resize to the model resolution;
joints selected by name) by the core ObservationBuilder, then aligned by header stamp by the
core StreamAligner: the same two pieces the bag converter and offline replay use, so training,
replay and deployment see identical observations. Every message is accounted for: used, or
dropped with a reason (invalid, stamped ahead of this node's clock, no match within max_skew,
decimated to the policy rate, late, unused), reported on /diagnostics, whose level and rates
describe the last report period.

A message stamped further ahead of the node clock than ``max_stamp_lead`` is refused: its
clock disagrees, and aligned by stamp it would pair an image with joints from another moment.
When the node clock goes backwards (a restarted simulator, a looping bag under sim time), the
aligner starts afresh instead of waiting for stamps to pass the old ones again.
"""

from __future__ import annotations

import array
import dataclasses
import math
import time
from collections import Counter

from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Header

from mail_ros.msg import Observation as ObservationMsg
from mail_ros.nodes.common import (ERROR, OK, PIPELINE_QOS, WARN, Diagnostics, Parameter, declare, now_ns,
                                   ns_to_time, run_node, stamp_ns)
from mail_ros.policy.checkpoint import CheckpointError, describe_checkpoint
from mail_ros.spec import ObservationSpec
from mail_ros.sync.alignment import DEFAULT_MAX_SKEW, AlignedSet, AlignerConfig, StreamAligner
from mail_ros.sync.image import rgb_to_image_fields
from mail_ros.sync.observation import JOINT_STATES, ObservationBuilder, ObservationError
from mail_ros.sync.stamps import DEFAULT_MAX_STAMP_LEAD, StampGate, ns_to_seconds, seconds_to_ns


class CameraSyncNode(Node):
    def __init__(self, **kwargs):
        super().__init__("camera_sync_node", **kwargs)
        checkpoint = declare(self, "checkpoint", "", "Checkpoint directory; cameras, image size, joints and "
                             "policy rate are read from its config.json")
        cameras = declare(self, "cameras", Parameter.Type.STRING_ARRAY,
                          "Camera names, overriding the checkpoint's list (the first is the time reference)")
        height = declare(self, "image_height", 0, "Model image height when no checkpoint is given (0 = 128)",
                         low=0)
        width = declare(self, "image_width", 0, "Model image width when no checkpoint is given (0 = 128)",
                        low=0)
        rate = declare(self, "rate_hz", 0.0, "Observation rate; 0 = the checkpoint's policy rate", low=0.0)
        self.max_skew = declare(self, "max_skew", DEFAULT_MAX_SKEW, "Largest allowed |stamp difference| (s) "
                                "between a member of a set and the reference camera (as `mail-ros convert` "
                                "used for the training data)", low=0.0)
        self.max_stamp_lead = declare(self, "max_stamp_lead", DEFAULT_MAX_STAMP_LEAD, "Messages stamped further than this (s) "
                                      "ahead of the node clock are refused: their clock disagrees",
                                      low=0.0)
        latency = declare(self, "latency_allowance", 0.05, "How long (s) past ref stamp + max_skew to wait for "
                          "late messages before deciding a set", low=0.0)
        compressed = declare(self, "compressed", False, "Subscribe to <camera>/image_raw/compressed "
                             "(sensor_msgs/CompressedImage) instead of raw images")
        image_topic = declare(self, "image_topic_format", "/cameras/{camera}/image_raw",
                              "Image topic per camera; {camera} is replaced by the camera name")

        spec = ObservationSpec()
        try:
            if checkpoint:
                spec = describe_checkpoint(checkpoint).observation
            overrides = {}
            cameras = [c for c in (cameras or []) if c]
            if cameras:
                overrides["cameras"] = tuple(cameras)
            if height or width:
                overrides["image_size"] = (height or spec.image_size[0], width or spec.image_size[1])
            if rate > 0:
                overrides["rate_hz"] = rate
            spec = dataclasses.replace(spec, **overrides)
            self.stamp_gate = StampGate(self.max_stamp_lead)
        except (CheckpointError, ValueError) as exc:
            raise SystemExit(f"camera_sync_node: cannot configure: {exc}") from exc
        self.spec = spec
        self.builder = ObservationBuilder(spec)
        self.aligner = StreamAligner(AlignerConfig(streams=self.builder.streams, max_skew=self.max_skew,
                                                   period=spec.period, latency_allowance=latency))
        self.invalid: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.published = 0
        self.clock_resets = 0
        self._latest_now = -math.inf  # the node clock's high-water mark (ns), to notice it going backwards
        self._backwards_tolerance = seconds_to_ns(latency)
        # Totals at the previous report: the report describes the period since then.
        self._last_report = (time.monotonic(), 0, Counter(), Counter())

        self.publisher = self.create_publisher(ObservationMsg, "mail/observation", PIPELINE_QOS)
        for camera in spec.cameras:
            topic = image_topic.format(camera=camera) + ("/compressed" if compressed else "")
            self.create_subscription(CompressedImage if compressed else Image, topic,
                                     lambda msg, camera=camera: self._on_message(camera, msg),
                                     qos_profile_sensor_data)
        self.create_subscription(JointState, "/joint_states",
                                 lambda msg: self._on_message(JOINT_STATES, msg), qos_profile_sensor_data)
        # Decide pending sets even when a stream has stopped (its frames are then dropped as no_match).
        self.create_timer(0.02, self._poll)
        self.diagnostics = Diagnostics(self)
        self.create_timer(1.0, self._report)
        self.get_logger().info(
            f"aligning cameras {list(spec.cameras)} + joint_states at {spec.rate_hz:g} Hz, "
            f"max skew {self.max_skew * 1e3:.0f} ms, model resolution {spec.image_size[0]}x{spec.image_size[1]}")

    def _on_message(self, stream: str, msg) -> None:
        self.received[stream] += 1
        stamp, now = stamp_ns(msg.header.stamp), self._now()
        refusal = self.stamp_gate.check(stamp, now)
        if refusal is not None:
            self._reject(stream, refusal, self.stamp_gate.explain(refusal, stamp, now, "max_stamp_lead"))
            return
        try:
            payload = self.builder.prepare(stream, msg)
        except ObservationError as exc:
            self._reject(stream, "invalid", str(exc))
            return
        self.aligner.push(stream, stamp, payload)
        self._poll()

    def _reject(self, stream: str, reason: str, detail: str) -> None:
        self.invalid[f"{stream}:{reason}"] += 1
        self.get_logger().warning(f"dropping {stream} message ({reason}): {detail}", throttle_duration_sec=2.0)
        self.diagnostics.set(WARN, f"dropping {stream} messages: {reason}")

    def _now(self) -> int:
        """The node clock (ns); a jump back restarts the alignment (see the module docstring)."""
        now = now_ns(self)
        if now < self._latest_now - self._backwards_tolerance:
            self.get_logger().warning(f"the clock went back {ns_to_seconds(self._latest_now - now):.3f} s: "
                                      "restarting the alignment", throttle_duration_sec=2.0)
            self.aligner.reset()
            self.clock_resets += 1
            self._latest_now = now
        self._latest_now = max(self._latest_now, now)
        return now

    def _poll(self) -> None:
        for aligned in self.aligner.poll(self._now()):
            self.publisher.publish(self._to_msg(aligned))
            self.published += 1

    def _to_msg(self, aligned: AlignedSet) -> ObservationMsg:
        observation = self.builder.build(aligned)
        msg = ObservationMsg(header=Header(stamp=ns_to_time(observation.stamp)))
        msg.camera_names = list(self.spec.cameras)
        skew = aligned.skew
        for camera in self.spec.cameras:
            fields = rgb_to_image_fields(observation.images[camera])
            image = Image(header=Header(stamp=ns_to_time(aligned.members[camera][0]), frame_id=camera),
                          height=fields["height"], width=fields["width"], encoding=fields["encoding"],
                          is_bigendian=0, step=fields["step"])
            image.data = array.array("B", fields["data"])
            msg.images.append(image)
            msg.camera_skew.append(float(skew[camera]))
        positions = observation.joint_positions
        msg.joint_state.header.stamp = ns_to_time(aligned.members[JOINT_STATES][0])
        msg.joint_state.name = list(self.spec.joint_names)
        msg.joint_state.position = [float(v) for v in positions]
        # Not carried, but never empty: Fast CDR pads an empty float64[] in a way rosbags cannot
        # read back, and observations get recorded.
        msg.joint_state.velocity = [math.nan] * len(positions)
        msg.joint_state.effort = [math.nan] * len(positions)
        msg.joint_state_skew = float(skew[JOINT_STATES])
        return msg

    def _report(self) -> None:
        then, published, received, invalid = self._last_report
        now = time.monotonic()
        elapsed = max(now - then, 1e-9)
        new_received, new_invalid = self.received - received, self.invalid - invalid
        new_published = self.published - published
        self._last_report = (now, self.published, self.received.copy(), self.invalid.copy())
        values = {"observations_published": self.published, "observation_rate_hz": f"{new_published / elapsed:.2f}",
                  "clock_resets": self.clock_resets}
        for stream in self.builder.streams:
            values[f"{stream}.rate_hz"] = f"{new_received[stream] / elapsed:.2f}"
            values[f"{stream}.received"] = self.received[stream]  # since start: senders can compare counts
        for key, count in self.invalid.items():
            values[f"{key}.dropped"] = count
        values["sync"] = self.aligner.stats.to_dict()
        silent = [s for s in self.builder.streams if new_received[s] == 0]
        if silent:
            self.diagnostics.set(ERROR, f"no messages from {silent} in the last {elapsed:.1f} s", **values)
        elif new_published == 0:
            self.diagnostics.set(WARN, f"receiving, but no aligned set in the last {elapsed:.1f} s", **values)
        elif new_invalid:
            self.diagnostics.set(WARN, f"publishing; invalid messages dropped: {dict(new_invalid)}", **values)
        else:
            self.diagnostics.set(OK, "publishing aligned observations", **values)


def main(argv=None) -> int:
    return run_node(CameraSyncNode, argv)


if __name__ == "__main__":
    raise SystemExit(main())
