"""language_node: /mail/instruction (std_msgs/String) -> /mail/instruction_embedding.

Both topics are reliable and transient-local, so a goal published from the command line before
the pipeline is up still reaches it:
    ros2 topic pub --once /mail/instruction std_msgs/msg/String "{data: 'pick up the red cube'}"
"""

from __future__ import annotations

from rclpy.node import Node
from std_msgs.msg import Header, String

from mail_ros.language.encoders import TextEncoderError, load_text_encoder
from mail_ros.msg import InstructionEmbedding
from mail_ros.nodes.common import ERROR, GOAL_QOS, OK, WARN, Diagnostics, declare, run_node


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
        self.max_chars = declare(self, "max_chars", 512, "Longest accepted instruction, in characters")
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
        self.publisher = self.create_publisher(InstructionEmbedding, "mail/instruction_embedding", GOAL_QOS)
        self.create_subscription(String, "mail/instruction", self._on_instruction, GOAL_QOS)

    def _on_instruction(self, msg: String) -> None:
        try:
            text = validate_instruction(msg.data, self.max_chars)
        except ValueError as exc:
            self.get_logger().error(f"rejected instruction: {exc}")
            self.diagnostics.set(WARN, f"rejected instruction: {exc}")
            return
        if self.encoder is None:
            self.get_logger().error(f"cannot encode {text!r}: no text encoder loaded")
            return
        try:
            vector = self.encoder.encode([text])[0]
        except TextEncoderError as exc:
            self.get_logger().error(f"cannot encode {text!r}: {exc}")
            self.diagnostics.set(WARN, f"cannot encode instruction: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this instruction is lost, not the node
            self.get_logger().error(f"text encoder failed on {text!r}: {type(exc).__name__}: {exc}")
            self.diagnostics.set(ERROR, f"text encoder failed: {type(exc).__name__}: {exc}")
            return
        out = InstructionEmbedding(header=Header(stamp=self.get_clock().now().to_msg()), text=text,
                                   encoder=self.encoder.name, embedding=[float(v) for v in vector])
        self.publisher.publish(out)
        self.get_logger().info(f"new goal: {text!r}")
        self.diagnostics.set(OK, "goal published", instruction=text, encoder=self.encoder.name)


def main(argv=None) -> int:
    return run_node(LanguageNode, argv)


if __name__ == "__main__":
    raise SystemExit(main())
