"""Bad input on the cooking side: ``python -m soupjax.soup`` refuses it with one line and exit status 2,
and writes nothing (no soup directory, no report, no temporary file left behind).

Most cases run the real command line in a subprocess, as the user would; option values are refused
before JAX is imported, so those cost about a second each. Cases that need a cooked ``--out`` or a
simulated full disk cook in-process on ``tfds.testing.mock_data`` with a tiny ViT whose ingredients
are made from its init (no training).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from soupjax.io import checkpoints
from soupjax.cli import errors as cli_errors
from soupjax.io import files
from soupjax import cooking
from soupjax.cooking import provenance
from soupjax.cooking.evaluations import Evaluations
from soupjax.cooking import preflight
from test_train import init_variables, load_config

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "soupjax.soup: error: "


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soupjax.soup", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, and exactly one error line (the last of stderr) holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(PREFIX)]
    assert len(errors) == 1 and result.stderr.rstrip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _leftovers(directory: Path) -> list[str]:
    """Temporary files or directories of an interrupted write, anywhere under ``directory``."""
    return [str(p) for p in directory.rglob("*") if ".tmp" in p.name or p.name.startswith(".write-test")]


# ------------------------------------------------------------------------- options (before JAX loads)


@pytest.mark.parametrize("args, fragments", [
    (["--recipe=soup_of_the_day"], ["--recipe", "soup_of_the_day"]),
    (["--no_such_option=1"], ["no_such_option"]),
    (["stray"], ["unexpected arguments ['stray']"]),
    (["--pruned_passes=-1"], ["--pruned_passes=-1", ">= 1"]),
    (["--pruned_passes=0"], ["--pruned_passes=0", ">= 1"]),
    (["--learned_epochs=0"], ["--learned_epochs=0", ">= 1"]),
    (["--learned_epochs=-2"], ["--learned_epochs=-2"]),
    (["--learned_lr=0"], ["--learned_lr=0.0", "positive"]),
    (["--learned_lr=-0.1"], ["--learned_lr=-0.1", "positive"]),
    (["--recalibrate_bn=-1"], ["--recalibrate_bn=-1", ">= 0"]),
    (["--eval_batch_size=-8"], ["--eval_batch_size=-8", ">= 0"]),
    (["--memory_budget_mb=-1"], ["--memory_budget_mb=-1.0", ">= 0"]),
])
def test_bad_options_are_refused_at_once(tmp_path, args, fragments):
    result = _cli(*args, f"--workdir={tmp_path}/work", f"--out={tmp_path}/out", f"--ingredients={tmp_path}/none")
    _assert_refused(result, *fragments)
    assert list(tmp_path.iterdir()) == []  # not even the work directory


# -------------------------------------------------------------------------- unusable ingredients


def _tree(seed: int, classes: int = 10, nan: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(4, 3)).astype(np.float32)
    if nan:
        kernel[0, 0] = np.nan
    # The embedding makes the array data files (ocdbt.process_0/d/*) the checkpoint's largest.
    return {"params": {"dense": {"kernel": kernel}, "embedding": rng.normal(size=(64, 64)).astype(np.float32),
                       "head": {"kernel": np.zeros((3, classes), np.float32), "bias": np.zeros(classes, np.float32)}}}


def _write(root: Path, name: str, tree: dict, **meta) -> Path:
    return checkpoints.save_ingredient(root / name, tree, {"init_fingerprint": "f0",
                                                           "metrics": {"heldout": {"accuracy": 0.5}}, **meta})


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _break_meta_json(d: Path) -> None:
    (d / "b" / "meta.json").write_text('{"init_fingerprint": "f0", ')


def _future_format(d: Path) -> None:
    meta = json.loads((d / "b" / "meta.json").read_text())
    (d / "b" / "meta.json").write_text(json.dumps(meta | {"format_version": 99}))


def _remove_meta(d: Path) -> None:
    (d / "b" / "meta.json").unlink()


def _cut_in_half(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _truncate_array_file(d: Path) -> None:
    _cut_in_half(_largest_file(d / "b" / "variables"))


def _truncate_tree_metadata(d: Path) -> None:
    _cut_in_half(d / "b" / "variables" / "_METADATA")


def _delete_array_file(d: Path) -> None:
    _largest_file(d / "b" / "variables").unlink()


def _other_shape(d: Path) -> None:
    tree = _tree(1)
    tree["params"]["dense"]["kernel"] = np.zeros((4, 5), np.float32)
    _write(d, "b", tree)


def _other_classes(d: Path) -> None:
    _write(d, "b", _tree(1, classes=5))


def _all_nan(d: Path) -> None:
    _write(d, "a", _tree(0, nan=True))
    _write(d, "b", _tree(1, nan=True))


@pytest.mark.slow
@pytest.mark.parametrize("damage, fragments", [
    (_remove_meta, ["ingredient", "/b is incomplete: meta.json is missing"]),
    (_break_meta_json, ["b/meta.json is not valid JSON"]),
    (_future_format, ["b/meta.json has format_version 99", "reads ingredients up to version 1"]),
    (_truncate_array_file, ["ingredients/b: cannot read parameter 'params/embedding' of its variables/ checkpoint",
                            "truncated or corrupt"]),
    (_truncate_tree_metadata, ["ingredients/b: cannot read its variables/ checkpoint", "truncated or corrupt"]),
    (_delete_array_file, ["ingredients/b: cannot", "parameter 'params/embedding' of its variables/ checkpoint",
                          "truncated or corrupt"]),
    (_other_shape, ["params/dense/kernel", "(4, 3)", "(4, 5)"]),
    (_other_classes, ["ingredient b has 5 classes, a has 10"]),
    (_all_nan, ["every ingredient in", "NaN or Inf"]),
], ids=lambda x: x.__name__.lstrip("_") if callable(x) else None)
def test_unusable_ingredients_are_named(tmp_path, damage, fragments):
    ingredients = tmp_path / "ingredients"
    _write(ingredients, "a", _tree(0))
    _write(ingredients, "b", _tree(1))
    damage(ingredients)
    result = _cli("--recipe=uniform", f"--ingredients={ingredients}", f"--out={tmp_path}/out")
    _assert_refused(result, *fragments)
    assert not (tmp_path / "out").exists()
    if damage is _all_nan:  # each ingredient left out is named on one warning line first
        warned = [line for line in result.stderr.splitlines() if line.startswith("soupjax.soup: warning: ")]
        assert len(warned) == 2 and all("NaN or Inf" in line and "params/dense/kernel" in line for line in warned)


@pytest.mark.slow
def test_missing_or_empty_ingredients_directory_and_too_many_pairs(tmp_path):
    _assert_refused(_cli("--recipe=uniform", f"--ingredients={tmp_path}/nowhere", f"--out={tmp_path}/out"),
                    f"the ingredients directory {tmp_path}/nowhere does not exist")
    (tmp_path / "empty").mkdir()
    _assert_refused(_cli("--recipe=greedy", f"--ingredients={tmp_path}/empty", f"--out={tmp_path}/out"),
                    f"no ingredients found in {tmp_path}/empty")
    _write(tmp_path / "two", "a", _tree(0))
    _write(tmp_path / "two", "b", _tree(1))
    _assert_refused(_cli("--recipe=inspect", "--inspect_pairs=2", f"--ingredients={tmp_path}/two",
                         f"--out={tmp_path}/out"), "--inspect_pairs=2: 2 ingredients make only 1 pair(s)")
    assert not (tmp_path / "out").exists()


def test_library_refusals_are_input_errors(tmp_path):
    # The command line turns exactly these into one line; a library caller can catch them as ValueError.
    assert issubclass(preflight.PreflightError, cli_errors.InputError)
    assert issubclass(checkpoints.IngredientError, cli_errors.InputError)
    _write(tmp_path, "a", _tree(0))
    meta = checkpoints.load_meta(tmp_path / "a")
    assert meta["format_version"] == checkpoints.FORMAT_VERSION
    # An ingredient written before the field existed is version 1 and still loads.
    (tmp_path / "a" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "format_version"}))
    assert checkpoints.load_meta(tmp_path / "a")["init_fingerprint"] == "f0"
    (tmp_path / "a" / "meta.json").write_text("[1, 2]")
    with pytest.raises(checkpoints.IngredientError, match="holds a JSON list"):
        checkpoints.load_meta(tmp_path / "a")


# ------------------------------------------------------------------------ cooking with a real model


@pytest.fixture(scope="module")
def vit_ingredients(tmp_path_factory) -> Path:
    """Three tiny-ViT ingredients (the init plus a different small displacement each), no training."""
    root = tmp_path_factory.mktemp("vit") / "ingredients"
    config = load_config("fashion_mnist_vit", "testing")
    with tfds.testing.mock_data(num_examples=64):
        init = init_variables(config)
    for i in range(3):
        rng = np.random.default_rng(i)
        tree = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.01 * rng.normal(size=np.shape(x)).astype(
            np.asarray(x).dtype), init)
        checkpoints.save_ingredient(root / f"ing{i}", tree, {
            "config": config.to_dict(), "init_fingerprint": "f0",
            "metrics": {"heldout": {"accuracy": 0.1 * (i + 1)}}})
    return root


def _subset(src: Path, dst: Path, names: list[str]) -> Path:
    import shutil
    for name in names:
        shutil.copytree(src / name, dst / name)
    return dst


@pytest.mark.slow
def test_unknown_shift_and_unwritable_out_are_refused(vit_ingredients, tmp_path):
    result = _cli("--recipe=uniform", f"--ingredients={vit_ingredients}", "--shifts=shift/nonsense-3",
                  f"--out={tmp_path}/out")
    _assert_refused(result, "--shifts", "unknown split 'shift/nonsense-3'")
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("not a directory")
    _assert_refused(_cli("--recipe=uniform", f"--ingredients={vit_ingredients}", f"--out={tmp_path}/file"),
                    f"the output directory {tmp_path}/file (--out) is a file")
    assert (tmp_path / "file").read_text() == "not a directory"
    if os.geteuid() != 0:  # root writes anywhere: the library test below simulates it
        (tmp_path / "ro").mkdir(mode=0o555)
        _assert_refused(_cli("--recipe=uniform", f"--ingredients={vit_ingredients}", f"--out={tmp_path}/ro/out"),
                        f"the output directory {tmp_path}/ro/out (--out) is not writable")
        assert list((tmp_path / "ro").iterdir()) == []


def _refused_in_process(capsys, call) -> str:
    """Run ``call`` as the command line runs main, returning its one error line."""
    with pytest.raises(SystemExit) as exit_:
        cli_errors.exit_on_input_error("soupjax.soup", call)()
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, lines
    return lines[0]


def test_read_only_out_is_refused_before_any_work(vit_ingredients, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() != 0:
        parent.chmod(0o555)
    else:  # root ignores permissions: the file system says no as it would to anyone else
        real_mkdir = Path.mkdir

        def denied(self, *args, **kwargs):
            if self == parent or parent in self.parents:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)
        monkeypatch.setattr(Path, "mkdir", denied)
    evaluated = []
    monkeypatch.setattr(Evaluations, "evaluate", lambda *a, **k: evaluated.append(a))
    line = _refused_in_process(capsys, lambda: cooking.cook("uniform", vit_ingredients, parent / "out", shifts=[]))
    assert f"the output directory {parent}/out (--out) is not writable: Permission denied" in line
    assert evaluated == [] and list(parent.iterdir()) == []
    parent.chmod(0o755)


@pytest.mark.slow
def test_a_full_disk_leaves_no_half_written_soup_or_report(vit_ingredients, tmp_path, monkeypatch, capsys):
    real = files.write_files_atomic

    def full_at(victim: str):
        def write_files_atomic(writers):
            def half_then_full(write):
                def run(tmp: Path) -> None:
                    tmp.write_bytes(b"half")
                    raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
                return run
            return real({p: half_then_full(w) if Path(p).name == victim else w for p, w in writers.items()})
        return write_files_atomic

    out = tmp_path / "out"
    with tfds.testing.mock_data(num_examples=64):
        # A soup whose meta.json cannot be written: no soup directory, no staging directory.
        monkeypatch.setattr(files, "write_files_atomic", full_at("meta.json"))
        line = _refused_in_process(capsys, lambda: cooking.cook("uniform", vit_ingredients, out, shifts=[]))
        assert "no space left on the device" in line
        assert not (out / "uniform").exists() and not list(out.glob(".uniform*"))
        # A report whose third file cannot be written: none of its files is there.
        monkeypatch.setattr(files, "write_files_atomic", full_at("report.csv"))
        _refused_in_process(capsys, lambda: cooking.cook("uniform", vit_ingredients, out, shifts=[]))
        assert checkpoints.is_ingredient(out / "uniform")  # the soup was whole before the report failed
        assert not [p.name for p in out.iterdir() if p.name.startswith(("report", "scatter"))]
        assert _leftovers(out) == []
        # With space again, the rerun resumes: the soup is reused and the report written.
        monkeypatch.setattr(files, "write_files_atomic", real)
        cooking.cook("uniform", vit_ingredients, out, shifts=[])
    assert "uniform: cooked earlier, reused" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "report.csv", "scatter.png"}
    assert _leftovers(out) == []


@pytest.mark.slow
def test_a_different_soup_is_never_written_over_without_overwrite(vit_ingredients, tmp_path, capsys):
    out = tmp_path / "out"
    two = _subset(vit_ingredients, tmp_path / "two", ["ing0", "ing1"])
    with tfds.testing.mock_data(num_examples=64):
        cooking.cook("greedy", two, out, greedy_order="random", seed=0, shifts=[])
    kept = {p: p.read_bytes() for p in (out / "report.json", out / "greedy" / "meta.json", out / "report.md")}

    # Another seed through the command line: refused before anything is read or written, naming it.
    line = _assert_refused(_cli("--recipe=greedy", "--greedy_order=random", "--seed=1", "--shifts=",
                                f"--ingredients={two}", f"--out={out}"), "seed: 0 -> 1", "--overwrite")
    assert f"the report in {out}" in line or f"the greedy soup in {out}/greedy" in line
    # Another ingredient set and another order, in the library: the same refusal.
    (two / "ing2").symlink_to(vit_ingredients / "ing2", target_is_directory=True)
    with pytest.raises(cli_errors.InputError, match=r"new ingredients: ing2.*--overwrite"):
        cooking.cook("greedy", two, out, greedy_order="random", seed=0, shifts=[])
    (two / "ing2").unlink()
    with pytest.raises(cli_errors.InputError, match=r"greedy_order: 'random' -> 'sorted'"):
        cooking.cook("greedy", two, out, greedy_order="sorted", seed=0, shifts=[])
    assert {p: p.read_bytes() for p in kept} == kept and _leftovers(out) == []

    capsys.readouterr()
    with tfds.testing.mock_data(num_examples=64):
        # The same ingredients and options resume (the ingredients moved: names and meta.json decide).
        moved = two.rename(tmp_path / "moved")
        cooking.cook("greedy", moved, out, greedy_order="random", seed=0, shifts=[])
        assert "greedy: cooked earlier, reused" in capsys.readouterr().out
        assert (out / "greedy" / "meta.json").read_bytes() == kept[out / "greedy" / "meta.json"]
        # --overwrite replaces the soup and the report with the new ones.
        cooking.cook("greedy", moved, out, greedy_order="random", seed=1, shifts=[], overwrite=True)
    assert checkpoints.load_meta(out / "greedy")["options"]["seed"] == 1
    assert json.loads((out / "report.json").read_text())["meta"]["provenance"]["options"]["greedy"]["seed"] == 1


@pytest.mark.slow
def test_one_ingredient_is_every_soup_with_a_note(vit_ingredients, tmp_path, capsys):
    one = _subset(vit_ingredients, tmp_path / "one", ["ing1"])
    with tfds.testing.mock_data(num_examples=64):
        results = cooking.cook("all", one, tmp_path / "out", learned_epochs=1, shifts=[])
    assert "note: one ingredient (ing1): every soup is that ingredient" in capsys.readouterr().out
    rows = {row["name"]: row for row in results["soups"]}
    # Their init is unknown (a made-up fingerprint): the merge methods are left out, the rest cooked.
    assert set(rows) == {"best_ingredient", "uniform", "greedy", "pruned", "learned_global", "learned_layer",
                         "ensemble", "greedy_ensemble"}
    ingredient = checkpoints.load_variables(one / "ing1")
    for name in ("uniform", "greedy", "pruned", "learned_global", "learned_layer"):
        assert rows[name]["weights"] == [1.0], name
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                               checkpoints.load_variables(tmp_path / "out" / name), ingredient)
    for name in rows:
        assert rows[name]["test"]["accuracy"] == rows["best_ingredient"]["test"]["accuracy"], name


def test_another_recipe_may_be_cooked_into_the_same_out(tmp_path):
    """The report's provenance is compared in what every soup shares (ingredients, init, data, model,
    shifts, recalibration), not in the recipe and its options: `--recipe uniform`, then `--recipe greedy`
    into one --out is allowed; each soup's options are compared per soup."""
    common = {"ingredients": ["ing0", "ing1"], "ingredient_meta": {"ing0": "a", "ing1": "b"}, "init": "i",
              "data": "d", "model": "m", "shifts": [], "recalibrate_bn": 0}
    uniform = {**common, "recipe": "uniform", "learned_mode": "both", "options": {"uniform": {}}}
    greedy = {**common, "recipe": "greedy", "learned_mode": "global",
              "options": {"greedy": {"greedy_strict": False, "greedy_order": "sorted", "greedy_ties": "index",
                                     "seed": 0}}}
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"meta": {"provenance": uniform}}))
    provenance.refuse_changed_outputs(out, greedy, {})  # another recipe: not refused
    retrained = {**greedy, "ingredient_meta": {"ing0": "a", "ing1": "c"}}
    with pytest.raises(cli_errors.InputError, match=r"the report in .*changed since.*ing1.*--overwrite"):
        provenance.refuse_changed_outputs(out, retrained, {})
    with pytest.raises(cli_errors.InputError, match=r"shifts"):
        provenance.refuse_changed_outputs(out, {**greedy, "shifts": ["shift/x"]}, {})


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_an_out_overlapping_the_ingredients_is_refused(vit_ingredients, tmp_path, capsys, where):
    """A soup written into the ingredients' folder would become an ingredient of every later cook: an
    --out that is the ingredients' folder, lies inside it or holds it is refused, naming both, before
    anything is written."""
    ingredients = _subset(vit_ingredients, tmp_path / "project" / "ingredients", ["ing0", "ing1"])
    out = {"same": ingredients, "inside": ingredients / "soups", "around": tmp_path / "project"}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    line = _refused_in_process(capsys, lambda: cooking.cook("uniform", ingredients, out, shifts=[]))
    assert f"--out={out}" in line and f"--ingredients={ingredients}" in line and "overlap" in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_a_soup_among_the_ingredients_is_not_an_ingredient(vit_ingredients, tmp_path):
    """A soup saved into the ingredients' folder (here copied there, as an --out inside it once did) is
    left out of the ingredients with a warning naming it: K ingredients stay K."""
    import shutil
    from soupjax import api
    from soupjax.cooking.preflight import IngredientWarning
    ingredients = _subset(vit_ingredients, tmp_path / "ingredients", ["ing0", "ing1"])
    with tfds.testing.mock_data(num_examples=64):
        cooking.cook("uniform", ingredients, tmp_path / "out", shifts=[])
    shutil.copytree(tmp_path / "out" / "uniform", ingredients / "uniform")
    with pytest.warns(IngredientWarning, match=r"uniform is a soup \(uniform\) cooked by soupjax, not an ingredient"):
        found = api.load_ingredients(ingredients)
    assert [ing.name for ing in found] == ["ing0", "ing1"]
