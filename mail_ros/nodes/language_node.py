"""language_node: goals in, /mail/instruction_embedding out.

Two ways in, both ending in the same checks (validate, encode, publish):

- the ~/set_goal service (mail_ros/srv/SetGoal), which answers accepted, or refused with the
  reason, so a goal is never silently lost:
    ros2 service call /language_node/set_goal mail_ros/srv/SetGoal "{instruction: 'pick up the red cube'}"
- the /mail/instruction topic (std_msgs/String), matched whatever durability the publisher uses
  (ros2 topic pub's default is transient-local on Humble, volatile from Iron on); a goal published
  transient-local before this node started still arrives, once:
    ros2 topic pub --once -w 1 --keep-alive 3 /mail/instruction std_msgs/msg/String "{data: 'pick up the red cube'}"

The embedding is published reliable and transient-local, so nodes that start later get the goal.
"""

from __future__ import annotations

from rclpy.node import Node
from std_msgs.msg import Header, String

from mail_ros.language.encoders import TextEncoderError, load_text_encoder
from mail_ros.language.goals import DEFAULT_WINDOW
from mail_ros.msg import InstructionEmbedding
from mail_ros.nodes.common import (ERROR, GOAL_QOS, OK, WARN, Diagnostics, declare, run_node,
                                   subscribe_goals_once)
from mail_ros.srv import SetGoal


def validate_instruction(text, max_chars: int) -> str:
    """The instruction to encode, or ValueError saying why it is rejected."""
    if not isinstance(text, str):
        raise ValueError(f"instruction is not text ({type(text).__name__})")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise ValueError("instruction is empty")
    if len(cleaned) > max_chars:
        raise ValueError(f"instruction has {len(cleaned)} characters, more than max_chars={max_chars}")
    if not cleaned.isprintable():
        raise ValueError("instruction contains non-printable characters")
    return cleaned


class LanguageNode(Node):
    def __init__(self, **kwargs):
        super().__init__("language_node", **kwargs)
        encoder = declare(self, "encoder", "minilm", "Text encoder: 'minilm' (packaged all-MiniLM-L6-v2) or "
                          "'clip:<local folder or cached model id>' (CLIP text features); it must match the "
                          "checkpoint's language_encoder")
        device = declare(self, "device", "cpu", "Torch device for the encoder")
        self.max_chars = declare(self, "max_chars", 512, "Longest accepted instruction, in characters", low=1)
        self.diagnostics = Diagnostics(self)
        self.encoder = None
        try:
            self.encoder = load_text_encoder(encoder, device=device)
        except TextEncoderError as exc:
            # Keep running: the error is visible on /diagnostics and no embedding is ever published.
            self.get_logger().error(f"cannot load text encoder {encoder!r}: {exc}")
            self.diagnostics.set(ERROR, f"text encoder unavailable: {exc}")
        else:
            self.get_logger().info(f"text encoder {self.encoder.name} ({self.encoder.dim}-d) on {device}")
            self.diagnostics.set(OK, "waiting for an instruction", encoder=self.encoder.name)
        duplicate_window = declare(self, "duplicate_window", DEFAULT_WINDOW,
                                   "Seconds within which an instruction equal to one received on the other "
                                   "/mail/instruction subscription (transient-local vs volatile) is taken for its "
                                   "second copy and not applied again", low=0.0)
        self.publisher = self.create_publisher(InstructionEmbedding, "mail/instruction_embedding", GOAL_QOS)
        try:
            subscribe_goals_once(self, String, "mail/instruction", lambda msg: self.set_goal(msg.data),
                                 duplicate_window)
        except ValueError as exc:
            raise SystemExit(f"language_node: duplicate_window: {exc}") from exc
        self.create_service(SetGoal, "~/set_goal", self._on_set_goal)

    def _on_set_goal(self, request: SetGoal.Request, response: SetGoal.Response) -> SetGoal.Response:
        response.accepted, response.message = self.set_goal(request.instruction)
        return response

    def set_goal(self, instruction) -> tuple[bool, str]:
        """Validate, encode and publish ``instruction``: (published?, what was published or why not)."""
        try:
            text = validate_instruction(instruction, self.max_chars)
        except ValueError as exc:
            self.get_logger().error(f"rejected instruction: {exc}")
            self.diagnostics.set(WARN, f"rejected instruction: {exc}")
            return False, f"rejected instruction: {exc}"
        if self.encoder is None:
            self.get_logger().error(f"cannot encode {text!r}: no text encoder loaded")
            return False, f"cannot encode {text!r}: no text encoder loaded (see the node's log)"
        try:
            vector = self.encoder.encode([text])[0]
        except TextEncoderError as exc:
            self.get_logger().error(f"cannot encode {text!r}: {exc}")
            self.diagnostics.set(WARN, f"cannot encode instruction: {exc}")
            return False, f"cannot encode {text!r}: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this instruction is lost, not the node
            self.get_logger().error(f"text encoder failed on {text!r}: {type(exc).__name__}: {exc}")
            self.diagnostics.set(ERROR, f"text encoder failed: {type(exc).__name__}: {exc}")
            return False, f"text encoder failed on {text!r}: {type(exc).__name__}: {exc}"
        out = InstructionEmbedding(header=Header(stamp=self.get_clock().now().to_msg()), text=text,
                                   encoder=self.encoder.name, embedding=[float(v) for v in vector])
        self.publisher.publish(out)
        self.get_logger().info(f"new goal: {text!r}")
        self.diagnostics.set(OK, "goal published", instruction=text, encoder=self.encoder.name)
        return True, f"goal {text!r} published on {self.publisher.topic_name} ({self.encoder.name})"


def main(argv=None) -> int:
    return run_node(LanguageNode, argv)


if __name__ == "__main__":
    raise SystemExit(main())
