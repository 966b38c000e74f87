"""DDPM schedule and sampler: cosine schedule facts, exact recovery with an oracle, clamping."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mail_ros.model.diffusion import CosineDDPM, TimeEmbedding, sinusoidal_embedding

torch.set_num_threads(1)


def test_cosine_schedule():
    ddpm = CosineDDPM(16)
    assert ddpm.betas.shape == (16,)
    assert (ddpm.betas <= 0.999).all() and (ddpm.betas > 0).all()
    assert (ddpm.alpha_bar[1:] < ddpm.alpha_bar[:-1]).all()
    s = 0.008
    f = lambda t: math.cos((t / 16 + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert math.isclose(ddpm.alpha_bar[3].item(), f(4) / f(0), rel_tol=1e-5)
    # The last beta hits the 0.999 clip, so alpha_bar at the end is ~0.
    assert math.isclose(ddpm.betas[-1].item(), 0.999, rel_tol=1e-6)


def _oracle(ddpm: CosineDDPM, x0: torch.Tensor):
    def predict_noise(x, t):
        return (x - ddpm.sqrt_alpha_bar[t] * x0) / ddpm.sqrt_one_minus_alpha_bar[t]

    return predict_noise


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_oracle_noise_prediction_recovers_x0(seed):
    ddpm = CosineDDPM(16)
    x0 = torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    out = ddpm.sample(_oracle(ddpm, x0), x0.shape, -torch.ones(3), torch.ones(3), torch.Generator().manual_seed(seed))
    assert torch.allclose(out, x0, atol=1e-4)


def test_x0_is_clamped_to_the_training_range():
    ddpm = CosineDDPM(16)
    x0 = torch.full((1, 4, 2), 5.0)
    out = ddpm.sample(_oracle(ddpm, x0), x0.shape, -torch.ones(2), torch.ones(2))
    assert torch.allclose(out, torch.ones_like(out), atol=1e-4)


def test_sampling_is_deterministic_under_a_generator():
    ddpm = CosineDDPM(16)
    noise_fn = lambda x, t: 0.1 * x  # noqa: E731
    lo, hi = -torch.ones(2), torch.ones(2)
    a = ddpm.sample(noise_fn, (1, 3, 2), lo, hi, torch.Generator().manual_seed(7))
    b = ddpm.sample(noise_fn, (1, 3, 2), lo, hi, torch.Generator().manual_seed(7))
    c = ddpm.sample(noise_fn, (1, 3, 2), lo, hi, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_add_noise_matches_the_closed_form():
    ddpm = CosineDDPM(16)
    x0, noise, t = torch.randn(3, 2, 2), torch.randn(3, 2, 2), torch.tensor([0, 7, 15])
    out = ddpm.add_noise(x0, noise, t)
    for i in range(3):
        ab = ddpm.alpha_bar[t[i]]
        assert torch.allclose(out[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * noise[i], atol=1e-6)


def test_time_embedding_shapes():
    emb = sinusoidal_embedding(torch.arange(16), 128)
    assert emb.shape == (16, 128) and torch.allclose(emb[0, 64:], torch.ones(64))
    mlp = TimeEmbedding(128)
    assert [m.__class__.__name__ for m in mlp.mlp] == ["Linear", "Mish", "Linear"]
    assert mlp.mlp[0].in_features == 128 and mlp.mlp[0].out_features == 256 and mlp.mlp[2].out_features == 128
    assert mlp(torch.arange(4)).shape == (4, 128)
