"""Helpers shared by the benchmarks: statistics, child CPU time and process-tree memory."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split among the processes sharing them): the honest
    sum over a tree of forked workers. Falls back to RSS."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except OSError:
        return 0


class TreeMemory:
    """Samples the summed PSS of a process and all its descendants; keeps the peak (MiB)."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            todo, total, seen = [self.pid], 0, 0
            while todo and seen < 2000:
                p = todo.pop()
                seen += 1
                total += _pss_kib(p)
                todo.extend(_children(p))
            self.peak_kib = max(self.peak_kib, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak_kib / 1024


@dataclass
class Measured:
    wall: float
    cpu: float  # user + system of the command and every descendant it waited for
    peak_mib: float
    rc: int
    out: str = ""
    extra: dict = field(default_factory=dict)


def measure(cmd: list[str] | str, *, env: dict | None = None, shell: bool = False, timeout: float = 900,
            memory: bool = True) -> Measured:
    """Run ``cmd``; wall time, controller CPU time (children's rusage) and peak tree memory."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    if memory:
        with TreeMemory(p.pid) as mem:
            out, _ = p.communicate(timeout=timeout)
    else:
        mem = None
        out, _ = p.communicate(timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measured(wall, cpu, mem.peak_mib if mem else 0.0, p.returncode, out)


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"
