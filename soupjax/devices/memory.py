"""Peak host memory of a piece of work, measured: the report's 'peak memory' column.

``PeakMemory`` reports the largest rise of the process's resident set size over its size when the
``with`` block started. On Linux the kernel keeps that peak itself (``VmHWM`` in ``/proc/self/status``,
reset to the current size by writing 5 to ``/proc/self/clear_refs``): exact, and free while the block
runs. Where the reset is not allowed, a background thread samples ``/proc/self/statm`` every few
milliseconds instead, which can miss a spike shorter than its interval and costs 0.024-0.034 CPU-s
per second of block (measured on an idle 2-core VM; the kernel's peak: 0.0003), taken from the cores
the work itself needs on a small machine.
On CPU, JAX arrays live in host memory, so this covers them too; on an accelerator it is host memory
only. What the allocator keeps from earlier work and reuses does not show as a rise, so the figure is
a lower bound on what the work allocated. Where ``/proc`` does not exist the figure is None.
"""
from __future__ import annotations

import os
import threading
from types import TracebackType

_STATM = "/proc/self/statm"
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def resident_bytes() -> int | None:
    """This process's resident set size in bytes, or None where ``/proc`` is not available."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def high_water_bytes() -> int | None:
    """The kernel's peak resident set size of this process (``VmHWM``) in bytes, or None where
    ``/proc/self/status`` does not give it."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_high_water() -> bool:
    """Sets this process's ``VmHWM`` to its current resident size (Linux 4.0+); False where not allowed.
    Process-wide: a reader of ``VmHWM`` (or of ``getrusage``'s ``ru_maxrss`` for this process) sees the
    peak since the last reset."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory() as peak: ...`` then ``peak.mebibytes``: the largest rise of resident memory.

    Resets the process's ``VmHWM`` on entry (see ``reset_high_water``); blocks must not be nested.
    ``kernel_peak=False`` samples instead (the fallback where the reset is refused)."""

    def __init__(self, interval_s: float = 0.005, *, kernel_peak: bool = True):
        self.interval_s = interval_s
        self.kernel_peak = kernel_peak
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._from_kernel = False

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = resident_bytes()
            if now is not None and self.peak is not None and now > self.peak:
                self.peak = now

    def __enter__(self) -> PeakMemory:
        self._from_kernel = self.kernel_peak and reset_high_water() and high_water_bytes() is not None
        self.start = self.peak = resident_bytes()
        if self.start is not None and not self._from_kernel:
            self._thread = threading.Thread(target=self._sample, name="soupjax-peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = high_water_bytes() if self._from_kernel else resident_bytes()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    @property
    def mebibytes(self) -> float | None:
        """The rise in MiB (0 when memory never rose), None when it could not be measured."""
        if self.start is None or self.peak is None:
            return None
        return max(0, self.peak - self.start) / 2**20
