"""Named policy configurations: ``{size}-{variant}-{head}``.

Sizes: ``tiny`` (unit tests; milliseconds on CPU), ``demo`` (the CPU demo, ~1.5 M parameters),
and ``paper-{spatial,object,goal,long,90}`` (the MaIL paper's sizes per LIBERO suite).
Variants: ``d_ma``, ``ed_ma``, ``d_tr``, ``ed_tr``. Heads: ``bc``, ``ddpm``.
Example: ``paper-goal-d_ma-ddpm``. :func:`list_presets` lists all of them.

Every preset uses the FR3 contract of :mod:`mail_ros.spec` (cameras ``agentview`` + ``wrist``,
joint-position actions over fr3_joint1..7 + fr3_gripper_width). The paper sizes take the
reference's network sizes, image size (128x128), T = 5 (the history length at which the paper
compares) and A (5, or 10 on LIBERO-Long); language (CLIP ViT-B/32, 512-d) is on for Goal and 90
as in the reference. Every preset keeps the reference DDPM layout with the time token first
(``head.time_token = "first"``); ``{"head.time_token": "after_observations"}`` gives the
decoder-only variants the layout whose observation prefix is computed once per chunk (see
:mod:`mail_ros.policy.mail_policy`). :func:`get_preset` accepts dotted overrides, e.g.
``{"spec.observation.obs_horizon": 1, "language.dim": 384}``.

Prompt-conditioned (in-context imitation) policies have their own family,
``icil-{tiny,demo}-{ma,tr}`` (:func:`get_icil_preset`, :class:`ICILConfig`): a streaming Mamba
("ma") and its Transformer twin with a K/V cache ("tr"), see :mod:`mail_ros.policy.icil_policy`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from mail_ros.policy.config import VARIANTS, BackboneConfig, ConfigError, PolicyConfig
from mail_ros.policy.icil_config import ICILConfig, PromptConfig

__all__ = [
    "list_presets",
    "get_preset",
    "list_icil_presets",
    "get_icil_preset",
    "apply_overrides",
    "parse_override",
    "PresetError",
    "SIZES",
    "HEADS",
]

HEADS = ("bc", "ddpm")
SUITES = ("spatial", "object", "goal", "long", "90")
SIZES = ("tiny", "demo") + tuple(f"paper-{suite}" for suite in SUITES)
CLIP = {"encoder": "clip:openai/clip-vit-base-patch32", "dim": 512}  # a load_text_encoder spec


class PresetError(ConfigError):
    """Unknown preset name or bad override."""


def list_presets() -> list[str]:
    """All preset names, grouped by size, then variant, then head."""
    return [f"{size}-{variant}-{head}" for size in SIZES for variant in VARIANTS for head in HEADS]


def _backbone(size: str, variant: str) -> dict[str, Any]:
    kind, layout = VARIANTS[variant]
    base = {"kind": kind, "layout": layout}
    if size == "tiny":
        return base | {"d_model": 32, "n_layers": 2, "n_enc": 1, "n_dec": 1, "d_state": 4, "heads": 2, "dropout": 0.0}
    if size == "demo":
        layers = {"d_ma": (4, 1, 1), "ed_ma": (1, 2, 2), "d_tr": (2, 1, 1), "ed_tr": (1, 1, 2)}[variant]
        return base | {"d_model": 64, "n_layers": layers[0], "n_enc": layers[1], "n_dec": layers[2], "d_state": 8}
    suite = size.removeprefix("paper-")
    sizes = {
        "d_ma": {"n_layers": 16},
        "ed_ma": {"n_enc": 8, "n_dec": 10, "d_state": 8} if suite == "90" else {"n_enc": 10, "n_dec": 6},
        "d_tr": {"n_layers": 8},
        "ed_tr": {"n_enc": 4, "n_dec": 6},
    }[variant]
    return base | {"d_model": 128, "d_conv": 4, "d_conv_dec": 2, "expand": 2, "heads": 4, "dropout": 0.1} | sizes


def _preset_dict(size: str, variant: str, head: str) -> dict[str, Any]:
    data = PolicyConfig().to_dict()
    data["backbone"] = asdict(BackboneConfig(**_backbone(size, variant)))
    data["head"]["kind"] = head
    observation, action = data["spec"]["observation"], data["spec"]["action"]
    if size == "tiny":
        observation.update(image_size=[64, 64], obs_horizon=2)
        action.update(horizon=4)
        data["vision"].update(resnet_width=4, num_keypoints=8, feature_dim=16)
    elif size == "demo":
        observation.update(image_size=[64, 64], obs_horizon=2)
        action.update(horizon=8)
        data["vision"].update(resnet_width=16, num_keypoints=32, feature_dim=64)
    else:
        suite = size.removeprefix("paper-")
        observation.update(image_size=[128, 128], obs_horizon=5)
        action.update(horizon=10 if suite == "long" else 5)
        if suite in ("goal", "90"):
            data["language"] = dict(CLIP)
    return data


# A size alone names its default variant: MaIL's decoder-only Mamba, with BC for the plumbing-test
# size and DDPM (the paper's best head) for the demo size.
ALIASES = {"tiny": "tiny-d_ma-bc", "demo": "demo-d_ma-ddpm"}


def get_preset(name: str, overrides: dict[str, Any] | None = None) -> PolicyConfig:
    """The configuration called ``name`` (or an alias in ``ALIASES``), with dotted-path ``overrides``."""
    parts = ALIASES.get(name, name).rsplit("-", 2)
    if len(parts) != 3 or parts[0] not in SIZES or parts[1] not in VARIANTS or parts[2] not in HEADS:
        raise PresetError(
            f"unknown preset {name!r}; names are SIZE-VARIANT-HEAD with SIZE in {list(SIZES)}, "
            f"VARIANT in {list(VARIANTS)}, HEAD in {list(HEADS)} (e.g. 'paper-goal-d_ma-ddpm'), or an alias "
            f"in {sorted(ALIASES)}"
        )
    data = _preset_dict(*parts)
    return apply_overrides(data, overrides or {})


def apply_overrides(
    config: PolicyConfig | ICILConfig | dict[str, Any],
    overrides: dict[str, Any],
    config_type: type[PolicyConfig] | type[ICILConfig] = PolicyConfig,
) -> Any:
    """A new config with ``overrides`` ({"group.field": value}) set, validated as a whole; of the
    type of ``config``, or ``config_type`` when ``config`` is a dict."""
    if isinstance(config, (PolicyConfig, ICILConfig)):
        config_type, data = type(config), config.to_dict()
    else:
        data = json.loads(json.dumps(config))
    for path, value in overrides.items():
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            if not isinstance(node, dict) or key not in node:
                raise PresetError(f"override {path!r}: no config group {key!r}")
            node = node[key]
        if not isinstance(node, dict) or keys[-1] not in node:
            raise PresetError(f"override {path!r}: no config field {keys[-1]!r}")
        node[keys[-1]] = value
    return config_type.from_dict(data)


# ICIL: "icil-{size}-{backbone}", Mamba ("ma") or its Transformer twin ("tr"). The image
# encoders and action chunk are those of the MaIL preset of the same size; the twins have about
# the same number of sequence-model parameters (tiny: 2 Mamba layers ~15 k, 1 Transformer layer
# ~13 k; demo: 4 Mamba layers ~119 k, 2 Transformer layers ~100 k).
ICIL_SIZES = ("tiny", "demo")
ICIL_BACKBONES = {"ma": "d_ma", "tr": "d_tr"}


def list_icil_presets() -> list[str]:
    """All ICIL preset names."""
    return [f"icil-{size}-{backbone}" for size in ICIL_SIZES for backbone in ICIL_BACKBONES]


def get_icil_preset(name: str, overrides: dict[str, Any] | None = None) -> ICILConfig:
    """The ICIL configuration called ``name`` (see :func:`list_icil_presets`), with dotted-path ``overrides``."""
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "icil" or parts[1] not in ICIL_SIZES or parts[2] not in ICIL_BACKBONES:
        raise PresetError(f"unknown ICIL preset {name!r}; names are {list_icil_presets()}")
    size, variant = parts[1], ICIL_BACKBONES[parts[2]]
    base = _preset_dict(size, variant, "bc")
    base["spec"]["observation"]["obs_horizon"] = 1
    backbone = _backbone(size, variant)
    if size == "tiny" and variant == "d_tr":
        backbone["n_layers"] = 1
    data = {
        "spec": base["spec"],
        "vision": base["vision"],
        "backbone": asdict(BackboneConfig(**backbone)),
        "prompt": asdict(PromptConfig()),
        "language": base["language"],
        "proprio": True,
        "relative_actions": False,
        "live_window": 0,
    }
    return apply_overrides(data, overrides or {}, ICILConfig)


def parse_override(text: str) -> tuple[str, Any]:
    """``"group.field=value"`` -> (path, value); the value is JSON when it parses, else a string."""
    path, sep, raw = text.partition("=")
    if not sep or not path:
        raise PresetError(f"override must look like group.field=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path.strip(), value
