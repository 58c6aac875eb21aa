"""Fault injection for tests, at named points of gpufleet's own code:

- `GPUFLEET_FAILPOINT=<name>` kills this process (SIGKILL) when it reaches the point of that name, so
  crash recovery is tested against a real crash, not a mock;
- `GPUFLEET_PAUSE=<name>` with `GPUFLEET_PAUSE_DIR=<folder>` holds the thread that reaches that point
  until the test lets it go, so that something (a stop) lands at a chosen moment instead of a sleep
  and a hope: the thread writes `<folder>/<name>.reached`, then waits until `<folder>/<name>.go`
  exists (every thread that reaches the point waits for that one file; once it is there, none does).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

PAUSE_MAX = 600.0  # seconds a paused thread waits at most (a test that forgot to let it go)


def reach(name: str) -> None:
    if os.environ.get("GPUFLEET_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("GPUFLEET_PAUSE") == name and os.environ.get("GPUFLEET_PAUSE_DIR"):
        folder = Path(os.environ["GPUFLEET_PAUSE_DIR"])
        go = folder / f"{name}.go"
        if go.exists():
            return
        (folder / f"{name}.reached").touch()
        deadline = time.monotonic() + PAUSE_MAX
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def reached(folder: Path, name: str) -> bool:
    """Whether a thread reached pause point ``name`` (GPUFLEET_PAUSE_DIR ``folder``)."""
    return (folder / f"{name}.reached").exists()


def release(folder: Path, name: str) -> None:
    """Let the threads paused at ``name`` go on (and any that reach it later pass)."""
    (folder / f"{name}.go").touch()
