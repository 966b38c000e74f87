"""Typed, validated configuration of a prompt-conditioned (ICIL) policy.

An :class:`ICILConfig` groups the observation/action contract, the image encoders (the same
:class:`VisionConfig` as MaIL), the sequence backbone (:class:`BackboneConfig`, decoder layout:
Mamba or its Transformer twin) and the prompt settings. The policy is streaming: it sees the
episode one observation at a time, so the contract's ``obs_horizon`` must be 1 (the recurrent
state or K/V cache is the history: the whole episode, or the newest ``live_window`` frames).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mail_ros.policy.config import (
    BackboneConfig,
    LanguageConfig,
    VisionConfig,
    check,
    check_bool,
    check_float,
    check_groups,
    check_int,
    check_relative_actions,
    fields_from_dict,
)
from mail_ros.spec import PolicySpec

__all__ = ["PromptConfig", "ICILConfig"]


@dataclass
class PromptConfig:
    """How demonstrations become the prompt."""

    # Prompt demonstrations per training example are drawn from 1 .. k_max; inference takes
    # any K (prompt-length extrapolation is what the evaluation measures).
    k_max: int = 4
    # Keep every dilation-th frame of a prompt demonstration (frames 0, d, 2d, ...; the last
    # frame is always kept): a d times shorter prompt for a coarser view of the demonstration.
    dilation: int = 1
    # FiLM the live frames' keypoints by a summary of the prompt (attention pooling over its
    # frames), as MaIL's FiLM conditions them on the instruction: without it the live keypoints
    # cannot depend on the task, so with look-alike cubes they cannot tell which one the prompt
    # moves. Training then caches the trunks' maps instead of keypoints and trains the keypoint
    # layers, the FiLM layers and the summary.
    film: bool = False
    # The prompt summary (model/icil.py PromptSummary, with film): attention heads, and the
    # hidden width of its per-frame value (0: linear).
    summary_heads: int = 1
    summary_hidden: int = 0
    # Training only, with film: weight of the task-agreement loss, a contrastive loss that makes
    # the summary of a sample's prompt closer to the summary of its live episode (read as a
    # prompt: another demonstration of the same task) than to those of the batch's episodes of
    # other tasks. 0: the chunk loss alone.
    agreement: float = 0.0

    def __post_init__(self) -> None:
        check_int(self.k_max, "prompt.k_max", 1)
        check_int(self.dilation, "prompt.dilation", 1)
        check_bool(self.film, "prompt.film")
        check_int(self.summary_heads, "prompt.summary_heads", 1)
        check_int(self.summary_hidden, "prompt.summary_hidden", 0)
        check_float(self.agreement, "prompt.agreement")
        check(self.agreement >= 0.0, f"prompt.agreement must be >= 0, got {self.agreement!r}")
        check(self.film or (self.summary_heads == 1 and self.summary_hidden == 0 and self.agreement == 0.0),
              "prompt.summary_heads, prompt.summary_hidden and prompt.agreement need prompt.film (the summary)")


@dataclass
class ICILConfig:
    """Everything needed to rebuild an ICIL policy."""

    spec: PolicySpec = field(default_factory=PolicySpec)
    vision: VisionConfig = field(default_factory=VisionConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # Optional: the instruction's embedding as one token at the start of the stream, before the
    # prompt, and with prompt.film added to the prompt summary that conditions the live keypoints
    # (prompt only when off, the default; prompt and instruction when on).
    language: LanguageConfig = field(default_factory=LanguageConfig)
    # Joint positions fused into every observation token (prompt and live). On by default: a
    # demonstration's joint trajectory is most of what it tells about the task.
    proprio: bool = True
    # Arm actions learned, and given in the prompt, as offsets from the frame's joint positions
    # (policy/action_frame.py, as MaIL's relative_actions); predict_chunk returns absolute
    # targets either way. Without proprio this is how the live joint positions reach the chunk.
    relative_actions: bool = False
    # Live frames the chunk is predicted from: 0, the whole episode (every live frame committed
    # after the prompt); W > 0, only the newest W, re-run each chunk from the prompt's state and
    # padded at the episode's start with copies of its first frame (MaIL's observation window,
    # with the prompt's state before it). A bounded window keeps the live context the
    # demonstrations taught however long the episode runs; a chunk then costs W + A tokens,
    # still independent of the prompt's length.
    live_window: int = 0

    def __post_init__(self) -> None:
        check_groups(self, self.groups())
        check_bool(self.proprio, "proprio")
        check_int(self.live_window, "live_window", 0)
        check_relative_actions(self.relative_actions, self.spec)
        check(
            self.backbone.layout == "decoder",
            f"backbone.layout must be 'decoder' for an ICIL policy (one causal stream), got {self.backbone.layout!r}",
        )
        check(
            self.spec.observation.obs_horizon == 1,
            "spec.observation.obs_horizon must be 1 for an ICIL policy: it streams one observation per step "
            f"and its recurrent state is the history, got {self.spec.observation.obs_horizon}",
        )
        check(self.backbone.d_model % self.prompt.summary_heads == 0,
              f"prompt.summary_heads ({self.prompt.summary_heads}) must divide backbone.d_model "
              f"({self.backbone.d_model})")
        check(not self.vision.film, "vision.film is not supported by ICIL policies (prompt frames are encoded "
              "without the instruction)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        return data

    @staticmethod
    def groups() -> dict[str, type]:
        """The grouped settings: field name -> dataclass."""
        return {"vision": VisionConfig, "backbone": BackboneConfig, "prompt": PromptConfig, "language": LanguageConfig}

    @classmethod
    def from_dict(cls, data: Any) -> "ICILConfig":
        """Inverse of :meth:`to_dict`; raises ConfigError on any missing, unknown or invalid field."""
        return cls(**fields_from_dict(cls, data, "ICIL policy config", cls.groups()))
