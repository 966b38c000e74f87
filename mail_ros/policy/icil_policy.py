"""ICILPolicy: a prompt of demonstrations, then the live episode one observation at a time -> chunks.

In-context imitation: the task is given by K demonstrations (observations with the actions
taken), not by training on it. The sequence model (:class:`mail_ros.model.icil.ICILSequence`,
Mamba or its Transformer twin) reads the stream

    [instruction?] [demo 1: o a o a ... END] ... [demo K ...] [live: o o o ...] | A action queries

(the instruction token only with ``language`` on: Linear(language_dim, D) of the normalised
instruction embedding, as MaIL's language token).

Runtime (the policy owns normalisation and its observation/action contract):

    info = policy.set_prompt([Demonstration(observations, actions), ...])  # encode + prefill, once
    policy.reset()                               # a new episode, from the prompt's state
    policy.observe(observation)                  # commit one live observation
    chunk = policy.predict_chunk(observation)    # commit it and return the next A actions

``encode_prompt`` + ``set_encoded_prompt`` split ``set_prompt`` in two, so encoded prompts can
be kept and prefilled again (a swap back to an earlier prompt, a benchmark).

Every live observation at the policy rate should be committed (``observe`` between chunks),
as in the demonstrations. Per control step the work is one frame encoding, one committed token
and A query tokens from a copy of the state: for Mamba this is the same whatever K and the
episode length are; the Transformer attends over its whole K/V cache. The prompt state is never
modified, so :meth:`ICILPolicy.reset` starts the next episode without re-running the prompt.
With ``live_window`` W the chunk sees only the newest W live observations: each chunk extends a
copy of the prompt's state by them (W + A tokens, still independent of K; the Transformer
copies its prompt cache once per chunk to do so).
The prompt state belongs to the weights, statistics and device it was computed with: set the
prompt after moving the policy (``.to``) or loading weights (new statistics clear it).

Actions in and out are absolute joint-position targets (robot units); with ``relative_actions``
the network sees and predicts the arm's as offsets from the frame's joint positions
(:class:`~mail_ros.policy.action_frame.ActionFrame`, as MaIL). Observation tokens are the MaIL
image encoders' (+ a projection of the normalised joint positions with ``proprio``). Training
freezes the encoders' trunks and keypoint layers (:meth:`ICILPolicy.frame_features`, computed
once per dataset and cached) and trains their projections with the sequence model.

With ``prompt.film`` the live frames' keypoints are FiLM-conditioned on a summary of the prompt
(:class:`~mail_ros.model.icil.PromptSummary` over every prompt frame's keypoints, channel means
of its trunk maps and action; with ``language`` plus the instruction's token), computed once per
prompt like the prefill; prompt frames keep unconditioned keypoints. Training then caches the
trunks' maps and trains the keypoint layers; with ``prompt.agreement`` it also trains the
summary to tell the tasks apart directly (:meth:`ICILPolicy._agreement_loss`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mail_ros.model.icil import ICILSequence, PromptSummary, StreamState
from mail_ros.model.mamba import mamba_backend
from mail_ros.policy.action_frame import ActionFrame
from mail_ros.policy.icil_config import ICILConfig
from mail_ros.policy.mail_policy import (MaILPolicy, PolicyInputError, build_encoder, check_instruction,
                                        check_observation, parameter_counts)
from mail_ros.policy.normalizer import Normalizer
from mail_ros.spec import Observation

__all__ = ["ICILPolicy", "Demonstration", "EncodedPrompt", "ICILSample", "PromptInfo", "dilated_indices"]

# Settings that change how a run trains, not what its weights compute: a fine-tune
# (load_weights_from) may set them anew.
TRAINING_ONLY_SETTINGS = ("backbone.dropout", "prompt.k_max", "prompt.agreement")
# Prompt frames are encoded in batches of this many, bounding the encoders' activation memory
# for prompts of thousands of frames.
ENCODE_BATCH = 256
# Temperature of the task-agreement loss (prompt.agreement): the cosine similarities of the
# summaries are divided by it before the softmax over the batch.
AGREEMENT_TEMPERATURE = 0.1


@dataclass
class Demonstration:
    """One prompt demonstration: observations oldest first, ``actions`` (N, action_dim) in robot
    units, action i being the command given at observation i."""

    observations: Sequence[Observation]
    actions: np.ndarray


@dataclass(frozen=True)
class PromptInfo:
    """What the current prompt holds and what it cost (for logs and /diagnostics)."""

    demonstrations: int  # K
    frames: int  # prompt frames after dilation
    tokens: int  # committed prompt tokens: 2 per frame + 1 per demonstration (+ 1 instruction)
    encode_s: float  # image encoders over the prompt frames
    prefill_s: float  # sequence model over the prompt tokens


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt ready to prefill (:meth:`ICILPolicy.encode_prompt`): its tokens (1, L, D), K, its
    frames after dilation and, with ``prompt.film``, the summary (D,) that conditions the live
    keypoints (None otherwise)."""

    tokens: torch.Tensor
    demonstrations: int
    frames: int
    condition: torch.Tensor | None = None


@dataclass
class ICILSample:
    """One training sequence, frame features precomputed by the frozen part of the image encoders.

    ``prompt``: per demonstration (features (N, F), joint positions (N, J), actions (N, Da)),
    already dilated, F = :meth:`ICILPolicy.feature_dim`; ``live_*``: the live episode's frames
    (M, F), (M, J), (M, Da); ``cuts``:
    the live frames t after which the chunk is predicted, increasing, each with t + A <= M (the
    targets are live actions t .. t + A - 1). Joints and actions in robot units, tensors on the
    policy's device.
    """

    prompt: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    live_features: torch.Tensor
    live_joints: torch.Tensor
    live_actions: torch.Tensor
    cuts: list[int]
    language: torch.Tensor | None = None  # (language_dim,) instruction embedding, with language on
    task: str = ""  # the live episode's task (its prompt's): the task-agreement loss's label


def dilated_indices(length: int, dilation: int) -> list[int]:
    """Frames kept from a demonstration of ``length`` frames: 0, d, 2d, ... and always the last."""
    kept = list(range(0, length, dilation))
    if kept[-1] != length - 1:
        kept.append(length - 1)
    return kept


class ICILPolicy(nn.Module):
    """The prompt-conditioned policy of :class:`ICILConfig`; see the module docstring."""

    def __init__(self, config: ICILConfig) -> None:
        super().__init__()
        self.config = config
        observation, action, backbone = config.spec.observation, config.spec.action, config.backbone
        D = backbone.d_model
        self.A = action.horizon
        self.W = config.live_window  # 0: the whole live episode
        self.cameras = tuple(sorted(observation.cameras))
        self.action_dim = action.dim
        self.joint_dim = len(observation.joint_names)
        self.film = config.prompt.film
        self.encoder = build_encoder(observation.cameras, D, config.vision, film_dim=D if self.film else 0)
        self.map_shape = self.encoder.map_shape(observation.image_size)  # (C, h, w) of one camera's trunk map
        summary_dim = self.encoder.pooled_dim + len(self.cameras) * self.map_shape[0] + self.action_dim
        self.summary = (PromptSummary(summary_dim, D, config.prompt.summary_heads, config.prompt.summary_hidden)
                        if self.film else None)
        self.proprio_proj = nn.Linear(self.joint_dim, D) if config.proprio else None
        self.sequence = ICILSequence(
            backbone.kind,
            d_model=D,
            n_layers=backbone.n_layers,
            action_dim=self.action_dim,
            n_actions=self.A,
            d_state=backbone.d_state,
            d_conv=backbone.d_conv,
            expand=backbone.expand,
            heads=backbone.heads,
            dropout=backbone.dropout,
        )
        self.language_proj = nn.Linear(config.language.dim, D) if config.language.enabled else None
        self.action_frame = ActionFrame.of(config)
        self.action_norm = Normalizer(self.action_dim)
        self.proprio_norm = Normalizer(self.joint_dim)
        self.language_norm = Normalizer(config.language.dim)

        self._prompt_state: StreamState | None = None
        self._prompt_condition: torch.Tensor | None = None  # (D,) with prompt.film and a prompt set
        self._prompt_info = PromptInfo(0, 0, 0, 0.0, 0.0)
        self._state: StreamState | None = None
        self._window: list[torch.Tensor] = []  # with live_window: the newest W live tokens (1, 1, D)
        self._last_stamp = -math.inf

    # ------------------------------------------------------------------ setup

    def set_normalization(
        self,
        action_stats: Mapping[str, Any],
        proprio_stats: Mapping[str, Any] | None = None,
        language_stats: Mapping[str, Any] | None = None,
    ) -> None:
        """Set the action (and joint-position, instruction-embedding) statistics, as
        :meth:`MaILPolicy.set_normalization` (actions in the network's frame: :meth:`chunk_targets`);
        drops the prompt (its tokens used the old ones)."""
        self.action_norm.set_stats(action_stats, "action")
        if proprio_stats is not None:
            self.proprio_norm.set_stats(proprio_stats, "proprio")
        if language_stats is not None:
            self.language_norm.set_stats(language_stats, "language")
        self.clear_prompt()

    def chunk_targets(self, actions: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """Every chunk an episode of actions (M, Da) and joint positions (M, J) in robot units teaches,
        in the network's frame, unnormalised: actions t .. t + A - 1 from the joints at t ->
        (M - A + 1, A, Da) (empty when M < A). The loss's targets and the action statistics."""
        if actions.shape[0] < self.A:
            return actions.new_zeros(0, self.A, actions.shape[1])
        windows = actions.unfold(0, self.A, 1).transpose(1, 2)  # (M - A + 1, A, Da)
        return self.action_frame.to_network(windows, joints[: windows.shape[0]])

    def load_encoder_from(self, source: MaILPolicy | ICILPolicy) -> None:
        """Take over a trained policy's image encoders (all cameras and the projections to D).

        A frozen encoder at its random initialisation locates "something"; one trained by MaIL
        on the same cameras has learnt what the task needs (where the cubes are). A FiLM-
        conditioned MaIL encoder is taken at the NEUTRAL instruction (the normalised embedding
        0, i.e. the mean of its training instructions; prompt frames have no instruction): its
        per-channel ``x * (1 + gamma) + beta`` is then constant and is folded exactly into the
        keypoint layer, a 1x1 convolution, so the encoder computed here is the MaIL encoder
        at that instruction. An ICIL policy's encoders are taken as they are (a new run of other
        settings from a trained run's encoders, when the MaIL policy they came from is gone).
        With ``prompt.film`` the FiLM layers stay this policy's own either way: they read this
        policy's prompt summary. The encoders must have the same layout (vision settings but
        ``film``, cameras, image size and d_model); else a ValueError saying what differs.
        """
        kind = "MaIL" if isinstance(source, MaILPolicy) else "ICIL"
        mine, theirs = self.config, source.config
        differ = [f"vision.{name}" for name, value in vars(mine.vision).items()
                  if name != "film" and getattr(theirs.vision, name) != value]
        for name, a, b in (("cameras", sorted(mine.spec.observation.cameras), sorted(theirs.spec.observation.cameras)),
                           ("image_size", tuple(mine.spec.observation.image_size),
                            tuple(theirs.spec.observation.image_size)),
                           ("backbone.d_model", mine.backbone.d_model, theirs.backbone.d_model)):
            if a != b:
                differ.append(f"{name} ({a} here, {b} in the {kind} policy)")
        if differ:
            raise ValueError(f"the {kind} policy's image encoders do not fit this ICIL policy: " + ", ".join(differ))
        state = {name: value.detach().clone() for name, value in source.encoder.state_dict().items()
                 if kind == "MaIL" or not name.endswith(("film.weight", "film.bias"))}
        for film_weight in [name for name in state if name.endswith("film.weight")]:  # MaIL's, folded
            camera = film_weight[: -len("film.weight")]  # "encoders.<camera>." or "encoder."
            gamma, beta = state.pop(camera + "film.bias").chunk(2)  # film(0) = its bias; (C,) each
            del state[film_weight]
            weight, bias = state[camera + "pool.keypoints.weight"], state[camera + "pool.keypoints.bias"]
            state[camera + "pool.keypoints.bias"] = bias + weight[:, :, 0, 0] @ beta  # (K,)
            state[camera + "pool.keypoints.weight"] = weight * (1 + gamma)[None, :, None, None]  # (K, C, 1, 1)
        # With prompt.film the FiLM layers are this policy's own (conditioned on the prompt): kept.
        state.update({name: value for name, value in self.encoder.state_dict().items()
                      if name.endswith(("film.weight", "film.bias"))})
        self.encoder.load_state_dict(state)
        self.clear_prompt()

    def load_weights_from(self, source: ICILPolicy) -> None:
        """Start from a trained ICIL policy (a fine-tune): every weight and its statistics, which
        the weights were trained to read. Its settings must be this policy's but for
        TRAINING_ONLY_SETTINGS, ``proprio``, which may be on here where it was off there (the
        joint projection then starts at zero and the joint statistics stay this policy's), and
        the action horizon, which may be longer here (the new queries start as copies of the
        source's last). Either way, until a step trains it this policy predicts what the source
        does, its first chunk actions the source's own. Else a ValueError naming each setting
        that differs."""
        mine, theirs = _dotted(self.config.to_dict()), _dotted(source.config.to_dict())
        free = set(TRAINING_ONLY_SETTINGS)
        adds_joints = self.proprio_proj is not None and source.proprio_proj is None
        if adds_joints:
            free.add("proprio")
        longer = self.A > source.A
        if longer:
            free.add("spec.action.horizon")
        differ = [f"{name} ({mine.get(name)!r} here, {theirs.get(name)!r} in the checkpoint)"
                  for name in sorted(mine.keys() | theirs.keys())
                  if name not in free and mine.get(name) != theirs.get(name)]
        if differ:
            raise ValueError("the ICIL checkpoint's weights do not fit this ICIL policy: " + ", ".join(differ))
        state = {name: value.detach().clone() for name, value in source.state_dict().items()}
        if longer:  # the queries are causal: the source's A come first and answer as they did there
            queries = state["sequence.queries"]  # (A_source, D)
            state["sequence.queries"] = torch.cat([queries, queries[-1:].expand(self.A - source.A, -1)])
        if adds_joints:
            state.update({f"proprio_proj.{name}": torch.zeros_like(value)
                          for name, value in self.proprio_proj.state_dict().items()})
            state.update({f"proprio_norm.{name}": value for name, value in self.proprio_norm.state_dict().items()})
        self.load_state_dict(state)
        self.clear_prompt()

    @property
    def device(self) -> torch.device:
        return self.sequence.queries.device

    @property
    def backend(self) -> str:
        """Which implementation runs the sequence model on the current device (for logs)."""
        if self.config.backbone.kind == "mamba":
            return f"Mamba (streaming): {mamba_backend(self.device)}"
        return "Transformer (K/V cache): torch scaled_dot_product_attention"

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: total and per top-level part (encoder, sequence, ...)."""
        return parameter_counts(self)

    @property
    def prompt_info(self) -> PromptInfo:
        return self._prompt_info

    @property
    def stream_state(self) -> StreamState | None:
        """The stream the next chunk is predicted from (prompt + live observations so far, or
        with ``live_window`` the prompt + the window); None while empty."""
        return self._stream()

    # ------------------------------------------------------------------ prompt and episode

    def set_prompt(
        self, demonstrations: Sequence[Demonstration], instruction_embedding: np.ndarray | None = None
    ) -> PromptInfo:
        """Encode and prefill ``demonstrations`` (K >= 0) as the prompt, then :meth:`reset`.

        ``instruction_embedding`` (language_dim,) is required with language on, ignored otherwise.
        Every demonstration is checked against the contract first (cameras, image size, joint
        names, action dimension, finite values, increasing stamps); on a mismatch
        :class:`PolicyInputError` names the demonstration and the frame, and the previous prompt
        and episode are kept.
        """
        start = time.perf_counter()
        prompt = self.encode_prompt(demonstrations, instruction_embedding)
        self._sync()
        return self.set_encoded_prompt(prompt, encode_s=time.perf_counter() - start)

    def encode_prompt(
        self, demonstrations: Sequence[Demonstration], instruction_embedding: np.ndarray | None = None
    ) -> EncodedPrompt:
        """The prompt's tokens (and summary) for :meth:`set_encoded_prompt`; the demonstrations are
        checked as in :meth:`set_prompt`. The result depends on the weights and statistics only, so
        it can be kept and prefilled again later."""
        demos = [self._check_demonstration(demo, index) for index, demo in enumerate(demonstrations)]
        embedding = check_instruction(instruction_embedding, self.config.language)
        descriptors, frames = [], 0
        with self._inference():
            language = None if embedding is None else self._language_token(torch.from_numpy(embedding).to(self.device))
            parts = [] if language is None else [language]
            for observations, actions in demos:
                kept = dilated_indices(len(observations), self.config.prompt.dilation)
                frames += len(kept)
                features, joints = self._features([observations[i] for i in kept])  # (N, F), (N, J)
                tokens, descriptor = self._prompt_part(
                    features, joints, torch.from_numpy(actions[kept]).float().to(self.device))
                parts.append(tokens)
                descriptors.append(descriptor)
            condition = self._condition(self._summary(descriptors), language)
        D = self.config.backbone.d_model
        tokens = torch.cat(parts, dim=1) if parts else torch.zeros(1, 0, D, device=self.device)
        return EncodedPrompt(tokens, len(demos), frames, condition)

    def set_encoded_prompt(self, prompt: EncodedPrompt, encode_s: float = 0.0) -> PromptInfo:
        """Prefill ``prompt`` from :meth:`encode_prompt` (``encode_s``: what encoding it took, for the
        record), then :meth:`reset`."""
        tokens, D = prompt.tokens, self.config.backbone.d_model
        if tokens.dim() != 3 or tuple(tokens.shape[::2]) != (1, D):
            raise PolicyInputError(f"prompt tokens must be (1, L, {D}), got {tuple(tokens.shape)}")
        if self.film != (prompt.condition is not None) or (self.film and tuple(prompt.condition.shape) != (D,)):
            want = f"a ({D},) prompt summary (prompt.film is on)" if self.film else "no prompt summary (prompt.film is off)"
            got = None if prompt.condition is None else tuple(prompt.condition.shape)
            raise PolicyInputError(f"this policy takes {want}, got {got}")
        start = time.perf_counter()
        with self._inference():
            state = self.sequence.prefill(tokens.to(self.device)) if tokens.shape[1] else None
            self._sync()
        self._prompt_state = state
        self._prompt_condition = None if prompt.condition is None else prompt.condition.to(self.device)
        length = 0 if state is None else state.length
        self._prompt_info = PromptInfo(prompt.demonstrations, prompt.frames, length, encode_s, time.perf_counter() - start)
        self.reset()
        return self._prompt_info

    def clear_prompt(self) -> None:
        """No prompt (K = 0): the policy then acts from the live episode alone."""
        self._prompt_state = None
        self._prompt_condition = None
        self._prompt_info = PromptInfo(0, 0, 0, 0.0, 0.0)
        self.reset()

    def reset(self) -> None:
        """Start an episode: the stream goes back to the prompt's state (nothing is recomputed)."""
        self._state = self._prompt_state
        self._window = []
        self._last_stamp = -math.inf

    def observe(self, observation: Observation) -> None:
        """Commit one live observation (stamped after the previous one) to the stream; with
        ``live_window``, to the window (the newest W), whose stream the next chunk computes."""
        check_observation(observation, self.config.spec.observation, self._last_stamp)
        with self._inference():
            token = self.sequence.live_tokens(self._encode([observation], self._live_condition()).unsqueeze(0))
            if self.W:
                self._window = [*self._window, token][-self.W :]
                self._state = None  # the window moved: _stream runs it again from the prompt's state
            else:
                self._state = self.sequence.extend(token, self._state)
        self._last_stamp = observation.stamp

    def predict_chunk(self, observation: Observation) -> np.ndarray:
        """Commit ``observation`` and return the next A actions, (A, action_dim) float64 robot units."""
        self.observe(observation)
        with self._inference():
            actions = self.action_norm.denormalize(self.sequence.predict(self._stream()))[0]  # (A, Da)
        joints = np.asarray(observation.joint_positions, dtype=np.float64)
        return self.action_frame.to_robot(actions.double().cpu().numpy(), joints)

    # ------------------------------------------------------------------ training

    def frame_features(self, images: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What training caches per frame: camera -> uint8 (N, H, W, 3) -> (N, F), the encoders'
        keypoints (no projection), or with ``prompt.film`` their trunks' maps (flattened, in camera
        order), which the conditioned keypoints are computed from. Frozen in training, so a run
        computes them once per dataset and caches them."""
        return self.encoder.feature_maps(images) if self.film else self.encoder.pooled(images)

    @property
    def feature_dim(self) -> int:
        """F, the width of :meth:`frame_features`."""
        return len(self.cameras) * math.prod(self.map_shape) if self.film else self.encoder.pooled_dim

    def feature_modules(self) -> list[nn.Module]:
        """The modules :meth:`frame_features` runs (frozen in training)."""
        return self.encoder.trunks() if self.film else self.encoder.pooling_modules()

    def freeze_features(self) -> None:
        """No gradients for :meth:`feature_modules`, so training can run on cached features;
        the encoders' projections (with ``prompt.film`` also their keypoint and FiLM layers and the
        prompt summary), the proprio projection and the sequence model still learn."""
        for module in self.feature_modules():
            module.requires_grad_(False)

    def compute_loss(self, samples: Sequence[ICILSample]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean MSE of the normalised chunks at every cut of every sample (the live part only), plus
        with ``prompt.agreement`` that weight times :meth:`_agreement_loss`.

        The chunks are those the runtime computes (the prompt prefilled, the live frames
        committed up to the cut, the queries run from there), computed in one batch: each
        sample's stream (instruction token, prompt, live frames up to its last cut) is
        right-padded to the longest and :meth:`ICILSequence.chunks_at` runs the streams once
        and the queries of every cut of every sample together. With ``live_window`` the chunk at
        cut t comes from the prompt and the live frames t - W + 1 .. t (frame 0 repeated before
        the episode's start), as at run time: :meth:`ICILSequence.chunks_after_windows`.
        Gradients reach the sequence model, the encoders' projections and the proprio
        projection, not the trunks.
        """
        if not samples:
            raise PolicyInputError("compute_loss needs at least one sample")
        prefixes, lives, rows, cuts_of, targets, summaries = [], [], [], [], [], []
        for index, sample in enumerate(samples):
            self._check_sample(sample, index)
            language = None if self.language_proj is None else self._language_token(sample.language.float())
            parts = [] if language is None else [language]
            descriptors = []
            for features, joints, actions in sample.prompt:
                tokens, descriptor = self._prompt_part(features, joints, actions)
                parts.append(tokens)
                descriptors.append(descriptor)
            summaries.append(self._summary(descriptors))
            condition = self._condition(summaries[-1], language)
            live = sample.cuts[-1] + 1  # frames after the last cut change no chunk
            pooled = self._pooled(sample.live_features[:live], condition)
            lives.append(self.sequence.live_tokens(self._tokens(pooled, sample.live_joints[:live])))  # (live, D)
            prefixes.append(torch.cat(parts, dim=1)[0] if parts else lives[-1][:0])  # (P_b, D)
            cuts = torch.tensor(sample.cuts, device=self.device)  # (C_b,)
            rows.append(torch.full_like(cuts, index))
            cuts_of.append(cuts)
            chunks = self.chunk_targets(sample.live_actions.float(), sample.live_joints.float())[cuts]  # (C_b, A, Da)
            targets.append(self.action_norm.normalize(chunks))
        if self.W:
            chunks = self._window_chunks(prefixes, lives, rows, cuts_of)
        else:
            tokens = nn.utils.rnn.pad_sequence([torch.cat(pair) for pair in zip(prefixes, lives)], batch_first=True)
            # Stream tokens up to and with each cut's frame.
            ends = torch.cat([cuts + 1 + prefix.shape[0] for cuts, prefix in zip(cuts_of, prefixes)])
            chunks = self.sequence.chunks_at(tokens, torch.cat(rows), ends)  # (sum C_b, A, Da)
        loss = F.mse_loss(chunks, torch.cat(targets))
        info = {"chunk_loss": loss.item(), "chunks": float(chunks.shape[0])}
        if self.config.prompt.agreement > 0:
            agreement = self._agreement_loss(samples, summaries)
            loss = loss + self.config.prompt.agreement * agreement
            info["agreement"] = agreement.item()
        return loss, {"loss": loss.item(), **info}

    def _agreement_loss(self, samples: Sequence[ICILSample], summaries: list[torch.Tensor]) -> torch.Tensor:
        """The task-agreement loss: each sample's live episode, read as a prompt (dilated, its
        descriptors unconditioned, as a prompt demonstration's), is summarised too; with cosine
        similarities s_ij of prompt summary i and live summary j over temperature, the loss is the
        symmetric cross-entropy that picks j = i among the batch's samples of other tasks
        (same-task pairs j != i are left out: they are not negatives). Summaries of one task then
        agree and those of others differ: the prompt's reading of the task is trained directly,
        not only through the chunks it conditions."""
        if any(not sample.task for sample in samples):
            raise PolicyInputError("prompt.agreement needs the task of every sample (ICILSample.task)")
        lives = []
        for sample in samples:
            kept = dilated_indices(len(sample.live_features), self.config.prompt.dilation)
            descriptor = self._prompt_descriptors(sample.live_features[kept], sample.live_joints[kept],
                                                  sample.live_actions[kept])
            lives.append(self.summary(descriptor))
        prompts = F.normalize(torch.stack(summaries), dim=-1)  # (B, D)
        lives = F.normalize(torch.stack(lives), dim=-1)  # (B, D)
        logits = prompts @ lives.T / AGREEMENT_TEMPERATURE  # (B, B)
        tasks = [sample.task for sample in samples]
        same = torch.tensor([[a == b for b in tasks] for a in tasks], device=self.device)
        logits = logits.masked_fill(same & ~torch.eye(len(tasks), dtype=torch.bool, device=self.device), -math.inf)
        target = torch.arange(len(tasks), device=self.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    def _window_chunks(self, prefixes: list[torch.Tensor], lives: list[torch.Tensor], rows: list[torch.Tensor],
                       cuts_of: list[torch.Tensor]) -> torch.Tensor:
        """compute_loss's chunks with ``live_window``: per sample its prefix tokens (P_b, D), live
        tokens (M_b, D), rows and cuts (C_b,) -> (sum C_b, A, Da)."""
        if any(prefix.shape[0] == 0 for prefix in prefixes):
            raise PolicyInputError("live_window training needs a prompt (or an instruction) in every sample")
        offsets = torch.arange(1 - self.W, 1, device=self.device)  # (W,)
        windows = torch.cat([live[(cuts.unsqueeze(1) + offsets).clamp(min=0)]  # (C_b, W, D)
                             for live, cuts in zip(lives, cuts_of)])
        lengths = torch.tensor([prefix.shape[0] for prefix in prefixes], device=self.device)  # (B,)
        prefix_tokens = nn.utils.rnn.pad_sequence(prefixes, batch_first=True)  # (B, max P_b, D)
        return self.sequence.chunks_after_windows(prefix_tokens, lengths, windows, torch.cat(rows))

    def _language_token(self, embedding: torch.Tensor) -> torch.Tensor:
        """Instruction embedding (L,) -> its token (1, 1, D) (normalised, then projected)."""
        return self.language_proj(self.language_norm.normalize(embedding)).view(1, 1, -1)

    def _prompt_part(self, features: torch.Tensor, joints: torch.Tensor,
                     actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One prompt demonstration: frame features (N, F), joints (N, J) and actions (N, Da) in robot
        units -> its tokens (1, 2N + 1, D) and what the prompt summary reads of its frames (N, I)
        (None without ``prompt.film``). Prompt frames are encoded unconditioned."""
        pooled = self._pooled(features)  # (N, P)
        normalized = self._prompt_actions(actions, joints)  # (N, Da)
        tokens = self.sequence.demo_tokens(self._tokens(pooled, joints).unsqueeze(0), normalized.unsqueeze(0))
        return tokens, self._descriptors(features, pooled, normalized) if self.film else None

    def _prompt_actions(self, actions: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """A prompt demonstration's actions (N, Da) and joints (N, J) in robot units -> the actions as
        network inputs (N, Da): in the network's frame (action i from joints i), then normalize_input,
        like the joints."""
        actions = self.action_frame.to_network(actions.unsqueeze(1), joints.float()).squeeze(1)  # (N, Da)
        return self.action_norm.normalize_input(actions)

    def _prompt_descriptors(self, features: torch.Tensor, joints: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """What the prompt summary reads of a demonstration's frames (features (N, F), joints (N, J),
        actions (N, Da) in robot units), as :meth:`_prompt_part` gives it: (N, I)."""
        return self._descriptors(features, self._pooled(features), self._prompt_actions(actions, joints))

    def _pooled(self, features: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Frame features (N, F) -> keypoints (N, P): the features themselves, or with ``prompt.film``
        the keypoints of the trunk maps, FiLM-conditioned on ``condition`` (D,) when given."""
        if not self.film:
            return features
        # One (1, D) row: the FiLM scale and shift are computed once and broadcast over the N frames.
        row = None if condition is None else condition.unsqueeze(0)
        return self.encoder.pooled_from_maps(features, self.map_shape, row)

    def _descriptors(self, maps: torch.Tensor, pooled: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """What the prompt summary reads of each prompt frame: its keypoints (N, P), the channel means
        of its trunk maps (N, F) -> (N, cameras * C) and its normalised action (N, Da)."""
        N, C = maps.shape[0], self.map_shape[0]
        means = maps.view(N, len(self.cameras), C, -1).mean(dim=-1).flatten(1)  # (N, cameras * C)
        return torch.cat([pooled, means, actions], dim=-1)

    def _summary(self, descriptors: list[torch.Tensor]) -> torch.Tensor | None:
        """The prompt summary (D,) of the prompt frames' descriptors, one (N_k, I) per demonstration
        (zeros for an empty prompt); None without ``prompt.film``."""
        if not self.film:
            return None
        width = self.summary.key.in_features
        return self.summary(torch.cat(descriptors) if descriptors else torch.zeros(0, width, device=self.device))

    def _condition(self, summary: torch.Tensor | None, language: torch.Tensor | None) -> torch.Tensor | None:
        """The condition (D,) of the live keypoints with ``prompt.film`` (None without): the prompt's
        :meth:`_summary`, plus with ``language`` the instruction's token (1, 1, D), so that the
        instruction conditions the keypoints as MaIL's FiLM does."""
        if summary is None:
            return None
        return summary if language is None else summary + language.view(-1)

    def _live_condition(self) -> torch.Tensor | None:
        """The condition of live frames' keypoints: the prompt's summary (that of an empty prompt,
        zeros, while none is set); None without ``prompt.film``."""
        if not self.film:
            return None
        if self._prompt_condition is None:
            return torch.zeros(self.config.backbone.d_model, device=self.device)
        return self._prompt_condition

    def _tokens(self, pooled: torch.Tensor, joints: torch.Tensor) -> torch.Tensor:
        """Keypoints (N, P) projected + the proprio projection of joints (N, J): observation tokens (N, D)."""
        tokens = self.encoder.project(pooled)
        if self.proprio_proj is None:
            return tokens
        return tokens + self.proprio_proj(self.proprio_norm.normalize_input(joints.float()))

    def _check_sample(self, sample: ICILSample, index: int) -> None:
        F, J, Da = self.feature_dim, self.joint_dim, self.action_dim
        frames = [(f"prompt {k}", *demo) for k, demo in enumerate(sample.prompt)]
        frames.append(("live", sample.live_features, sample.live_joints, sample.live_actions))
        for name, features, joints, actions in frames:
            n = features.shape[0]
            if n < 1 or tuple(features.shape) != (n, F) or tuple(joints.shape) != (n, J) or tuple(actions.shape) != (n, Da):
                raise PolicyInputError(
                    f"sample {index} {name}: features, joints, actions must be (N >= 1, {F}), (N, {J}), (N, {Da}); "
                    f"got {tuple(features.shape)}, {tuple(joints.shape)}, {tuple(actions.shape)}"
                )
        if self.language_proj is not None:
            L = self.config.language.dim
            if sample.language is None or tuple(sample.language.shape) != (L,):
                got = None if sample.language is None else tuple(sample.language.shape)
                raise PolicyInputError(f"sample {index}: language must be a ({L},) instruction embedding, got {got}")
        M = sample.live_features.shape[0]
        cuts = list(sample.cuts)
        if not cuts or cuts != sorted(set(cuts)) or cuts[0] < 0 or cuts[-1] + self.A > M:
            raise PolicyInputError(
                f"sample {index}: cuts must be increasing live frames t with t + {self.A} <= {M}, got {cuts}"
            )

    # ------------------------------------------------------------------ internals

    def _stream(self) -> StreamState | None:
        """The state the next chunk is predicted from: the committed stream, or with
        ``live_window`` the prompt's state extended by the window, padded to W tokens with
        copies of the episode's first frame (run when a chunk is asked for, once per new observation)."""
        if self.W and self._state is None and self._window:
            window = [self._window[0]] * (self.W - len(self._window)) + self._window
            with self._inference():
                self._state = self.sequence.extend(torch.cat(window, dim=1), self._prompt_state)  # (1, W, D) after
        return self._state

    def _encode(self, observations: Sequence[Observation], condition: torch.Tensor | None = None) -> torch.Tensor:
        """Observation tokens (N, D) of checked observations (live frames: ``condition`` as
        :meth:`_live_condition`)."""
        features, joints = self._features(observations)
        return self._tokens(self._pooled(features, condition), joints)

    def _features(self, observations: Sequence[Observation]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`frame_features` (N, F) and joint positions (N, J) of checked observations, the
        images encoded in batches of ENCODE_BATCH."""
        features = []
        for start in range(0, len(observations), ENCODE_BATCH):
            batch = observations[start : start + ENCODE_BATCH]
            images = {
                name: torch.from_numpy(np.stack([obs.images[name] for obs in batch])).to(self.device)
                for name in self.cameras
            }
            features.append(self.frame_features(images))  # (n, F)
        joints = torch.from_numpy(np.stack([obs.joint_positions for obs in observations])).float().to(self.device)
        return torch.cat(features), joints

    def _check_demonstration(self, demo: Demonstration, index: int) -> tuple[list[Observation], np.ndarray]:
        where = f"prompt demonstration {index}"
        observations = list(demo.observations)
        if not observations:
            raise PolicyInputError(f"{where} has no observations")
        previous = -math.inf
        for frame, obs in enumerate(observations):
            try:
                check_observation(obs, self.config.spec.observation, previous)
            except PolicyInputError as exc:
                raise PolicyInputError(f"{where}, frame {frame}: {exc}") from exc
            previous = obs.stamp
        actions = np.asarray(demo.actions, dtype=np.float64)
        if actions.shape != (len(observations), self.action_dim):
            raise PolicyInputError(
                f"{where}: actions must be ({len(observations)}, {self.action_dim}) "
                f"({list(self.config.spec.action.names)}), one per observation; got {actions.shape}"
            )
        if not np.isfinite(actions).all():
            raise PolicyInputError(f"{where}: actions contain NaN or infinite values")
        return observations, actions

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode and inference_mode for the block; the training flag is restored after."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.train(was_training)

    def _sync(self) -> None:
        # Timings of asynchronous CUDA work are only meaningful after a synchronisation.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _dotted(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings -> {"group.name": value}."""
    flat = {}
    for name, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_dotted(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat
