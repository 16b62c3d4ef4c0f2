"""Bad input on the training side ends in one line, exit status 2, and nothing written.

Through the real command lines (``soupjax.finetune``, ``soupjax.experiment``): config files, options
and fields; data sets that are not there offline; held-out splits that cannot be used; directories
that cannot be written or fill up; finished work that a changed config would silently replace.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/fashion_mnist_vit.py"


def run_cli(program: str, args: list[str], workdir: Path, **env) -> subprocess.CompletedProcess:
    """``python -m soupjax.PROGRAM ARGS --workdir WORKDIR``, as a user runs it."""
    return subprocess.run([sys.executable, "-m", f"soupjax.{program}", *args, f"--workdir={workdir}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def assert_refused(out: subprocess.CompletedProcess, program: str, *expected: str, imports_tf: bool = False) -> str:
    """Exit status 2 and one line on stderr, ``soupjax.PROGRAM: error: ...``, holding ``expected``.

    With ``imports_tf`` the check ran after TensorFlow was loaded, whose C++ start-up logs
    (oneDNN, absl::InitializeLog) precede it on stderr: the error is then the last line, and the only
    one of soupjax's.
    """
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    if imports_tf:
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
        lines = [line for line in lines if line.startswith("soupjax.")] if lines[-1].startswith("soupjax.") else lines
    assert len(lines) == 1 and lines[0].startswith(f"soupjax.{program}: error: "), out.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(workdir: Path) -> None:
    assert not workdir.exists() or not any(workdir.iterdir()), sorted(p.name for p in workdir.iterdir())


@pytest.fixture
def config_files(tmp_path) -> dict[str, str]:
    """Config files that are broken in the ways a user's own config can be."""
    files = {
        "no_get_config": "from soupjax.config.base import base_config\nCONFIG = base_config()\n",
        "raises": "def get_config(arg=None):\n    raise RuntimeError('the cluster is not reachable')\n",
        "syntax": "def get_config(arg=None)\n    return None\n",
    }
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    return {name: str(tmp_path / f"{name}.py") for name in files}


FINETUNE_CASES = {
    "unknown_field": ([f"--config={CONFIG}:testing", "--config.no_such_key=1"],
                      ["--config.no_such_key", "no field 'no_such_key'"]),
    "unknown_nested_field": ([f"--config={CONFIG}:testing", "--config.data.heldot=3"],
                             ["config.data has no field 'heldot'", "did you mean heldout"]),
    "negative_sweep": ([f"--config={CONFIG}:testing,sweep=-2"], ["option sweep=-2 must be at least 0"]),
    "negative_count_field": ([f"--config={CONFIG}:testing", "--config.sweep.count=-1"],
                             ["config.sweep.count=-1 must be at least 0"]),
    "zero_batch": ([f"--config={CONFIG}:testing", "--config.batch_size=0"], ["config.batch_size=0 must be at least 1"]),
    "unknown_option": ([f"--config={CONFIG}:testing,sweeps=3"], ["unknown option(s) ['sweeps']"]),
    "missing_file": (["--config=configs/no_such_config.py:testing"], ["config file configs/no_such_config.py not found"]),
    "no_config": ([], ["--config is required"]),
    "positional": ([f"--config={CONFIG}:testing", "extra"], ["unexpected arguments ['extra']"]),
    "only_out_of_range": ([f"--config={CONFIG}:testing,sweep=2", "--only=0,5"],
                          ["--only 5: the sweep has 2 ingredient(s), indices 0 to 1"]),
    "only_not_an_index": ([f"--config={CONFIG}:testing,sweep=2", "--only=first"], ["--only 'first': not an ingredient index"]),
}


@pytest.mark.parametrize("name,expected", [
    ("no_get_config", "defines no get_config(options) function"),
    ("raises", "get_config failed: RuntimeError: the cluster is not reachable"),
    ("syntax", "cannot be loaded: SyntaxError"),
])
def test_both_clis_name_a_broken_config_file(name, expected, config_files, tmp_path):
    path = config_files[name]
    workdir = tmp_path / "work"
    assert_refused(run_cli("finetune", [f"--config={path}:testing"], workdir), "finetune", path, expected)
    # soupjax.experiment reads its --config and --sweep_config itself (not through absl's config flag).
    flag = "--config" if name == "raises" else "--sweep_config"
    assert_refused(run_cli("experiment", [f"{flag}={path}"], workdir), "experiment", path, expected)
    assert_nothing_written(workdir)


EXPERIMENT_CASES = {
    "zero_ingredients": (["--ingredients=0"], ["--ingredients=0"]),
    "negative_ingredients": (["--ingredients=-3"], ["--ingredients=-3"]),
    "negative_seed": (["--seed=-1"], ["--seed=-1"]),
    "missing_config": (["--config=configs/nope.py"], ["config file configs/nope.py not found"]),
    "sweep_config_option": ([f"--sweep_config={CONFIG}:testing,sweep=-2"], ["option sweep=-2 must be at least 0"]),
    "sweep_config_missing": (["--sweep_config=nope.py:testing"], ["config file nope.py not found"]),
    "study_flag_with_sweep_config": ([f"--sweep_config={CONFIG}:testing", "--quick"], ["--quick belong"]),
}


CLI_CASES = {("finetune", case): value for case, value in FINETUNE_CASES.items()}
CLI_CASES.update({("experiment", case): value for case, value in EXPERIMENT_CASES.items()})


@pytest.mark.parametrize("program,case", sorted(CLI_CASES))
def test_cli_refuses_bad_config_or_flags_in_one_line(program, case, tmp_path):
    args, expected = CLI_CASES[program, case]
    workdir = tmp_path / "work"
    assert_refused(run_cli(program, args, workdir), program, *expected)
    assert_nothing_written(workdir)


def test_finetune_names_a_data_set_that_is_not_there_offline(tmp_path):
    empty = tmp_path / "tfds"
    empty.mkdir()
    workdir = tmp_path / "work"
    out = run_cli("finetune", [f"--config={CONFIG}:testing", "--config.data.name=cifar100",
                               f"--config.data.data_dir={empty}"], workdir)
    assert_refused(out, "finetune", "data set 'cifar100' is not prepared in data_dir", str(empty),
                   "soupjax does not download", imports_tf=True)
    assert_nothing_written(workdir)
    assert not any(empty.iterdir()), "nothing was downloaded or prepared"


def test_finetune_refuses_an_empty_heldout_split(tmp_path):
    workdir = tmp_path / "work"
    out = run_cli("finetune", [f"--config={CONFIG}:testing", "--config.data.heldout=0"], workdir)
    assert_refused(out, "finetune", "data.heldout=0", "needs a held-out split")
    assert_nothing_written(workdir)


def test_heldout_that_leaves_no_training_or_no_kept_class_is_refused_with_the_numbers(fashion_mnist_data_dir):
    from soupjax import data
    from soupjax.cli.errors import InputError
    from test_train import load_config
    cfg = load_config("fashion_mnist_vit", "testing").data
    cfg.data_dir = fashion_mnist_data_dir
    data.check_heldout(cfg)  # the testing config's 16 held-out images: fine
    cfg.heldout = 0
    with pytest.raises(InputError, match=r"data.heldout=0: fine-tuning needs a held-out split"):
        data.check_heldout(cfg)
    cfg.heldout = 60000
    with pytest.raises(InputError, match=r"holds out 60000 of the 60000 examples .* between 1 and 59999"):
        data.check_heldout(cfg)
    # The held-out slice is the split's last examples, whatever classes are kept: hold out one image and
    # keep only a class it is not of, and no held-out example remains.
    cfg.heldout = 1
    (batch,) = data.eval_batches(cfg, "heldout", 1)
    cfg.classes = [(int(batch["label"][0]) + 1) % 10]
    with pytest.raises(InputError, match=r"data.heldout=1 of 60000 training examples leaves no heldout examples "
                                          r"of data.classes=\[\d\]"):
        data.check_heldout(cfg)


def test_heldout_and_finetuning_splits_are_disjoint_by_construction():
    """The config cannot express an overlap: the held-out split is the tail the training split stops at."""
    from soupjax.data import pipeline
    from test_train import load_config
    import tensorflow_datasets as tfds
    cfg = load_config("fashion_mnist_vit", "testing").data
    with tfds.testing.mock_data(num_examples=64):
        train, heldout = pipeline.resolve(cfg, "train"), pipeline.resolve(cfg, "heldout")
    assert (train.tfds_split, heldout.tfds_split) == ("train[:48]", "train[48:]")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555; the patched test below covers it")
def test_finetune_names_a_read_only_work_directory(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    workdir.chmod(0o555)
    try:
        out = run_cli("finetune", [f"--config={CONFIG}:testing"], workdir)
    finally:
        workdir.chmod(0o755)
    assert_refused(out, "finetune", str(workdir), "read-only", imports_tf=True)
    assert_nothing_written(workdir)


def _finetune_command(runs, workdir):
    """What ``soupjax.finetune`` runs, with its error handling, in this process (importing the module
    itself would define its absl flags a second time beside soupjax.experiment's)."""
    from soupjax.training import planning
    from soupjax.cli.errors import exit_on_input_error
    return exit_on_input_error("soupjax.finetune", lambda: planning.finetune_all(runs, workdir))


def test_read_only_work_directory_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """The file system refuses a file in the work directory, as a read-only mount would (even to root,
    whom chmod does not stop)."""
    import tempfile
    from soupjax.training import sweep
    from test_train import load_config
    workdir = tmp_path / "work"
    workdir.mkdir()
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == workdir:
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / "probe"))
        return real_mkstemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    runs = sweep.ingredient_configs(load_config("fashion_mnist_vit", "testing"))
    with pytest.raises(SystemExit) as exit_:
        _finetune_command(runs, workdir)()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"soupjax.finetune: error: cannot write {workdir / 'ingredients'}: Permission denied ({workdir})"]
    assert_nothing_written(workdir)


@pytest.mark.slow
def test_a_full_disk_leaves_no_half_written_ingredient_and_the_rerun_finishes(tmp_path, monkeypatch, capsys):
    import tensorflow_datasets as tfds
    from soupjax.io import checkpoints
    from soupjax.io import files
    from soupjax.training import sweep
    from test_train import load_config
    runs = sweep.ingredient_configs(load_config("fashion_mnist_vit", "testing"))
    real_write = files.write_json_atomic

    def full_disk(path, obj):  # the disk fills up while the finished ingredient's metadata is written
        if Path(path).name == checkpoints.META_FILE and Path(path).parent.name.startswith(".ingredient.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, obj)

    with tfds.testing.mock_data(num_examples=64):
        monkeypatch.setattr(files, "write_json_atomic", full_disk)
        with pytest.raises(SystemExit) as exit_:
            _finetune_command(runs, tmp_path)()
        assert exit_.value.code == 2
        # Training reported its progress on stderr before the disk filled up; then one line says so.
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("soupjax.finetune: error: no space left on the device while writing "), err
        assert "Traceback" not in "".join(err) and sum("error" in line for line in err) == 1, err
        ingredients = tmp_path / "ingredients"
        # The start it was fine-tuned from was written whole before training; no ingredient, no staging.
        assert sorted(p.name for p in ingredients.iterdir()) == ["start"], "no ingredient, no staging left behind"

        monkeypatch.setattr(files, "write_json_atomic", real_write)
        (meta,) = _finetune_command(runs, tmp_path)()
    assert meta["resumed_from_step"] == meta["steps"], "the rerun resumed from the saved training state"
    assert checkpoints.list_ingredients(ingredients) == [ingredients / "ingredient"]


def test_replacing_a_directory_keeps_the_old_one_until_the_new_one_is_in(tmp_path, monkeypatch):
    from soupjax.io import files
    old, new = tmp_path / "ingredient", tmp_path / ".replacing" / "ingredient"
    for directory, text in ((old, "old"), (new, "new")):
        directory.mkdir(parents=True)
        (directory / "meta.json").write_text(text)
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):  # killed between moving the old one aside and renaming the new one in
        calls.append((Path(src), Path(dst)))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        files.replace_directory(new, old)
    assert (tmp_path / ".ingredient.replaced" / "meta.json").read_text() == "old"
    assert (new / "meta.json").read_text() == "new", "both versions are whole on disk"
    monkeypatch.setattr(os, "replace", real_replace)
    files.replace_directory(new, old)
    assert (old / "meta.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingredient"]


def test_an_ingredient_fine_tuned_from_a_replaced_init_is_not_skipped(tmp_path, monkeypatch):
    from soupjax.io import checkpoints
    from soupjax.training import planning
    from soupjax.cli.errors import InputError
    from test_train import load_config
    config = load_config("fashion_mnist_vit", "testing")
    upstream = tmp_path / "upstream"
    config.init_from.path = str(upstream)
    target, train_dir = tmp_path / "ingredients" / "ingredient", tmp_path / "train" / "ingredient"
    metas = {upstream: {"name": "upstream", "metrics": {"test": 0.9}}}
    monkeypatch.setattr(checkpoints, "is_ingredient", lambda path: Path(path) in metas)
    monkeypatch.setattr(checkpoints, "load_meta", lambda path: metas[Path(path)])
    metas[target] = {"config": config.to_dict(), "init_ingredient": planning.init_ingredient_id(config)}
    assert planning.plan_run("ingredient", config, {}, target, train_dir).meta is not None, "same init: skipped"
    metas[upstream] = {"name": "upstream", "metrics": {"test": 0.8}}  # the upstream model made again
    with pytest.raises(InputError, match="fine-tuned from another ingredient .* replaced since.*--overwrite"):
        planning.plan_run("ingredient", config, {}, target, train_dir)
    assert planning.plan_run("ingredient", config, {}, target, train_dir, overwrite=True).replace


@pytest.mark.slow
def test_a_changed_config_over_finished_ingredients_is_refused_unless_overwrite(finetuned_workdir, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(finetuned_workdir["workdir"], workdir)
    first, second = workdir / "ingredients" / "sweep0_000", workdir / "ingredients" / "sweep0_001"
    before = {p: (p / "meta.json").read_bytes() for p in (first, second)}
    cmd = finetuned_workdir["cmd"][3:]  # --config ... --config.data.data_dir=...
    changed = [cmd[0], cmd[1].replace("sweep=2", "sweep=1"), *cmd[2:], "--config.grad_clip_norm=0.5"]

    out = run_cli("finetune", changed, workdir)
    assert_refused(out, "finetune", str(first), "grad_clip_norm: 1.0 != 0.5", "--overwrite", imports_tf=True)
    assert {p: (p / "meta.json").read_bytes() for p in (first, second)} == before
    assert sorted(p.name for p in (workdir / "ingredients").iterdir()) == ["start", "sweep0_000", "sweep0_001"]
    start = (workdir / "ingredients" / "start" / "meta.json").read_bytes()

    out = run_cli("finetune", [*changed, "--overwrite"], workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((first / "meta.json").read_text())["config"]["grad_clip_norm"] == 0.5
    assert (second / "meta.json").read_bytes() == before[second], "only the ingredient asked for was replaced"
    # The clipping norm is not part of the start: the same start, not written again.
    assert (workdir / "ingredients" / "start" / "meta.json").read_bytes() == start
    for parent, start_too in ((workdir / "ingredients", ["start"]), (workdir / "train", [])):
        assert sorted(p.name for p in parent.iterdir()) == [*start_too, "sweep0_000", "sweep0_001"], "no staging left"


def test_machines_that_split_a_sweep_with_only_make_the_same_ingredients_as_one():
    """--only: the shares of several machines are exactly the runs of the whole sweep (docs/multihost.md)."""
    from soupjax.config import base as config_base
    from soupjax.training import sweep
    runs = sweep.ingredient_configs(config_base.load_config(f"{ROOT / CONFIG}:testing,sweep=4"))
    shares = sweep.select(runs, ["2", "0"]) + sweep.select(runs, ["1", "3", "1"])
    assert sorted(name for name, _, _ in shares) == [name for name, _, _ in runs]
    for name, config, hparams in shares:
        whole = dict((n, (c, h)) for n, c, h in runs)[name]
        assert hparams == whole[1] and config.to_dict() == whole[0].to_dict()


# -- resuming and recovering at library level -----------------------------------------------------------


def _fake_ingredient(directory: Path, config, **extra) -> Path:
    """What checkpoints.is_ingredient and load_meta look at, and what run_plan prints: a meta.json with
    the config and metrics, an empty variables/ (nothing here loads it)."""
    (directory / "variables").mkdir(parents=True)
    meta = {"name": directory.name, "config": config.to_dict(), "train_seconds": 1.0,
            "train_images_per_second": 1.0,
            "metrics": {"heldout": {"accuracy": 0.5}, "test": {"accuracy": 0.5}}, **extra}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def _no_training(monkeypatch):
    from soupjax.training import train

    def refuse(*args, **kwargs):
        raise AssertionError("trained again: the finished ingredient should have been used")
    monkeypatch.setattr(train, "train_and_evaluate", refuse)


def test_a_resumed_run_may_read_its_data_elsewhere_or_belong_to_an_extended_sweep(tmp_path):
    """What planning.plan_run lets differ (config_base.MAY_DIFFER), train.check_same_config lets differ
    too: an 8-ingredient sweep killed mid-ingredient and extended to 16, or moved to another data_dir,
    resumes instead of failing once training starts."""
    import copy
    from soupjax.training import planning
    from soupjax.training import train
    from soupjax.cli.errors import InputError
    from test_train import load_config
    config = load_config("fashion_mnist_vit", "testing,sweep=8")
    train_dir = tmp_path / "train" / "sweep0_003"
    state = train_dir / "config.json"
    train.check_same_config(state, config, "the training state")  # the first run writes config.json
    later = copy.deepcopy(config)
    later.sweep.count, later.data.data_dir = 16, str(tmp_path / "elsewhere")
    run = planning.plan_run("sweep0_003", later, {}, tmp_path / "ingredients" / "sweep0_003", train_dir)
    assert run.meta is None and not run.replace, "the plan resumes it"
    train.check_same_config(state, later, "the training state")  # and so does training
    later.learning_rate *= 2
    with pytest.raises(InputError, match="learning_rate"):
        train.check_same_config(state, later, "the training state")


def test_a_kill_while_swapping_in_a_replacement_neither_retrains_nor_leaves_staging(tmp_path, monkeypatch, capsys):
    """Killed between files.replace_directory's two renames: the target is missing, the new ingredient
    complete in .replacing/, the old one in .NAME.replaced. The rerun swaps the new one in."""
    import copy
    from soupjax.io import checkpoints
    from soupjax.io import files
    from soupjax.training import planning
    from test_train import load_config
    old_config = load_config("fashion_mnist_vit", "testing")
    config = copy.deepcopy(old_config)
    config.learning_rate *= 2
    ingredients, train_root = tmp_path / "ingredients", tmp_path / "train"
    target = ingredients / "ingredient"
    _fake_ingredient(files.replaced_name(target), old_config)
    _fake_ingredient(ingredients / planning.STAGING / "ingredient", config)
    (train_root / "ingredient").mkdir(parents=True)
    (train_root / "ingredient" / "config.json").write_text(json.dumps(config.to_dict()))
    _no_training(monkeypatch)
    (run,) = plan = planning.plan_runs([("ingredient", config, {})], ingredients, train_root)
    assert run.replace, "without --overwrite: the config asked for is the staged one"
    planning.run_plan(plan)
    assert checkpoints.load_meta(target)["config"]["learning_rate"] == config.learning_rate
    assert sorted(p.name for p in ingredients.iterdir()) == ["ingredient"], "no staging, nothing aside"


def test_an_ingredient_left_aside_by_a_killed_save_is_put_back(tmp_path, monkeypatch):
    """save_ingredient replaces an ingredient through files.replace_directory: killed between its
    renames, the old ingredient is whole at .NAME.replaced, and the next plan puts it back."""
    import numpy as np
    from soupjax.io import checkpoints
    from soupjax.io import files
    from soupjax.training import planning
    from test_train import load_config
    config = load_config("fashion_mnist_vit", "testing")
    target = tmp_path / "ingredients" / "ingredient"
    variables = {"params": {"w": np.arange(4, dtype=np.float32)}}
    meta = json.loads(json.dumps({"config": config.to_dict(), "train_seconds": 1.0, "train_images_per_second": 1.0,
                                  "metrics": {"heldout": {"accuracy": 0.5}, "test": {"accuracy": 0.5}}}))
    checkpoints.save_ingredient(target, variables, {**meta, "name": "first"})
    real_replace = os.replace

    class Killed(BaseException):
        """Stands for SIGKILL: no handler, but raised where the kill would land."""

    def killed_renaming_the_new_one_in(src, dst):
        if Path(dst) == target and Path(src).name.startswith(".ingredient.tmp-"):
            raise Killed
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_renaming_the_new_one_in)
    with pytest.raises(Killed):
        checkpoints.save_ingredient(target, variables, {**meta, "name": "second"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists() and checkpoints.load_meta(files.replaced_name(target))["name"] == "first"

    _no_training(monkeypatch)
    (run,) = plan = planning.plan_runs([("ingredient", config, {})], target.parent, tmp_path / "train")
    assert run.meta is not None and run.restore_from == files.replaced_name(target)
    planning.run_plan(plan)
    assert checkpoints.load_meta(target)["name"] == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["ingredient"]


def test_a_corrupt_meta_json_is_replaced_with_overwrite(tmp_path):
    from soupjax.io import checkpoints
    from soupjax.training import planning
    from test_train import load_config
    config = load_config("fashion_mnist_vit", "testing")
    target = _fake_ingredient(tmp_path / "ingredients" / "ingredient", config)
    (target / "meta.json").write_text("{not json")
    with pytest.raises(checkpoints.IngredientError, match=r"meta.json is not valid JSON.*--overwrite"):
        planning.plan_run("ingredient", config, {}, target, tmp_path / "train" / "ingredient")
    run = planning.plan_run("ingredient", config, {}, target, tmp_path / "train" / "ingredient", overwrite=True)
    assert run.replace and run.meta is None


def test_only_a_cut_last_line_of_metrics_is_dropped(tmp_path):
    from soupjax.training import train
    from soupjax.cli.errors import InputError
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert train.read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "loss": 2.0}\ngarbage\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl, line 2: not a JSON record"):
        train.read_metrics(path)
