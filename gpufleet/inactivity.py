"""dstack's `inactivity_duration` of dev environments: stopped once they have had no connection for
that long. Server side, on the leader (Controller's inactivity loop).

A connection is what dstack counts: an SSH connection to the dev environment's sshd (`ssh RUN-NAME`,
VS Code's Remote-SSH; they all come through the server's tunnel, and any other way in would reach
the same sshd) and a `gpufleet attach` shell. They are counted in the container itself
(runs.connection_count, devssh.connections), so what the count says does not depend on which server
carried them. Idle time is counted from the first look that finds none; a server that starts (or
takes the lead) counts anew, so a restart never stops a dev environment early.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gpufleet import queue, runs
from gpufleet.errors import GpufleetError
from gpufleet.models import Run, RunStatus
from gpufleet.models.run import format_duration
from gpufleet.state import Store

log = logging.getLogger("gpufleet.inactivity")

MIN_EVERY, MAX_EVERY = 5.0, 60.0  # seconds between two looks at one dev environment (a quarter of its duration)

Count = Callable[[Store, Run], int]


class Inactivity:
    """The leader's memory of which dev environments are idle since when."""

    def __init__(self, count: Count = runs.connection_count) -> None:
        self.count = count
        self.idle_since: dict[str, float] = {}  # run_id -> when a look first found no connection
        self.looked: dict[str, float] = {}  # run_id -> when it was last looked at

    def check(self, store: Store, now: float | None = None) -> list[Callable[[], bool]]:
        """Look at the running dev environments with an inactivity_duration that are due; mark those
        idle for their duration `stopping` and return the work that stops them (for the caller's
        workers)."""
        now = time.time() if now is None else now
        work: list[Callable[[], bool]] = []
        watched: set[str] = set()
        for run in store.runs():
            duration = run.spec.get("inactivity_duration") if run.spec.get("type") == "dev-environment" else None
            if run.status != RunStatus.RUNNING or duration is None:
                continue
            watched.add(run.run_id)
            if now - self.looked.get(run.run_id, -MAX_EVERY) < min(MAX_EVERY, max(MIN_EVERY, duration / 4)):
                continue
            self.looked[run.run_id] = now
            try:
                n = self.count(store, run)
            except GpufleetError as e:  # not known: neither idle nor busy; the next look tries again
                log.warning("inactivity_duration of %s: %s", run.name, e)
                continue
            if n:
                self.idle_since.pop(run.run_id, None)
                continue
            since = self.idle_since.setdefault(run.run_id, now)
            if now - since >= duration:
                idle = format_duration(int(now - since))
                _, stop = queue.stop(store, run.name, by=f"its inactivity_duration ({format_duration(int(duration))}): "
                                                        f"no SSH connection or attached shell for {idle}")
                if stop is not None:
                    work.append(stop)
        for d in (self.idle_since, self.looked):
            for run_id in [r for r in d if r not in watched]:
                del d[run_id]
        return work

