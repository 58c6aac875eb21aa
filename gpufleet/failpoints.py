"""Fault injection for tests: `GPUFLEET_FAILPOINT=<name>` kills this process (SIGKILL) when it
reaches the point of that name, so crash recovery is tested against a real crash, not a mock."""

from __future__ import annotations

import os
import signal


def reach(name: str) -> None:
    if os.environ.get("GPUFLEET_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
