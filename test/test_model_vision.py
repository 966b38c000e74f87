"""Image encoders: SpatialSoftmax keypoints, pixel normalisation, per-camera and shared encoders."""

import torch

from mail_ros.model.vision import CameraEncoder, ObservationEncoder, SpatialSoftmax

torch.set_num_threads(1)


def test_spatial_softmax_finds_a_hot_pixel():
    pool = SpatialSoftmax(in_channels=1, num_keypoints=1, temperature=0.01)
    with torch.no_grad():
        pool.keypoints.weight.fill_(1.0)
        pool.keypoints.bias.zero_()
    feature = torch.zeros(1, 1, 5, 9)
    feature[0, 0, 4, 0] = 1.0  # bottom-left corner
    x, y = pool(feature)[0].tolist()
    assert abs(x + 1) < 1e-3 and abs(y - 1) < 1e-3


def test_spatial_softmax_output_is_32_keypoints_times_two():
    assert SpatialSoftmax(16, 32)(torch.randn(3, 16, 4, 4)).shape == (3, 64)


def test_camera_encoder_normalises_uint8_imagenet_style():
    encoder = CameraEncoder(feature_dim=8, resnet_width=4)
    gray = torch.full((1, 32, 32, 3), 124, dtype=torch.uint8)
    captured = {}

    def keep_input(module, args, out):
        captured["x"] = args[0]

    encoder.trunk.conv1.register_forward_hook(keep_input)
    encoder(gray)
    expected = (124 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(captured["x"][0, :, 0, 0], expected, atol=1e-6)


def test_observation_encoder_per_camera_and_shared():
    images = {name: torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8) for name in ("wrist", "agentview")}
    separate = ObservationEncoder(["wrist", "agentview"], d_model=16, feature_dim=8, resnet_width=4)
    shared = ObservationEncoder(["wrist", "agentview"], d_model=16, feature_dim=8, resnet_width=4, shared=True)
    assert separate.cameras == ("agentview", "wrist")
    assert set(separate.encoders) == {"agentview", "wrist"}
    assert separate.encode_sequence(images).shape == (2, 3, 16)
    assert shared.encode_sequence(images).shape == (2, 3, 16)
    n_sep = sum(p.numel() for p in separate.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_sep > n_shared
    # Per-step tokens do not depend on which other steps are in the batch.
    flat = {k: v[:, 1] for k, v in images.items()}
    assert torch.allclose(separate(flat), separate.encode_sequence(images)[:, 1], atol=1e-5)


def test_film_starts_as_the_plain_encoder_and_then_follows_the_condition():
    torch.manual_seed(0)
    # 64x64 without the stem pool: a 4x4 keypoint map (32x32 would give 1x1, constant keypoints).
    # Width 4 also guards the encoder's NCHW layout: with channels-last strides, the backward
    # pass of this trunk corrupted the heap (see CameraEncoder.pooled).
    plain = CameraEncoder(feature_dim=8, resnet_width=4, stem_pool=False)
    film = CameraEncoder(feature_dim=8, resnet_width=4, stem_pool=False, film_dim=5)
    film.load_state_dict({**film.state_dict(), **plain.state_dict()})
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    condition = torch.randn(3, 5)
    assert torch.allclose(film(images, condition), plain(images), atol=1e-6)  # zero-initialised FiLM
    with torch.no_grad():
        film.film.weight.normal_()
    out = film(images, condition)
    assert not torch.allclose(out, plain(images), atol=1e-3)
    assert not torch.allclose(out, film(images, -condition), atol=1e-3)
    # Gradients reach the FiLM layer, and a FiLM encoder refuses to run unconditioned.
    out.sum().backward()
    assert film.film.weight.grad.abs().sum() > 0
    try:
        film(images)
    except ValueError as exc:
        assert "condition" in str(exc)
    else:
        raise AssertionError("a FiLM encoder ran without its condition")


def test_film_condition_follows_each_sequence_and_camera():
    torch.manual_seed(0)
    images = {name: torch.randint(0, 256, (2, 3, 64, 64, 3), dtype=torch.uint8) for name in ("wrist", "agentview")}
    for shared in (False, True):
        encoder = ObservationEncoder(["wrist", "agentview"], d_model=16, feature_dim=8, resnet_width=4, shared=shared,
                                     stem_pool=False, film_dim=4)
        with torch.no_grad():
            for module in encoder.modules():
                if isinstance(module, CameraEncoder):
                    module.film.weight.normal_()
        condition = torch.randn(2, 4)
        tokens = encoder.encode_sequence(images, condition)
        for b in range(2):  # sequence b's frames are encoded under condition b
            flat = {k: v[b] for k, v in images.items()}
            assert torch.allclose(tokens[b], encoder(flat, condition[b].expand(3, -1)), atol=1e-5)


def test_pooled_then_projected_is_the_encoder():
    torch.manual_seed(0)
    images = {name: torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8) for name in ("wrist", "agentview")}
    for shared in (False, True):
        encoder = ObservationEncoder(["wrist", "agentview"], d_model=16, feature_dim=8, resnet_width=4,
                                     num_keypoints=6, shared=shared)
        assert encoder.pooled_dim == 2 * 12
        pooled = encoder.pooled(images)
        assert pooled.shape == (3, encoder.pooled_dim)
        torch.testing.assert_close(encoder.project(pooled), encoder(images))
        # The projections are not among the modules pooled() runs; everything else is.
        frozen = {id(p) for module in encoder.pooling_modules() for p in module.parameters()}
        projections = [p for name, p in encoder.named_parameters() if "proj" in name]
        assert frozen and not any(id(p) in frozen for p in projections)
        assert len(frozen) + len(projections) == len(list(encoder.parameters()))
