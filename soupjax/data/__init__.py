"""Data: TFDS input pipelines for any image-classification set, the local Fashion-MNIST builder,
deterministic distribution shifts and the paper's natural shift sets.

Everything is driven by a data config (`default_data_config()`); the trainer needs only:

  train_batches(cfg, global_batch_size, seed=..., start_step=...)  infinite, resumable, this process's share
  eval_batches(cfg, split, global_batch_size)                     finite, padded, with 'mask'
  num_classes(cfg), num_examples(cfg, split), shift_splits(cfg), logit_projection(cfg, split)
  check_available(cfg), check_heldout(cfg)   bad input refused before training: InputError, nothing written

Importing this package registers the TFDS builder 'fashion_mnist_local'.
"""

from soupjax.data import fashion_mnist_local  # registers the builder
from soupjax.data.pipeline import check_available
from soupjax.data.pipeline import check_heldout
from soupjax.data.pipeline import default_data_config
from soupjax.data.pipeline import eval_batches
from soupjax.data.pipeline import eval_fingerprint
from soupjax.data.pipeline import logit_projection
from soupjax.data.pipeline import num_classes
from soupjax.data.pipeline import num_examples
from soupjax.data.pipeline import shift_splits
from soupjax.data.pipeline import train_batches

__all__ = [
    "check_available", "check_heldout", "default_data_config", "eval_batches", "eval_fingerprint", "fashion_mnist_local", "logit_projection", "num_classes",
    "num_examples", "shift_splits", "train_batches",
]
