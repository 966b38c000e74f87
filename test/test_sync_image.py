"""Image conversion: every encoding with real arrays, row padding, byte order and each bad input."""

import array
import struct
import zlib

import cv2
import numpy as np
import pytest

from mail_ros.sync.image import (
    ImageConversionError,
    compressed_to_rgb,
    image_to_rgb,
    resize_rgb,
    rgb_to_image_fields,
)

H, W = 5, 7


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def padded(pixels: np.ndarray, pad: int) -> tuple[int, bytes]:
    """Row-padded message bytes of a (H, W[, C]) array, with garbage in the padding."""
    rows = pixels.reshape(pixels.shape[0], -1).view(np.uint8)
    step = rows.shape[1] + pad
    buf = np.full((rows.shape[0], step), 0xAB, np.uint8)
    buf[:, : rows.shape[1]] = rows
    return step, buf.tobytes()


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings(rgb, encoding, pad):
    alpha = np.full((H, W, 1), 77, np.uint8)
    pixels = {
        "rgb8": rgb,
        "bgr8": rgb[..., ::-1],
        "rgba8": np.concatenate([rgb, alpha], axis=2),
        "bgra8": np.concatenate([rgb[..., ::-1], alpha], axis=2),
    }[encoding]
    step, data = padded(np.ascontiguousarray(pixels), pad)
    out = image_to_rgb(encoding, H, W, step, data)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_mono8(rgb, encoding):
    grey = rgb[..., 0].copy()
    step, data = padded(grey, 1)
    out = image_to_rgb(encoding, H, W, step, data)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("bigendian", [False, True])
def test_mono16_scales_full_range(bigendian):
    values = np.array([[0, 257, 32768, 65535]], dtype=">u2" if bigendian else "<u2")
    step, data = padded(values, 2)
    out = image_to_rgb("mono16", 1, 4, step, data, is_bigendian=bigendian)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out == out[..., :1]).all()


def test_depth_16uc1_millimetres_fixed_range():
    mm = np.array([[0, 1000, 2000, 5000]], dtype="<u2")
    out = image_to_rgb("16UC1", 1, 4, 8, mm.tobytes(), depth_max=2.0)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 255])  # 1 m -> 127.5 rounds to even 128


def test_depth_32fc1_metres_invalid_to_zero():
    metres = np.array([[np.nan, np.inf, 0.5, 1.0]], dtype="<f4")
    out = image_to_rgb("32FC1", 1, 4, 16, metres.tobytes(), depth_max=1.0)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 128, 255])


def test_accepts_rclpy_and_rosbags_data_types(rgb):
    fields = rgb_to_image_fields(rgb)
    for data in (fields["data"], array.array("B", fields["data"]), np.frombuffer(fields["data"], np.uint8),
                 memoryview(fields["data"]), bytearray(fields["data"])):
        np.testing.assert_array_equal(image_to_rgb("rgb8", H, W, fields["step"], data), rgb)


def test_output_does_not_alias_message_buffer(rgb):
    data = bytearray(rgb.tobytes())
    out = image_to_rgb("rgb8", H, W, W * 3, data)
    data[0] ^= 0xFF
    assert out[0, 0, 0] == rgb[0, 0, 0]


def test_rgb_to_image_fields(rgb):
    fields = rgb_to_image_fields(rgb[:, ::2])  # non-contiguous input
    assert fields["encoding"] == "rgb8"
    assert (fields["height"], fields["width"], fields["step"]) == (H, 4, 12)
    assert isinstance(fields["data"], bytes) and len(fields["data"]) == H * 12


@pytest.mark.parametrize(
    "args,match",
    [
        (("yuv422", H, W, W * 2, bytes(H * W * 2)), "unsupported image encoding 'yuv422'"),
        (("rgb8", 0, W, W * 3, b""), "must be positive"),
        (("rgb8", H, W, W * 3 - 1, bytes(H * W * 3)), "step 20 is smaller than width"),
        (("mono16", H, W, W, bytes(H * W * 2)), "step 7 is smaller"),
        (("rgb8", H, W, W * 3, bytes(H * W * 3 - 1)), "expected step \\* height"),
        (("rgb8", H, W, W * 3, np.zeros(H * W * 3, np.float32)), "dtype float32"),
        (("rgb8", H, W, W * 3, array.array("H", [0] * (H * W * 3))), "1-byte elements"),
        (("rgb8", H, W, W * 3, [0] * (H * W * 3)), "bytes-like, got list"),
    ],
)
def test_bad_raw_images(args, match):
    with pytest.raises(ImageConversionError, match=match):
        image_to_rgb(*args)


def test_bad_depth_max():
    with pytest.raises(ImageConversionError, match="depth_max"):
        image_to_rgb("16UC1", 1, 1, 2, bytes(2), depth_max=0.0)


@pytest.mark.parametrize("ext,fmt", [(".png", "png"), (".jpg", "rgb8; jpeg compressed bgr8")])
def test_compressed_round_trip(ext, fmt):
    # Smooth gradient so JPEG stays close to the original.
    yy, xx = np.mgrid[0:32, 0:48]
    rgb = np.stack([xx * 5, yy * 7, np.full_like(xx, 200)], axis=2).astype(np.uint8)
    ok, encoded = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    out = compressed_to_rgb(fmt, encoded.tobytes())
    assert out.shape == rgb.shape and out.dtype == np.uint8
    tolerance = 0 if ext == ".png" else 12
    assert np.abs(out.astype(int) - rgb).max() <= tolerance


def test_compressed_grey_png_becomes_rgb():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    ok, encoded = cv2.imencode(".png", grey)
    out = compressed_to_rgb("png", np.frombuffer(encoded.tobytes(), np.uint8))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize(
    "fmt,data,match",
    [
        ("tiff", b"abc", "unsupported compressed image format"),
        ("16UC1; compressedDepth png", b"abc", "compressedDepth"),
        ("jpeg", b"", "no data"),
        ("jpeg", b"not a jpeg at all", "could not decode"),
    ],
)
def test_bad_compressed(fmt, data, match):
    with pytest.raises(ImageConversionError, match=match):
        compressed_to_rgb(fmt, data)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_png_declaring_a_huge_size_is_a_conversion_error():
    # 69 bytes whose header claims 60000 x 60000 RGB pixels: OpenCV raises cv2.error for these
    # instead of returning None; a camera node must see an invalid frame, not an exception.
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _png_chunk(b"IEND", b""))
    with pytest.raises(ImageConversionError, match=r"could not decode 69 bytes as 'png'"):
        compressed_to_rgb("png", bomb)


def test_resize_shrink_uses_area_average():
    img = np.zeros((4, 4, 3), np.uint8)
    img[::2, ::2] = 255  # one bright pixel per 2x2 block
    out = resize_rgb(img, (2, 2))
    assert out.shape == (2, 2, 3)
    np.testing.assert_allclose(out, 64, atol=1)  # area average 255 / 4, not a sampled 0 or 255


def test_resize_enlarge_and_identity(rgb):
    assert resize_rgb(rgb, (10, 14)).shape == (10, 14, 3)
    same = resize_rgb(rgb, (H, W))
    np.testing.assert_array_equal(same, rgb)
    assert same is not rgb


@pytest.mark.parametrize(
    "img,size,match",
    [
        (np.zeros((4, 4), np.uint8), (2, 2), "\\(H, W, 3\\) uint8"),
        (np.zeros((4, 4, 3), np.float32), (2, 2), "dtype float32"),
        (np.zeros((0, 4, 3), np.uint8), (2, 2), "must not be empty"),
        (np.zeros((4, 4, 3), np.uint8), (0, 2), "target size must be positive"),
    ],
)
def test_bad_resize(img, size, match):
    with pytest.raises(ImageConversionError, match=match):
        resize_rgb(img, size)
