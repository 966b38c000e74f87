"""Image encoders: uint8 camera frames -> one observation token per time step.

Per camera: pixels to [0, 1], ImageNet mean/std, ResNet-18 trunk, SpatialSoftmax keypoints,
Linear(2K -> feature_dim). The camera features of one step are concatenated in sorted camera
order and projected to the model width, giving one token per step (as the MaIL reference).
``pooled`` (trunk + keypoints, parameter-heavy) and ``project`` (the two Linear layers) split
that in two, so the first can be frozen and its output cached (ICIL training).

Optional FiLM conditioning (``film_dim > 0``, not in the reference): the trunk's output map is
scaled and shifted per channel by a linear function of a conditioning vector (the instruction),
``x * (1 + gamma) + beta``, zero-initialised so that training starts from the plain encoder.
Keypoints are otherwise blind to the instruction: with three look-alike cubes they locate
"a cube", and which one the instruction names must be untangled downstream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mail_ros.model.resnet import ResNet18Trunk

__all__ = ["SpatialSoftmax", "CameraEncoder", "ObservationEncoder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SpatialSoftmax(nn.Module):
    """Feature map -> expected (x, y) image coordinates of K learned keypoints.

    A 1x1 convolution makes K heat maps; a softmax over the pixels (divided by ``temperature``)
    turns each into a distribution whose mean position in [-1, 1]^2 is the keypoint.
    (N, C, H, W) -> (N, 2K), ordered x_1, y_1, x_2, y_2, ...
    """

    def __init__(self, in_channels: int, num_keypoints: int = 32, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"SpatialSoftmax temperature must be positive, got {temperature}")
        self.keypoints = nn.Conv2d(in_channels, num_keypoints, 1)
        self.num_keypoints = num_keypoints
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, _, H, W = x.shape
        heat = self.keypoints(x).flatten(2) / self.temperature  # (N, K, H*W)
        prob = heat.softmax(dim=-1)
        ys = torch.linspace(-1.0, 1.0, H, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, W, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)  # (H*W, 2)
        return (prob @ grid).reshape(N, 2 * self.num_keypoints)


class CameraEncoder(nn.Module):
    """One camera: uint8 (N, H, W, 3) RGB -> (N, feature_dim)."""

    def __init__(
        self,
        feature_dim: int = 128,
        resnet_width: int = 64,
        norm: str = "group",
        num_keypoints: int = 32,
        temperature: float = 1.0,
        stem_pool: bool = True,
        film_dim: int = 0,
        stages: int = 4,
    ) -> None:
        super().__init__()
        self.trunk = ResNet18Trunk(width=resnet_width, norm=norm, stem_pool=stem_pool, stages=stages)
        self.pool = SpatialSoftmax(self.trunk.out_channels, num_keypoints, temperature)
        self.pooled_dim = 2 * num_keypoints
        self.proj = nn.Linear(self.pooled_dim, feature_dim)
        self.film = nn.Linear(film_dim, 2 * self.trunk.out_channels) if film_dim > 0 else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` uint8 (N, H, W, 3); ``condition`` (N, film_dim) when FiLM is on."""
        return self.proj(self.pooled(images, condition))

    def pooled(self, images: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The keypoints before the projection: (N, H, W, 3) uint8 -> (N, pooled_dim)."""
        if self.film is not None and condition is None:
            raise ValueError("this camera encoder is FiLM-conditioned: pass the condition (N, film_dim)")
        return self.keypoints(self.feature_map(images), condition)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's output map: (N, H, W, 3) uint8 -> (N, C, h, w)."""
        # Channels-last uint8 is what cameras and bags deliver; convert once here, to a contiguous
        # NCHW tensor: a permuted (channels-last strided) input would run the whole trunk in
        # oneDNN's nhwc kernels, whose 1x1 stride-2 weight gradient writes past its workspace
        # when a layer has fewer than 16 input channels (uxlfoundation/oneDNN#6035; a heap
        # corruption with torch 2.13.0 on AVX2 hosts, at resnet_width 4 and 8). Same speed here.
        x = images.permute(0, 3, 1, 2).contiguous().to(self.mean.dtype) / 255.0  # (N, 3, H, W)
        x = (x - self.mean) / self.std
        return self.trunk(x)

    def keypoints(self, features: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Trunk map (N, C, h, w) -> keypoints (N, pooled_dim), FiLM-conditioned on ``condition``
        (N, film_dim), or (1, film_dim) for all N, when given (None: the map as it is)."""
        if condition is not None:
            if self.film is None:
                raise ValueError("this camera encoder has no FiLM layer: it takes no condition")
            gamma, beta = self.film(condition)[:, :, None, None].chunk(2, dim=1)  # (N, C, 1, 1) each
            features = features * (1 + gamma) + beta
        return self.pool(features)

    def pooling_modules(self) -> list[nn.Module]:
        """The modules :meth:`pooled` runs (what its output depends on besides the config)."""
        return [m for m in (self.trunk, self.pool, self.film) if m is not None]


class ObservationEncoder(nn.Module):
    """All cameras of a time step -> one token of width ``d_model``.

    ``shared=False`` (reference) gives each camera its own encoder; ``shared=True`` one encoder
    for all cameras. Cameras are always concatenated in sorted name order.
    """

    def __init__(
        self,
        cameras: Sequence[str],
        d_model: int,
        feature_dim: int = 128,
        resnet_width: int = 64,
        norm: str = "group",
        num_keypoints: int = 32,
        temperature: float = 1.0,
        shared: bool = False,
        stem_pool: bool = True,
        film_dim: int = 0,
        stages: int = 4,
    ) -> None:
        super().__init__()
        self.cameras = tuple(sorted(cameras))
        self.shared = shared

        def make() -> CameraEncoder:
            return CameraEncoder(feature_dim, resnet_width, norm, num_keypoints, temperature, stem_pool, film_dim, stages)

        if shared:
            self.encoder = make()
        else:
            self.encoders = nn.ModuleDict({name: make() for name in self.cameras})
        self.proj = nn.Linear(len(self.cameras) * feature_dim, d_model)
        self.pooled_dim = len(self.cameras) * self._camera(self.cameras[0]).pooled_dim

    def forward(self, images: Mapping[str, torch.Tensor], condition: torch.Tensor | None = None) -> torch.Tensor:
        """``images``: camera -> uint8 (N, H, W, 3); ``condition`` (N, film_dim) for FiLM; returns (N, D)."""
        return self.project(self.pooled(images, condition))

    def pooled(self, images: Mapping[str, torch.Tensor], condition: torch.Tensor | None = None) -> torch.Tensor:
        """The cameras' keypoints before any projection, concatenated in camera order: (N, pooled_dim)."""
        if self.shared:
            N = images[self.cameras[0]].shape[0]
            stacked = torch.cat([images[name] for name in self.cameras], dim=0)  # (C*N, H, W, 3)
            repeated = None if condition is None else condition.repeat(len(self.cameras), 1)
            return torch.cat(self.encoder.pooled(stacked, repeated).split(N, dim=0), dim=-1)
        return torch.cat([self.encoders[name].pooled(images[name], condition) for name in self.cameras], dim=-1)

    def map_shape(self, image_size: Sequence[int]) -> tuple[int, int, int]:
        """(C, h, w) of one camera's trunk map for images of ``image_size`` (H, W)."""
        trunk = self._camera(self.cameras[0]).trunk
        return (trunk.out_channels, *trunk.output_size(*image_size))

    def feature_maps(self, images: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Every camera's trunk map, flattened and concatenated in camera order: (N, cameras * C * h * w)."""
        return torch.cat([self._camera(name).feature_map(images[name]).flatten(1) for name in self.cameras], dim=-1)

    def pooled_from_maps(self, maps: torch.Tensor, map_shape: Sequence[int],
                         condition: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`pooled` from :meth:`feature_maps`' output (N, cameras * C * h * w), each camera's map
        of ``map_shape`` (C, h, w); FiLM by ``condition`` (N or 1, film_dim) when given -> (N, pooled_dim)."""
        parts = maps.split(math.prod(map_shape), dim=-1)
        return torch.cat([self._camera(name).keypoints(part.view(-1, *map_shape), condition)
                          for name, part in zip(self.cameras, parts)], dim=-1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, pooled_dim) from :meth:`pooled` -> (N, D): each camera's Linear, then the joint one."""
        parts = pooled.split(self.pooled_dim // len(self.cameras), dim=-1)
        return self.proj(torch.cat([self._camera(name).proj(part) for name, part in zip(self.cameras, parts)], dim=-1))

    def pooling_modules(self) -> list[nn.Module]:
        """The modules :meth:`pooled` runs: trunks, keypoint layers, FiLM (not the projections)."""
        return [module for camera in self._encoders() for module in camera.pooling_modules()]

    def trunks(self) -> list[nn.Module]:
        """The modules :meth:`feature_maps` runs: the cameras' trunks."""
        return [camera.trunk for camera in self._encoders()]

    def _camera(self, name: str) -> CameraEncoder:
        return self.encoder if self.shared else self.encoders[name]

    def _encoders(self) -> list[CameraEncoder]:
        """Each camera encoder once (the shared one, or one per camera in camera order)."""
        return [self.encoder] if self.shared else [self.encoders[name] for name in self.cameras]

    def encode_sequence(self, images: Mapping[str, torch.Tensor], condition: torch.Tensor | None = None) -> torch.Tensor:
        """``images``: camera -> uint8 (B, T, H, W, 3); ``condition`` (B, film_dim), one per sequence; returns (B, T, D)."""
        B, T = images[self.cameras[0]].shape[:2]
        flat = {name: images[name].reshape(B * T, *images[name].shape[2:]) for name in self.cameras}
        repeated = None if condition is None else condition.repeat_interleave(T, dim=0)
        return self.forward(flat, repeated).view(B, T, -1)
