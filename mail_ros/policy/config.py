"""Typed, validated configuration of a MaIL policy (saved verbatim in every checkpoint).

A :class:`PolicyConfig` groups the observation/action contract (:class:`mail_ros.spec.PolicySpec`)
with the network: image encoders, sequence backbone, action head, language and proprioception.
Every group validates itself in ``__post_init__`` and raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from mail_ros.spec import PolicySpec, SpecError, is_finite_number, is_integer

__all__ = [
    "ConfigError",
    "VisionConfig",
    "BackboneConfig",
    "HeadConfig",
    "LanguageConfig",
    "PolicyConfig",
    "VARIANTS",
    "TIME_TOKENS",
    "check",
    "check_bool",
    "check_float",
    "check_int",
]

# variant name -> (backbone kind, layout)
VARIANTS = {
    "d_ma": ("mamba", "decoder"),
    "ed_ma": ("mamba", "encoder_decoder"),
    "d_tr": ("transformer", "decoder"),
    "ed_tr": ("transformer", "encoder_decoder"),
}
INITS = ("mamba", "reference")
# Where the DDPM step token sits in the decoder-only sequence; see HeadConfig.time_token.
TIME_TOKENS = ("first", "after_observations")


class ConfigError(ValueError):
    """A policy configuration value is invalid."""


# Field checks, shared with the trainer's configs. JSON gives 2.0 for an int field and Infinity
# or "false" as readily as the right value; each would build a broken model (a TypeError deep in
# torch, NaN or image-blind policies, a truthy "false"), so every field is checked for its type
# as well as its range.
def check(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def check_int(value: Any, name: str, minimum: int) -> None:
    check(is_integer(value) and value >= minimum, f"{name} must be an integer >= {minimum}, got {value!r}")


def check_float(value: Any, name: str) -> None:
    check(is_finite_number(value), f"{name} must be a finite number, got {value!r}")


def check_bool(value: Any, name: str) -> None:
    check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")


def check_relative_actions(value: Any, spec: PolicySpec) -> None:
    """``relative_actions`` is a bool, and when on some action names are observed joints."""
    check_bool(value, "relative_actions")
    if value:
        observed = set(spec.observation.joint_names)
        check(
            any(name in observed for name in spec.action.names),
            "relative_actions needs action names that are observed joints, but none of "
            f"{list(spec.action.names)} is in {list(spec.observation.joint_names)}",
        )


def _build(cls: type, data: Any, where: str) -> Any:
    check(isinstance(data, dict), f"{where} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    check(not unknown, f"{where} has unknown keys {unknown}; known: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def check_groups(config: Any, groups: dict[str, type]) -> None:
    """A policy config's ``spec`` is a PolicySpec and each of its ``groups`` (name -> dataclass) has its type."""
    check(isinstance(config.spec, PolicySpec), f"spec must be a PolicySpec, got {type(config.spec).__name__}")
    for name, group in groups.items():
        value = getattr(config, name)
        check(isinstance(value, group), f"{name} must be a {group.__name__}, got {type(value).__name__}")


def fields_from_dict(cls: type, data: Any, what: str, groups: dict[str, type]) -> dict[str, Any]:
    """The constructor arguments of the policy config ``cls`` from its ``to_dict()`` form: exactly
    its fields, with the spec and the ``groups`` rebuilt; ConfigError naming ``what`` otherwise."""
    check(isinstance(data, dict), f"{what} must be a JSON object, got {type(data).__name__}")
    required = {f.name for f in dataclasses.fields(cls)}
    missing, unknown = sorted(required - set(data)), sorted(set(data) - required)
    check(not missing and not unknown, f"{what}: missing keys {missing}, unknown keys {unknown}")
    try:
        spec = PolicySpec.from_dict(data["spec"])
    except (SpecError, TypeError) as exc:
        raise ConfigError(f"{what} 'spec': {exc}") from exc
    return dict(data, spec=spec, **{name: _build(group, data[name], name) for name, group in groups.items()})


@dataclass
class VisionConfig:
    """Per-camera ResNet-18 -> SpatialSoftmax -> Linear encoders."""

    resnet_width: int = 64  # channels of conv1; 64 is ResNet-18, smaller for CPU presets
    norm: str = "group"  # "group" (reference, groups = channels // 16) or "batch" (torchvision)
    num_keypoints: int = 32
    temperature: float = 1.0
    feature_dim: int = 128  # per-camera feature after Linear(2 * num_keypoints -> feature_dim)
    shared_encoder: bool = False  # reference: one encoder per camera
    # ResNet stem max-pool (reference: on). Off for small images: a 64x64 frame then gives a 4x4
    # keypoint map instead of 2x2, at about 1.7x the encoder's compute.
    stem_pool: bool = True
    # ResNet-18 stages kept (reference: all 4). 3 ends at layer3: keypoint maps twice as fine
    # (8x8 at 128x128) for less compute. Demo size, 128x128, 2-core CPU: training ran at ~345
    # samples/s with 3 stages, ~320 with 4, ~135 with 4 and no stem pool (also 8x8 maps).
    resnet_stages: int = 4
    # FiLM (not in the reference): each camera's last feature map is scaled and shifted per
    # channel by a linear function of the (normalised) instruction embedding, so the keypoints
    # can follow the object the instruction names. Needs language.
    film: bool = False

    def __post_init__(self) -> None:
        for name in ("shared_encoder", "stem_pool", "film"):
            check_bool(getattr(self, name), f"vision.{name}")
        for name in ("resnet_width", "num_keypoints", "feature_dim"):
            check_int(getattr(self, name), f"vision.{name}", 1)
        check(
            is_integer(self.resnet_stages) and self.resnet_stages in (1, 2, 3, 4),
            f"vision.resnet_stages must be 1, 2, 3 or 4, got {self.resnet_stages!r}",
        )
        check(self.norm in ("group", "batch"), f"vision.norm must be 'group' or 'batch', got {self.norm!r}")
        check_float(self.temperature, "vision.temperature")
        check(self.temperature > 0, f"vision.temperature must be positive, got {self.temperature}")


@dataclass
class BackboneConfig:
    """Sequence model: Mamba or Transformer, decoder-only or encoder-decoder."""

    kind: str = "mamba"  # "mamba" | "transformer"
    layout: str = "decoder"  # "decoder" | "encoder_decoder"
    d_model: int = 128
    n_layers: int = 16  # decoder layout
    n_enc: int = 10  # encoder_decoder layout
    n_dec: int = 6  # encoder_decoder layout
    # Mamba mixer
    d_state: int = 16
    d_conv: int = 4
    d_conv_dec: int = 2  # decoder of ED-Ma (reference: 2)
    expand: int = 2
    # Transformer
    heads: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check(self.kind in ("mamba", "transformer"), f"backbone.kind must be 'mamba' or 'transformer', got {self.kind!r}")
        check(
            self.layout in ("decoder", "encoder_decoder"),
            f"backbone.layout must be 'decoder' or 'encoder_decoder', got {self.layout!r}",
        )
        for name in ("d_model", "n_layers", "n_enc", "n_dec", "d_state", "d_conv", "d_conv_dec", "expand", "heads"):
            check_int(getattr(self, name), f"backbone.{name}", 1)
        check_float(self.dropout, "backbone.dropout")
        check(0.0 <= self.dropout < 1.0, f"backbone.dropout must be in [0, 1), got {self.dropout}")
        if self.kind == "transformer":
            check(
                self.d_model % self.heads == 0,
                f"backbone.d_model ({self.d_model}) must be divisible by backbone.heads ({self.heads})",
            )

    @property
    def variant(self) -> str:
        """Paper name of the variant: d_ma, ed_ma, d_tr or ed_tr."""
        return {v: k for k, v in VARIANTS.items()}[(self.kind, self.layout)]


@dataclass
class HeadConfig:
    """Action head: behaviour cloning (MSE) or DDPM (epsilon prediction)."""

    kind: str = "ddpm"  # "bc" | "ddpm"
    steps: int = 16  # DDPM steps, training and sampling
    cosine_s: float = 0.008
    max_beta: float = 0.999
    # Position of the DDPM step token. "first" is the reference MaIL layout
    # [time, language?, observations, actions]: every state after it depends on the step, so
    # nothing is shared between the K denoising steps. "after_observations" is
    # [language?, observations, time, actions]: the observation prefix is independent of the
    # step, so sampling runs it once per chunk and each step only extends it by 1 + A tokens.
    # Only for the decoder-only layout (d_ma, d_tr); BC heads have no step token.
    time_token: str = "first"

    def __post_init__(self) -> None:
        check(self.kind in ("bc", "ddpm"), f"head.kind must be 'bc' or 'ddpm', got {self.kind!r}")
        check(
            self.time_token in TIME_TOKENS,
            f"head.time_token must be one of {list(TIME_TOKENS)}, got {self.time_token!r}",
        )
        check_int(self.steps, "head.steps", 2)
        for name in ("cosine_s", "max_beta"):
            check_float(getattr(self, name), f"head.{name}")
        check(self.cosine_s > 0, f"head.cosine_s must be positive, got {self.cosine_s}")
        check(0 < self.max_beta < 1, f"head.max_beta must be in (0, 1), got {self.max_beta}")


@dataclass
class LanguageConfig:
    """Instruction conditioning: a precomputed embedding -> Linear -> one prepended token."""

    encoder: str | None = None  # a load_text_encoder spec, e.g. "clip:openai/clip-vit-base-patch32"; None = no language
    dim: int = 0  # embedding size (512 for CLIP ViT-B/32); 0 = no language token

    def __post_init__(self) -> None:
        check_int(self.dim, "language.dim", 0)
        check(
            self.encoder is None or (isinstance(self.encoder, str) and self.encoder.strip() != ""),
            f"language.encoder must be null or a non-empty encoder spec, got {self.encoder!r}",
        )
        check(
            (self.encoder is None) == (self.dim == 0),
            f"language.encoder and language.dim must be set together, got encoder={self.encoder!r} dim={self.dim}",
        )

    @property
    def enabled(self) -> bool:
        return self.dim > 0


@dataclass
class PolicyConfig:
    """Everything needed to rebuild a MaIL policy."""

    spec: PolicySpec = field(default_factory=PolicySpec)
    vision: VisionConfig = field(default_factory=VisionConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    proprio: bool = False  # joint positions fused into each observation token (off in the paper)
    # Arm actions learned as offsets from the current joint positions (see policy/action_frame.py);
    # predict_chunk returns absolute targets either way. Off in the paper (absolute actions).
    relative_actions: bool = False
    # "mamba": every module keeps its own init (Mamba's dt/A/D init intact). "reference": the MaIL
    # code's N(0, 0.02) re-init of every nn.Linear with zero bias, which also overwrites the
    # Mamba dt_proj bias init (so initial step sizes are softplus(0) ~ 0.69 instead of 1e-3..0.1).
    init: str = "mamba"

    def __post_init__(self) -> None:
        check_groups(self, self.groups())
        check(self.init in INITS, f"init must be one of {list(INITS)}, got {self.init!r}")
        check_bool(self.proprio, "proprio")
        check_relative_actions(self.relative_actions, self.spec)
        check(
            not self.vision.film or self.language.enabled,
            "vision.film conditions the image encoders on the instruction and needs language (language.encoder and language.dim)",
        )
        if self.head.time_token != "first":
            check(
                self.head.kind == "ddpm" and self.backbone.layout == "decoder",
                f"head.time_token {self.head.time_token!r} needs head.kind 'ddpm' and backbone.layout 'decoder', "
                f"got {self.head.kind!r} and {self.backbone.layout!r} (use 'first')",
            )

    @property
    def variant(self) -> str:
        return self.backbone.variant

    @staticmethod
    def groups() -> dict[str, type]:
        """The grouped settings: field name -> dataclass."""
        return {"vision": VisionConfig, "backbone": BackboneConfig, "head": HeadConfig, "language": LanguageConfig}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "PolicyConfig":
        """Inverse of :meth:`to_dict`; raises ConfigError on any missing, unknown or invalid field."""
        return cls(**fields_from_dict(cls, data, "policy config", cls.groups()))
