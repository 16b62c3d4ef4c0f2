"""CLIP's zero-shot head against open_clip's `build_zero_shot_classifier`, and the start a
head_init='zeroshot' run writes: the image tower of the CLIP file and 100 x the zero-shot classifier."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from clip_files import tiny_open_clip, write_open_clip_file  # noqa: E402
from soupjax.cli.errors import InputError  # noqa: E402
from soupjax.importers.clip_checkpoint import read_clip  # noqa: E402
from soupjax.text.clip_tokenizer import ClipTokenizer  # noqa: E402
from soupjax.training import zeroshot  # noqa: E402

CLASSNAMES = ["T-shirt/top", "trouser", "pullover", "ankle boot"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "itap of my {}!"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    model = tiny_open_clip(quick_gelu=True)
    return model, write_open_clip_file(model, tmp_path_factory.mktemp("clip") / "openai")


def test_zeroshot_head_is_open_clips(clip_file):
    model, path = clip_file
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    with torch.no_grad():
        want = build_zero_shot_classifier(model, open_clip.get_tokenizer("ViT-B-32"), CLASSNAMES, TEMPLATES,
                                          num_classes_per_batch=2).numpy()
    import jax
    with jax.default_matmul_precision("highest"):
        got = zeroshot.zeroshot_head(read_clip(path), ClipTokenizer.from_path(path), CLASSNAMES, TEMPLATES)
    assert got.shape == want.shape == (16, len(CLASSNAMES))
    np.testing.assert_allclose(np.linalg.norm(got, axis=0), 1.0, atol=1e-6)
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    # The head the model-soups code starts from: 100 x the classifier, applied to normalised features.
    head = zeroshot.head_variables(got)
    np.testing.assert_allclose(head["kernel"], 100 * got, rtol=1e-6)
    assert not head["bias"].any()


def test_templates_file_is_read_and_checked(tmp_path):
    good = tmp_path / "templates.txt"
    good.write_text("a photo of a {}.\n\n  a sketch of the {}.  \n")
    assert zeroshot.read_templates(good) == ["a photo of a {}.", "a sketch of the {}."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\nno slot here\n")
    with pytest.raises(InputError, match=r"template 2 'no slot here' must hold"):
        zeroshot.read_templates(bad)
    with pytest.raises(InputError, match="cannot be read"):
        zeroshot.read_templates(tmp_path / "missing.txt")
