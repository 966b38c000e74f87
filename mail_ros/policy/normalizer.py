"""Per-dimension statistics that map robot units to the network's normalised units and back.

Statistics are buffers, so they travel in ``model.safetensors`` with the weights and the
network only ever sees normalised tensors (z-scores). The min/max are kept too: the DDPM
sampler clamps its x0 estimate to the normalised training range.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["Normalizer", "NormalizerError", "STD_FLOOR"]

# Dimensions that never moved in the data (e.g. an unused joint) get this std so that
# z-scoring does not divide by zero; their normalised value is then ~0.
STD_FLOOR = 1e-4
FIELDS = ("mean", "std", "min", "max")


class NormalizerError(ValueError):
    """Statistics are malformed (wrong size, non-finite, min > max, std <= 0)."""


class Normalizer(nn.Module):
    """Statistics of one quantity with ``dim`` dimensions; identity until :meth:`set_stats`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("min", -torch.ones(dim))
        self.register_buffer("max", torch.ones(dim))

    def set_stats(self, stats: Mapping[str, np.ndarray | torch.Tensor | list[float]], name: str = "stats") -> None:
        """Set ``mean``/``std``/``min``/``max`` (each ``dim`` values), validating them."""
        missing = [key for key in FIELDS if key not in stats]
        if missing:
            raise NormalizerError(f"{name}: missing statistics {missing}; expected {list(FIELDS)}")
        values = {}
        for key in FIELDS:
            value = torch.as_tensor(np.asarray(stats[key], dtype=np.float64)).float().reshape(-1)
            if value.numel() != self.dim:
                raise NormalizerError(f"{name}.{key} has {value.numel()} values, expected {self.dim}")
            if not torch.isfinite(value).all():
                raise NormalizerError(f"{name}.{key} contains non-finite values: {value.tolist()}")
            values[key] = value
        if (values["min"] > values["max"]).any():
            raise NormalizerError(f"{name}: min exceeds max in some dimension")
        if (values["std"] <= 0).any():
            raise NormalizerError(f"{name}.std must be positive, got {values['std'].tolist()}")
        values["std"] = values["std"].clamp(min=STD_FLOOR)
        for key, value in values.items():
            getattr(self, key).copy_(value)

    @classmethod
    def stats_from_data(cls, data: np.ndarray) -> dict[str, np.ndarray]:
        """Statistics over all rows of ``data`` (N, dim); std floored at STD_FLOOR."""
        data = np.asarray(data, dtype=np.float64).reshape(-1, np.shape(data)[-1])
        return {
            "mean": data.mean(0),
            "std": np.maximum(data.std(0), STD_FLOOR),
            "min": data.min(0),
            "max": data.max(0),
        }

    @classmethod
    def isotropic_stats_from_data(cls, data: np.ndarray) -> dict[str, np.ndarray]:
        """Statistics over the rows of ``data`` (N, dim) with ONE scale for every dimension.

        For embeddings (e.g. of instructions): centring removes the component every training
        instruction shares (most of a sentence embedding: "put the red cube on the green cube"
        and "... green cube on the red cube" have cosine 0.99), and the single scale, the RMS
        of the centred rows per dimension, keeps the encoder's geometry, in which unseen
        paraphrases land near their training instruction. Per-dimension z-scores would instead
        blow up the dimensions that happen not to vary over a handful of instructions.
        """
        data = np.asarray(data, dtype=np.float64).reshape(-1, np.shape(data)[-1])
        mean = data.mean(0)
        scale = max(float(np.sqrt(np.mean((data - mean) ** 2))), STD_FLOOR)
        return {"mean": mean, "std": np.full(data.shape[1], scale), "min": data.min(0), "max": data.max(0)}

    def stats(self) -> dict[str, list[float]]:
        """Statistics as plain lists (for JSON)."""
        return {key: getattr(self, key).tolist() for key in FIELDS}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize` for network inputs: a dimension that never varied in the statistics
        (min == max, e.g. fingers that stayed open in every demonstration) gives 0 whatever ``x``
        is. The network never saw it vary, and at its floored std a run-time deviation of half a
        millimetre would enter as a z-score of 5."""
        return torch.where(self.max > self.min, self.normalize(x), torch.zeros_like(x))

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def normalized_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) in normalised units, each (dim,)."""
        return self.normalize(self.min), self.normalize(self.max)
