"""When a learning curve has levelled off: the stopping rule of ``lr_schedule='plateau'``.

The rule is written down before any run, on the held-out split only: a run has plateaued when its
last ``patience`` held-out evaluations were each less than ``min_delta`` above the best evaluation
before it. With one evaluation per epoch, ``min_delta=0.003`` and ``patience=1`` this reads "the
held-out accuracy rose by less than 0.3 points over the last epoch". The trainer then cools the
learning rate down linearly to zero, as warm-up-stable-decay schedules do, instead of stopping at a
high learning rate.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class PlateauRule:
    """``levelled_off(accuracies)`` for a held-out learning curve (oldest first)."""
    min_delta: float = 0.003
    patience: int = 1

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"plateau.patience must be at least 1, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"plateau.min_delta must be >= 0, got {self.min_delta}")

    def levelled_off(self, accuracies: Sequence[float]) -> bool:
        """True when each of the last ``patience`` values is below (best before it) + ``min_delta``."""
        if len(accuracies) <= self.patience:
            return False
        for k in range(len(accuracies) - self.patience, len(accuracies)):
            if accuracies[k] >= max(accuracies[:k]) + self.min_delta:
                return False
        return True


def read_decision(path: Path) -> int | None:
    """The step at which a run's cool-down started, if the rule has fired (``plateau.json``)."""
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["decay_start"])


def write_decision(path: Path, decay_start: int, curve: Sequence[tuple[int, float]]) -> None:
    """Record the rule's decision (atomically), so that a resumed run cools down at the same step."""
    from soupjax.io.files import write_json_atomic
    write_json_atomic(path, {"decay_start": int(decay_start), "heldout_curve": [list(p) for p in curve]})
