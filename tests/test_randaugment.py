"""soupjax.data.randaugment: each op against torchvision's, stateless draws, off = unchanged, training only."""
from __future__ import annotations

import math

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import torch
import torchvision.transforms.functional as tv1
import torchvision.transforms.v2.functional as tv2
from torchvision.transforms import InterpolationMode, RandAugment

from soupjax import data
from soupjax.cli.errors import InputError
from soupjax.config import base
from soupjax.data import preprocessing as pp
from soupjax.data import randaugment as ra

H, W = 37, 52  # not square, so a swapped height and width shows
BINS = (0, 1, 9, 17, 30)


def image(channels: int = 3) -> np.ndarray:
    """Ramps, noise and a flat block: every op has something to change, equalize a skewed histogram."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    im = np.stack([(xx * 5) % 256, (yy * 7) % 256, rng.integers(0, 256, (H, W))], -1).astype(np.uint8)
    im[5:15, 10:30] = rng.integers(40, 200, (10, 20, 3))
    im[20:30, 30:50] = 17
    return im if channels == 3 else im[..., 1:2]


def torchvision_op(F, t: torch.Tensor, op: str, m: float) -> torch.Tensor:
    """The op as torchvision's RandAugment applies it (nearest, fill 0), through the public functional API
    ``F`` (torchvision.transforms.functional or its v2)."""
    nearest = InterpolationMode.NEAREST
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(m))
        return F.affine(t, angle=0.0, translate=[0, 0], scale=1.0, interpolation=nearest, center=[0, 0],
                        shear=[shear, 0.0] if op == "ShearX" else [0.0, shear])
    if op in ("TranslateX", "TranslateY"):
        return F.affine(t, angle=0.0, scale=1.0, shear=[0.0, 0.0], interpolation=nearest,
                        translate=[int(m), 0] if op == "TranslateX" else [0, int(m)])
    return {"Identity": lambda: t, "Rotate": lambda: F.rotate(t, m, interpolation=nearest),
            "Brightness": lambda: F.adjust_brightness(t, 1.0 + m), "Color": lambda: F.adjust_saturation(t, 1.0 + m),
            "Contrast": lambda: F.adjust_contrast(t, 1.0 + m), "Sharpness": lambda: F.adjust_sharpness(t, 1.0 + m),
            "Posterize": lambda: F.posterize(t, int(m)), "Solarize": lambda: F.solarize(t, m),
            "AutoContrast": lambda: F.autocontrast(t), "Equalize": lambda: F.equalize(t)}[op]()


def test_the_ops_and_magnitudes_are_torchvisions():
    space = RandAugment()._augmentation_space(ra.NUM_BINS, (H, W))
    assert tuple(space) == ra.OPS
    for op, (mags, signed) in space.items():
        assert signed == (op in ra.SIGNED), op
        for b in range(ra.NUM_BINS):
            ref = float(mags[b]) if mags.ndim else 0.0
            # torch.linspace's float32 values; ours are the exact ones, rounded once.
            assert ra.magnitude(op, b, ra.NUM_BINS, (H, W)) == pytest.approx(ref, rel=1e-6, abs=1e-6), (op, b)


@pytest.mark.parametrize("channels", [3, 1])
def test_each_op_equals_torchvisions(channels):
    """Every op, bin and sign on a fixed image: equal to torchvision.transforms.functional's tensor path
    (exact: the same float32 arithmetic, truncations and nearest-neighbour rounding), and to its v2
    within 1 level (v2 rounds a few blends and autocontrast differently)."""
    im = image(channels)
    t = torch.from_numpy(im).permute(2, 0, 1).contiguous()
    worst_v2, changed = 0, set()
    for op in ra.OPS:
        for b in BINS:
            for sign in ((1, -1) if op in ra.SIGNED else (1,)):
                m = sign * ra.magnitude(op, b, ra.NUM_BINS, (H, W))
                got = ra.apply_op(tf.constant(im), op, m).numpy()
                assert got.dtype == np.uint8 and got.shape == im.shape
                np.testing.assert_array_equal(got, torchvision_op(tv1, t, op, m).permute(1, 2, 0).numpy(),
                                              err_msg=f"{op} bin {b} sign {sign}")
                v2 = torchvision_op(tv2, t, op, m).permute(1, 2, 0).numpy()
                worst_v2 = max(worst_v2, int(np.abs(got.astype(int) - v2).max()))
                changed |= {op} if not np.array_equal(got, im) else set()
    assert worst_v2 <= 1
    # The comparison has teeth: every op but Identity (and Color on one channel) changes the image.
    assert changed == set(ra.OPS) - {"Identity"} - ({"Color"} if channels == 1 else set())


def keys(n: int) -> list[tf.Tensor]:
    return [pp.example_key(7, pp.SALT_RANDAUGMENT, i) for i in range(n)]


def test_randaugment_is_a_pure_function_of_its_key():
    im = tf.constant(image())
    chained = []
    for key in keys(10):
        out = ra.randaugment(im, key, 2, 12).numpy()
        np.testing.assert_array_equal(out, ra.randaugment(im, key, 2, 12).numpy())  # the same key: the same
        # ...and it is the chain of the ops and signs the key draws.
        expected = im
        for op, negative in zip(*(x.numpy() for x in ra.draws(key, 2))):
            m = ra.magnitude(ra.OPS[op], 12, ra.NUM_BINS, (H, W))
            expected = ra.apply_op(expected, ra.OPS[op], -m if negative and ra.OPS[op] in ra.SIGNED else m)
        np.testing.assert_array_equal(out, expected.numpy())
        chained.append(out.tobytes())
    assert len(set(chained)) >= 8  # different keys, different ops (14 x 14 pairs, and signs)
    drawn = [ra.draws(key, 3) for key in keys(60)]
    assert {int(o) for ops, _ in drawn for o in ops.numpy()} == set(range(len(ra.OPS)))
    assert {bool(n) for _, negative in drawn for n in negative.numpy()} == {True, False}
    # Inside a graph (as tf.data runs it) the same key gives the same image.
    graph = tf.function(lambda x, k: ra.randaugment(x, k, 2, 12))
    np.testing.assert_array_equal(graph(im, keys(1)[0]).numpy(), ra.randaugment(im, keys(1)[0], 2, 12).numpy())


def test_batches_fold_the_index_into_the_key_and_zero_ops_is_the_identity():
    images = tf.constant(np.stack([image(), image()[::-1]]))
    key = keys(1)[0]
    out = ra.batch_randaugment(images, key, 2, 20).numpy()
    for i in range(2):
        one = ra.randaugment(images[i], tf.random.experimental.stateless_fold_in(key, tf.constant(i, tf.int64)), 2, 20)
        np.testing.assert_array_equal(out[i], one.numpy())
    floats = ra.batch_randaugment(tf.cast(images, tf.float32) + 0.3, key, 2, 20)  # the uint8 scale, rounded
    np.testing.assert_array_equal(floats.numpy(), out)
    first = images[0]
    assert ra.randaugment(first, key, 0, 9) is first
    assert ra.batch_randaugment(images, key, 0, 30) is images
    with pytest.raises(ValueError, match="0..30"):
        ra.randaugment(images[0], key, 1, 31)
    with pytest.raises(ValueError, match=">= 0"):
        ra.batch_randaugment(images, key, -1, 9)


def test_config_fields_checked_and_off_by_default():
    c = base.base_config()
    assert (c.data.randaugment_ops, c.data.randaugment_magnitude) == (0, 9)
    base.check_config(c)
    for field, value, words in [("randaugment_ops", -1, "at least 0"), ("randaugment_magnitude", 31, "at most 30"),
                                ("randaugment_ops", 1.5, "whole number")]:
        bad = base.base_config()  # a data section of the user's making (a ConfigDict refuses 1.5 for an int)
        bad.data = ml_collections.ConfigDict(dict(bad.data.to_dict(), **{field: value}))
        with pytest.raises(InputError, match=words):
            base.check_config(bad)
    # A run stored before the fields existed is the same work as a config with them at their defaults.
    stored = base.base_config().to_dict()
    del stored["data"]["randaugment_ops"], stored["data"]["randaugment_magnitude"]
    assert base.changed_fields(stored, base.base_config()) == []
    assert base.changed_fields(stored, c.copy_and_resolve_references()) == []
    on = base.base_config()
    on.data.randaugment_ops = 2
    assert base.changed_fields(stored, on) == ["data.randaugment_ops: None != 2"]
    # The pipeline refuses a data config that skipped check_config, before it reads anything.
    on.data.randaugment_magnitude = 40
    with pytest.raises(InputError, match="randaugment_magnitude=40"):
        data.train_batches(on.data, 8, seed=0)


def test_clip_config_draws_randaugment_and_mixup_with_the_standard_crop():
    from soupjax.training import sweep
    config = base.load_config("configs/imagenet_clip_vit_b32.py:init=x.pt,sweep=72")
    runs = [r for _, r, _ in sweep.ingredient_configs(config)]
    assert {r.data.aug_strength for r in runs} == {1.0}
    assert {r.data.randaugment_ops for r in runs} == {0, 1, 2}
    assert {r.data.randaugment_magnitude for r in runs} <= {3 * m for m in range(1, 11)}
    assert any(r.data.randaugment_ops and r.data.mixup_alpha for r in runs)  # drawn independently


@pytest.fixture
def small(fashion_mnist_data_dir):
    c = data.default_data_config()
    c.update(data_dir=fashion_mnist_data_dir, heldout=59_900, image_size=28, channels=1, normalize="unit")
    return c


def take(it, n):
    return [next(it)["image"] for _ in range(n)]


@pytest.mark.parametrize("cache", [True, False], ids=["in_memory", "streaming"])
def test_pipeline_off_is_unchanged_on_is_training_only_and_resumable(small, cache):
    small.cache = cache
    absent = small.copy_and_resolve_references()
    del absent["randaugment_ops"], absent["randaugment_magnitude"]
    before = take(data.train_batches(absent, 16, seed=3), 3)
    for a, b in zip(before, take(data.train_batches(small, 16, seed=3), 3)):  # N = 0 gives the same bytes
        assert a.tobytes() == b.tobytes()
    on = small.copy_and_resolve_references()
    on.randaugment_ops, on.randaugment_magnitude = 1, 15
    augmented = take(data.train_batches(on, 16, seed=3), 3)
    assert all(not np.array_equal(a, b) for a, b in zip(before, augmented))
    for a, b in zip(augmented[1:], take(data.train_batches(on, 16, seed=3, start_step=1), 2)):  # resumed
        assert a.tobytes() == b.tobytes()
    for a, b in zip(data.eval_batches(small, "train", 64), data.eval_batches(on, "train", 64)):  # never augmented
        assert a["image"].tobytes() == b["image"].tobytes()
    assert data.eval_fingerprint(on) == data.eval_fingerprint(small) == data.eval_fingerprint(absent)
