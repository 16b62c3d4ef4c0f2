"""Tests for reading ingredients one array at a time (checkpoints.IngredientTensors) and the soups over it."""

import jax
import ml_dtypes
import numpy as np
import pytest

from soupjax.io.trees import path_str
from soupjax.io import checkpoints
from soupjax.arithmetic import soups


def _variables(seed, kernel_shape=(3, 4)):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "Dense_0": {"kernel": rng.normal(size=kernel_shape).astype(np.float32),
                        "bias": rng.normal(size=(4,)).astype(np.float32)},
            "scale": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
        },
        "batch_stats": {"bn": {"mean": rng.normal(size=(4,)).astype(np.float32),
                               "count": rng.integers(0, 100, size=(2,)).astype(np.int32)}},
    }


@pytest.fixture
def ingredients(tmp_path):
    trees = [_variables(i) for i in range(3)]
    dirs = [checkpoints.save_ingredient(tmp_path / f"ing{i}", t, {"name": f"ing{i}"}) for i, t in enumerate(trees)]
    return trees, dirs


def test_reads_each_array_alone_with_its_stored_dtype(ingredients):
    trees, dirs = ingredients
    src = checkpoints.tensor_source(dirs[1])
    assert isinstance(src, soups.TensorSource)
    flat = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(trees[1])}
    assert set(src.paths) == set(flat)
    assert dict(zip(src.paths, src.shapes)) == {p: x.shape for p, x in flat.items()}
    for path, want in flat.items():
        got = src.read(path)
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype, path
        np.testing.assert_array_equal(got, want, err_msg=path)
    # The structure is the whole-tree restore's, without reading any array.
    assert jax.tree.structure(src.structure) == jax.tree.structure(checkpoints.load_variables(dirs[1]))


def test_soups_by_tensor_from_disk_equal_the_whole_tree_soups(ingredients):
    _, dirs = ingredients
    sources = [checkpoints.tensor_source(d) for d in dirs]
    loaders = [checkpoints.ingredient_loader(d) for d in dirs]
    pairs = [(soups.uniform_by_tensor(sources), soups.uniform(loaders)),
             (soups.weighted_by_tensor(sources, [0.2, 0.0, 1.5]), soups.weighted(loaders, [0.2, 0.0, 1.5]))]
    for got, want in pairs:
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            assert g.dtype == np.asarray(w).dtype, path
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-6, atol=1e-6)


def test_missing_parameter_names_directory_and_path(ingredients):
    _, dirs = ingredients
    src = checkpoints.tensor_source(dirs[0])
    with pytest.raises(ValueError, match=rf"{dirs[0]}.*'params/Dense_0/nope'"):
        src.read("params/Dense_0/nope")


def test_array_removed_or_reshaped_on_disk_after_opening(tmp_path):
    """An ingredient rewritten under a running soup: the read names the directory and the parameter."""
    directory = tmp_path / "ing"
    checkpoints.save_ingredient(directory, _variables(0), {})
    src = checkpoints.tensor_source(directory)
    checkpoints.save_ingredient(directory, _variables(1, kernel_shape=(4, 4)), {})
    with pytest.raises(ValueError, match=rf"{directory}: parameter 'params/Dense_0/kernel'.*\(4, 4\).*\(3, 4\)"):
        src.read("params/Dense_0/kernel")
    smaller = _variables(2)
    del smaller["params"]["Dense_0"]["bias"]
    checkpoints.save_ingredient(directory, smaller, {})
    with pytest.raises(ValueError, match=rf"{directory}: cannot open parameter 'params/Dense_0/bias'"):
        src.read("params/Dense_0/bias")


def test_mismatched_ingredients_on_disk_name_the_path(tmp_path):
    a = checkpoints.save_ingredient(tmp_path / "a", _variables(0), {})
    b = checkpoints.save_ingredient(tmp_path / "b", _variables(1, kernel_shape=(5, 4)), {})
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel.*\(5, 4\).*\(3, 4\)"):
        soups.uniform_by_tensor([checkpoints.tensor_source(a), checkpoints.tensor_source(b)])


def test_not_an_ingredient(tmp_path):
    with pytest.raises(FileNotFoundError, match="variables"):
        checkpoints.tensor_source(tmp_path)


def test_soup_from_disk_allocates_one_model_and_a_few_tensors(tmp_path):
    """Per tensor from disk, the arrays numpy holds at once are one model and a few tensors, whatever K."""
    import tracemalloc

    n, leaf, k = 8, 2**16, 6  # 8 float32 tensors of 256 KiB: a model is 2 MiB
    dirs = []
    for i in range(k):
        tree = {"params": {f"w{j}": np.full((leaf,), float(i + j), np.float32) for j in range(n)}}
        dirs.append(checkpoints.save_ingredient(tmp_path / f"ing{i}", tree, {}))
    sources = [checkpoints.tensor_source(d) for d in dirs]
    tensor = leaf * 4
    tracemalloc.start()
    try:
        soup = soups.uniform_by_tensor(sources, prefetch_bytes=4 * tensor, threads=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(soup["params"]["w3"], np.full(leaf, np.mean(np.arange(k)) + 3, np.float32))
    model = n * tensor
    assert peak < model + 8 * tensor, peak / model  # not K models, not two: one and a few tensors
