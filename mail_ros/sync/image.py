"""The one conversion path from ROS image fields to (H, W, 3) uint8 RGB, for nodes, bags and replay.

Functions take plain message fields, so rclpy messages (``data`` is ``array.array('B')``),
rosbags messages (``data`` is a uint8 ndarray) and raw bytes all go through the same code.
rosbags-image is not used: its ``image_to_cvimage`` ignores ``step`` (rows padded by a driver are
silently read misaligned) and has no depth-to-8-bit rule, so wrapping it would still need the
row handling and scaling written here.

Conversion rules to 8-bit RGB:
* rgb8 / bgr8 / rgba8 / bgra8: channels reordered, alpha dropped.
* mono8 / 8UC1: the grey value copied into all three channels.
* mono16: intensity scaled by 255 / 65535 and rounded (65535 -> 255).
* 16UC1 (depth in millimetres, REP 118) and 32FC1 (depth in metres): a FIXED linear range
  ``[0, depth_max]`` metres maps to 0..255 and farther values saturate at 255; invalid readings
  (0, NaN, inf) become 0. The range is fixed rather than per image so that the same distance gives
  the same pixel value in every frame, in training and on the robot.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

__all__ = [
    "DEFAULT_DEPTH_MAX",
    "ENCODINGS",
    "ImageConversionError",
    "compressed_to_rgb",
    "image_to_rgb",
    "resize_rgb",
    "rgb_to_image_fields",
]

DEFAULT_DEPTH_MAX = 2.0  # metres; covers a table-top workspace seen from a mounted camera

# encoding -> (element dtype, channels)
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "8UC1": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
}


class ImageConversionError(ValueError):
    """Image fields or an image array that cannot be converted; the message says which field."""


def _as_bytes_array(data: Any) -> np.ndarray:
    """Message ``data`` (bytes-like or uint8 ndarray) as a flat uint8 array without copying."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageConversionError(f"image data must be uint8 bytes, got an array of dtype {data.dtype}")
        return data.reshape(-1)
    try:
        view = memoryview(data)
    except TypeError:
        raise ImageConversionError(f"image data must be bytes-like, got {type(data).__name__}") from None
    if view.itemsize != 1:
        raise ImageConversionError(f"image data must have 1-byte elements, got format {view.format!r}")
    return np.frombuffer(view, dtype=np.uint8)


def image_to_rgb(
    encoding: str,
    height: int,
    width: int,
    step: int,
    data: bytes | memoryview | np.ndarray,
    is_bigendian: bool = False,
    *,
    depth_max: float = DEFAULT_DEPTH_MAX,
) -> np.ndarray:
    """Fields of a ``sensor_msgs/Image`` to a new (H, W, 3) uint8 RGB array (rules in the module doc).

    ``step`` may include row padding; bytes after ``step * height`` are ignored.
    """
    if encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported image encoding {encoding!r}; supported: {sorted(ENCODINGS)}")
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"image height and width must be positive, got {height}x{width}")
    if not (math.isfinite(depth_max) and depth_max > 0):
        raise ImageConversionError(f"depth_max must be a positive number of metres, got {depth_max}")
    dtype, channels = ENCODINGS[encoding]
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is smaller than width * bytes per pixel = {width} * {channels * dtype.itemsize} "
            f"for encoding {encoding!r}"
        )
    raw = _as_bytes_array(data)
    if raw.size < step * height:
        raise ImageConversionError(
            f"image data has {raw.size} bytes, expected step * height = {step} * {height} = {step * height}"
        )
    rows = raw[: step * height].reshape(height, step)[:, :row_bytes]  # (H, row_bytes)
    order = ">" if is_bigendian else "<"
    pixels = np.ascontiguousarray(rows).view(dtype.newbyteorder(order)).reshape(height, width, channels)

    if encoding in ("rgb8", "rgba8"):
        return pixels[..., :3].copy()
    if encoding in ("bgr8", "bgra8"):
        return pixels[..., 2::-1].copy()
    if encoding in ("mono8", "8UC1"):
        grey = pixels[..., 0]
    elif encoding == "mono16":
        grey = np.rint(pixels[..., 0] * (255.0 / 65535.0)).astype(np.uint8)
    else:
        metres = pixels[..., 0].astype(np.float64)
        if encoding == "16UC1":
            metres /= 1000.0
        valid = np.isfinite(metres) & (metres > 0)
        scaled = np.clip(np.where(valid, metres, 0.0) * (255.0 / depth_max), 0.0, 255.0)
        grey = np.rint(scaled).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def compressed_to_rgb(format: str, data: bytes | memoryview | np.ndarray) -> np.ndarray:
    """A ``sensor_msgs/CompressedImage`` (JPEG or PNG) to an (H, W, 3) uint8 RGB array.

    ``format`` is the message field, e.g. ``"jpeg"`` or image_transport's
    ``"rgb8; jpeg compressed bgr8"``. compressedDepth payloads carry an extra header and are
    rejected.
    """
    lowered = format.lower()
    if "compresseddepth" in lowered:
        raise ImageConversionError(f"compressedDepth images are not supported (format {format!r})")
    if not any(codec in lowered for codec in ("jpeg", "jpg", "png")):
        raise ImageConversionError(f"unsupported compressed image format {format!r}; expected jpeg or png")
    raw = _as_bytes_array(data)
    if raw.size == 0:
        raise ImageConversionError(f"compressed image ({format!r}) has no data")
    try:
        bgr = cv2.imdecode(raw, cv2.IMREAD_COLOR)  # always 8-bit, 3-channel BGR
    except cv2.error as exc:
        # OpenCV raises rather than returning None for some malformed payloads, e.g. a header
        # declaring more pixels than it will allocate: still just a bad frame.
        reason = " ".join(str(exc).split())
        raise ImageConversionError(f"could not decode {raw.size} bytes as {format!r}: {reason}") from None
    if bgr is None:
        raise ImageConversionError(f"could not decode {raw.size} bytes as {format!r}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _check_rgb(img: Any, what: str) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", type(img).__name__)
        raise ImageConversionError(f"{what} must be an (H, W, 3) uint8 array, got shape {shape} dtype {dtype}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ImageConversionError(f"{what} must not be empty, got shape {img.shape}")
    return img


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to ``size = (H, W)``: area averaging when shrinking, else bilinear."""
    _check_rgb(img, "image to resize")
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"target size must be positive (H, W), got {tuple(size)}")
    if (height, width) == img.shape[:2]:
        return img.copy()
    shrinking = height <= img.shape[0] and width <= img.shape[1]
    # Area averaging avoids the aliasing of bilinear sampling when many pixels map to one.
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(img), (width, height), interpolation=interpolation)


def rgb_to_image_fields(img: np.ndarray) -> dict[str, Any]:
    """An (H, W, 3) uint8 RGB array as ``sensor_msgs/Image`` field values (encoding rgb8, no padding)."""
    _check_rgb(img, "image to publish")
    height, width, _ = img.shape
    return {
        "encoding": "rgb8",
        "height": height,
        "width": width,
        "step": width * 3,
        "is_bigendian": 0,
        "data": np.ascontiguousarray(img).tobytes(),
    }
