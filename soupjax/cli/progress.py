"""Progress lines for long loops: count, rate, elapsed time and ETA, printed periodically."""
from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np


class Progress:
    """A periodic progress line with rate and ETA, for loops whose length is known.

    Written to stderr every ``every`` seconds (and at the end) rather than as a redrawn bar, so that
    it reads well in log files of preemptible jobs as well as in a terminal.
    """

    def __init__(self, total: int, label: str, unit: str = "img", every: float = 10.0, stream=None,
                 total_is_cap: bool = False):
        self.total, self.label, self.unit, self.every = total, label, unit, every
        # A loop that may stop before ``total`` (a plateau run counts to its epoch cap until its rule
        # fires): the line then says that its count and ETA are an upper bound, not a forecast.
        self.total_is_cap = total_is_cap
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self.last = time.time()

    def __call__(self, n: int = 1, **extra: Any) -> None:
        self.done += n
        now = time.time()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            self.stream.write(self.line(**extra) + "\n")
            self.stream.flush()

    def line(self, **extra: Any) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        cap, bound, caveat = (" (cap)", "<=", " (to the cap; may stop sooner)") if self.total_is_cap else ("", "", "")
        return (f"[{self.label}] {self.done}/{self.total} {self.unit}{cap} {rate:.1f} {self.unit}/s "
                f"elapsed {_hms(elapsed)} eta {bound}{_hms(eta)}{caveat} {fields}").rstrip()


def _hms(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
