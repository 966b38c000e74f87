"""Discrete DDPM as used by MaIL: cosine schedule, epsilon prediction, ancestral sampling.

The schedule has K steps (16 in MaIL) used for training AND sampling, with
alpha_bar(t) = cos^2(((t / K) + s) / (1 + s) * pi / 2), s = 0.008, and betas clipped at 0.999.
Sampling is ancestral: predict eps, form the x0 estimate, clamp it to the normalised range of
the training actions, take the posterior mean, and add noise with the clipped-log posterior
variance except at the last step (t = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["CosineDDPM", "TimeEmbedding", "sinusoidal_embedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) integer or float steps -> (N, dim): [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (dim/2 - 1))."""
    if dim % 2 or dim < 4:
        raise ValueError(f"sinusoidal embedding dim must be even and >= 4, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / (half - 1))
    angles = t.float().unsqueeze(-1) * freqs  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """Diffusion step -> token: sinusoidal(dim) -> Linear(dim, 2 dim) -> Mish -> Linear(2 dim, d_model)."""

    def __init__(self, d_model: int, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim or d_model
        self.mlp = nn.Sequential(nn.Linear(self.dim, 2 * self.dim), nn.Mish(), nn.Linear(2 * self.dim, d_model))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) steps -> (N, d_model)."""
        return self.mlp(sinusoidal_embedding(t, self.dim).to(self.mlp[0].weight.dtype))


class CosineDDPM(nn.Module):
    """Noise schedule and the two DDPM procedures (noising for training, ancestral sampling)."""

    def __init__(self, steps: int = 16, cosine_s: float = 0.008, max_beta: float = 0.999) -> None:
        super().__init__()
        if steps < 2:
            raise ValueError(f"DDPM needs at least 2 steps, got {steps}")
        self.steps = steps
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar_raw = f / f[0]
        betas = (1 - alpha_bar_raw[1:] / alpha_bar_raw[:-1]).clamp(max=max_beta)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        posterior_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        # The variance at t = 0 is zero; its log is replaced by the t = 1 value (never used to add
        # noise, since the last step is noise-free, but it keeps the table finite).
        posterior_log_var = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))
        tables = {
            "betas": betas,
            "alpha_bar": alpha_bar,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            "coef_x0": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "coef_xt": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
            "noise_std": (0.5 * posterior_log_var).exp(),
        }
        # A huge cosine_s flattens the cosine to zero: alpha_bar 0/0 and NaN samples forever after.
        # (A model built on the meta device, to count parameters, has no values to check.)
        degenerate = [] if t.is_meta else sorted(
            name for name, value in tables.items() if not torch.isfinite(value.float()).all()
        )
        if degenerate:
            raise ValueError(
                f"DDPM schedule with steps={steps}, cosine_s={cosine_s}, max_beta={max_beta} is degenerate "
                f"(non-finite {degenerate})"
            )
        # Schedules are derived from ``steps``, so they are not saved with the weights.
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): x0, noise (B, A, Da); t (B,) integer steps."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return self.sqrt_alpha_bar[t].view(shape) * x0 + self.sqrt_one_minus_alpha_bar[t].view(shape) * noise

    @torch.no_grad()
    def sample(
        self,
        predict_noise: Callable[[torch.Tensor, int], torch.Tensor],
        shape: tuple[int, ...],
        x0_min: torch.Tensor,
        x0_max: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_K ~ N(0, I) down to x_0.

        ``predict_noise(x_t, t)`` returns the epsilon estimate for step ``t`` (K-1 ... 0);
        ``x0_min``/``x0_max`` broadcast against ``shape`` (the normalised training range).
        """
        device = self.betas.device
        x = torch.randn(shape, generator=generator, device=device)
        for t in reversed(range(self.steps)):
            eps = predict_noise(x, t)
            x0 = (x - self.sqrt_one_minus_alpha_bar[t] * eps) / self.sqrt_alpha_bar[t]
            x0 = torch.maximum(torch.minimum(x0, x0_max), x0_min)
            x = self.coef_x0[t] * x0 + self.coef_xt[t] * x
            if t > 0:
                x = x + self.noise_std[t] * torch.randn(shape, generator=generator, device=device)
        return x
