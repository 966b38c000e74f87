"""The four MaIL sequence models behind one interface: context tokens + action tokens -> features.

Every variant maps a context (B, Lc, D) (time token, language token, observation tokens, as
the policy builds them) and action tokens (B, A, D) (noisy actions for DDPM, learnable queries
for BC) to features at the A action positions (B, A, D).

Because every backbone is causal and the action tokens come last, the context can be processed
once and the action positions continued from its state: ``prefill(context) -> state`` then
``extend(actions, state) -> features``, which equals ``forward(context, actions)``. For DDPM the
context never depends on the noisy actions. In the reference layout it holds the step token, so
the policy prefills the contexts of all K steps in ONE batched pass and each denoising step only
runs the A action positions. The decoder-only variants also take the step token as the first of
the trailing tokens ([context, time, actions]; the caller keeps the last A outputs): then the
context is the same for every step, is prefilled once, and each step extends it by 1 + A tokens.
The state is a tree (tuples/lists) of tensors with the batch first; :func:`select_state` picks
rows of it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mail_ros.model.mamba_stack import MambaStack
from mail_ros.model.transformer import CrossTransformerStack, TransformerStack

__all__ = ["SequenceModel", "DecoderOnly", "MambaAggregationED", "CrossAttentionED", "select_state", "build_sequence_model"]


def select_state(state: Any, rows: slice) -> Any:
    """The same tree with every tensor indexed by ``rows`` along the batch dimension."""
    if isinstance(state, torch.Tensor):
        return state[rows]
    if isinstance(state, (list, tuple)):
        return type(state)(select_state(item, rows) for item in state)
    raise TypeError(f"unexpected state node {type(state).__name__}")


class SequenceModel(nn.Module):
    """Interface of the variants; see the module docstring."""

    def forward(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, context: torch.Tensor) -> Any:
        raise NotImplementedError

    def extend(self, actions: torch.Tensor, state: Any) -> torch.Tensor:
        raise NotImplementedError


class DecoderOnly(SequenceModel):
    """D-Ma / D-Tr: one causal stack over [context, actions]; the outputs at the
    ``actions.shape[1]`` trailing positions are returned."""

    def __init__(self, stack: MambaStack | TransformerStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        A = actions.shape[1]
        return self.stack(torch.cat([context, actions], dim=1))[:, -A:]

    def prefill(self, context: torch.Tensor) -> Any:
        return self.stack.prefill(context)[1]

    def extend(self, actions: torch.Tensor, state: Any) -> torch.Tensor:
        return self.stack.extend(actions, state, return_states=False)[0]


class MambaAggregationED(SequenceModel):
    """ED-Ma: Mamba encoder over [context, A learnable action tokens]; Mamba decoder over
    [Lc learnable state tokens, actions] with the encoder output (after its final norm) added to
    the decoder residual stream after every decoder layer, position by position.

    The learnable state tokens are right-aligned: a context shorter than ``max_context`` (short
    history at episode start) uses the last Lc of them, so the state token next to the actions
    is always the same one.
    """

    def __init__(self, encoder: MambaStack, decoder: MambaStack, max_context: int, n_actions: int, d_model: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.action_tokens = nn.Parameter(torch.zeros(n_actions, d_model))
        self.state_tokens = nn.Parameter(torch.zeros(max_context, d_model))
        nn.init.normal_(self.action_tokens, std=0.02)
        nn.init.normal_(self.state_tokens, std=0.02)

    def _encode(self, context: torch.Tensor) -> torch.Tensor:
        B = context.shape[0]
        return self.encoder(torch.cat([context, self.action_tokens.expand(B, -1, -1)], dim=1))  # (B, Lc+A, D)

    def _state_tokens(self, B: int, Lc: int) -> torch.Tensor:
        if Lc > self.state_tokens.shape[0]:
            raise ValueError(f"context of {Lc} tokens exceeds the {self.state_tokens.shape[0]} the model was built for")
        return self.state_tokens[-Lc:].expand(B, -1, -1)

    def forward(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        B, Lc, _ = context.shape
        memory = self._encode(context)
        x = torch.cat([self._state_tokens(B, Lc), actions], dim=1)
        return self.decoder(x, memory=memory)[:, Lc:]

    def prefill(self, context: torch.Tensor) -> Any:
        B, Lc, _ = context.shape
        memory = self._encode(context)
        _, decoder_state = self.decoder.prefill(self._state_tokens(B, Lc), memory=memory[:, :Lc])
        return decoder_state, memory[:, Lc:]

    def extend(self, actions: torch.Tensor, state: Any) -> torch.Tensor:
        decoder_state, memory = state
        return self.decoder.extend(actions, decoder_state, memory=memory, return_states=False)[0]


class CrossAttentionED(SequenceModel):
    """ED-Tr: causal Transformer encoder over the context; decoder over the actions with causal
    self-attention and cross-attention to the encoder output."""

    def __init__(self, encoder: TransformerStack, decoder: CrossTransformerStack) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, context: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.decoder(actions, self.encoder(context))

    def prefill(self, context: torch.Tensor) -> Any:
        return (self.encoder(context),)

    def extend(self, actions: torch.Tensor, state: Any) -> torch.Tensor:
        return self.decoder(actions, state[0])


def build_sequence_model(
    kind: str,
    layout: str,
    *,
    d_model: int,
    n_layers: int,
    n_enc: int,
    n_dec: int,
    d_state: int,
    d_conv: int,
    d_conv_dec: int,
    expand: int,
    heads: int,
    dropout: float,
    max_context: int,
    n_actions: int,
) -> SequenceModel:
    """The variant for (kind, layout); sizes as in :class:`mail_ros.policy.config.BackboneConfig`."""
    if kind == "mamba":
        if layout == "decoder":
            return DecoderOnly(MambaStack(n_layers, d_model, d_state, d_conv, expand))
        return MambaAggregationED(
            MambaStack(n_enc, d_model, d_state, d_conv, expand),
            MambaStack(n_dec, d_model, d_state, d_conv_dec, expand),
            max_context,
            n_actions,
            d_model,
        )
    if kind == "transformer":
        if layout == "decoder":
            return DecoderOnly(TransformerStack(n_layers, d_model, heads, dropout))
        return CrossAttentionED(
            TransformerStack(n_enc, d_model, heads, dropout), CrossTransformerStack(n_dec, d_model, heads, dropout)
        )
    raise ValueError(f"unknown backbone kind {kind!r}")
