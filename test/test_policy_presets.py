"""Presets and config validation: systematic names, paper sizes, overrides, clear errors."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.policy.config import ConfigError, PolicyConfig
from mail_ros.policy.mail_policy import MaILPolicy
from mail_ros.policy.presets import PresetError, get_preset, list_presets, parse_override


def test_names_are_size_variant_head():
    names = list_presets()
    assert len(names) == len(set(names)) == 7 * 4 * 2
    assert names[0] == "tiny-d_ma-bc" and "paper-90-ed_tr-ddpm" in names
    for name in names:
        config = get_preset(name)
        size, variant, head = name.rsplit("-", 2)
        assert config.variant == variant and config.head.kind == head


def test_paper_sizes_follow_the_reference():
    d_ma = get_preset("paper-goal-d_ma-ddpm")
    assert (d_ma.backbone.n_layers, d_ma.backbone.d_model, d_ma.backbone.d_state, d_ma.backbone.expand) == (16, 128, 16, 2)
    assert d_ma.language.dim == 512 and d_ma.spec.observation.image_size == (128, 128)
    assert d_ma.vision.resnet_width == 64 and d_ma.vision.norm == "group" and not d_ma.vision.shared_encoder
    assert d_ma.vision.num_keypoints == 32 and d_ma.vision.feature_dim == 128 and d_ma.head.steps == 16
    ed_ma = get_preset("paper-spatial-ed_ma-ddpm")
    assert (ed_ma.backbone.n_enc, ed_ma.backbone.n_dec, ed_ma.backbone.d_conv_dec) == (10, 6, 2)
    ed_90 = get_preset("paper-90-ed_ma-bc")
    assert (ed_90.backbone.n_enc, ed_90.backbone.n_dec, ed_90.backbone.d_state) == (8, 10, 8)
    assert get_preset("paper-long-d_tr-bc").spec.action.horizon == 10
    d_tr = get_preset("paper-object-d_tr-ddpm")
    assert (d_tr.backbone.n_layers, d_tr.backbone.heads, d_tr.backbone.dropout) == (8, 4, 0.1)
    assert d_tr.language.dim == 0 and d_tr.spec.action.horizon == 5
    ed_tr = get_preset("paper-object-ed_tr-ddpm")
    assert (ed_tr.backbone.n_enc, ed_tr.backbone.n_dec) == (4, 6)


def test_demo_and_paper_parameter_counts():
    with torch.device("meta"):
        demo = MaILPolicy(get_preset("demo-d_ma-ddpm")).num_parameters()
        paper = MaILPolicy(get_preset("paper-spatial-d_ma-ddpm")).num_parameters()
    assert 0.5e6 <= demo["total"] <= 2e6
    # Two ResNet-18 trunks ~22 M; the Mamba stack ~2 M (reference sizes).
    assert 21e6 < paper["encoder"] < 23.5e6 and 1.5e6 < paper["sequence"] < 2.5e6


def test_overrides_and_errors():
    config = get_preset("tiny-d_ma-bc", {"spec.observation.obs_horizon": 7, "head.kind": "ddpm"})
    assert config.spec.observation.obs_horizon == 7 and config.head.kind == "ddpm"
    assert parse_override("vision.norm=batch") == ("vision.norm", "batch")
    assert parse_override("spec.observation.image_size=[96, 96]") == ("spec.observation.image_size", [96, 96])
    with pytest.raises(PresetError, match="unknown preset"):
        get_preset("paper-goal-mamba-ddpm")
    with pytest.raises(PresetError, match="no config field 'widht'"):
        get_preset("tiny-d_ma-bc", {"vision.widht": 3})
    with pytest.raises(ConfigError, match="backbone.kind must be"):
        get_preset("tiny-d_ma-bc", {"backbone.kind": "rnn"})
    with pytest.raises(ConfigError, match="divisible"):
        get_preset("tiny-d_tr-bc", {"backbone.heads": 3})
    with pytest.raises(ConfigError, match="language.encoder and language.dim"):
        get_preset("tiny-d_tr-bc", {"language.dim": 3})
    with pytest.raises(ConfigError, match="vision.resnet_stages must be 1, 2, 3 or 4"):
        get_preset("tiny-d_tr-bc", {"vision.resnet_stages": 0})
    with pytest.raises(ConfigError, match="obs_horizon must be >= 1"):
        get_preset("tiny-d_tr-bc", {"spec.observation.obs_horizon": 0})
    with pytest.raises(PresetError, match="group.field=value"):
        parse_override("novalue")


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(list_presets()))
def test_config_survives_json(name):
    config = get_preset(name)
    assert PolicyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_size_aliases_name_their_default_preset():
    from mail_ros.policy.presets import ALIASES, get_preset

    for alias, name in ALIASES.items():
        assert get_preset(alias) == get_preset(name)
