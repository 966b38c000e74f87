"""A stack of pre-norm residual Mamba blocks with a final LayerNorm, and its recurrent state.

Each block computes ``x + Mamba(LayerNorm(x))``; this is the same function as mamba_ssm's
"Add -> LayerNorm -> Mixer" block chain (which carries the residual separately), written in the
plain pre-norm form. An optional ``memory`` of the same shape as ``x`` is added to the residual
stream after every block: ED-Ma's "Mamba aggregation" of the encoder output into the decoder.

Recurrent use: ``prefill(x)`` returns the per-layer (conv_state, ssm_state) after ``x`` and
``extend(x, states)`` continues from them, so a fixed prefix is run once. States are never
modified in place here, so one prefix state can be extended any number of times.
"""

from __future__ import annotations

import torch
from torch import nn

from mail_ros.model.mamba import Mamba

__all__ = ["MambaStack", "MambaStates"]

# Per layer (conv_state (B, E, K), ssm_state (B, E, N)).
MambaStates = list[tuple[torch.Tensor, torch.Tensor]]


class MambaBlock(nn.Module):
    """x + Mamba(LayerNorm(x))."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)


class MambaStack(nn.Module):
    """(B, L, D) -> (B, L, D): ``n_layers`` Mamba blocks and a final LayerNorm."""

    def __init__(self, n_layers: int, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MambaBlock(d_model, d_state, d_conv, expand) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """Full sequence from zero state; ``memory`` (B, L, D) is added after every block."""
        for layer in self.layers:
            x = x + layer.mixer(layer.norm(x))
            if memory is not None:
                x = x + memory
        return self.norm(x)

    def prefill(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> tuple[torch.Tensor, MambaStates]:
        """Like :meth:`forward`, also returning every layer's final states."""
        return self.extend(x, None, memory)

    def extend(
        self,
        x: torch.Tensor,
        states: MambaStates | None,
        memory: torch.Tensor | None = None,
        return_states: bool = True,
    ) -> tuple[torch.Tensor, MambaStates | None]:
        """Continue the sequence whose states are ``states`` (zeros when None) with ``x`` (B, L, D).

        Outputs equal the matching positions of :meth:`forward` over the whole sequence;
        ``memory`` holds the memory rows of these positions only. Returns the new states, or
        None with ``return_states=False`` (a continuation nothing extends further, such as a
        denoising step, saves computing them).
        """
        new_states: MambaStates = []
        for index, layer in enumerate(self.layers):
            conv_state, ssm_state = (None, None) if states is None else states[index]
            if return_states:
                y, conv_state, ssm_state = layer.mixer.forward_with_state(layer.norm(x), conv_state, ssm_state)
                new_states.append((conv_state, ssm_state))
            else:
                y = layer.mixer(layer.norm(x), conv_state, ssm_state)
            x = x + y
            if memory is not None:
                x = x + memory
        return self.norm(x), new_states if return_states else None
