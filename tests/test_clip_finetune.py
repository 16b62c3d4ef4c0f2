"""The paper's setting end to end on mock data: a tiny CLIP (written by open_clip) fine-tuned from its
zero-shot head into two ingredients with configs/imagenet_clip_vit_b32.py:testing, then every recipe
cooked from them; the start the merges and WiSE-FT take is the zero-shot model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

import tensorflow_datasets as tfds  # noqa: E402

from clip_files import tiny_open_clip, write_open_clip_file  # noqa: E402
from soupjax.config import base as config_base  # noqa: E402
from soupjax.importers.clip_checkpoint import read_clip  # noqa: E402
from soupjax.io import checkpoints, trees  # noqa: E402
from soupjax.study import stages  # noqa: E402
from soupjax.text.clip_tokenizer import ClipTokenizer  # noqa: E402
from soupjax.training import zeroshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_clip_fine_tuned_from_its_zeroshot_head_and_cooked(tmp_path):
    clip_file = write_open_clip_file(tiny_open_clip(), tmp_path / "clip")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na drawing of a {}.\n")
    # ImageNet's TFDS label names are WordNet ids: the class names a user gives, as README says.
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    classnames = tmp_path / "classnames.txt"
    classnames.write_text("\n".join(IMAGENET_CLASSNAMES) + "\n")
    cfg = config_base.load_config(f"{ROOT / 'configs' / 'imagenet_clip_vit_b32.py'}:testing,init={clip_file},"
                                  f"templates={templates},classnames={classnames}")
    with tfds.testing.mock_data(num_examples=64):
        # Every recipe, each grid of two or three points (the quick study's): what is tested is the start.
        results = stages.run_sweep_study(cfg, tmp_path / "work", recipe="all", learned_epochs=1, **stages.QUICK_GRIDS)
    ingredients = tmp_path / "work" / "ingredients"
    made = checkpoints.list_ingredients(ingredients)
    assert [p.name for p in made] == ["sweep0_000", "sweep0_001"]
    metas = [checkpoints.load_meta(p) for p in made]
    assert {m["activation"] for m in metas} == {"quick_gelu"}, "OpenAI-layout file: QuickGELU"
    assert len({m["start_fingerprint"] for m in metas}) == 1

    # The start is the CLIP file's image tower and 100 x its zero-shot classifier of the data set's
    # class names in those templates, computed here independently of training.
    start = checkpoints.load_variables(ingredients / "start")["params"]
    ckpt = read_clip(clip_file)
    names = list(IMAGENET_CLASSNAMES)
    classifier = zeroshot.zeroshot_head(ckpt, ClipTokenizer.from_path(clip_file), names,
                                        zeroshot.read_templates(templates))
    assert len(names) == 1000 and classifier.shape == (16, 1000)
    np.testing.assert_allclose(start["head"]["kernel"], 100 * classifier, atol=1e-4)
    assert not np.asarray(start["head"]["bias"]).any()
    want = trees.flatten(ckpt.image_params)
    got = trees.flatten(start["visual"])
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    assert list(ingredients.glob("zeroshot_head-*.npz")), "the head is kept beside the start"

    rows = {r["name"] for r in results["plain"]["soups"]}
    assert {"uniform", "greedy", "ties", "task_arithmetic", "wise_ft_uniform", "ensemble"} <= rows, rows
