"""A tiny policy memorises a tiny synthetic dataset (loss falls at least 10x), BC and DDPM.

The tiny preset's 64x64 images are the smallest whose final ResNet map (2x2) still lets
SpatialSoftmax tell images apart (at 32x32 it is 1x1 and every image looks the same).
"""

import numpy as np
import pytest
import torch

from mail_ros.policy.mail_policy import MaILPolicy
from mail_ros.policy.presets import get_preset
from mail_ros.spec import Observation

torch.set_num_threads(1)


def _dataset(policy, samples=2, repeat=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = policy.image_size
    base = {
        "images": {c: torch.randint(0, 256, (samples, policy.T, H, W, 3), dtype=torch.uint8, generator=g) for c in policy.cameras},
        "joint_positions": torch.randn(samples, policy.T, policy.joint_dim, generator=g),
        "actions": 0.3 * torch.randn(samples, policy.A, policy.action_dim, generator=g) + 1.0,
    }
    stats = {"mean": np.full(policy.action_dim, 1.0), "std": np.full(policy.action_dim, 0.3)}
    stats |= {"min": stats["mean"] - 1.0, "max": stats["mean"] + 1.0}
    policy.set_normalization(stats)
    # Repeating the samples averages each gradient over several diffusion steps and noises.
    batch = {
        "images": {c: v.repeat(repeat, 1, 1, 1, 1) for c, v in base["images"].items()},
        "joint_positions": base["joint_positions"].repeat(repeat, 1, 1),
        "actions": base["actions"].repeat(repeat, 1, 1),
    }
    return base, batch


def _fixed_draw_loss(policy, batch):
    # Same diffusion steps and noises before and after training.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1234)
        policy.eval()
        loss = policy.compute_loss(batch)[0].item()
        policy.train()
    return loss


@pytest.mark.parametrize(
    "name,steps,lr", [("tiny-d_ma-bc", 120, 3e-3), ("tiny-ed_tr-bc", 120, 3e-3), ("tiny-d_ma-ddpm", 300, 5e-3)]
)
def test_tiny_policy_overfits(name, steps, lr):
    torch.manual_seed(0)
    policy = MaILPolicy(get_preset(name))
    base, batch = _dataset(policy)
    before = _fixed_draw_loss(policy, batch)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = policy.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _fixed_draw_loss(policy, batch)
    assert after < before / 10, f"{name}: loss {before:.4f} -> {after:.4f}"
    if name.endswith("-bc"):
        # The memorised chunk comes back through the inference path, in robot units.
        history = [
            Observation(0.1 * t, {c: base["images"][c][0, t].numpy() for c in policy.cameras}, base["joint_positions"][0, t].numpy())
            for t in range(policy.T)
        ]
        np.testing.assert_allclose(policy.predict_chunk(history), base["actions"][0].numpy(), atol=0.1)
