"""The fingerprint of weights: a short stable hash of a variables tree's names, shapes, dtypes and values.

Not to be confused with ``soupjax.config.base.fingerprint``, the hash of a config (what a run or a soup
was made with). Two ingredients fine-tuned from the same init share the weights fingerprint of that
init, which their meta.json records and every soup checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from soupjax.io.trees import flatten


def weights_fingerprint(variables: Mapping[str, Any]) -> str:
    """A short stable hash of a variables/params tree: names, shapes, dtypes and values.

    sha256 over the leaves in sorted '/'-path order, first 16 hex digits.
    """
    digest = hashlib.sha256()
    for path, leaf in sorted(flatten(variables).items()):
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        digest.update(f'{path}|{array.shape}|{array.dtype.name}|'.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
