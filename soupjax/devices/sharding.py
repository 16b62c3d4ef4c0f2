"""Data parallelism: one 1-D ``("data",)`` mesh over every device, on one host or many.

This is what ``jax.pmap`` used to do, written as current JAX asks: parameters are replicated with a
``NamedSharding`` over the mesh, batches are split along their first axis, and ``jax.jit`` partitions
the computation. On one CPU it is a mesh of one device and costs nothing.

With several processes (a pod slice), each reads its own shard of the data; what must then be the same
on every process comes from here: every process's rows of a per-example array (``gather_rows``), the
whole batches one process would read (``global_batches``), a choice any process makes
(``any_process``), and the one process that writes (``is_primary``). Each is free with one process.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from soupjax.cli.errors import InputError

DATA_AXIS = "data"


def initialize_multihost() -> None:
    """Start ``jax.distributed`` when the process is one of several (Cloud TPU pods, multi-node GPU).

    Runs when ``SOUPJAX_MULTIHOST=1`` (on a Cloud TPU pod slice, or under Slurm or Open MPI, that is all
    that is needed: JAX then finds the coordinator, the process count and this process's index itself)
    or when ``JAX_COORDINATOR_ADDRESS`` is set (elsewhere: ``host:port`` of process 0, with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, which JAX itself does not read, so they are passed
    here). A single process (the common case, and every test) is left alone, because initialising
    would try to reach a coordinator. On CPU, the processes' collectives go over gloo (TCP), JAX's
    default there.
    """
    wanted = os.environ.get("SOUPJAX_MULTIHOST", "").lower() in ("1", "true", "yes")
    if not (wanted or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return
    kwargs = {name: _env_int(var) for name, var in (("num_processes", "JAX_NUM_PROCESSES"),
                                                     ("process_id", "JAX_PROCESS_ID"))}
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _env_int(var: str) -> int | None:
    """An environment variable as an int (None when unset), refused by name when it is not one."""
    value = os.environ.get(var, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{var}={value!r} is not an integer") from None


def data_mesh() -> Mesh:
    """The 1-D mesh over all devices of all processes, axis ``"data"``.

    ``axis_types`` is given explicitly because the default of ``jax.make_mesh`` changed between JAX
    releases; ``Auto`` keeps the classic sharding-propagation semantics that data parallelism needs.
    """
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that puts a full copy on every device (parameters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading (batch) axis over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turn this process's part of a batch into one global array split over the ``data`` axis.

    Each process passes only the examples it read itself; ``make_array_from_process_local_data``
    assembles the global batch without moving data between hosts.
    """
    sharding = batch_sharded(mesh)
    local_devices = len(mesh.local_devices)
    out = {}
    for key, value in batch.items():
        if value.shape[0] % local_devices:
            raise ValueError(
                f"batch key {key!r} has {value.shape[0]} examples on this process, not divisible by its "
                f"{local_devices} local devices; choose a batch size that is a multiple of "
                f"{jax.device_count()} (the total device count)")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def is_primary() -> bool:
    """True on process 0, the one process that writes what all of them computed alike (soups, reports,
    caches); every process when there is one."""
    return jax.process_index() == 0


def any_process(flags: Sequence[bool]) -> list[bool]:
    """``flags[i]`` true on any process, on every process: what they agree on before a collective step
    that some of them might otherwise skip (an evaluation one found cached and another did not)."""
    if jax.process_count() == 1:
        return [bool(f) for f in flags]
    from jax.experimental import multihost_utils
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(flags, np.int32).reshape(-1)))
    return [bool(f) for f in gathered.reshape(jax.process_count(), -1).any(axis=0)]


def gather_rows(array: np.ndarray) -> np.ndarray:
    """Every process's rows of ``array`` (its leading axis; each process may hold a different number),
    concatenated in process order, on every process. The identity with one process.

    Each process reads a contiguous shard of a split, the shards in process order
    (``data.eval_batches``), so this is the split's per-example array in its own order, as one process
    reading the whole split would hold it. Travels as JAX arrays: 64-bit dtypes are refused rather than
    silently rounded (JAX is 32-bit unless x64 is enabled).
    """
    array = np.asarray(array)
    if jax.process_count() == 1:
        return array
    if array.dtype.itemsize > 4:
        raise ValueError(f"gather_rows: {array.dtype} would be rounded to 32 bits on the way; cast it first")
    from jax.experimental import multihost_utils
    counts = np.asarray(multihost_utils.process_allgather(np.int32(len(array)))).reshape(-1)
    padded = np.zeros((max(int(counts.max()), 1), *array.shape[1:]), array.dtype)
    padded[:len(array)] = array
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # (processes, most, ...)
    return np.concatenate([gathered[p, :c] for p, c in enumerate(counts)]).astype(array.dtype, copy=False)


def global_batches(local_batches: Iterable[Mapping[str, np.ndarray]], batch_size: int
                   ) -> Iterator[dict[str, np.ndarray]]:
    """The batches of ``batch_size`` one process reading the whole split would see, on every process,
    from each process's own ``local_batches`` (``{'image', 'label', 'mask'}``, this process's shard of
    the split in order, padded where ``mask`` is 0).

    Batch ``b`` holds the split's examples ``b * batch_size`` onwards, in order, and the last one is
    padded (zero images, label 0, mask 0) as ``data.eval_batches`` pads it. For what must be computed
    alike on every process from whole batches (a learned soup's steps, BatchNorm statistics), equal to
    one process's. Each process reads ahead until it holds ``batch_size`` real examples or its shard
    ends; the processes then say how many they hold, and each batch takes them in process order (a
    process not at its end holds enough to finish it). With one process, ``local_batches`` as they are.
    """
    if jax.process_count() == 1:
        yield from local_batches
        return
    from jax.experimental import multihost_utils
    source = iter(local_batches)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    held, ended, process = 0, False, jax.process_index()
    while True:
        while not ended and held < batch_size:
            batch = next(source, None)
            if batch is None:
                ended = True
                break
            real = np.asarray(batch.get("mask", np.ones(len(batch["label"])))) > 0
            images.append(np.asarray(batch["image"])[real])
            labels.append(np.asarray(batch["label"], np.int32)[real])
            held += int(real.sum())
        states = np.asarray(multihost_utils.process_allgather(np.asarray([held, ended], np.int32)))
        takes, need = [], batch_size
        for count, at_end in states:
            takes.append(min(int(count), need))
            need -= takes[-1]
            if not at_end:
                need = 0  # its later examples come before any later process's
        if sum(takes) == 0:
            return
        if not images:  # data.eval_batches gives every process as many batches: never without one
            raise ValueError("global_batches: this process read no batch while another holds examples")
        image, label = np.concatenate(images), np.concatenate(labels)
        mine = takes[process]
        images, labels, held = [image[mine:]], [label[mine:]], held - mine
        most = max(takes)
        send = {"image": np.zeros((most, *image.shape[1:]), image.dtype), "label": np.zeros(most, np.int32)}
        send["image"][:mine], send["label"][:mine] = image[:mine], label[:mine]
        got = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(send).items()}
        n = sum(takes)
        out = {"image": np.zeros((batch_size, *image.shape[1:]), image.dtype),
               "label": np.zeros(batch_size, np.int32), "mask": np.zeros(batch_size, np.float32)}
        out["image"][:n] = np.concatenate([got["image"][p, :t] for p, t in enumerate(takes)])
        out["label"][:n] = np.concatenate([got["label"][p, :t] for p, t in enumerate(takes)])
        out["mask"][:n] = 1.0
        yield out


def check_global_batch_size(batch_size: int) -> None:
    """Fail early, with the numbers, when a batch cannot be split evenly over devices and processes."""
    if batch_size % jax.device_count():
        raise ValueError(f"batch size {batch_size} is not divisible by the device count {jax.device_count()}")
