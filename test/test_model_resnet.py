"""ResNet-18 trunk: torchvision parameter names, GroupNorm option, weight loading, shapes."""

import pytest
import torch

from mail_ros.model.resnet import ResNet18Trunk, group_norm_groups, load_torchvision_state_dict

torch.set_num_threads(1)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _block(prefix: str, downsample: bool) -> list[str]:
    keys = [f"{prefix}.conv1.weight"] + [f"{prefix}.bn1.{k}" for k in BN]
    keys += [f"{prefix}.conv2.weight"] + [f"{prefix}.bn2.{k}" for k in BN]
    if downsample:
        keys += [f"{prefix}.downsample.0.weight"] + [f"{prefix}.downsample.1.{k}" for k in BN]
    return keys


# torchvision.models.resnet18().state_dict().keys(), written out (torchvision cannot be
# imported on these CPU machines).
TORCHVISION_RESNET18_KEYS = (
    ["conv1.weight"] + [f"bn1.{k}" for k in BN]
    + _block("layer1.0", False) + _block("layer1.1", False)
    + _block("layer2.0", True) + _block("layer2.1", False)
    + _block("layer3.0", True) + _block("layer3.1", False)
    + _block("layer4.0", True) + _block("layer4.1", False)
    + ["fc.weight", "fc.bias"]
)


def test_key_list_is_torchvision_size():
    # 62 parameters (incl. fc) + 3 buffers for each of the 20 BatchNorms.
    assert len(TORCHVISION_RESNET18_KEYS) == 122


def test_batchnorm_trunk_has_exactly_the_torchvision_keys_minus_fc():
    keys = set(ResNet18Trunk(norm="batch").state_dict())
    assert keys == set(TORCHVISION_RESNET18_KEYS) - {"fc.weight", "fc.bias"}


def test_groupnorm_trunk_keeps_names_without_running_stats():
    keys = set(ResNet18Trunk(norm="group").state_dict())
    expected = {k for k in TORCHVISION_RESNET18_KEYS if not k.startswith("fc.") and k.rsplit(".", 1)[1] not in BN[2:]}
    assert keys == expected
    trunk = ResNet18Trunk(norm="group")
    assert trunk.layer3[0].bn1.num_groups == 256 // 16
    assert isinstance(trunk.layer4[1].bn2, torch.nn.GroupNorm)


def _fake_torchvision_state_dict() -> dict[str, torch.Tensor]:
    reference = ResNet18Trunk(norm="batch").state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in reference.items()}
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    return state


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_loads_torchvision_state_dict(norm):
    state = _fake_torchvision_state_dict()
    trunk = ResNet18Trunk(norm=norm)
    load_torchvision_state_dict(trunk, state)
    assert torch.equal(trunk.layer2[0].downsample[0].weight, state["layer2.0.downsample.0.weight"])
    assert torch.equal(trunk.layer4[1].bn2.bias, state["layer4.1.bn2.bias"])


def test_loading_rejects_wrong_width_and_missing_keys():
    state = _fake_torchvision_state_dict()
    with pytest.raises(ValueError, match="width 16"):
        load_torchvision_state_dict(ResNet18Trunk(width=16, norm="batch"), state)
    del state["layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_torchvision_state_dict(ResNet18Trunk(norm="batch"), state)


@pytest.mark.parametrize("width,size", [(64, 128), (8, 64), (4, 64)])
def test_output_shape(width, size):
    trunk = ResNet18Trunk(width=width)
    out = trunk(torch.randn(2, 3, size, size))
    assert out.shape == (2, 8 * width, size // 32, size // 32)
    assert trunk.out_channels == 8 * width


def test_group_count_has_floor_of_one():
    assert group_norm_groups(8) == 1
    assert group_norm_groups(64) == 4


def test_without_stem_pool_the_map_is_twice_as_fine_and_names_are_unchanged():
    pooled, fine = ResNet18Trunk(width=8), ResNet18Trunk(width=8, stem_pool=False)
    x = torch.rand(2, 3, 64, 64)
    assert pooled(x).shape == (2, 64, 2, 2) and fine(x).shape == (2, 64, 4, 4)
    fine.load_state_dict(pooled.state_dict(), strict=True)  # the max-pool has no parameters


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_fewer_stages_end_early_with_the_same_weights(stages):
    full, short = ResNet18Trunk(width=8), ResNet18Trunk(width=8, stages=stages)
    dropped = tuple(f"layer{index}." for index in range(stages + 1, 5))
    kept = {k: v for k, v in full.state_dict().items() if not k.startswith(dropped)}
    assert set(short.state_dict()) == set(kept)
    short.load_state_dict(kept, strict=True)
    x = torch.rand(2, 3, 64, 64)
    out = short(x)
    assert out.shape == (2, 8 * 2 ** (stages - 1), 16 // 2 ** (stages - 1), 16 // 2 ** (stages - 1))
    assert short.out_channels == out.shape[1]
    # The kept layers compute exactly what the full trunk computes up to that layer.
    expected = full.maxpool(full.relu(full.bn1(full.conv1(x))))
    for index in range(1, stages + 1):
        expected = getattr(full, f"layer{index}")(expected)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_a_three_stage_trunk_loads_a_torchvision_state_dict(norm):
    state = _fake_torchvision_state_dict()
    trunk = ResNet18Trunk(norm=norm, stages=3)
    load_torchvision_state_dict(trunk, state)
    assert torch.equal(trunk.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert not hasattr(trunk, "layer4")


def test_stages_are_validated():
    with pytest.raises(ValueError, match="stages"):
        ResNet18Trunk(stages=5)
