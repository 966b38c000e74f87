"""The Mamba mixer layer (selective state-space block) of MaIL, with three backends.

:class:`Mamba` takes ``mamba_ssm.Mamba``'s constructor arguments and has its parameter names,
shapes and initialisation, so state_dicts load both ways with ``strict=True``. Per token the
layer computes ``out_proj(scan(silu(conv1d(u))) * silu(z))`` with ``u, z = in_proj(x)``.

Backends (pick is per call, from the input's device; see :func:`mamba_backend`):

* CUDA tensors with ``mamba_ssm`` importable: its fused kernels (``mamba_inner_fn`` or
  ``selective_scan_fn`` for sequences, the Triton ``selective_state_update`` for one-token
  steps; ``causal_conv1d`` kernels when that package imports too). mamba_ssm is imported
  lazily, on the first CUDA tensor only, because on a machine without CUDA it fails at import.
* float32 CPU inference (no gradient needed): the fused C kernels of
  :mod:`mail_ros.model.cpu_kernel`, one for the causal conv with its SiLU and state update, one
  for dt_proj, softplus, the scan, the D skip and the silu(z) gate (built on first use; when
  they cannot be built or loaded, the reason is logged once and the PyTorch scan runs).
  :class:`mail_ros.model.mamba_stack.MambaStack` runs whole stacks of these layers in one call
  of the same library instead.
* Everything else (training, float64, CUDA without mamba_ssm): the plain PyTorch scan of
  :mod:`mail_ros.model.selective_scan`, the reference the other two are tested against.

Shapes: B batch, L sequence length, D = d_model, E = d_inner = expand * D, N = d_state,
K = d_conv, R = dt_rank. In code, ``A``, ``B``, ``C``, ``D`` also name the SSM's matrices as in
the Mamba paper (tensors, never shape letters). Recurrent state: ``conv_state`` (B, E, K) holds the last K conv inputs
(oldest first, as mamba_ssm) and ``ssm_state`` (B, E, N) the scan state.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mail_ros.model.cpu_kernel import CpuKernel, cpu_kernel_unavailable_reason, load_cpu_kernel
from mail_ros.model.selective_scan import selective_scan, selective_state_step

__all__ = ["BACKEND_CPU", "BACKEND_CUDA", "BACKEND_TORCH", "Mamba", "cpu_inference_kernel", "mamba_backend",
           "mamba_backend_report"]

log = logging.getLogger(__name__)

BACKEND_CUDA = "mamba_ssm CUDA kernels"
BACKEND_CPU = "fused CPU kernel"
BACKEND_TORCH = "PyTorch reference scan"
DT_INITS = ("random", "constant")


@dataclass(frozen=True)
class _CudaKernels:
    """mamba_ssm's kernels; the causal_conv1d ones are None when that package is missing."""

    selective_scan_fn: Callable
    mamba_inner_fn: Callable
    selective_state_update: Callable
    causal_conv1d_fn: Callable | None
    causal_conv1d_update: Callable | None


@functools.cache
def _import_cuda_kernels() -> _CudaKernels | None:
    """Import the kernels once per process; None, with a logged reason, when unusable."""
    # A missing or half-built install fails in several ways at import time: ImportError (no
    # selective_scan_cuda extension), OSError (CUDA runtime library), RuntimeError (Triton
    # finds no driver). All of them mean the same thing here: use the PyTorch scan.
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception as err:  # broad on purpose, see above
        log.warning("mamba_ssm not usable (%s: %s): CUDA tensors run the %s",
                    type(err).__name__, err, BACKEND_TORCH)
        return None
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception as err:  # same failure modes as mamba_ssm
        log.warning("causal_conv1d not usable (%s: %s): the short convolution runs unfused "
                    "and mamba_inner_fn is off", type(err).__name__, err)
        causal_conv1d_fn = causal_conv1d_update = None
    return _CudaKernels(selective_scan_fn, mamba_inner_fn, selective_state_update,
                        causal_conv1d_fn, causal_conv1d_update)


def _cuda_kernels(device: torch.device) -> _CudaKernels | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _import_cuda_kernels()


def cpu_inference_kernel(x: torch.Tensor, module: nn.Module, *weights: torch.Tensor) -> CpuKernel | None:
    """The fused CPU kernels when they may run this call of ``module``: float32 CPU inference
    (no gradient needed), ``x`` and the given ``weights`` float32."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or any(w.dtype != torch.float32 for w in weights):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return None
    return load_cpu_kernel()


def mamba_backend(device: torch.device | str) -> str:
    """Name of the backend that runs :class:`Mamba` inference on ``device``, for start-up logs.

    Returns :data:`BACKEND_CUDA` ("mamba_ssm CUDA kernels"), :data:`BACKEND_CPU` ("fused CPU
    kernel"; float32 inference, training runs the reference) or :data:`BACKEND_TORCH` ("PyTorch
    reference scan"). Only a CUDA device with a working CUDA runtime triggers the (cached)
    mamba_ssm import; a CPU device builds or loads the CPU kernel (cached).
    """
    device = torch.device(device)
    if _cuda_kernels(device) is not None:
        return BACKEND_CUDA
    if device.type == "cpu" and load_cpu_kernel() is not None:
        return BACKEND_CPU
    return BACKEND_TORCH


def mamba_backend_report(device: torch.device | str) -> str:
    """:func:`mamba_backend`, with the reason when a CPU runs the reference instead of the kernel."""
    name = mamba_backend(device)
    if name == BACKEND_TORCH and torch.device(device).type == "cpu":
        return f"{name} (CPU kernel unavailable: {cpu_kernel_unavailable_reason()})"
    return name


class Mamba(nn.Module):
    """Mamba mixer: (B, L, D) -> (B, L, D), drop-in compatible with ``mamba_ssm.Mamba``.

    Arguments and defaults are mamba_ssm's. ``dt_proj.bias`` is initialised so that
    softplus(bias) is log-uniform in [dt_min, dt_max] (floored at dt_init_floor), ``A_log`` to
    log(1..N) per channel and ``D`` to ones; ``A_log`` and ``D`` stay float32 whatever
    ``dtype`` is, like mamba_ssm. ``use_fast_path`` enables the fully fused ``mamba_inner_fn``
    on CUDA (it needs causal_conv1d); ``layer_idx`` is kept for compatibility only.

    Inference API:

    * :meth:`forward_with_state` runs a sequence from given (or zero) states and returns the
      final states as NEW tensors, so a fixed prefix can be run once and its states reused
      any number of times.
    * :meth:`step` advances one token and updates the states IN PLACE (as mamba_ssm does):
      clone states before stepping if they must be reused.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba {name} must be a positive int, got {value!r}")
        if int(expand * d_model) < 1:
            raise ValueError(f"Mamba expand * d_model must be >= 1, got {expand} * {d_model}")
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"Mamba dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        if dt_init not in DT_INITS:
            raise ValueError(f"Mamba dt_init must be one of {DT_INITS}, got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba needs 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        # Depthwise and unpadded: callers prepend the K - 1 inputs of left context explicitly,
        # zeros at a sequence start or the conv state when continuing one.
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

        # dt weights keep the variance of dt_proj's output independent of dt_rank.
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(dt_init_std)
            else:
                self.dt_proj.weight.uniform_(-dt_init_std, dt_init_std)
            log_dt = torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min))
            dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=dt_init_floor)
            # softplus^-1(dt) = log(exp(dt) - 1), in the form that stays finite for tiny dt.
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # Generic "re-init every Linear" code must skip this bias (mamba_ssm's marker).
        self.dt_proj.bias._no_reinit = True

        state_index = torch.arange(1, d_state + 1, dtype=torch.float32, device=device)
        self.A_log = nn.Parameter(torch.log(state_index).repeat(self.d_inner, 1))  # (E, N)
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))  # (E,)
        self.D._no_weight_decay = True

    # ------------------------------------------------------------------ public API

    def forward(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, D) -> (B, L, D), from zero state or continuing from the given states (which
        are not modified): :meth:`forward_with_state` without computing the final states."""
        self._check_input(x, "x")
        self._check_optional_states(x.shape[0], conv_state, ssm_state)
        return self._sequence(x, conv_state, ssm_state, return_state=False)[0]

    def forward_with_state(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        ssm_state: torch.Tensor | None = None,
        states_at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run a whole sequence starting from the given states and also return the final ones.

        Args:
            x: (B, L, D) input, L >= 1.
            conv_state: (B, E, K) and ssm_state (B, E, N) from :meth:`allocate_inference_cache`,
                a previous call or :meth:`step`; both None to start from zeros (a prefill).
            states_at: (rows (S,), ends (S,)) long: return instead the states after the first
                ends[s] tokens (1 <= ends[s] <= L) of batch row rows[s], (S, E, K) and (S, E, N):
                what this call would have returned for ``x[rows[s]:rows[s] + 1, :ends[s]]``.
                The states of every position are computed for the sequence anyway (the scan's
                h, the conv's input window), so S states cost a gather, not S runs. Always on
                the PyTorch scan (the fused kernels keep only the last state).

        Returns:
            ``(y, conv_state, ssm_state)``: y (B, L, D) equals the corresponding slice of
            ``forward`` over the concatenated sequence; the states are new tensors (the inputs
            are never modified), in the dtypes of the given states, else those of
            :meth:`allocate_inference_cache`. On the PyTorch backend everything is
            differentiable; on CUDA mamba_ssm gives no gradient through the returned states.
        """
        self._check_input(x, "x")
        self._check_optional_states(x.shape[0], conv_state, ssm_state)
        if states_at is not None:
            rows, ends = states_at
            if rows.dim() != 1 or rows.shape != ends.shape or rows.dtype != torch.long or ends.dtype != torch.long:
                raise ValueError("Mamba states_at must be (rows, ends), two long tensors of one shape (S,)")
            if len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < x.shape[0]
                                  and 1 <= int(ends.min()) and int(ends.max()) <= x.shape[1]):
                raise ValueError(f"Mamba states_at rows must be in [0, {x.shape[0]}) and ends in [1, {x.shape[1]}]")
        return self._sequence(x, conv_state, ssm_state, return_state=True, states_at=states_at)

    def allocate_inference_cache(
        self,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero states ``(conv_state (B, E, K), ssm_state (B, E, N))`` for :meth:`step`.

        Defaults as mamba_ssm: the device of the parameters, conv1d's dtype for the conv
        state and dt_proj's dtype for the scan state.
        """
        device = self.out_proj.weight.device if device is None else device
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                 dtype=self.conv1d.weight.dtype if dtype is None else dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=self.dt_proj.weight.dtype if dtype is None else dtype)
        return conv_state, ssm_state

    def step(
        self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance one token: x (B, 1, D) -> y (B, 1, D); the states are updated IN PLACE.

        Returns ``(y, conv_state, ssm_state)`` with the same state tensors that were passed in,
        as mamba_ssm. Meant for inference (no_grad): use :meth:`forward_with_state` when
        gradients through the recurrence are needed.
        """
        self._check_input(x, "x")
        if x.shape[1] != 1:
            raise ValueError(f"Mamba.step takes one token, x of shape (B, 1, {self.d_model}); "
                             f"got {tuple(x.shape)}")
        self._check_states(x.shape[0], conv_state, ssm_state)
        kernels = _cuda_kernels(x.device)
        cpu = None if kernels is not None else cpu_inference_kernel(x, self, self.A_log)
        u, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)  # (B, E) each
        if kernels is not None and kernels.causal_conv1d_update is not None:
            u = kernels.causal_conv1d_update(u, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias,
                                             "silu")
        elif cpu is not None and conv_state.dtype == torch.float32 and conv_state.is_contiguous():
            u = cpu.causal_conv_silu(u[:, None], conv_state, self.conv1d.weight[:, 0], self.conv1d.bias,
                                     new_state=conv_state)[:, 0]  # (B, E)
        else:
            conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
            conv_state[:, :, -1] = u
            # The state is the K-step window ending at this token: one output step.
            u = F.silu(self._causal_conv(conv_state.to(u.dtype))[..., 0])  # (B, E)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if kernels is not None:
            A = -torch.exp(self.A_log.float())  # (E, N)
            # The kernel adds the dt bias and applies softplus itself, and gates with silu(z).
            y = kernels.selective_state_update(
                ssm_state, u, F.linear(dt, self.dt_proj.weight), A, B, C, self.D, z=z,
                dt_bias=self.dt_proj.bias, dt_softplus=True,
            )
        elif cpu is not None:
            # The kernel updates a contiguous float32 state in place; others go through a copy.
            state = ssm_state if ssm_state.dtype == torch.float32 and ssm_state.is_contiguous() \
                else ssm_state.to(torch.float32, memory_format=torch.contiguous_format)
            y = cpu.selective_scan(u[:, None], dt[:, None], self.dt_proj.bias, self.A_log, B[:, None],
                                   C[:, None], self.D, z[:, None], state, dt_weight=self.dt_proj.weight,
                                   a_is_log=True)[:, 0].to(u.dtype)  # (B, E)
            if state is not ssm_state:
                ssm_state.copy_(state)
        else:
            delta = F.softplus(self.dt_proj(dt))  # (B, E)
            y = selective_state_step(ssm_state, u, delta, -torch.exp(self.A_log), B, C, self.D)
            y = y * F.silu(z)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    # ------------------------------------------------------------------ internals

    def _check_input(self, x: torch.Tensor, name: str) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] < 1:
            raise ValueError(f"Mamba expects {name} of shape (B, L >= 1, {self.d_model}), "
                             f"got {tuple(x.shape)}")

    def _check_optional_states(
        self, batch: int, conv_state: torch.Tensor | None, ssm_state: torch.Tensor | None
    ) -> None:
        if (conv_state is None) != (ssm_state is None):
            raise ValueError("Mamba needs both conv_state and ssm_state, or neither")
        if conv_state is not None:
            self._check_states(batch, conv_state, ssm_state)

    def _check_states(self, batch: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        for name, state, expected in (
            ("conv_state", conv_state, (batch, self.d_inner, self.d_conv)),
            ("ssm_state", ssm_state, (batch, self.d_inner, self.d_state)),
        ):
            if tuple(state.shape) != expected:
                raise ValueError(f"Mamba {name} must have shape {expected} (batch, d_inner, "
                                 f"{'d_conv' if name == 'conv_state' else 'd_state'}), "
                                 f"got {tuple(state.shape)}")

    def _sequence(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
        return_state: bool,
        states_at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        kernels = _cuda_kernels(x.device) if states_at is None else None
        if kernels is None:
            y, window, last = self._sequence_torch(x, conv_state, ssm_state, states_at)
        else:
            fused = self.use_fast_path and kernels.causal_conv1d_fn is not None
            if fused and not return_state and conv_state is None:
                return self._sequence_fused(x, kernels), None, None
            y, window, last = self._sequence_cuda(x, kernels, conv_state, ssm_state)
        if not return_state:
            return y, None, None
        conv_dtype = self.conv1d.weight.dtype if conv_state is None else conv_state.dtype
        ssm_dtype = self.dt_proj.weight.dtype if ssm_state is None else ssm_state.dtype
        if states_at is None:
            # Cloned: the slices are views of tensors autograd saved, and step() writes in place.
            new_conv_state = window[..., -self.d_conv:].to(conv_dtype, copy=True)  # (B, E, K)
        else:
            # The conv state after token t is the window's columns t .. t + K - 1 (its inputs
            # t - K + 1 .. t); unfold gives every such K-column view, indexing copies.
            rows, ends = states_at
            new_conv_state = window.unfold(-1, self.d_conv, 1)[rows, :, ends - 1].to(conv_dtype)  # (S, E, K)
        return y, new_conv_state, last.to(ssm_dtype, copy=True)

    def _conv_window(self, u: torch.Tensor, conv_state: torch.Tensor | None) -> torch.Tensor:
        """Conv inputs (B, E, L) with their K - 1 predecessors prepended: (B, E, K - 1 + L)."""
        if conv_state is None:
            context = u.new_zeros(u.shape[0], self.d_inner, self.d_conv - 1)
        else:
            context = conv_state[..., 1:].to(u.dtype)
        return torch.cat([context, u], dim=-1)

    def _causal_conv(self, window: torch.Tensor) -> torch.Tensor:
        """Depthwise convolution of a window (B, E, K - 1 + L) -> (B, E, L), before the activation.

        Written as K shifted multiply-adds rather than conv1d. Measured on the 2-core development
        CPU (one thread, E = 256, K = 4): the library convolution costs 40-60 us a call even for
        the 11 steps a denoising step runs (multiply-adds: 18 us), a quarter of the paper-size
        D-Ma's per-step time; fine for single sequences up to ~200 steps (52 vs 111 us) and
        slower only for large inference batches (B = 16, L = 201: 250 vs 800 us); forward and
        backward at training sizes are faster (B = 64, L = 20: 3.9 vs 4.7 ms).
        """
        weight = self.conv1d.weight[:, 0].unsqueeze(-1)  # (E, K, 1)
        length = window.shape[-1] - self.d_conv + 1
        if self.conv1d.bias is None:
            y = window[..., :length] * weight[:, 0]
        else:
            y = torch.addcmul(self.conv1d.bias.unsqueeze(-1), window[..., :length], weight[:, 0])
        for k in range(1, self.d_conv):
            y = y.addcmul_(window[..., k : k + length], weight[:, k])
        return y

    def _sequence_torch(
        self,
        x: torch.Tensor,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
        states_at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, conv window, last scan state, or those of ``states_at``) on the PyTorch scan, or
        the CPU kernel for inference without ``states_at``."""
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, E) each
        if states_at is None and (cpu := cpu_inference_kernel(x, self, self.A_log)) is not None:
            return self._sequence_cpu_kernel(cpu, u, z, conv_state, ssm_state)
        window = self._conv_window(u.transpose(1, 2), conv_state)  # (B, E, K - 1 + L)
        u = F.silu(self._causal_conv(window)).transpose(1, 2)  # (B, L, E)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # (B, L, E)
        steps = None if states_at is None else (states_at[0], states_at[1] - 1)
        y, last = selective_scan(u, delta, -torch.exp(self.A_log), B, C, self.D, h0=ssm_state, states_at=steps)
        return self.out_proj(y * F.silu(z)), window, last

    def _sequence_cpu_kernel(
        self,
        cpu: CpuKernel,
        u: torch.Tensor,
        z: torch.Tensor,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """_sequence_torch's result on the fused CPU kernels, the conv window cut to its last K
        columns (the next conv state); u, z (B, L, E) from in_proj."""
        batch = u.shape[0]
        if conv_state is not None:
            conv_state = conv_state.to(torch.float32, memory_format=torch.contiguous_format)
        new_conv = u.new_empty(batch, self.d_inner, self.d_conv, dtype=torch.float32)  # (B, E, K)
        u = cpu.causal_conv_silu(u, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, new_conv)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if ssm_state is None:
            last = u.new_zeros(batch, self.d_inner, self.d_state, dtype=torch.float32)
        else:
            last = ssm_state.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        # The kernel applies dt_proj, softplus, A = -exp(A_log) and the silu(z) gate itself.
        y = cpu.selective_scan(u, dt, self.dt_proj.bias, self.A_log, B, C, self.D, z, last,
                               dt_weight=self.dt_proj.weight, a_is_log=True)  # (B, L, E)
        return self.out_proj(y), new_conv, last

    def _in_proj_channels_first(self, x: torch.Tensor) -> torch.Tensor:
        # (2E, D) @ (B, D, L) -> (B, 2E, L) with L contiguous, the layout the kernels expect.
        xz = torch.matmul(self.in_proj.weight, x.transpose(1, 2))
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.unsqueeze(-1)
        return xz

    def _sequence_fused(self, x: torch.Tensor, kernels: _CudaKernels) -> torch.Tensor:
        return kernels.mamba_inner_fn(
            self._in_proj_channels_first(x), self.conv1d.weight, self.conv1d.bias,
            self.x_proj.weight, self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias,
            -torch.exp(self.A_log.float()), None, None, self.D.float(),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
        )

    def _sequence_cuda(
        self,
        x: torch.Tensor,
        kernels: _CudaKernels,
        conv_state: torch.Tensor | None,
        ssm_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, conv window, last scan state) on mamba_ssm's selective_scan_fn."""
        u, z = self._in_proj_channels_first(x).chunk(2, dim=1)  # (B, E, L) each
        window = self._conv_window(u, conv_state)
        if conv_state is None and kernels.causal_conv1d_fn is not None:
            u = kernels.causal_conv1d_fn(u, self.conv1d.weight[:, 0], self.conv1d.bias,
                                         activation="silu")
        else:
            u = F.silu(self._causal_conv(window))
        dt, B, C = self.x_proj(u.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)  # (B, L, R), (B, L, N) x2
        dt = torch.matmul(self.dt_proj.weight, dt.transpose(1, 2))  # (B, E, L), bias in kernel
        B = B.transpose(1, 2).contiguous()  # (B, N, L)
        C = C.transpose(1, 2).contiguous()  # (B, N, L)
        A = -torch.exp(self.A_log.float())  # (E, N)
        y, last = kernels.selective_scan_fn(
            u, dt, A, B, C, self.D.float(), z=z if ssm_state is None else None,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, return_last_state=True,
        )
        if ssm_state is not None:
            # The kernel always starts from a zero state. The recurrence is linear, so the
            # initial state adds exp(A * cumsum(delta)) * h0 to every later state; the gate
            # silu(z) is applied after that term is added.
            delta = F.softplus(dt.float() + self.dt_proj.bias.float().unsqueeze(-1))  # (B, E, L)
            decay = torch.exp(torch.cumsum(delta, dim=-1).unsqueeze(-1) * A.unsqueeze(1))
            carried = decay * ssm_state.float().unsqueeze(2)  # (B, E, L, N)
            y = (y + torch.einsum("beln,bnl->bel", carried, C.float()).to(y.dtype)) * F.silu(z)
            last = last + carried[:, :, -1]
        return self.out_proj(y.transpose(1, 2)), window, last
