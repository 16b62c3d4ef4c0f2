"""Running one measurement of a benchmark in a fresh process, optionally from another soupjax checkout.

A fresh process per measurement gives each contender its own peak memory, compile cache and thread
pools (PyTorch's OpenMP threads keep spinning after a call and would slow JAX in the same process),
and PYTHONPATH pointing at another checkout measures the code before a change beside the code after it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_worker(script: str, args: list[str], tree: Path | None = None) -> dict:
    """Run ``python SCRIPT --worker ARGS...`` and return the JSON object it prints last."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, script, "--worker", *args], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])
