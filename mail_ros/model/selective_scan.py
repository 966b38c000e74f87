"""Mamba's selective scan in plain PyTorch: the backend for CPU and for CUDA without mamba_ssm.

The scan is the linear recurrence, per batch element, channel e and state index n,

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,     y_t = C_t . h_t + D * u_t,

written below as h_t = a_t * h_{t-1} + b_t with every term of shape (B, L, E, N) (B batch,
L sequence, E = d_inner channels, N = d_state).

Sequences are cut into chunks. Inside a chunk a Hillis-Steele scan composes the pairs (a, b)
in ceil(log2(chunk length)) vectorised passes; between chunks the last state is carried
sequentially. Numerics: the decays a are in (0, 1] and the scan only ever MULTIPLIES them, so
nothing can overflow and the products keep full relative precision. The tempting closed form
exp(S_t) * cumsum(exp(-S_s) * b_s), with S the cumulative log decay, overflows float32 as soon
as -S exceeds ~88 within a chunk, and differences S_t - S_s of two large cumulative sums lose
precision; neither is used.

Chunk length: on a GPU the cost is the number of sequential kernel launches, so chunks are
long. On CPU the scan is memory-bound and every Hillis-Steele pass re-reads the chunk, which
only pays off while a chunk fits in cache. Measured on the 2-core development CPU (E=256,
N=16, float32, one thread, scan of precomputed a, b only): B=1/L=200 takes 4.6 ms at chunk
length 1 (the plain sequential recurrence), 1.9 ms at 8, 1.7 ms at 16, 2.3 ms at 64; B=8/L=32
is fastest at length 1 (0.9 ms; 14.6 ms at 64) and so is B=256/L=16 (127 ms; 660 ms at 64).
The CPU default therefore sizes chunks by bytes (CPU_CHUNK_BYTES).

Inference (no gradient needed) never materialises the whole (B, L, E, N) terms: they are built,
scanned in place and contracted with C block by block (about CPU_BLOCK_BYTES per tensor on CPU,
whole chunks), carrying the state between blocks; the arithmetic is the same as the
full-sequence path. Measured on the same CPU (one thread, E=256, N=16, whole selective_scan call, best of
several runs): B=16/L=201 (the K=16 batched DDPM contexts at T=200) 120 ms -> 26 ms (blocks
of 256 KiB to 2 MiB: 24 to 32 ms), B=1/L=201 2.2 ms and B=1/L=6 0.10 ms either way.

Gradients come from a hand-written backward (the adjoint of the recurrence is the same
recurrence run backwards in time) so that autograd keeps only a and h, not every
intermediate of the log2(chunk_len) passes.
"""

from __future__ import annotations

import torch

__all__ = ["selective_scan", "selective_state_step"]

# Chunk lengths, from timings (see the module docstring). The scan is memory-bound on CPU:
# each Hillis-Steele pass re-reads the chunk, which pays only while the chunk stays in cache,
# so CPU chunks are sized to about CPU_CHUNK_BYTES (chunk length 1 is the sequential scan).
# On a GPU the number of sequential kernel launches dominates instead.
CPU_CHUNK_BYTES = 128 * 1024
CPU_MAX_CHUNK_LEN = 64
GPU_CHUNK_LEN = 64
# Inference (no autograd) builds the (B, L, E, N) terms per block of about this many bytes
# per tensor instead of for the whole sequence; see selective_scan.
CPU_BLOCK_BYTES = 512 * 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scan dtype: at least float32, as the decays of half-precision inputs underflow fast."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_len(device: torch.device, step_bytes: int) -> int:
    """Default chunk length: measured, see the module docstring."""
    if device.type != "cpu":
        return GPU_CHUNK_LEN
    chunk = 1
    while chunk < CPU_MAX_CHUNK_LEN and 2 * chunk * step_bytes <= CPU_CHUNK_BYTES:
        chunk *= 2
    return chunk


def _linear_scan(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk_len: int, overwrite: bool = False
) -> torch.Tensor:
    """States h_t = a_t * h_{t-1} + b_t for all t; a, b (B, L, E, N), h0 (B, E, N).

    ``overwrite=True`` scans in the caller's temporaries: the states are written into ``b``
    (which is returned) and ``a`` is clobbered, saving two copies per chunk.
    """
    length = a.shape[1]
    h = b if overwrite else torch.empty_like(b)
    carry = h0
    for start in range(0, length, chunk_len):
        stop = min(start + chunk_len, length)
        h_chunk = h[:, start:stop]  # (B, Q, E, N) view, scanned in place
        if not overwrite:
            h_chunk.copy_(b[:, start:stop])
        # Folding the carried state into the first step lets the chunk scan start from zero.
        h_chunk[:, 0].addcmul_(a[:, start], carry)
        # Decays are updated in place, only in chunks of more than 2 steps; the caller's are
        # copied first unless they may be clobbered.
        decay = a[:, start:stop]
        if stop - start > 2 and not overwrite:
            decay = decay.clone()
        offset = 1
        while offset < stop - start:
            # Hillis-Steele pass: afterwards each h_chunk[t] covers the 2 * offset steps up to t
            # and decay[t] their product. Right-hand sides are evaluated into new tensors first,
            # so the overlapping slices never alias; the last pass needs no decay update.
            h_chunk[:, offset:] += decay[:, offset:] * h_chunk[:, :-offset]
            if 2 * offset < stop - start:
                decay[:, offset:] = decay[:, offset:] * decay[:, :-offset]
            offset *= 2
        carry = h_chunk[:, -1]
    return h


class _LinearScanFn(torch.autograd.Function):
    """Autograd wrapper of :func:`_linear_scan` with the reverse-time adjoint as backward."""

    @staticmethod
    def forward(ctx, a, b, h0, chunk_len):
        h = _linear_scan(a, b, h0, chunk_len)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk_len = chunk_len
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        # g_t = dLoss/dh_t summed over all paths: g_t = grad_h_t + a_{t+1} * g_{t+1}, i.e. the
        # forward recurrence in reversed time with the decays shifted by one step.
        next_decay = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1)
        g = _linear_scan(
            next_decay.flip(1), grad_h.flip(1), torch.zeros_like(h0), ctx.chunk_len, overwrite=True
        ).flip(1)
        h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
        return g * h_prev, g, a[:, 0] * g[:, 0], None


def _block_len(device: torch.device, length: int, step_bytes: int, chunk_len: int) -> int:
    """Steps whose (B, L, E, N) terms are built at once when no gradient is needed: the whole
    sequence on a GPU, about CPU_BLOCK_BYTES per tensor (whole chunks) on CPU."""
    if device.type != "cpu":
        return length
    chunks = max(1, CPU_BLOCK_BYTES // (chunk_len * step_bytes))
    return min(length, chunks * chunk_len)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
    chunk_len: int | None = None,
    states_at: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the selective scan over a whole sequence, differentiable in every input.

    Args:
        u: (B, L, E) scan input (after the causal convolution and SiLU).
        delta: (B, L, E) positive step sizes (softplus already applied).
        A: (E, N) negative state matrix diagonal.
        B: (B, L, N) input projection per step.
        C: (B, L, N) output projection per step.
        D: (E,) skip connection.
        h0: (B, E, N) state before the first step; zeros when None.
        chunk_len: steps scanned in parallel before the sequential carry; None picks one
            for the device and size (the result does not depend on it beyond rounding).
        states_at: (rows (S,), steps (S,)) long: return the states h after step steps[s] of
            batch row rows[s] (S, E, N) instead of the last state (which is rows 0 .. B - 1 at
            step L - 1). The scan computes every state anyway; this only picks.

    Returns:
        y (B, L, E) in u's dtype, and the state after the last step (B, E, N) (or the picked
        states (S, E, N)) in the scan dtype (float32, or float64 for float64 inputs).
    """
    batch, length, channels = u.shape
    if length < 1:
        raise ValueError(f"selective_scan needs at least one step, got u of shape {tuple(u.shape)}")
    dtype = _compute_dtype(u.dtype)
    step_bytes = batch * channels * A.shape[1] * dtype.itemsize
    if chunk_len is None:
        chunk_len = _chunk_len(u.device, step_bytes)
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    u_, delta_, B_, C_ = (t.to(dtype) for t in (u, delta, B, C))
    A_ = A.to(dtype)
    carry = u_.new_zeros(batch, channels, A.shape[1]) if h0 is None else h0.to(dtype)
    # Autograd needs every state of the sequence at once. Without gradients the (B, L, E, N)
    # terms are built block by block instead, so on CPU they stay in cache (inference over long
    # or batched sequences is otherwise bound by memory traffic).
    inputs = (u, delta, A, B, C, D) + (() if h0 is None else (h0,))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    block = length if needs_grad else _block_len(u.device, length, step_bytes, chunk_len)
    if states_at is not None:
        at_rows, at_steps = states_at
        if at_rows.shape != at_steps.shape or at_rows.dim() != 1:
            raise ValueError(f"states_at needs rows and steps of one shape (S,), got {tuple(at_rows.shape)}, "
                             f"{tuple(at_steps.shape)}")
        if len(at_steps) and not (0 <= int(at_rows.min()) and int(at_rows.max()) < batch
                                  and 0 <= int(at_steps.min()) and int(at_steps.max()) < length):
            raise ValueError(f"states_at rows must be in [0, {batch}) and steps in [0, {length})")
        picked, order = [], []
    ys = []
    for start in range(0, length, block):
        steps = slice(start, start + block)
        delta_block = delta_[:, steps]  # (B, Q, E)
        a = torch.exp(delta_block.unsqueeze(-1) * A_)  # (B, Q, E, N)
        b = (delta_block * u_[:, steps]).unsqueeze(-1) * B_[:, steps].unsqueeze(2)  # (B, Q, E, N)
        if needs_grad:
            h = _LinearScanFn.apply(a, b, carry, chunk_len)
        else:
            h = _linear_scan(a, b, carry, chunk_len, overwrite=True)
        ys.append(torch.einsum("bqen,bqn->bqe", h, C_[:, steps]))  # (B, Q, E)
        carry = h[:, -1]
        if states_at is not None:
            inside = ((at_steps >= start) & (at_steps < start + h.shape[1])).nonzero().squeeze(1)
            picked.append(h[at_rows[inside], at_steps[inside] - start])  # (S', E, N)
            order.append(inside)
    y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]
    y = y + D.to(dtype) * u_
    if states_at is not None:
        # Blocks pick in step order; put the states back in the caller's order.
        carry = picked[0] if len(picked) == 1 else torch.cat(picked)[torch.argsort(torch.cat(order))]
    return y.to(u.dtype), carry


def selective_state_step(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
) -> torch.Tensor:
    """Advance the scan by one step, updating ``state`` IN PLACE; returns y.

    Args:
        state: (B, E, N) state, overwritten with the new state (keeps its own dtype).
        u, delta: (B, E) input and positive step size of this step.
        A: (E, N); B, C: (B, N); D: (E,).

    Returns:
        y (B, E) in u's dtype.
    """
    dtype = _compute_dtype(u.dtype)
    u_, delta_ = u.to(dtype), delta.to(dtype)
    decay = torch.exp(delta_.unsqueeze(-1) * A.to(dtype))  # (B, E, N)
    drive = (delta_ * u_).unsqueeze(-1) * B.to(dtype).unsqueeze(1)  # (B, E, N)
    new_state = decay * state.to(dtype) + drive
    state.copy_(new_state)
    y = torch.einsum("ben,bn->be", new_state, C.to(dtype)) + D.to(dtype) * u_
    return y.to(u.dtype)
