"""Deterministic synthetic distribution shifts: corruptions of the test split at severities 1..5.

They are applied to batches of eval views of test images (after resize / centre crop) in [0, 1] pixel
space, before the channel conversion and normalisation, and clipped back to [0, 1]. Random corruptions draw
their noise from a key made of the example's index in the split, so every run sees the same images.
Severity parameters follow ImageNet-C (Hendrycks & Dietterich 2019) where it has the corruption; lengths in
pixels (blur sigma) scale with the image size, relative to a 32-pixel image.

Split names are 'shift/<corruption>-<severity>', e.g. 'shift/gaussian_noise-3'.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from soupjax.data import preprocessing

SEVERITIES = (1, 2, 3, 4, 5)
PREFIX = "shift/"

# corruption -> its parameter at severities 1..5
_PARAMS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise std (ImageNet-C)
    "gaussian_blur": (0.4, 0.6, 0.8, 1.0, 1.3),        # sigma in pixels at 32x32 (CIFAR-10-C-like)
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),            # remaining contrast (ImageNet-C)
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),           # added to every pixel (ImageNet-C)
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),            # fraction of the resolution kept (ImageNet-C)
    "rotate": (10.0, 20.0, 30.0, 45.0, 60.0),          # degrees; the sign alternates with the index
}
CORRUPTIONS = tuple(_PARAMS)
DEFAULT = ("gaussian_noise-3", "gaussian_blur-3", "contrast-3", "rotate-3")


def split_name(corruption: str, severity: int) -> str:
    return f"{PREFIX}{corruption}-{severity}"


def parse(split: str) -> tuple[str, int] | None:
    """'shift/contrast-3' -> ('contrast', 3); None if `split` is not a valid shift split name."""
    if not split.startswith(PREFIX):
        return None
    corruption, _, severity = split[len(PREFIX):].rpartition("-")
    if corruption not in _PARAMS or severity not in {str(s) for s in SEVERITIES}:
        return None
    return corruption, int(severity)


def apply(images: tf.Tensor, corruption: str, severity: int, index: tf.Tensor) -> tf.Tensor:
    """Corrupts a batch of float32 [b, H, W, C] images in [0, 1]; `index` [b] (each example's index in the
    split) keys any randomness, so an image is corrupted the same way in any batch."""
    p = _PARAMS[corruption][severity - 1]
    size, width = images.shape[1], images.shape[2]
    if corruption == "gaussian_noise":
        def noise(i):
            key = preprocessing.example_key(1000 * severity, preprocessing.SALT_SHIFT, i)
            return tf.random.stateless_normal(tf.shape(images)[1:], seed=key)

        images = images + p * tf.map_fn(noise, index, fn_output_signature=tf.float32)
    elif corruption == "gaussian_blur":
        images = _gaussian_blur(images, p * size / 32)
    elif corruption == "contrast":
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = (images - mean) * p + mean
    elif corruption == "brightness":
        images = images + p
    elif corruption == "pixelate":
        images = tf.image.resize(images, [max(1, round(size * p)), max(1, round(width * p))], method="area")
        images = tf.image.resize(images, [size, width], method="nearest")
    elif corruption == "rotate":
        sign = 1.0 - 2.0 * tf.cast(tf.math.floormod(index, 2), tf.float32)
        images = _rotate(images, sign * (p * math.pi / 180))
    else:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(CORRUPTIONS)}")
    return tf.clip_by_value(images, 0.0, 1.0)


def _gaussian_blur(images: tf.Tensor, sigma: float) -> tf.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma)**2)
    k /= k.sum()
    c = images.shape[-1]
    images = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    kh = tf.constant(np.tile(k.reshape(-1, 1, 1, 1), (1, 1, c, 1)))  # [k, 1, c, 1]
    kw = tf.constant(np.tile(k.reshape(1, -1, 1, 1), (1, 1, c, 1)))  # [1, k, c, 1]
    images = tf.nn.depthwise_conv2d(images, kh, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(images, kw, [1, 1, 1, 1], "VALID")


def _rotate(images: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
    """Rotates each image about its centre by `angle` [b] radians (bilinear, black outside the image)."""
    h, w = images.shape[1], images.shape[2]
    cos, sin = tf.cos(angle), tf.sin(angle)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    zero = tf.zeros_like(angle)
    # Output pixel (x, y) samples the input at R^-1 [(x, y) - centre] + centre.
    transforms = tf.stack([cos, sin, cx - cos * cx - sin * cy,
                           -sin, cos, cy + sin * cx - cos * cy, zero, zero], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.constant([h, w]),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
