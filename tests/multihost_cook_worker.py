"""One process of tests/test_multihost_cooking.py: ``python -m soupjax.soup`` on mock data whose splits are
real slices, so that processes reading shards of a split read what one process reads whole.

Run as ``python tests/multihost_cook_worker.py FLAG...`` (the soup command's flags) with
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set: the command's own
``sharding.initialize_multihost`` joins the processes, as on a pod slice.

``tfds.testing.mock_data`` serves the same ``num_examples`` examples for every split string, whatever
slice it names, so two processes reading halves of the test split would each read all of it. Here
every split string is resolved as TFDS resolves it (``train[48:]``, a process's ``even_splits`` share)
against splits of ``num_examples`` examples, and that slice of the mocked examples is served.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

MOCK_EXAMPLES = 64


@contextlib.contextmanager
def sliced_mock_data(num_examples: int = MOCK_EXAMPLES) -> Iterator[None]:
    """tests/conftest.py's ``tfds.testing.mock_data(num_examples)`` (the mocked builders counted as
    prepared, nothing read straight from the files TFDS lists, soupjax's remembered arrays forgotten on
    entry and exit) whose split strings select slices of the examples."""
    from unittest import mock

    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import splits as splits_lib

    import conftest  # noqa: F401  (installs soupjax's mock_data here too, when run as a script)

    class Split:  # what TFDS reads of a split's info to resolve a slice of it
        shard_lengths = [num_examples]

    Split.num_examples = num_examples

    class EverySplit(dict):
        def __contains__(self, name) -> bool:
            return True

        def __getitem__(self, name) -> type:
            return Split

    with tfds.testing.mock_data(num_examples=num_examples):
        served = tfds.core.DatasetBuilder.as_dataset  # the mock's, which ignores the slice

        def as_dataset(self, split=None, **kwargs):
            (part,) = splits_lib.AbstractSplit.from_spec(split).to_absolute(EverySplit())
            start = part.from_ or 0
            stop = num_examples if part.to is None else part.to
            return served(self, split=part.splitname, **kwargs).skip(start).take(stop - start)

        with mock.patch.object(tfds.core.DatasetBuilder, "as_dataset", as_dataset):
            yield


def main(flags: list[str]) -> None:
    """The soup command with ``flags``, on the sliced mock data (exits as the command does)."""
    from soupjax import soup
    with sliced_mock_data():
        sys.argv = ["soupjax.soup", *flags]
        soup.run()


if __name__ == "__main__":
    main(sys.argv[1:])
