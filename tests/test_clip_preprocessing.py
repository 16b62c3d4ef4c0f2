"""CLIP's preprocessing (bicubic, shorter side + centre crop, OpenAI's mean and std) against open_clip's own
transform; the defaults unchanged; class names from TFDS or a user's file (soupjax.data.class_names)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from soupjax import data
from soupjax.cli.errors import InputError
from soupjax.config.base import base_config, check_config
from soupjax.data import class_names as cn
from soupjax.data import fashion_mnist_local
from soupjax.data import preprocessing as pp

open_clip = pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")

# Differences from PIL, on the uint8 scale. TF's cubic (Keys, a = -0.5, antialiased by widening the
# kernel) is PIL's, and soupjax runs it as PIL does (width, then height, rounded to uint8 in between), but
# PIL computes in 22-bit fixed point and TF in float: a value that lands near k + 1/2 can round the other
# way, once per pass. Measured over these images: at most 2 levels (0.030 after dividing by CLIP's std),
# mean abs difference <= 5e-5, and < 0.4% of values not identical. Bounds with room over that; a wrong
# kernel, geometry or clipping is far outside them (a single pass without the intermediate rounding is
# off by up to 19 levels on noise; a crop one pixel off by tens of levels).
MAX_LEVELS = 2
MAX_MEAN_ABS = 2e-4
MAX_FRACTION_DIFFERENT = 0.01
SIZES = [(300, 200), (150, 413), (224, 500), (100, 90), (501, 333), (225, 226), (37, 29)]


def _images(seed: int = 0):
    """(name, uint8 [h, w, 3]) pairs: uniform noise (worst case for the cubic's overshoot) and smooth images."""
    rng = np.random.default_rng(seed)
    for h, w in SIZES:
        yield f"noise {h}x{w}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        yield f"smooth {h}x{w}", np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def _clip_view(image: np.ndarray, size: int, crop_pct: float = 1.0) -> np.ndarray:
    view = pp.center_crop(tf.constant(image), size, crop_pct, method="bicubic", mode="shorter_side")
    return pp.normalize(pp.to_unit(view), "clip").numpy()


def _assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> dict:
    assert ours.shape == ref.shape, what
    diff = np.abs(ours - ref)
    levels = np.round(diff * np.asarray(pp.CLIP_STD) * 255)  # back on the uint8 scale
    stats = {"max": float(diff.max()), "mean": float(diff.mean()), "levels": int(levels.max()),
             "different": float((levels > 0).mean())}
    assert stats["levels"] <= MAX_LEVELS and stats["mean"] <= MAX_MEAN_ABS, (what, stats)
    assert stats["different"] <= MAX_FRACTION_DIFFERENT, (what, stats)
    return stats


# ------------------------------------------------------------------------------------ against open_clip


def test_normalization_is_open_clips():
    assert pp.CLIP_MEAN == tuple(open_clip.constants.OPENAI_DATASET_MEAN)
    assert pp.CLIP_STD == tuple(open_clip.constants.OPENAI_DATASET_STD)
    x = np.random.default_rng(1).random((5, 7, 3), dtype=np.float32)
    import torch
    from torchvision.transforms import Normalize
    ref = Normalize(open_clip.constants.OPENAI_DATASET_MEAN, open_clip.constants.OPENAI_DATASET_STD)(
        torch.from_numpy(x).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(pp.normalize(tf.constant(x), "clip").numpy(), ref, atol=1e-6)


def test_crop_window_is_open_clips():
    """The geometry exactly: the resized shape is torchvision's Resize(size), and the crop of one and the
    same resized image is its CenterCrop(size) pixel for pixel (odd margins included)."""
    resize_step, crop_step = open_clip.image_transform(224, is_train=False).transforms[:2]
    for name, image in _images():
        resized = resize_step(Image.fromarray(image))
        shape = pp.shorter_side_shape(tf.constant(image.shape[:2]), 224).numpy()
        assert tuple(shape) == (resized.height, resized.width), name
        ours = pp.torchvision_center_crop(tf.constant(np.asarray(resized)), 224).numpy()
        np.testing.assert_array_equal(ours, np.asarray(crop_step(resized)), err_msg=name)


def test_eval_view_matches_open_clip():
    transform = open_clip.image_transform(224, is_train=False)
    worst = []
    for name, image in _images():
        ref = transform(Image.fromarray(image)).permute(1, 2, 0).numpy()
        worst.append((name, _assert_close(_clip_view(image, 224), ref, name)))
    print("soupjax vs open_clip eval transform:", worst)


def test_crop_pct_is_timms_rule():
    """Below crop_pct 1 the shorter side is floor(size / crop_pct), timm's evaluation transform."""
    timm_data = pytest.importorskip("timm.data")
    transform = timm_data.create_transform(input_size=224, crop_pct=0.875, interpolation="bicubic",
                                           mean=pp.CLIP_MEAN, std=pp.CLIP_STD)
    for name, image in list(_images())[:4]:
        ref = transform(Image.fromarray(image)).permute(1, 2, 0).numpy()
        _assert_close(_clip_view(image, 224, 0.875), ref, name)


def test_eval_batches_give_open_clips_view():
    """Through the pipeline: a data config asking for CLIP's view gives open_clip's transform of the
    same images (mock data of non-square images, streamed example by example)."""
    cfg = data.default_data_config()
    cfg.update(dict(name="food101", image_size=32, normalize="clip", resize_method="bicubic",
                    eval_resize="shorter_side"))
    transform = open_clip.image_transform(32, is_train=False)
    with tfds.testing.mock_data(num_examples=6):
        raw = list(tfds.as_numpy(tfds.builder("food101").as_dataset(split="test", shuffle_files=False)))
        batches = list(data.eval_batches(cfg, "test", 4))
    images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    assert len(images) == len(raw) == 6 and labels.tolist() == [int(ex["label"]) for ex in raw]
    assert len({ex["image"].shape for ex in raw}) > 1  # non-square, of several sizes
    for k, ex in enumerate(raw):
        ref = transform(Image.fromarray(ex["image"])).permute(1, 2, 0).numpy()
        _assert_close(images[k], ref, f"example {k} {ex['image'].shape}")


# ------------------------------------------------------------------------------- defaults unchanged


@pytest.fixture
def mocked_fashion_mnist():
    cfg = data.default_data_config()
    cfg.name, cfg.heldout = "fashion_mnist", 8
    with tfds.testing.mock_data(num_examples=24):
        examples = tfds.builder("fashion_mnist").as_dataset(split="test", shuffle_files=False)
        yield cfg, np.stack([ex["image"] for ex in tfds.as_numpy(examples)])


def _eval_images(cfg) -> np.ndarray:
    return np.concatenate([b["image"][b["mask"] > 0] for b in data.eval_batches(cfg, "test", 16)])


def test_default_eval_view_is_a_plain_bilinear_resize(mocked_fashion_mnist):
    """The default config's eval images are what they always were: an antialiased bilinear resize to
    [size, size] (crop_pct 1), or of the shorter side to ceil(size / 0.875) and the centre cut by
    floor division (crop_pct 0.875), written out here with TF's resize itself."""
    cfg, raw = mocked_fashion_mnist
    x = tf.constant(raw)

    def reference(shape, offset):
        image = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(x, shape, "bilinear", antialias=True)), 0, 255),
                        tf.uint8)[:, offset:offset + 32, offset:offset + 32]
        return tf.repeat(tf.cast(image, tf.float32) / 255.0 * 2.0 - 1.0, 3, axis=-1).numpy()

    np.testing.assert_array_equal(_eval_images(cfg), reference([32, 32], 0))
    cfg.eval_crop_pct = 0.875
    np.testing.assert_array_equal(_eval_images(cfg), reference([37, 37], 2))  # ceil(32 / 0.875) = 37


def _without_new_fields(cfg):
    old = cfg.copy_and_resolve_references().to_dict()
    for field in ("resize_method", "eval_resize"):
        old.pop(field)
    import ml_collections
    return ml_collections.ConfigDict(old)


def test_configs_without_the_new_fields_read_as_before(mocked_fashion_mnist):
    """A data config made before these fields (a stored meta.json's) reads exactly as the defaults, in
    training (every train_crop) and evaluation, and keeps its evaluation fingerprint; bicubic changes what
    it should."""
    cfg, _ = mocked_fashion_mnist

    def first_batch(c):
        return next(data.train_batches(c, 8, seed=3))["image"]

    old = _without_new_fields(cfg)
    assert "resize_method" not in old and data.eval_fingerprint(old) == data.eval_fingerprint(cfg)
    np.testing.assert_array_equal(_eval_images(old), _eval_images(cfg))
    for train_crop in ["pad_crop", "random_resized", "resize"]:
        cfg.train_crop = train_crop
        old = _without_new_fields(cfg)
        np.testing.assert_array_equal(first_batch(old), first_batch(cfg), err_msg=train_crop)
    cfg.resize_method = "bicubic"
    assert data.eval_fingerprint(cfg) != data.eval_fingerprint(old)
    assert not np.array_equal(first_batch(cfg), first_batch(old))


def test_bicubic_training_crops_resize_bicubically():
    """The training crops use the chosen method: at aug_strength 0 the Inception crop is the whole image,
    so both its batched and per-example forms are the plain bicubic resize."""
    images = tf.constant(np.random.default_rng(2).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8))
    key = pp.example_key(0, pp.SALT_AUGMENT, 0)
    area, ratio = pp.crop_range(0.0)
    batched = pp.batch_random_resized_crop(images, key, 32, area_range=area, aspect_ratio_range=ratio,
                                           method="bicubic")
    np.testing.assert_allclose(batched.numpy(), pp.resize(tf.cast(images, tf.float32), 32, "bicubic").numpy(),
                               atol=1e-4)
    png = tf.io.encode_png(images[0])
    one = pp.random_resized_crop(png, key, 32, 1, area_range=area, aspect_ratio_range=ratio, method="bicubic")
    np.testing.assert_array_equal(one.numpy(), pp.resize(images[0], 32, "bicubic").numpy())
    assert not np.array_equal(one.numpy(), pp.resize(images[0], 32).numpy())


def test_unknown_choices_are_refused_by_name():
    for field, value in [("resize_method", "nearest"), ("eval_resize", "squash")]:
        config = base_config()
        config.data[field] = value
        with pytest.raises(InputError, match=rf"config\.data\.{field}='{value}' must be one of"):
            check_config(config)
        with pytest.raises(InputError, match=rf"unknown {field} '{value}'; valid: "):
            next(data.eval_batches(config.data, "test", 8))


# -------------------------------------------------------------------------------------------- class names


def test_class_names_follow_data_classes():
    cfg = data.default_data_config()
    assert cn.class_names(cfg) == list(fashion_mnist_local.CLASS_NAMES)
    cfg.classes = [9, 0, 3]  # the model's class i is data.classes[i]
    assert cn.class_names(cfg) == ["Ankle boot", "T-shirt/top", "Dress"]
    cfg.name = "fashion_mnist"
    with tfds.testing.mock_data(num_examples=2):
        assert cn.class_names(cfg) == ["Ankle boot", "T-shirt/top", "Dress"]
    cfg.classes = [3, 3]
    with pytest.raises(InputError, match="distinct label ids"):
        cn.class_names(cfg)


def test_tfds_names_are_read_without_data(tmp_path):
    """From the builder's code (nothing prepared in the empty data_dir); underscores become spaces;
    names that are not words are refused with the way out."""
    cfg = data.default_data_config()
    cfg.update(dict(name="oxford_iiit_pet", data_dir=str(tmp_path), classes=[1, 0]))
    assert cn.class_names(cfg) == ["american bulldog", "Abyssinian"]
    cfg.classes = None
    for name, kind in [("imagenet2012", "WordNet ids"), ("cifar100", "numbers")]:
        cfg.name = name
        with pytest.raises(InputError, match=f"label names are {kind}.*give the class names in a file"):
            cn.class_names(cfg)
    assert not list(tmp_path.rglob("*.tfrecord*")) and not list(tmp_path.rglob("*.array_record*"))
    cfg.name = "no_such_dataset"
    with pytest.raises(InputError, match="unknown dataset 'no_such_dataset'"):
        cn.class_names(cfg)


def test_class_names_file(tmp_path):
    cfg = data.default_data_config()
    names = [f"  class {i} " for i in range(10)]
    path = tmp_path / "names.txt"
    path.write_text("\n" + "\n\n".join(names) + "\n\n")
    assert cn.read_class_names(str(path)) == [n.strip() for n in names]
    cfg.classes = [7, 2]  # a line for each class of the data set: data.classes picks from them
    assert cn.class_names(cfg, str(path)) == ["class 7", "class 2"]
    path.write_text("seven\ntwo\n")  # or one for each kept class, in the model's order
    assert cn.class_names(cfg, str(path)) == ["seven", "two"]
    path.write_text("a\nb\nc\n")
    with pytest.raises(InputError, match="holds 3 names, but data set 'fashion_mnist_local' has 10 classes and "
                                         "data.classes keeps 2"):
        cn.class_names(cfg, str(path))


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("\n  \n\t\n", "holds no class names"),
    ("a\nb\nc\n", "holds 3 names, but data set 'fashion_mnist_local' has 10 classes"),
    (b"caf\xe9\n" * 10, "cannot be read as UTF-8 text"),
])
def test_class_names_file_refusals(tmp_path, content, message):
    path = tmp_path / "names.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as e:
        cn.class_names(data.default_data_config(), str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_work_stored_before_the_new_fields_is_the_same_work():
    """A stored config (an ingredient's meta.json) from before the fields is not 'a different config'
    while the new one holds their defaults; any other value is a change."""
    from soupjax.config.base import changed_fields
    from soupjax.io.files import plain
    config = base_config()
    stored = plain(config)
    for field in ("resize_method", "eval_resize"):
        del stored["data"][field]
    assert changed_fields(stored, config) == []
    config.data.resize_method = "bicubic"
    assert changed_fields(stored, config) == ["data.resize_method: None != 'bicubic'"]
