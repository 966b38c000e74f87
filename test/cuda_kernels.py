"""When the tests that hold mamba_ssm's CUDA kernels to the CPU reference can run."""

from __future__ import annotations

import torch

from mail_ros.model.mamba import BACKEND_CUDA, mamba_backend


def mamba_kernels_skip_reason() -> str | None:
    """None where a GPU and an importable mamba_ssm are there, else why the test is skipped."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if mamba_backend("cuda") != BACKEND_CUDA:
        return "mamba_ssm not importable (see the logged import error)"
    return None
