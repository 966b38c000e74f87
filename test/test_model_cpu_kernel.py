"""The fused CPU selective-scan kernel against the PyTorch reference scan and mambapy.

The kernel (mail_ros/model/selective_scan_cpu.c) runs float32 CPU inference; the reference
(mail_ros.model.selective_scan) runs whenever a gradient is needed, which is how the layer
tests below select it in the same process. The fallback tests start fresh interpreters with the
kernel's documented switches (CC, MAIL_ROS_CPU_KERNEL), so a real failed build is exercised.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.model.cpu_kernel import load_cpu_kernel
from mail_ros.model.mamba import BACKEND_CPU, Mamba, mamba_backend, mamba_backend_report
from mail_ros.model.mamba_stack import MambaStack
from mail_ros.model.selective_scan import selective_scan

torch.set_num_threads(1)

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def kernel():
    # cc is a prerequisite of the set-up (README), so on a machine that runs these tests the
    # kernel must build: a skip here would hide exactly the failure this file is for.
    loaded = load_cpu_kernel()
    assert loaded is not None, "the CPU kernel did not build; see the logged reason"
    return loaded


def scan_inputs(batch, length, channels, d_state, seed, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, channels, generator=g)
    dt = dt_scale * torch.randn(batch, length, channels, generator=g)
    dt_bias = torch.randn(channels, generator=g) - 2.0
    A = -torch.exp(torch.randn(channels, d_state, generator=g))
    B = torch.randn(batch, length, d_state, generator=g)
    C = torch.randn(batch, length, d_state, generator=g)
    D = torch.randn(channels, generator=g)
    z = torch.randn(batch, length, channels, generator=g)
    h0 = torch.randn(batch, channels, d_state, generator=g)
    return u, dt, dt_bias, A, B, C, D, z, h0


def reference(u, dt, dt_bias, A, B, C, D, z, h0):
    """What the Mamba layer computes around the reference scan."""
    y, last = selective_scan(u, F.softplus(dt + dt_bias), A, B, C, D, h0=h0)
    return (y if z is None else y * F.silu(z)), last


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.one_of(st.just(1), st.integers(2, 40), st.integers(300, 700)),
    channels=st.one_of(st.integers(1, 70), st.just(256)),
    d_state=st.sampled_from([1, 4, 8, 16]),
    gate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_scan(kernel, batch, length, channels, d_state, gate, seed):
    u, dt, dt_bias, A, B, C, D, z, h0 = scan_inputs(batch, length, channels, d_state, seed)
    z = z if gate else None
    y_ref, last_ref = reference(u, dt, dt_bias, A, B, C, D, z, h0)
    state = h0.clone()
    y = kernel.selective_scan(u, dt, dt_bias, A, B, C, D, z, state)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, last_ref, **TOL)


@pytest.mark.parametrize("seed", range(3))
def test_kernel_is_as_accurate_as_the_reference_under_large_steps(kernel, seed):
    # Step sizes up to ~30 make states large and y a cancelling sum of them: two float32
    # implementations then differ by more than 1e-5 in absolute terms. Both are measured
    # against the float64 reference instead; the kernel must be no less accurate.
    u, dt, dt_bias, A, B, C, D, z, h0 = scan_inputs(2, 64, 256, 16, seed, dt_scale=10.0)
    y_true, last_true = reference(*(t.double() for t in (u, dt, dt_bias, A, B, C, D, z, h0)))
    y_ref, last_ref = reference(u, dt, dt_bias, A, B, C, D, z, h0)
    state = h0.clone()
    y = kernel.selective_scan(u, dt, dt_bias, A, B, C, D, z, state)
    for ours, theirs, truth in ((y, y_ref, y_true), (state, last_ref, last_true)):
        error, reference_error = (ours.double() - truth).abs().max(), (theirs.double() - truth).abs().max()
        assert error <= 2 * reference_error + 1e-6, (error, reference_error)


def test_threads_split_the_work_without_changing_the_result(kernel):
    # The module runs on one torch thread; the OpenMP path (batch x channel blocks) must give the
    # same bits, since each block is computed the same way whichever thread runs it.
    # Sizes above both kernels' thresholds for forking (16 k state updates, 64 k conv taps).
    u, dt, dt_bias, A, B, C, D, z, h0 = scan_inputs(3, 60, 100, 16, seed=6)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            state, new_conv = h0.clone(), torch.empty(3, 100, 4)
            y = kernel.selective_scan(u, dt, dt_bias, A, B, C, D, z, state)
            conv = kernel.causal_conv_silu(u, None, dt[0, :4].T.contiguous(), dt_bias, new_conv)
            results.append((y, state, conv, new_conv))
        finally:
            torch.set_num_threads(1)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_kernel_takes_strided_rows_and_delta_as_given(kernel):
    # Row-strided views as the layer passes them (chunk of in_proj, split of x_proj).
    u, dt, dt_bias, A, B, C, D, z, h0 = scan_inputs(2, 9, 40, 8, seed=1)
    uz = torch.cat([u, z], dim=-1)
    u_view, z_view = uz.chunk(2, dim=-1)
    assert u_view.stride(1) == 80
    state = h0.clone()
    y = kernel.selective_scan(u_view, dt, dt_bias, A, B, C, D, z_view, state)
    y_ref, last_ref = reference(u, dt, dt_bias, A, B, C, D, z, h0)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, last_ref, **TOL)
    delta = F.softplus(dt)
    state = h0.clone()
    y = kernel.selective_scan(u, delta, None, A, B, C, None, None, state, dt_softplus=False)
    y_ref, last_ref = selective_scan(u, delta, A, B, C, torch.zeros(40), h0=h0)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, last_ref, **TOL)


def test_kernel_applies_the_low_rank_dt_projection_and_a_log(kernel):
    # The layer's call: dt (B, L, R) and B, C as strided views of one x_proj output, dt_proj's
    # weight (E, R) and A_log instead of A.
    u, _, dt_bias, A, _, _, D, z, h0 = scan_inputs(2, 13, 70, 16, seed=5)
    g = torch.Generator().manual_seed(5)
    x_dbl = torch.randn(2, 13, 5 + 2 * 16, generator=g)
    dt_low, B, C = x_dbl.split([5, 16, 16], dim=-1)
    weight = torch.randn(70, 5, generator=g) / 3
    state = h0.clone()
    y = kernel.selective_scan(u, dt_low, dt_bias, torch.log(-A), B, C, D, z, state, dt_weight=weight,
                              a_is_log=True)
    y_ref, last_ref = reference(u, F.linear(dt_low, weight), dt_bias, A, B, C, D, z, h0)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(state, last_ref, **TOL)
    with pytest.raises(ValueError, match="does not match"):
        kernel.selective_scan(u, dt_low, dt_bias, A, B, C, D, z, h0.clone())


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.one_of(st.just(1), st.integers(2, 70), st.integers(120, 200)),  # 64-step tiles
    channels=st.integers(1, 70),
    width=st.sampled_from([2, 3, 4]),
    with_state=st.booleans(),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_kernel_matches_torch_conv1d(kernel, batch, length, channels, width, with_state, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=g)
    state = torch.randn(batch, channels, width, generator=g) if with_state else None
    weight = torch.randn(channels, width, generator=g)
    bias = torch.randn(channels, generator=g) if with_bias else None
    # Reference: the conv inputs with their K - 1 predecessors, F.conv1d, silu.
    context = torch.zeros(batch, channels, width - 1) if state is None else state[..., 1:]
    window = torch.cat([context, x.transpose(1, 2)], dim=-1)  # (B, E, K - 1 + L)
    expected = F.silu(F.conv1d(window, weight[:, None], bias, groups=channels)).transpose(1, 2)
    new_state = torch.full((batch, channels, width), float("nan"))
    out = kernel.causal_conv_silu(x, state, weight, bias, new_state)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(new_state, window[..., -width:])
    if state is not None:  # in place, as Mamba.step uses it
        kernel.causal_conv_silu(x, state, weight, bias, state)
        torch.testing.assert_close(state, window[..., -width:])


def test_softplus_matches_torch_over_its_range(kernel):
    # One step with A = 0, u = B = 1 and a zero state leaves delta = softplus(dt) in the state;
    # one channel per value of dt.
    dt = torch.linspace(-60.0, 60.0, 6001).reshape(1, 1, -1)
    channels = dt.shape[-1]
    state = torch.zeros(1, channels, 1)
    kernel.selective_scan(torch.ones(1, 1, channels), dt, None, torch.zeros(channels, 1), torch.ones(1, 1, 1),
                          torch.zeros(1, 1, 1), None, None, state)
    torch.testing.assert_close(state[0, :, 0], F.softplus(dt[0, 0]), rtol=1e-6, atol=0.0)


def test_kernel_rejects_a_state_it_cannot_update_in_place(kernel):
    u, dt, dt_bias, A, B, C, D, z, h0 = scan_inputs(1, 3, 8, 4, seed=2)
    for bad in (h0.double(), h0.transpose(1, 2).contiguous().transpose(1, 2), h0[:, :4]):
        with pytest.raises(ValueError, match="state must be a contiguous float32"):
            kernel.selective_scan(u, dt, dt_bias, A, B, C, D, z, bad)


# ---------------------------------------------------------------- the layer: kernel, reference, mambapy


def make_layer(d_model, d_state, d_conv, seed) -> Mamba:
    torch.manual_seed(seed)
    m = Mamba(d_model, d_state=d_state, d_conv=d_conv)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def mambapy_outputs(m: Mamba, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """mambapy's parallel forward, and its recurrent step's ssm states after each token."""
    from mambapy.mamba import MambaBlock, MambaConfig

    config = MambaConfig(d_model=m.d_model, n_layers=1, d_state=m.d_state, d_conv=m.d_conv,
                         expand_factor=m.expand)
    mixer = MambaBlock(config)
    mixer.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        y = mixer(x)
        cache = (None, torch.zeros(x.shape[0], m.d_inner, m.d_conv - 1))
        states = []
        for t in range(x.shape[1]):
            _, cache = mixer.step(x[:, t], cache)
            states.append(cache[0].clone())
    return y, states


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(1, 2),
    prefix=st.integers(1, 40),
    steps=st.integers(1, 4),
    d_model=st.sampled_from([8, 24, 64]),
    d_state=st.sampled_from([8, 16]),
    d_conv=st.sampled_from([2, 4]),
    seed=st.integers(0, 2**16),
)
def test_layer_kernel_matches_reference_and_mambapy_with_state_handover(batch, prefix, steps, d_model,
                                                                        d_state, d_conv, seed):
    kernel_available = mamba_backend("cpu") == BACKEND_CPU
    assert kernel_available
    m = make_layer(d_model, d_state, d_conv, seed)
    x = torch.randn(batch, prefix + 2 * steps, d_model, generator=torch.Generator().manual_seed(seed))
    # Reference: gradients enabled (the training path) over the whole sequence.
    y_ref, _, last_ref = m.forward_with_state(x)
    y_ref, last_ref = y_ref.detach(), last_ref.detach()
    y_mambapy, states_mambapy = mambapy_outputs(m, x)
    torch.testing.assert_close(y_ref, y_mambapy, **TOL)
    with torch.no_grad():
        # Kernel: a prefill, a continuation of `steps` tokens, then one-token steps.
        y_pre, conv, ssm = m.forward_with_state(x[:, :prefix])
        torch.testing.assert_close(ssm, states_mambapy[prefix - 1], **TOL)
        y_cont, conv, ssm = m.forward_with_state(x[:, prefix:prefix + steps], conv, ssm)
        outputs = [y_pre, y_cont]
        for t in range(prefix + steps, x.shape[1]):
            y_step, conv, ssm = m.step(x[:, t:t + 1], conv, ssm)
            outputs.append(y_step)
            torch.testing.assert_close(ssm, states_mambapy[t], **TOL)
        torch.testing.assert_close(torch.cat(outputs, dim=1), y_ref, **TOL)
        torch.testing.assert_close(ssm, last_ref, **TOL)
        # forward() from given states (the denoising-step path) equals the continuation.
        _, conv_pre, ssm_pre = m.forward_with_state(x[:, :prefix])
        torch.testing.assert_close(m(x[:, prefix:], conv_pre, ssm_pre), y_ref[:, prefix:], **TOL)


def test_paper_size_layer_long_sequence_matches_reference():
    # The paper size: d_model 128 (E = 256 channels), d_state 16; L = 600.
    m = make_layer(128, 16, 4, seed=3)
    x = torch.randn(1, 600, 128, generator=torch.Generator().manual_seed(3))
    y_ref = m(x).detach()
    with torch.no_grad():
        y_pre, conv, ssm = m.forward_with_state(x[:, :599])
        y_last, _, _ = m.step(x[:, 599:], conv, ssm)
    torch.testing.assert_close(torch.cat([y_pre, y_last], dim=1), y_ref, **TOL)


def test_float64_and_training_run_the_reference():
    m = make_layer(16, 8, 4, seed=4).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
    assert y.dtype == torch.float64
    m = make_layer(16, 8, 4, seed=4)
    x = torch.randn(2, 7, 16, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m.A_log.grad is not None


# ---------------------------------------------------------------- the whole stack in one call


def make_stack(n_layers, d_model, d_state, d_conv, seed) -> MambaStack:
    torch.manual_seed(seed)
    stack = MambaStack(n_layers, d_model, d_state, d_conv)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return stack


def reference_stack(stack: MambaStack, x, states=None, memory=None):
    """The block-by-block PyTorch reference: gradients enabled, as in training (the parameters
    require grad), so neither the fused stack nor the per-layer kernels run."""
    assert all(p.requires_grad for p in stack.parameters())
    y, new_states = stack.extend(x, states, memory)
    return y.detach(), [(conv.detach(), ssm.detach()) for conv, ssm in new_states]


def assert_states_close(ours, theirs):
    assert len(ours) == len(theirs)
    for (conv, ssm), (conv_ref, ssm_ref) in zip(ours, theirs):
        torch.testing.assert_close(conv, conv_ref, **TOL)
        torch.testing.assert_close(ssm, ssm_ref, **TOL)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    prefix=st.one_of(st.just(1), st.integers(2, 40), st.integers(150, 260)),
    steps=st.integers(1, 12),
    n_layers=st.integers(1, 3),
    d_model=st.sampled_from([8, 24, 64, 128]),
    d_state=st.sampled_from([8, 16]),
    d_conv=st.sampled_from([2, 4]),
    with_memory=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_stack_matches_the_reference_with_state_handover(
    kernel, batch, prefix, steps, n_layers, d_model, d_state, d_conv, with_memory, seed
):
    stack = make_stack(n_layers, d_model, d_state, d_conv, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, prefix + 2 * steps + 1, d_model, generator=g)
    memory = torch.randn(x.shape, generator=g) if with_memory else None
    cut = prefix + steps

    def part(t, start, stop):
        return None if t is None else t[:, start:stop]

    y_ref, states_ref = reference_stack(stack, x, memory=memory)
    _, states_ref_prefix = reference_stack(stack, x[:, :prefix], memory=part(memory, 0, prefix))
    with torch.no_grad():
        # A prefill, a continuation (states handed over), then one-token steps.
        y_pre, states = stack.prefill(x[:, :prefix], memory=part(memory, 0, prefix))
        assert_states_close(states, states_ref_prefix)
        y_cont, states = stack.extend(x[:, prefix:cut], states, part(memory, prefix, cut))
        outputs = [y_pre, y_cont]
        for t in range(cut, x.shape[1]):
            y_step, states = stack.extend(x[:, t:t + 1], states, part(memory, t, t + 1))
            outputs.append(y_step)
        torch.testing.assert_close(torch.cat(outputs, dim=1), y_ref, **TOL)
        assert_states_close(states, states_ref)
        # A denoising step's call: continue a prefix without returning states, twice from the
        # same states (they must not be modified), and forward() over the whole sequence.
        _, prefix_states = stack.prefill(x[:, :prefix], memory=part(memory, 0, prefix))
        for _ in range(2):
            y_tail, none = stack.extend(x[:, prefix:], prefix_states, part(memory, prefix, None),
                                        return_states=False)
            assert none is None
            torch.testing.assert_close(y_tail, y_ref[:, prefix:], **TOL)
        torch.testing.assert_close(stack(x, memory), y_ref, **TOL)


def test_paper_size_fused_stack_long_prefill_matches_the_reference(kernel):
    # D-Ma's paper size: 16 layers of d_model 128 (E = 256), d_state 16; a T = 200 context, then
    # the 6 tokens of a denoising step.
    stack = make_stack(16, 128, 16, 4, seed=7)
    x = torch.randn(1, 207, 128, generator=torch.Generator().manual_seed(7))
    y_ref, states_ref = reference_stack(stack, x)
    with torch.no_grad():
        y_pre, states = stack.prefill(x[:, :201])
        y_step, states = stack.extend(x[:, 201:], states)
    torch.testing.assert_close(torch.cat([y_pre, y_step], dim=1), y_ref, **TOL)
    assert_states_close(states, states_ref)


def test_fused_stack_follows_weight_changes(kernel):
    # The packed weights are a cache: in-place updates (load_state_dict, optimiser and EMA
    # steps), replaced parameters and replaced storages must all be seen by the next call.
    stack, other = make_stack(2, 24, 8, 4, seed=1), make_stack(2, 24, 8, 4, seed=2)
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(3))

    def check():
        with torch.no_grad():
            y = stack(x)
        torch.testing.assert_close(y, reference_stack(stack, x)[0], **TOL)
        return y

    first = check()
    stack.load_state_dict(other.state_dict())
    assert not torch.allclose(check(), first)
    with torch.no_grad():
        stack.layers[1].mixer.out_proj.weight.mul_(0.5)  # as an EMA update does
        stack.layers[0].norm.bias.add_(0.1)  # unpacked tensors are read in place
    check()
    stack.load_state_dict(make_stack(2, 24, 8, 4, seed=4).state_dict(), assign=True)
    check()
    with torch.no_grad():
        stack.layers[0].mixer.in_proj.weight.data = torch.randn(96, 24)
    check()
    stack.layers[0].norm.eps = 1e-2
    check()
    twin = copy.deepcopy(stack)  # a copy packs its own weights, never points at the original's
    assert twin._packed is None
    with torch.no_grad():
        torch.testing.assert_close(twin(x), stack(x), rtol=0, atol=0)


def test_fused_stack_threads_split_the_work_without_changing_the_result(kernel):
    # Sizes above the projections' threshold for forking (1 M multiply-adds).
    stack = make_stack(2, 64, 16, 4, seed=5)
    x = torch.randn(2, 300, 64, generator=torch.Generator().manual_seed(5))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                y, states = stack.prefill(x)
            results.append([y, *(t for state in states for t in state)])
        finally:
            torch.set_num_threads(1)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_fused_stack_runs_only_for_float32_inference(kernel):
    stack = make_stack(2, 16, 8, 4, seed=6).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        y, states = stack.prefill(x)
    assert y.dtype == torch.float64 and states[0][1].dtype == torch.float64
    assert stack._packed is None
    stack = make_stack(2, 16, 8, 4, seed=6)
    x = torch.randn(1, 5, 16, requires_grad=True)
    stack(x).sum().backward()  # training: the reference, with gradients
    assert x.grad is not None and stack._packed is None
    with torch.no_grad():
        stack(x)
    assert stack._packed is not None


def test_fused_stack_rejects_mismatched_inputs(kernel):
    stack = make_stack(2, 16, 8, 4, seed=8)
    with torch.no_grad():
        _, states = stack.prefill(torch.randn(2, 5, 16))
        with pytest.raises(ValueError, match="expects x of shape"):
            stack.extend(torch.randn(2, 5, 15), states)
        with pytest.raises(ValueError, match="must have shape"):
            stack.extend(torch.randn(1, 5, 16), states)
        with pytest.raises(ValueError, match="states for 1 layers"):
            stack.extend(torch.randn(2, 5, 16), states[:1])
        with pytest.raises(ValueError, match="memory of shape"):
            stack.extend(torch.randn(2, 5, 16), states, memory=torch.randn(2, 4, 16))


# ---------------------------------------------------------------- selection and fallback


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env}, check=False,
    )


FALLBACK_PROBE = """
    import torch
    from mail_ros.model.mamba import BACKEND_TORCH, Mamba, mamba_backend, mamba_backend_report
    m = Mamba(16, d_state=8)
    with torch.no_grad():
        y = m(torch.randn(2, 5, 16))
    assert torch.isfinite(y).all()
    assert mamba_backend("cpu") == BACKEND_TORCH, mamba_backend("cpu")
    print("REPORT", mamba_backend_report("cpu"))
"""


def test_reports_the_cpu_kernel_when_it_builds():
    assert mamba_backend("cpu") == BACKEND_CPU
    assert mamba_backend_report("cpu") == BACKEND_CPU


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"CC": "/nonexistent/cc"}, "C compiler '/nonexistent/cc' not found"),
        # A real compiler whose compile fails (a forced include that does not exist).
        ({"CC": "cc -include mail_ros_no_such_header.h"}, "compiling selective_scan_cpu.c failed"),
        ({"MAIL_ROS_CPU_KERNEL": "0"}, "disabled by MAIL_ROS_CPU_KERNEL=0"),
    ],
)
def test_failed_or_disabled_kernel_falls_back_to_the_reference_with_a_reason(tmp_path, env, reason):
    out = _python(FALLBACK_PROBE, MAIL_ROS_KERNEL_CACHE=str(tmp_path / "cache"), **env)
    assert out.returncode == 0, out.stderr
    report = next(line for line in out.stdout.splitlines() if line.startswith("REPORT"))
    assert "PyTorch reference scan (CPU kernel unavailable: " in report and reason in report, report
    assert reason in out.stderr  # logged as a warning once
    assert out.stderr.count("CPU selective-scan kernel") == 1, out.stderr


def test_kernel_is_built_into_an_empty_cache_and_reused(tmp_path):
    cache = tmp_path / "cache"
    probe = """
        from mail_ros.model.cpu_kernel import load_cpu_kernel
        print("PATH", load_cpu_kernel().path)
    """
    first = _python(probe, MAIL_ROS_KERNEL_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    built = [p.name for p in cache.iterdir()]
    assert len(built) == 1 and built[0].startswith("selective_scan_cpu-") and built[0].endswith(".so")
    mtime = (cache / built[0]).stat().st_mtime_ns
    second = _python(probe, MAIL_ROS_KERNEL_CACHE=str(cache))
    assert second.returncode == 0, second.stderr
    assert [p.name for p in cache.iterdir()] == built and (cache / built[0]).stat().st_mtime_ns == mtime
