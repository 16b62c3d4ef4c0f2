"""The report's peak-memory figure (soupjax.devices.memory.PeakMemory): the rise of resident memory
within a block, from the kernel's high-water mark, or sampled where that cannot be reset."""
from __future__ import annotations

import time

import numpy as np
import pytest

from soupjax.devices import memory

MIB = 2**20


def _spike(mib: int) -> None:
    """``mib`` MiB made resident and freed again: a peak that is gone before the block ends."""
    block = np.ones(mib * MIB // 8)
    del block


@pytest.mark.skipif(not memory.reset_high_water(), reason="the kernel's peak cannot be reset here")
def test_the_kernel_peak_sees_a_freed_spike_and_starts_at_the_block():
    _spike(400)  # an earlier, larger peak of this process: not the block's
    with memory.PeakMemory() as peak:
        _spike(150)
    assert 140 <= peak.mebibytes < 300, peak.mebibytes
    with memory.PeakMemory() as quiet:
        pass
    assert quiet.mebibytes < 20, quiet.mebibytes


def test_the_sampling_fallback_measures_a_held_allocation():
    with memory.PeakMemory(kernel_peak=False) as peak:
        block = np.ones(150 * MIB // 8)
        time.sleep(0.05)  # several sampling intervals
        del block
    assert 140 <= peak.mebibytes < 300, peak.mebibytes
