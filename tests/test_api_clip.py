"""soupjax.api's CLIP functions against open_clip on tiny random-weight models it wrote (tokens, image and
text features, the zero-shot head), their refusals, and README's CLIP example, run as written on tiny
stand-ins of the files it names."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

import jax  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from clip_files import HEADS, IMAGE, LAYERS, PATCH, TEXT_HEADS, TEXT_WIDTH, WIDTH, tiny_open_clip  # noqa: E402
from clip_files import write_open_clip_file  # noqa: E402
from soupjax import api  # noqa: E402
from soupjax.cli.errors import InputError  # noqa: E402
from test_import_ingredients import images, write_classnames, write_model_soups_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSNAMES = ["T-shirt/top", "trouser", "pullover", "ankle boot", "Café au lait"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "itap of my {}!"]
TEXTS = ["a photo of a cat.", "A Dog, running!!", "", "x " * 100, "naïve café & co. 123"]


def _with_open_clip_config(model, directory: Path, quick_gelu: bool) -> Path:
    """The model's file, with the open_clip_config.json open_clip writes beside it (which says the
    activation: a bare state dict does not)."""
    path = write_open_clip_file(model, directory)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "quick_gelu": quick_gelu, "vision_cfg": {"width": WIDTH, "head_width": WIDTH // HEADS, "layers": LAYERS,
                                                 "patch_size": PATCH, "image_size": IMAGE},
        "text_cfg": {"width": TEXT_WIDTH, "heads": TEXT_HEADS, "layers": LAYERS}}}))
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["quick_gelu", "gelu_exact"])
def clip_file(request, tmp_path_factory):
    model = tiny_open_clip(quick_gelu=request.param, seed=3)
    return model, _with_open_clip_config(model, tmp_path_factory.mktemp("clip"), request.param)


def test_tokenize_is_open_clips(clip_file):
    _, path = clip_file
    got = api.tokenize(path, TEXTS)
    want = open_clip.get_tokenizer("ViT-B-32")(TEXTS).numpy()
    assert got.dtype == np.int32 and got.shape == want.shape == (len(TEXTS), 77)
    np.testing.assert_array_equal(got, want)


def test_encode_image_and_text_are_open_clips(clip_file):
    model, path = clip_file
    batch = images(3, seed=5)
    tokens = open_clip.get_tokenizer("ViT-B-32")(TEXTS)
    with torch.no_grad():
        want_image = model.encode_image(torch.from_numpy(batch.transpose(0, 3, 1, 2).copy())).numpy()
        want_text = model.encode_text(tokens).numpy()
    with jax.default_matmul_precision("highest"):
        got_image = api.encode_image(path, batch)
        got_text = api.encode_text(path, api.tokenize(path, TEXTS))
    image_diff, text_diff = np.abs(got_image - want_image).max(), np.abs(got_text - want_text).max()
    print(f"{path.parent.name}: image features max |diff| {image_diff:.2e}, text features {text_diff:.2e}")
    assert got_image.shape == want_image.shape and got_text.shape == want_text.shape
    assert image_diff < 1e-4 and text_diff < 1e-4


def test_zeroshot_head_is_open_clips(clip_file):
    model, path = clip_file
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    with torch.no_grad():
        want = build_zero_shot_classifier(model, open_clip.get_tokenizer("ViT-B-32"), CLASSNAMES, TEMPLATES,
                                          num_classes_per_batch=2).numpy()
    with jax.default_matmul_precision("highest"):
        got = api.zeroshot_head(path, CLASSNAMES, TEMPLATES)
    print(f"zero-shot head max |diff| {np.abs(got - want).max():.2e}")
    assert got.shape == want.shape == (16, len(CLASSNAMES))
    np.testing.assert_allclose(np.linalg.norm(got, axis=0), 1.0, atol=1e-6)
    assert np.abs(got - want).max() < 1e-4


def test_refusals(tmp_path):
    with pytest.raises(InputError, match="nowhere.pt: no such file"):
        api.encode_image(tmp_path / "nowhere.pt", images(1))
    _, files = write_model_soups_files(tmp_path, 1, num_classes=3)
    with pytest.raises(InputError, match="has no text tower"):
        api.zeroshot_head(files[0], ["a"], ["{}"])
    with pytest.raises(InputError, match="NHWC with 3 channels"):
        api.encode_image(files[0], np.zeros((2, 32, 32), np.float32))
    with pytest.raises(InputError, match="integers"):
        api.encode_text(tmp_path / "base" / "clip.pt", np.zeros((2, 77), np.float32))
    with pytest.raises(InputError, match="need the ingredients they were made from"):
        api.predict({"params": {}}, images(1))
    with pytest.raises(InputError, match="unknown format 'npz'"):
        api.import_ingredients(files, tmp_path / "out", format="npz")


def _readme_clip_example() -> str:
    """README's CLIP block, with the sizes of its tiny stand-ins: 32 px images (ViT-B/32's are 224) and the
    config's ``testing`` option (its tiny CLIP)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From Python"):]
    block = next(b for b in re.findall(r"```python\n(.*?)```", section, re.S)
                 if b.startswith("# CLIP and the released model-soups ingredients"))
    config = "configs/imagenet_clip_vit_b32.py"
    assert "224, 224" in block and f'"{config}"' in block
    return block.replace("224, 224", f"{IMAGE}, {IMAGE}").replace(f'"{config}"', f'"{ROOT / config}:testing"')


@pytest.mark.slow
def test_readme_clip_example_runs(tmp_path, monkeypatch, capsys):
    base, files = write_model_soups_files(tmp_path / "made", 2)
    shutil.copy(base, tmp_path / "ViT-B-32.pt")
    shutil.copy(base.parent / "bpe_simple_vocab_16e6.txt.gz", tmp_path)
    for path in files:
        shutil.copy(path, tmp_path / path.name)
    write_classnames(tmp_path / "imagenet_classnames.txt")
    (tmp_path / "openai_templates.txt").write_text("a photo of a {}.\nitap of my {}.\n")
    monkeypatch.chdir(tmp_path)
    with tfds.testing.mock_data(num_examples=16):
        exec(compile(_readme_clip_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "(4, 2)" in printed and "(4, 1000)" in printed
    assert sorted(p.name for p in (tmp_path / "ingredients").iterdir() if p.is_dir()) == ["model_0", "model_1", "start"]
