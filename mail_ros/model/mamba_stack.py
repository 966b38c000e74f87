"""A stack of pre-norm residual Mamba blocks with a final LayerNorm, and its recurrent state.

Each block computes ``x + Mamba(LayerNorm(x))``; this is the same function as mamba_ssm's
"Add -> LayerNorm -> Mixer" block chain (which carries the residual separately), written in the
plain pre-norm form. An optional ``memory`` of the same shape as ``x`` is added to the residual
stream after every block: ED-Ma's "Mamba aggregation" of the encoder output into the decoder.

Recurrent use: ``prefill(x)`` returns the per-layer (conv_state, ssm_state) after ``x`` and
``extend(x, states)`` continues from them, so a fixed prefix is run once. States are never
modified in place here, so one prefix state can be extended any number of times.

Backends: float32 CPU inference runs the whole stack in ONE call of the fused CPU kernel
(:meth:`mail_ros.model.cpu_kernel.CpuKernel.mamba_stack`: LayerNorms, projections, conv, scan,
gate and residual adds in C), because at the sizes a policy runs (a few tokens per denoising
step, d_model 128) a block's dozen small PyTorch calls cost more than their arithmetic.
Everything else (training, float64, CUDA) runs block by block through :class:`Mamba`, whose
PyTorch path is the reference the fused stack is tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from mail_ros.model.cpu_kernel import CpuKernel, PackedMambaStack, stack_weights_key
from mail_ros.model.mamba import Mamba, cpu_inference_kernel

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
        # The weights in the fused CPU kernel's layout, repacked whenever they change.
        self._packed: PackedMambaStack | None = None

    def __getstate__(self) -> dict:
        # Copies (deepcopy, pickle) repack from their own weights: the cache holds raw pointers.
        return {**super().__getstate__(), "_packed": None}

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """Full sequence from zero state; ``memory`` (B, L, D) is added after every block."""
        if (cpu := self._cpu_kernel(x, None, memory)) is not None:
            return self._extend_cpu_kernel(cpu, x, None, memory, return_states=False)[0]
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
        states_at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, MambaStates | None]:
        """Continue the sequence whose states are ``states`` (zeros when None) with ``x`` (B, L, D).

        Outputs equal the matching positions of :meth:`forward` over the whole sequence;
        ``memory`` holds the memory rows of these positions only. Returns the new states, or
        None with ``return_states=False`` (a continuation nothing extends further, such as a
        denoising step, saves computing them). ``states_at`` (rows (S,), ends (S,)): return
        the S states after the first ends[s] tokens of row rows[s] instead of the final ones
        (see :meth:`Mamba.forward_with_state`), e.g. to continue S prefixes of a batch of
        sequences at once.
        """
        # The fused kernel keeps only the final states: states_at runs block by block.
        if states_at is None and (cpu := self._cpu_kernel(x, states, memory)) is not None:
            return self._extend_cpu_kernel(cpu, x, states, memory, return_states)
        new_states: MambaStates = []
        for index, layer in enumerate(self.layers):
            conv_state, ssm_state = (None, None) if states is None else states[index]
            if return_states:
                y, conv_state, ssm_state = layer.mixer.forward_with_state(layer.norm(x), conv_state, ssm_state,
                                                                          states_at=states_at)
                new_states.append((conv_state, ssm_state))
            else:
                y = layer.mixer(layer.norm(x), conv_state, ssm_state)
            x = x + y
            if memory is not None:
                x = x + memory
        return self.norm(x), new_states if return_states else None

    def _cpu_kernel(
        self, x: torch.Tensor, states: MambaStates | None, memory: torch.Tensor | None
    ) -> CpuKernel | None:
        """The fused CPU kernel when it may run this call: float32 CPU inference throughout."""
        first = self.layers[0].mixer
        if memory is not None and (memory.device.type != "cpu" or memory.dtype != torch.float32):
            return None
        if states is not None and any(state.dtype != torch.float32 for state in states[0]):
            return None  # the per-block path keeps the given states' dtype
        return cpu_inference_kernel(x, self, self.norm.weight, first.in_proj.weight, first.A_log)

    def _extend_cpu_kernel(
        self,
        cpu: CpuKernel,
        x: torch.Tensor,
        states: MambaStates | None,
        memory: torch.Tensor | None,
        return_states: bool,
    ) -> tuple[torch.Tensor, MambaStates | None]:
        """:meth:`extend` in one call of the fused kernel; the new states are views of one
        (n_layers, B, E, K) and one (n_layers, B, E, N) tensor."""
        first = self.layers[0].mixer
        first._check_input(x, "x")
        layers = self._fused_layer_fields()
        final_norm = (self.norm.weight, self.norm.bias, self.norm.eps)
        key = stack_weights_key(layers, final_norm)
        packed = self._packed
        if packed is None or packed.key != key:
            packed = self._packed = cpu.pack_mamba_stack(layers, final_norm)
        new = None
        if return_states:
            n, B = len(self.layers), x.shape[0]
            new = (x.new_empty(n, B, first.d_inner, first.d_conv), x.new_empty(n, B, first.d_inner, first.d_state))
        y = cpu.mamba_stack(x, packed, states, new, memory)
        return y, None if new is None else list(zip(new[0].unbind(0), new[1].unbind(0)))

    def _fused_layer_fields(self) -> list[tuple[torch.Tensor | float | None, ...]]:
        """Every block's tensors in the order of cpu_kernel.LAYER_FIELDS, read fresh each call (so
        a replaced parameter is seen). Through the modules' parameter dicts: nn.Module attribute
        access costs about 1 us, 14 per block, per call, which is more than a block's kernel time."""
        fields = []
        for layer in self.layers:
            norm, mixer = layer._modules["norm"], layer._modules["mixer"]
            sub, own = mixer._modules, mixer._parameters
            norm_p, in_p, conv_p = norm._parameters, sub["in_proj"]._parameters, sub["conv1d"]._parameters
            dt_p, out_p = sub["dt_proj"]._parameters, sub["out_proj"]._parameters
            fields.append((
                norm_p["weight"], norm_p["bias"], in_p["weight"], in_p["bias"], conv_p["weight"], conv_p["bias"],
                sub["x_proj"]._parameters["weight"], dt_p["weight"], dt_p["bias"], own["A_log"], own["D"],
                out_p["weight"], out_p["bias"], norm.eps,
            ))
        return fields
