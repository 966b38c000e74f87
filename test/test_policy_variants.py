"""MaILPolicy per variant x head (tiny presets): shapes, determinism, prefix reuse (both DDPM
time-token layouts), short history, frame cache, normalisation, input validation."""

import numpy as np
import pytest
import torch

from mail_ros.policy.config import ConfigError
from mail_ros.policy.mail_policy import MaILPolicy, PolicyInputError
from mail_ros.policy.normalizer import STD_FLOOR
from mail_ros.policy.presets import get_preset
from mail_ros.spec import Observation

torch.set_num_threads(1)

VARIANTS = ["d_ma", "ed_ma", "d_tr", "ed_tr"]
HEADS = ["bc", "ddpm"]


def make_policy(name, overrides=None, seed=0):
    torch.manual_seed(seed)
    policy = MaILPolicy(get_preset(name, overrides))
    rng = np.random.default_rng(seed)
    # Non-trivial statistics so that de-normalisation is exercised.
    mean, std = rng.normal(size=policy.action_dim), rng.uniform(0.5, 2.0, policy.action_dim)
    policy.set_normalization({"mean": mean, "std": std, "min": mean - 2 * std, "max": mean + 2 * std})
    # Learnable positional embeddings start at zero; make them matter.
    with torch.no_grad():
        policy.pos_emb.normal_()
    return policy


def make_history(policy, n, seed=0, start=0.0):
    rng = np.random.default_rng(seed)
    H, W = policy.image_size
    return [
        Observation(
            stamp=start + 0.1 * i,
            images={c: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for c in policy.cameras},
            joint_positions=rng.normal(size=policy.joint_dim),
        )
        for i in range(n)
    ]


def make_batch(policy, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = policy.image_size
    return {
        "images": {c: torch.randint(0, 256, (B, policy.T, H, W, 3), dtype=torch.uint8, generator=g) for c in policy.cameras},
        "joint_positions": torch.randn(B, policy.T, policy.joint_dim, generator=g),
        "actions": torch.randn(B, policy.A, policy.action_dim, generator=g),
    }


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_prediction_shapes_and_determinism(variant, head):
    policy = make_policy(f"tiny-{variant}-{head}")
    loss, metrics = policy.compute_loss(make_batch(policy))
    assert loss.dim() == 0 and torch.isfinite(loss) and metrics["loss"] == pytest.approx(loss.item())
    loss.backward()
    assert policy.action_out.weight.grad is not None

    history = make_history(policy, 3)
    chunk = policy.predict_chunk(history, seed=5)
    assert chunk.shape == (policy.A, policy.action_dim) and chunk.dtype == np.float64
    assert np.isfinite(chunk).all()
    assert np.array_equal(chunk, policy.predict_chunk(history, seed=5))
    # reset(seed) restarts the policy's own generator: the episode replays exactly.
    policy.reset(seed=11)
    first = [policy.predict_chunk(history) for _ in range(2)]
    policy.reset(seed=11)
    second = [policy.predict_chunk(history) for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    if head == "ddpm":
        assert not np.array_equal(first[0], first[1])
        # Outputs stay inside the training range (x0 is clamped in normalised units).
        lo, hi = policy.action_norm.min.numpy(), policy.action_norm.max.numpy()
        assert (chunk >= lo - 1e-4).all() and (chunk <= hi + 1e-4).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefix_reuse_matches_the_plain_ddpm_path(variant):
    policy = make_policy(f"tiny-{variant}-ddpm", {"language.encoder": "test", "language.dim": 6})
    history = make_history(policy, 2)
    language = np.linspace(-1, 1, 6)
    policy.use_prefix_cache = True
    fast = policy.predict_chunk(history, language, seed=3)
    policy.use_prefix_cache = False
    plain = policy.predict_chunk(history, language, seed=3)
    np.testing.assert_allclose(fast, plain, atol=1e-5)


AFTER_OBS = {"head.time_token": "after_observations"}


@pytest.mark.parametrize("history_len", [1, 3])
@pytest.mark.parametrize("variant", ["d_ma", "d_tr"])
def test_time_token_after_observations_prefix_reuse_equals_full_sequence(variant, history_len):
    # float64 so that any difference beyond rounding would show (the scan chunks differ).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        policy = make_policy(f"tiny-{variant}-ddpm", AFTER_OBS | {"spec.observation.obs_horizon": 3}).eval()
        g = torch.Generator().manual_seed(7)
        obs_tokens, language = torch.randn(2, history_len, 32, generator=g), torch.randn(2, 32, generator=g)
        samples = []
        for reuse in (True, False):
            policy.use_prefix_cache = reuse
            with torch.no_grad():
                samples.append(policy._sample(obs_tokens, language, torch.Generator().manual_seed(1)))
    finally:
        torch.set_default_dtype(default)
    assert samples[0].dtype == torch.float64
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", ["d_ma", "d_tr"])
def test_time_token_layouts_train_and_place_the_step_token(variant):
    first = make_policy(f"tiny-{variant}-ddpm", {"language.encoder": "test", "language.dim": 4})
    after = make_policy(f"tiny-{variant}-ddpm", AFTER_OBS | {"language.encoder": "test", "language.dim": 4})
    lengths = {}
    for name, policy in (("first", first), ("after", after)):
        policy.sequence.register_forward_pre_hook(
            lambda m, args, name=name: lengths.update({name: [a.shape[1] for a in args]})
        )
        batch = make_batch(policy) | {"language": torch.randn(3, 4)}
        loss, _ = policy.compute_loss(batch)
        loss.backward()
        assert torch.isfinite(loss) and policy.time_embedding.mlp[0].weight.grad.abs().sum() > 0
    T, A = first.T, first.A
    # [time, language, T obs] + [A actions] versus [language, T obs] + [time, A actions].
    assert lengths == {"first": [2 + T, A], "after": [1 + T, 1 + A]}
    # Same weights, different layout: a different function.
    after.load_state_dict(first.state_dict())
    history, language = make_history(first, 2), np.ones(4)
    assert not np.allclose(first.predict_chunk(history, language, seed=0), after.predict_chunk(history, language, seed=0))


def test_time_token_option_is_validated():
    assert get_preset("paper-spatial-d_ma-ddpm").head.time_token == "first"
    with pytest.raises(ConfigError, match="head.time_token must be one of"):
        get_preset("tiny-d_ma-ddpm", {"head.time_token": "last"})
    for name in ("tiny-ed_ma-ddpm", "tiny-ed_tr-ddpm", "tiny-d_ma-bc"):
        with pytest.raises(ConfigError, match="needs head.kind 'ddpm' and backbone.layout 'decoder'"):
            get_preset(name, AFTER_OBS)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_short_history_is_right_aligned_and_not_padded(variant, head):
    policy = make_policy(f"tiny-{variant}-{head}", {"spec.observation.obs_horizon": 3})
    history = make_history(policy, 3)
    contexts = []
    policy.sequence.register_forward_pre_hook(lambda m, args: contexts.append(args[0].shape[1]))
    policy.use_prefix_cache = False
    short = policy.predict_chunk(history[-1:], seed=1)
    full = policy.predict_chunk(history, seed=1)
    assert short.shape == full.shape == (policy.A, policy.action_dim)
    extra = int(head == "ddpm")
    assert contexts[0] == 1 + extra and contexts[-1] == 3 + extra
    # Right alignment: with T' = 1 the current frame gets the last observation slot.
    tokens = policy._context(torch.zeros(1, 1, 32), None, None)
    assert torch.allclose(tokens[0, 0], policy.pos_emb[policy.T - 1])
    # Longer histories are cut to the most recent T.
    assert np.array_equal(policy.predict_chunk(make_history(policy, 5)[-3:], seed=1), policy.predict_chunk(make_history(policy, 5), seed=1))


def test_each_frame_is_encoded_once_across_calls():
    policy = make_policy("tiny-d_ma-ddpm", {"spec.observation.obs_horizon": 3})
    encoded = []
    policy.encoder.register_forward_hook(lambda m, args, out: encoded.append(out.shape[0]))
    history = make_history(policy, 6)
    policy.predict_chunk(history[:3], seed=0)
    policy.predict_chunk(history[:4], seed=0)
    policy.predict_chunk(history[2:6], seed=0)
    assert encoded == [3, 1, 2]
    policy.reset()
    policy.predict_chunk(history[:3], seed=0)
    assert encoded[-1] == 3


def test_new_frames_under_seen_stamps_are_encoded_again():
    # After a clock jump (or a caller reusing stamps) other images arrive under stamps the cache
    # has seen: they must be encoded, not answered with the old frames' tokens.
    policy = make_policy("tiny-d_ma-bc", {"spec.observation.obs_horizon": 3})
    encoded = []
    policy.encoder.register_forward_hook(lambda m, args, out: encoded.append(out.shape[0]))
    old, new = make_history(policy, 3, seed=1), make_history(policy, 3, seed=2)
    policy.predict_chunk(old)
    chunk = policy.predict_chunk(new)
    assert encoded == [3, 3]
    policy.reset()
    np.testing.assert_allclose(chunk, policy.predict_chunk(new), atol=1e-6)
    # The very same objects again: all cached.
    policy.predict_chunk(new)
    assert encoded == [3, 3, 3]


def test_cached_frames_give_the_same_answer_as_fresh_encoding():
    policy = make_policy("tiny-ed_ma-ddpm", {"spec.observation.obs_horizon": 3})
    history = make_history(policy, 4)
    policy.predict_chunk(history[:3], seed=0)
    warm = policy.predict_chunk(history[1:4], seed=2)
    policy.reset()
    cold = policy.predict_chunk(history[1:4], seed=2)
    np.testing.assert_allclose(warm, cold, atol=1e-6)


def test_bc_predicts_denormalised_actions():
    policy = make_policy("tiny-d_tr-bc")
    with torch.no_grad():
        policy.action_out.weight.zero_()
        policy.action_out.bias.zero_()
    chunk = policy.predict_chunk(make_history(policy, 2))
    np.testing.assert_allclose(chunk, np.broadcast_to(policy.action_norm.mean.numpy(), chunk.shape), atol=1e-6)


def test_a_joint_that_never_moved_in_training_is_ignored_at_run_time():
    # The fingers stayed open in every demonstration: their normalised value was always 0, so a
    # run-time deviation must not enter amplified by the floored std (z = 5 for half a millimetre).
    policy = make_policy("tiny-d_ma-bc", {"proprio": True})
    dims = policy.joint_dim
    mean, std = np.zeros(dims), np.ones(dims)
    mean[-1], std[-1] = 0.04, STD_FLOOR
    low, high = mean - 1.0, mean + 1.0
    low[-1] = high[-1] = 0.04
    policy.set_normalization(policy.action_norm.stats(), proprio_stats={"mean": mean, "std": std, "min": low, "max": high})
    history = make_history(policy, 2)
    for obs in history:
        obs.joint_positions[-1] = 0.04
    base = policy.predict_chunk(history)
    policy.reset()
    nudged = [Observation(o.stamp, o.images, o.joint_positions + np.eye(dims)[-1] * 5e-4) for o in history]
    np.testing.assert_array_equal(policy.predict_chunk(nudged), base)
    policy.reset()
    moved = [Observation(o.stamp, o.images, o.joint_positions + np.eye(dims)[0] * 0.1) for o in history]
    assert not np.allclose(policy.predict_chunk(moved), base)  # a joint that did vary still counts


def test_proprio_and_language_tokens_change_the_output():
    policy = make_policy("tiny-d_ma-bc", {"proprio": True, "language.encoder": "test", "language.dim": 4})
    history = make_history(policy, 2)
    base = policy.predict_chunk(history, np.ones(4))
    assert not np.allclose(base, policy.predict_chunk(history, -np.ones(4)))
    policy.reset()
    moved = [Observation(o.stamp, o.images, o.joint_positions + 1.0) for o in history]
    assert not np.allclose(base, policy.predict_chunk(moved, np.ones(4)))
    batch = make_batch(policy)
    batch["language"] = torch.randn(3, 4)
    assert torch.isfinite(policy.compute_loss(batch)[0])


def test_the_policy_centres_and_scales_the_instruction_embedding():
    # With statistics (mean m, one scale s) the policy sees (e - m) / s: the same chunk as an
    # identity-normalised twin given the already normalised embedding.
    overrides = {"language.encoder": "test", "language.dim": 4}
    policy, twin = make_policy("tiny-d_ma-ddpm", overrides), make_policy("tiny-d_ma-ddpm", overrides)
    mean, scale = np.array([0.3, -0.2, 0.5, 0.1]), 0.05
    policy.set_normalization(policy.action_norm.stats(), language_stats={
        "mean": mean, "std": np.full(4, scale), "min": mean - 1, "max": mean + 1})
    history, embedding = make_history(policy, 2), np.array([0.32, -0.21, 0.46, 0.12])
    np.testing.assert_allclose(
        policy.predict_chunk(history, embedding, seed=3), twin.predict_chunk(history, (embedding - mean) / scale, seed=3),
        rtol=1e-5, atol=1e-5,
    )


def test_film_policy_encodes_frames_under_the_current_instruction():
    overrides = {"language.encoder": "test", "language.dim": 4, "vision.film": True}
    policy = make_policy("tiny-d_ma-bc", overrides)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".film." in name:
                param.normal_()
    history, red, blue = make_history(policy, 2), np.array([1.0, 0.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.0, 0.5])
    first = policy.predict_chunk(history, red)
    # A new instruction re-encodes the cached frames: same answer as a fresh policy would give.
    switched = policy.predict_chunk(history, blue)
    fresh = make_policy("tiny-d_ma-bc", overrides)
    fresh.load_state_dict(policy.state_dict())
    np.testing.assert_allclose(switched, fresh.predict_chunk(history, blue), rtol=1e-6, atol=1e-6)
    assert not np.allclose(first, switched, atol=1e-4)
    np.testing.assert_allclose(policy.predict_chunk(history, red), first, rtol=1e-6, atol=1e-6)
    batch = make_batch(policy)
    batch["language"] = torch.randn(3, 4)
    loss = policy.compute_loss(batch)[0]
    loss.backward()
    assert torch.isfinite(loss) and policy.encoder.encoders["wrist"].film.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="vision.film .* needs language"):
        get_preset("tiny-d_ma-bc", {"vision.film": True})


def test_reference_init_wipes_the_mamba_dt_bias():
    default = make_policy("tiny-d_ma-bc")
    reference = make_policy("tiny-d_ma-bc", {"init": "reference"})
    dt_bias = lambda p: p.sequence.stack.layers[0].mixer.dt_proj.bias  # noqa: E731
    assert dt_bias(default).abs().min() > 0
    assert torch.count_nonzero(dt_bias(reference)) == 0
    assert reference.action_out.weight.std().item() == pytest.approx(0.02, rel=0.5)


def test_input_validation():
    policy = make_policy("tiny-d_ma-ddpm", {"language.encoder": "test", "language.dim": 4})
    history = make_history(policy, 2)
    emb = np.zeros(4)
    with pytest.raises(PolicyInputError, match="empty"):
        policy.predict_chunk([], emb)
    with pytest.raises(PolicyInputError, match="instruction_embedding is required"):
        policy.predict_chunk(history)
    with pytest.raises(PolicyInputError, match="must have 4 values"):
        policy.predict_chunk(history, np.zeros(5))
    with pytest.raises(PolicyInputError, match="NaN"):
        policy.predict_chunk(history, np.full(4, np.nan))
    bad = Observation(history[-1].stamp + 1, {"agentview": history[0].images["agentview"]}, history[0].joint_positions)
    with pytest.raises(PolicyInputError, match="cameras"):
        policy.predict_chunk(history + [bad], emb)
    small = Observation(9.0, {c: np.zeros((32, 32, 3), np.uint8) for c in policy.cameras}, history[0].joint_positions)
    with pytest.raises(PolicyInputError, match=r"uint8 \(64, 64, 3\)"):
        policy.predict_chunk([small], emb)
    nan_joints = Observation(9.0, history[0].images, np.full(policy.joint_dim, np.nan))
    with pytest.raises(PolicyInputError, match="joint_positions"):
        policy.predict_chunk([nan_joints], emb)
    with pytest.raises(PolicyInputError, match="strictly increasing"):
        policy.predict_chunk(history[::-1], emb)
    batch = make_batch(policy)
    with pytest.raises(PolicyInputError, match="missing 'language'"):
        policy.compute_loss(batch)
    batch["language"] = torch.zeros(3, 4)
    batch["actions"] = batch["actions"][:, :2]
    with pytest.raises(PolicyInputError, match="actions must be"):
        policy.compute_loss(batch)


@pytest.mark.parametrize("head", HEADS)
def test_relative_actions_are_offsets_from_the_current_joints(head):
    # Without proprioception the network never sees the joints, so two histories that differ
    # only in the current joint positions give the same network output: the absolute arm
    # targets differ by exactly the joint difference, the gripper width not at all.
    policy = make_policy(f"tiny-d_ma-{head}", {"relative_actions": True, "proprio": False})
    history = make_history(policy, policy.T)
    moved = list(history)
    shift = np.linspace(-0.3, 0.3, policy.joint_dim)
    moved[-1] = Observation(history[-1].stamp, history[-1].images, history[-1].joint_positions + shift)
    a, b = policy.predict_chunk(history, seed=1), policy.predict_chunk(moved, seed=1)
    arm = policy.action_frame.action_index
    assert arm == list(range(7)) and policy.action_frame.joint_index == list(range(7))
    np.testing.assert_allclose(b[:, arm] - a[:, arm], np.broadcast_to(shift[:7], (policy.A, 7)), atol=1e-6)
    np.testing.assert_allclose(b[:, 7], a[:, 7], atol=1e-6)


def test_relative_actions_train_on_offsets():
    # The loss sees (action - current joints): shifting actions and current joints together
    # leaves a relative policy's loss unchanged and changes an absolute one's.
    losses = {}
    for relative in (True, False):
        policy = make_policy("tiny-d_ma-bc", {"relative_actions": relative, "proprio": False})
        batch = make_batch(policy)
        shifted = dict(batch, joint_positions=batch["joint_positions"].clone(), actions=batch["actions"].clone())
        shifted["joint_positions"][:, -1, :7] += 0.5
        shifted["actions"][:, :, :7] += 0.5
        losses[relative] = (policy.compute_loss(batch)[0].item(), policy.compute_loss(shifted)[0].item())
    assert losses[True][0] == pytest.approx(losses[True][1], rel=1e-5)
    assert losses[False][0] != pytest.approx(losses[False][1], rel=1e-3)


def test_relative_actions_need_an_observed_joint():
    with pytest.raises(ConfigError, match="relative_actions needs action names that are observed joints"):
        get_preset("tiny-d_ma-bc", {"relative_actions": True, "spec.action.names": ["x", "y"]})
