"""The server's background work: who leads, and the loops the leader runs.

Several replicas may serve one PostgreSQL database; exactly one runs the loops at a time. The lock is
PostgreSQL's own (a session advisory lock held on a connection kept open: it goes when the leader's
connection does, so a killed leader is replaced as soon as another replica tries again). On SQLite
(one machine) it is a file lock beside the database file, released by the kernel when the process
dies. No home-made consensus.

The loops (leader only):
- schedule: start waiting runs where gpufleet.scheduler.decide puts them; kicked at once by a
  submission or a run's end, else every `schedule_interval` (and when a scheduled run is due);
- reconcile: ask the hosts what became of the containers (runs.refresh with the sweep), every
  `reconcile_interval`; note hosts that stop answering and come back;
- limits: max_duration and retry windows (queue.enforce_limits), every `limits_interval`;
- metrics: sample every host's GPUs and run containers (gpufleet.metrics.sample, hosts in
  parallel) and keep the samples (gpufleet.metrics.store), every `metrics_interval`; then withhold
  faulty GPUs and GPUs used outside gpufleet, and stop runs that break their utilization_policy
  (gpufleet.metrics.protect).
Containers are started on a pool of worker threads, so a slow start holds up nothing else.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import create_engine, text

from gpufleet import queue, replicas, router, runs, upload
from gpufleet.allocator import Placement
from gpufleet.errors import GpufleetError
from gpufleet.launch import node_addresses
from gpufleet.models import Run
from gpufleet.state import Store

log = logging.getLogger("gpufleet.server")

LEADER_LOCK = 7405325  # PostgreSQL advisory lock key of the loops' leader


class Leadership:
    """Try to become, and stay, the one replica that runs the loops."""

    def __init__(self, store: Store):
        self.store = store
        self._conn = None
        self._file = None
        self.since: float | None = None

    @property
    def held(self) -> bool:
        return self.since is not None

    def try_acquire(self) -> bool:
        if self.held:
            return self._still_held()
        try:
            if self.store.engine.dialect.name == "postgresql":
                engine = create_engine(self.store.url, poolclass=None, future=True)
                conn = engine.connect()
                got = conn.execute(text(f"SELECT pg_try_advisory_lock({LEADER_LOCK})")).scalar()
                conn.commit()
                if not got:
                    conn.close()
                    engine.dispose()
                    return False
                self._conn = (engine, conn)
            else:
                path = Path(self.store.url.removeprefix("sqlite:///") + ".leader")
                f = open(path, "a+")  # noqa: SIM115 - held open while leading
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    return False
                self._file = f
        except Exception as e:  # the database is away: not the leader, try again later
            log.warning("cannot take the leader lock: %s", e)
            return False
        self.since = time.time()
        return True

    def _still_held(self) -> bool:
        if self._conn is None:
            return True
        try:
            self._conn[1].execute(text("SELECT 1")).scalar()
            self._conn[1].commit()
            return True
        except Exception as e:
            log.warning("lost the leader's database connection: %s", e)
            self.release()
            return False

    def release(self) -> None:
        if self._conn is not None:
            engine, conn = self._conn
            try:
                conn.execute(text(f"SELECT pg_advisory_unlock({LEADER_LOCK})"))
                conn.close()
            except Exception:
                pass
            engine.dispose()
            self._conn = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self.since = None


DRAIN = 2.0  # seconds between a replica's leaving the services' rotation and its stop


class Controller:
    """The leader's loops, on threads of their own, until ``stop()``."""

    def __init__(self, store: Store, settings, unseal, fleet_secrets, url: str):
        self.store = store
        self.settings = settings
        self.unseal = unseal
        self.fleet_secrets = fleet_secrets
        self.url = url
        self.leadership = Leadership(store)
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._workers = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="gpufleet-start")
        self._threads: list[threading.Thread] = []
        self._unreachable: dict[tuple[str, str], str] = {}
        self._swept = 0.0  # monotonic time of the last sweep (0: sweep at the first pass)
        self._due: float | None = None  # when the next scheduled run (dstack's `schedule`) is due
        self.last_activity = time.monotonic()
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.sample = None  # the metrics loop's sampler, (store) -> [HostSample]; None: gpufleet.metrics.sample's
        self.services = None  # gpufleet.server.proxy.ServiceProxy: which replicas are ready, the request rates

    # --------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for name, target in (("leader", self._lead), ("schedule", self._schedule_loop),
                             ("reconcile", self._reconcile_loop), ("limits", self._limits_loop),
                             ("inactivity", self._inactivity_loop), ("metrics", self._metrics_loop),
                             ("replicas", self._replicas_loop)):
            t = threading.Thread(target=target, name=f"gpufleet-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        for t in self._threads:
            t.join(timeout=10)
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.leadership.release()

    def kick(self) -> None:
        """Something changed (a submission, a run's end): schedule now rather than at the next tick."""
        self.last_activity = time.monotonic()
        self._kick.set()

    @property
    def leading(self) -> bool:
        return self.leadership.held

    # --------------------------------------------------------------------------- loops
    def _lead(self) -> None:
        while not self._stop.is_set():
            was = self.leading
            if self.leadership.try_acquire():
                if not was:
                    log.info("leading the loops (%s)", self.holder)
                    self._safely(lambda: self.store.record_leader(self.holder, self.url, self.leadership.since))
                    self._kick.set()
            self._stop.wait(self.settings.leader_retry)

    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            wait = self.settings.schedule_interval
            if self._due is not None:  # a scheduled run is due before the next tick: be there then
                wait = min(wait, max(0.0, self._due - time.time()))
            self._kick.wait(wait)
            self._kick.clear()
            if self._stop.is_set() or not self.leading:
                continue
            self._due = None
            self._safely(self._schedule_pass)

    def _schedule_pass(self) -> None:
        self._due = queue.schedule(self.store, self.launch, half_life=self.settings.fair_share_half_life)

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval):
            if self.leading:
                self._safely(self.reconcile)

    def _limits_loop(self) -> None:
        while not self._stop.wait(self.settings.limits_interval):
            if self.leading:
                self._safely(lambda: queue.enforce_limits(self.store) and self.kick())

    def _inactivity_loop(self) -> None:
        """Dev environments' inactivity_duration (gpufleet.inactivity): looked at from this loop, as each
        look asks a host; stopped on the workers."""
        from gpufleet.inactivity import Inactivity

        inactivity = Inactivity()
        while not self._stop.wait(self.settings.limits_interval):
            if self.leading:
                self._safely(lambda i=inactivity: [self.background(work) for work in i.check(self.store)])
            else:
                inactivity = Inactivity()  # a leader again later counts anew

    def _metrics_loop(self) -> None:
        """Sample every host and keep the samples (gpufleet.metrics.store.tick), on a thread of its
        own: a slow host holds up no other loop (and no other host: the sampler asks them at once)."""
        from gpufleet.metrics import protect
        from gpufleet.metrics import store as metrics

        def one_pass() -> None:
            from gpufleet.metrics.sample import outside

            raw = self.settings.metrics_raw_retention
            samples = metrics.tick(self.store, self.sample, raw, self.settings.metrics_retention)
            if protect.withhold(self.store, samples, outside):
                self.kick()  # a GPU came back (or went): the queue may move
            for work in protect.idle_runs(self.store, lambda run, since: metrics.utilization_series(
                    self.store, run, since, raw)):
                self.background(work)

        if self.sample is None:
            try:
                from gpufleet.metrics.sample import sample_all
            except ImportError as e:  # a gpufleet without the sampler: no metrics, the rest as ever
                log.warning("no metrics: %s", e)
                return
            self.sample = sample_all
        while not self._stop.wait(self.settings.metrics_interval):
            if self.leading:
                self._safely(one_pass)

    def _replicas_loop(self) -> None:
        """Services' replicas (gpufleet.replicas.keep): scaled, replaced, rolled out, every
        `replicas_interval` seconds; their stops on the workers."""
        memories: dict = {}
        routers = router.Memory()  # services' routers told their workers (gpufleet.router)
        while not self._stop.wait(self.settings.replicas_interval):
            if not self.leading or self.services is None:
                memories = {}  # a leader again later counts anew
                continue
            self._safely(lambda m=memories: replicas.keep(
                self.store, m, self.services.ready_names, self._rps, self._stop_replica, time.time()))
            self._safely(lambda: router.sync(self.store, self.services.replica_socket, routers, node_addresses))

    def _rps(self, service: str, window: float) -> float:
        """Requests per second every server process carried to ``service``'s endpoint over ``window``."""
        return self.store.service_requests_since(service, time.time() - window) / window

    def _stop_replica(self, name: str, why: str) -> None:
        """Stop a replica the service no longer wants: first out of this server's rotation, and after
        DRAIN seconds (what it is answering finishes; other servers see it `stopping` within a probe
        tick) its container stopped."""
        if self.services is not None:
            self.services.drain(name)
        work = queue.stop_replica(self.store, name, why)
        if work is None:
            self.kick()
            return

        def drained() -> bool:
            time.sleep(DRAIN)
            return work()

        self.background(drained)

    def reconcile(self) -> None:
        """One pass: settle the runs from their containers (asking only the hosts of active runs),
        every `sweep_interval` also every ready host for containers no run owns (stopped), and note
        hosts that stop answering or come back; kick the scheduler when blocks were freed."""
        before = {r.name for r in self.store.runs() if r.active}
        sweep = time.monotonic() - self._swept >= self.settings.sweep_interval
        if not before and not sweep:
            return
        if sweep:
            self._swept = time.monotonic()
        notes: list[str] = []
        answers: dict[tuple[str, str], str | None] = {}
        runs.refresh(self.store, sweep=sweep, notes=notes,
                     on_answer=lambda f, a, why: answers.__setitem__((f, a), why))
        for note in notes:
            self.store.add_event("orphan", note)
        if sweep:  # the code uploads of runs that ended
            upload.sweep({r.name for r in self.store.runs() if r.live})
        for (fleet, alias), why in answers.items():
            key = (fleet, alias)
            if why and key not in self._unreachable:
                self._unreachable[key] = why
                self.store.add_event("host-unreachable", why, fleet=fleet, host=alias)
            elif not why and key in self._unreachable:
                del self._unreachable[key]
                self.store.add_event("host-back", "answers again", fleet=fleet, host=alias)
        after = {r.name for r in self.store.runs() if r.active}
        if before - after or self.store.pending():
            self.kick()

    def launch(self, run: Run, placements: list[Placement]) -> None:
        """Start a run that holds its blocks, on a worker thread."""
        def work() -> None:
            try:
                queue.launch(self.store, run, placements, self.unseal, self.fleet_secrets)
            except Exception as e:  # never lose a worker to one run: it is failed with the cause
                log.exception("starting %s", run.name)
                why = f"start failed: {e}"
                self._safely(lambda: queue.start_over(self.store, run.name, why))  # failed, or stopped if a stop began
            self.kick()

        self._workers.submit(work)

    def background(self, fn) -> None:
        """Do ``fn`` (a stop) on a worker thread, then schedule: its blocks may be free."""
        def work() -> None:
            self._safely(fn)
            self.kick()

        self._workers.submit(work)

    def _safely(self, fn) -> None:
        try:
            fn()
        except GpufleetError as e:
            log.warning("%s", e)
        except Exception:
            log.exception("loop pass failed; the next one tries again")
