"""What became of a run's containers: settle it from what its hosts say (refresh), sweep the
containers no run owns; the ssh commands of its logs and of attaching to it. Server side.

Queueing, starting and stopping live in gpufleet.queue, launching in gpufleet.launch, asking the
hosts in gpufleet.containers, the accounting in gpufleet.state; this module decides the transitions
of runs whose containers exist.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpufleet import devssh
from gpufleet.containers import HostContainers, commands, list_containers, ssh_argv
from gpufleet.errors import GpufleetError, NotFound, UsageError
from gpufleet.launch import STATE_LABEL, stop_containers
from gpufleet.models import (
    RUN_CONFIG,
    UNKNOWN_RUNTIME,
    Container,
    FleetState,
    InstanceStatus,
    Run,
    RunStatus,
)
from gpufleet.models.run import port_pair
from gpufleet.paths import FleetFiles
from gpufleet.state import Store

START_LEASE = 300.0  # seconds a `starting` run of another machine's gpufleet is given to start


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

    Done when every node's container exited 0, or (`stop_criteria: master-done`) as soon as the
    master's (node 0's) did: the others are then stopped. Failed as soon as one failed or vanished
    (the others are then stopped, so no block is freed under a running container)."""
    gone = [a for a, c in states if c is None]
    failed = [(a, c.exit_code) for a, c in states if c and c.ended and c.exit_code != 0]
    running = [a for a, c in states if c and not c.ended]
    if run.status == RunStatus.STOPPING:  # its stopper died: finish the stop it began
        return Settlement(RunStatus.STOPPED, None, run.message, running)
    if gone or failed:
        code = failed[0][1] if failed else None
        interrupted = gone and run.status == RunStatus.STARTING
        reason = ("its start did not complete (gpufleet was interrupted); blocks freed" if interrupted
                  else f"the container on {gone[0]} is gone (host rebooted or removed by hand)" if gone
                  else f"exited with code {code}" + (f" on {failed[0][0]}" if len(run.aliases) > 1 else ""))
        if code == devssh.NO_SSHD_EXIT and run.spec.get("type") == "dev-environment" and run.spec.get("ide"):
            reason += (f": image {run.spec.get('image')} has no sshd and could not install openssh-server "
                       f"(`ide` needs one; gpufleet logs {run.name} says why)")
        return Settlement(RunStatus.FAILED, code, reason, running)
    if not running and not unknown and states:
        return Settlement(RunStatus.DONE, 0)
    if master_done(run, states):
        return Settlement(RunStatus.DONE, 0, "the master (node 0) exited with code 0: the other nodes were "
                                             "stopped (stop_criteria: master-done)", running)
    if unknown:
        return Settlement(run.status, None, unknown)
    if run.status == RunStatus.STARTING:
        return Settlement(RunStatus.RUNNING)
    if run.message:  # its host answers again: the "cannot check" note is over
        return Settlement(run.status)
    return Settlement(None)


def master_done(run: Run, states: list[tuple[str, Container | None]]) -> bool:
    """A multi-node run with `stop_criteria: master-done` whose master's (node 0's) container exited 0."""
    aliases = run.aliases
    if len(aliases) < 2 or run.spec.get("stop_criteria") != "master-done":
        return False
    master = dict(states).get(aliases[0])
    return master is not None and master.ended and master.exit_code == 0


def _record(store: Store, run: Run, s: Settlement) -> None:
    """Record ``s``, decided from ``run`` as it was read: only if the run is still in that status (a
    stop that began since, whose stopper kills the containers, is not taken for their failure)."""
    if s.stop:
        try:
            stop_containers(run.fleet, run.container, run.run_id, s.stop)
        except GpufleetError:
            pass  # the run ends all the same; the next sweep stops what is left
    if s.status is None:
        return
    if s.status == RunStatus.STOPPED and run.status == RunStatus.STOPPING:
        store.finish_stop(run.name)  # its stopper died: the stop it began ends as it said (by whom)
    elif s.status.active:
        store.set_run_status(run.name, s.status, s.message, expect=(run.status,))
    else:
        store.finish_run(run.name, s.status, s.exit_code, s.message, expect=(run.status,))


def refresh(store: Store, names: list[str] | None = None, sweep: bool = False,
            notes: list[str] | None = None,
            on_answer: Callable[[str, str, str | None], None] | None = None) -> list[Run]:
    """Ask the hosts what became of the runs' containers, in one round per fleet, and record it.

    A run left `starting` by a gpufleet that died is released once its start can no longer be
    going on. With ``sweep``, every ready host is asked, and gpufleet containers that no run owns
    (left by a crash, or by a lost state) are stopped and reported in ``notes``. ``on_answer(fleet,
    alias, why)`` hears of each host asked: why it could not be asked, None when it answered."""
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
        if on_answer:
            for alias, a in answers.items():
                on_answer(fleet, alias, None if a.containers is not None else (a.message or "no answer"))
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
            if r.start_in_progress(START_LEASE):
                continue  # being started or stopped: whoever does it records the outcome first
            s = settle(r, states, unknown)
            if r.status == RunStatus.STARTING and s.status == RunStatus.FAILED and \
                    not any(c is not None and c.ended for _, c in states):
                # its server died while starting it, before any container ran to an end: it waits
                # again (its secrets are kept until it runs), on blocks the scheduler chooses anew
                _record(store, r, Settlement(None, stop=s.stop))
                store.requeue(r.name, "its start was interrupted (the server stopped); waiting again",
                              expect=(RunStatus.STARTING,))
                continue
            if s.status == RunStatus.FAILED and _retried(store, r, s):
                continue
            _record(store, r, s)
        if sweep:
            _stop_orphans(store, fleet, answers, owned, notes if notes is not None else [])
    return store.runs(include_finished=True, name=names[0]) if names and len(names) == 1 else store.runs()


def _retried(store: Store, run: Run, s: Settlement) -> bool:
    """dstack's `retry.on_events`: a run that failed by an `error` (a non-zero exit) or an
    `interruption` (its container gone: the host rebooted, the container was removed) waits again
    for blocks, within `retry.duration` of its submission. Whatever still runs of it is stopped."""
    policy = store.retry_policy(run.name)
    event = "error" if s.exit_code not in (None, 0) else "interruption"
    if event not in (policy.get("on_events") or []):
        return False
    duration = policy.get("duration")
    since = run.next_at if run.next_at is not None else run.created_at  # a scheduled run: from its time
    if duration is not None and time.time() - since > duration:
        return False
    _record(store, run, Settlement(None, stop=s.stop))
    store.requeue(run.name, f"retrying after an {event} ({s.message}); waiting again", expect=(run.status,))
    return True


def _stop_orphans(store: Store, fleet: str, answers: dict[str, HostContainers], owned: set[tuple[str, str, str]],
                  notes: list[str]) -> None:
    active_ids = {r.run_id for r in store.runs()}
    for alias, a in answers.items():
        for c in a.containers or []:
            if (alias, c.name, c.run_id) in owned or c.run_id in active_ids:
                continue
            if c.labels.get(STATE_LABEL) != store.identity:
                continue  # another state's (or an older gpufleet's) container: not ours to stop
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
        raise NotFound(f"no run named {name!r} (see gpufleet ps -a)")
    return run


def _active_run(store: Store, name: str) -> Run:
    return _require_active(replica_for(store, get_run(store, name)))


def replica_for(store: Store, run: Run) -> Run:
    """What a run's commands (logs, attach) reach: the run itself, or for a service its first running
    replica (each replica is a run of its own: name it, SERVICE.N, to reach another)."""
    if not run.is_service:
        return run
    running = [r for r in store.replica_runs(run.name) if r.status == RunStatus.RUNNING]
    if not running:
        raise GpufleetError(f"service {run.name} has no running replica yet ({run.message})" if run.live
                            else f"service {run.name} is {run.status}")
    return min(running, key=lambda r: r.created_at)


def _require_active(run: Run) -> Run:
    if not run.active:
        raise GpufleetError(f"run {run.name} is not running ({run.status}" +
                            (f": {run.message})" if run.live else ")"))
    return run


def _runtime(store: Store, run: Run, alias: str) -> list[str]:
    state = store.fleet(run.fleet)
    return state.runtime_argv(alias) if state else UNKNOWN_RUNTIME.argv()


def logs_argv(store: Store, name: str, follow: bool = False, node: int = 0) -> list[str]:
    """The ssh command that prints (``follow``: and follows) the output of node ``node`` of run ``name``."""
    run = get_run(store, name)
    if run.is_service and run.live:
        run = replica_for(store, run)
    aliases = run.aliases
    if not aliases:
        raise GpufleetError(f"run {name} has not started: {run.message}" if run.live
                            else f"run {name} never started: {run.message}")
    if not 0 <= node < len(aliases):
        raise UsageError(f"run {name} has {len(aliases)} node(s): --node must be 0..{len(aliases) - 1}")
    remote = commands().logs_argv(_runtime(store, run, aliases[node]), run.container, follow)
    return ssh_argv(FleetFiles.of(run.fleet).require(), aliases[node], remote)


def forwards(spec: dict) -> list[tuple[int, int]]:
    """The ports a run declares, as (local, remote): a service's `port` first, then its `ports`
    (``8080:8000``: local 8080, remote 8000; ``*:8000``: local 0, a port picked when attaching), each once."""
    ports = [str(p) for p in spec.get("ports") or []]
    if spec.get("type") == "service":
        ports.insert(0, str(spec["port"]))
    return [port_pair(p) for p in dict.fromkeys(ports)]


def _free_local_port() -> int:
    """A port free now on this machine's 127.0.0.1 (for a `*:PORT`, dstack's local port picked at attach)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def host_port(store: Store, run: Run, port: int) -> int:
    """Where container port ``port`` of ``run`` is on its host's 127.0.0.1: the port itself for a
    container on the host's network, else the host port the runtime picked when it published it
    (two runs on one host may both listen on 8000)."""
    cfg = RUN_CONFIG.validate_python(run.spec)
    if cfg.host_network:
        return port
    files = FleetFiles.of(run.fleet).require()
    argv = ssh_argv(files, run.alias, commands().port_argv(_runtime(store, run, run.alias), run.container, port))
    try:
        p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    except subprocess.TimeoutExpired:
        raise GpufleetError(f"{run.alias} did not say where port {port} of run {run.name} is within 30s") from None
    found = commands().published_port(p.stdout) if p.returncode == 0 else None
    if found is None:
        why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise GpufleetError(f"port {port} of run {run.name} is not published on {run.alias}: {why}")
    return found


def dev_sshd_port(run: Run) -> int | None:
    """The container port of a dev environment's sshd (None for other runs)."""
    if run.spec.get("type") != "dev-environment":
        return None
    return devssh.sshd_port(RUN_CONFIG.validate_python(run.spec).host_network, run.run_id)


def ssh_access(store: Store, run: Run, public_key: str) -> dict:
    """Let ``public_key`` into dev environment ``run``'s sshd (added to its authorized keys, once) and
    say how to reach it: {port, host_key, user, workdir, ide}. GpufleetError when it has no sshd (why)."""
    _require_active(run)
    if run.spec.get("type") != "dev-environment":
        raise UsageError(f"run {run.name} is a {run.spec.get('type', 'task')}, not a dev environment: only a dev "
                         f"environment has an SSH server")
    try:
        key = devssh.check_public_key(public_key)
    except ValueError as e:
        raise UsageError(f"public_key: {e}") from None
    files = FleetFiles.of(run.fleet).require()
    runtime = _runtime(store, run, run.alias)
    argv = ssh_argv(files, run.alias, [*runtime, "exec", "-i", run.container, "/bin/sh", "-c",
                                       devssh.register_script()])
    try:
        p = subprocess.run(argv, input=key + "\n", capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise GpufleetError(f"{run.alias} did not answer within 60s") from None
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise GpufleetError(f"cannot reach the container of {run.name} on {run.alias}: {why}")
    try:
        answer = devssh.read_register_answer(p.stdout)
    except ValueError as e:
        raise GpufleetError(f"run {run.name}: its sshd's host key is unreadable: {e}") from None
    if not answer["ok"]:
        raise GpufleetError(f"dev environment {run.name} has no SSH server running: {answer['why']} "
                            f"(gpufleet logs {run.name} says more)")
    return {"port": dev_sshd_port(run), "host_key": answer["host_key"], "user": answer["user"],
            "workdir": run.spec.get("working_dir") or answer["workdir"], "ide": run.spec.get("ide")}


def connection_count(store: Store, run: Run) -> int:
    """How many connections dev environment ``run`` has now (SSH connections to its sshd, `gpufleet
    attach` shells: devssh.connections); GpufleetError when its host cannot tell."""
    files = FleetFiles.of(run.fleet).require()
    argv = ssh_argv(files, run.alias, [*_runtime(store, run, run.alias), "exec", run.container, "/bin/sh", "-c",
                                       devssh.connections_script()])
    try:
        p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    except subprocess.TimeoutExpired:
        raise GpufleetError(f"{run.alias} did not answer within 60s") from None
    if p.returncode != 0 or devssh.ATTACH_MARK not in p.stdout:
        why = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        raise GpufleetError(f"cannot count the connections of {run.name} on {run.alias}: {why}")
    return devssh.connections(p.stdout, dev_sshd_port(run))


def attach_plan(store: Store, name: str) -> dict:
    """How to attach to run ``name`` on the machine holding the fleet's files: the ports forwarded
    ([local, remote]) and the ssh command (through the jump chain): a shell in the container of a
    dev environment, else the forwarding alone."""
    run = _active_run(store, name)
    files = FleetFiles.of(run.fleet).require()
    spec = run.spec
    pairs = forwards(spec)
    # the ssh command's local ports: `*:PORT` (local 0) gets one free here, where the command runs; the
    # declared pairs (0 kept) are for a client that carries the ports through the server and picks its own
    bound = [(local or _free_local_port(), remote) for local, remote in pairs]
    extra = [a for local, remote in bound
             for a in ("-L", f"127.0.0.1:{local}:127.0.0.1:{host_port(store, run, remote)}")]
    if spec.get("type") == "dev-environment":
        argv = ssh_argv(files, run.alias, _shell(store, run), tty=True, extra=extra)
    else:
        argv = ssh_argv(files, run.alias, None, extra=["-N", "-o", "ExitOnForwardFailure=yes", *extra])
    return {"ssh_config": str(files.ssh_config), "alias": run.alias, "forwards": [list(p) for p in pairs],
            "bound": [list(p) for p in bound],
            "shell": spec.get("type") == "dev-environment", "argv": argv}


def tunnel_argv(store: Store, run: Run, port: int) -> list[str]:
    """The ssh command whose stdin and stdout are a TCP connection to container port ``port`` of
    ``run`` on its host (through the fleet's jump chain): ``port`` must be one the run declares (the
    remote side of a ``8080:8000``), so the server reaches nothing else of the host."""
    run = _require_active(replica_for(store, run))
    declared = sorted({remote for _, remote in forwards(run.spec)})
    sshd = dev_sshd_port(run)
    if sshd is not None and port == sshd:
        declared.append(port)  # a dev environment's sshd: ssh RUN-NAME
    if port not in declared:
        raise UsageError(f"run {run.name} does not declare port {port}: " +
                         (f"it declares {', '.join(map(str, declared))}" if declared else "it declares no ports"))
    files = FleetFiles.of(run.fleet).require()
    target = host_port(store, run, port)
    return ssh_argv(files, run.alias, None, extra=["-o", "ExitOnForwardFailure=yes", "-W", f"127.0.0.1:{target}"])



def _shell(store: Store, run: Run) -> list[str]:
    """The command, on the run's host, of an interactive shell in its container."""
    # marked, so that a dev environment's inactivity_duration counts it (devssh.connections)
    return commands().exec_argv(_runtime(store, run, run.alias), run.container,
                                ["/bin/sh", "-c", f"{devssh.ATTACH_MARK}=1; export {devssh.ATTACH_MARK}; exec /bin/sh"])


def shell_argv(store: Store, run: Run) -> list[str]:
    """The ssh command (through the fleet's jump chain) of a shell in the container of dev environment
    ``run``, for a pseudo-terminal the server opens: ``-tt`` (a terminal on the host even though ssh's
    own is not a user's), no escape character (``~.`` is the user's bytes, not ssh's) and no "connection
    closed" notice. ssh's exit status is the shell's (255: ssh's own failure)."""
    _require_active(run)
    if run.spec.get("type") != "dev-environment":
        raise UsageError(f"run {run.name} is a {run.spec.get('type', 'task')}, not a dev environment: only a dev "
                         f"environment has a shell (gpufleet attach forwards its ports)")
    files = FleetFiles.of(run.fleet).require()
    return ssh_argv(files, run.alias, _shell(store, run),
                    extra=["-tt", "-o", "EscapeChar=none", "-o", "LogLevel=ERROR"])
