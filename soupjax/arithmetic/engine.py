"""The per-tensor engine: whole models combined one tensor at a time, with the reads running ahead.

The uniform and weighted soups (``soups.weighted_by_tensor``) and every merge
(``merging.merge_by_tensor``) are the same loop: for each leaf of a layout, read that tensor from some
of the models (``TensorSource``s), combine the reads into one tensor, cast it back to the stored dtype,
and go on to the next leaf. ``by_tensor`` is that loop, once. A *plan* says which models each tensor
is read from; a *reduce* combines one tensor's reads (the soup's float32 running sum, a merge's
``combine``). Memory is the result plus the reads in flight, flat in the number of models: never a
second whole model (mergekit merges language models this way).

Reads run on a few threads ahead of the arithmetic, in the order the reduce consumes them, while the
bytes read and not yet consumed stay within a budget (one read always runs). With a source that has
``read_into`` (``checkpoints.IngredientTensors``), a read marked ``fresh`` goes into a new array the
reduce may keep (e.g. as the soup's tensor), the others into host buffers that are reused: no
allocator churn, no page faults on fresh memory, no copy.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from soupjax.io.trees import Layout, cast_to_stored

__all__ = ["FRESH", "BUFFER", "OWN", "Read", "Reduce", "by_tensor", "reads", "default_budget", "default_threads"]

# What the engine hands the reduce with each array: the reduce may keep a FRESH array (read into a new
# one for it), may change a BUFFER in place but must not keep it (it is reused once the reduce asks for
# the next read), and must only read a source's OWN array (a source without ``read_into`` may return its
# own memory).
FRESH, BUFFER, OWN = "fresh", "buffer", "own"


@dataclasses.dataclass(frozen=True)
class Read:
    """One tensor to read: from ``source``, which stores it as ``dtype``; ``name`` names the source in
    errors; ``fresh`` asks for a new array the reduce may keep (see ``FRESH``)."""

    source: Any
    name: str
    dtype: np.dtype
    fresh: bool = False


# reduce(j, reads): combines the reads of tensor j (an iterator of (array, kind), in the plan's order,
# each checked to have the layout's shape) into that tensor, float32 or float64, of the layout's shape.
Reduce = Callable[[int, Iterator[tuple[np.ndarray, str]]], np.ndarray]


def default_threads() -> int:
    """Read threads: the CPU count, at most 4 (more do not read a page cache faster)."""
    return min(4, os.cpu_count() or 1)


def default_budget(layout: Layout, plan: Sequence[Sequence[Read]]) -> int:
    """Bytes the reads may run ahead: 16 MiB or twice the largest tensor read, whichever is larger."""
    largest = max((int(np.prod(layout.shapes[j])) * np.dtype(r.dtype).itemsize
                   for j, reads_j in enumerate(plan) for r in reads_j), default=0)
    return max(16 << 20, 2 * largest)


class _Buffers:
    """Host buffers for reads, reused by size and dtype (so a (768, 3072) buffer serves a (3072, 768) read
    too); at most ``limit`` bytes of them are kept free."""

    def __init__(self, limit: int):
        self.limit = limit
        self._free: list[np.ndarray] = []  # flat, oldest first
        self._free_bytes = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        size = int(np.prod(shape))
        for j in range(len(self._free) - 1, -1, -1):
            b = self._free[j]
            if b.size == size and b.dtype == dtype:
                self._free_bytes -= b.nbytes
                return self._free.pop(j).reshape(shape)
        return np.empty(size, dtype).reshape(shape)

    def give(self, buffer: np.ndarray) -> None:
        self._free.append(buffer.reshape(-1))
        self._free_bytes += buffer.nbytes
        while self._free_bytes > self.limit and self._free:
            self._free_bytes -= self._free.pop(0).nbytes


def _read(source: Any, path: str, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.asarray(source.read(path))
    source.read_into(path, out)
    return out


def _stream(items: Sequence[tuple[Any, str, tuple[int, ...], np.dtype, bool]], threads: int,
            budget: int) -> Iterator[tuple[np.ndarray, str]]:
    """Reads ``items`` (``(source, path, shape, stored dtype, fresh)``) on ``threads`` threads, in order.

    Yields ``(array, kind)``. Reads start ahead of the consumer only while the bytes started and not
    yet consumed stay within ``budget`` (one read always runs), so reading overlaps the consumer's
    arithmetic in O(budget) memory. A BUFFER goes back to the pool when the consumer asks for the next.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="soup-read")
    buffers = _Buffers(budget // 2)
    pending: collections.deque = collections.deque()
    held = 0
    try:
        submitted = 0
        while True:
            while submitted < len(items):
                source, path, shape, dtype, fresh = items[submitted]
                nbytes = int(np.prod(shape)) * dtype.itemsize
                if pending and held + nbytes > budget:
                    break
                if not callable(getattr(source, "read_into", None)):
                    out, kind = None, OWN
                elif fresh:
                    out, kind = np.empty(shape, dtype), FRESH
                else:
                    out, kind = buffers.take(shape, dtype), BUFFER
                pending.append((nbytes, pool.submit(_read, source, path, out), kind))
                held += nbytes
                submitted += 1
            if not pending:
                return
            nbytes, future, kind = pending.popleft()
            array = future.result()
            yield array, kind
            held -= nbytes
            if kind == BUFFER:
                buffers.give(array)
            del array
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _items(layout: Layout, plan: Sequence[Sequence[Read]]) -> list[tuple[Any, str, tuple[int, ...], np.dtype, bool]]:
    return [(r.source, path, shape, np.dtype(r.dtype), r.fresh)
            for path, shape, reads_j in zip(layout.paths, layout.shapes, plan) for r in reads_j]


def reads(layout: Layout, plan: Sequence[Sequence[Read]], *, threads: int | None = None,
          prefetch_bytes: int | None = None) -> Iterator[tuple[np.ndarray, str]]:
    """Every read of ``plan`` in order, as ``by_tensor`` reads them, with no arithmetic (to time the
    reads alone). Close the iterator (or exhaust it) to stop its threads."""
    budget = prefetch_bytes if prefetch_bytes is not None else default_budget(layout, plan)
    return _stream(_items(layout, plan), default_threads() if threads is None else threads, budget)


def _checked(stream: Iterator[tuple[np.ndarray, str]], reads_j: Sequence[Read], path: str,
             shape: tuple[int, ...]) -> Iterator[tuple[np.ndarray, str]]:
    for r in reads_j:
        x, kind = next(stream)
        if x.shape != shape:
            raise ValueError(f"{r.name}: parameter {path!r} was read with shape {x.shape}, expected {shape}")
        yield x, kind


def by_tensor(
    layout: Layout,
    plan: Sequence[Sequence[Read]],
    reduce: Reduce,
    *,
    threads: int | None = None,
    prefetch_bytes: int | None = None,
) -> Any:
    """The tree of ``layout`` whose leaf j is ``reduce(j, reads of plan[j])`` cast to its stored dtype.

    ``plan[j]`` lists the reads of leaf j (``layout.paths[j]``), in the order ``reduce`` gets them.
    Up to ``threads`` reads (default ``default_threads()``) run ahead of the reduces while the tensors
    read and not yet handed over stay within ``prefetch_bytes`` (default ``default_budget``). A read of
    another shape than the layout's is a ValueError naming the source and the parameter; so is a
    result of another shape. Results are numpy arrays in host memory, cast with ``cast_to_stored``
    (integers rounded).
    """
    if len(plan) != len(layout.paths):
        raise ValueError(f"a plan of {len(plan)} tensors for a layout of {len(layout.paths)}")
    budget = prefetch_bytes if prefetch_bytes is not None else default_budget(layout, plan)
    stream = _stream(_items(layout, plan), default_threads() if threads is None else threads, budget)
    out = []
    try:
        for j, (path, shape, dtype) in enumerate(zip(layout.paths, layout.shapes, layout.dtypes)):
            checked = _checked(stream, plan[j], path, shape)
            result = np.asarray(reduce(j, checked))
            for _ in checked:  # reads the reduce left unconsumed: the next tensor's start after them
                pass
            if result.shape != shape:
                raise ValueError(f"the merge of {path!r} has shape {result.shape}, expected {shape}")
            out.append(cast_to_stored(result, dtype))
            del result
    finally:
        stream.close()
    return layout.unflatten(out)
