"""The life of a run: submit (allocate blocks, launch its containers), settle what became of its
containers (refresh), stop it, and sweep containers no run owns; its logs and attaching to it.

Launching lives in gpufleet.launch, asking the hosts in gpufleet.containers, the accounting in
gpufleet.state; this module decides the transitions.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from dataclasses import dataclass, field

from rich.console import Console

from gpufleet import failpoints, present
from gpufleet.allocator import NoCapacity, Placement, Request, place_gang
from gpufleet.containers import HostContainers, commands, list_containers, ssh_argv
from gpufleet.errors import EXIT_FAILED, EXIT_OK, GpufleetError, UsageError
from gpufleet.launch import container_name, start_nodes, stop_containers
from gpufleet.models import (
    UNKNOWN_RUNTIME,
    Container,
    FleetState,
    InstanceStatus,
    Run,
    RunConfigType,
    RunStatus,
    TaskConfig,
)
from gpufleet.paths import FleetFiles
from gpufleet.runconfig import load_run
from gpufleet.state import Store

START_LEASE = 300.0  # seconds a `starting` run of another machine's gpufleet is given to start


def request_of(cfg: RunConfigType) -> Request:
    r = cfg.resources
    return Request(gpu=r.gpu, cpu=r.cpu, memory_gb=r.memory, fleets=tuple(cfg.fleets) if cfg.fleets else None)


def cluster_fleets(store: Store) -> set[str]:
    return {f.name for f in store.fleets() if (store.fleet_config(f.name) or {}).get("placement") == "cluster"}


def _plan_rows(placements: list[Placement]) -> list[tuple]:
    return [(p.host.fleet, p.host.num, p.host.alias, ",".join(map(str, p.blocks)),
             ", ".join(p.host.gpus[g].label for g in p.gpus) or "-", p.cpus, p.memory_mib) for p in placements]


def submit(path: str, yes: bool = False, detach: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    run = load_run(path)
    store = Store()
    request = request_of(run.config)
    clusters = cluster_fleets(store)

    def choose(hosts):
        return place_gang(request, hosts, run.nodes, clusters)

    try:
        planned = choose(store.slots_snapshot())  # for the plan shown; the real choice is made under the lock
    except NoCapacity as e:
        raise GpufleetError(str(e)) from None
    console.print(present.run_plan_table(run.name, run.config.type, _plan_rows(planned)))
    for p in planned:
        if p.note:
            present.note(console, "note", f"{run.name} {p.note}")
    if not yes and not present.confirm(console, "Submit the run?"):
        console.print("Nothing was changed.")
        return EXIT_OK
    run_id = uuid.uuid4().hex[:12]
    try:
        placements = store.allocate(run.name, run_id, run.config.type, run.config.model_dump(mode="json"),
                                    container_name(run.name), choose)
    except NoCapacity as e:
        raise GpufleetError(str(e)) from None
    failpoints.reach("after-allocate")
    started: list[str] = []
    try:
        start_nodes(store, run, run_id, placements, started)
    except GpufleetError as e:
        _release(store, run.name, started, str(e))
        present.note(console, "failed", f"{run.name}: {e}", "red")
        return EXIT_FAILED
    except BaseException:
        _release(store, run.name, started, "interrupted while starting")
        raise
    failpoints.reach("after-start")
    store.set_run_status(run.name, RunStatus.RUNNING)
    where = ", ".join(f"instance {p.host.num} ({p.host.alias})" for p in placements)
    present.plain(console, f"{run.name} is running on {placements[0].host.fleet} {where}")
    if detach or not isinstance(run.config, TaskConfig):
        return EXIT_OK
    logs(run.name, follow=True)
    view = _wait_finished(store, run.name)
    present.plain(console, f"{run.name}: {view.status}" + (f" (exit code {view.exit_code})"
                                                            if view.exit_code is not None else ""))
    return EXIT_OK if view.status == RunStatus.DONE else EXIT_FAILED


def _release(store: Store, name: str, started: list[str], why: str) -> None:
    """A start that failed: remove what was started (best effort), mark the run failed, free its blocks."""
    run = store.run(name)
    try:
        if run is not None:
            stop_containers(run.fleet, run.container, run.run_id, started, remove=True)
    except GpufleetError:
        pass  # the sweep of `gpufleet ps` stops what is left
    store.finish_run(name, RunStatus.FAILED, None, why)


def _wait_finished(store: Store, name: str, timeout: float = 60) -> Run:
    """After the followed logs end: refresh until every node's container has exited (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        view = refresh(store, names=[name])[0]
        if not view.active or time.monotonic() > deadline:
            return view
        time.sleep(1)


# --------------------------------------------------------------------------- settling

@dataclass
class Settlement:
    """What a run's containers say about it: its new status (None: unchanged), exit code and
    message, and the hosts whose containers must be stopped first."""

    status: RunStatus | None
    exit_code: int | None = None
    message: str = ""
    stop: list[str] = field(default_factory=list)


def settle(run: Run, states: list[tuple[str, Container | None]], unknown: str) -> Settlement:
    """Decide a run's fate from its containers (``states``: each asked host and what it has, None
    when its container is gone; ``unknown``: why some host could not be asked).

    Done when every node's container exited 0; failed as soon as one failed or vanished (the
    others are then stopped, so no block is freed under a running container)."""
    gone = [a for a, c in states if c is None]
    failed = [(a, c.exit_code) for a, c in states if c and c.ended and c.exit_code != 0]
    running = [a for a, c in states if c and not c.ended]
    if gone or failed:
        code = failed[0][1] if failed else None
        interrupted = gone and run.status == RunStatus.STARTING
        reason = ("its start did not complete (gpufleet was interrupted); blocks freed" if interrupted
                  else f"the container on {gone[0]} is gone (host rebooted or removed by hand)" if gone
                  else f"exited with code {code}" + (f" on {failed[0][0]}" if len(run.aliases) > 1 else ""))
        return Settlement(RunStatus.FAILED, code, reason, running)
    if not running and not unknown and states:
        return Settlement(RunStatus.DONE, 0)
    if unknown:
        return Settlement(run.status, None, unknown)
    if run.status == RunStatus.STARTING:
        return Settlement(RunStatus.RUNNING)
    if run.message:  # its host answers again: the "cannot check" note is over
        return Settlement(run.status)
    return Settlement(None)


def _record(store: Store, run: Run, s: Settlement) -> None:
    if s.stop:
        try:
            stop_containers(run.fleet, run.container, run.run_id, s.stop)
        except GpufleetError:
            pass  # the run ends all the same; the next sweep stops what is left
    if s.status is None:
        return
    if s.status.active:
        store.set_run_status(run.name, s.status, s.message)
    else:
        store.finish_run(run.name, s.status, s.exit_code, s.message)


def refresh(store: Store, names: list[str] | None = None, sweep: bool = False,
            notes: list[str] | None = None) -> list[Run]:
    """Ask the hosts what became of the runs' containers, in one round per fleet, and record it.

    A run left `starting` by a gpufleet that died is released once its start can no longer be
    going on. With ``sweep``, every ready host is asked, and gpufleet containers that no run owns
    (left by a crash, or by a lost state) are stopped and reported in ``notes``."""
    active = [r for r in store.runs() if names is None or r.name in names]
    by_fleet: dict[str, list[Run]] = {}
    for r in active:
        if r.fleet:
            by_fleet.setdefault(r.fleet, []).append(r)
    if sweep:
        for f in store.fleets():
            by_fleet.setdefault(f.name, [])
    for fleet, fleet_runs in by_fleet.items():
        files = FleetFiles.of(fleet)
        if not files.inventory.exists():
            continue
        state = store.fleet(fleet) or FleetState(name=fleet, source="", created_at=0)
        hosts = {a for r in fleet_runs for a in r.aliases}
        if sweep:
            hosts |= {i.alias for i in state.instances if i.status == InstanceStatus.READY}
        if not hosts:
            continue
        runtimes = {a: state.runtime_argv(a) for a in sorted(hosts)}
        answers = list_containers(files, runtimes)
        owned: set[tuple[str, str, str]] = set()
        for r in fleet_runs:
            states: list[tuple[str, Container | None]] = []
            unknown = ""
            for alias in r.aliases:
                a = answers.get(alias)
                if a is None or a.containers is None:
                    unknown = f"cannot check {alias}: {a.message if a else 'no result'}"
                    continue
                states.append((alias, a.find(r.container, r.run_id)))
                owned.add((alias, r.container, r.run_id))
            if r.status == RunStatus.STARTING and any(c is None for _, c in states) and \
                    r.start_in_progress(START_LEASE):
                continue  # its gpufleet is still starting it
            _record(store, r, settle(r, states, unknown))
        if sweep:
            _stop_orphans(store, fleet, answers, owned, notes if notes is not None else [])
    return store.runs(include_finished=True, name=names[0]) if names and len(names) == 1 else store.runs()


def _stop_orphans(store: Store, fleet: str, answers: dict[str, HostContainers], owned: set[tuple[str, str, str]],
                  notes: list[str]) -> None:
    active_ids = {r.run_id for r in store.runs()}
    for alias, a in answers.items():
        for c in a.containers or []:
            if (alias, c.name, c.run_id) in owned or c.run_id in active_ids:
                continue
            if not c.ended and c.state != "created":
                try:
                    stop_containers(fleet, c.name, c.run_id, [alias])
                    failure = ""
                except GpufleetError as e:
                    failure = f" (stop failed: {e})"
                notes.append(f"stopped container {c.name} on {alias}: no run holds blocks for it{failure}")


# --------------------------------------------------------------------------- a run's commands

def get_run(store: Store, name: str) -> Run:
    run = store.run(name)
    if run is None:
        raise GpufleetError(f"no run named {name!r} (see gpufleet ps -a)")
    return run


def _active_run(store: Store, name: str) -> Run:
    run = get_run(store, name)
    if not run.active:
        raise GpufleetError(f"run {name} is not running ({run.status})")
    return run


def _runtime(store: Store, run: Run, alias: str) -> list[str]:
    state = store.fleet(run.fleet)
    return state.runtime_argv(alias) if state else UNKNOWN_RUNTIME.argv()


def logs(name: str, follow: bool = False, node: int = 0) -> int:
    store = Store()
    run = get_run(store, name)
    aliases = run.aliases
    if not aliases:
        raise GpufleetError(f"run {name} never started: {run.message}")
    if not 0 <= node < len(aliases):
        raise UsageError(f"run {name} has {len(aliases)} node(s): --node must be 0..{len(aliases) - 1}")
    remote = commands().logs_argv(_runtime(store, run, aliases[node]), run.container, follow)
    return subprocess.run(ssh_argv(FleetFiles.of(run.fleet).require(), aliases[node], remote)).returncode


def stop(name: str) -> Run:
    store = Store()
    run = _active_run(store, name)
    try:
        stop_containers(run.fleet, run.container, run.run_id, run.aliases)
    except GpufleetError as e:
        raise GpufleetError(f"could not stop {name}: {e}") from None
    store.finish_run(name, RunStatus.STOPPED, None, "stopped by the user")
    return store.run(name)


def attach(name: str, console: Console) -> int:
    store = Store()
    run = _active_run(store, name)
    files = FleetFiles.of(run.fleet).require()
    spec = run.spec
    ports = [str(p) for p in spec.get("ports") or []]
    if spec.get("type") == "service":
        ports.insert(0, str(spec["port"]))
    forwards = []
    for p in dict.fromkeys(ports):
        local, _, remote = p.partition(":")
        forwards += ["-L", f"127.0.0.1:{local}:127.0.0.1:{remote or local}"]
        present.plain(console, f"forwarding localhost:{local} -> {run.alias}:{remote or local} "
                               "(through the jump chain)")
    if spec.get("type") == "dev-environment":
        remote = commands().exec_argv(_runtime(store, run, run.alias), run.container, ["/bin/sh"])
        return subprocess.run(ssh_argv(files, run.alias, remote, tty=True, extra=forwards)).returncode
    if not forwards:
        raise GpufleetError(f"run {name} has no ports to forward")
    console.print("press Ctrl-C to stop forwarding")
    try:
        return subprocess.run(ssh_argv(files, run.alias, None,
                                       extra=["-N", "-o", "ExitOnForwardFailure=yes", *forwards])).returncode
    except KeyboardInterrupt:
        return EXIT_OK
