"""Image ops (tf, inside tf.data) for training and evaluation: per example, per batch, and mixup.

Every random op is stateless: it takes a `key` (an int64 [2] tensor, see `example_key`) derived from the run
seed and the position of the example (or batch) in the stream, so it is augmented the same way whenever and
wherever it is read. That is what makes `train_batches(..., start_step=s)` reproduce an uninterrupted run.

Pixel conventions: ops before `to_unit` work on uint8 [h, w, c] (or [b, h, w, c] for the `batch_*` ops);
`to_unit` gives float32 in [0, 1] (the space the shifts in `shifts.py` work in); `normalize` maps [0, 1]
to what the model sees.
"""

from __future__ import annotations

import math

import tensorflow as tf

from soupjax.config.base import CHOICES

NORMALIZATIONS = ("inception", "imagenet", "unit", "clip")
TRAIN_CROPS = ("random_resized", "pad_crop", "resize")
RESIZE_METHODS = CHOICES["data.resize_method"]  # the first is the default
EVAL_RESIZES = CHOICES["data.eval_resize"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's (open_clip.constants.OPENAI_DATASET_MEAN / _STD): every OpenAI and most open_clip weights.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Salts keep the streams of random numbers for different purposes apart (3 is the pipeline's shuffle).
# RandAugment has its own, so that turning it on leaves the crops and flips of every example as they were.
SALT_AUGMENT, SALT_MIXUP, SALT_SHIFT, SALT_RANDAUGMENT = 0, 1, 2, 4


def example_key(seed, salt: int, index) -> tf.Tensor:
    """An int64 [2] stateless-RNG key for (seed, salt, index); distinct indices give unrelated keys."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(salt, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def decode(image_bytes: tf.Tensor, channels: int) -> tf.Tensor:
    """Encoded PNG/JPEG/GIF/BMP bytes -> uint8 [h, w, channels]."""
    image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def resize(image: tf.Tensor, size, method: str = "bilinear") -> tf.Tensor:
    """Resizes to [size, size] (or to `size` = [h, w]), antialiased when shrinking; keeps the dtype of `image`.

    `method` is 'bilinear' or 'bicubic' (Keys' cubic, a = -0.5, as PIL's); a uint8 image is rounded and
    clipped back to uint8 (bicubic overshoots at edges).
    """
    dtype = image.dtype
    shape = size if isinstance(size, (tf.Tensor, list, tuple)) else [size, size]
    image = tf.image.resize(image, shape, method=method, antialias=True)
    return _cast_like(image, dtype)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """An image on the uint8 scale (float or uint8) as uint8: rounded and clipped; uint8 unchanged."""
    return image if image.dtype == tf.uint8 else _cast_like(image, tf.uint8)


def _cast_like(image: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    if dtype == tf.uint8:
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return tf.cast(image, dtype)


def crop_range(aug_strength: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(area range, aspect-ratio range) of the Inception crop: strength 1 = ((0.08, 1), (3/4, 4/3)), 0 = none."""
    s = float(aug_strength)
    return (0.08**s, 1.0), ((3 / 4)**s, (4 / 3)**s)


def random_resized_crop(image_bytes: tf.Tensor, key: tf.Tensor, size: int, channels: int, *,
                        area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
                        jpeg: bool = False, method: str = "bilinear") -> tf.Tensor:
    """Inception-style crop of the encoded image (decoding only the crop for JPEG), resized to [size, size]."""
    if jpeg:
        shape = tf.image.extract_jpeg_shape(image_bytes)
    else:
        image = decode(image_bytes, channels)
        shape = tf.shape(image)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]), seed=key,
        min_object_covered=0.0, area_range=area_range, aspect_ratio_range=aspect_ratio_range,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    if jpeg:
        window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        image = tf.io.decode_and_crop_jpeg(image_bytes, window, channels=channels)
    else:
        image = tf.slice(image, begin, crop_size)
    return resize(image, size, method)


def pad_crop(image: tf.Tensor, key: tf.Tensor, size: int, pad: int, method: str = "bilinear") -> tf.Tensor:
    """Resizes to [size, size], zero-pads `pad` pixels per side and takes a random [size, size] crop (CIFAR)."""
    image = resize(image, size, method)
    if pad <= 0:
        return image
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    return tf.image.stateless_random_crop(image, [size, size, tf.shape(image)[-1]], seed=key)


def random_flip(image: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    return tf.image.stateless_random_flip_left_right(image, seed=key)


def center_crop(image: tf.Tensor, size: int, crop_pct: float, method: str = "bilinear",
                mode: str = "square") -> tf.Tensor:
    """Eval view of an image [h, w, c] or a batch [b, h, w, c]; keeps the dtype.

    mode 'square' (soupjax's own): crop_pct 1 is a plain resize to [size, size] (the aspect ratio is not
    kept); crop_pct < 1 (e.g. 0.875, ImageNet style) resizes the shorter side to ceil(size / crop_pct),
    keeping the aspect ratio, then takes the central [size, size].
    mode 'shorter_side' (open_clip's and timm's evaluation transform): the shorter side to
    floor(size / crop_pct) (torchvision's Resize(int), the longer side truncated as it does), then its
    CenterCrop(size); crop_pct 1 is CLIP's Resize(size) + CenterCrop(size). The resize runs as PIL's
    does, the width first and then the height, a uint8 image rounded to uint8 in between: PIL clips
    there what the cubic overshoots, and a single pass differs from it by up to 19 levels on noise.
    """
    if mode == "shorter_side":
        hw = tf.shape(image)[-3:-1]
        new_shape = shorter_side_shape(hw, math.floor(size / crop_pct))
        image = resize(resize(image, tf.stack([hw[0], new_shape[1]]), method), new_shape, method)
        return torchvision_center_crop(image, size)
    if mode != "square":
        raise ValueError(f"unknown eval resize {mode!r}; valid: {', '.join(EVAL_RESIZES)}")
    if crop_pct >= 1.0:
        return resize(image, size, method)
    shape = tf.cast(tf.shape(image)[-3:-1], tf.float32)
    scale = math.ceil(size / crop_pct) / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    dtype = image.dtype
    image = _cast_like(tf.image.resize(image, new_shape, method=method, antialias=True), dtype)
    top = (new_shape[0] - size) // 2
    left = (new_shape[1] - size) // 2
    return image[..., top:top + size, left:left + size, :]


def shorter_side_shape(shape: tf.Tensor, short: int) -> tf.Tensor:
    """[h, w] (int32) with the shorter side `short` and the longer int(short * long / shorter), as
    torchvision's Resize(short) computes it (float64 here, like Python's division of the integers)."""
    hw = tf.cast(shape, tf.float64)
    lo = tf.reduce_min(hw)
    return tf.cast(tf.where(hw == lo, tf.cast(short, tf.float64), tf.floor(short * hw / lo)), tf.int32)


def torchvision_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """The central [size, size] of an image [h, w, c] or a batch [b, h, w, c] at least that large, where
    torchvision's CenterCrop takes it: offsets round((h - size) / 2), half to even as Python's round."""
    hw = tf.shape(image)[-3:-1]
    top, left = tf.unstack(tf.cast(tf.round(tf.cast(hw - size, tf.float64) / 2.0), tf.int32))
    return image[..., top:top + size, left:left + size, :]


# Batched versions for data sets whose images all have one static shape (Fashion-MNIST, CIFAR): one op per
# batch instead of one per example, with the batch's random numbers drawn from one key.


def batch_pad_crop(images: tf.Tensor, key: tf.Tensor, size: int, pad: int,
                   method: str = "bilinear") -> tf.Tensor:
    """`pad_crop` of a batch [b, h, w, c]: resize, zero-pad, a random [size, size] crop per image."""
    if images.shape[1:3] != (size, size):
        images = resize(images, size, method)
    if pad <= 0:
        return images
    images = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    b = tf.shape(images)[0]
    offsets = tf.random.stateless_uniform([2, b], seed=key, maxval=2 * pad + 1, dtype=tf.int32)
    span = tf.range(size)
    images = tf.gather(images, offsets[0][:, None] + span, axis=1, batch_dims=1)
    return tf.gather(images, offsets[1][:, None] + span, axis=2, batch_dims=1)


def batch_random_resized_crop(images: tf.Tensor, key: tf.Tensor, size: int, *,
                              area_range=(0.08, 1.0), aspect_ratio_range=(3 / 4, 4 / 3),
                              method: str = "bilinear") -> tf.Tensor:
    """Inception-style crop of each image of a batch [b, h, w, c], resized to [size, size].

    Area fraction ~ U(area_range), log aspect ratio ~ U(log aspect_ratio_range); a crop that would not fit
    is clipped to the image (instead of resampled). Returns float32 (on the scale of `images`).
    'bilinear' samples the fractional box at once (tf.image.crop_and_resize, no antialiasing); 'bicubic'
    rounds the box to whole pixels and resizes each crop as `resize` does (antialiased), image by image.
    """
    b, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
    u = tf.random.stateless_uniform([4, b], seed=key)
    area = area_range[0] + (area_range[1] - area_range[0]) * u[0]
    log_lo, log_hi = math.log(aspect_ratio_range[0]), math.log(aspect_ratio_range[1])
    ratio = tf.exp(log_lo + (log_hi - log_lo) * u[1])  # width / height
    crop_w = tf.minimum(1.0, tf.sqrt(area * ratio * h / w))  # fractions of the image's sides
    crop_h = tf.minimum(1.0, tf.sqrt(area / ratio * w / h))
    y0, x0 = (1.0 - crop_h) * u[2], (1.0 - crop_w) * u[3]
    boxes = tf.stack([y0, x0, y0 + crop_h, x0 + crop_w], axis=1)
    if method == "bilinear":
        return tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes, tf.range(b), [size, size])
    pixels = tf.cast(tf.round(boxes * [h, w, h, w]), tf.int32)  # corners in whole pixels, inside the image
    top_left = tf.minimum(pixels[:, :2], [h - 1, w - 1])
    extent = tf.maximum(pixels[:, 2:] - top_left, 1)

    def one(args):
        image, corner, hw = args
        crop = tf.slice(image, tf.concat([corner, [0]], 0), tf.concat([hw, [-1]], 0))
        return tf.image.resize(tf.cast(crop, tf.float32), [size, size], method=method, antialias=True)

    return tf.map_fn(one, (images, top_left, extent),
                     fn_output_signature=tf.TensorSpec([size, size, images.shape[-1]], tf.float32))


def batch_flip(images: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """Flips each image of a batch left-right with probability 1/2."""
    flip = tf.random.stateless_uniform([tf.shape(images)[0]], seed=key) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


def to_unit(image: tf.Tensor) -> tf.Tensor:
    """uint8 (or float on the uint8 scale) -> float32 in [0, 1]."""
    return tf.clip_by_value(tf.cast(image, tf.float32) / 255.0, 0.0, 1.0)


def set_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """Grayscale to RGB by tiling (channels=3), or RGB to grayscale (channels=1); no-op if they match."""
    have = image.shape[-1]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return tf.repeat(image, 3, axis=-1)
    if have == 3 and channels == 1:
        return tf.image.rgb_to_grayscale(image)
    raise ValueError(f"can't convert images with {have} channels to {channels}")


def normalize(image: tf.Tensor, mode: str) -> tf.Tensor:
    """[0, 1] float -> model input. 'inception': [-1, 1]; 'imagenet' / 'clip': (x - mean) / std with
    ImageNet's or OpenAI CLIP's statistics (one channel: their averages); 'unit': unchanged."""
    if mode == "inception":
        return image * 2.0 - 1.0
    if mode == "unit":
        return image
    if mode in ("imagenet", "clip"):
        c = image.shape[-1]
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if mode == "imagenet" else (CLIP_MEAN, CLIP_STD)
        mean = mean if c == 3 else (sum(mean) / 3,)
        std = std if c == 3 else (sum(std) / 3,)
        return (image - tf.constant(mean)) / tf.constant(std)
    raise ValueError(f"unknown normalize {mode!r}; valid: {', '.join(NORMALIZATIONS)}")


def mixup(batch: dict[str, tf.Tensor], key: tf.Tensor, alpha: float) -> dict[str, tf.Tensor]:
    """Mixes each example with the batch reversed, one lam ~ Beta(alpha, alpha) per batch (big_vision style).

    'image' and 'targets' are mixed; 'label' keeps the first example's label. Rows of 'targets' still sum to 1.
    """
    gammas = tf.random.stateless_gamma([2], seed=key, alpha=alpha)
    lam = gammas[0] / (gammas[0] + gammas[1])
    out = dict(batch)
    for k in ("image", "targets"):
        out[k] = lam * batch[k] + (1.0 - lam) * tf.reverse(batch[k], axis=[0])
    return out
