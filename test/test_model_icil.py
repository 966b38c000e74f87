"""ICIL sequence model: streaming (prefill, one commit per step, uncommitted queries) equals the
full-sequence computation, for Mamba and its Transformer twin; state size flat for Mamba."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cuda_kernels import mamba_kernels_skip_reason
from mail_ros.model import icil
from mail_ros.model.icil import ICILSequence, PromptSummary, sinusoidal_positions

torch.set_num_threads(1)

D, DA, A = 16, 3, 4
KINDS = ["mamba", "transformer"]


def _model(kind: str) -> ICILSequence:
    torch.manual_seed(0)
    return ICILSequence(kind, d_model=D, n_layers=2, action_dim=DA, n_actions=A, d_state=4, heads=2).eval()


def _prompt(model: ICILSequence, lengths: list[int], batch: int = 1) -> torch.Tensor:
    demos = [model.demo_tokens(torch.randn(batch, n, D), torch.randn(batch, n, DA)) for n in lengths]
    return torch.cat(demos, dim=1) if demos else torch.zeros(batch, 0, D)


def _assert_same_gradients(model: ICILSequence, grads, expected) -> None:
    """Per parameter: the same gradient, or none where the reference has none."""
    for name, g, g_ref in zip([n for n, _ in model.named_parameters()], grads, expected):
        if g_ref is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, g_ref, atol=5e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15, deadline=None)
@given(
    demo_lengths=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    live=st.integers(1, 8),
    batch=st.integers(1, 2),
)
def test_streaming_equals_full_sequence(kind, demo_lengths, live, batch):
    model = _model(kind)
    torch.manual_seed(1)
    with torch.no_grad():
        prompt = _prompt(model, demo_lengths, batch)
        frames = model.live_tokens(torch.randn(batch, live, D))
        state = model.prefill(prompt) if prompt.shape[1] else None
        prompt_state = state
        for t in range(live):
            state = model.extend(frames[:, t : t + 1], state)
            streamed = model.predict(state)
            full = model(torch.cat([prompt, frames[:, : t + 1]], dim=1))
            assert streamed.shape == (batch, A, DA)
            torch.testing.assert_close(streamed, full, atol=2e-5, rtol=1e-4)
            # Predicting commits nothing: the same state predicts the same chunk again.
            torch.testing.assert_close(model.predict(state), streamed, atol=0, rtol=0)
        assert state.length == prompt.shape[1] + live
        # The prompt state is never modified: a second episode from it gives the first step again.
        again = model.predict(model.extend(frames[:, :1], prompt_state))
        torch.testing.assert_close(again, model(torch.cat([prompt, frames[:, :1]], dim=1)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_on_cuda_equals_the_cpu_full_sequence(kind):
    """On a GPU the stream runs mamba_ssm's kernels (the scan for the prefill, the Triton
    one-token update per step); held to the CPU's full-sequence computation."""
    reason = mamba_kernels_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    cpu, gpu = _model(kind), _model(kind).cuda()
    torch.manual_seed(1)
    with torch.no_grad():
        prompt = _prompt(cpu, [7, 12, 5], batch=2)
        frames = cpu.live_tokens(torch.randn(2, 6, D))
        state = gpu.prefill(prompt.cuda())
        for t in range(6):
            state = gpu.extend(frames[:, t : t + 1].cuda(), state)
            full = cpu(torch.cat([prompt, frames[:, : t + 1]], dim=1))
            torch.testing.assert_close(gpu.predict(state).cpu(), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    picks=st.lists(st.tuples(st.integers(0, 2), st.floats(0.0, 1.0)), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_chunks_at_prefixes_equal_streaming_with_gradients(kind, lengths, picks, seed):
    # Streams of different lengths, right-padded; prefixes anywhere in them, in any order,
    # some twice. Each chunk and the gradients of a loss over all of them must be those of
    # the runtime API run prefix by prefix.
    model = _model(kind)
    torch.manual_seed(seed)
    streams = [torch.randn(n, D) for n in lengths]
    tokens = torch.nn.utils.rnn.pad_sequence(streams, batch_first=True)
    pairs = [(row % len(lengths), 1 + round(where * (lengths[row % len(lengths)] - 1))) for row, where in picks]
    rows, ends = (torch.tensor(column) for column in zip(*pairs))
    weights = torch.randn(len(pairs), A, DA)
    params = list(model.parameters())
    batched = model.chunks_at(tokens, rows, ends)
    assert batched.shape == (len(pairs), A, DA)
    grads = torch.autograd.grad((weights * batched).sum(), params, allow_unused=True)
    streamed = torch.stack([model.predict(model.prefill(streams[r][None, :e]))[0] for r, e in pairs])
    torch.testing.assert_close(batched, streamed, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # inference: the paths that keep only final states must not be taken
        torch.testing.assert_close(model.chunks_at(tokens, rows, ends), streamed, atol=2e-5, rtol=1e-4)
    expected = torch.autograd.grad((weights * streamed).sum(), params, allow_unused=True)
    _assert_same_gradients(model, grads, expected)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    rows=st.lists(st.integers(0, 2), min_size=1, max_size=6),
    window=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_windows_after_prefixes_equal_streaming_with_gradients(kind, lengths, rows, window, seed):
    # Prefixes of different lengths, right-padded; windows of W tokens, several per prefix (some
    # prefixes unused). Each chunk, and the gradients of a loss over all of them, must be those of
    # the runtime: the prefix prefilled, the window committed after it, the queries from there.
    model = _model(kind)
    torch.manual_seed(seed)
    prefixes = [torch.randn(n, D) for n in lengths]
    rows = torch.tensor([r % len(lengths) for r in rows])
    windows = torch.randn(rows.shape[0], window, D)
    weights = torch.randn(rows.shape[0], A, DA)
    params = list(model.parameters())
    batched = model.chunks_after_windows(torch.nn.utils.rnn.pad_sequence(prefixes, batch_first=True),
                                         torch.tensor(lengths), windows, rows)
    assert batched.shape == (rows.shape[0], A, DA)
    grads = torch.autograd.grad((weights * batched).sum(), params, allow_unused=True)
    streamed = torch.stack([model.predict(model.extend(windows[s : s + 1], model.prefill(prefixes[r][None])))[0]
                            for s, r in enumerate(rows.tolist())])
    torch.testing.assert_close(batched, streamed, atol=2e-5, rtol=1e-4)
    # ... which is also the full sequence [prefix, window, queries] from zero state.
    full = torch.stack([model(torch.cat([prefixes[r], windows[s]])[None])[0] for s, r in enumerate(rows.tolist())])
    torch.testing.assert_close(batched, full, atol=2e-5, rtol=1e-4)
    expected = torch.autograd.grad((weights * streamed).sum(), params, allow_unused=True)
    _assert_same_gradients(model, grads, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_stream_predicts_from_queries_alone(kind):
    model = _model(kind)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(None, batch=2), model(torch.zeros(2, 0, D)))


def test_transformer_prefill_in_pieces_equals_one_piece(monkeypatch):
    model = _model("transformer")
    with torch.no_grad():
        prompt = _prompt(model, [12, 7])
        whole = model.predict(model.prefill(prompt))
        monkeypatch.setattr(icil, "TRANSFORMER_PREFILL_CHUNK", 5)
        pieces = model.prefill(prompt)
        assert pieces.length == prompt.shape[1]
        torch.testing.assert_close(model.predict(pieces), whole, atol=2e-5, rtol=1e-4)


def test_mamba_state_is_flat_and_transformer_cache_grows():
    sizes = {}
    with torch.no_grad():
        for kind in KINDS:
            model = _model(kind)
            short, long = model.prefill(_prompt(model, [2])), model.prefill(_prompt(model, [40]))
            sizes[kind] = (short.nbytes(), long.nbytes())
    assert sizes["mamba"][0] == sizes["mamba"][1]
    # Keys and values of 2 layers: 2 * 2 * D floats per token.
    assert sizes["transformer"][1] - sizes["transformer"][0] == (81 - 5) * 2 * 2 * D * 4


def test_demo_tokens_interleave_observations_and_actions():
    model = _model("mamba")
    obs, actions = torch.randn(1, 3, D), torch.randn(1, 3, DA)
    with torch.no_grad():
        tokens = model.demo_tokens(obs, actions)
        assert tokens.shape == (1, 7, D)
        torch.testing.assert_close(tokens[0, 0], obs[0, 0] + model.type_emb[0])
        torch.testing.assert_close(tokens[0, 3], model.action_in(actions[0, 1]) + model.type_emb[1])
        torch.testing.assert_close(tokens[0, 6], model.type_emb[2])


def test_mamba_output_depends_on_order_without_positions():
    # No positional embedding: order must still matter (causal conv + selective scan).
    model = _model("mamba")
    with torch.no_grad():
        x = torch.randn(1, 6, D)
        assert not torch.allclose(model(x), model(x.flip(1)), atol=1e-4)


def test_sinusoidal_positions_do_not_depend_on_where_a_piece_starts():
    whole = sinusoidal_positions(0, 50, 6, torch.device("cpu"))
    torch.testing.assert_close(sinusoidal_positions(17, 9, 6, torch.device("cpu")), whole[17:26])
    assert whole.shape == (50, 6) and not torch.allclose(whole[3], whole[4])
    per_row = sinusoidal_positions(torch.tensor([17, 0, 40]), 9, 6, torch.device("cpu"))
    assert per_row.shape == (3, 9, 6)
    torch.testing.assert_close(per_row, torch.stack([whole[17:26], whole[0:9], whole[40:49]]), atol=0, rtol=0)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="mamba"):
        ICILSequence("lstm", d_model=D, n_layers=1, action_dim=DA, n_actions=A)


def test_transformer_buffer_keeps_every_state_valid(monkeypatch):
    # Tiny headroom and prefill pieces: buffers grow, copy and split pieces on almost every call.
    monkeypatch.setattr(icil, "BUFFER_HEADROOM", 1)
    monkeypatch.setattr(icil, "TRANSFORMER_PREFILL_CHUNK", 3)
    model = _model("transformer")
    torch.manual_seed(2)
    with torch.no_grad():
        prompt = _prompt(model, [4, 2])
        frames = model.live_tokens(torch.randn(1, 6, D))
        other = model.live_tokens(torch.randn(1, 2, D))
        states = [model.prefill(prompt)]
        for t in range(6):
            states.append(model.extend(frames[:, t : t + 1], states[-1]))
        # Branch from old states (a new episode from the prompt, a retry from step 2).
        branch = model.extend(other, states[0])
        retry = model.extend(other[:, :1], states[2])
        for t, state in enumerate(states):
            torch.testing.assert_close(model.predict(state), model(torch.cat([prompt, frames[:, :t]], dim=1)), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model.predict(branch), model(torch.cat([prompt, other], dim=1)), atol=2e-5, rtol=1e-4)
        expected = model(torch.cat([prompt, frames[:, :2], other[:, :1]], dim=1))
        torch.testing.assert_close(model.predict(retry), expected, atol=2e-5, rtol=1e-4)


def test_transformer_training_path_matches_the_buffer_path():
    model = _model("transformer")
    prompt = _prompt(model, [5]).detach()
    frame = model.live_tokens(torch.randn(1, 1, D)).detach()
    with torch.no_grad():
        buffered = model.predict(model.extend(frame, model.prefill(prompt)))
    state = model.extend(frame, model.prefill(prompt))  # autograd on: immutable caches
    assert not isinstance(state.layers, icil.KVBuffer)
    out = model.predict(state)
    torch.testing.assert_close(out.detach(), buffered, atol=2e-5, rtol=1e-4)
    out.sum().backward()
    assert model.queries.grad is not None


@settings(max_examples=30, deadline=None)
@given(frames=st.integers(1, 12), heads=st.sampled_from([1, 2, 4]), hidden=st.sampled_from([0, 6]),
       seed=st.integers(0, 2**16))
def test_prompt_summary_pools_the_frames_whatever_their_order(frames, heads, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    summary = PromptSummary(5, 8, heads, hidden)
    with torch.no_grad():
        summary.query.normal_(generator=g)
        x = torch.randn(frames, 5, generator=g)
        out = summary(x)
        torch.testing.assert_close(summary(x[torch.randperm(frames, generator=g)]), out, atol=1e-6, rtol=1e-5)
        # Each head's channels are an attention-weighted mean of the frames' values: inside their
        # per-channel range.
        values = summary.value(x)
        assert (out >= values.min(dim=0).values - 1e-5).all() and (out <= values.max(dim=0).values + 1e-5).all()
        assert torch.equal(summary(torch.zeros(0, 5)), torch.zeros(8))  # an empty prompt
        if heads == 1 and hidden == 0:  # the single-query form of checkpoints before heads
            weights = (summary.key(x) @ summary.query / math.sqrt(8)).softmax(dim=0)
            torch.testing.assert_close(out, weights @ values, atol=1e-6, rtol=1e-5)


def test_prompt_summary_heads_weigh_the_frames_each_by_their_own_query():
    # Two heads: the first head's query picks frame 0, the second's frame 1 (keys = the frames).
    summary = PromptSummary(2, 2, heads=2)
    with torch.no_grad():
        summary.key.weight.copy_(torch.eye(2))
        summary.key.bias.zero_()
        summary.value.weight.copy_(torch.eye(2))
        summary.value.bias.zero_()
        summary.query.copy_(torch.tensor([50.0, 50.0]))
        frames = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
        out = summary(frames)
    # Head 0 reads channel 0 of the frame whose key channel 0 is high (frame 0), head 1 channel 1
    # of frame 1: both 1. One query over both channels scores the two frames alike and gives 0, 0.
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="divisible"):
        PromptSummary(2, 6, heads=4)
