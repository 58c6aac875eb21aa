"""Workloads on blocks: submit a run (allocate, start its container), refresh, stop, logs, attach.

The container itself is started and stopped by playbooks/start.yml and stop.yml (role `workload`);
this module decides what to start where, and keeps the accounting in the state store. What became
of the containers (`ps`), their logs and `attach` are asked over the fleet's ssh_config and its
open masters, without a playbook run: `ps` is run many times a day and a playbook round costs
seconds (benchmarks/README.md). playbooks/status.yml asks the same for Ansible pipelines.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shlex
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gpufleet import cluster, failpoints, paths
from gpufleet.allocator import NoCapacity, Placement, Request, place_gang
from gpufleet.errors import EXIT_FAILED, EXIT_OK, GpufleetError, UsageError
from gpufleet.runconfig import DevEnvironmentConfig, Run, ServiceConfig, TaskConfig, load_run
from gpufleet.runner import run_playbook, write_unsafe_vars
from gpufleet.state import RunView, Store

KEEP_ALIVE = "while :; do sleep 3600; done"


def fleet_paths(fleet: str) -> tuple[Path, Path]:
    d = paths.home() / "fleets" / fleet
    inventory, ssh_config = d / "inventory.yml", d / "ssh_config"
    if not inventory.exists():
        raise GpufleetError(f"fleet {fleet} has no inventory: re-apply it (gpufleet apply -f FLEET.yml)")
    return inventory, ssh_config


def container_name(run_name: str) -> str:
    return f"gpufleet-{run_name}"


def request_of(cfg: TaskConfig | ServiceConfig | DevEnvironmentConfig) -> Request:
    r = cfg.resources
    return Request(gpu=r.gpu, cpu=r.cpu, memory_gb=r.memory, fleets=tuple(cfg.fleets) if cfg.fleets else None)


def _cpuset(probe: dict, numa_nodes: set) -> str | None:
    cpulists = (probe.get("cpu") or {}).get("numa_nodes") or {}
    if not numa_nodes or None in numa_nodes or any(str(n) not in cpulists for n in numa_nodes):
        return None
    return ",".join(cpulists[str(n)] for n in sorted(numa_nodes))


def container_vars(run: Run, run_id: str, fleet_env: dict[str, str], probe: dict, gpus: list[dict],
                   cpus: int, memory_mib: int, numa_nodes: set, node_env: dict[str, str] | None = None,
                   prelude: str = "", secrets: dict[str, str] | None = None) -> dict:
    """Everything the `workload` role needs to start the run's container, per GPU vendor."""
    cfg = run.config
    runtime = probe.get("runtime") or {}
    support = runtime.get("gpu_support") or {}
    devices: list[str] = []
    docker_gpus = oci_runtime = None
    extra_env: dict[str, str] = {}
    nvidia = [g for g in gpus if g["vendor"] == "nvidia"]
    if nvidia:
        ids = [g.get("uuid") or str(g["index"]) for g in nvidia]
        if support.get("nvidia") == "cdi":
            devices += [f"nvidia.com/gpu={i}" for i in ids]
        else:
            docker_gpus = "device=" + ",".join(ids)
    amd = [g for g in gpus if g["vendor"] == "amd"]
    if amd:
        devices += ["/dev/kfd"] + [f"/dev/dri/renderD{128 + g['index']}" for g in amd]
    intel = [g for g in gpus if g["vendor"] == "intel"]
    if intel:
        oci_runtime = "habana"
        extra_env["HABANA_VISIBLE_DEVICES"] = ",".join(str(g["index"]) for g in intel)
    devices += [f"/dev/tenstorrent/{g['index']}" for g in gpus if g["vendor"] == "tenstorrent"]
    indices = ",".join(str(g["index"]) for g in gpus)
    # fleet env < run env < what gpufleet sets (the node's own settings last); at each layer a value
    # or a secret replaces the one below
    ours = {"GPUFLEET_RUN_NAME": run.name, "GPUFLEET_GPUS_NUM": str(len(gpus)), "GPUFLEET_GPUS": indices,
            "DSTACK_RUN_NAME": run.name, "DSTACK_GPUS_NUM": str(len(gpus))}
    env: dict[str, str] = {}
    secret_env: dict[str, str] = {}
    for layer, secret in ((fleet_env, False), (secrets or {}, True), (cfg.env_dict, False), (run.secrets, True),
                          (extra_env, False), (ours, False), (node_env or {}, False)):
        for name, value in layer.items():
            (secret_env if secret else env)[name] = value
            (env if secret else secret_env).pop(name, None)
    lines = [prelude] if prelude else []
    lines += cfg.commands
    if isinstance(cfg, DevEnvironmentConfig):
        lines.append(KEEP_ALIVE)
    script = "\n".join(lines)
    command = ["/bin/sh", "-c", "set -e\n" + script] if script else []
    return {
        "workload_name": container_name(run.name),
        "workload_run_id": run_id,
        "workload_image": cfg.image,
        "workload_command": command,
        "workload_env": env,
        "workload_secret_env": secret_env,
        "workload_labels": {"gpufleet.run": run.name, "gpufleet.type": cfg.type, "gpufleet.gpus": indices},
        "workload_devices": devices,
        "workload_gpus": docker_gpus,
        "workload_oci_runtime": oci_runtime,
        "workload_cpuset_cpus": _cpuset(probe, numa_nodes),
        "workload_cpus": float(cpus) if cpus else None,
        "workload_memory_mib": memory_mib or None,
        "workload_network": "host",
        "workload_volumes": list(cfg.volumes),
        "workload_workdir": cfg.working_dir,
    }


def _plan_table(run: Run, placements: list[Placement]) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("RUN", "TYPE", "NODE", "FLEET", "INSTANCE", "BLOCKS", "GPUS", "CPUS", "MEMORY"):
        t.add_column(col)
    for rank, p in enumerate(placements):
        gpus = ", ".join(f"{p.host.gpus[g]['index']}:{p.host.gpus[g].get('model')}" for g in p.gpus) or "-"
        t.add_row(run.name if rank == 0 else "", run.config.type if rank == 0 else "", str(rank), p.host.fleet,
                  f"{p.host.num} ({p.host.alias})", ",".join(map(str, p.blocks)), gpus, str(p.cpus),
                  f"{round(p.memory_mib / 1024)}GB")
    return t


def cluster_fleets(store: Store) -> set[str]:
    return {f.name for f in store.fleets() if (store.fleet_config(f.name) or {}).get("placement") == "cluster"}


def submit(path: str, yes: bool = False, detach: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    run = load_run(path)
    forget_secrets(run.secrets)
    store = Store()
    request = request_of(run.config)
    nodes = getattr(run.config, "nodes", 1)
    clusters = cluster_fleets(store)

    def choose(hosts):
        return place_gang(request, hosts, nodes, clusters)

    try:
        planned = choose(store.slots_snapshot())  # for the plan shown; the real choice is made under the lock
    except NoCapacity as e:
        raise GpufleetError(str(e)) from None
    console.print(_plan_table(run, planned))
    for p in planned:
        if p.note:
            console.print(f"[yellow]note[/] {run.name} {p.note}")
    if not yes:
        import sys

        if not sys.stdin.isatty():
            raise UsageError("not a terminal, so no one can confirm: pass -y to submit")
        if console.input("Submit the run? [y/n]: ").strip().lower() not in ("y", "yes"):
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
        error = _start_nodes(store, run, run_id, placements, started)
    except BaseException:
        _stop_containers(store.run(run.name), started, remove=True)
        store.finish_run(run.name, "failed", None, "interrupted while starting")
        raise
    if error:
        _stop_containers(store.run(run.name), started, remove=True)
        store.finish_run(run.name, "failed", None, error)
        console.print(f"[red]failed[/] {run.name}: {error}")
        return EXIT_FAILED
    failpoints.reach("after-start")
    store.set_run_status(run.name, "running")
    where = ", ".join(f"instance {p.host.num} ({p.host.alias})" for p in placements)
    console.print(f"{run.name} is running on {placements[0].host.fleet} {where}")
    if detach or not isinstance(run.config, TaskConfig):
        return EXIT_OK
    logs(run.name, follow=True)
    view = _wait_finished(store, run.name)
    console.print(f"{run.name}: {view.status}" + (f" (exit code {view.exit_code})" if view.exit_code is not None
                                                  else ""))
    return EXIT_OK if view.status == "done" else EXIT_FAILED


def _wait_finished(store: Store, name: str, timeout: float = 60) -> RunView:
    """After the followed logs end: refresh until every node's container has exited (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        view = refresh(store, names=[name])[0]
        if not view.active or time.monotonic() > deadline:
            return view
        time.sleep(1)


def _start_nodes(store: Store, run: Run, run_id: str, placements: list[Placement], started: list[str]) -> str:
    """Start the run's container on each node, rank 0 first. Return the error, or "" when all started."""
    fleet_name = placements[0].host.fleet
    fleet = store.fleet(fleet_name)
    try:
        fleet_env, fleet_secrets = fleet_config_env(store, fleet_name)
    except UsageError as e:
        return str(e)
    probes = {i.alias: i.probe for i in fleet.instances}
    envs: list[dict[str, str]] = [{} for _ in placements]
    prelude = ""
    gpus_per_node = len(placements[0].gpus)
    if len(placements) > 1:
        try:
            ips = node_addresses(store, fleet_name, [p.host.alias for p in placements])
        except GpufleetError as e:
            return str(e)
        envs = [cluster.node_env(rank, ips, gpus_per_node) for rank in range(len(placements))]
        prelude = cluster.hostfile_script(ips, gpus_per_node)
    else:
        envs = [{"GPUFLEET_NODE_RANK": "0", "GPUFLEET_NODES_NUM": "1", "DSTACK_NODE_RANK": "0",
                 "DSTACK_NODES_NUM": "1", "GPUFLEET_GPUS_PER_NODE": str(gpus_per_node),
                 "DSTACK_GPUS_PER_NODE": str(gpus_per_node)}]
    for rank, p in enumerate(placements):
        host = p.host
        numa = {b.numa_node for b in host.blocks if b.idx in p.blocks}
        variables = container_vars(run, run_id, fleet_env, probes[host.alias], [host.gpus[g] for g in p.gpus],
                                   p.cpus, p.memory_mib, numa, envs[rank], prelude, fleet_secrets)
        started.append(host.alias)
        ok, message = _start(fleet_name, host.alias, variables)
        if not ok:
            prefix = f"node {rank} ({host.alias}): " if len(placements) > 1 else f"{host.alias}: "
            return prefix + message
    return ""


def node_addresses(store: Store, fleet_name: str, aliases: list[str]) -> list[str]:
    from gpufleet.config import FleetConfig

    cfg = FleetConfig.model_validate(store.fleet_config(fleet_name))
    targets = dict(zip(target_aliases_of(cfg), cfg.ssh_config.hosts, strict=True))
    inventory, _ = fleet_paths(fleet_name)
    hostnames = {a: targets[a].hostname for a in aliases}
    outcomes = cluster.probe_addresses(inventory, aliases, hostnames)
    return [cluster.choose_address(a, outcomes.get(a), str(targets[a].internal_ip) if targets[a].internal_ip
                                   else None, cfg.ssh_config.network) for a in aliases]


def target_aliases_of(cfg) -> list[str]:
    """Inventory aliases of a stored fleet config's hosts (same rule as the inventory)."""
    from gpufleet.config import Target
    from gpufleet.inventory import target_aliases

    ssh = cfg.ssh_config
    return target_aliases(tuple(Target(h.hostname, h.port or ssh.port or 22, None, None, (), 1, None)
                                for h in ssh.hosts))


def fleet_config_env(store: Store, fleet: str) -> tuple[dict[str, str], dict[str, str]]:
    """The fleet's env for its workloads: (values, secrets); secret values come from this process's
    environment, as a run's do."""
    from gpufleet.config import split_env

    # the config as validated when the fleet was applied; not validated again (its identity files,
    # say, may be gone since, which concerns the next apply of the fleet, not this run's env)
    cfg = store.fleet_config(fleet)
    values, names = split_env((cfg or {}).get("env"))
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise UsageError(f"fleet {fleet}: env {', '.join(missing)} is secret (given without a value) but not set "
                         f"in the environment: export {missing[0]}=... before gpufleet apply")
    secrets = {n: os.environ[n] for n in names}
    forget_secrets(secrets)
    return values, secrets


def forget_secrets(secrets: dict[str, str]) -> None:
    """Once read, secret values leave this process's environment, so that no child inherits them
    (ansible-playbook would otherwise carry them; only the workload role's no_log option does)."""
    for name in secrets:
        os.environ.pop(name, None)


def _start(fleet: str, alias: str, variables: dict) -> tuple[bool, str]:
    inventory, _ = fleet_paths(fleet)
    vars_file = write_unsafe_vars(variables)
    try:
        result = run_playbook("start", inventory, limit=[alias], vars_file=vars_file)
    finally:
        vars_file.unlink(missing_ok=True)
    if result.canceled:
        raise KeyboardInterrupt
    outcome = result.hosts.get(alias)
    if outcome is None or outcome.status in ("failed", "unreachable"):
        return False, (outcome.message if outcome else "no result from the start playbook")
    return True, ""


START_LEASE = 300.0  # seconds a `starting` run of another machine's gpufleet is given to start


def refresh(store: Store, names: list[str] | None = None, sweep: bool = False,
            notes: list[str] | None = None) -> list[RunView]:
    """Ask the hosts what became of the runs' containers, in one round per fleet.

    A run is done when every node's container exited 0; failed as soon as one failed or vanished
    (the other nodes are then stopped, so no block is freed under a running container). A run
    left `starting` by a gpufleet that died is released once its start can no longer be going on.
    With ``sweep``, every ready host is asked, and gpufleet containers that no run owns (left by
    a crash, or by a lost state) are stopped and reported in ``notes``."""
    active = [r for r in store.runs() if names is None or r.name in names]
    by_fleet: dict[str, list[RunView]] = {}
    for r in active:
        if r.fleet:
            by_fleet.setdefault(r.fleet, []).append(r)
    if sweep:
        for f in store.fleets():
            by_fleet.setdefault(f.name, [])
    for fleet, fleet_runs in by_fleet.items():
        try:
            _, ssh_config = fleet_paths(fleet)
        except GpufleetError:
            continue
        hosts = sorted({a for r in fleet_runs for a in _aliases(r)})
        if sweep:
            view = store.fleet(fleet)
            hosts = sorted(set(hosts) | {i.alias for i in (view.instances if view else []) if i.status == "ready"})
        if not hosts:
            continue
        answers = list_containers(store, fleet, ssh_config, hosts)
        owned: set[tuple[str, str, str]] = set()
        for r in fleet_runs:
            states = []
            unknown = ""
            for alias in _aliases(r):
                a = answers.get(alias)
                if a is None or a.containers is None:
                    unknown = f"cannot check {alias}: {a.message if a else 'no result'}"
                    continue
                found = next((c for c in a.containers if c.get("name") == r.container
                              and c.get("run_id") == r.run_id), None)
                states.append((alias, found))
                owned.add((alias, r.container, r.run_id))
            if r.status == "starting" and any(c is None for _, c in states) and r.start_in_progress(START_LEASE):
                continue  # its gpufleet is still starting it
            _settle(store, r, states, unknown)
        if sweep:
            _stop_orphans(store, fleet, answers, owned, notes if notes is not None else [])
    return store.runs(include_finished=True, name=names[0]) if names and len(names) == 1 else store.runs()


@dataclass
class HostContainers:
    containers: list[dict] | None  # None: the host could not be asked (``message`` says why)
    message: str = ""


LIST_TIMEOUT = 60  # seconds for one host's answer (connect timeouts are 10 s a hop)
# Only the fields gpufleet_inspect reads cross the wire, never Config.Env (a run's secrets stay on
# its host). The same Go template works for podman and docker; one JSON object a line.
INSPECT_FORMAT = ('{"Name":{{json .Name}},"Id":{{json .ID}},"State":{{json .State}},'
                  '"Config":{"Labels":{{json .Config.Labels}},"Image":{{json .Config.Image}}}}')


@functools.cache
def _inspect_parser():
    """container_from_inspect from the workload role's module_utils: the one copy of that parsing,
    which the gpufleet_container modules run on the hosts."""
    path = paths.content_root() / "roles" / "workload" / "module_utils" / "gpufleet_inspect.py"
    spec = importlib.util.spec_from_file_location("gpufleet_inspect", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _list_script(runtime: list[str]) -> str:
    rt = shlex.join(runtime)
    label = shlex.quote("label=" + _inspect_parser().RUN_ID_LABEL)
    return (f"ids=$({rt} ps --all --quiet --no-trunc --filter {label}) || exit 3; "
            f"[ -z \"$ids\" ] || {rt} container inspect --format {shlex.quote(INSPECT_FORMAT)} $ids")


def _ask_host(ssh_config: Path, alias: str, runtime: list[str]) -> HostContainers:
    cmd = ["ssh", "-F", str(ssh_config), alias, "--", _list_script(runtime)]
    for _ in range(3):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=LIST_TIMEOUT)
        except subprocess.TimeoutExpired:
            return HostContainers(None, f"no answer within {LIST_TIMEOUT}s")
        if p.returncode == 0:
            parse = _inspect_parser().container_from_inspect
            try:
                found = [parse(json.loads(line)) for line in p.stdout.splitlines() if line.strip()]
            except ValueError:
                return HostContainers(None, f"cannot read what {runtime[-1]} container inspect printed")
            return HostContainers(sorted((c for c in found if c["run_id"] is not None), key=lambda c: c["name"]))
        if p.returncode != 255 and "no such" in p.stderr.lower():
            continue  # a container went away between ps and inspect: ask again
        break
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    reason = lines[-1].strip() if lines else f"exit code {p.returncode}"
    if p.returncode == 3:
        reason = f"{runtime[-1]} ps failed: {reason}"
    return HostContainers(None, reason)


def list_containers(store: Store, fleet: str, ssh_config: Path, aliases: list[str]) -> dict[str, HostContainers]:
    """Every gpufleet container on each of ``aliases`` (name, id, state, exit_code, run_id, ...,
    as gpufleet_container_info returns them), all hosts asked at once over ``ssh_config``."""
    runtimes = _host_runtime_vars(store, fleet)

    def ask(alias: str) -> HostContainers:
        return _ask_host(ssh_config, alias, _runtime_cmd(runtimes.get(alias)))

    if not aliases:
        return {}
    with ThreadPoolExecutor(min(len(aliases), 32)) as pool:
        return dict(zip(aliases, pool.map(ask, aliases), strict=True))


def _stop_orphans(store: Store, fleet: str, answers: dict[str, HostContainers], owned: set[tuple[str, str, str]],
                  notes: list[str]) -> None:
    active_ids = {r.run_id for r in store.runs()}
    for alias, a in answers.items():
        if a.containers is None:
            continue
        for c in a.containers:
            if (alias, c.get("name"), c.get("run_id")) in owned or c.get("run_id") in active_ids:
                continue
            if c.get("state") not in ("exited", "stopped", "dead", "created"):
                probe = RunView(c.get("name"), c.get("run_id"), "", fleet, None, alias, "running", "", None,
                                [], [], {}, c.get("name"), [], 0, 0)
                error = _stop_containers(probe, [alias])
                notes.append(f"stopped container {c.get('name')} on {alias}: no run holds blocks for it"
                                    + (f" (stop failed: {error})" if error else ""))


def _aliases(r: RunView) -> list[str]:
    return [n["alias"] for n in r.nodes] if r.nodes else ([r.alias] if r.alias else [])


def _settle(store: Store, r: RunView, states: list[tuple[str, dict | None]], unknown: str) -> None:
    gone = [a for a, c in states if c is None]
    failed = [(a, c.get("exit_code")) for a, c in states
              if c and c.get("state") in ("exited", "stopped", "dead") and c.get("exit_code") != 0]
    running = [a for a, c in states if c and c.get("state") not in ("exited", "stopped", "dead")]
    if gone or failed:
        code = failed[0][1] if failed else None
        interrupted = gone and r.status == "starting"
        reason = ("its start did not complete (gpufleet was interrupted); blocks freed" if interrupted
                  else f"the container on {gone[0]} is gone (host rebooted or removed by hand)" if gone
                  else f"exited with code {code}" + (f" on {failed[0][0]}" if len(_aliases(r)) > 1 else ""))
        if running:
            _stop_containers(r, running)
        store.finish_run(r.name, "failed", code, reason)
    elif not running and not unknown and states:
        store.finish_run(r.name, "done", 0, "")
    elif unknown:
        store.set_run_status(r.name, r.status, unknown)
    elif r.status == "starting":
        store.set_run_status(r.name, "running")
    elif r.message:  # its host answers again: the "cannot check" note is over
        store.set_run_status(r.name, r.status, "")


def _stop_containers(r: RunView | None, aliases: list[str], remove: bool = False) -> str:
    """Stop (or remove) the run's containers on ``aliases``; return the error, if any."""
    if r is None or not aliases:
        return ""
    inventory, _ = fleet_paths(r.fleet)
    variables = {"workload_name": r.container, "workload_run_id": r.run_id}
    if remove:
        variables["workload_state"] = "absent"
    vars_file = write_unsafe_vars(variables)
    try:
        result = run_playbook("stop", inventory, limit=aliases, vars_file=vars_file)
    finally:
        vars_file.unlink(missing_ok=True)
    bad = [(a, result.hosts.get(a)) for a in aliases]
    bad = [f"{a}: {o.message if o else 'no result'}" for a, o in bad if o is None or o.status in ("failed",
                                                                                                   "unreachable")]
    return "; ".join(bad)


def _host_runtime_vars(store: Store, fleet: str) -> dict[str, dict]:
    view = store.fleet(fleet)
    out = {}
    for i in view.instances if view else []:
        rt = i.probe.get("runtime") or {}
        out[i.alias] = {"runtime": rt.get("name") or "podman", "become": bool(rt.get("via_sudo"))}
    return out


def _ssh(run: RunView, remote: list[str] | None, tty: bool = False, extra: list[str] | None = None,
         alias: str | None = None) -> list[str]:
    _, ssh_config = fleet_paths(run.fleet)
    cmd = ["ssh", "-F", str(ssh_config), *(["-t"] if tty else []), *(extra or []), alias or run.alias]
    return cmd + ["--", shlex.join(remote)] if remote else cmd


def _runtime_cmd(rt: dict | None) -> list[str]:
    """The container runtime as the probe found it on a host (podman through sudo if unknown)."""
    rt = rt or {"runtime": "podman", "become": True}
    return (["sudo", "-n"] if rt["become"] else []) + [rt["runtime"]]


def _runtime_argv(store: Store, run: RunView, alias: str | None = None) -> list[str]:
    return _runtime_cmd(_host_runtime_vars(store, run.fleet).get(alias or run.alias))


def get_run(store: Store, name: str) -> RunView:
    run = store.run(name)
    if run is None:
        raise GpufleetError(f"no run named {name!r} (see gpufleet ps -a)")
    return run


def logs(name: str, follow: bool = False, node: int = 0) -> int:
    store = Store()
    run = get_run(store, name)
    aliases = _aliases(run)
    if not aliases:
        raise GpufleetError(f"run {name} never started: {run.message}")
    if not 0 <= node < len(aliases):
        raise UsageError(f"run {name} has {len(aliases)} node(s): --node must be 0..{len(aliases) - 1}")
    cmd = _runtime_argv(store, run, aliases[node]) + ["logs", *(["-f"] if follow else []), run.container]
    return subprocess.run(_ssh(run, cmd, alias=aliases[node])).returncode


def stop(name: str) -> RunView:
    store = Store()
    run = get_run(store, name)
    if not run.active:
        raise GpufleetError(f"run {name} is not running ({run.status})")
    error = _stop_containers(run, _aliases(run))
    if error:
        raise GpufleetError(f"could not stop {name}: {error}")
    store.finish_run(name, "stopped", None, "stopped by the user")
    return store.run(name)


def attach(name: str, console: Console) -> int:
    store = Store()
    run = get_run(store, name)
    if not run.active:
        raise GpufleetError(f"run {name} is not running ({run.status})")
    spec = run.spec
    ports = [str(p) for p in spec.get("ports") or []]
    if spec.get("type") == "service":
        ports.insert(0, str(spec["port"]))
    forwards = []
    for p in dict.fromkeys(ports):
        local, _, remote = p.partition(":")
        forwards += ["-L", f"127.0.0.1:{local}:127.0.0.1:{remote or local}"]
        console.print(f"forwarding localhost:{local} -> {run.alias}:{remote or local} (through the jump chain)")
    if spec.get("type") == "dev-environment":
        cmd = _runtime_argv(store, run) + ["exec", "-it", run.container, "/bin/sh"]
        return subprocess.run(_ssh(run, cmd, tty=True, extra=forwards)).returncode
    if not forwards:
        raise GpufleetError(f"run {name} has no ports to forward")
    console.print("press Ctrl-C to stop forwarding")
    try:
        return subprocess.run(_ssh(run, None, extra=["-N", "-o", "ExitOnForwardFailure=yes", *forwards])).returncode
    except KeyboardInterrupt:
        return EXIT_OK


def ps_table(views: list[RunView]) -> Table:
    from gpufleet.view import age

    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "TYPE", "FLEET", "INSTANCE", "GPUS", "STATUS", "AGE"):
        t.add_column(col, overflow="fold")
    for r in views:
        gpus = ", ".join(f"{g['index']}:{g.get('model')}" for g in r.gpus) or "-"
        instance = "-" if r.instance_num is None else str(r.instance_num)
        if len(r.nodes) > 1:
            gpus = " + ".join(str(len(n["gpus"])) for n in r.nodes) + " GPUs"
            instance = ",".join(str(n.get("instance_num")) for n in r.nodes)
        status = r.status + (f" ({r.exit_code})" if r.exit_code not in (None, 0) else "")
        if r.message and r.status in ("failed", "running", "starting"):  # why it failed; why it is unchecked
            status += f": {r.message[:120]}"
        t.add_row(r.name, r.type, r.fleet or "-", instance, gpus, status, age(r.created_at, time.time()))
    return t
