"""soupjax.cli.preemption in this process: what a SIGTERM or a Ctrl-C does inside a loop's step boundaries,
outside them, while saving, a second time; the one line and exit status of a stopped command; the stop
vote of one process. The commands stopped by real signals are in tests/test_killed_runs.py, and two
processes agreeing on the step in tests/test_multihost.py.
"""
from __future__ import annotations

import ctypes
import os
import signal

import pytest

from soupjax.cli import preemption


@pytest.fixture(autouse=True)
def handlers():
    """This module's handlers for the test, pytest's own (its Ctrl-C) put back after it."""
    preemption.install()
    yield
    preemption.uninstall()
    assert signal.getsignal(signal.SIGINT) is not preemption._handle  # noqa: SLF001 - the test's own check


def _send(signum: int) -> None:
    # Delivered to this process and run by Python at its next bytecode in the main thread, here.
    os.kill(os.getpid(), signum)


def test_the_exit_statuses_are_the_shells():
    assert preemption.EXIT_SIGTERM == 143 and preemption.EXIT_SIGINT == 130
    assert preemption.exit_status(signal.SIGTERM) == 143 and preemption.exit_status(signal.SIGINT) == 130


def test_inside_boundaries_a_signal_waits_for_the_next_boundary_and_a_second_one_stops_at_once(capfd):
    vote = preemption.StopVote(lagged=True)
    with pytest.raises(preemption.Preempted) as second:
        with preemption.boundaries(after="after the last step"):
            assert vote() == 0
            _send(signal.SIGTERM)
            # Nothing raised: the loop goes on to its boundary, where the vote says stop.
            assert preemption.requested() == signal.SIGTERM and vote() == signal.SIGTERM
            _send(signal.SIGINT)
            pytest.fail("a second signal must stop at once")
    # The first signal decides the status, whichever comes second.
    assert second.value.signum == signal.SIGTERM and second.value.exit_status == 143
    assert "at once" in second.value.where
    assert "SIGTERM received: stopping after the current step" in capfd.readouterr().err


def test_a_loop_that_acts_on_the_request_stops_once():
    with pytest.raises(preemption.Preempted) as stopped:
        with preemption.boundaries(after="after the last step"):
            _send(signal.SIGINT)
            signum = preemption.StopVote(lagged=False)()
            raise preemption.stop(signum, "at step 7 of 40")
    assert stopped.value.where == "at step 7 of 40" and stopped.value.exit_status == 130
    assert preemption.requested() == 0  # acted on: the boundaries' end does not stop a second time


def test_a_request_after_the_last_boundary_stops_at_the_end_of_the_block():
    with pytest.raises(preemption.Preempted, match="after the last step"):
        with preemption.boundaries(after="after the last step"):
            _send(signal.SIGTERM)
    assert preemption.requested() == 0


def test_outside_boundaries_a_signal_stops_at_once():
    with pytest.raises(preemption.Preempted) as stopped:
        _send(signal.SIGTERM)
        pytest.fail("outside a loop's boundaries a signal must stop at once")
    assert stopped.value.signum == signal.SIGTERM and "at once" in str(stopped.value)


def test_while_saving_signals_wait_for_the_save():
    saved = []
    with pytest.raises(preemption.Preempted) as stopped:
        with preemption.boundaries(after="after the last step"):
            with preemption.saving():
                _send(signal.SIGTERM)
                _send(signal.SIGINT)  # a second one too: the save is not cut off
                saved.append("whole")
            assert preemption.requested() == signal.SIGTERM
    assert saved == ["whole"] and stopped.value.signum == signal.SIGTERM
    # Outside boundaries: the stop comes as soon as the save is done.
    with pytest.raises(preemption.Preempted, match="after saving"):
        with preemption.saving():
            _send(signal.SIGINT)
            saved.append("whole again")
    assert saved == ["whole", "whole again"]


def test_a_stopped_command_prints_one_line_and_exits_with_the_signals_status(capsys):
    def main(argv):
        with preemption.boundaries(after="after the last step"):
            _send(signal.SIGTERM)
            raise preemption.stop(preemption.StopVote(lagged=True)(), "at step 3 of 9 of ingredient")

    with pytest.raises(SystemExit) as exit_:
        preemption.exit_on_preemption("soupjax.finetune", main)([])
    assert exit_.value.code == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["soupjax.finetune: preempted by SIGTERM at step 3 of 9 of ingredient; "
                   "rerun the same command to resume"]
    # A command that is not stopped is not changed.
    assert preemption.exit_on_preemption("soupjax.soup", lambda argv: 0)([]) == 0


def test_without_install_nothing_changes():
    preemption.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not preemption._handle  # noqa: SLF001
    with preemption.boundaries(after="after the last step"):
        assert preemption.StopVote(lagged=True)() == 0


def test_the_handlers_are_reclaimed_from_one_installed_after_them_in_c():
    # jax.distributed.initialize installs JAX's own SIGTERM handler (its preemption service) in C++ after
    # ours, where signal.getsignal does not see it; here C's signal() ignores SIGTERM behind Python's back.
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal(signal.SIGTERM, ctypes.c_void_p(1))  # SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is preemption._handle  # noqa: SLF001 - Python does not know
    with pytest.raises(preemption.Preempted, match="after the last step"):
        with preemption.boundaries(after="after the last step"):
            _send(signal.SIGTERM)
