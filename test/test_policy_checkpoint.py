"""Checkpoints: round trip, cheap config reads, every malformed case, and the CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mail_ros.cli import main as cli_main
from mail_ros.control.limits import FR3_VELOCITY_MAX
from mail_ros.policy.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    describe_checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from mail_ros.policy.mail_policy import MaILPolicy
from mail_ros.policy.presets import get_preset
from mail_ros.spec import Observation

torch.set_num_threads(1)


def _history(policy, n=2):
    rng = np.random.default_rng(0)
    return [
        Observation(0.1 * i, {c: rng.integers(0, 256, (*policy.image_size, 3), dtype=np.uint8) for c in policy.cameras}, rng.normal(size=policy.joint_dim))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    policy = MaILPolicy(get_preset("tiny-ed_ma-ddpm", {"language.encoder": "clip-test", "language.dim": 8, "proprio": True}))
    policy.set_normalization(
        {"mean": np.arange(8.0), "std": np.full(8, 0.5), "min": np.arange(8.0) - 1, "max": np.arange(8.0) + 1},
        {"mean": np.zeros(9), "std": np.ones(9), "min": -np.ones(9), "max": np.ones(9)},
        {"mean": np.linspace(-0.2, 0.2, 8), "std": np.full(8, 0.1), "min": -np.ones(8), "max": np.ones(8)},
    )
    path = tmp_path_factory.mktemp("ckpt") / "policy"
    save_checkpoint(path, policy, step=42, epoch=3, extra={"note": "test"})
    return policy, path


def test_round_trip_gives_identical_predictions(saved):
    policy, path = saved
    loaded = load_checkpoint(path)
    history, emb = _history(policy), np.linspace(0, 1, 8)
    np.testing.assert_array_equal(policy.predict_chunk(history, emb, seed=4), loaded.predict_chunk(history, emb, seed=4))
    assert not loaded.training
    assert torch.equal(loaded.action_norm.mean, policy.action_norm.mean)


def test_time_token_layout_round_trips_and_defaults_to_first(tmp_path):
    torch.manual_seed(0)
    policy = MaILPolicy(get_preset("tiny-d_ma-ddpm", {"head.time_token": "after_observations"}))
    save_checkpoint(tmp_path / "after", policy, step=1)
    loaded = load_checkpoint(tmp_path / "after")
    assert loaded.config.head.time_token == "after_observations" and loaded.time_after_observations
    history = _history(policy)
    np.testing.assert_array_equal(policy.predict_chunk(history, seed=2), loaded.predict_chunk(history, seed=2))
    # Checkpoints written before the option existed load with the reference layout.
    _edit_json(tmp_path / "after", lambda data: data["policy"]["head"].pop("time_token"))
    assert load_checkpoint(tmp_path / "after").config.head.time_token == "first"


def test_resnet_stages_round_trip_and_default_to_the_full_trunk(tmp_path):
    torch.manual_seed(0)
    policy = MaILPolicy(get_preset("tiny-d_ma-bc", {"vision.resnet_stages": 3}))
    assert not any(".layer4." in name for name in policy.state_dict())
    save_checkpoint(tmp_path / "short", policy, step=1)
    loaded = load_checkpoint(tmp_path / "short")
    assert loaded.config.vision.resnet_stages == 3
    history = _history(policy)
    np.testing.assert_array_equal(policy.predict_chunk(history), loaded.predict_chunk(history))
    # Checkpoints written before the option existed have the full ResNet-18 trunk.
    full = MaILPolicy(get_preset("tiny-d_ma-bc"))
    save_checkpoint(tmp_path / "full", full, step=1)
    _edit_json(tmp_path / "full", lambda data: data["policy"]["vision"].pop("resnet_stages"))
    assert load_checkpoint(tmp_path / "full").config.vision.resnet_stages == 4


def test_config_json_top_level_keys(saved):
    _, path = saved
    data = read_checkpoint_config(path)
    assert data["cameras"] == ["agentview", "wrist"] and data["image_size"] == [64, 64]
    assert data["obs_horizon"] == 2 and data["action_horizon"] == 4
    assert data["action_space"] == "joint_position" and data["action_names"][-1] == "fr3_gripper_width"
    assert data["language_encoder"] == "clip-test" and data["language_dim"] == 8
    assert data["joint_names"][0] == "fr3_joint1" and data["rate_hz"] == 10.0 and data["dt"] == 0.1
    assert data["training"] == {"step": 42, "epoch": 3} and data["extra"] == {"note": "test"}
    assert data["normalization"]["action"]["mean"] == list(np.arange(8.0))
    assert data["format_version"] == 1 and data["mail_ros_version"]


def test_description_is_typed_and_agrees_with_config_json(saved):
    policy, path = saved
    description = describe_checkpoint(path)
    data = read_checkpoint_config(path)
    assert description.config == policy.config
    assert description.summary() == {key: data[key] for key in description.summary()}
    assert description.cameras == ("agentview", "wrist") and description.image_size == tuple(data["image_size"])
    assert description.observation == policy.config.spec.observation
    assert description.period == pytest.approx(1 / data["rate_hz"])
    assert (description.language_encoder, description.language_dim) == ("clip-test", 8)
    assert description.training == {"step": 42, "epoch": 3} and description.extra == {"note": "test"}
    assert description.normalization == data["normalization"]


def test_save_replaces_atomically_and_leaves_no_temporaries(saved, tmp_path):
    policy, _ = saved
    target = tmp_path / "ckpt"
    save_checkpoint(target, policy, step=1)
    save_checkpoint(target, policy, step=2)
    assert read_checkpoint_config(target)["training"]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_files_written_before_the_swap_appear_with_the_checkpoint_or_not_at_all(saved, tmp_path):
    policy, _ = saved
    target = tmp_path / "ckpt"
    save_checkpoint(target, policy, step=1, write_files=lambda folder: (folder / "state.json").write_text('{"step": 1}'))
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, "state.json"]
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def killed_midway(folder):
        (folder / "state.json").write_text('{"step": 2}')
        raise KeyboardInterrupt  # as from Ctrl-C while the extra files are written

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, policy, step=2, write_files=killed_midway)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_save_killed_between_its_renames_names_the_previous_checkpoint(saved, tmp_path):
    # The process died after moving the old checkpoint aside and before moving the new one in:
    # exactly the folders save_checkpoint leaves then.
    policy, _ = saved
    save_checkpoint(tmp_path / "stash", policy, step=7)
    aside = tmp_path / ".best.old-k1ll3d"
    aside.mkdir()
    (tmp_path / "stash").rename(aside / "checkpoint")
    with pytest.raises(CheckpointError, match=r"best does not exist \(a save was interrupted; the previous "
                                              r"checkpoint is in .*\.best\.old-k1ll3d/checkpoint\)"):
        load_checkpoint(tmp_path / "best")
    assert read_checkpoint_config(aside / "checkpoint")["training"]["step"] == 7


def test_non_finite_weights_are_refused_and_the_old_checkpoint_kept(tmp_path):
    target = tmp_path / "ckpt"
    torch.manual_seed(0)
    policy = MaILPolicy(get_preset("tiny-d_ma-bc"))
    save_checkpoint(target, policy, step=1)
    with torch.no_grad():
        next(policy.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"refusing to save .*ckpt: tensor '.+' contains NaN or infinite values"):
        save_checkpoint(target, policy, step=2)
    load_checkpoint(target)
    assert read_checkpoint_config(target)["training"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _copy(saved, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(saved[1], target)
    return target


def _edit_json(path, edit):
    data = json.loads((path / CONFIG_FILE).read_text())
    edit(data)
    (path / CONFIG_FILE).write_text(json.dumps(data))


def _edit_tensors(path, edit):
    tensors = load_file(str(path / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))


def _set(keys, value):
    def edit(data):
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


BAD_JSON = {
    "unknown format": (_set(["format_version"], 99), r"config.json: format_version 99 is not supported"),
    "invalid config": (_set(["policy", "backbone", "kind"], "lstm"), r"config.json key 'policy': backbone.kind"),
    "unknown config key": (_set(["policy", "head", "foo"], 1), r"head has unknown keys \['foo'\]"),
    "top-level mismatch": (_set(["obs_horizon"], 5), r"config.json key 'obs_horizon' is 5 but the policy config says 2"),
    "missing top-level": (lambda d: d.pop("cameras"), r"missing the top-level key 'cameras'"),
    "nan stats in json": (_set(["normalization", "action", "std", 0], float("nan")), r"normalization.action'.std contains non-finite"),
    "short stats": (_set(["normalization", "proprio", "mean"], [0.0]), r"normalization.proprio'.mean must be a list of 9"),
    "stats disagree": (_set(["normalization", "action", "mean", 0], 7.0), r"'normalization.action' disagrees"),
    "language stats disagree": (_set(["normalization", "language", "std", 2], 0.3), r"'normalization.language' disagrees"),
    "no language stats": (_set(["normalization", "language"], None), r"normalization.language' must be an object"),
    # Every config field is checked for its type too: JSON gives 2.0, Infinity or "false" as readily.
    "float n_layers": (_set(["policy", "backbone", "n_layers"], 2.0), r"backbone.n_layers must be an integer >= 1, got 2.0"),
    "float d_state": (_set(["policy", "backbone", "d_state"], 4.5), r"backbone.d_state must be an integer >= 1, got 4.5"),
    "bool heads": (_set(["policy", "backbone", "heads"], True), r"backbone.heads must be an integer >= 1, got True"),
    "nan dropout": (_set(["policy", "backbone", "dropout"], float("nan")), r"backbone.dropout must be a finite number, got nan"),
    "float steps": (_set(["policy", "head", "steps"], 16.0), r"head.steps must be an integer >= 2, got 16.0"),
    "infinite cosine_s": (_set(["policy", "head", "cosine_s"], float("inf")), r"head.cosine_s must be a finite number, got inf"),
    "string max_beta": (_set(["policy", "head", "max_beta"], "0.9"), r"head.max_beta must be a finite number, got '0.9'"),
    "infinite temperature": (_set(["policy", "vision", "temperature"], float("inf")), r"vision.temperature must be a finite number, got inf"),
    "float resnet_width": (_set(["policy", "vision", "resnet_width"], 8.0), r"vision.resnet_width must be an integer >= 1, got 8.0"),
    "float resnet_stages": (_set(["policy", "vision", "resnet_stages"], 3.0), r"vision.resnet_stages must be 1, 2, 3 or 4, got 3.0"),
    "string stem_pool": (_set(["policy", "vision", "stem_pool"], "false"), r"vision.stem_pool must be true or false, got 'false'"),
    "int shared_encoder": (_set(["policy", "vision", "shared_encoder"], 0), r"vision.shared_encoder must be true or false, got 0"),
    "float language dim": (_set(["policy", "language", "dim"], 8.0), r"language.dim must be an integer >= 0, got 8.0"),
    "empty language encoder": (_set(["policy", "language", "encoder"], " "), r"language.encoder must be null or a non-empty"),
    "string proprio": (_set(["policy", "proprio"], "true"), r"proprio must be true or false, got 'true'"),
    "float obs_horizon": (_set(["policy", "spec", "observation", "obs_horizon"], 2.0), r"obs_horizon must be >= 1 and an integer, got 2.0"),
    "float image_size": (_set(["policy", "spec", "observation", "image_size"], [64.0, 64]), r"image_size must be \[height, width\], integers"),
    "cameras as a string": (_set(["policy", "spec", "observation", "cameras"], "agentview"), r"cameras must be a list, got the string"),
    "string rate": (_set(["policy", "spec", "observation", "rate_hz"], "10"), r"rate_hz must be positive, got '10'"),
    "float action horizon": (_set(["policy", "spec", "action", "horizon"], 4.0), r"action horizon must be >= 1 and an integer, got 4.0"),
    "infinite dt": (_set(["policy", "spec", "action", "dt"], float("inf")), r"dt must be positive, got inf"),
    # Valid field by field, but the model cannot be built from it: still a CheckpointError.
    "degenerate schedule": (_set(["policy", "head", "cosine_s"], 1e300), r"key 'policy' does not build a model: ValueError: DDPM schedule"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_config_json(saved, tmp_path, case):
    edit, message = BAD_JSON[case]
    path = _copy(saved, tmp_path)
    _edit_json(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


BAD_TENSORS = {
    "missing tensor": (lambda t: t.pop("action_out.weight"), r"model.safetensors lacks tensors \['action_out.weight'\]"),
    "unexpected tensor": (lambda t: t.__setitem__("extra.weight", torch.zeros(1)), r"unexpected tensors \['extra.weight'\]"),
    "wrong shape": (lambda t: t.__setitem__("pos_emb", torch.zeros(3, 32)), r"tensor 'pos_emb' has shape \(3, 32\)"),
    "non-finite stats": (lambda t: t["action_norm.std"].__setitem__(0, float("inf")), r"tensor 'action_norm.std' contains NaN"),
    "non-positive std": (lambda t: t["proprio_norm.std"].__setitem__(0, 0.0), r"normalisation statistics proprio.std must be positive"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_weights(saved, tmp_path, case):
    edit, message = BAD_TENSORS[case]
    path = _copy(saved, tmp_path)
    _edit_tensors(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_missing_and_corrupt_files(saved, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    path = _copy(saved, tmp_path)
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load_checkpoint(path)
    (path / WEIGHTS_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(path)
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        read_checkpoint_config(path)
    (path / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        read_checkpoint_config(path)
    (path / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_checkpoint_config(path)


def test_loading_does_not_disturb_the_global_rng(saved):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_checkpoint(saved[1])
    assert torch.equal(torch.rand(3), expected)


def test_cli_init_relative_policy_stays_near_the_arm(tmp_path, capsys):
    out = tmp_path / "relative"
    assert cli_main(["checkpoint", "init", "--preset", "tiny-d_ma-bc", "--out", str(out),
                     "--set", "relative_actions=true"]) == 0
    # Arm offsets: centred on the current joints, bounded by one chunk at the velocity limits.
    stats = read_checkpoint_config(out)["normalization"]["action"]
    reach = np.asarray(FR3_VELOCITY_MAX) * 4 * 0.1  # tiny: A = 4, dt = 0.1 s
    np.testing.assert_allclose(stats["mean"][:7], 0.0)
    np.testing.assert_allclose(stats["max"][:7], reach)
    assert stats["min"][7] == 0.0 and stats["max"][7] == pytest.approx(0.08)  # the gripper width stays absolute
    policy = load_checkpoint(out)
    history = _history(policy, 1)
    offsets = policy.predict_chunk(history)[:, :7] - np.asarray(history[-1].joint_positions)[:7]
    assert np.all(np.abs(offsets) <= 3 * reach)  # untrained outputs are small z-scores
    assert cli_main(["checkpoint", "info", str(out)]) == 0
    assert "offsets from the current joint positions" in capsys.readouterr().out


def test_cli_init_info_presets(tmp_path, capsys):
    out = tmp_path / "init"
    assert cli_main(["checkpoint", "init", "--preset", "tiny-d_ma-bc", "--out", str(out), "--seed", "3",
                     "--set", "spec.observation.obs_horizon=3"]) == 0
    data = read_checkpoint_config(out)
    assert data["obs_horizon"] == 3 and data["extra"] == {"preset": "tiny-d_ma-bc", "seed": 3}
    # Untrained stats from the FR3 limits: joint 4 lies in [-3.0421, -0.1518].
    stats = data["normalization"]["action"]
    assert stats["min"][3] == pytest.approx(-3.0421) and stats["max"][3] == pytest.approx(-0.1518)
    assert stats["mean"][3] == pytest.approx((-3.0421 - 0.1518) / 2)
    policy = load_checkpoint(out)
    assert policy.predict_chunk(_history(policy, 1)).shape == (4, 8)
    assert cli_main(["checkpoint", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "d_ma / bc" in text and "agentview" in text and "model.safetensors" in text
    assert cli_main(["checkpoint", "presets"]) == 0
    names = capsys.readouterr().out.split()
    assert len(names) == 60 and "paper-goal-d_ma-ddpm" in names and "tiny-ed_tr-bc" in names and "icil-demo-ma" in names
    assert cli_main(["checkpoint", "init", "--preset", "huge-d_ma-bc", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset 'huge-d_ma-bc'" in capsys.readouterr().err
    # An existing checkpoint (perhaps a trained one) is replaced only on request.
    assert cli_main(["checkpoint", "init", "--preset", "tiny-d_ma-bc", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert read_checkpoint_config(out)["extra"]["seed"] == 3
    assert cli_main(["checkpoint", "init", "--preset", "tiny-d_ma-bc", "--out", str(out), "--overwrite"]) == 0
    assert read_checkpoint_config(out)["extra"]["seed"] == 0
    assert cli_main(["checkpoint", "info", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_cli_info_on_damaged_weights_gives_the_loading_error(saved, tmp_path, capsys, damage):
    path = _copy(saved, tmp_path)
    weights = path / WEIGHTS_FILE
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 16)
    else:
        weights.unlink()
    with pytest.raises(CheckpointError) as loading:
        load_checkpoint(path)
    capsys.readouterr()
    assert cli_main(["checkpoint", "info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"mail-ros checkpoint info: error: {loading.value}\n"
    assert "Traceback" not in err and "SafetensorError" not in err


# --- ICIL checkpoints: the same module, the same files, the same errors ------------------------


@pytest.fixture(scope="module")
def saved_icil(tmp_path_factory):
    from mail_ros.policy.icil_policy import ICILPolicy
    from mail_ros.policy.presets import get_icil_preset

    torch.manual_seed(0)
    policy = ICILPolicy(get_icil_preset("icil-tiny-ma", {"prompt.dilation": 2}))
    policy.set_normalization(
        {"mean": np.arange(8.0), "std": np.full(8, 0.5), "min": np.arange(8.0) - 1, "max": np.arange(8.0) + 1},
        {"mean": np.zeros(9), "std": np.ones(9), "min": -np.ones(9), "max": np.ones(9)},
    )
    path = tmp_path_factory.mktemp("ckpt") / "icil"
    save_checkpoint(path, policy, step=7, epoch=0, extra={"held_out_tasks": ["stack"]})
    return policy, path


def _prompt(policy, rng):
    from mail_ros.policy.icil_policy import Demonstration

    frames = [Observation(int(i * 1e8), {c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in policy.cameras},
                          rng.normal(size=policy.joint_dim)) for i in range(5)]
    return Demonstration(frames, rng.normal(size=(5, policy.action_dim)))


@pytest.mark.parametrize("preset", ["icil-tiny-ma", "icil-tiny-tr"])
def test_icil_round_trip_gives_identical_streaming_predictions(preset, tmp_path):
    from mail_ros.policy.icil_policy import ICILPolicy
    from mail_ros.policy.presets import get_icil_preset

    torch.manual_seed(0)
    policy = ICILPolicy(get_icil_preset(preset)).eval()
    save_checkpoint(tmp_path / "ckpt", policy)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, ICILPolicy) and loaded.config == policy.config and not loaded.training
    rng = np.random.default_rng(1)
    demos = [_prompt(policy, rng) for _ in range(2)]
    live = _prompt(policy, rng).observations
    for p in (policy, loaded):
        p.set_prompt(demos)
    for observation in live:
        np.testing.assert_array_equal(policy.predict_chunk(observation), loaded.predict_chunk(observation))


def test_icil_config_json_names_the_policy_type_and_describes_it(saved_icil, tmp_path):
    policy, path = saved_icil
    data = read_checkpoint_config(path)
    assert data["policy_type"] == "icil" and data["policy"]["prompt"] == {
        "k_max": 4, "dilation": 2, "film": False, "summary_heads": 1, "summary_hidden": 0, "agreement": 0.0}
    # Saved before prompt.film and the summary's settings existed: the keys are absent, and the
    # policy is the unconditioned one.
    older = _copy(saved_icil, tmp_path)
    _edit_json(older, lambda data: [data["policy"]["prompt"].pop(key)
                                    for key in ("film", "summary_heads", "summary_hidden", "agreement")])
    assert load_checkpoint(older).config == policy.config
    assert (data["variant"], data["head"], data["obs_horizon"]) == ("icil-ma", "bc", 1)
    description = describe_checkpoint(path)
    assert description.policy_type == "icil" and description.config == policy.config
    assert (description.variant, description.head) == ("icil-ma", "bc")
    assert description.summary() == {key: data[key] for key in description.summary()}
    assert description.extra == {"held_out_tasks": ["stack"]}


def test_checkpoints_without_a_policy_type_are_mail_ones(saved, tmp_path):
    path = _copy(saved, tmp_path)
    assert read_checkpoint_config(path)["policy_type"] == "mail"
    _edit_json(path, lambda data: data.pop("policy_type"))
    assert isinstance(load_checkpoint(path), MaILPolicy) and describe_checkpoint(path).policy_type == "mail"


BAD_ICIL = {
    "unknown type": (_set(["policy_type"], "rt2"), r"config.json key 'policy_type' is 'rt2'; known types are \['icil', 'mail'\]"),
    # An ICIL config read as a MaIL one (the type key lost): named, not a crash.
    "type mismatch": (_set(["policy_type"], "mail"), r"config.json key 'policy': .*missing keys"),
    "bad prompt": (_set(["policy", "prompt", "dilation"], 0), r"key 'policy': prompt.dilation must be an integer >= 1"),
    "obs horizon": (_set(["policy", "spec", "observation", "obs_horizon"], 2), r"obs_horizon must be 1"),
    "variant copy": (_set(["variant"], "d_ma"), r"key 'variant' is 'd_ma' but the policy config says 'icil-ma'"),
}


@pytest.mark.parametrize("case", list(BAD_ICIL))
def test_bad_icil_config_json(saved_icil, tmp_path, case):
    edit, message = BAD_ICIL[case]
    path = _copy(saved_icil, tmp_path)
    _edit_json(path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncated", "missing tensor", "nan"])
def test_damaged_icil_weights(saved_icil, tmp_path, damage):
    path = _copy(saved_icil, tmp_path)
    if damage == "truncated":
        data = (path / WEIGHTS_FILE).read_bytes()
        (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
        message = "model.safetensors is corrupt or truncated"
    elif damage == "missing tensor":
        _edit_tensors(path, lambda t: t.pop("sequence.queries"))
        message = r"lacks tensors \['sequence.queries'\]"
    else:
        _edit_tensors(path, lambda t: t["sequence.queries"].view(-1).__setitem__(0, float("nan")))
        message = r"tensor 'sequence.queries' contains NaN"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_cli_init_and_info_of_an_icil_checkpoint(tmp_path, capsys):
    from mail_ros.policy.icil_policy import ICILPolicy

    out = tmp_path / "icil"
    assert cli_main(["checkpoint", "init", "--preset", "icil-tiny-tr", "--out", str(out),
                     "--set", "prompt.k_max=2"]) == 0
    policy = load_checkpoint(out)
    assert isinstance(policy, ICILPolicy) and policy.config.prompt.k_max == 2
    # Untrained statistics from the FR3 limits, absolute targets (joint 4 in [-3.0421, -0.1518]).
    stats = read_checkpoint_config(out)["normalization"]["action"]
    assert stats["min"][3] == pytest.approx(-3.0421) and stats["max"][3] == pytest.approx(-0.1518)
    capsys.readouterr()
    assert cli_main(["checkpoint", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "policy type    icil" in text and "icil-tr / bc" in text and '"k_max": 2' in text
    assert "action frame   absolute" in text


def test_cli_init_relative_icil_policy_stays_near_the_arm(tmp_path, capsys):
    """An untrained ICIL checkpoint with relative_actions gets the offsets' statistics, as MaIL's,
    and `info` says its actions are offsets."""
    out = tmp_path / "icil_relative"
    assert cli_main(["checkpoint", "init", "--preset", "icil-tiny-tr", "--out", str(out),
                     "--set", "relative_actions=true"]) == 0
    policy = load_checkpoint(out)
    assert policy.config.relative_actions
    stats = read_checkpoint_config(out)["normalization"]["action"]
    spec = policy.config.spec.action
    reach = np.asarray(FR3_VELOCITY_MAX) * spec.horizon * spec.dt
    np.testing.assert_allclose(stats["mean"][:7], 0.0)
    np.testing.assert_allclose(stats["max"][:7], reach)
    assert stats["min"][7] == 0.0 and stats["max"][7] == pytest.approx(0.08)  # the gripper width stays absolute
    capsys.readouterr()
    assert cli_main(["checkpoint", "info", str(out)]) == 0
    assert "action frame   offsets from the current joint positions" in capsys.readouterr().out
