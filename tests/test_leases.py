"""Leases (soupjax/io/leases.py): one process at a time fine-tunes an ingredient. Unit tests of the lease
(exclusive, who holds it, renewal, expiry, a dead holder on this host) on a local directory, on
``gs://`` (gcsfs against the Cloud Storage emulator of tests/gcs_emulator.py, patched to honour
``ifGenerationMatch`` as Cloud Storage does) and on another fsspec object store (``memory://``), and
the same fine-tuning command started twice at once on one work directory: each ingredient trained
once, the second process saying in one line who trains what it skipped, both ending with status 0."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from soupjax.io import leases

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emulated_bucket():
    """``gs://soupjax-leases`` on a Cloud Storage emulator, for this module's gs:// cases."""
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("gcsfs")
    import gcs_emulator
    with gcs_emulator.running("soupjax-leases"):
        yield "gs://soupjax-leases"


@pytest.fixture(params=["local", "gs", "memory"])
def lease_at(request, tmp_path):
    """A lease path in a fresh place: a local directory, a gs:// bucket, or an fsspec memory:// bucket."""
    if request.param == "local":
        yield lambda name="a": str(tmp_path / "ingredients" / f".{name}.lease")
        return
    if request.param == "gs":
        root = f"{request.getfixturevalue('emulated_bucket')}/{request.node.name}-{time.time_ns()}"
        yield lambda name="a": f"{root}/ingredients/.{name}.lease"
        return
    import fsspec
    root = f"memory://leases-{os.getpid()}-{time.time_ns()}"
    yield lambda name="a": f"{root}/ingredients/.{name}.lease"
    try:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)
    except FileNotFoundError:  # every record removed already
        pass


def _record(path: str) -> dict:
    seen = leases.store_for(path).read(path)
    return json.loads(seen[0]) if seen else {}


def test_exclusive_and_the_second_sees_who_holds_it(lease_at):
    first, second = leases.Lease(lease_at()), leases.Lease(lease_at())
    assert first.acquire() is None and first.held
    holder = second.acquire()
    assert not second.held and holder is not None
    me = leases.this_process()
    assert (holder.host, holder.pid, holder.boot_id) == (me.host, os.getpid(), me.boot_id)
    assert holder.describe().startswith(f"host {me.host} pid {os.getpid()} since ")
    assert second.holder() == holder
    # Another ingredient's lease is another record.
    assert leases.Lease(lease_at("b")).acquire() is None
    first.release()
    assert leases.store_for(first.path).read(first.path) is None and second.holder() is None
    assert second.acquire() is None and second.held
    second.release()


def test_exclusive_under_a_race(lease_at):
    """Eight threads try at once: exactly one takes it."""
    contenders = [leases.Lease(lease_at()) for _ in range(8)]
    barrier, results = threading.Barrier(len(contenders)), {}

    def take(i: int) -> None:
        barrier.wait()
        results[i] = contenders[i].acquire()
    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is None for r in results.values()) == 1, results
    assert sum(c.held for c in contenders) == 1


def test_renewal_keeps_it_and_expiry_on_another_host(lease_at):
    path = lease_at()
    lease = leases.Lease(path, expires_after=0.6, heartbeat=0.1)
    assert lease.acquire() is None
    lease.keep_alive()
    before = _record(path)["renewed"]
    time.sleep(0.8)  # longer than the expiry: only the heartbeat keeps it
    assert _record(path)["renewed"] > before
    assert leases.Lease(path).acquire() is not None, "renewed: still held"
    lease.release()
    assert not lease.lost

    # A holder on another host is alive until its last renewal is older than its expiry.
    store = leases.store_for(path)
    other = dataclasses.replace(leases.this_process(expires_after=60), host="another-host", pid=1)
    assert store.create(path, other.record())
    held = leases.Lease(path).acquire()
    assert held is not None and held.host == "another-host"
    stale = dataclasses.replace(other, renewed=time.time() - 61)
    assert store.replace(path, stale.record(), store.read(path)[1]) is not None
    taker = leases.Lease(path)
    assert taker.acquire() is None and taker.took_over == stale
    assert _record(path)["token"] == taker._mine.token
    # The old holder's next renewal finds the lease taken: it says so instead of overwriting it.
    lost = leases.Lease(path)
    lost._mine, lost._version = stale, stale.record()
    assert not lost.renew() and lost.lost
    taker.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(lease_at, tmp_path):
    path = lease_at()
    store = leases.store_for(path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = dataclasses.replace(leases.this_process(expires_after=3600), pid=int(gone.stdout))
    assert store.create(path, dead.record())
    lease = leases.Lease(path)
    assert lease.acquire() is None and lease.took_over == dead
    lease.release()
    # This host restarted since (another boot id): dead, whatever its pid is now.
    rebooted = dataclasses.replace(leases.this_process(expires_after=3600), boot_id="another-boot")
    assert store.create(path, rebooted.record())
    assert leases.Lease(path).acquire() is None
    # A pid reused by a process started since the lease was taken: dead too.
    reused = dataclasses.replace(leases.this_process(expires_after=3600), token="x", process_start="1")
    store.delete(path, store.read(path)[1])
    assert store.create(path, reused.record())
    assert leases.Lease(path).acquire() is None


def test_a_record_cut_short_expires_from_when_it_was_written(tmp_path):
    path = tmp_path / ".a.lease"
    path.write_bytes(b"")  # its holder died between creating the file and writing it
    assert leases.Lease(path).acquire() is not None, "just written: may still be being written"
    os.utime(path, (time.time() - leases.EXPIRES_AFTER - 1,) * 2)
    assert leases.Lease(path).acquire() is None


_MOCK_FINETUNE = """
import sys
sys.path.insert(0, {tests!r})
import conftest  # noqa: F401  (soupjax's tfds.testing.mock_data)
import tensorflow_datasets as tfds
from soupjax import finetune
sys.argv = ["soupjax.finetune", *sys.argv[1:]]
with tfds.testing.mock_data(num_examples=64):
    finetune.run()
""".format(tests=str(ROOT / "tests"))


@pytest.mark.slow
def test_the_same_sweep_started_twice_on_one_work_directory(tmp_path):
    """Two `finetune :testing,sweep=2` at once on one work directory (mock data): no traceback, both end
    with status 0, each ingredient trained once, and the one-line message of the skip. (Before leases:
    both trained both, or one ended in orbax's FileNotFoundError for the other's temporary folder.)"""
    work = tmp_path / "work"
    cmd = [sys.executable, "-c", _MOCK_FINETUNE, "--config", "configs/fashion_mnist_vit.py:testing,sweep=2",
           f"--workdir={work}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    logs = [(open(tmp_path / f"{i}.out", "w+"), open(tmp_path / f"{i}.err", "w+")) for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err) for out, err in logs]
    try:
        codes = [p.wait(300) for p in procs]
    finally:  # a process still running (one waiting forever would be a bug): not left behind
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [(tmp_path / f"{i}.out").read_text() for i in range(2)]
    errs = [(tmp_path / f"{i}.err").read_text() for i in range(2)]
    for out, err in logs:
        out.close(), err.close()
    shown = "\n".join(f"--- process {i}: exit {codes[i]}\n{outs[i]}\n{errs[i][-2000:]}" for i in range(2))
    assert codes == [0, 0], shown
    assert not any("Traceback" in e for e in errs), shown
    trained = [line for out in outs for line in out.splitlines() if "held-out" in line and " -> " in line]
    names = sorted(line.split()[1].rstrip(":") for line in trained)
    assert names == ["sweep0_000", "sweep0_001"], f"each ingredient trained once\n{shown}"
    held = [line for out in outs for line in out.splitlines() if ": being trained by host " in line]
    assert held and all(line.endswith("; skipped for now") and f" pid " in line for line in held), shown
    assert any(line.split()[1].rstrip(":") in {"sweep0_000", "sweep0_001"} for line in held), shown
    ingredients = work / "ingredients"
    assert sorted(p.name for p in ingredients.iterdir()) == ["start", "sweep0_000", "sweep0_001"], shown
