"""Self-describing policy checkpoints: a directory with ``config.json`` and ``model.safetensors``.

Two policy types share the format, named by ``config.json``'s ``policy_type``: ``"mail"``
(:class:`MaILPolicy`, :class:`PolicyConfig`; also every checkpoint written before the key
existed) and ``"icil"`` (the prompt-conditioned :class:`ICILPolicy`, :class:`ICILConfig`).
``config.json`` holds the format version, the code version, the policy type, the full config
(``"policy"``), the normalisation statistics, training progress, and top-level copies of what
other tools read without building the model (``cameras``, ``image_size`` [H, W],
``obs_horizon``, ``action_horizon``, ``action_space``, ``action_names``, ``joint_names``,
``rate_hz``, ``dt``, ``language_encoder``, ``language_dim``, ``variant``, ``head``; an ICIL
policy's variant is ``icil-ma`` or ``icil-tr`` and its head ``bc``, as it regresses its chunks).
``model.safetensors`` holds every parameter and persistent buffer, the statistics included
(they are the source of truth; the JSON copy must agree). No pickle is used anywhere.

Every problem on loading raises :class:`CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import mail_ros
from mail_ros.policy.config import ConfigError, PolicyConfig
from mail_ros.policy.icil_config import ICILConfig
from mail_ros.policy.icil_policy import ICILPolicy
from mail_ros.policy.mail_policy import MaILPolicy
from mail_ros.policy.normalizer import FIELDS, NormalizerError
from mail_ros.spec import ObservationSpec

__all__ = [
    "CheckpointDescription",
    "CheckpointError",
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_config",
    "read_weight_shapes",
    "checkpoint_config",
    "describe_checkpoint",
    "POLICY_TYPES",
    "policy_type_of",
]

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NORMALIZERS = {"action": "action_norm", "proprio": "proprio_norm", "language": "language_norm"}
# policy_type -> (config class, policy class); a config.json without the key is a "mail" one.
POLICY_TYPES: dict[str, tuple[type, type]] = {"mail": (PolicyConfig, MaILPolicy), "icil": (ICILConfig, ICILPolicy)}
DEFAULT_POLICY_TYPE = "mail"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, malformed or inconsistent."""


def policy_type_of(policy_or_config: Any) -> str:
    """The ``policy_type`` of a policy or config object (a key of :data:`POLICY_TYPES`)."""
    for name, classes in POLICY_TYPES.items():
        if isinstance(policy_or_config, classes):
            return name
    raise CheckpointError(f"cannot save a {type(policy_or_config).__name__}: known policy types are "
                          f"{sorted(POLICY_TYPES)}")


def _variant_and_head(config: PolicyConfig | ICILConfig) -> tuple[str, str]:
    if isinstance(config, ICILConfig):
        return f"icil-{config.backbone.variant.split('_')[-1]}", "bc"
    return config.variant, config.head.kind


def _top_level(config: PolicyConfig | ICILConfig) -> dict[str, Any]:
    observation, action = config.spec.observation, config.spec.action
    variant, head = _variant_and_head(config)
    return {
        "cameras": list(observation.cameras),
        "image_size": list(observation.image_size),
        "obs_horizon": observation.obs_horizon,
        "action_horizon": action.horizon,
        "action_space": action.action_space,
        "action_names": list(action.names),
        "joint_names": list(observation.joint_names),
        "rate_hz": observation.rate_hz,
        "dt": action.dt,
        "language_encoder": config.language.encoder,
        "language_dim": config.language.dim,
        "variant": variant,
        "head": head,
    }


def checkpoint_config(
    policy: MaILPolicy | ICILPolicy, step: int | None = None, epoch: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` content for ``policy``."""
    data: dict[str, Any] = {"format_version": FORMAT_VERSION, "mail_ros_version": mail_ros.__version__,
                            "policy_type": policy_type_of(policy)}
    data.update(_top_level(policy.config))
    data["policy"] = policy.config.to_dict()
    data["normalization"] = {key: getattr(policy, attr).stats() for key, attr in NORMALIZERS.items()}
    data["training"] = {"step": step, "epoch": epoch}
    data["extra"] = dict(extra or {})
    return data


def save_checkpoint(
    directory: str | os.PathLike,
    policy: MaILPolicy | ICILPolicy,
    step: int | None = None,
    epoch: int | None = None,
    extra: dict[str, Any] | None = None,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``policy`` to ``directory`` atomically (temporary sibling, then rename); returns the path.

    ``extra`` is stored verbatim under ``"extra"`` and must be JSON-serialisable. An existing
    checkpoint at ``directory`` is replaced. ``write_files(folder)``, when given, writes further
    files (e.g. a trainer's resume state) into the temporary folder before the swap, so the
    checkpoint appears with all of them or not at all; if it raises, ``directory`` is untouched.
    Weights with NaN or infinite values are refused (:class:`CheckpointError`), as on loading.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(checkpoint_config(policy, step, epoch, extra), indent=2, allow_nan=False)
    # safetensors refuses tensors that share storage or are not contiguous; copy to be safe.
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in policy.state_dict().items()}
    for key, value in tensors.items():
        # Checked before anything is written: a diverged run must not replace a good checkpoint.
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"refusing to save {target}: tensor {key!r} contains NaN or infinite values")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "format_version": str(FORMAT_VERSION)})
        with open(tmp / CONFIG_FILE, "w") as stream:
            stream.write(config_text + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        if write_files is not None:
            write_files(tmp)
        if target.exists():
            # Between these two renames there is no checkpoint at ``target``: a failure puts the
            # old one back; a killed process leaves it in .NAME.old-*/checkpoint, which
            # read_checkpoint_config names when ``target`` is missing.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "checkpoint")
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / "checkpoint", target)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_stats(stats: Any, where: str, dim: int) -> None:
    if not isinstance(stats, dict):
        raise CheckpointError(f"{where} must be an object with {list(FIELDS)}")
    for key in FIELDS:
        values = stats.get(key)
        if not isinstance(values, list) or len(values) != dim:
            raise CheckpointError(f"{where}.{key} must be a list of {dim} numbers")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise CheckpointError(f"{where}.{key} contains non-finite or non-numeric values")


def read_checkpoint_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and fully validate ``config.json`` without touching the weights (cheap, no model).

    Returns the parsed JSON with ``policy_type`` filled in (``"mail"`` when the file has none);
    :func:`describe_checkpoint` gives the rebuilt, typed config.
    """
    root = Path(directory)
    path = root / CONFIG_FILE
    if not root.is_dir():
        leftovers = sorted(root.parent.glob(f".{root.name}.old-*/checkpoint"))
        hint = f" (a save was interrupted; the previous checkpoint is in {leftovers[-1]})" if leftovers else ""
        raise CheckpointError(f"checkpoint directory {root} does not exist{hint}")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (this code reads {FORMAT_VERSION})")
    policy_type = data.setdefault("policy_type", DEFAULT_POLICY_TYPE)
    if policy_type not in POLICY_TYPES:
        raise CheckpointError(f"{path} key 'policy_type' is {policy_type!r}; known types are {sorted(POLICY_TYPES)}")
    config_class = POLICY_TYPES[policy_type][0]
    try:
        config = config_class.from_dict(data.get("policy"))
    except ConfigError as exc:
        raise CheckpointError(f"{path} key 'policy': {exc}") from exc
    for key, expected in _top_level(config).items():
        if key not in data:
            raise CheckpointError(f"{path} is missing the top-level key {key!r}")
        if data[key] != expected:
            raise CheckpointError(
                f"{path} key {key!r} is {data[key]!r} but the policy config says {expected!r}"
            )
    normalization = data.get("normalization")
    if not isinstance(normalization, dict):
        raise CheckpointError(f"{path} is missing the 'normalization' object")
    dims = {
        "action": config.spec.action.dim,
        "proprio": len(config.spec.observation.joint_names),
        "language": config.language.dim,
    }
    for key, dim in dims.items():
        _check_stats(normalization.get(key), f"{path} key 'normalization.{key}'", dim)
    return data


# What safetensors raises on a file that is not (or no longer) a whole safetensors file.
_WEIGHTS_ERRORS = (SafetensorError, OSError, ValueError)


def _weights_file(root: Path) -> Path:
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    return weights


def _unreadable(weights: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{weights} is corrupt or truncated: {exc}")


def read_weight_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of ``model.safetensors``, from its header (no tensor is read).

    A missing, corrupt or truncated file raises the :class:`CheckpointError` that loading raises.
    """
    weights = _weights_file(Path(directory))
    try:
        with safe_open(str(weights), framework="pt") as stream:
            return {key: tuple(stream.get_slice(key).get_shape()) for key in stream.keys()}
    except _WEIGHTS_ERRORS as exc:
        raise _unreadable(weights, exc) from exc


@dataclass(frozen=True)
class CheckpointDescription:
    """What a checkpoint folder says about its policy, read and validated from ``config.json`` alone.

    The typed view the nodes and tools configure themselves from (no model is built, no weight is
    read); the values come from the saved config (:class:`PolicyConfig` or :class:`ICILConfig`,
    as ``policy_type`` says), which ``read_checkpoint_config`` has checked the top-level copies
    against.
    """

    directory: Path
    config: PolicyConfig | ICILConfig
    normalization: dict[str, dict[str, list[float]]]  # "action" / "proprio" / "language" -> statistics
    training: dict[str, Any]  # {"step": ..., "epoch": ...}
    extra: dict[str, Any]  # stored verbatim by whoever saved it
    mail_ros_version: str
    policy_type: str = DEFAULT_POLICY_TYPE  # "mail" or "icil" (POLICY_TYPES)

    @property
    def observation(self) -> ObservationSpec:
        return self.config.spec.observation

    @property
    def cameras(self) -> tuple[str, ...]:
        return self.observation.cameras

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) at model resolution."""
        return self.observation.image_size

    @property
    def joint_names(self) -> tuple[str, ...]:
        return self.observation.joint_names

    @property
    def obs_horizon(self) -> int:
        return self.observation.obs_horizon

    @property
    def rate_hz(self) -> float:
        return self.observation.rate_hz

    @property
    def period(self) -> float:
        return self.observation.period

    @property
    def action_space(self) -> str:
        return self.config.spec.action.action_space

    @property
    def action_names(self) -> tuple[str, ...]:
        return self.config.spec.action.names

    @property
    def action_horizon(self) -> int:
        return self.config.spec.action.horizon

    @property
    def dt(self) -> float:
        return self.config.spec.action.dt

    @property
    def language_encoder(self) -> str | None:
        """The text encoder spec the policy was trained with; None for a policy without language."""
        return self.config.language.encoder

    @property
    def language_dim(self) -> int:
        return self.config.language.dim

    @property
    def variant(self) -> str:
        """d_ma, ed_ma, d_tr, ed_tr (MaIL) or icil-ma, icil-tr (ICIL)."""
        return _variant_and_head(self.config)[0]

    @property
    def head(self) -> str:
        return _variant_and_head(self.config)[1]

    def summary(self) -> dict[str, Any]:
        """The top-level keys of ``config.json`` (cameras, horizons, rates, names, variant, head)."""
        return _top_level(self.config)


def describe_checkpoint(directory: str | os.PathLike) -> CheckpointDescription:
    """The validated :class:`CheckpointDescription` of ``directory``; raises :class:`CheckpointError`."""
    data = read_checkpoint_config(directory)
    return CheckpointDescription(
        directory=Path(directory),
        config=POLICY_TYPES[data["policy_type"]][0].from_dict(data["policy"]),
        normalization=data["normalization"],
        training=dict(data.get("training") or {}),
        extra=dict(data.get("extra") or {}),
        mail_ros_version=str(data.get("mail_ros_version")),
        policy_type=data["policy_type"],
    )


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> MaILPolicy | ICILPolicy:
    """Rebuild the policy saved in ``directory`` on ``device``, in eval mode, validated throughout:
    a :class:`MaILPolicy` or an :class:`ICILPolicy`, as the checkpoint's ``policy_type`` says."""
    root = Path(directory)
    data = read_checkpoint_config(root)
    weights = _weights_file(root)
    try:
        tensors = load_file(str(weights))
    except _WEIGHTS_ERRORS as exc:
        raise _unreadable(weights, exc) from exc
    try:
        # Building the model draws random initial weights; keep the caller's RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            config_class, policy_class = POLICY_TYPES[data["policy_type"]]
            policy = policy_class(config_class.from_dict(data["policy"]))
    except Exception as exc:  # noqa: BLE001 - whatever the model makes of the config, the checkpoint is unusable
        raise CheckpointError(
            f"{root / CONFIG_FILE} key 'policy' does not build a model: {type(exc).__name__}: {exc}"
        ) from exc
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{weights} lacks tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise CheckpointError(f"{weights} has unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{weights} tensor {key!r} has shape {tuple(tensors[key].shape)}, the config needs {tuple(value.shape)}"
            )
        if tensors[key].dtype != value.dtype:
            raise CheckpointError(f"{weights} tensor {key!r} has dtype {tensors[key].dtype}, expected {value.dtype}")
        if tensors[key].is_floating_point() and not torch.isfinite(tensors[key]).all():
            raise CheckpointError(f"{weights} tensor {key!r} contains NaN or infinite values")
    try:
        policy.load_state_dict(tensors, strict=True)
    except Exception as exc:  # noqa: BLE001 - past the checks above, still a checkpoint that does not load
        raise CheckpointError(f"{weights} does not load into the model: {type(exc).__name__}: {exc}") from exc
    for key, attr in NORMALIZERS.items():
        normalizer = getattr(policy, attr)
        try:
            normalizer.set_stats({field: getattr(normalizer, field) for field in FIELDS}, key)
        except NormalizerError as exc:
            raise CheckpointError(f"{weights}: normalisation statistics {exc}") from exc
        stored = torch.tensor([data["normalization"][key][field] for field in FIELDS])
        if not torch.allclose(torch.stack([getattr(normalizer, field) for field in FIELDS]), stored, rtol=1e-6, atol=1e-7):
            raise CheckpointError(
                f"{root / CONFIG_FILE} key 'normalization.{key}' disagrees with the statistics in {weights}"
            )
    try:
        return policy.to(device).eval()
    except Exception as exc:  # noqa: BLE001 - e.g. an unknown device or one without the memory for it
        raise CheckpointError(
            f"cannot move the policy of {root} to device {device!r}: {type(exc).__name__}: {exc}"
        ) from exc
