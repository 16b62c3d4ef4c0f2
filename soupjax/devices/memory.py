"""Peak host memory of a piece of work, measured: the report's 'peak memory' column.

``PeakMemory`` samples the process's resident set size (``/proc/self/statm``) from a background thread
every few milliseconds while its ``with`` block runs, and reports the largest rise over the size at the
start. On CPU, JAX arrays live in host memory, so this covers them too; on an accelerator it is host
memory only. What the allocator keeps from earlier work and reuses does not show as a rise, so the
figure is a lower bound on what the work allocated, and a spike shorter than the sampling interval can
be missed. Where ``/proc`` does not exist the figure is None.
"""
from __future__ import annotations

import os
import threading
from types import TracebackType

_STATM = "/proc/self/statm"


def resident_bytes() -> int | None:
    """This process's resident set size in bytes, or None where ``/proc`` is not available."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.mebibytes``: the largest rise of resident memory."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = resident_bytes()
            if now is not None and self.peak is not None and now > self.peak:
                self.peak = now

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = resident_bytes()
        if self.start is not None:
            self._thread = threading.Thread(target=self._sample, name="soupjax-peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = resident_bytes()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    @property
    def mebibytes(self) -> float | None:
        """The rise in MiB (0 when memory never rose), None when it could not be measured."""
        if self.start is None or self.peak is None:
            return None
        return max(0, self.peak - self.start) / 2**20
