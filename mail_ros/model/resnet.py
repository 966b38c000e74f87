"""ResNet-18 convolutional trunk (no pooling head, no classifier) with torchvision parameter names.

torchvision does not import on the CPU machines this project targets, so the trunk is our own
module. Its parameter names match ``torchvision.models.resnet18`` (``conv1``, ``bn1``,
``layer1..4.{0,1}.conv1/bn1/conv2/bn2/downsample.0/.1``) so a torchvision state_dict (minus
``fc``) loads with :func:`load_torchvision_state_dict`. With ``norm="group"`` every BatchNorm is
a GroupNorm (as in the MaIL reference) under the same name; GroupNorm has the same ``weight`` and
``bias`` but no running statistics, which the loader then drops.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["ResNet18Trunk", "load_torchvision_state_dict", "group_norm_groups"]

NORMS = ("group", "batch")
STAGES = 4  # layer1..layer4


def group_norm_groups(channels: int) -> int:
    """Groups used for a GroupNorm over ``channels``: channels // 16 as the reference, at least 1.

    The floor of 1 only matters for reduced-width trunks (fewer than 16 channels), which the
    reference never builds.
    """
    return max(1, channels // 16)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(group_norm_groups(channels), channels)
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision's BasicBlock layout)."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = _norm(norm, channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), _norm(norm, channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class ResNet18Trunk(nn.Module):
    """ResNet-18 up to ``layer4`` (or an earlier stage, see ``stages``):
    (N, 3, H, W) float -> (N, 8 * width, H / 32, W / 32) with all four stages.

    ``width`` is the channel count of ``conv1`` (64 in ResNet-18); smaller widths give the small
    CPU presets. ``norm`` is ``"group"`` (reference) or ``"batch"`` (torchvision).
    ``stem_pool=False`` drops the stem's max-pool (no parameters, so names and weight files are
    unchanged): the output is H / 16 x W / 16, e.g. 4x4 instead of 2x2 for 64x64 images, which
    gives spatial-softmax keypoints four times the positions to choose from.
    ``stages`` < 4 stops after ``layer<stages>`` (the later layers are not built): with 3, the
    output is (N, 4 * width, H / 16, W / 16) for less compute than the full trunk (layer4 holds
    three quarters of the parameters), where dropping the stem pool instead quadruples the
    cost of every later layer.
    """

    def __init__(self, width: int = 64, norm: str = "group", stem_pool: bool = True, stages: int = 4) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"ResNet norm must be one of {NORMS}, got {norm!r}")
        if width < 1:
            raise ValueError(f"ResNet width must be >= 1, got {width}")
        if stages not in range(1, STAGES + 1):
            raise ValueError(f"ResNet stages must be 1, 2, 3 or 4, got {stages!r}")
        self.width = width
        self.norm = norm
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(norm, width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem_pool else nn.Identity()
        channels = [width, 2 * width, 4 * width, 8 * width][:stages]
        in_channels = width
        for index, out_channels in enumerate(channels, start=1):
            stride = 1 if index == 1 else 2
            layer = nn.Sequential(
                BasicBlock(in_channels, out_channels, stride, norm),
                BasicBlock(out_channels, out_channels, 1, norm),
            )
            self.add_module(f"layer{index}", layer)
            in_channels = out_channels
        self.stages = stages
        self.out_channels = channels[-1]
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's init: He-normal convs, unit norm scales, zero shifts.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the output map for (height, width) input: each stride-2 step (the stem's
        convolution and max-pool, the first block of layer2..) takes ceil(size / 2)."""
        halvings = 1 + (not isinstance(self.maxpool, nn.Identity)) + (self.stages - 1)
        for _ in range(halvings):
            height, width = -(-height // 2), -(-width // 2)
        return height, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, self.stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return x


def load_torchvision_state_dict(trunk: ResNet18Trunk, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a torchvision ``resnet18`` state_dict into ``trunk`` (strict on everything it uses).

    ``fc.*`` and the layers a trunk with fewer ``stages`` does not build are dropped; with a
    GroupNorm trunk the BatchNorm running statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked``) are dropped too, since a GroupNorm has none. Any other missing,
    unexpected or wrong-shaped tensor raises ValueError.
    """
    bn_buffers = ("running_mean", "running_var", "num_batches_tracked")
    unused = ("fc.",) + tuple(f"layer{index}." for index in range(trunk.stages + 1, STAGES + 1))
    wanted = {}
    for key, value in state_dict.items():
        if key.startswith(unused):
            continue
        if trunk.norm == "group" and key.rsplit(".", 1)[-1] in bn_buffers:
            continue
        wanted[key] = value
    own = trunk.state_dict()
    missing = sorted(set(own) - set(wanted))
    unexpected = sorted(set(wanted) - set(own))
    if missing or unexpected:
        raise ValueError(f"torchvision resnet18 state_dict mismatch: missing {missing}, unexpected {unexpected}")
    for key, value in wanted.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"torchvision resnet18 tensor {key!r} has shape {tuple(value.shape)}, "
                f"trunk (width {trunk.width}) expects {tuple(own[key].shape)}"
            )
    trunk.load_state_dict(wanted, strict=True)
