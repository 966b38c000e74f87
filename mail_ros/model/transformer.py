"""Pre-norm causal Transformer stacks: the MaIL paper's baselines (D-Tr, ED-Tr).

:class:`TransformerStack` is a causal self-attention stack with a key/value cache
(``prefill``/``extend``) so that a fixed prefix is not recomputed, and a preallocated one written
in place for streaming inference (:class:`KVBuffer`, ``extend_in_place``); :class:`CrossTransformerStack`
is the ED-Tr decoder (causal self-attention, cross-attention to the encoder output, MLP).
Attention and residual dropout follow the reference (0.1 in the paper presets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TransformerStack", "CrossTransformerStack", "KVCache", "KVBuffer"]

# Per layer (keys, values), each (B, H, L, Dh).
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class MultiHeadAttention(nn.Module):
    """Multi-head attention; queries from ``x``, keys/values from ``context`` (self when None)."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, H, L, Dh)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(context).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def attend(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``mask`` (Lq, Lk) bool, True where attention is allowed; None attends everywhere."""
        B, L, D = x.shape
        y = F.scaled_dot_product_attention(
            self._split(self.q(x)), k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(B, L, D))


def causal_mask(new: int, past: int, device: torch.device, past_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(new, past + new) bool: new token i sees every past token and new tokens <= i.

    With ``past_lengths`` (B,): (B, 1, new, past + new), row b's new tokens seeing only the
    first past_lengths[b] past tokens (a cache of right-padded rows, see TransformerStack.extend).
    """
    rows = torch.arange(new, device=device).unsqueeze(1) + past
    mask = torch.arange(past + new, device=device).unsqueeze(0) <= rows  # (new, past + new)
    if past_lengths is None:
        return mask
    keys = torch.arange(past + new, device=device)
    visible = (keys < past_lengths.unsqueeze(1)) | (keys >= past)  # (B, past + new)
    return (mask & visible[:, None, :]).unsqueeze(1)


class MLP(nn.Sequential):
    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))


class SelfAttentionBlock(nn.Module):
    """x + attn(LN(x)); x + mlp(LN(x)), causal."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h = self.norm1(x)
        k, v = self.attn.project_kv(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        return self._attend_and_mlp(x, h, k, v, past_lengths), (k, v)

    def forward_in_place(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """``x`` (B, L, D) as the tokens start .. start + L - 1 of a stream whose earlier keys and
        values are in ``keys``/``values`` (B, H, capacity >= start + L, Dh): this piece's keys and
        values are WRITTEN into slots start .. start + L - 1, then it attends over slots < start + L.

        Same function as :meth:`forward` with ``past`` = the first ``start`` slots, without
        copying the past (inference: autograd cannot follow the in-place writes).
        """
        end = start + x.shape[1]
        h = self.norm1(x)
        k, v = self.attn.project_kv(h)
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return self._attend_and_mlp(x, h, keys[:, :, :end], values[:, :, :end])

    def _attend_and_mlp(
        self, x: torch.Tensor, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The block after the key/value projection; k, v (B, H, past + L, Dh) end with x's own;
        ``past_lengths`` (B,): the past keys each row sees (all when None)."""
        mask = causal_mask(x.shape[1], k.shape[2] - x.shape[1], x.device, past_lengths)
        x = x + self.drop(self.attn.attend(h, k, v, mask))
        return x + self.mlp(self.norm2(x))


class TransformerStack(nn.Module):
    """Causal pre-norm Transformer: (B, L, D) -> (B, L, D), final LayerNorm."""

    def __init__(self, n_layers: int, d_model: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SelfAttentionBlock(d_model, heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefill(x)[0]

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Run a whole sequence; also return every layer's keys/values for :meth:`extend`."""
        return self.extend(x, None)

    def extend(
        self,
        x: torch.Tensor,
        cache: KVCache | None,
        return_states: bool = True,
        states_at: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Run ``x`` (B, L, D) as the continuation of the cached prefix; the cache is not modified.

        Returns the extended cache, or None with ``return_states=False`` (as
        :meth:`MambaStack.extend`; here the cache is a by-product of attention, so nothing is saved).

        Prefixes of a batch (as ``MambaStack.extend``'s ``states_at``): ``states_at`` (rows (S,),
        ends (S,)), from an empty cache only, returns for each s the cache of row rows[s]
        (S, H, L, Dh) of which the first ends[s] slots are the state after ends[s] tokens; a
        continuation from it passes those lengths as ``past_lengths`` (S,), so that row s
        attends to its first past_lengths[s] cached keys only (the later ones are the padding
        or the future of that prefix).
        """
        if states_at is not None and cache is not None:
            raise ValueError("TransformerStack.extend: states_at is only for a sequence from an empty cache")
        new_cache: KVCache = []
        for index, layer in enumerate(self.layers):
            x, kv = layer(x, None if cache is None else cache[index], past_lengths)
            new_cache.append(kv)
        if states_at is not None:
            new_cache = [(k[states_at[0]], v[states_at[0]]) for k, v in new_cache]
        return self.norm(x), new_cache if return_states else None

    def extend_in_place(self, x: torch.Tensor, buffer: "KVBuffer", start: int) -> torch.Tensor:
        """:meth:`extend` over a preallocated :class:`KVBuffer` holding the first ``start`` tokens:
        writes ``x``'s keys/values into slots start .. start + L - 1 of every layer (the caller
        makes sure they are free and fit) and returns the features (B, L, D). Inference only."""
        for layer, keys, values in zip(self.layers, buffer.keys, buffer.values):
            x = layer.forward_in_place(x, keys, values, start)
        return self.norm(x)


@dataclass
class KVBuffer:
    """Keys and values of a token stream in preallocated tensors, written in place (inference).

    Per layer ``keys``/``values`` (B, H, capacity, Dh). Slots ``[0, filled)`` hold the committed
    tokens of the newest state that uses the buffer; later slots are free, e.g. for queries
    that are run and not committed. Appending to a ``(B, H, L, Dh)`` cache with ``torch.cat``
    copies the whole cache on every step; with a buffer a step writes only its own keys/values
    (measured, demo size, 20 000 cached tokens, one CPU thread: the copies were about half of
    a streaming step).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    filled: int

    @classmethod
    def allocate(cls, stack: TransformerStack, batch: int, capacity: int, like: torch.Tensor) -> "KVBuffer":
        """Empty buffers for every layer of ``stack``, of ``like``'s device and dtype."""
        attn = stack.layers[0].attn
        d_model = attn.q.in_features
        shape = (batch, attn.heads, capacity, d_model // attn.heads)
        keys = [like.new_empty(shape) for _ in stack.layers]
        values = [like.new_empty(shape) for _ in stack.layers]
        return cls(keys, values, 0)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def copy_prefix(self, length: int, capacity: int) -> "KVBuffer":
        """A new buffer of ``capacity`` slots holding this one's first ``length`` slots."""
        keys = [k.new_empty(*k.shape[:2], capacity, k.shape[3]) for k in self.keys]
        values = [v.new_empty(*v.shape[:2], capacity, v.shape[3]) for v in self.values]
        for new, old in zip(keys + values, self.keys + self.values):
            new[:, :, :length] = old[:, :, :length]
        return KVBuffer(keys, values, length)

    def nbytes(self) -> int:
        """Bytes allocated (capacity, not only the filled slots)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class CrossAttentionBlock(nn.Module):
    """Causal self-attention, then cross-attention to ``memory``, then MLP; all pre-norm."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, heads, dropout)
        self.norm_cross = nn.LayerNorm(d_model)
        self.cross = MultiHeadAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        k, v = self.attn.project_kv(h)
        x = x + self.drop(self.attn.attend(h, k, v, causal_mask(x.shape[1], 0, x.device)))
        mk, mv = self.cross.project_kv(memory)
        x = x + self.drop(self.cross.attend(self.norm_cross(x), mk, mv, None))
        return x + self.mlp(self.norm2(x))


class CrossTransformerStack(nn.Module):
    """ED-Tr decoder: (B, L, D) queries attending to ``memory`` (B, M, D); final LayerNorm."""

    def __init__(self, n_layers: int, d_model: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionBlock(d_model, heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, memory)
        return self.norm(x)
