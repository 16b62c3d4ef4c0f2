"""``python tests/kill_in_checkpoint.py STEP ARGS...``: ``python -m soupjax.finetune ARGS...`` that kills
itself (SIGKILL: no handler, no cleanup, as the OOM killer or a preempted VM) while the checkpoint of step
STEP is being written: orbax has started writing it under its temporary name and not yet renamed it into
place. A kill from outside hits that window of a few milliseconds only by chance.

The fault is injected here, around ``checkpoints.TrainingCheckpoints.save``, so that the trainer itself
carries no test hook (tests/test_killed_runs.py).
"""
from __future__ import annotations

import logging
import os
import signal
import sys


def main() -> None:
    step, args = int(sys.argv[1]), sys.argv[2:]
    from soupjax.io import checkpoints
    save = checkpoints.TrainingCheckpoints.save

    def save_then_kill(self, at: int, state, *, force: bool = False) -> bool:
        started = save(self, at, state, force=force)
        if started and at == step:
            if any(p.name.startswith(f"{step}.") for p in self.directory.iterdir()):  # e.g. 5.orbax-checkpoint-tmp
                os.kill(os.getpid(), signal.SIGKILL)
            logging.warning("step %d's checkpoint was committed before the kill; not killed", step)
        return started

    checkpoints.TrainingCheckpoints.save = save_then_kill
    from soupjax import finetune
    sys.argv = ["soupjax.finetune", *args]
    finetune.run()


if __name__ == "__main__":
    main()
