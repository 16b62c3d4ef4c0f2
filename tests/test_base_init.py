"""shared_init.base_init from an upstream ingredient: ``init_from.dont_load`` names parameter paths relative to
their collection (``head/.*``, as for .npz and timm files), so a new head keeps its fresh init."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from soupjax.io import trees
from soupjax.io import checkpoints
from soupjax.importers.merge import PretrainedMismatchError
from soupjax.training import shared_init

ROOT = Path(__file__).resolve().parents[1]


def _config(model: str, classes: int, init_from: str = "", dont_load=("head/.*",)):
    path = ROOT / "configs" / "fashion_mnist_vit.py"
    spec = importlib.util.spec_from_file_location("configs.fashion_mnist_vit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("testing")
    if model == "resnet-testing":
        config.model = {"name": "resnet-testing"}
    config.data.classes = list(range(classes))  # fixes the head's width without reading any data
    config.init_from.path = init_from
    config.init_from.dont_load = list(dont_load)
    return config


def _upstream(tmp_path: Path, model: str, classes: int) -> tuple[Path, dict]:
    """An upstream ingredient: the model's init with every leaf moved, so nothing equals a fresh init."""
    config = _config(model, classes)
    variables = shared_init.base_init(config)
    rng = np.random.default_rng(1)
    moved = jax.tree.map(lambda x: (np.asarray(x) + rng.normal(size=np.shape(x)) + 0.5).astype(x.dtype), variables)
    return checkpoints.save_ingredient(tmp_path / "upstream", moved, {"name": "upstream"}), moved


def _flat(variables: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in trees.flatten(variables).items()}


@pytest.mark.parametrize("model", ["vit-testing", "resnet-testing"])
@pytest.mark.parametrize("down_classes", [5, 10])
def test_dont_load_head_keeps_the_fresh_head(tmp_path, model, down_classes):
    path, upstream = _upstream(tmp_path, model, classes=10)
    config = _config(model, down_classes, init_from=str(path))
    fresh = _flat(shared_init.base_init(_config(model, down_classes)))  # the same model without init_from

    got = _flat(shared_init.base_init(config))

    up = _flat(upstream)
    assert set(got) == set(fresh)
    head = [k for k in got if k.startswith("params/head/")]
    assert sorted(head) == ["params/head/bias", "params/head/kernel"]
    assert got["params/head/kernel"].shape[-1] == down_classes
    for k in head:  # the downstream head is the fresh init, never the upstream one
        np.testing.assert_array_equal(got[k], fresh[k])
        if down_classes == 10:
            assert not np.array_equal(got[k], up[k])
    body = [k for k in got if k not in head]
    assert any(k.startswith("batch_stats/") for k in body) == (model == "resnet-testing")
    for k in body:  # every other parameter, and BatchNorm statistics, come from upstream
        np.testing.assert_array_equal(got[k], up[k])


def test_dont_load_applies_within_each_collection(tmp_path):
    """A pattern names a module's path in every collection: its BatchNorm's statistics too."""
    path, upstream = _upstream(tmp_path, "resnet-testing", classes=10)
    config = _config("resnet-testing", 10, init_from=str(path), dont_load=("head/.*", "stem_bn/.*"))
    fresh = _flat(shared_init.base_init(_config("resnet-testing", 10)))
    got = _flat(shared_init.base_init(config))
    stem = [k for k in got if "/stem_bn/" in k]
    assert {k.split("/")[0] for k in stem} == {"params", "batch_stats"}
    for k in stem:
        np.testing.assert_array_equal(got[k], fresh[k])
    np.testing.assert_array_equal(got["params/stem_conv/kernel"], _flat(upstream)["params/stem_conv/kernel"])


def test_mismatch_without_dont_load_names_the_collection_path(tmp_path):
    path, _ = _upstream(tmp_path, "vit-testing", classes=10)
    with pytest.raises(PretrainedMismatchError, match=r"params/head/kernel: shape mismatch") as err:
        shared_init.base_init(_config("vit-testing", 5, init_from=str(path), dont_load=()))
    assert str(path) in str(err.value) and len(err.value.problems) == 2  # kernel and bias
