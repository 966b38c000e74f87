"""Pre-norm causal Transformer stacks: the MaIL paper's baselines (D-Tr, ED-Tr).

:class:`TransformerStack` is a causal self-attention stack with a key/value cache
(``prefill``/``extend``) so that a fixed prefix is not recomputed; :class:`CrossTransformerStack`
is the ED-Tr decoder (causal self-attention, cross-attention to the encoder output, MLP).
Attention and residual dropout follow the reference (0.1 in the paper presets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TransformerStack", "CrossTransformerStack", "KVCache"]

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


def causal_mask(new: int, past: int, device: torch.device) -> torch.Tensor:
    """(new, past + new) bool: new token i sees every past token and new tokens <= i."""
    rows = torch.arange(new, device=device).unsqueeze(1) + past
    return torch.arange(past + new, device=device).unsqueeze(0) <= rows


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
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h = self.norm1(x)
        k, v = self.attn.project_kv(h)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        mask = causal_mask(x.shape[1], k.shape[2] - x.shape[1], x.device)
        x = x + self.drop(self.attn.attend(h, k, v, mask))
        x = x + self.mlp(self.norm2(x))
        return x, (k, v)


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
        self, x: torch.Tensor, cache: KVCache | None, return_states: bool = True
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Run ``x`` (B, L, D) as the continuation of the cached prefix; the cache is not modified.

        Returns the extended cache, or None with ``return_states=False`` (as
        :meth:`MambaStack.extend`; here the cache is a by-product of attention, so nothing is saved).
        """
        new_cache: KVCache = []
        for index, layer in enumerate(self.layers):
            x, kv = layer(x, None if cache is None else cache[index])
            new_cache.append(kv)
        return self.norm(x), new_cache if return_states else None


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
