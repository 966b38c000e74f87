"""Tests of mail_ros.model.mamba.Mamba and its PyTorch selective scan.

Oracles: ``mambapy`` (an independent pure-PyTorch Mamba whose mixer loads a mamba_ssm
state_dict) for the layer in float32, and the plain sequential recurrence below (in this file
only, so the library keeps one scan) for the scan and, in float64, for the whole layer.
"""

from __future__ import annotations

import importlib.abc
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cuda_kernels import mamba_kernels_skip_reason
from mail_ros.model.mamba import BACKEND_CPU, BACKEND_TORCH, Mamba, mamba_backend
from mail_ros.model.selective_scan import CPU_BLOCK_BYTES, selective_scan, selective_state_step

torch.set_num_threads(1)

TOL = {torch.float32: 1e-5, torch.float64: 1e-11}

# (B, L, d_model, d_state, d_conv, expand): L = 1, L below d_conv, L not a multiple of any
# chunk length, L longer than the GPU chunk.
CONFIGS = [
    (2, 1, 16, 4, 4, 2),
    (1, 3, 16, 16, 4, 2),
    (3, 37, 32, 8, 3, 2),
    (2, 70, 16, 16, 4, 1),
    (1, 130, 24, 4, 2, 2),
]


def sequential_scan(u, delta, A, B, C, D, h0=None):
    """The recurrence one step at a time: the test oracle. Shapes as selective_scan."""
    h = u.new_zeros(u.shape[0], A.shape[0], A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(u.shape[1]):
        decay = torch.exp(delta[:, t, :, None] * A)  # (B, E, N)
        h = decay * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(ys, dim=1), h


def reference_layer(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Mamba mixer written out directly on m's parameters, with the sequential scan."""
    length = x.shape[1]
    u, z = F.linear(x, m.in_proj.weight, m.in_proj.bias).chunk(2, dim=-1)
    u = F.conv1d(u.transpose(1, 2), m.conv1d.weight, m.conv1d.bias,
                 padding=m.d_conv - 1, groups=m.d_inner)[..., :length]
    u = F.silu(u.transpose(1, 2))
    dt, B, C = F.linear(u, m.x_proj.weight).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(F.linear(dt, m.dt_proj.weight, m.dt_proj.bias))
    y, _ = sequential_scan(u, delta, -torch.exp(m.A_log), B, C, m.D)
    return F.linear(y * F.silu(z), m.out_proj.weight, m.out_proj.bias)


def make_layer(d_model, d_state, d_conv, expand, dtype=torch.float32, seed=0, **kwargs) -> Mamba:
    """A layer with every parameter perturbed away from its structured initialisation."""
    torch.manual_seed(seed)
    m = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand, **kwargs)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.to(dtype)


def mambapy_mixer(m: Mamba):
    from mambapy.mamba import MambaBlock, MambaConfig

    config = MambaConfig(d_model=m.d_model, n_layers=1, d_state=m.d_state, d_conv=m.d_conv,
                         expand_factor=m.expand)
    mixer = MambaBlock(config)
    mixer.load_state_dict(m.state_dict(), strict=True)
    return mixer


# ---------------------------------------------------------------- parameters and state_dict


def test_parameter_names_and_shapes_match_mamba_ssm():
    m = Mamba(16, d_state=4, d_conv=3, expand=2)
    shapes = {name: tuple(p.shape) for name, p in m.state_dict().items()}
    assert shapes == {
        "A_log": (32, 4),
        "D": (32,),
        "in_proj.weight": (64, 16),
        "conv1d.weight": (32, 1, 3),
        "conv1d.bias": (32,),
        "x_proj.weight": (1 + 2 * 4, 32),
        "dt_proj.weight": (32, 1),
        "dt_proj.bias": (32,),
        "out_proj.weight": (16, 32),
    }
    biased = Mamba(40, dt_rank=5, conv_bias=False, bias=True)
    shapes = {name: tuple(p.shape) for name, p in biased.state_dict().items()}
    assert "conv1d.bias" not in shapes
    assert shapes["in_proj.bias"] == (160,) and shapes["out_proj.bias"] == (40,)
    assert shapes["x_proj.weight"] == (5 + 32, 80) and shapes["dt_proj.weight"] == (80, 5)
    assert Mamba(40).dt_rank == 3  # ceil(40 / 16)


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(64, d_state=8, dt_min=0.002, dt_max=0.05, dtype=torch.float64)
    assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32  # kept fp32
    assert m.in_proj.weight.dtype == torch.float64
    expected_a = torch.log(torch.arange(1, 9, dtype=torch.float32)).expand(128, 8)
    torch.testing.assert_close(m.A_log, expected_a, rtol=0, atol=0)
    assert torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-9) and dt.max() <= 0.05 * (1 + 1e-9)
    bound = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert m.dt_proj.bias._no_reinit and m.A_log._no_weight_decay and m.D._no_weight_decay
    constant = Mamba(64, dt_init="constant", dt_scale=2.0)
    assert torch.all(constant.dt_proj.weight == 2.0 * bound)
    floored = Mamba(16, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    torch.testing.assert_close(F.softplus(floored.dt_proj.bias), torch.full((32,), 1e-4))


def test_state_dict_round_trips_through_mambapy():
    m = make_layer(24, 8, 4, 2)
    mixer = mambapy_mixer(m)  # loads strictly
    back = Mamba(24, d_state=8)
    back.load_state_dict(mixer.state_dict(), strict=True)
    for name, value in m.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    x = torch.randn(2, 9, 24)
    assert torch.equal(back(x), m(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 0}, "d_model"),
        ({"d_model": 8, "d_state": 0}, "d_state"),
        ({"d_model": 8, "dt_rank": 0}, "dt_rank"),
        ({"d_model": 8, "dt_init": "normal"}, "dt_init"),
        ({"d_model": 8, "dt_min": 0.1, "dt_max": 0.01}, "dt_min"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba(**kwargs)


# ---------------------------------------------------------------- scan against the oracle


def random_scan_inputs(batch, length, channels, state, dtype, delta_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, channels, generator=g, dtype=dtype)
    delta = delta_scale * F.softplus(torch.randn(batch, length, channels, generator=g, dtype=dtype))
    A = -torch.exp(torch.randn(channels, state, generator=g, dtype=dtype))
    B = torch.randn(batch, length, state, generator=g, dtype=dtype)
    C = torch.randn(batch, length, state, generator=g, dtype=dtype)
    D = torch.randn(channels, generator=g, dtype=dtype)
    h0 = torch.randn(batch, channels, state, generator=g, dtype=dtype)
    return u, delta, A, B, C, D, h0


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 40),
    channels=st.integers(1, 5),
    state=st.integers(1, 4),
    chunk_len=st.one_of(st.none(), st.integers(1, 70)),
    with_h0=st.booleans(),
    delta_scale=st.sampled_from([1e-4, 1.0, 200.0]),
    seed=st.integers(0, 2**16),
)
def test_scan_matches_sequential_oracle(batch, length, channels, state, chunk_len, with_h0,
                                        delta_scale, seed):
    u, delta, A, B, C, D, h0 = random_scan_inputs(batch, length, channels, state, torch.float64,
                                                  delta_scale, seed)
    h0 = h0 if with_h0 else None
    y, last = selective_scan(u, delta, A, B, C, D, h0=h0, chunk_len=chunk_len)
    y_ref, last_ref = sequential_scan(u, delta, A, B, C, D, h0=h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, last_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_len", [None, 1, 5])
def test_blockwise_inference_scan_matches_the_oracle_and_the_autograd_path(chunk_len):
    # 2 * 64 * 16 float64 values per step: the no-grad path cuts L = 150 into several blocks.
    u, delta, A, B, C, D, h0 = random_scan_inputs(2, 150, 64, 16, torch.float64)
    assert 150 * u.shape[0] * 64 * 16 * 8 > 2 * CPU_BLOCK_BYTES
    with torch.no_grad():
        y, last = selective_scan(u, delta, A, B, C, D, h0=h0, chunk_len=chunk_len)
    y_ref, last_ref = sequential_scan(u, delta, A, B, C, D, h0=h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, last_ref, rtol=1e-12, atol=1e-12)
    y_grad, last_grad = selective_scan(u.requires_grad_(), delta, A, B, C, D, h0=h0, chunk_len=chunk_len)
    assert y_grad.requires_grad
    torch.testing.assert_close(y_grad.detach(), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last_grad.detach(), last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True])
def test_scan_states_at_are_the_states_of_the_prefixes(grad):
    # L = 150 of 2 x 64 x 16 float64: without autograd the scan runs in blocks, and the picked
    # steps (in no particular order, some twice) fall into several of them.
    u, delta, A, B, C, D, h0 = random_scan_inputs(2, 150, 64, 16, torch.float64)
    rows = torch.tensor([1, 0, 0, 1, 1, 0])
    steps = torch.tensor([149, 0, 77, 3, 3, 31])
    with torch.set_grad_enabled(grad):
        y, picked = selective_scan(u.requires_grad_(grad), delta, A, B, C, D, h0=h0, states_at=(rows, steps))
    y_ref, _ = sequential_scan(u.detach(), delta, A, B, C, D, h0=h0)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-12, atol=1e-12)
    assert picked.shape == (6, 64, 16) and picked.requires_grad == grad
    for state, r, t in zip(picked, rows.tolist(), steps.tolist()):
        _, last = sequential_scan(*(x[r : r + 1, : t + 1] for x in (u.detach(), delta)), A,
                                  B[r : r + 1, : t + 1], C[r : r + 1, : t + 1], D, h0=h0[r : r + 1])
        torch.testing.assert_close(state.detach(), last[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="steps in"):
        selective_scan(u.detach(), delta, A, B, C, D, states_at=(rows, steps + 1))


@pytest.mark.parametrize("with_states", [False, True])
def test_layer_states_at_equal_the_states_of_each_prefix_with_gradients(with_states):
    m = make_layer(16, 4, 4, 2, dtype=torch.float64)
    x = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    start = m.allocate_inference_cache(3, dtype=torch.float64) if with_states else (None, None)
    if with_states:
        start = tuple(torch.randn_like(s) for s in start)
    rows = torch.tensor([2, 0, 1, 2, 0])
    ends = torch.tensor([10, 1, 4, 3, 7])
    y, conv, ssm = m.forward_with_state(x, *start, states_at=(rows, ends))
    torch.testing.assert_close(y, m.forward_with_state(x, *start)[0], rtol=1e-11, atol=1e-11)
    weights = torch.randn(5, 1, 1, dtype=torch.float64), torch.randn(5, 1, 1, dtype=torch.float64)
    params = [x, *m.parameters()]
    grads = torch.autograd.grad((weights[0] * conv).sum() + (weights[1] * ssm).sum(), params, allow_unused=True)
    # Reference: each prefix run on its own, its final states.
    loss = 0
    for s, (r, e) in enumerate(zip(rows.tolist(), ends.tolist())):
        initial = (None, None) if not with_states else (start[0][r : r + 1], start[1][r : r + 1])
        _, conv_ref, ssm_ref = m.forward_with_state(x[r : r + 1, :e], *initial)
        torch.testing.assert_close(conv[s], conv_ref[0], rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(ssm[s], ssm_ref[0], rtol=1e-11, atol=1e-11)
        loss = loss + (weights[0][s] * conv_ref[0]).sum() + (weights[1][s] * ssm_ref[0]).sum()
    for g, g_ref in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
        if g_ref is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="ends in"):
        m.forward_with_state(x, states_at=(rows, ends - 1))
    with pytest.raises(ValueError, match="long tensors"):
        m.forward_with_state(x, states_at=(rows, ends.float()))


def test_scan_is_finite_and_accurate_in_float32_under_extreme_decay():
    # delta * A down to about -1e4 (decays underflow to 0) next to delta ~ 1e-4 (decay ~ 1, state
    # accumulates over the whole sequence): forms using exp(+cumsum) would overflow here.
    u, delta, A, B, C, D, h0 = random_scan_inputs(2, 300, 6, 4, torch.float64)
    delta[:, :, :3] *= 1e-4
    delta[:, :, 3:] *= 300.0
    y_ref, last_ref = sequential_scan(u, delta, A, B, C, D, h0=h0)
    for chunk_len in (1, 16, 64, 300):
        y, last = selective_scan(*(t.float() for t in (u, delta, A, B, C, D)), h0=h0.float(),
                                 chunk_len=chunk_len)
        assert torch.isfinite(y).all() and torch.isfinite(last).all()
        scale = y_ref.abs().max()
        assert (y.double() - y_ref).abs().max() <= 1e-5 * scale, chunk_len
        torch.testing.assert_close(last.double(), last_ref, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("chunk_len", [1, 3, 64])
def test_scan_gradients_pass_gradcheck(chunk_len):
    inputs = [t.requires_grad_() for t in random_scan_inputs(2, 7, 3, 2, torch.float64)]
    u, delta, A, B, C, D, h0 = inputs

    def scan(*args):
        return selective_scan(*args[:6], h0=args[6], chunk_len=chunk_len)

    assert torch.autograd.gradcheck(scan, tuple(inputs))


def test_state_step_matches_scan_and_updates_in_place():
    u, delta, A, B, C, D, h0 = random_scan_inputs(2, 5, 3, 4, torch.float64)
    y_ref, last_ref = sequential_scan(u, delta, A, B, C, D, h0=h0)
    state = h0.clone()
    for t in range(5):
        y = selective_state_step(state, u[:, t], delta[:, t], A, B[:, t], C[:, t], D)
        torch.testing.assert_close(y, y_ref[:, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, last_ref, rtol=1e-12, atol=1e-12)


def test_scan_rejects_bad_arguments():
    u, delta, A, B, C, D, _ = random_scan_inputs(1, 4, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="chunk_len"):
        selective_scan(u, delta, A, B, C, D, chunk_len=0)
    with pytest.raises(ValueError, match="at least one step"):
        selective_scan(u[:, :0], delta[:, :0], A, B[:, :0], C[:, :0], D)


# ---------------------------------------------------------------- layer parity


@pytest.mark.parametrize("batch, length, d_model, d_state, d_conv, expand", CONFIGS)
def test_layer_matches_mambapy_forward_and_gradients(batch, length, d_model, d_state, d_conv,
                                                     expand):
    m = make_layer(d_model, d_state, d_conv, expand)
    mixer = mambapy_mixer(m)
    x = torch.randn(batch, length, d_model)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = m(x_ours), mixer(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(y)
    (y * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    ref_params = dict(mixer.named_parameters())
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda text, name=name: f"grad of {name}: {text}")


@pytest.mark.parametrize("batch, length, d_model, d_state, d_conv, expand", CONFIGS)
def test_layer_matches_sequential_oracle_in_float64(batch, length, d_model, d_state, d_conv,
                                                    expand):
    m = make_layer(d_model, d_state, d_conv, expand, dtype=torch.float64, bias=True)
    x = torch.randn(batch, length, d_model, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y_ref = reference_layer(m, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *m.parameters()], grad_out)
    grads_ref = torch.autograd.grad(y_ref, [x, *m.parameters()], grad_out)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------- recurrent inference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, length, d_model, d_state, d_conv, expand", CONFIGS[:4])
def test_stepping_matches_full_sequence(dtype, batch, length, d_model, d_state, d_conv, expand):
    m = make_layer(d_model, d_state, d_conv, expand, dtype=dtype)
    x = torch.randn(batch, length, d_model, dtype=dtype)
    conv_state, ssm_state = m.allocate_inference_cache(batch)
    assert conv_state.shape == (batch, m.d_inner, d_conv) and conv_state.dtype == dtype
    assert ssm_state.shape == (batch, m.d_inner, d_state) and ssm_state.dtype == dtype
    with torch.no_grad():
        full = m(x)
        for t in range(length):
            y, conv_out, ssm_out = m.step(x[:, t:t + 1], conv_state, ssm_state)
            assert conv_out is conv_state and ssm_out is ssm_state  # updated in place
            torch.testing.assert_close(y[:, 0], full[:, t], rtol=TOL[dtype], atol=TOL[dtype])
        _, conv_final, ssm_final = m.forward_with_state(x)
    torch.testing.assert_close(conv_state, conv_final, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(ssm_state, ssm_final, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prefix", [1, 2, 9])
def test_prefill_then_step_reuses_a_fixed_prefix(dtype, prefix):
    m = make_layer(16, 8, 4, 2, dtype=dtype)
    x = torch.randn(2, prefix + 5, 16, dtype=dtype)
    with torch.no_grad():
        full = m(x)
        y_prefix, conv_state, ssm_state = m.forward_with_state(x[:, :prefix])
        torch.testing.assert_close(y_prefix, full[:, :prefix], rtol=TOL[dtype], atol=TOL[dtype])
        saved = conv_state.clone(), ssm_state.clone()
        for _ in range(2):  # e.g. two denoising steps over the same prefix
            conv, ssm = conv_state.clone(), ssm_state.clone()
            for t in range(prefix, x.shape[1]):
                y, _, _ = m.step(x[:, t:t + 1], conv, ssm)
                torch.testing.assert_close(y[:, 0], full[:, t], rtol=TOL[dtype], atol=TOL[dtype])
            # The suffix as one sequence from the same states, without copying them.
            y_rest, _, _ = m.forward_with_state(x[:, prefix:], conv_state, ssm_state)
            torch.testing.assert_close(y_rest, full[:, prefix:], rtol=TOL[dtype], atol=TOL[dtype])
            # ...and without computing the final states (a denoising step's continuation).
            y_rest = m(x[:, prefix:], conv_state, ssm_state)
            torch.testing.assert_close(y_rest, full[:, prefix:], rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(conv_state, saved[0]) and torch.equal(ssm_state, saved[1])


def test_continuation_is_differentiable_like_the_full_sequence():
    m = make_layer(16, 4, 4, 2, dtype=torch.float64)
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 12, 16, dtype=torch.float64)
    params = list(m.parameters())
    grads_full = torch.autograd.grad(m(x), [x, *params], grad_out)
    y1, conv_state, ssm_state = m.forward_with_state(x[:, :5])
    y2, _, _ = m.forward_with_state(x[:, 5:], conv_state, ssm_state)
    grads_split = torch.autograd.grad(torch.cat([y1, y2], dim=1), [x, *params], grad_out)
    for g, g_ref in zip(grads_split, grads_full):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


def test_inference_inputs_are_validated():
    m = Mamba(8, d_state=4)
    conv_state, ssm_state = m.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"\(B, L >= 1, 8\)"):
        m(torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match=r"\(B, L >= 1, 8\)"):
        m(torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="one token"):
        m.step(torch.randn(2, 2, 8), conv_state, ssm_state)
    with pytest.raises(ValueError, match="ssm_state must have shape"):
        m.step(torch.randn(2, 1, 8), conv_state, ssm_state[:1])
    with pytest.raises(ValueError, match="conv_state must have shape"):
        m.forward_with_state(torch.randn(2, 3, 8), conv_state[..., :2], ssm_state)
    with pytest.raises(ValueError, match="both conv_state and ssm_state"):
        m.forward_with_state(torch.randn(2, 3, 8), conv_state, None)
    with pytest.raises(ValueError, match="both conv_state and ssm_state"):
        m(torch.randn(2, 3, 8), None, ssm_state)
    with pytest.raises(ValueError, match="ssm_state must have shape"):
        m(torch.randn(2, 3, 8), conv_state, ssm_state[..., :2])


def test_allocate_inference_cache_honours_dtype_and_device():
    m = Mamba(8, d_state=4, d_conv=3)
    conv_state, ssm_state = m.allocate_inference_cache(5, dtype=torch.float64, device="cpu")
    assert conv_state.shape == (5, 16, 3) and ssm_state.shape == (5, 16, 4)
    assert conv_state.dtype == ssm_state.dtype == torch.float64
    assert not conv_state.any() and not ssm_state.any()


# ---------------------------------------------------------------- backends


class _ImportRecorder(importlib.abc.MetaPathFinder):
    """Records every attempt to import the CUDA-only packages, whether installed or not."""

    WATCHED = ("mamba_ssm", "causal_conv1d", "selective_scan_cuda")

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.WATCHED:
            self.attempts.append(fullname)
        return None


def test_cpu_never_imports_mamba_ssm():
    recorder = _ImportRecorder()
    sys.meta_path.insert(0, recorder)
    try:
        m = Mamba(16, d_state=4)
        x = torch.randn(2, 5, 16, requires_grad=True)
        m(x).sum().backward()
        _, conv_state, ssm_state = m.forward_with_state(x.detach())
        with torch.no_grad():
            m.step(x[:, :1].detach(), conv_state, ssm_state)
        # The CPU runs the fused kernel (test_model_cpu_kernel.py), never mamba_ssm.
        assert mamba_backend("cpu") == BACKEND_CPU
        assert mamba_backend(torch.device("cpu")) == BACKEND_CPU
        if not torch.cuda.is_available():
            assert mamba_backend("cuda") == BACKEND_TORCH
    finally:
        sys.meta_path.remove(recorder)
    assert recorder.attempts == []
    assert not [name for name in sys.modules if name.split(".")[0] in _ImportRecorder.WATCHED]


@pytest.mark.parametrize("use_fast_path", [True, False])
def test_cuda_kernels_match_cpu_scan(use_fast_path):
    reason = mamba_kernels_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    cpu = make_layer(32, 16, 4, 2, use_fast_path=use_fast_path)
    gpu = make_layer(32, 16, 4, 2, use_fast_path=use_fast_path).cuda()
    x = torch.randn(3, 41, 32)
    x_cpu, x_gpu = x.clone().requires_grad_(), x.cuda().requires_grad_()
    y_cpu, y_gpu = cpu(x_cpu), gpu(x_gpu)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    grad_out = torch.randn_like(y_cpu)
    (y_cpu * grad_out).sum().backward()
    (y_gpu * grad_out.cuda()).sum().backward()
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-4)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-4,
                                   msg=lambda text, name=name: f"grad of {name}: {text}")
    with torch.no_grad():
        _, conv_cpu, ssm_cpu = cpu.forward_with_state(x[:, :30])
        y_rest_cpu, _, _ = cpu.forward_with_state(x[:, 30:], conv_cpu, ssm_cpu)
        _, conv_gpu, ssm_gpu = gpu.forward_with_state(x[:, :30].cuda())
        torch.testing.assert_close(ssm_gpu.cpu(), ssm_cpu, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(conv_gpu.cpu(), conv_cpu, rtol=1e-4, atol=1e-4)
        y_rest_gpu, _, _ = gpu.forward_with_state(x[:, 30:].cuda(), conv_gpu, ssm_gpu)
        torch.testing.assert_close(y_rest_gpu.cpu(), y_rest_cpu, rtol=1e-4, atol=1e-4)
        # The continuation without final states (the fused path must not start from zeros).
        torch.testing.assert_close(gpu(x[:, 30:].cuda(), conv_gpu, ssm_gpu).cpu(), y_rest_cpu, rtol=1e-4, atol=1e-4)
        for t in range(30, 41):
            y_step, _, _ = gpu.step(x[:, t:t + 1].cuda(), conv_gpu, ssm_gpu)
            torch.testing.assert_close(y_step[:, 0].cpu(), y_cpu[:, t].detach(), rtol=1e-4,
                                       atol=1e-4)
