"""RandAugment (Cubuk et al. 2020) as TensorFlow ops for tf.data, stateless: uint8 [h, w, c] in and out.

The op list, the magnitude scale and the pixel arithmetic are torchvision's ``RandAugment`` on uint8
tensors (``torchvision.transforms.RandAugment``, tensor path): N times, an op drawn uniformly from the 14
below, at magnitude bin M of ``num_bins`` (31: bin 30 is each op's strongest), its sign drawn at random
where the op has one; nearest-neighbour geometry with fill 0. ``tests/test_randaugment.py`` compares
every op, at every sign, with torchvision's functional ops.

Every random choice (which ops, which signs) comes from the ``key`` the caller gives (an int64 [2]
stateless-RNG key, see ``preprocessing.example_key``), so an example is augmented identically whenever
it is read, which is what makes a resumed run bit-identical to an uninterrupted one.

This is torchvision's RandAugment, not timm's, whose ``rand-mM-nN`` strings the released model-soups
runs record. timm applies each drawn op with probability 1/2, draws from a list without Identity but
with Invert and SolarizeAdd, reads M on a 0..10 scale (clipped at 10), and scales its enhancement ops
(factor 0.1 + 0.18 M, unsigned) and Posterize its own way; its geometric ops and Solarize reach the
same strengths as bin 3 min(M, 10) of the 31 here.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from soupjax.cli.errors import InputError
from soupjax.data import preprocessing as pp

# torchvision's order (its _augmentation_space): the op drawn is OPS[uniform integer in [0, 14)].
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
       "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                    "Contrast", "Sharpness"})
NUM_BINS = 31  # torchvision's num_magnitude_bins
DEFAULT_MAGNITUDE = 9  # torchvision's default M (its default N, 2, is not soupjax's: off unless asked)
# The strongest magnitude of each op with a linear scale (bin num_bins - 1); Translate's is a fraction of
# the image side (150/331, from the original ImageNet policy's 150 px at 331 px).
_STRONGEST = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0, "TranslateY": 150.0 / 331.0,
              "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}


def _linspace32(start: float, end: float, steps: int) -> np.ndarray:
    """``steps`` evenly spaced float32 values from ``start`` to ``end``, computed in float64 and rounded once
    (exact for the half-integer pixel centres it is used for, as torch.linspace's are)."""
    return np.linspace(start, end, steps, dtype=np.float64).astype(np.float32)


def magnitude(op: str, bin_index: int, num_bins: int = NUM_BINS, hw: tuple[int, int] = (224, 224)) -> float:
    """The unsigned magnitude of ``op`` at ``bin_index`` of ``num_bins`` for an image of ``hw`` = (h, w):
    a shear, a translation in pixels, degrees, an enhancement's departure from 1, posterize's bits,
    solarize's threshold; 0 for the ops without one."""
    if not 0 <= bin_index < num_bins:
        raise ValueError(f"magnitude bin {bin_index} is outside 0..{num_bins - 1}")
    if op in ("Identity", "AutoContrast", "Equalize"):
        return 0.0
    if op == "Posterize":  # 8 bits at bin 0 down to 4 at the last, rounded half to even
        return float(8 - int(np.round(bin_index / ((num_bins - 1) / 4))))
    if op == "Solarize":
        return 255.0 * (1.0 - bin_index / (num_bins - 1))
    top = _STRONGEST[op]
    if op == "TranslateX":
        top *= hw[1]
    elif op == "TranslateY":
        top *= hw[0]
    return top * bin_index / (num_bins - 1)


# --------------------------------------------------------------------------------------- geometry


def _inverse_affine(center: tuple[float, float], angle: float, translate: tuple[float, float],
                    shear: tuple[float, float]) -> list[float]:
    """The 2x3 map from output to input coordinates (pixel units, origin at the image centre) of the
    transform 'move the origin to `center`, rotate by `angle` and shear by `shear` (degrees), move back,
    translate', the convention of torchvision's affine (scale 1)."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    # The forward rotation-shear block [[a, b], [c, d]] has determinant 1; its inverse is [[d, -b], [-c, a]].
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    (cx, cy), (tx, ty) = center, translate
    m[2] = m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] = m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def _theta(op: str, mag: float, hw: tuple[int, int]) -> np.ndarray:
    """The inverse map of a geometric op as torch's affine grid uses it: float32 [6], its rows divided by
    the half sides (x by w / 2, y by h / 2)."""
    h, w = hw
    if op in ("ShearX", "ShearY"):  # about the top-left corner, as torchvision's RandAugment
        shear = math.degrees(math.atan(mag))
        matrix = _inverse_affine((-w * 0.5, -h * 0.5), 0.0, (0.0, 0.0),
                                 (shear, 0.0) if op == "ShearX" else (0.0, shear))
    elif op in ("TranslateX", "TranslateY"):  # whole pixels, truncated towards 0
        shift = float(int(mag))
        matrix = _inverse_affine((0.0, 0.0), 0.0, (shift, 0.0) if op == "TranslateX" else (0.0, shift),
                                 (0.0, 0.0))
    else:  # Rotate: counter-clockwise by `mag` degrees about the centre, the corners cut off
        matrix = _inverse_affine((0.0, 0.0), -mag, (0.0, 0.0), (0.0, 0.0))
    return (np.asarray(matrix, np.float32).reshape(2, 3) / np.array([[0.5 * w], [0.5 * h]], np.float32)).reshape(-1)


def _warp(image: tf.Tensor, theta: tf.Tensor) -> tf.Tensor:
    """Nearest-neighbour resampling of `image` [h, w, c] through `theta` (``_theta``), 0 outside.

    The arithmetic follows torch's affine grid and grid_sample (align_corners=False) in float32: pixel
    centres in centred coordinates, mapped, unnormalised, rounded half to even.
    """
    h, w = image.shape[0], image.shape[1]
    xs = tf.constant(_linspace32(-w * 0.5 + 0.5, w * 0.5 + 0.5 - 1, w))[None, :]
    ys = tf.constant(_linspace32(-h * 0.5 + 0.5, h * 0.5 + 0.5 - 1, h))[:, None]
    t = tf.unstack(theta)
    gx = xs * t[0] + ys * t[1] + t[2]
    gy = xs * t[3] + ys * t[4] + t[5]
    col = tf.round(((gx + 1.0) * float(w) - 1.0) / 2.0)  # tf.round: half to even, as nearbyint
    row = tf.round(((gy + 1.0) * float(h) - 1.0) / 2.0)
    inside = (col >= 0) & (col <= w - 1) & (row >= 0) & (row <= h - 1)
    index = tf.stack([tf.clip_by_value(tf.cast(row, tf.int32), 0, h - 1),
                      tf.clip_by_value(tf.cast(col, tf.int32), 0, w - 1)], axis=-1)
    return tf.where(inside[..., None], tf.gather_nd(image, index), tf.zeros_like(image))


# ------------------------------------------------------------------------------------------ colour


def _weights(mag: float) -> np.ndarray:
    """An enhancement's blend weights (1 + mag, 1 - (1 + mag)) as float32, each rounded from float64 as
    torch rounds the Python numbers it is given."""
    factor = 1.0 + mag
    return np.array([factor, 1.0 - factor], np.float32)


def _blend(image: tf.Tensor, other: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """weights[0] * image + weights[1] * other in float32, clipped and truncated to uint8 (torchvision's)."""
    out = weights[0] * tf.cast(image, tf.float32) + weights[1] * tf.cast(other, tf.float32)
    return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    """ITU-R 601 luma (torchvision's weights), truncated to uint8: [h, w, 1]."""
    r, g, b = tf.unstack(tf.cast(image, tf.float32), axis=-1)
    return tf.cast(0.2989 * r + 0.587 * g + 0.114 * b, tf.uint8)[..., None]


def _blurred(image: tf.Tensor) -> tf.Tensor:
    """PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1, over 13) on the inside, rounded; the border kept."""
    c = image.shape[-1]
    kernel = np.ones([3, 3], np.float32)
    kernel[1, 1] = 5.0
    kernel = np.tile((kernel / kernel.sum())[:, :, None, None], [1, 1, c, 1])
    inner = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], "VALID")[0]
    inner = tf.cast(tf.round(inner), tf.uint8)
    return tf.concat([image[:1], tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], 1), image[-1:]], 0)


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Each channel stretched to [0, 255] (a flat channel unchanged), truncated."""
    x = tf.cast(image, tf.float32)
    lo, hi = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])
    flat = hi <= lo
    # 255 * (1 / range), not 255 / range: torch divides a number by a tensor that way, and the last bit
    # decides the truncation of the brightest pixel.
    scale = tf.where(flat, 1.0, tf.math.reciprocal(tf.where(flat, 1.0, hi - lo)) * 255.0)
    lo = tf.where(flat, 0.0, lo)
    return tf.cast(tf.clip_by_value((x - lo) * scale, 0.0, 255.0), tf.uint8)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL's histogram equalisation of one uint8 channel [h, w] (torchvision's step-based table)."""
    values = tf.cast(tf.reshape(channel, [-1]), tf.int32)
    hist = tf.math.bincount(values, minlength=256, maxlength=256, dtype=tf.int32)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255  # every count but the last value's
    safe = tf.maximum(step, 1)
    table = (tf.cumsum(hist) + safe // 2) // safe
    table = tf.clip_by_value(tf.concat([[0], table[:-1]], 0), 0, 255)
    return tf.where(step > 0, tf.cast(tf.gather(table, tf.cast(channel, tf.int32)), tf.uint8), channel)


GEOMETRIC = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})


def _parameters(op: str, mag: float, hw: tuple[int, int]) -> np.ndarray:
    """What a signed op needs of its magnitude, as float32 numbers: a geometric op's map, an
    enhancement's blend weights. Computed here for both signs, one of them picked in the graph."""
    return _theta(op, mag, hw) if op in GEOMETRIC else _weights(mag)


def _signed_op(image: tf.Tensor, op: str, parameters: tf.Tensor) -> tf.Tensor:
    if op in GEOMETRIC:
        return _warp(image, parameters)
    if op == "Brightness":
        return _blend(image, tf.zeros_like(image), parameters)
    if op == "Color":  # saturation; a grayscale image has none to change
        return image if image.shape[-1] == 1 else _blend(image, _grayscale(image), parameters)
    if op == "Contrast":
        gray = _grayscale(image) if image.shape[-1] == 3 else image
        return _blend(image, tf.reduce_mean(tf.cast(gray, tf.float32)), parameters)
    if image.shape[0] <= 2 or image.shape[1] <= 2:  # Sharpness: no inside to blur
        return image
    return _blend(image, _blurred(image), parameters)


def _check_image(image: tf.Tensor) -> None:
    if image.dtype != tf.uint8 or image.shape.rank != 3 or None in image.shape[:2]:
        raise ValueError(f"RandAugment needs uint8 [h, w, c] with a static h and w, got {image.dtype.name} "
                         f"{image.shape}")


def apply_op(image: tf.Tensor, op: str, mag: float) -> tf.Tensor:
    """``op`` of ``OPS`` at the signed magnitude ``mag`` (see ``magnitude``) on uint8 [h, w, c], c = 1 or 3,
    h and w known statically; uint8 [h, w, c] out."""
    _check_image(image)
    if op in SIGNED:
        return _signed_op(image, op, tf.constant(_parameters(op, mag, tuple(image.shape[:2]))))
    if op == "Identity":
        return image
    if op == "Posterize":  # keep the top `mag` bits
        return tf.bitwise.bitwise_and(image, tf.constant((0xFF << (8 - int(mag))) & 0xFF, tf.uint8))
    if op == "Solarize":  # invert the pixels at or above the threshold
        return tf.where(tf.cast(image, tf.float32) >= mag, 255 - image, image)
    if op == "AutoContrast":
        return _autocontrast(image)
    if op == "Equalize":
        return tf.stack([_equalize_channel(image[..., i]) for i in range(image.shape[-1])], axis=-1)
    raise ValueError(f"unknown RandAugment op {op!r}; valid: {', '.join(OPS)}")


def check(num_ops: int, bin_index: int, num_bins: int = NUM_BINS) -> None:
    """ValueError unless ``num_ops`` >= 0 and ``bin_index`` is a bin of ``num_bins``."""
    if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"RandAugment's number of ops must be a whole number >= 0, got {num_ops!r}")
    if isinstance(bin_index, bool) or not isinstance(bin_index, int) or not 0 <= bin_index < num_bins:
        raise ValueError(f"RandAugment's magnitude must be a whole number in 0..{num_bins - 1}, got {bin_index!r}")


def settings(cfg) -> tuple[int, int]:
    """(N, M) of a data config: ``randaugment_ops``, ``randaugment_magnitude`` (a bin of ``NUM_BINS``).

    Configs stored before RandAugment existed lack the fields: N = 0, off. ``InputError`` naming the
    field when one is out of range.
    """
    ops, bin_index = cfg.get("randaugment_ops", 0), cfg.get("randaugment_magnitude", DEFAULT_MAGNITUDE)
    try:
        check(ops, bin_index)
    except ValueError as e:
        raise InputError(f"data.randaugment_ops={ops!r}, data.randaugment_magnitude={bin_index!r}: {e}") from None
    return ops, bin_index


def draws(key: tf.Tensor, num_ops: int) -> tuple[tf.Tensor, tf.Tensor]:
    """What ``key`` draws for ``num_ops`` ops: their indices in ``OPS`` (int32 [num_ops], uniform) and
    whether each magnitude is negated (bool [num_ops], probability 1/2; ignored by unsigned ops)."""
    k_op, k_sign = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    choices = tf.random.stateless_uniform([num_ops], seed=k_op, maxval=len(OPS), dtype=tf.int32)
    negative = tf.random.stateless_uniform([num_ops], seed=k_sign, maxval=2, dtype=tf.int32) > 0
    return choices, negative


def randaugment(image: tf.Tensor, key: tf.Tensor, num_ops: int, bin_index: int,
                num_bins: int = NUM_BINS) -> tf.Tensor:
    """RandAugment of one uint8 [h, w, c] image: ``num_ops`` ops in turn, each drawn uniformly from
    ``OPS`` with a random sign (where it has one) at magnitude bin ``bin_index`` of ``num_bins``.

    The draws are a pure function of ``key`` (int64 [2]); ``num_ops=0`` returns ``image`` itself.
    """
    check(num_ops, bin_index, num_bins)
    if num_ops == 0:
        return image
    _check_image(image)
    choices, negative = draws(key, num_ops)
    hw = (image.shape[0], image.shape[1])

    def layer(i, x):  # a loop, not N copies: the 14 branches are traced once whatever N is
        branches = []
        for op in OPS:
            m = magnitude(op, bin_index, num_bins, hw)
            if op in SIGNED:  # one graph per op; its parameters for +m and -m picked by the sign drawn
                parameters = tf.where(negative[i], _parameters(op, -m, hw), _parameters(op, m, hw))
                branches.append(lambda op=op, p=parameters: _signed_op(x, op, p))
            else:
                branches.append(lambda op=op, m=m: apply_op(x, op, m))
        return i + 1, tf.ensure_shape(tf.switch_case(choices[i], branches), x.shape)

    return tf.while_loop(lambda i, _: i < num_ops, layer, (tf.constant(0), image))[1]


def batch_randaugment(images: tf.Tensor, key: tf.Tensor, num_ops: int, bin_index: int,
                      num_bins: int = NUM_BINS) -> tf.Tensor:
    """``randaugment`` of each image of a batch [b, h, w, c] (uint8, or float on the uint8 scale: rounded to
    uint8 first), image i with ``key`` folded with i (as int64); uint8 out. ``num_ops=0`` returns ``images``
    itself."""
    check(num_ops, bin_index, num_bins)
    if num_ops == 0:
        return images
    images = pp.to_uint8(images)

    def one(args):
        image, i = args
        return randaugment(image, tf.random.experimental.stateless_fold_in(key, i), num_ops, bin_index, num_bins)

    return tf.map_fn(one, (images, tf.range(tf.shape(images)[0], dtype=tf.int64)),
                     fn_output_signature=tf.TensorSpec(images.shape[1:], tf.uint8))
