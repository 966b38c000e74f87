"""ICIL training pieces: task grouping with held-out tasks, the frame-feature cache, prompt
sampling, the loss on the live part, and a tiny synthetic dataset in which only the prompt
tells the task (the trained policy must read it)."""

import re

import numpy as np
import pytest
import torch
from torch import nn
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.data.hdf5 import DataError, Episode
from mail_ros.data.dataset import shift_frames
from mail_ros.data.icil_data import (FrameFeatureCache, ICILSampler, ImageShift, episode_digest, feature_digest,
                                     module_digest, shift_views, task_groups)
from mail_ros.policy.icil_policy import Demonstration, ICILPolicy, ICILSample
from mail_ros.policy.mail_policy import MaILPolicy, PolicyInputError
from mail_ros.policy.normalizer import Normalizer
from mail_ros.policy.presets import get_icil_preset, get_preset
from mail_ros.spec import Observation
from mail_ros.train.trainer import TrainError, load_resume_state, write_resume_state

torch.set_num_threads(1)


def _policy(name="icil-tiny-ma", overrides=None) -> ICILPolicy:
    torch.manual_seed(0)
    return ICILPolicy(get_icil_preset(name, overrides))


def _episode(policy: ICILPolicy, task: str, n: int, rng: np.random.Generator, action: np.ndarray | None = None) -> Episode:
    H, W = policy.config.spec.observation.image_size
    actions = rng.normal(size=(n, policy.action_dim)) if action is None else action + 0.01 * rng.normal(size=(n, policy.action_dim))
    return Episode(
        images={c: rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8) for c in policy.cameras},
        joint_positions=rng.normal(size=(n, policy.joint_dim)),
        actions=actions,
        instruction=task,
        timestamps=0.1 * np.arange(n),
    )


def _encode(policy: ICILPolicy):
    def encode(images):
        with torch.inference_mode():
            return policy.frame_features({c: torch.from_numpy(v) for c, v in images.items()}).numpy()

    return encode


def test_task_groups_hold_out_by_name_and_drop_single_demonstrations():
    policy = _policy()
    rng = np.random.default_rng(0)
    episodes = [_episode(policy, task, 2, rng) for task in ["pick", "stack", "pick", "stack", "push", "open"]]
    assert task_groups(episodes, held_out=["push"]) == {"pick": [0, 2], "stack": [1, 3]}
    with pytest.raises(DataError, match="'psh'"):
        task_groups(episodes, held_out=["psh"])
    with pytest.raises(DataError, match="no task"):
        task_groups(episodes, held_out=["pick", "stack"])


def test_feature_cache_encodes_each_episode_once_per_encoder(tmp_path):
    policy = _policy()
    rng = np.random.default_rng(1)
    episodes = [_episode(policy, "t", n, rng) for n in (3, 5)]
    calls = []
    encode = _encode(policy)

    def counted(images):
        calls.append(len(next(iter(images.values()))))
        return encode(images)

    cache = FrameFeatureCache(tmp_path)
    digest = feature_digest(policy)
    first = cache.features(episodes, counted, digest, batch=2)
    assert [f.shape for f in first] == [(3, 32), (5, 32)] and calls == [2, 1, 2, 2, 1]
    again = cache.features(episodes, counted, digest)
    assert len(calls) == 5  # nothing re-encoded
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        next(policy.encoder.parameters()).add_(1.0)
    other = feature_digest(policy)
    assert other != digest
    changed = cache.features(episodes[:1], counted, other)
    assert calls[5:] == [3]  # new weights, new features
    assert not np.allclose(changed[0], first[0])


def test_shifted_views_are_the_encoder_on_shifted_frames_cached_apart(tmp_path):
    policy = _policy(overrides={"prompt.film": True})
    rng = np.random.default_rng(3)
    episodes = [_episode(policy, "t", n, rng) for n in (3, 4)]
    encode, calls = _encode(policy), []

    def counted(images):
        calls.append(len(next(iter(images.values()))))
        return encode(images)

    digests = [episode_digest(e) for e in episodes]
    views = shift_views(digests, policy.cameras, pad=2, count=3, seed=0)
    assert views == shift_views(digests, policy.cameras, pad=2, count=3, seed=0)  # reproducible from the seed
    assert views != shift_views(digests, policy.cameras, pad=2, count=3, seed=1)
    assert [len(view) for view in views] == [2, 2, 2]  # one shift per episode and view
    assert len({shift.key() for view in views for shift in view}) == 6  # episodes and views differ
    assert all(0 <= o <= 4 for view in views for shift in view for offset in shift.offsets.values() for o in offset)
    cache, digest = FrameFeatureCache(tmp_path), feature_digest(policy)
    plain = cache.features(episodes, counted, digest)
    for view in views:
        shifted = cache.features(episodes, counted, digest, shifts=view)
        for episode, shift, features in zip(episodes, view, shifted):
            images = {c: shift_frames(episode.images[c], 2, shift.offsets[c]) for c in policy.cameras}
            np.testing.assert_allclose(features, encode(images), rtol=1e-6, atol=1e-6)
    assert len(calls) == 8 and len(list(tmp_path.iterdir())) == 8  # 4 views x 2 episodes, each its own file
    again = cache.features(episodes, counted, digest, shifts=views[1])
    assert len(calls) == 8 and not np.allclose(again[0], plain[0])
    given = cache.features(episodes, counted, digest, shifts=views[1], digests=digests)  # the same keys
    assert len(calls) == 8 and all(np.array_equal(a, b) for a, b in zip(given, again))
    # No shift at all is the unshifted view (another key, the same features).
    still = [ImageShift(2, {c: (2, 2) for c in policy.cameras})] * 2
    np.testing.assert_allclose(cache.features(episodes, encode, digest, shifts=still)[1], plain[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="1 shifts for 2 episodes"):
        cache.features(episodes, encode, digest, shifts=still[:1])
    with pytest.raises(ValueError, match="1 digests for 2 episodes"):
        cache.features(episodes, encode, digest, digests=digests[:1])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 3), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_shift_frames_moves_the_image_and_repeats_its_edge(pad, h, w, seed):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    dy, dx = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
    shifted = shift_frames(frames, pad, (dy, dx))
    assert shifted.shape == frames.shape
    for y in range(h):
        for x in range(w):  # pixel (y, x) shows the source pixel (y + dy - pad, x + dx - pad), clamped to the image
            source = frames[:, min(max(y + dy - pad, 0), h - 1), min(max(x + dx - pad, 0), w - 1)]
            np.testing.assert_array_equal(shifted[:, y, x], source)
    np.testing.assert_array_equal(shift_frames(frames, pad, (pad, pad)), frames)
    with pytest.raises(ValueError, match="shift offset"):
        shift_frames(frames, 1, (3, 0))


def test_feature_digest_follows_what_the_features_depend_on_and_nothing_else():
    policy = _policy()
    digest = feature_digest(policy)
    with torch.no_grad():  # the projections are trained on top of the cached features
        for name, parameter in policy.encoder.named_parameters():
            if "proj" in name:
                parameter.add_(1.0)
    assert feature_digest(policy) == digest
    # A setting without weights changes the features, so the key too.
    other = _policy(overrides={"vision.temperature": 0.5})
    assert module_digest(nn.ModuleList(other.feature_modules())) == module_digest(nn.ModuleList(policy.feature_modules()))
    assert feature_digest(other) != digest
    # prompt.film caches the trunks' maps: another key, which the keypoint layers (trained) leave alone.
    maps = _policy(overrides={"prompt.film": True})
    assert feature_digest(maps) != digest
    maps_digest = feature_digest(maps)
    with torch.no_grad():
        for name, parameter in maps.encoder.named_parameters():
            if ".pool." in name or ".film." in name:
                parameter.add_(1.0)
    assert feature_digest(maps) == maps_digest


def test_sampler_draws_prompts_of_other_demonstrations_of_the_same_task():
    policy = _policy(overrides={"prompt.dilation": 2})
    rng = np.random.default_rng(2)
    episodes = [_episode(policy, task, n, rng) for task, n in [("a", 9), ("a", 5), ("a", 6), ("b", 7), ("b", 4), ("a", 3)]]
    features = [rng.normal(size=(len(e), 32)).astype(np.float32) for e in episodes]
    groups = task_groups(episodes)
    sampler = ICILSampler(episodes, features, groups, k_max=3, dilation=2, action_horizon=4, cut_stride=2)
    assert sampler.live == [0, 1, 2, 3, 4]  # episode 5 is shorter than one chunk (it can still prompt)
    sizes, phases = set(), set()
    for seed in range(30):
        sample = sampler.sample(0, np.random.default_rng(seed))
        sizes.add(len(sample.prompt))
        for features_k, _, actions_k in sample.prompt:
            # Which episode: match the first frame's features; never the live one, always task "a".
            source = next(i for i, f in enumerate(features) if np.allclose(f[0], features_k[0].numpy()))
            assert source != 0 and episodes[source].instruction == "a"
            assert len(actions_k) == len(range(0, len(episodes[source]), 2)) + (len(episodes[source]) % 2 == 0)
        assert sample.cuts in ([0, 2, 4], [1, 3, 5]) and sample.live_features.shape == (9, 32)
        phases.add(sample.cuts[0])
    assert sizes == {1, 2, 3} and phases == {0, 1}
    same = sampler.sample(3, np.random.default_rng(7)), sampler.sample(3, np.random.default_rng(7))
    assert len(same[0].prompt) == len(same[1].prompt) == 1  # task "b" has one other demonstration
    assert torch.equal(same[0].prompt[0][0], same[1].prompt[0][0])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(4, 15), stride=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_sampler_cuts_every_frame_that_starts_a_chunk_over_its_draws(n, stride, seed):
    # Every frame can be a cut at run time (a chunk is asked for whenever the executor needs one),
    # so every frame with a whole recorded chunk after it is trained, whatever the stride.
    policy = _policy()
    rng = np.random.default_rng(seed)
    episodes = [_episode(policy, "a", length, rng) for length in (n, 5)]
    features = [rng.normal(size=(len(e), 32)).astype(np.float32) for e in episodes]
    sampler = ICILSampler(episodes, features, task_groups(episodes), k_max=1, dilation=1, action_horizon=4, cut_stride=stride)
    last = n - 4  # the last frame a whole chunk follows
    covered = set()
    for _ in range(12 * stride):
        cuts = sampler.sample(0, rng).cuts
        assert cuts and 0 <= cuts[0] < stride and cuts[-1] <= last < cuts[-1] + stride
        assert all(b - a == stride for a, b in zip(cuts, cuts[1:]))
        covered.update(cuts)
    assert covered == set(range(last + 1))


def test_sampler_takes_each_episode_whole_from_one_view():
    policy = _policy()
    rng = np.random.default_rng(4)
    episodes = [_episode(policy, "a", n, rng) for n in (6, 5, 7, 8)]
    views = [[np.full((len(e), 32), 10.0 * v + i, dtype=np.float32) for i, e in enumerate(episodes)] for v in range(3)]
    groups = task_groups(episodes)
    plain = ICILSampler(episodes, views[0], groups, k_max=3, dilation=1, action_horizon=4)
    viewed = ICILSampler(episodes, views[0], groups, k_max=3, dilation=1, action_horizon=4, views=views[1:])
    seen = set()
    for seed in range(40):
        sample = viewed.sample(0, np.random.default_rng(seed))
        for features in [sample.live_features] + [f for f, _, _ in sample.prompt]:
            values = features.unique()
            assert len(values) == 1  # one episode, one view, every frame
            seen.add(int(values.item()) // 10)
        assert sample.live_features[0, 0].item() % 10 == 0  # the live episode, from whichever view
    assert seen == {0, 1, 2}
    # Without views a sampler draws as it always did: no draw for the view.
    a, b = plain.sample(2, np.random.default_rng(5)), plain.sample(2, np.random.default_rng(5))
    assert [f[0, 0].item() for f, _, _ in a.prompt] == [f[0, 0].item() for f, _, _ in b.prompt]
    with pytest.raises(DataError, match="frames for an episode"):
        ICILSampler(episodes, views[0], groups, k_max=3, dilation=1, action_horizon=4, views=[views[1][::-1]])


@pytest.mark.parametrize("name", ["icil-tiny-ma", "icil-tiny-tr"])
def test_loss_is_the_mse_of_the_full_sequence_chunks_at_every_cut(name):
    policy = _policy(name).eval()
    g = torch.Generator().manual_seed(0)
    F, J, Da, A = policy.feature_dim, policy.joint_dim, policy.action_dim, policy.A

    def frames(n):
        return torch.randn(n, F, generator=g), torch.randn(n, J, generator=g), torch.randn(n, Da, generator=g)

    sample = ICILSample([frames(4), frames(3)], *frames(9), cuts=[0, 3, 5])
    loss, metrics = policy.compute_loss([sample])
    assert metrics["chunks"] == 3
    with torch.no_grad():
        prompt = torch.cat(
            [policy.sequence.demo_tokens(policy._tokens(f, j)[None], a[None]) for f, j, a in sample.prompt], dim=1
        )
        live = policy.sequence.live_tokens(policy._tokens(sample.live_features, sample.live_joints)[None])
        expected = torch.stack([
            torch.nn.functional.mse_loss(policy.sequence(torch.cat([prompt, live[:, : t + 1]], dim=1))[0], sample.live_actions[t : t + A])
            for t in sample.cuts
        ]).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-4)
    loss.backward()
    assert policy.sequence.queries.grad is not None and policy.proprio_proj.weight.grad.abs().sum() > 0
    # The encoders' projections learn; what made the (cached) features does not.
    assert policy.encoder.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for module in policy.feature_modules() for p in module.parameters())


def _streaming_loss(policy: ICILPolicy, samples: list[ICILSample]) -> torch.Tensor:
    """The loss through the runtime's streaming API, sample by sample and cut by cut: the prompt
    prefilled, the live frames committed up to each cut (with ``live_window``, the window of W
    frames ending there, frame 0 repeated before the start, after the prompt's state), the
    queries run from there."""
    losses = []
    for sample in samples:
        parts = [] if policy.language_proj is None else [policy._language_token(sample.language.float())]
        parts += [policy.sequence.demo_tokens(policy._tokens(f, j)[None], policy.action_norm.normalize_input(a)[None])
                  for f, j, a in sample.prompt]
        state = policy.sequence.prefill(torch.cat(parts, dim=1)) if parts else None
        live = policy.sequence.live_tokens(policy._tokens(sample.live_features, sample.live_joints)[None])
        target = policy.action_norm.normalize(sample.live_actions)
        committed, prompt_state = 0, state
        for cut in sample.cuts:
            if policy.W:
                window = [max(0, t) for t in range(cut - policy.W + 1, cut + 1)]
                state = policy.sequence.extend(live[:, window], prompt_state)
            else:
                state = policy.sequence.extend(live[:, committed : cut + 1], state)
            committed = cut + 1
            losses.append(torch.nn.functional.mse_loss(policy.sequence.predict(state)[0], target[cut : cut + policy.A]))
    return torch.stack(losses).mean()


_POLICIES: dict = {}


def _stats_policy(name: str, language: bool, window: int = 0) -> ICILPolicy:
    """An eval-mode policy (no dropout) with non-trivial normalisation statistics, built once."""
    if (name, language, window) not in _POLICIES:
        overrides = {"language.encoder": "hash:test", "language.dim": 5} if language else {}
        policy = _policy(name, {**overrides, "live_window": window}).eval()
        rng = np.random.default_rng(5)
        policy.set_normalization(
            Normalizer.stats_from_data(rng.normal(1.0, 2.0, size=(50, policy.action_dim))),
            Normalizer.stats_from_data(rng.normal(-1.0, 0.5, size=(50, policy.joint_dim))),
            Normalizer.stats_from_data(rng.normal(size=(50, 5))) if language else None,
        )
        _POLICIES[(name, language, window)] = policy
    return _POLICIES[(name, language, window)]


@pytest.mark.parametrize("name", ["icil-tiny-ma", "icil-tiny-tr"])
@pytest.mark.parametrize("language", [False, True])
@pytest.mark.parametrize("window", [0, 3])
@settings(max_examples=8, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(st.lists(st.integers(1, 7), max_size=3), st.integers(0, 9), st.integers(1, 4)), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**16),
)
def test_batched_loss_and_gradients_equal_the_streaming_runtime(name, language, window, shapes, seed):
    # Samples of different prompt sizes (K = 0 included, but not with a live window, which needs
    # a prompt or an instruction before it) and lengths, each with its own cuts: the batched loss
    # must be what the robot's prefill / extend / predict computes.
    policy = _stats_policy(name, language, window)
    g = torch.Generator().manual_seed(seed)
    F, J, Da, A = policy.feature_dim, policy.joint_dim, policy.action_dim, policy.A

    def frames(n):
        return torch.randn(n, F, generator=g), torch.randn(n, J, generator=g), torch.randn(n, Da, generator=g)

    samples = []
    for prompt_lengths, extra, stride in shapes:
        M = A + extra
        language_embedding = torch.randn(5, generator=g) if language else None
        if window and not language:
            prompt_lengths = prompt_lengths or [2]
        samples.append(ICILSample([frames(n) for n in prompt_lengths], *frames(M), cuts=list(range(0, M - A + 1, stride)),
                                  language=language_embedding))
    trainable = [(n, p) for n, p in policy.named_parameters() if not n.startswith("encoder.")]
    loss, metrics = policy.compute_loss(samples)
    assert metrics["chunks"] == sum(len(s.cuts) for s in samples)
    grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
    expected = _streaming_loss(policy, samples)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    expected_grads = torch.autograd.grad(expected, [p for _, p in trainable], allow_unused=True)
    for (n, _), grad, reference in zip(trainable, grads, expected_grads):
        if reference is None:
            assert grad is None or not grad.any(), n
        else:
            torch.testing.assert_close(grad, reference, atol=2e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("relative, language, summary", [
    (False, False, {}), (True, False, {}), (True, True, {}),
    (True, False, {"prompt.summary_heads": 2, "prompt.summary_hidden": 8})])
def test_prompt_film_loss_on_cached_maps_is_the_runtime_on_images(relative, language, summary):
    # With prompt.film, training runs on the trunks' cached maps (FiLM, keypoints and the prompt
    # summary computed in the loss); the robot runs on images. Their chunks must be the same.
    # With relative_actions the loss is on arm offsets from the cut's joints (prompt actions go in
    # as offsets from their own frame's joints), while the runtime returns absolute targets.
    # With language the instruction joins the condition (and starts the stream) in both; the
    # summary in its single-query linear form or with heads and an MLP value.
    overrides = {"prompt.film": True, "relative_actions": relative, **summary}
    if language:
        overrides.update({"language.encoder": "hash:test", "language.dim": 5})
    policy = _policy("icil-tiny-ma", overrides).eval()
    rng = np.random.default_rng(11)
    embedding = rng.normal(size=5) if language else None
    policy.set_normalization(Normalizer.stats_from_data(rng.normal(1.0, 2.0, size=(50, policy.action_dim))),
                             Normalizer.stats_from_data(rng.normal(-1.0, 0.5, size=(50, policy.joint_dim))),
                             Normalizer.stats_from_data(rng.normal(size=(50, 5))) if language else None)
    with torch.no_grad():
        for name, parameter in policy.encoder.named_parameters():
            if ".film." in name:
                parameter.normal_(0.0, 0.5)
    A = policy.A
    demos, live = [_episode(policy, "t", n, rng) for n in (5, 3)], _episode(policy, "t", A + 4, rng)
    assert policy.feature_dim == len(policy.cameras) * int(np.prod(policy.map_shape))

    def frames(episode):
        return (torch.from_numpy(_encode(policy)(episode.images)), torch.from_numpy(episode.joint_positions).float(),
                torch.from_numpy(episode.actions).float())

    def observations(episode):
        return [Observation(i * 100_000_000, {c: episode.images[c][i] for c in policy.cameras}, episode.joint_positions[i])
                for i in range(len(episode.actions))]

    cuts = [0, 2, 4]
    instruction = None if embedding is None else torch.from_numpy(embedding).float()
    loss, _ = policy.compute_loss([ICILSample([frames(d) for d in demos], *frames(live), cuts=cuts, language=instruction)])
    policy.set_prompt([Demonstration(observations(d), d.actions) for d in demos], embedding)
    names, joints = policy.config.spec.action.names, list(policy.config.spec.observation.joint_names)
    arm = [(a, joints.index(name)) for a, name in enumerate(names) if relative and name in joints]
    assert len(arm) == (7 if relative else 0)

    def network(actions, q):  # (A, Da) absolute -> the network's frame at joints q (J,)
        out = np.array(actions, dtype=np.float64)
        for a, j in arm:
            out[:, a] -= q[j]
        return policy.action_norm.normalize(torch.from_numpy(out).float())

    errors = []
    for t, obs in enumerate(observations(live)[: cuts[-1] + 1]):
        chunk = policy.predict_chunk(obs)
        if t in cuts:
            q = live.joint_positions[t]
            errors.append(torch.nn.functional.mse_loss(network(chunk, q), network(live.actions[t : t + A], q)))
    torch.testing.assert_close(loss.detach(), torch.stack(errors).mean(), atol=1e-5, rtol=1e-4)
    # What learns: the FiLM layers, the prompt summary and the keypoint layers; not the trunks.
    policy.freeze_features()
    loss.backward()
    for name, parameter in policy.named_parameters():
        if name.startswith(("summary.", "sequence.queries", "language_proj.")) or ".film." in name or ".pool.keypoints." in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        if ".trunk." in name:
            assert not parameter.requires_grad and parameter.grad is None, name


def test_live_window_training_needs_something_before_the_window():
    policy = _policy(overrides={"live_window": 2})
    f, j, a = torch.zeros(6, policy.feature_dim), torch.zeros(6, policy.joint_dim), torch.zeros(6, policy.action_dim)
    with pytest.raises(PolicyInputError, match="live_window training needs a prompt"):
        policy.compute_loss([ICILSample([], f, j, a, cuts=[0])])
    loss, metrics = policy.compute_loss([ICILSample([(f[:2], j[:2], a[:2])], f, j, a, cuts=[0, 2])])
    assert metrics["chunks"] == 2 and torch.isfinite(loss)


def _agreement_samples(policy: ICILPolicy, tasks: list[str], seed: int) -> list[ICILSample]:
    """One sample per entry of ``tasks``: a 2-frame prompt, a live episode of A + 3 frames."""
    g = torch.Generator().manual_seed(seed)
    F, J, Da, A = policy.feature_dim, policy.joint_dim, policy.action_dim, policy.A

    def frames(n):
        return torch.randn(n, F, generator=g), torch.randn(n, J, generator=g), torch.randn(n, Da, generator=g)

    return [ICILSample([frames(2)], *frames(A + 3), cuts=[0, 3], task=task) for task in tasks]


def test_task_agreement_loss_adds_to_the_chunk_loss_and_needs_other_tasks_and_labels():
    policy = _policy(overrides={"prompt.film": True, "prompt.agreement": 0.5})
    samples = _agreement_samples(policy, ["a", "b", "a", "c"], seed=0)
    loss, metrics = policy.compute_loss(samples)
    assert metrics["agreement"] > 0
    assert loss.item() == pytest.approx(metrics["chunk_loss"] + 0.5 * metrics["agreement"], rel=1e-6)
    # The agreement term trains the summary and the keypoint layers it reads (prompt frames and the
    # live episode read as a prompt).
    (0.5 * policy._agreement_loss(samples, [policy._summary([policy._prompt_descriptors(*s.prompt[0])]) for s in samples])
     ).backward()
    for name, parameter in policy.named_parameters():
        if name.startswith("summary.") or ".pool.keypoints." in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        if name.startswith("sequence."):
            assert parameter.grad is None, name
    # Without a sample of another task there is nothing to tell apart: no agreement loss.
    _, metrics = policy.compute_loss(_agreement_samples(policy, ["a", "a"], seed=1))
    assert metrics["agreement"] == 0.0
    with pytest.raises(PolicyInputError, match="task of every sample"):
        policy.compute_loss(_agreement_samples(policy, ["a", ""], seed=2))
    # Off (the default): the chunk loss alone, no task needed.
    plain = _policy(overrides={"prompt.film": True})
    loss, metrics = plain.compute_loss(_agreement_samples(plain, ["", ""], seed=3))
    assert "agreement" not in metrics and loss.item() == pytest.approx(metrics["chunk_loss"], rel=1e-6)


def test_task_agreement_training_makes_a_tasks_prompts_agree(tmp_path):
    # Three tasks told apart by their actions only; training the agreement loss alone (the chunk
    # loss's weight made negligible by a large agreement weight) must make each prompt's summary
    # closest to the summaries of its own task's episodes.
    policy = _policy(overrides={"prompt.film": True, "prompt.agreement": 100.0,
                                "prompt.summary_heads": 2, "prompt.summary_hidden": 16})
    rng = np.random.default_rng(6)
    targets = {task: rng.normal(size=policy.action_dim) for task in ("a", "b", "c")}
    episodes = [_episode(policy, task, 6, rng, targets[task]) for task in targets for _ in range(3)]
    policy.set_normalization(Normalizer.stats_from_data(np.concatenate([e.actions for e in episodes])),
                             Normalizer.stats_from_data(np.concatenate([e.joint_positions for e in episodes])))
    features = FrameFeatureCache(tmp_path).features(episodes, _encode(policy), feature_digest(policy))
    sampler = ICILSampler(episodes, features, task_groups(episodes), k_max=2, dilation=1, action_horizon=policy.A)
    assert {sampler.sample(i, rng).task for i in sampler.live} == {"a", "b", "c"}
    optimizer = torch.optim.Adam([p for n, p in policy.named_parameters() if not n.startswith("encoder.")], lr=3e-3)
    policy.train()
    agreement = []
    for step in range(40):
        step_rng = np.random.default_rng([6, step])
        loss, metrics = policy.compute_loss([sampler.sample(int(i), step_rng) for i in step_rng.choice(sampler.live, 6)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        agreement.append(metrics["agreement"])
    assert np.mean(agreement[-5:]) < 0.5 * np.mean(agreement[:5]), agreement
    policy.eval()
    with torch.no_grad():
        samples = [sampler.sample(i, np.random.default_rng(i)) for i in sampler.live]
        prompts = torch.stack([policy._summary([policy._prompt_descriptors(*p) for p in s.prompt]) for s in samples])
        lives = torch.stack([policy.summary(policy._prompt_descriptors(s.live_features, s.live_joints, s.live_actions))
                             for s in samples])
        similarity = torch.nn.functional.normalize(prompts, dim=-1) @ torch.nn.functional.normalize(lives, dim=-1).T
    tasks = [s.task for s in samples]
    for i, task in enumerate(tasks):
        nearest = int(similarity[i].argmax())
        assert tasks[nearest] == task, (i, tasks, similarity)


def test_bad_samples_are_refused():
    policy = _policy()
    f, j, a = torch.zeros(6, 32), torch.zeros(6, policy.joint_dim), torch.zeros(6, policy.action_dim)
    with pytest.raises(PolicyInputError, match="cuts"):
        policy.compute_loss([ICILSample([], f, j, a, cuts=[3])])  # 3 + A > 6
    with pytest.raises(PolicyInputError, match="prompt 0"):
        policy.compute_loss([ICILSample([(f[:, :5], j, a)], f, j, a, cuts=[0])])
    with pytest.raises(PolicyInputError, match="at least one"):
        policy.compute_loss([])


def test_policy_trained_on_prompts_follows_the_prompt(tmp_path):
    # Each task's actions are one constant vector; observations (random images and joints) do
    # not tell the tasks apart, so only the prompt's action tokens can.
    policy = _policy()
    rng = np.random.default_rng(3)
    targets = {task: rng.normal(size=policy.action_dim) for task in ("a", "b", "c")}
    episodes = [_episode(policy, task, 6, rng, targets[task]) for task in targets for _ in range(3)]
    policy.set_normalization(
        Normalizer.stats_from_data(np.concatenate([e.actions for e in episodes])),
        Normalizer.stats_from_data(np.concatenate([e.joint_positions for e in episodes])),
    )
    features = FrameFeatureCache(tmp_path).features(episodes, _encode(policy), module_digest(policy.encoder))
    sampler = ICILSampler(episodes, features, task_groups(episodes), k_max=2, dilation=1, action_horizon=policy.A, cut_stride=2)
    optimizer = torch.optim.Adam([p for n, p in policy.named_parameters() if not n.startswith("encoder.")], lr=3e-3)
    policy.train()
    first = None
    for step in range(60):
        step_rng = np.random.default_rng([3, step])
        batch = [sampler.sample(int(live), step_rng) for live in step_rng.choice(sampler.live, size=4)]
        loss, _ = policy.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.2 * first
    policy.eval()
    with torch.no_grad():
        for task, target in targets.items():
            sample = sampler.sample(next(i for i in sampler.live if episodes[i].instruction == task), np.random.default_rng(0))
            chunk = policy.action_norm.denormalize(policy.sequence.predict(
                policy.sequence.extend(
                    policy.sequence.live_tokens(policy._tokens(sample.live_features[:1], sample.live_joints[:1])[None]),
                    policy.sequence.prefill(torch.cat([
                        policy.sequence.demo_tokens(policy._tokens(f, j)[None], policy.action_norm.normalize_input(a)[None])
                        for f, j, a in sample.prompt
                    ], dim=1)),
                )
            ))[0].numpy()
            errors = {other: np.abs(chunk - value).mean() for other, value in targets.items()}
            assert min(errors, key=errors.get) == task, errors


def test_loss_with_language_starts_each_sequence_with_the_instruction():
    policy = _policy(overrides={"language.encoder": "hash:test", "language.dim": 5}).eval()
    rng = np.random.default_rng(4)
    episodes = [_episode(policy, task, 6, rng) for task in ("a", "a", "b", "b")]
    features = [rng.normal(size=(6, 32)).astype(np.float32) for _ in episodes]
    embeddings = {"a": np.ones(5), "b": -np.ones(5)}
    with pytest.raises(DataError, match="'b'"):
        ICILSampler(episodes, features, task_groups(episodes), k_max=1, dilation=1, action_horizon=policy.A,
                    embeddings={"a": np.ones(5)})
    sampler = ICILSampler(episodes, features, task_groups(episodes), k_max=1, dilation=1, action_horizon=policy.A,
                          embeddings=embeddings)
    sample = sampler.sample(0, np.random.default_rng(0))
    assert torch.equal(sample.language, torch.ones(5))
    loss, _ = policy.compute_loss([sample])
    torch.testing.assert_close(loss, _streaming_loss(policy, [sample]), atol=1e-6, rtol=1e-5)
    # The instruction token is part of the computation (at the start of the stream, its effect on
    # an untrained model's chunks is small: about 1e-6 of the loss here).
    loss.backward()
    assert policy.language_proj.weight.grad.abs().sum() > 0
    with pytest.raises(PolicyInputError, match="language must be"):
        policy.compute_loss([ICILSample(sample.prompt, sample.live_features, sample.live_joints, sample.live_actions, sample.cuts)])


def _film_mail_policy(overrides=None) -> MaILPolicy:
    """A tiny FiLM-conditioned MaIL policy whose FiLM layers are far from their zero init."""
    torch.manual_seed(1)
    mail = MaILPolicy(get_preset("tiny-d_ma-bc", {"vision.film": True, "language.encoder": "clip-test", "language.dim": 8,
                                                 **(overrides or {})}))
    with torch.no_grad():
        for name, parameter in mail.encoder.named_parameters():
            if ".film." in name:
                parameter.normal_(0.0, 0.5)
    return mail


def test_encoders_taken_from_a_film_mail_policy_are_that_policy_at_the_neutral_instruction():
    mail = _film_mail_policy()
    policy = _policy()
    before = module_digest(policy.encoder)
    policy.load_encoder_from(mail)
    assert module_digest(policy.encoder) != before
    rng = np.random.default_rng(5)
    H, W = policy.config.spec.observation.image_size
    images = {c: torch.from_numpy(rng.integers(0, 256, (6, H, W, 3), dtype=np.uint8)) for c in policy.cameras}
    with torch.no_grad():
        expected = mail.encoder(images, torch.zeros(6, mail.config.language.dim))
        other = mail.encoder(images, torch.ones(6, mail.config.language.dim))
        got = policy.encoder(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - other).abs().max() > 1e-2  # the fold is of THIS condition's FiLM, not a no-op
    # With prompt.film the policy keeps its own (prompt-conditioned, zero-initialised) FiLM layers:
    # unconditioned, and before training, it is the same folded encoder.
    film = _policy(overrides={"prompt.film": True})
    film.load_encoder_from(mail)
    assert all(not p.any() for name, p in film.encoder.named_parameters() if ".film." in name)
    with torch.no_grad():
        maps = film.frame_features(images)
        torch.testing.assert_close(film.encoder.project(film._pooled(maps)), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(film._pooled(maps, torch.randn(film.config.backbone.d_model)), film._pooled(maps))


def test_encoders_taken_from_an_icil_policy_are_its_own_but_for_the_prompt_film():
    # A new run (here: other settings) from a trained ICIL run's encoders, whose MaIL source is gone.
    torch.manual_seed(3)
    source = ICILPolicy(get_icil_preset("icil-tiny-ma", {"prompt.film": True}))
    with torch.no_grad():
        for parameter in source.encoder.parameters():
            parameter.normal_(0.0, 0.5)  # "trained": nothing left at any initialisation

    def not_film(state):
        return {n: v for n, v in state.items() if not n.endswith(("film.weight", "film.bias"))}

    for overrides in ({"prompt.film": True, "proprio": False}, {"prompt.film": False}):
        policy = _policy(overrides=overrides)
        own_film = {n: v.clone() for n, v in policy.encoder.state_dict().items() if ".film." in n}
        policy.load_encoder_from(source)
        mine, theirs = policy.encoder.state_dict(), source.encoder.state_dict()
        assert set(not_film(mine)) == set(not_film(theirs))
        for name, value in not_film(theirs).items():
            torch.testing.assert_close(mine[name], value, rtol=0, atol=0)
        assert set(own_film) == {n for n in mine if ".film." in n}  # none without prompt.film
        for name, value in own_film.items():  # the prompt's FiLM reads this policy's summary: kept
            torch.testing.assert_close(mine[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"the ICIL policy's image encoders do not fit.*vision\.num_keypoints"):
        _policy(overrides={"vision.num_keypoints": 4}).load_encoder_from(source)


def test_encoders_of_another_layout_are_refused_by_name():
    policy = _policy()
    before = module_digest(policy.encoder)
    with pytest.raises(ValueError, match=r"vision\.num_keypoints"):
        policy.load_encoder_from(_film_mail_policy({"vision.num_keypoints": 4}))
    with pytest.raises(ValueError, match=r"image_size"):
        policy.load_encoder_from(_film_mail_policy({"spec.observation.image_size": [40, 40]}))
    assert module_digest(policy.encoder) == before


def _trained_icil(overrides: dict, preset: str = "icil-tiny-ma") -> ICILPolicy:
    """An ICIL policy with nothing left at any initialisation: random weights and statistics."""
    torch.manual_seed(3)
    source = ICILPolicy(get_icil_preset(preset, overrides))
    rng = np.random.default_rng(3)
    source.set_normalization(Normalizer.stats_from_data(rng.normal(size=(50, source.action_dim))),
                             Normalizer.stats_from_data(rng.normal(size=(50, source.joint_dim))))
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_(0.0, 0.3)
    return source


@pytest.mark.parametrize("preset", ["icil-tiny-ma", "icil-tiny-tr"])
def test_a_fine_tune_starts_at_the_checkpoints_policy_also_with_joints_added_or_a_longer_chunk(preset):
    base = {"prompt.film": True, "relative_actions": True, "proprio": False}
    source = _trained_icil(base, preset)
    rng = np.random.default_rng(4)
    demos, live = [_episode(source, "t", n, rng) for n in (5, 3)], _episode(source, "t", 4, rng)

    def chunks(policy):
        policy.set_prompt([Demonstration(
            [Observation(i * 100_000_000, {c: d.images[c][i] for c in policy.cameras}, d.joint_positions[i])
             for i in range(len(d.actions))], d.actions) for d in demos])
        return np.stack([policy.predict_chunk(
            Observation(i * 100_000_000, {c: live.images[c][i] for c in policy.cameras}, live.joint_positions[i]))
            for i in range(4)])

    expected = chunks(source)  # (4, A, Da)
    A = source.A
    # The same settings but training-only ones; then joints added: the projection starts at zero,
    # the joint statistics are the new policy's own (the checkpoint never read joints); then a
    # longer chunk: its first A actions are the checkpoint's, the others start near its last.
    for overrides in ({**base, "prompt.k_max": 2, "backbone.dropout": 0.3}, {**base, "proprio": True},
                      {**base, "spec.action.horizon": 2 * A}):
        policy = _policy(preset, overrides)
        own_joint_stats = policy.proprio_norm.mean.clone()
        policy.load_weights_from(source)
        np.testing.assert_allclose(chunks(policy)[:, :A], expected, rtol=1e-5, atol=1e-6)
        assert policy.A == (2 * A if "spec.action.horizon" in overrides else A)
        torch.testing.assert_close(policy.sequence.queries[A:], policy.sequence.queries[A - 1].expand(policy.A - A, -1))
        torch.testing.assert_close(policy.action_norm.mean, source.action_norm.mean, rtol=0, atol=0)
        if policy.proprio_proj is not None:
            assert not policy.proprio_proj.weight.any() and not policy.proprio_proj.bias.any()
            torch.testing.assert_close(policy.proprio_norm.mean, own_joint_stats, rtol=0, atol=0)
    # Anything else that differs is refused by name, and the policy keeps its own weights.
    for overrides, named in (({**base, "relative_actions": False}, "relative_actions"),
                             ({**base, "backbone.n_layers": source.config.backbone.n_layers + 1}, "backbone.n_layers"),
                             ({**base, "spec.action.horizon": A - 1}, "spec.action.horizon")):
        policy = _policy(preset, overrides)
        before = module_digest(policy)
        with pytest.raises(ValueError, match=rf"weights do not fit this ICIL policy: {re.escape(named)} "):
            policy.load_weights_from(source)
        assert module_digest(policy) == before
    with pytest.raises(ValueError, match=r"proprio \(False here, True in the checkpoint\)"):
        _policy(preset, base).load_weights_from(_trained_icil({**base, "proprio": True}, preset))


def test_a_resume_state_of_other_trainable_parameters_is_refused_clearly(tmp_path):
    # E.g. a run saved while the encoders' projections were frozen, resumed by a trainer that trains them.
    policy = _policy()
    sequence_only = torch.optim.Adam(policy.sequence.parameters())
    write_resume_state(tmp_path, policy, sequence_only, {"step": 1})
    policy.freeze_features()
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad])
    with pytest.raises(TrainError, match="optimizer state does not fit"):
        load_resume_state(tmp_path, policy, optimizer)
