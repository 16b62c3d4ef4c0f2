"""Paths on Cloud Storage (issue 19, section 1), against a local emulator of its JSON API.

``gcp-storage-emulator`` (a test dependency only) serves on 127.0.0.1 for this module; gcsfs (what
``etils.epath`` and soupjax's io layer use for ``gs://``) finds it through ``STORAGE_EMULATOR_HOST`` and
TensorStore (orbax's arrays, the per-tensor reads) through ``TENSORSTORE_GCS_HTTP_URL``. TensorFlow's
own GCS file system (``tf.io.gfile``, which TFDS's readers use for a ``data_dir`` on ``gs://``) has no
setting for another endpoint and is not tested here.

The emulator leaves one header out that real Cloud Storage sends with every download,
``x-goog-generation``: TensorStore's OCDBT (orbax's training checkpoints) reads its manifest's
generation from it and fails on "Malformed StorageGeneration" without it, so the fixture's emulator
adds it (tests/gcs_emulator.py).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("gcsfs")

from soupjax.cli.errors import InputError  # noqa: E402
from soupjax.io import checkpoints, files  # noqa: E402

import gcs_emulator  # noqa: E402

BUCKET = "soupjax-test"
@pytest.fixture(scope="module")
def bucket():
    """``gs://soupjax-test``, an empty bucket on an emulator started for this module and stopped after it."""
    with gcs_emulator.running(BUCKET):
        yield f"gs://{BUCKET}"


def _variables(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"params": {"dense": {"kernel": rng.normal(size=(8, 16)).astype(np.float32),
                                 "bias": rng.normal(size=(16,)).astype(np.float32)},
                       "head": {"kernel": rng.normal(size=(16, 4)).astype(np.float32)}}}


def _objects(url: str) -> list[str]:
    fs, key = files.object_store(url)
    return sorted(fs.find(key))


def test_paths_stay_urls():
    assert files.is_url("gs://b/x") and not files.is_url("/tmp/x") and not files.is_url("x")
    assert os.fspath(files.absolute("gs://b/work/ingredients")) == "gs://b/work/ingredients"
    assert os.fspath(files.absolute("gs://b/work") / "soups") == "gs://b/work/soups"
    assert files.absolute("runs/x") == files.Path("runs/x").absolute()


def test_ingredients_in_a_bucket(bucket, tmp_path):
    """Saved, listed, read whole and per tensor; unfinished ones (no marker) not listed; the uniform
    soup streamed from the bucket equals the one from local disk."""
    from soupjax.arithmetic import soups
    root = f"{bucket}/work/ingredients"
    for i in range(3):
        checkpoints.save_ingredient(f"{root}/run{i}", _variables(i), {"i": i},
                                    arrays={"logits": np.full((2, 4), i, np.float32)})
        checkpoints.save_ingredient(tmp_path / f"run{i}", _variables(i), {"i": i})
    assert [os.fspath(p) for p in checkpoints.list_ingredients(root)] == [f"{root}/run{i}" for i in range(3)]
    assert f"{root[5:]}/run0/{files.MARKER}" in _objects(root)
    assert checkpoints.load_meta(f"{root}/run1")["i"] == 1
    np.testing.assert_array_equal(checkpoints.load_variables(f"{root}/run2")["params"]["head"]["kernel"],
                                  _variables(2)["params"]["head"]["kernel"])
    from_bucket = soups.uniform_by_tensor([checkpoints.tensor_source(f"{root}/run{i}") for i in range(3)])
    from_disk = soups.uniform_by_tensor([checkpoints.tensor_source(tmp_path / f"run{i}") for i in range(3)])
    import jax
    for a, b in zip(jax.tree_util.tree_leaves(from_bucket), jax.tree_util.tree_leaves(from_disk)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A save that never wrote its marker (killed) is not an ingredient: not listed, not skipped as done.
    files.uncommit(f"{root}/run1")
    assert not checkpoints.is_ingredient(f"{root}/run1")
    assert [os.fspath(p) for p in checkpoints.list_ingredients(root)] == [f"{root}/run0", f"{root}/run2"]


def test_overwrite_keeps_the_old_until_the_new_is_whole(bucket, monkeypatch):
    where = f"{bucket}/overwrite/a"
    checkpoints.save_ingredient(where, _variables(0), {"v": "old"})

    def fail(*_a, **_k):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(files, "write_json_atomic", fail)  # fails after the variables were written
        with pytest.raises(OSError, match="disk full"):
            checkpoints.save_ingredient(where, _variables(1), {"v": "new"})
    assert checkpoints.is_ingredient(where) and checkpoints.load_meta(where)["v"] == "old"
    assert all(".tmp-" not in o for o in _objects(f"{bucket}/overwrite"))  # the staging was removed
    checkpoints.save_ingredient(where, _variables(1), {"v": "new"})
    assert checkpoints.load_meta(where)["v"] == "new"
    np.testing.assert_array_equal(checkpoints.load_variables(where)["params"]["head"]["kernel"],
                                  _variables(1)["params"]["head"]["kernel"])
    assert all(".tmp-" not in o for o in _objects(f"{bucket}/overwrite"))


def test_bad_input_through_the_bucket(bucket):
    """No such bucket, and a tensor object cut short: one line each, naming what is wrong."""
    assert files.writable_problem("gs://no-such-bucket-here/work", create=True) == \
        "no such bucket: gs://no-such-bucket-here"
    assert files.writable_problem(f"{bucket}/fine", create=True) is None
    where = f"{bucket}/cut/a"
    checkpoints.save_ingredient(where, _variables(3), {})
    fs, _ = files.object_store(where)
    data = [o for o in _objects(where) if "/d/" in o]
    for obj in data:  # cut every data object short
        fs.pipe_file(obj, fs.cat_file(obj)[:7])
    with pytest.raises(InputError) as e:
        source = checkpoints.tensor_source(where)
        for p in source.paths:
            source.read(p)
    message = str(e.value)
    assert "\n" not in message and where in message and "truncated or corrupt" in message


def test_pretrained_init_from_the_bucket(bucket, tmp_path):
    """``init=gs://.../ViT.npz``: the weights read from the bucket are those read from local disk; a
    missing one is named by its URL."""
    import jax
    from soupjax.importers.dispatch import load_pretrained
    from soupjax.io.trees import flatten
    from soupjax.models import get_model
    model = get_model("vit-testing", 10)
    # Shapes only (nothing compiled): every parameter is loaded from the file, none kept from the init.
    init = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
    rng = np.random.default_rng(0)
    local = tmp_path / "ViT.npz"
    np.savez(local, **{k: rng.normal(size=v.shape).astype(v.dtype) for k, v in flatten(init["params"]).items()})
    url = f"{bucket}/pretrained/ViT.npz"
    files.as_path(url).write_bytes(local.read_bytes())
    from_bucket, from_disk = flatten(load_pretrained(url, init)), flatten(load_pretrained(local, init))
    assert set(from_bucket) == set(from_disk)
    for name in from_disk:
        np.testing.assert_array_equal(np.asarray(from_bucket[name]), np.asarray(from_disk[name]), err_msg=name)
    with pytest.raises(FileNotFoundError, match=f"{bucket}/pretrained/missing.npz"):
        load_pretrained(f"{bucket}/pretrained/missing.npz", init)


def test_results_get_the_umask_permissions(tmp_path):
    """Staged in mkdtemp (0700) and renamed: the finished directory has what the umask gives (0755)."""
    old = os.umask(0o022)
    try:
        directory = checkpoints.save_ingredient(tmp_path / "ingredient", _variables(0), {})
    finally:
        os.umask(old)
    assert oct(os.stat(directory).st_mode & 0o777) == oct(0o755)


@pytest.mark.slow
def test_sweep_and_cook_in_the_bucket(bucket, finetuned_workdir, fashion_mnist_data_dir, tmp_path):
    """``finetune --config ...:testing,sweep=2 --workdir gs://...`` killed (SIGKILL) once the first
    ingredient is committed, rerun to the end (the first skipped as finished, both bit-identical to the
    same sweep made on local disk); a copy of one without its marker beside them, which must not be
    cooked; ``soup --recipe uniform,greedy --workdir gs://...``, the report read back from the bucket;
    then an --out in a bucket that does not exist: one line, nothing written."""
    import signal
    import subprocess as sp
    from pathlib import Path
    work = f"{bucket}/cook/work"
    fs, key = files.object_store(work)
    env = dict(finetuned_workdir["env"], **{k: os.environ[k] for k in (
        "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "NO_GCE_CHECK", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
        "EPATH_USE_TF")})
    root = Path(__file__).resolve().parents[1]
    finetune = [sys.executable, "-m", "soupjax.finetune", "--config", "configs/fashion_mnist_vit.py:testing,sweep=2",
                f"--config.data.data_dir={fashion_mnist_data_dir}", "--workdir", work]
    marker = f"{key}/ingredients/sweep0_000/{files.MARKER}"
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a full pipe would stall the run
        first = sp.Popen(finetune, env=env, stdout=sp.DEVNULL, stderr=stderr, cwd=root)
        try:
            while first.poll() is None and not fs.exists(marker):
                time.sleep(0.05)
                fs.invalidate_cache()
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]  # not finished
    assert not checkpoints.is_ingredient(f"{work}/ingredients/sweep0_001")
    out = sp.run(finetune, env=env, capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sweep0_000: finished earlier, skipped" in out.stdout, out.stdout
    import jax
    for name in ("sweep0_000", "sweep0_001"):
        here = checkpoints.load_variables(finetuned_workdir["workdir"] / "ingredients" / name)
        there = checkpoints.load_variables(f"{work}/ingredients/{name}")
        for a, b in zip(jax.tree_util.tree_leaves(here), jax.tree_util.tree_leaves(there), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for obj in fs.find(f"{key}/ingredients/sweep0_000"):  # a copy without its marker: a killed upload
        if not obj.endswith(files.MARKER):
            fs.copy(obj, f"{key}/ingredients/unfinished" + obj[len(f"{key}/ingredients/sweep0_000"):])
    cmd = [sys.executable, "-m", "soupjax.soup", "--recipe", "uniform,greedy", "--workdir", work, "--shifts=",
           f"--data_dir={fashion_mnist_data_dir}"]
    out = sp.run(cmd, env=env, capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (files.as_path(f"{work}/soups") / "report.json").read_text()
    assert "unfinished" not in report and "sweep0_000" in report and "sweep0_001" in report
    for name in ("uniform", "greedy"):
        assert checkpoints.is_ingredient(f"{work}/soups/{name}")
    assert not (root / "gs:").exists() and not Path("/gs").exists()  # nothing became a local folder
    bad = sp.run([*cmd[:5], "--workdir", work, "--out", "gs://no-such-bucket-here/soups", "--shifts=",
                  f"--data_dir={fashion_mnist_data_dir}"], env=env, capture_output=True, text=True, cwd=root,
                 timeout=300)
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if "no such bucket" in line]
    assert errors and "Traceback" not in bad.stderr, bad.stderr[-3000:]
