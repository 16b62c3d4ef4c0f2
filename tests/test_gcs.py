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

import json
import os
import sys
import time
from pathlib import Path

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


def test_decoded_copies_and_the_compilation_cache_in_a_bucket(bucket, tmp_path):
    """A data set in a bucket keeps its decoded splits and labels there (decoded_cache), read back as
    written; a changed data set directory gives another name. The XLA compilation cache of a work
    directory in a bucket (``compilation_cache_in``) is written there, by JAX itself: in a subprocess,
    since the cache directory is a process-wide setting."""
    import subprocess
    from soupjax.data import decoded_cache
    data_dir = f"{bucket}/tfds/fashion_mnist_local/1.0.0"
    files.as_path(f"{data_dir}/dataset_info.json").write_text("{}")
    what = ("fashion_mnist_local/1.0.0", "test", 0, None, [28, 28, 1])
    path = decoded_cache.path_for(data_dir, what)
    assert os.fspath(path).startswith(f"{data_dir}/{decoded_cache.SUBDIRECTORY}/")
    arrays = (np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28, 1), np.array([3, 1], np.int32),
              np.array([0, 1], np.int64))
    decoded_cache.save(path, arrays)
    for got, want in zip(decoded_cache.load(path, 2, (28, 28, 1)), arrays, strict=True):
        np.testing.assert_array_equal(got, want)
    labels = decoded_cache.path_for(data_dir, what[:3], prefix=decoded_cache.LABELS_PREFIX)
    decoded_cache.save_labels(labels, arrays[1])
    np.testing.assert_array_equal(decoded_cache.load_labels(labels), arrays[1])
    files.as_path(f"{data_dir}/train.tfrecord-00000-of-00001").write_bytes(b"prepared again")
    assert decoded_cache.path_for(data_dir, what) != path

    work = f"{bucket}/cached/work"
    program = ("import os, jax, jax.numpy as jnp\n"
               "os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)\n"
               "from soupjax.cli.startup import compilation_cache_in\n"
               f"compilation_cache_in({work!r})\n"
               "print(float(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)).sum()))\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [o for o in _objects(f"{work}/.jax_cache")], "nothing compiled was kept in the bucket"


def test_results_get_the_umask_permissions(tmp_path):
    """Staged in mkdtemp (0700) and renamed: the finished directory has what the umask gives (0755)."""
    old = os.umask(0o022)
    try:
        directory = checkpoints.save_ingredient(tmp_path / "ingredient", _variables(0), {})
    finally:
        os.umask(old)
    assert oct(os.stat(directory).st_mode & 0o777) == oct(0o755)


# docs/multihost.md, the TPU guide: each soupjax command in it, as written, with only what a cloud supplies
# replaced. Its bash blocks hold the commands; a `gcloud ... --command='...'` runs its quoted command on
# every worker of a slice.
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "multihost.md"
# What only a cloud project has, and what each becomes here. The ImageNet configs' options are checked as
# written (test_the_guides_configs_parse); the runs use the testing sweep on the real Fashion-MNIST.
CLOUD_ONLY = (
    (r"configs/imagenet_\w+\.py:[^\s']+", "configs/fashion_mnist_vit.py:testing,sweep=2"),  # ImageNet, its init
    (r"(--config\.data\.data_dir=|--data_dir )\S+", r"\1{data_dir}"),     # the TFDS bucket or share
    (r"gs://BUCKET", "{bucket}"),                                          # the bucket: the emulator's
    (r"/mnt/soups", "{share}"),                                            # an NFS share: a local folder
    (r"\$I\b", "1"),                                                       # machine I of a split sweep
)


SOME_RECIPES = ("uniform", "greedy", "ties", "ensemble")


def guide_commands() -> list[str]:
    """Every ``python -m soupjax.*`` command in the guide's bash blocks, continuation lines joined, the
    ``gcloud ... --command='...'`` wrapper of a slice unwrapped and ``cd ~/soupjax &&`` dropped."""
    import re
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S):
        text = block.replace("\\\n", " ")
        wrapped = re.findall(r"--command='(.*?)'", text, flags=re.S)
        lines = [c for w in wrapped for c in w.split(" && ")] if wrapped else text.splitlines()
        commands += [" ".join(line.split()) for line in lines if "-m soupjax." in line]
    return commands


def _as_run_here(command: str, **where: str) -> tuple[list[str], dict[str, str]]:
    """A guide command as this machine runs it: ``CLOUD_ONLY`` replaced, ``.venv/bin/python`` this
    interpreter, and ``SOUPJAX_MULTIHOST=1`` (a pod slice, where JAX finds its peers) a one-process
    ``jax.distributed`` on a local coordinator, which is what the flag starts."""
    import re
    import shlex
    for pattern, replacement in CLOUD_ONLY:
        command = re.sub(pattern, replacement.format(**where) if "{" in replacement else replacement, command)
    words = shlex.split(command)
    env = {}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[0] == ".venv/bin/python" and set(env) <= {"SOUPJAX_MULTIHOST"}, (command, env)
    if env.pop("SOUPJAX_MULTIHOST", None) == "1":
        from test_multihost import free_port
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAX_NUM_PROCESSES="1",
                   JAX_PROCESS_ID="0")
    return [sys.executable, *words[1:]], env


def test_the_guides_configs_parse():
    """The ImageNet configs' options in the guide, as written (the runs below replace them)."""
    import re
    from soupjax.config.base import load_config
    found = [m for c in guide_commands() for m in re.findall(r"configs/imagenet_\w+\.py:[^\s']+", c)]
    assert len(found) >= 3, found
    for spec in found:
        config = load_config(f"{GUIDE.parents[1]}/{spec}")  # not a Path: it would make gs:// gs:/
        assert config.sweep.count > 0 and config.init_from.path.startswith(("gs://", "/mnt/soups")), spec


@pytest.mark.slow
def test_the_tpu_guide_against_the_emulator(bucket, finetuned_workdir, cooked_all, fashion_mnist_data_dir,
                                            tmp_path):
    """Every soupjax command of docs/multihost.md, in the guide's order of work:

    1. the sweep on a slice into ``gs://BUCKET/run1``, killed (SIGKILL) once its first ingredient is
       committed; 2. machine 1 of a split sweep (``--only 1``) into the same bucket: it takes over the
       dead run's lease and finishes the second; 3. the slice's command again: both skipped, both
       bit-identical to the same sweep on local disk; 4. the sweep on an NFS share holding that sweep:
       both skipped; 5. cooking ``--recipe all`` on the slice, from the bucket into the bucket, with an
       unfinished copy (no marker) among the ingredients, left out: the soups and report of the same cook
       from local disk, bit for bit, read back from the bucket; 6. cooking on one machine from the bucket
       into a local folder (the uniform soup only: the menu was cooked in 5); then an ``--out`` in a bucket that does not exist: one line, nothing written.
    """
    import signal
    import shutil
    import subprocess as sp
    from conftest import COOK_ALL_OPTIONS
    from test_determinism import VOLATILE_REPORT_KEYS, assert_bit_identical
    commands = guide_commands()

    def numbers(row: dict) -> str:
        return json.dumps({k: v for k, v in row.items() if k not in VOLATILE_REPORT_KEYS}, sort_keys=True)
    finetunes = [c for c in commands if "-m soupjax.finetune" in c]
    on_slice, on_share, split = (next(c for c in finetunes if test(c)) for test in (
        lambda c: "gs://BUCKET" in c and "--only" not in c, lambda c: "/mnt/soups" in c, lambda c: "--only" in c))
    cooks = [c for c in commands if "-m soupjax.soup" in c]
    cook_on_slice, cook_on_one = (next(c for c in cooks if ("SOUPJAX_MULTIHOST" in c) == multi) for multi in (True, False))
    assert sorted(commands) == sorted([on_slice, on_share, split, cook_on_slice, cook_on_one]), \
        "a soupjax command in the guide that this test does not run"

    root = Path(__file__).resolve().parents[1]
    where = {"bucket": bucket, "share": str(tmp_path / "share"), "data_dir": fashion_mnist_data_dir}
    base_env = dict(finetuned_workdir["env"], **{k: os.environ[k] for k in (
        "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "NO_GCE_CHECK", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
        "EPATH_USE_TF")})

    def run(command: str, *, extra: tuple[str, ...] = (), cwd: Path = root, check: bool = True):
        cmd, env = _as_run_here(command, **where)
        out = sp.run([*cmd, *extra], env=dict(base_env, **env), capture_output=True, text=True, cwd=cwd, timeout=600)
        if check:
            assert out.returncode == 0, f"{command}\n{out.stderr[-3000:]}"
        return out

    work = f"{bucket}/run1"
    fs, key = files.object_store(work)
    cmd, env = _as_run_here(on_slice, **where)
    assert cmd[-2:] == ["--workdir", work], cmd
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a full pipe would stall the run
        first = sp.Popen(cmd, env=dict(base_env, **env), stdout=sp.DEVNULL, stderr=stderr, cwd=root)
        try:
            marker = f"{key}/ingredients/sweep0_000/{files.MARKER}"
            while first.poll() is None and not fs.exists(marker):
                time.sleep(0.05)
                fs.invalidate_cache()
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-3000:]  # not finished
    assert not checkpoints.is_ingredient(f"{work}/ingredients/sweep0_001")
    out = run(split)
    assert "sweep0_001" in out.stdout and "sweep0_000" not in out.stdout, out.stdout
    out = run(on_slice)
    for name in ("sweep0_000", "sweep0_001"):
        assert f"{name}: finished earlier, skipped" in out.stdout, out.stdout
        assert_bit_identical(checkpoints.load_variables(f"{work}/ingredients/{name}"),
                             checkpoints.load_variables(finetuned_workdir["workdir"] / "ingredients" / name), name)

    shutil.copytree(finetuned_workdir["workdir"], tmp_path / "share" / "run1")
    out = run(on_share)
    assert out.stdout.count("finished earlier, skipped") == 2, out.stdout

    for obj in fs.find(f"{key}/ingredients/sweep0_000"):  # a copy without its marker: a killed upload
        if not obj.endswith(files.MARKER):
            fs.copy(obj, f"{key}/ingredients/unfinished" + obj[len(f"{key}/ingredients/sweep0_000"):])
    # A soup, a selection, a merge and an ensemble: every recipe on several processes is
    # tests/test_multihost_cooking.py's; here what goes through the bucket.
    out = run(cook_on_slice, extra=(*COOK_ALL_OPTIONS, "--recipe", ",".join(SOME_RECIPES)))
    assert f"{work}/ingredients/unfinished: no {files.MARKER} marker" in out.stderr, out.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((files.as_path(f"{work}/soups") / "report.json").read_text())["soups"]}
    want = {r["name"]: r for r in json.loads((cooked_all / "report.json").read_text())["soups"]}
    assert set(SOME_RECIPES) <= set(rows) and set(rows) <= set(want)
    for name, row in rows.items():
        assert numbers(row) == numbers(want[name]), name
    saved = [soup for soup in cooked_all.iterdir() if checkpoints.is_ingredient(soup) and soup.name in rows]
    assert {soup.name for soup in saved} == {"uniform", "greedy", "ties"}
    for soup in saved:
        assert_bit_identical(checkpoints.load_variables(f"{work}/soups/{soup.name}"),
                             checkpoints.load_variables(soup), soup.name)

    out = run(cook_on_one, extra=("--recipe", "uniform", "--shifts="), cwd=tmp_path)
    assert checkpoints.is_ingredient(tmp_path / "run1" / "soups" / "uniform")
    assert_bit_identical(checkpoints.load_variables(tmp_path / "run1" / "soups" / "uniform"),
                         checkpoints.load_variables(cooked_all / "uniform"), "uniform")
    assert not (root / "gs:").exists() and not Path("/gs").exists()  # nothing became a local folder

    bad = run(cook_on_slice.replace("gs://BUCKET/run1/soups", "gs://no-such-bucket-here/soups"),
              extra=COOK_ALL_OPTIONS, check=False)
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if "no such bucket" in line]
    assert errors and "Traceback" not in bad.stderr, bad.stderr[-3000:]
