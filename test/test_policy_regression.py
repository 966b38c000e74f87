"""Saved reference outputs of the policy (weights, inputs and chunks stored), one per variant.

The file pins the numerics of the whole inference path (encoders, backbones, DDPM sampler,
normalisation), independent of how weights are initialised. After an INTENDED numerical
change, regenerate it and say why in the commit:

    .venv/bin/python test/test_policy_regression.py --regenerate
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mail_ros.policy.mail_policy import MaILPolicy
from mail_ros.policy.presets import get_preset
from mail_ros.spec import Observation

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data" / "policy_reference.safetensors"
# Every variant and both heads; resnet_width 2 keeps the stored weights small.
CASES = ["tiny-d_ma-ddpm", "tiny-ed_ma-bc", "tiny-d_tr-ddpm", "tiny-ed_tr-bc", "tiny-ed_ma-ddpm"]
OVERRIDES = {"vision.resnet_width": 2, "language.encoder": "reference-test", "language.dim": 6}
SEED = 17


def _policy(name):
    return MaILPolicy(get_preset(name, OVERRIDES))


def _history(images, joints):
    cameras = sorted(images)
    return [
        Observation(0.1 * t, {c: images[c][t].numpy() for c in cameras}, joints[t].numpy().astype(np.float64))
        for t in range(joints.shape[0])
    ]


def regenerate():
    tensors = {}
    for index, name in enumerate(CASES):
        torch.manual_seed(index)
        policy = _policy(name)
        with torch.no_grad():
            for param in policy.parameters():  # make zero-initialised tables matter
                param.add_(0.05 * torch.randn_like(param))
        policy.set_normalization(
            {"mean": np.linspace(-1, 1, 8), "std": np.linspace(0.5, 1.5, 8), "min": np.full(8, -3.0), "max": np.full(8, 3.0)},
            language_stats={"mean": np.linspace(-0.5, 0.5, 6), "std": np.full(6, 0.25), "min": np.full(6, -1.0), "max": np.full(6, 1.0)},
        )
        g = torch.Generator().manual_seed(100 + index)
        images = {c: torch.randint(0, 256, (policy.T, *policy.image_size, 3), dtype=torch.uint8, generator=g) for c in policy.cameras}
        joints = torch.randn(policy.T, policy.joint_dim, generator=g)
        language = torch.randn(6, generator=g)
        chunk = policy.predict_chunk(_history(images, joints), language.numpy(), seed=SEED)
        tensors.update({f"{name}/weights/{k}": v.contiguous() for k, v in policy.state_dict().items()})
        tensors.update({f"{name}/images/{c}": v for c, v in images.items()})
        tensors[f"{name}/joints"] = joints
        tensors[f"{name}/language"] = language
        tensors[f"{name}/chunk"] = torch.from_numpy(chunk)
    DATA.parent.mkdir(exist_ok=True)
    save_file(tensors, str(DATA))
    print(f"wrote {DATA} ({DATA.stat().st_size:,} bytes)")


@pytest.fixture(scope="module")
def reference():
    if not DATA.exists():
        pytest.fail(f"{DATA} is missing; regenerate with: .venv/bin/python test/test_policy_regression.py --regenerate")
    return load_file(str(DATA))


@pytest.mark.parametrize("name", CASES)
def test_matches_saved_reference(reference, name):
    policy = _policy(name)
    prefix = f"{name}/weights/"
    policy.load_state_dict({k[len(prefix):]: v for k, v in reference.items() if k.startswith(prefix)}, strict=True)
    images = {k.rsplit("/", 1)[1]: v for k, v in reference.items() if k.startswith(f"{name}/images/")}
    chunk = policy.predict_chunk(_history(images, reference[f"{name}/joints"]), reference[f"{name}/language"].numpy(), seed=SEED)
    np.testing.assert_allclose(chunk, reference[f"{name}/chunk"].numpy(), rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(__doc__)
    regenerate()
