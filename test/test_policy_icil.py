"""ICILPolicy: streaming predictions equal the full-sequence computation from raw observations,
the prompt is prefilled once and survives episodes, contract mismatches are refused, configs
and presets round-trip."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mail_ros.policy.config import ConfigError
from mail_ros.policy.icil_config import ICILConfig
from mail_ros.policy.icil_policy import Demonstration, EncodedPrompt, ICILPolicy, dilated_indices
from mail_ros.policy.mail_policy import PolicyInputError
from mail_ros.policy.presets import PresetError, get_icil_preset, list_icil_presets
from mail_ros.policy.normalizer import Normalizer
from mail_ros.spec import Observation

torch.set_num_threads(1)

PRESETS = ["icil-tiny-ma", "icil-tiny-tr"]


def _policy(name: str, overrides=None) -> ICILPolicy:
    torch.manual_seed(0)
    policy = ICILPolicy(get_icil_preset(name, overrides)).eval()
    rng = np.random.default_rng(0)
    actions = rng.normal(size=(50, policy.action_dim))
    joints = rng.normal(size=(50, policy.joint_dim))
    policy.set_normalization(Normalizer.stats_from_data(actions), Normalizer.stats_from_data(joints))
    with torch.no_grad():  # prompt.film's FiLM layers start at zero (no effect): make them act
        for name, parameter in policy.encoder.named_parameters():
            if ".film." in name:
                parameter.normal_(0.0, 0.5)
    return policy


def _frames(policy: ICILPolicy, n: int, rng: np.random.Generator, t0: float = 0.0) -> list[Observation]:
    H, W = policy.config.spec.observation.image_size
    return [
        Observation(
            round((t0 + 0.1 * i) * 1e9),  # nanoseconds; stamps only need to increase
            {c: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for c in policy.cameras},
            rng.normal(size=policy.joint_dim),
        )
        for i in range(n)
    ]


def _demo(policy: ICILPolicy, n: int, rng: np.random.Generator) -> Demonstration:
    return Demonstration(_frames(policy, n, rng), rng.normal(size=(n, policy.action_dim)))


def _reference(policy: ICILPolicy, demos: list[Demonstration], live: list[Observation]) -> np.ndarray:
    """The next chunk by the full-sequence computation over [prompt, live, queries]."""
    with torch.no_grad():
        parts = []
        for demo in demos:
            kept = dilated_indices(len(demo.observations), policy.config.prompt.dilation)
            tokens = policy._encode([demo.observations[i] for i in kept]).unsqueeze(0)
            actions = policy.action_norm.normalize_input(torch.from_numpy(demo.actions[kept]).float()).unsqueeze(0)
            parts.append(policy.sequence.demo_tokens(tokens, actions))
        parts.append(policy.sequence.live_tokens(policy._encode(live, policy._live_condition()).unsqueeze(0)))
        return policy.action_norm.denormalize(policy.sequence(torch.cat(parts, dim=1)))[0].double().numpy()


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dilation", [1, 3])
@pytest.mark.parametrize("film", [False, True])
def test_streaming_chunks_equal_the_full_sequence(name, dilation, film):
    policy = _policy(name, {"prompt.dilation": dilation, "prompt.film": film})
    rng = np.random.default_rng(1)
    demos = [_demo(policy, 7, rng), _demo(policy, 4, rng)]
    info = policy.set_prompt(demos)
    kept = len(dilated_indices(7, dilation)) + len(dilated_indices(4, dilation))
    assert (info.demonstrations, info.frames, info.tokens) == (2, kept, 2 * kept + 2)
    live = _frames(policy, 4, rng, t0=100.0)
    for t, obs in enumerate(live):
        chunk = policy.predict_chunk(obs)
        assert chunk.shape == (policy.A, policy.action_dim) and chunk.dtype == np.float64
        np.testing.assert_allclose(chunk, _reference(policy, demos, live[: t + 1]), atol=1e-4, rtol=1e-4)
    assert policy.stream_state.length == info.tokens + len(live)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("window", [1, 3])
def test_live_window_predicts_from_the_prompt_and_the_newest_frames(name, window):
    # The chunk after live frame t is the full sequence [prompt, frames t - W + 1 .. t], the
    # episode's first frame repeated where the window reaches before the episode's start.
    policy = _policy(name, {"live_window": window, "prompt.film": True})
    rng = np.random.default_rng(4)
    demos = [_demo(policy, 6, rng), _demo(policy, 3, rng)]
    info = policy.set_prompt(demos)
    live = _frames(policy, 6, rng, t0=50.0)

    def padded(t):
        return [live[0]] * max(0, window - t - 1) + live[max(0, t - window + 1) : t + 1]

    chunks = []
    for t, obs in enumerate(live):
        if t == 3:
            policy.observe(obs)  # observed between chunks: it still moves the window
            continue
        chunks.append(policy.predict_chunk(obs))
        np.testing.assert_allclose(chunks[-1], _reference(policy, demos, padded(t)), atol=1e-4, rtol=1e-4)
        assert policy.stream_state.length == info.tokens + window  # the window, not the episode
    policy.reset()
    np.testing.assert_allclose(policy.predict_chunk(live[0]), chunks[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_observe_commits_and_reset_returns_to_the_prompt(name):
    policy = _policy(name)
    rng = np.random.default_rng(2)
    demos = [_demo(policy, 5, rng)]
    policy.set_prompt(demos)
    live = _frames(policy, 3, rng, t0=10.0)
    first = policy.predict_chunk(live[0])
    policy.observe(live[1])
    third = policy.predict_chunk(live[2])
    np.testing.assert_allclose(third, _reference(policy, demos, live), atol=1e-4, rtol=1e-4)
    # A new episode starts from the prompt's state: the same first observation, the same chunk.
    policy.reset()
    np.testing.assert_allclose(policy.predict_chunk(live[0]), first, atol=0, rtol=0)


def test_no_prompt_is_a_streaming_policy_over_the_episode():
    policy = _policy("icil-tiny-ma")
    rng = np.random.default_rng(3)
    assert policy.stream_state is None and policy.prompt_info.demonstrations == 0
    live = _frames(policy, 3, rng)
    for t, obs in enumerate(live):
        np.testing.assert_allclose(policy.predict_chunk(obs), _reference(policy, [], live[: t + 1]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("film", [False, True])
def test_relative_actions_are_offsets_from_each_frames_joints_in_and_out(name, film):
    # The same network read in the two frames: a relative policy prompted with absolute actions
    # must act as the absolute policy prompted with the arm's offsets from each prompt frame's
    # joints, its chunk shifted by the live frame's joints (the gripper width stays absolute).
    relative = _policy(name, {"prompt.film": film, "relative_actions": True})
    absolute = _policy(name, {"prompt.film": film})
    names, joints = relative.config.spec.action.names, list(relative.config.spec.observation.joint_names)
    arm = [(a, joints.index(n)) for a, n in enumerate(names) if n in joints]
    assert [names[a] for a, _ in arm] == [f"fr3_joint{i}" for i in range(1, 8)]
    rng = np.random.default_rng(8)
    demos = [_demo(relative, 6, rng), _demo(relative, 3, rng)]
    offsets = []
    for demo in demos:
        actions = demo.actions.copy()
        for a, j in arm:
            actions[:, a] -= [obs.joint_positions[j] for obs in demo.observations]
        offsets.append(Demonstration(demo.observations, actions))
    relative.set_prompt(demos)
    absolute.set_prompt(offsets)
    for obs in _frames(relative, 3, rng, t0=100.0):
        expected = absolute.predict_chunk(obs)
        for a, j in arm:
            expected[:, a] += obs.joint_positions[j]
        np.testing.assert_allclose(relative.predict_chunk(obs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("relative", [False, True])
def test_chunk_targets_are_every_chunk_of_an_episode_in_the_networks_frame(relative):
    policy = _policy("icil-tiny-ma", {"relative_actions": relative})
    A, Da = policy.A, policy.action_dim
    rng = np.random.default_rng(9)
    actions, joints = rng.normal(size=(A + 3, Da)), rng.normal(size=(A + 3, policy.joint_dim))
    targets = policy.chunk_targets(torch.from_numpy(actions), torch.from_numpy(joints)).numpy()
    assert targets.shape == (4, A, Da)
    for t in range(4):
        expected = actions[t : t + A].copy()
        if relative:
            expected[:, :7] -= joints[t, :7]  # fr3_joint1..7, observed as joints 0..6; not the gripper
        np.testing.assert_allclose(targets[t], expected)
    assert policy.chunk_targets(torch.from_numpy(actions[: A - 1]), torch.from_numpy(joints[: A - 1])).shape == (0, A, Da)


def test_prompt_changes_the_chunk():
    policy = _policy("icil-tiny-ma")
    rng = np.random.default_rng(4)
    obs = _frames(policy, 1, rng, t0=50.0)[0]
    policy.set_prompt([_demo(policy, 5, rng)])
    with_one = policy.predict_chunk(obs)
    policy.set_prompt([_demo(policy, 5, rng)])
    assert not np.allclose(policy.predict_chunk(obs), with_one)


def test_prompt_film_conditions_the_live_keypoints_on_the_prompt_only():
    policy = _policy("icil-tiny-ma", {"prompt.film": True})
    rng = np.random.default_rng(9)
    obs = _frames(policy, 1, rng, t0=50.0)[0]
    with torch.no_grad():  # the prompt summaries are inference tensors
        features, _ = policy._features([obs])
        unconditioned = policy._pooled(features)
        torch.testing.assert_close(policy._pooled(features, torch.zeros(policy.config.backbone.d_model)),
                                   policy._pooled(features, policy._live_condition()))  # no prompt: the empty summary
        summaries, keypoints = [], []
        for _ in range(2):
            prompt = policy.encode_prompt([_demo(policy, 5, rng)])
            assert prompt.condition.shape == (policy.config.backbone.d_model,)
            summaries.append(prompt.condition)
            keypoints.append(policy._pooled(features, prompt.condition))
        assert not torch.allclose(summaries[0], summaries[1])
        assert not torch.allclose(keypoints[0], keypoints[1]) and not torch.allclose(keypoints[0], unconditioned)
        # The prompt's own frames are encoded unconditioned: their tokens are the plain policy's.
        demo = _demo(policy, 3, rng)
        tokens = policy.encode_prompt([demo]).tokens
        maps, joints = policy._features(demo.observations)
        torch.testing.assert_close(tokens[0, 0:6:2], policy._tokens(policy._pooled(maps), joints) + policy.sequence.type_emb[0])
    # A prompt without the summary this policy needs is refused, and the previous prompt stays.
    policy.set_prompt([demo])
    with pytest.raises(PolicyInputError, match="prompt summary"):
        policy.set_encoded_prompt(EncodedPrompt(tokens, 1, 3, None))
    assert policy.prompt_info.demonstrations == 1


def test_mismatched_demonstrations_are_refused_and_the_old_prompt_kept():
    policy = _policy("icil-tiny-ma")
    rng = np.random.default_rng(5)
    policy.set_prompt([_demo(policy, 4, rng)])
    before = policy.prompt_info
    good = _demo(policy, 3, rng)
    wrong_actions = Demonstration(good.observations, good.actions[:, :3])
    missing_camera = Demonstration(
        [Observation(o.stamp, {"agentview": o.images["agentview"]}, o.joint_positions) for o in good.observations],
        good.actions,
    )
    nan_actions = Demonstration(good.observations, np.full_like(good.actions, np.nan))
    backwards = Demonstration(good.observations[::-1], good.actions)
    cases = [
        (wrong_actions, "demonstration 1: actions must be"),
        (missing_camera, "demonstration 1, frame 0: .*cameras"),
        (nan_actions, "NaN"),
        (backwards, "frame 1: .*increasing"),
        (Demonstration([], np.zeros((0, 8))), "no observations"),
    ]
    for bad, message in cases:
        with pytest.raises(PolicyInputError, match=message):
            policy.set_prompt([good, bad])
        assert policy.prompt_info == before


def test_live_observations_must_move_forward():
    policy = _policy("icil-tiny-tr")
    rng = np.random.default_rng(6)
    first, second = _frames(policy, 2, rng)
    policy.observe(second)
    length = policy.stream_state.length
    with pytest.raises(PolicyInputError, match="increasing"):
        policy.predict_chunk(first)
    assert policy.stream_state.length == length  # nothing committed


def test_dilated_indices_keep_the_first_every_dth_and_the_last():
    assert dilated_indices(1, 3) == [0]
    assert dilated_indices(7, 3) == [0, 3, 6]
    assert dilated_indices(8, 3) == [0, 3, 6, 7]
    assert dilated_indices(5, 1) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", list_icil_presets())
@pytest.mark.parametrize("prompt", [{"prompt.film": False}, {"prompt.film": True},
                                    {"prompt.film": True, "prompt.summary_heads": 2, "prompt.summary_hidden": 8}])
def test_presets_round_trip_through_json_and_safetensors(name, prompt, tmp_path):
    config = get_icil_preset(name, prompt)
    assert ICILConfig.from_dict(config.to_dict()) == config and config.prompt.film == prompt["prompt.film"]
    with_language = get_icil_preset(name, LANGUAGE)
    assert ICILConfig.from_dict(with_language.to_dict()) == with_language and with_language.language.enabled
    torch.manual_seed(0)
    policy = ICILPolicy(config)
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    rebuilt = ICILPolicy(ICILConfig.from_dict(config.to_dict()))
    rebuilt.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    for key, value in policy.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)


def test_twins_have_about_the_same_sequence_size():
    for size in ("tiny", "demo"):
        ma = ICILPolicy(get_icil_preset(f"icil-{size}-ma")).num_parameters()["sequence"]
        tr = ICILPolicy(get_icil_preset(f"icil-{size}-tr")).num_parameters()["sequence"]
        assert 0.7 < tr / ma < 1.3, (size, ma, tr)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"spec.observation.obs_horizon": 2}, "obs_horizon must be 1"),
        ({"backbone.layout": "encoder_decoder"}, "layout must be 'decoder'"),
        ({"prompt.dilation": 0}, "prompt.dilation"),
        ({"prompt.k_max": 2.0}, "prompt.k_max"),
        ({"prompt.film": "yes"}, "prompt.film"),
        ({"prompt.film": True, "prompt.summary_heads": 3}, "summary_heads \\(3\\) must divide"),
        ({"prompt.summary_hidden": 8}, "need prompt.film"),
        ({"prompt.film": True, "prompt.agreement": -0.1}, "prompt.agreement must be >= 0"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_icil_preset("icil-tiny-ma", overrides)


def test_unknown_icil_preset_lists_the_known_ones():
    with pytest.raises(PresetError, match="icil-demo-ma"):
        get_icil_preset("icil-huge-ma")
    with pytest.raises(ConfigError, match="unknown keys"):
        ICILConfig.from_dict(get_icil_preset("icil-tiny-ma").to_dict() | {"head": {}})


def test_kept_prompt_tokens_prefill_to_the_same_policy():
    policy = _policy("icil-tiny-tr")
    rng = np.random.default_rng(7)
    demos = [_demo(policy, 4, rng), _demo(policy, 3, rng)]
    obs = _frames(policy, 1, rng, t0=20.0)[0]
    prompt = policy.encode_prompt(demos)
    assert prompt.tokens.shape == (1, 2 * 7 + 2, policy.config.backbone.d_model)
    assert (prompt.demonstrations, prompt.frames, prompt.condition) == (2, 7, None)
    policy.set_prompt(demos)
    expected = policy.predict_chunk(obs)
    policy.clear_prompt()
    info = policy.set_encoded_prompt(prompt)
    assert (info.demonstrations, info.frames, info.tokens) == (2, 7, 16)
    np.testing.assert_allclose(policy.predict_chunk(obs), expected, atol=0, rtol=0)
    with pytest.raises(PolicyInputError, match="prompt tokens must be"):
        policy.set_encoded_prompt(EncodedPrompt(prompt.tokens[0], 2, 7))
    with pytest.raises(PolicyInputError, match="no prompt summary"):
        policy.set_encoded_prompt(EncodedPrompt(prompt.tokens, 2, 7, torch.zeros(policy.config.backbone.d_model)))


LANGUAGE = {"language.encoder": "hash:test", "language.dim": 6}


@pytest.mark.parametrize("name", PRESETS)
def test_instruction_token_starts_the_stream_when_language_is_on(name):
    policy = _policy(name, LANGUAGE)
    rng = np.random.default_rng(8)
    demos = [_demo(policy, 4, rng)]
    embedding = rng.normal(size=6)
    with pytest.raises(PolicyInputError, match="instruction_embedding is required"):
        policy.set_prompt(demos)
    with pytest.raises(PolicyInputError, match="must have 6 values"):
        policy.set_prompt(demos, np.zeros(5))
    info = policy.set_prompt(demos, embedding)
    assert info.tokens == 1 + 2 * 4 + 1
    live = _frames(policy, 2, rng, t0=30.0)
    chunks = [policy.predict_chunk(obs) for obs in live]
    with torch.no_grad():
        instruction = policy._language_token(torch.from_numpy(embedding).float())
        tokens = policy.encode_prompt(demos, embedding).tokens
        torch.testing.assert_close(tokens[:, :1], instruction)
        for t, chunk in enumerate(chunks):
            stream = torch.cat([tokens, policy.sequence.live_tokens(policy._encode(live[: t + 1]).unsqueeze(0))], dim=1)
            expected = policy.action_norm.denormalize(policy.sequence(stream))[0].double().numpy()
            np.testing.assert_allclose(chunk, expected, atol=1e-4, rtol=1e-4)
    # The instruction alone (K = 0) is a prompt too, and a different one changes the chunk.
    policy.set_prompt([], embedding)
    assert policy.prompt_info.tokens == 1
    first = policy.predict_chunk(live[0])
    policy.set_prompt([], -embedding)
    assert not np.allclose(policy.predict_chunk(live[0]), first)


def test_instruction_joins_the_prompt_summary_in_conditioning_the_live_keypoints():
    # With prompt.film and language, the live keypoints' condition is the prompt's summary plus
    # the instruction's token: another instruction with the same demonstrations moves it by
    # exactly the difference of the two tokens.
    policy = _policy("icil-tiny-ma", {"prompt.film": True, **LANGUAGE})
    rng = np.random.default_rng(12)
    demos, embeddings = [_demo(policy, 4, rng)], rng.normal(size=(2, 6))
    with torch.no_grad():
        prompts = [policy.encode_prompt(demos, e) for e in embeddings]
        tokens = [policy._language_token(torch.from_numpy(e).float()).view(-1) for e in embeddings]
    torch.testing.assert_close(prompts[0].condition - prompts[1].condition, tokens[0] - tokens[1])
    torch.testing.assert_close(prompts[0].tokens[:, 1:], prompts[1].tokens[:, 1:])  # the prompt's own tokens
    live = _frames(policy, 1, rng, t0=40.0)[0]
    chunks = []
    for embedding in embeddings:
        policy.set_prompt(demos, embedding)
        chunks.append(policy.predict_chunk(live))
    assert not np.allclose(chunks[0], chunks[1])


def test_language_is_ignored_when_off():
    policy = _policy("icil-tiny-ma")
    rng = np.random.default_rng(9)
    demos = [_demo(policy, 3, rng)]
    assert policy.set_prompt(demos, np.ones(7)).tokens == policy.set_prompt(demos).tokens == 7
