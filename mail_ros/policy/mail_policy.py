"""MaILPolicy: images (+ language, + joints) -> a chunk of A joint-position actions.

Sequence layouts (d = d_model; "+PE" = learnable positional embedding, zero-initialised):

* context = [time token (DDPM only), language token (if enabled), T' observation tokens + PE]
* action tokens = noisy actions -> Linear(action_dim, d) (DDPM) or A learnable queries (BC), + PE
* D-Ma / D-Tr: one causal stack over [context, action tokens]; ED-Ma: encoder over
  [context, A learnable tokens], decoder over [state tokens, action tokens] with Mamba
  aggregation; ED-Tr: encoder over the context, cross-attending decoder over the actions.
  Linear(d, action_dim) on the A action positions gives the actions (BC) or the noise (DDPM).
* the language token is Linear(language_dim, d) of the instruction embedding centred and scaled
  by the training instructions' statistics (``normalization.language``); with ``vision.film``
  the same normalised embedding also FiLM-conditions every camera encoder.
* ``head.time_token = "after_observations"`` (DDPM, decoder-only only) moves the time token
  between the observations and the actions: [language?, observations + PE, time, actions].
  "first" (above) is the reference MaIL layout and the default.

Positions: the table has T + A - 1 slots. Observation i of a full history sits at slot i, the
current observation at slot T - 1, and action k at slot T - 1 + k, so the current observation
and the first action share a slot (as the reference). A history of T' < T frames (episode start)
is NOT padded: the sequence is shorter and the frames are RIGHT-aligned, taking slots
T - T' .. T - 1, so the current observation and the actions keep their slots whatever T' is.
The time token has no positional embedding in either layout.

Inference reuse (exact, tested against the plain path):
* every camera frame is encoded once: tokens are cached per :class:`Observation` OBJECT across
  calls, so callers pass the same objects again (policy_node and replay keep theirs in an
  :class:`ObservationHistory`); a different object is encoded anew even under a stamp seen
  before (a clock jump, a reused stamp). Frames must not be modified in place; call
  :meth:`reset` at an episode start or after loading weights; FiLM policies re-encode when the
  instruction changes;
* the language token and the K time tokens are computed once per chunk;
* DDPM, ``use_prefix_cache=True``, time token "after_observations": the prefix
  [language?, observations] does not depend on the step, so it is prefilled ONCE per chunk
  (Mamba recurrent states, Transformer key/value cache) and each of the K steps only extends
  that state by its 1 + A tokens: per step, Mamba costs the same whatever T is and the
  Transformer attends over the T cached keys.
* DDPM, ``use_prefix_cache=True``, time token "first": the context depends on the observations
  and the step t but never on the noisy actions, so the contexts of all K steps are prefilled
  in ONE batched pass (Mamba states, Transformer key/value cache, ED encoder outputs) and each
  denoising step only runs the A action positions from the state of its t. As every later
  state depends on t, this is the same arithmetic as re-running the sequence per step
  (``use_prefix_cache=False``); it only turns K small passes into one large one, which pays
  where per-call overhead dominates (short histories, GPUs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mail_ros.model.backbone import build_sequence_model, select_state
from mail_ros.model.diffusion import CosineDDPM, TimeEmbedding
from mail_ros.model.mamba import mamba_backend_report
from mail_ros.model.vision import ObservationEncoder
from mail_ros.policy.action_frame import ActionFrame
from mail_ros.policy.config import LanguageConfig, PolicyConfig, VisionConfig
from mail_ros.policy.normalizer import Normalizer
from mail_ros.spec import Observation, ObservationSpec

__all__ = ["MaILPolicy", "PolicyInputError", "build_encoder", "check_instruction", "check_observation", "parameter_counts"]


class PolicyInputError(ValueError):
    """An observation, batch or instruction does not match the policy's spec."""


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """Parameter counts of ``module``: per top-level child (encoder, sequence, ...) and "total"."""
    counts: dict[str, int] = {}
    for name, param in module.named_parameters():
        part = name.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + param.numel()
    counts["total"] = sum(counts.values())
    return counts


def build_encoder(cameras: Sequence[str], d_model: int, vision: VisionConfig, film_dim: int = 0) -> ObservationEncoder:
    """The image encoders of ``vision`` for ``cameras``, one token of width ``d_model`` a step."""
    return ObservationEncoder(
        cameras,
        d_model,
        feature_dim=vision.feature_dim,
        resnet_width=vision.resnet_width,
        norm=vision.norm,
        num_keypoints=vision.num_keypoints,
        temperature=vision.temperature,
        shared=vision.shared_encoder,
        stem_pool=vision.stem_pool,
        film_dim=film_dim,
        stages=vision.resnet_stages,
    )


def check_instruction(embedding: np.ndarray | None, language: LanguageConfig) -> np.ndarray | None:
    """The instruction embedding as float32 (language.dim,); None when ``language`` is off (the
    embedding is then ignored). Raises :class:`PolicyInputError` when it is missing, of the
    wrong size or not finite."""
    if not language.enabled:
        return None
    if embedding is None:
        raise PolicyInputError(
            f"policy is conditioned on language ({language.encoder}, {language.dim}-d): instruction_embedding is required"
        )
    embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if embedding.shape != (language.dim,):
        raise PolicyInputError(
            f"instruction_embedding must have {language.dim} values ({language.encoder}), got {embedding.size}"
        )
    if not np.isfinite(embedding).all():
        raise PolicyInputError("instruction_embedding contains NaN or infinite values")
    return embedding


def check_observation(obs: Observation, spec: ObservationSpec, previous_stamp: float = -math.inf) -> None:
    """Raise :class:`PolicyInputError` unless ``obs`` matches ``spec`` (cameras, uint8 RGB images
    of the spec's size, finite joint positions) and is stamped after ``previous_stamp``."""
    where = f"observation at stamp {obs.stamp}"
    if not math.isfinite(obs.stamp) or obs.stamp <= previous_stamp:
        raise PolicyInputError(f"{where}: stamps must be finite and strictly increasing (previous {previous_stamp})")
    if set(obs.images) != set(spec.cameras):
        raise PolicyInputError(f"{where} has cameras {sorted(obs.images)}, policy expects {sorted(spec.cameras)}")
    for name, image in obs.images.items():
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (*spec.image_size, 3):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise PolicyInputError(f"{where}: image {name!r} must be uint8 {(*spec.image_size, 3)} RGB, got {got}")
    joints = np.asarray(obs.joint_positions)
    if joints.shape != (len(spec.joint_names),) or not np.isfinite(joints).all():
        raise PolicyInputError(
            f"{where}: joint_positions must be {len(spec.joint_names)} finite values "
            f"({list(spec.joint_names)}), got shape {joints.shape}"
        )


class MaILPolicy(nn.Module):
    """The MaIL policy of :class:`PolicyConfig`; see the module docstring for the layouts."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        observation, action, backbone = config.spec.observation, config.spec.action, config.backbone
        D = backbone.d_model
        self.T, self.A = observation.obs_horizon, action.horizon
        self.cameras = tuple(sorted(observation.cameras))
        self.image_size = tuple(observation.image_size)
        self.action_dim = action.dim
        self.joint_dim = len(observation.joint_names)
        self.is_ddpm = config.head.kind == "ddpm"
        self.time_after_observations = self.is_ddpm and config.head.time_token == "after_observations"

        self.encoder = build_encoder(observation.cameras, D, config.vision,
                                     film_dim=config.language.dim if config.vision.film else 0)
        self.proprio_proj = nn.Linear(self.joint_dim, D) if config.proprio else None
        self.language_proj = nn.Linear(config.language.dim, D) if config.language.enabled else None
        self.pos_emb = nn.Parameter(torch.zeros(self.T + self.A - 1, D))
        if self.is_ddpm:
            self.time_embedding = TimeEmbedding(D)
            self.diffusion = CosineDDPM(config.head.steps, config.head.cosine_s, config.head.max_beta)
            self.action_in = nn.Linear(self.action_dim, D)
        else:
            self.action_queries = nn.Parameter(0.02 * torch.randn(self.A, D))
        max_context = self.T + int(self.is_ddpm) + int(config.language.enabled)
        self.sequence = build_sequence_model(
            backbone.kind,
            backbone.layout,
            d_model=D,
            n_layers=backbone.n_layers,
            n_enc=backbone.n_enc,
            n_dec=backbone.n_dec,
            d_state=backbone.d_state,
            d_conv=backbone.d_conv,
            d_conv_dec=backbone.d_conv_dec,
            expand=backbone.expand,
            heads=backbone.heads,
            dropout=backbone.dropout,
            max_context=max_context,
            n_actions=self.A,
        )
        self.action_out = nn.Linear(D, self.action_dim)
        self.action_frame = ActionFrame.of(config)
        self.action_norm = Normalizer(self.action_dim)
        self.proprio_norm = Normalizer(self.joint_dim)
        self.language_norm = Normalizer(config.language.dim)
        if config.init == "reference":
            self._reference_init()

        # When False, DDPM sampling re-runs the whole sequence at every step (the reference
        # path that the prefix reuse is tested against; see the module docstring for which is
        # faster where).
        self.use_prefix_cache = True
        self._seed = 0
        self._generator: torch.Generator | None = None
        # stamp -> (the Observation, its (D,) token); the object is kept so that its identity can be checked.
        self._frames: dict[float, tuple[Observation, torch.Tensor]] = {}
        # With FiLM the tokens depend on the instruction too: the (1, L) normalised one they were encoded under.
        self._frames_instruction: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup

    def _reference_init(self) -> None:
        # The reference re-initialises every Linear of its model (not the image encoders) with
        # N(0, 0.02) and zero bias after building Mamba; this includes Mamba's dt_proj, so its
        # bias becomes 0 (initial step size softplus(0) ~ 0.69).
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("encoder."):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_normalization(
        self,
        action_stats: Mapping[str, Any],
        proprio_stats: Mapping[str, Any] | None = None,
        language_stats: Mapping[str, Any] | None = None,
    ) -> None:
        """Set the action (and joint-position, instruction-embedding) statistics: mean, std, min, max per dimension.

        Action statistics are in the network's frame (:attr:`action_frame`): offsets from the
        current joint positions for relative dimensions, robot units otherwise. Language
        statistics centre the training instructions' embeddings (see
        :meth:`Normalizer.isotropic_stats_from_data`); without them the embedding enters as is.
        """
        self.action_norm.set_stats(action_stats, "action")
        if proprio_stats is not None:
            self.proprio_norm.set_stats(proprio_stats, "proprio")
        if language_stats is not None:
            self.language_norm.set_stats(language_stats, "language")
        self._frames.clear()

    @property
    def device(self) -> torch.device:
        return self.pos_emb.device

    @property
    def backend(self) -> str:
        """Which implementation runs the sequence model on the current device (for logs)."""
        if self.config.backbone.kind == "mamba":
            return f"Mamba: {mamba_backend_report(self.device)}"
        return "Transformer: torch scaled_dot_product_attention"

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total and per top-level part (encoder, sequence, ...)."""
        return parameter_counts(self)

    def reset(self, seed: int | None = None) -> None:
        """Start an episode: forget cached frames; with ``seed``, restart the sampling noise."""
        self._frames.clear()
        if seed is not None:
            self._seed = int(seed)
            self._generator = None

    # ------------------------------------------------------------------ tokens

    def _observation_tokens(
        self, images: Mapping[str, torch.Tensor], joints: torch.Tensor | None, film: torch.Tensor | None
    ) -> torch.Tensor:
        """images: camera -> uint8 (N, H, W, 3); joints (N, J) robot units; film (N, L) normalised
        instructions for FiLM encoders, else None -> (N, D)."""
        tokens = self.encoder(images, film)
        if self.proprio_proj is not None:
            tokens = tokens + self.proprio_proj(self.proprio_norm.normalize_input(joints))
        return tokens

    def _normalized_instruction(self, embedding: torch.Tensor | None) -> torch.Tensor | None:
        """(B, L) embeddings -> (B, L) centred and scaled (``normalization.language``); None stays None."""
        return None if embedding is None else self.language_norm.normalize(embedding)

    def _language_token(self, instruction: torch.Tensor | None) -> torch.Tensor | None:
        """(B, L) normalised instruction -> (B, D)."""
        return None if instruction is None else self.language_proj(instruction)

    def _context(
        self, obs_tokens: torch.Tensor, language: torch.Tensor | None, time: torch.Tensor | None
    ) -> torch.Tensor:
        """[time?, language?, observations + PE]: (B, Lc, D)."""
        T = obs_tokens.shape[1]
        parts = [token.unsqueeze(1) for token in (time, language) if token is not None]
        parts.append(obs_tokens + self.pos_emb[self.T - T : self.T])
        return torch.cat(parts, dim=1)

    def _denoiser_inputs(
        self, obs_tokens: torch.Tensor, language: torch.Tensor | None, time: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDPM sequence for step tokens ``time`` (B, D) and noisy actions ``x`` (B, A, Da), split
        into (context, tokens after it); the noise is read off the last A positions."""
        if self.time_after_observations:
            return self._context(obs_tokens, language, None), self._step_tokens(time, x)
        return self._context(obs_tokens, language, time), self._action_tokens(x, obs_tokens.shape[0])

    def _step_tokens(self, time: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[time, action tokens]: (B, 1 + A, D), the step-dependent tail of "after_observations"."""
        return torch.cat([time.unsqueeze(1), self._action_tokens(x, x.shape[0])], dim=1)

    def _action_tokens(self, x: torch.Tensor | None, B: int) -> torch.Tensor:
        """(B, A, D) from noisy normalised actions x (DDPM) or the learnable queries (BC)."""
        pos = self.pos_emb[self.T - 1 : self.T - 1 + self.A]
        if self.is_ddpm:
            return self.action_in(x) + pos
        return (self.action_queries + pos).expand(B, -1, -1)

    # ------------------------------------------------------------------ training

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss of one batch (robot units in, normalisation inside).

        batch: "images" camera -> uint8 (B, T, H, W, 3); "joint_positions" (B, T, J);
        "language" (B, language_dim) when language is enabled; "actions" (B, A, action_dim)
        absolute. Returns the scalar loss (MSE on z-scored actions for BC, on the noise for DDPM) and
        float metrics. DDPM steps are drawn from torch's global RNG (the trainer seeds it).
        """
        # Weights are about to change: cached frame tokens would go stale.
        self._frames.clear()
        images, joints, language, actions = self._check_batch(batch)
        B, T = joints.shape[:2]
        flat = {name: images[name].reshape(B * T, *self.image_size, 3) for name in self.cameras}
        instruction = self._normalized_instruction(language)  # (B, L) or None
        film = instruction.repeat_interleave(T, dim=0) if self.config.vision.film else None  # (B*T, L)
        obs_tokens = self._observation_tokens(flat, joints.reshape(B * T, -1), film).view(B, T, -1)  # (B, T, D)
        language_token = self._language_token(instruction)
        target = self.action_norm.normalize(self.action_frame.to_network(actions, joints[:, -1]))  # (B, A, Da)
        if not self.is_ddpm:
            features = self.sequence(self._context(obs_tokens, language_token, None), self._action_tokens(None, B))
            loss = F.mse_loss(self.action_out(features), target)
            return loss, {"loss": loss.item()}
        t = torch.randint(0, self.diffusion.steps, (B,), device=target.device)
        noise = torch.randn_like(target)
        noisy = self.diffusion.add_noise(target, noise, t)
        context, tail = self._denoiser_inputs(obs_tokens, language_token, self.time_embedding(t), noisy)
        loss = F.mse_loss(self.action_out(self.sequence(context, tail)[:, -self.A :]), noise)
        return loss, {"loss": loss.item()}

    def _check_batch(self, batch: Mapping[str, Any]):
        for key in ("images", "joint_positions", "actions") + (("language",) if self.language_proj is not None else ()):
            if key not in batch:
                raise PolicyInputError(f"batch is missing {key!r}; it has {sorted(batch)}")
        images = batch["images"]
        if set(images) != set(self.cameras):
            raise PolicyInputError(f"batch images have cameras {sorted(images)}, policy expects {list(self.cameras)}")
        joints = batch["joint_positions"]
        if joints.dim() != 3 or joints.shape[-1] != self.joint_dim or not 1 <= joints.shape[1] <= self.T:
            raise PolicyInputError(
                f"batch joint_positions must be (B, T' <= {self.T}, {self.joint_dim}), got {tuple(joints.shape)}"
            )
        B, T = joints.shape[:2]
        for name, value in images.items():
            if value.dtype != torch.uint8 or tuple(value.shape) != (B, T, *self.image_size, 3):
                raise PolicyInputError(
                    f"batch images[{name!r}] must be uint8 {(B, T, *self.image_size, 3)}, "
                    f"got {value.dtype} {tuple(value.shape)}"
                )
        actions = batch["actions"]
        if tuple(actions.shape) != (B, self.A, self.action_dim):
            raise PolicyInputError(f"batch actions must be {(B, self.A, self.action_dim)}, got {tuple(actions.shape)}")
        language = batch.get("language") if self.language_proj is not None else None
        if language is not None and tuple(language.shape) != (B, self.config.language.dim):
            raise PolicyInputError(
                f"batch language must be {(B, self.config.language.dim)}, got {tuple(language.shape)}"
            )
        for name, value in (("joint_positions", joints), ("actions", actions), ("language", language)):
            if value is not None and not torch.isfinite(value).all():
                raise PolicyInputError(f"batch {name} contains NaN or infinite values")
        return images, joints.float(), None if language is None else language.float(), actions.float()

    # ------------------------------------------------------------------ inference

    def predict_chunk(
        self,
        observation_history: Sequence[Observation],
        instruction_embedding: np.ndarray | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """The next A actions, (A, action_dim) float64 in robot units.

        ``observation_history``: oldest first, stamps increasing; up to T are used (the most
        recent), fewer at an episode start. ``instruction_embedding``: (language_dim,) when the
        policy uses language (ignored otherwise). ``seed``: DDPM noise from a fresh generator
        seeded with it; without it the policy's own generator continues (restarted by
        ``reset(seed)``), so a seeded episode replays exactly.
        """
        history = self._check_history(observation_history)
        embedding = check_instruction(instruction_embedding, self.config.language)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                instruction = None
                if embedding is not None:
                    instruction = self._normalized_instruction(torch.from_numpy(embedding).to(self.device).unsqueeze(0))
                obs_tokens = self._history_tokens(history, instruction)  # (1, T', D)
                language = self._language_token(instruction)
                if self.is_ddpm:
                    normalized = self._sample(obs_tokens, language, self._sampling_generator(seed))
                else:
                    context = self._context(obs_tokens, language, None)
                    normalized = self.action_out(self.sequence(context, self._action_tokens(None, 1)))
                actions = self.action_norm.denormalize(normalized)[0].double().cpu().numpy()
        finally:
            self.train(was_training)
        return self.action_frame.to_robot(actions, np.asarray(history[-1].joint_positions, dtype=np.float64))

    def _sampling_generator(self, seed: int | None) -> torch.Generator:
        if seed is not None:
            return torch.Generator(device=self.device).manual_seed(int(seed))
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(self._seed)
        return self._generator

    def _sample(self, obs_tokens: torch.Tensor, language: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """DDPM sampling in normalised units: (B, A, action_dim)."""
        B = obs_tokens.shape[0]
        K = self.diffusion.steps
        times = self.time_embedding(torch.arange(K, device=self.device))  # (K, D)
        low, high = self.action_norm.normalized_range()
        if self.use_prefix_cache and self.time_after_observations:
            state = self.sequence.prefill(self._context(obs_tokens, language, None))

            def predict_noise(x: torch.Tensor, t: int) -> torch.Tensor:
                tail = self._step_tokens(times[t].expand(B, -1), x)
                return self.action_out(self.sequence.extend(tail, state)[:, -self.A :])

        elif self.use_prefix_cache:
            # Row k * B + b holds step k of batch element b.
            context = self._context(
                obs_tokens.repeat(K, 1, 1),
                None if language is None else language.repeat(K, 1),
                times.repeat_interleave(B, dim=0),
            )  # (K*B, Lc, D)
            state = self.sequence.prefill(context)

            def predict_noise(x: torch.Tensor, t: int) -> torch.Tensor:
                step_state = select_state(state, slice(t * B, (t + 1) * B))
                return self.action_out(self.sequence.extend(self._action_tokens(x, B), step_state))

        else:

            def predict_noise(x: torch.Tensor, t: int) -> torch.Tensor:
                context, tail = self._denoiser_inputs(obs_tokens, language, times[t].expand(B, -1), x)
                return self.action_out(self.sequence(context, tail)[:, -self.A :])

        return self.diffusion.sample(predict_noise, (B, self.A, self.action_dim), low, high, generator)

    def _history_tokens(self, history: list[Observation], instruction: torch.Tensor | None) -> torch.Tensor:
        """(1, T', D) observation tokens, encoding only Observation objects not seen in earlier calls
        (under the same (1, L) normalised instruction, when the encoders are FiLM-conditioned on it)."""
        film = self.config.vision.film
        if film and (self._frames_instruction is None or not torch.equal(self._frames_instruction, instruction)):
            self._frames.clear()
            self._frames_instruction = instruction.clone()
        new = [obs for obs in history if self._frames.get(obs.stamp, (None,))[0] is not obs]
        if new:
            images = {
                name: torch.from_numpy(np.stack([obs.images[name] for obs in new])).to(self.device)
                for name in self.cameras
            }
            joints = torch.from_numpy(np.stack([obs.joint_positions for obs in new])).float().to(self.device)
            condition = instruction.expand(len(new), -1) if film else None
            for obs, token in zip(new, self._observation_tokens(images, joints, condition)):
                self._frames[obs.stamp] = (obs, token)
        # A window only moves forward (or restarts with new objects): older frames never come back.
        self._frames = {obs.stamp: self._frames[obs.stamp] for obs in history}
        return torch.stack([self._frames[obs.stamp][1] for obs in history]).unsqueeze(0)

    def _check_history(self, history: Sequence[Observation]) -> list[Observation]:
        history = list(history)
        if not history:
            raise PolicyInputError("observation_history is empty; need at least the current observation")
        history = history[-self.T :]
        previous = -math.inf
        for obs in history:
            check_observation(obs, self.config.spec.observation, previous)
            previous = obs.stamp
        return history
