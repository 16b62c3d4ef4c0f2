"""Data parallelism: one 1-D ``("data",)`` mesh over every device, on one host or many.

This is what ``jax.pmap`` used to do, written as current JAX asks: parameters are replicated with a
``NamedSharding`` over the mesh, batches are split along their first axis, and ``jax.jit`` partitions
the computation. On one CPU it is a mesh of one device and costs nothing.
"""
from __future__ import annotations

import logging
import os
from typing import Any

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


def check_global_batch_size(batch_size: int) -> None:
    """Fail early, with the numbers, when a batch cannot be split evenly over devices and processes."""
    if batch_size % jax.device_count():
        raise ValueError(f"batch size {batch_size} is not divisible by the device count {jax.device_count()}")
