"""Streaming sequence model for in-context imitation (ICIL): a prompt of demonstrations
prefilled once, then one committed token per control step, action queries from a copy.

Token stream (B batch, L tokens, D = d_model, Da = action_dim, A = action queries, N frames):

    [demo 1: o a o a ... o a END] ... [demo K: ... END] [live: o o ... o] | q_1 .. q_A

* prompt frame i of a demonstration: its observation token o (from the policy's encoders) and
  its action token a = action_in(normalised action); END closes every demonstration so the
  model can tell where one ends and the next (or the live episode) starts;
* live frames are observation tokens only (the robot's own actions are the model's outputs);
* the A learnable queries follow the last committed token; the features at their positions
  give the chunk of A actions through action_out. Queries are never committed: each control
  step runs them from the stream's state and throws their state away.

Every token carries a learned per-type embedding (prompt observation, prompt action, END, live
observation; the queries are learnable themselves). Positions, and why they do not move:

* Mamba: NO positional embedding. The causal convolution and the selective scan are
  order-aware, so the tokens need no index, and a token's input never depends on where a
  window starts: the state after the prompt is computed once and every later token extends
  it. (MaILPolicy's right-aligned table gives the same frame a different embedding each
  time the window slides, which forces a re-run of the whole history every step.)
* Transformer twin: attention is order-blind apart from the causal mask, so each token adds
  the sinusoidal encoding of its index counted from the START OF THE STREAM (the first
  prompt token). The index of a committed token never changes, so its cached keys/values
  stay valid, and sinusoids have no maximum length. Queries take the indices right after
  the last committed token (the ones the next committed tokens will take, as in the full
  sequence).

Streaming API (exact, tested against :meth:`ICILSequence.forward` over the whole stream):
``state = prefill(tokens)``; ``state = extend(tokens, state)`` commits more tokens and returns
a new state; the old one stays valid, so a prompt state can be reused for any number of
episodes; ``predict(state)`` gives the next chunk. Per control step Mamba costs the same
whatever the stream length (state: per layer conv (B, E, d_conv) and ssm (B, E, d_state)); the
Transformer attends over every cached key and its cache grows by one key/value per token.

Training (:meth:`ICILSequence.chunks_at`, exact, tested against the streaming API): the chunks
after many prefixes of a batch of streams (every cut of every training sequence) from ONE pass
over the padded streams, which yields the backbone's state after each prefix (Mamba: the conv
window and scan state there, picked from the states the scan computes anyway; Transformer: the
keys/values up to there, the rest masked), then one batched run of the queries of all prefixes.

A bounded live window (:meth:`ICILSequence.chunks_after_windows` in training; at run time the
policy extends a state after the prompt with the window each chunk): only the newest W live
tokens follow the prompt, always at the stream indices right after it, so the window does not
move either, and the prompt's state is reused as it is for a new episode.

The Transformer's inference cache is a preallocated :class:`KVBuffer` that the newest state
of a stream writes in place (a step writes its own keys/values, instead of copying the whole
cache as ``torch.cat`` would). States that share the buffer stay valid: slots before a state's
length are never rewritten, and extending or predicting from a state that is not the newest
one (a new episode from the prompt's state) first copies its tokens into a new buffer, once.
With autograd on (training) the immutable per-layer cache of :class:`TransformerStack` is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mail_ros.model.mamba_stack import MambaStack
from mail_ros.model.transformer import KVBuffer, TransformerStack

__all__ = ["ICILSequence", "PromptSummary", "StreamState", "TOKEN_TYPES", "sinusoidal_positions"]

# Rows of ICILSequence.type_emb.
TOKEN_TYPES = ("prompt_observation", "prompt_action", "demo_end", "live_observation")
_PROMPT_OBS, _PROMPT_ACTION, _DEMO_END, _LIVE_OBS = range(len(TOKEN_TYPES))

# The Transformer prefills long prompts in pieces of this many tokens: the explicit
# (new, past + new) attention mask and scores then stay O(chunk * L) instead of O(L^2)
# (a 10 000-frame prompt is 20 000+ tokens: a full mask alone would be 400 MB per layer).
# The result is identical, as every piece attends to the cache of all earlier ones.
TRANSFORMER_PREFILL_CHUNK = 1024
# Free slots a Transformer buffer gets beyond what is asked (at least this many, or a quarter
# more): room for the queries and the next live tokens, and amortised O(1) growth.
BUFFER_HEADROOM = 256


def sinusoidal_positions(start: int | torch.Tensor, length: int, d_model: int, device: torch.device) -> torch.Tensor:
    """(length, d_model) sinusoidal encodings of the indices start .. start + length - 1;
    (B, length, d_model) for a start per row, ``start`` (B,) long.

    Each index is encoded on its own (no cumulative computation), so a token gets the same
    vector whether it is encoded in a long prefill or alone in a streaming step.
    """
    if isinstance(start, torch.Tensor):
        index = (start.to(device).unsqueeze(-1) + torch.arange(length, device=device)).float()  # (B, L)
    else:
        index = torch.arange(start, start + length, device=device, dtype=torch.float32)  # (L,)
    half = torch.arange(0, d_model, 2, device=device, dtype=torch.float32)  # (ceil(D/2),)
    angle = index.unsqueeze(-1) * torch.exp(half * (-math.log(10000.0) / d_model))  # (..., L, ceil(D/2))
    out = torch.zeros(*index.shape, d_model, device=device)
    out[..., 0::2] = torch.sin(angle)
    out[..., 1::2] = torch.cos(angle[..., : d_model // 2])
    return out


@dataclass(frozen=True)
class StreamState:
    """What a stream has committed: the backbone's cache and the number of tokens.

    ``layers``: Mamba, per layer (conv_state (B, E, d_conv), ssm_state (B, E, d_state)) (fixed size, never
    modified in place); Transformer, a :class:`KVBuffer` (inference) or per layer immutable
    (keys, values) (B, H, length, Dh) (with autograd).
    """

    layers: Any
    length: int

    @property
    def batch(self) -> int:
        return self.layers.keys[0].shape[0] if isinstance(self.layers, KVBuffer) else self.layers[0][0].shape[0]

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (the memory a stream costs on top of the model)."""
        if isinstance(self.layers, KVBuffer):
            return self.layers.nbytes()
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)


class ICILSequence(nn.Module):
    """Prompt + live tokens -> a chunk of A actions in normalised units; see the module docstring.

    ``kind`` "mamba" (a :class:`MambaStack`) or "transformer" (a :class:`TransformerStack` with
    sinusoidal stream positions), the twin compared like for like.
    """

    def __init__(
        self,
        kind: str,
        *,
        d_model: int,
        n_layers: int,
        action_dim: int,
        n_actions: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if kind == "mamba":
            self.stack: MambaStack | TransformerStack = MambaStack(n_layers, d_model, d_state, d_conv, expand)
        elif kind == "transformer":
            self.stack = TransformerStack(n_layers, d_model, heads, dropout)
        else:
            raise ValueError(f"ICILSequence kind must be 'mamba' or 'transformer', got {kind!r}")
        self.kind = kind
        self.d_model = d_model
        self.type_emb = nn.Parameter(0.02 * torch.randn(len(TOKEN_TYPES), d_model))
        self.queries = nn.Parameter(0.02 * torch.randn(n_actions, d_model))
        self.action_in = nn.Linear(action_dim, d_model)
        self.action_out = nn.Linear(d_model, action_dim)

    # ------------------------------------------------------------------ tokens

    def demo_tokens(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """One prompt demonstration: observation tokens (B, N, D) and normalised actions
        (B, N, Da) -> [o_1 a_1 ... o_N a_N END]: (B, 2N + 1, D)."""
        B, N, D = observations.shape
        o = observations + self.type_emb[_PROMPT_OBS]
        a = self.action_in(actions) + self.type_emb[_PROMPT_ACTION]
        pairs = torch.stack([o, a], dim=2).reshape(B, 2 * N, D)  # o_1 a_1 o_2 a_2 ...
        return torch.cat([pairs, self.type_emb[_DEMO_END].expand(B, 1, D)], dim=1)

    def live_tokens(self, observations: torch.Tensor) -> torch.Tensor:
        """Live observation tokens (B, T, D) -> (B, T, D)."""
        return observations + self.type_emb[_LIVE_OBS]

    # ------------------------------------------------------------------ full sequence

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whole stream (B, L, D) (prompt, then live tokens) -> the next chunk (B, A, Da).

        The reference computation: the A queries are appended and the whole sequence runs
        from zero state (training uses :meth:`chunks_at`, the robot the streaming API).
        """
        B, L, D = tokens.shape
        x = torch.cat([tokens, self.queries.expand(B, -1, -1)], dim=1)  # (B, L + A, D)
        return self.action_out(self._run(x, None, 0)[0][:, L:])

    # ------------------------------------------------------------------ streaming

    def prefill(self, tokens: torch.Tensor) -> StreamState:
        """The state after ``tokens`` (B, L, D) from an empty stream."""
        return self.extend(tokens, None)

    def extend(self, tokens: torch.Tensor, state: StreamState | None) -> StreamState:
        """Commit ``tokens`` (B, L, D) after ``state`` (None: empty stream); returns a new state.

        ``state`` stays valid (see the module docstring on the Transformer's buffer)."""
        length = 0 if state is None else state.length
        L = tokens.shape[1]
        if self.kind == "mamba":
            return StreamState(self._run(tokens, None if state is None else state.layers, length)[1], length + L)
        if not torch.is_grad_enabled():
            # Room for the A queries after the new tokens too, so that predicting from the new
            # state writes into this buffer instead of copying it.
            buffer = self._writable(state, tokens, L + self.queries.shape[0])
            for offset, piece in zip(range(0, L, TRANSFORMER_PREFILL_CHUNK), tokens.split(TRANSFORMER_PREFILL_CHUNK, dim=1)):
                self._run_in_place(piece, buffer, length + offset)
            buffer.filled = length + L
            return StreamState(buffer, length + L)
        # With autograd (training): immutable caches, each piece extending the previous one.
        layers = None if state is None else self._as_cache(state)
        for piece in tokens.split(TRANSFORMER_PREFILL_CHUNK, dim=1):
            layers = self._run(piece, layers, length)[1]
            length += piece.shape[1]
        return StreamState(layers, length)

    def predict(self, state: StreamState | None, batch: int = 1) -> torch.Tensor:
        """The next chunk (B, A, Da) after the committed stream; commits nothing.

        ``batch`` is only read for an empty stream (state None)."""
        B = batch if state is None else state.batch
        queries = self.queries.expand(B, -1, -1)
        if state is None:
            return self.action_out(self._run(queries, None, 0)[0])
        if self.kind == "transformer" and not torch.is_grad_enabled():
            # The queries' keys/values go to the free slots after the stream, left uncommitted.
            buffer = self._writable(state, queries, queries.shape[1])
            return self.action_out(self._run_in_place(queries, buffer, state.length))
        layers = state.layers if self.kind == "mamba" else self._as_cache(state)
        return self.action_out(self._run(queries, layers, state.length, return_states=False)[0])

    # ------------------------------------------------------------------ training

    def chunks_at(self, tokens: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """The chunks after S prefixes of a batch of streams in one batched run: (S, A, Da).

        Row s is ``predict(prefill(tokens[rows[s]:rows[s] + 1, :ends[s]]))`` (within float
        rounding); ``tokens`` (B, L, D) are whole streams, right-padded to one length (the
        model is causal, so what follows a prefix never changes its chunk), rows and ends (S,)
        long with 1 <= ends[s] <= L. One pass over ``tokens`` gives the backbone's state after
        every requested prefix (Mamba: each layer's conv window and scan state there;
        Transformer: the keys/values up to there), then the A queries of all S prefixes run
        from those states as one batch. The training loss's path: every cut of every sample,
        where streaming them would run the backbone once per cut.
        """
        _, layers = self._run(tokens, None, 0, states_at=(rows, ends))
        queries = self.queries.expand(rows.shape[0], -1, -1)  # (S, A, D)
        return self.action_out(self._run(queries, layers, ends, return_states=False)[0])

    def chunks_after_windows(
        self, prefixes: torch.Tensor, lengths: torch.Tensor, windows: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """The chunks after S windows, each committed after one of B prefixes: (S, A, Da).

        Row s is ``predict(extend(windows[s:s + 1], prefill(prefixes[r:r + 1, :lengths[r]])))``
        with r = rows[s] (within float rounding): a bounded live window (W tokens) re-run from
        the state after the prompt, as :class:`~mail_ros.policy.icil_policy.ICILPolicy` does
        with ``live_window``. ``prefixes`` (B, P, D) right-padded, ``lengths`` (B,) long in
        [1, P], ``windows`` (S, W, D), ``rows`` (S,) long. One pass over the prefixes gives each
        one's state (as :meth:`chunks_at`), then the S windows and their queries run as one batch
        from the states of their rows: W + A tokens per chunk, whatever the prompt's length.
        """
        B, S, W = prefixes.shape[0], rows.shape[0], windows.shape[1]
        _, layers = self._run(prefixes, None, 0, states_at=(torch.arange(B, device=prefixes.device), lengths))
        layers = [(first[rows], second[rows]) for first, second in layers]  # each row's prefix state
        x = torch.cat([windows, self.queries.expand(S, -1, -1)], dim=1)  # (S, W + A, D)
        return self.action_out(self._run(x, layers, lengths[rows], return_states=False)[0][:, W:])

    # ------------------------------------------------------------------ internals

    def _run(
        self,
        x: torch.Tensor,
        layers: Any,
        start: int | torch.Tensor,
        return_states: bool = True,
        states_at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Backbone over x (B, L, D) whose first token has stream index ``start``: one int, or
        (B,) per row when ``layers`` holds states of prefixes of different lengths (from
        ``states_at``; a Transformer row then attends to its first start[b] cached keys)."""
        if self.kind == "mamba":
            return self.stack.extend(x, layers, return_states=return_states, states_at=states_at)
        x = x + sinusoidal_positions(start, x.shape[1], self.d_model, x.device)
        lengths = start if isinstance(start, torch.Tensor) else None
        return self.stack.extend(x, layers, return_states=return_states, states_at=states_at, past_lengths=lengths)

    def _run_in_place(self, x: torch.Tensor, buffer: KVBuffer, start: int) -> torch.Tensor:
        """Transformer over x (B, L, D) at stream index ``start``, keys/values written into ``buffer``."""
        x = x + sinusoidal_positions(start, x.shape[1], self.d_model, x.device)
        return self.stack.extend_in_place(x, buffer, start)

    def _writable(self, state: StreamState | None, like: torch.Tensor, new: int) -> KVBuffer:
        """A buffer whose slots state.length .. + new - 1 may be written: the state's own when
        the state is its newest (tip) and it has room, else a copy of the state's tokens."""
        length = 0 if state is None else state.length
        capacity = length + new + max(BUFFER_HEADROOM, (length + new) // 4)
        if state is None:
            return KVBuffer.allocate(self.stack, like.shape[0], capacity, like)
        if isinstance(state.layers, KVBuffer):
            buffer = state.layers
            if buffer.filled == length and buffer.capacity >= length + new:
                return buffer
            return buffer.copy_prefix(length, capacity)
        buffer = KVBuffer.allocate(self.stack, state.batch, capacity, like)  # from an immutable cache
        for keys, values, (k, v) in zip(buffer.keys, buffer.values, state.layers):
            keys[:, :, :length], values[:, :, :length] = k, v
        buffer.filled = length
        return buffer

    def _as_cache(self, state: StreamState) -> Any:
        """The state's keys/values as an immutable per-layer cache (B, H, length, Dh) for autograd."""
        if not isinstance(state.layers, KVBuffer):
            return state.layers
        L = state.length
        return [(k[:, :, :L].clone(), v[:, :, :L].clone()) for k, v in zip(state.layers.keys, state.layers.values)]


class PromptSummary(nn.Module):
    """All frames of a prompt -> one conditioning vector, by attention pooling with learned queries.

    (N, I) frame descriptors of every demonstration together -> (D,), in H heads of d = D / H
    channels: score_nh = q_h . k_nh / sqrt(d) with k_n = W_k x_n, and head h of the summary is
    sum_n softmax_n(score)_nh v_nh, v_n = value(x_n). The weights let the frames that tell the
    task (the grasp, the cube carried) outweigh the rest, whatever K and the demonstrations'
    lengths; several heads can each pick other frames (where the cube is taken, where it is put
    down). ``value`` is linear (``hidden`` = 0) or a one-hidden-layer MLP, which can read a
    relation in one frame (which cube is under the hand) that a linear value cannot. An empty
    prompt (N = 0) summarises to zeros.
    """

    def __init__(self, in_dim: int, d_model: int, heads: int = 1, hidden: int = 0) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} summary heads")
        self.heads = heads
        self.key = nn.Linear(in_dim, d_model)
        self.value = (nn.Linear(in_dim, d_model) if hidden == 0 else
                      nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, d_model)))
        self.query = nn.Parameter(0.02 * torch.randn(d_model))  # the H queries (H, d), flattened

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        D, H = self.query.shape[0], self.heads
        if frames.shape[0] == 0:
            return frames.new_zeros(D)
        N = frames.shape[0]
        keys = self.key(frames).view(N, H, D // H)  # (N, H, d)
        scores = (keys * self.query.view(H, D // H)).sum(dim=-1) / math.sqrt(D // H)  # (N, H)
        values = self.value(frames).view(N, H, D // H)  # (N, H, d)
        return torch.einsum("nh,nhd->hd", scores.softmax(dim=0), values).reshape(D)  # (D,)
