"""Workloads on blocks: submit a run (allocate, start its container), refresh, stop, logs, attach.

The container itself is started and stopped by playbooks/start.yml and stop.yml (role `workload`);
this module decides what to start where, and keeps the accounting in the state store.
"""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gpufleet import paths
from gpufleet.allocator import NoCapacity, Placement, Request, place
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
                   cpus: int, memory_mib: int, numa_nodes: set) -> dict:
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
    env = {**fleet_env, **cfg.env_dict, **extra_env,
           "GPUFLEET_RUN_NAME": run.name, "GPUFLEET_GPUS_NUM": str(len(gpus)), "GPUFLEET_GPUS": indices,
           "DSTACK_RUN_NAME": run.name, "DSTACK_GPUS_NUM": str(len(gpus))}
    script = "\n".join(cfg.commands)
    if isinstance(cfg, DevEnvironmentConfig):
        script = "\n".join([*cfg.commands, KEEP_ALIVE])
    command = ["/bin/sh", "-c", "set -e\n" + script] if script else []
    return {
        "workload_name": container_name(run.name),
        "workload_run_id": run_id,
        "workload_image": cfg.image,
        "workload_command": command,
        "workload_env": env,
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


def _plan_table(run: Run, p: Placement) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("RUN", "TYPE", "FLEET", "INSTANCE", "BLOCKS", "GPUS", "CPUS", "MEMORY"):
        t.add_column(col)
    gpus = ", ".join(f"{p.host.gpus[g]['index']}:{p.host.gpus[g].get('model')}" for g in p.gpus) or "-"
    t.add_row(run.name, run.config.type, p.host.fleet, f"{p.host.num} ({p.host.alias})",
              ",".join(map(str, p.blocks)), gpus, str(p.cpus), f"{round(p.memory_mib / 1024)}GB")
    return t


def submit(path: str, yes: bool = False, detach: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    run = load_run(path)
    store = Store()
    request = request_of(run.config)
    preview = store.slots_snapshot()  # for the plan shown; the real choice is made under the lock
    try:
        planned = place(request, preview)
    except NoCapacity as e:
        raise GpufleetError(str(e)) from None
    console.print(_plan_table(run, planned))
    if planned.note:
        console.print(f"[yellow]note[/] {run.name} {planned.note}")
    if not yes:
        import sys

        if not sys.stdin.isatty():
            raise UsageError("not a terminal, so no one can confirm: pass -y to submit")
        if console.input("Submit the run? [y/n]: ").strip().lower() not in ("y", "yes"):
            console.print("Nothing was changed.")
            return EXIT_OK
    run_id = uuid.uuid4().hex[:12]
    try:
        placement = store.allocate(run.name, run_id, run.config.type, run.config.model_dump(mode="json"),
                                   container_name(run.name), lambda hosts: place(request, hosts))
    except NoCapacity as e:
        raise GpufleetError(str(e)) from None
    host = placement.host
    fleet = store.fleet(host.fleet)
    fleet_env = fleet_config_env(store, host.fleet)
    probe = next(i.probe for i in fleet.instances if i.alias == host.alias)
    numa = {b.numa_node for b in host.blocks if b.idx in placement.blocks}
    variables = container_vars(run, run_id, fleet_env, probe, [host.gpus[g] for g in placement.gpus],
                               placement.cpus, placement.memory_mib, numa)
    ok, message = _start(host.fleet, host.alias, variables)
    if not ok:
        store.finish_run(run.name, "failed", None, message)
        console.print(f"[red]failed[/] {run.name} on {host.alias}: {message}")
        return EXIT_FAILED
    store.set_run_status(run.name, "running")
    console.print(f"{run.name} is running on {host.fleet} instance {host.num} ({host.alias})")
    if detach or not isinstance(run.config, TaskConfig):
        return EXIT_OK
    logs(run.name, follow=True)
    view = refresh(store, names=[run.name])[0]
    console.print(f"{run.name}: {view.status}" + (f" (exit code {view.exit_code})" if view.exit_code is not None
                                                  else ""))
    return EXIT_OK if view.status == "done" else EXIT_FAILED


def fleet_config_env(store: Store, fleet: str) -> dict[str, str]:
    from gpufleet.config import FleetConfig

    cfg = store.fleet_config(fleet)
    env = FleetConfig.model_validate(cfg).env if cfg else None
    if isinstance(env, dict):
        return {k: str(v) for k, v in env.items()}
    return dict((item.split("=", 1) + [""])[:2] for item in (env or []))


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


def refresh(store: Store, names: list[str] | None = None) -> list[RunView]:
    """Ask each host with active runs what became of their containers, in one round per fleet."""
    active = [r for r in store.runs() if names is None or r.name in names]
    by_fleet: dict[str, list[RunView]] = {}
    for r in active:
        if r.fleet:
            by_fleet.setdefault(r.fleet, []).append(r)
    for fleet, fleet_runs in by_fleet.items():
        try:
            inventory, _ = fleet_paths(fleet)
        except GpufleetError:
            continue
        hosts = sorted({r.alias for r in fleet_runs})
        result = run_playbook("status", inventory, limit=hosts)
        for r in fleet_runs:
            o = result.hosts.get(r.alias)
            if o is None or o.status in ("failed", "unreachable"):
                store.set_run_status(r.name, r.status, f"cannot check: {o.message if o else 'no result'}")
                continue
            info = next((res for action, res in o.results.items() if action.endswith("gpufleet_container_info")), {})
            found = next((c for c in info.get("containers", []) if c.get("name") == r.container
                          and c.get("run_id") == r.run_id), None)
            if found is None:
                store.finish_run(r.name, "failed", None, "the container is gone (host rebooted or removed by hand)")
            elif found.get("state") in ("exited", "stopped", "dead"):
                code = found.get("exit_code")
                store.finish_run(r.name, "done" if code == 0 else "failed", code,
                                 "" if code == 0 else f"exited with code {code}")
            elif r.status == "starting":
                store.set_run_status(r.name, "running")
    return store.runs(include_finished=True, name=names[0]) if names and len(names) == 1 else store.runs()


def _host_runtime_vars(store: Store, fleet: str) -> dict[str, dict]:
    view = store.fleet(fleet)
    out = {}
    for i in view.instances if view else []:
        rt = i.probe.get("runtime") or {}
        out[i.alias] = {"runtime": rt.get("name") or "podman", "become": bool(rt.get("via_sudo"))}
    return out


def _ssh(run: RunView, remote: list[str] | None, tty: bool = False, extra: list[str] | None = None) -> list[str]:
    _, ssh_config = fleet_paths(run.fleet)
    cmd = ["ssh", "-F", str(ssh_config), *(["-t"] if tty else []), *(extra or []), run.alias]
    return cmd + ["--", shlex.join(remote)] if remote else cmd


def _runtime_argv(store: Store, run: RunView) -> list[str]:
    rt = _host_runtime_vars(store, run.fleet).get(run.alias, {"runtime": "podman", "become": True})
    return (["sudo", "-n"] if rt["become"] else []) + [rt["runtime"]]


def get_run(store: Store, name: str) -> RunView:
    run = store.run(name)
    if run is None:
        raise GpufleetError(f"no run named {name!r} (see gpufleet ps -a)")
    return run


def logs(name: str, follow: bool = False) -> int:
    store = Store()
    run = get_run(store, name)
    if run.alias is None:
        raise GpufleetError(f"run {name} never started: {run.message}")
    cmd = _runtime_argv(store, run) + ["logs", *(["-f"] if follow else []), run.container]
    return subprocess.run(_ssh(run, cmd)).returncode


def stop(name: str) -> RunView:
    store = Store()
    run = get_run(store, name)
    if not run.active:
        raise GpufleetError(f"run {name} is not running ({run.status})")
    inventory, _ = fleet_paths(run.fleet)
    vars_file = write_unsafe_vars({"workload_name": run.container, "workload_run_id": run.run_id})
    try:
        result = run_playbook("stop", inventory, limit=[run.alias], vars_file=vars_file)
    finally:
        vars_file.unlink(missing_ok=True)
    o = result.hosts.get(run.alias)
    if o is None or o.status in ("failed", "unreachable"):
        raise GpufleetError(f"could not stop {name} on {run.alias}: {o.message if o else 'no result'}")
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
        status = r.status + (f" ({r.exit_code})" if r.exit_code not in (None, 0) else "")
        if r.message and r.status in ("failed",):
            status += f": {r.message[:120]}"
        t.add_row(r.name, r.type, r.fleet or "-", "-" if r.instance_num is None else f"{r.instance_num}",
                  gpus, status, age(r.created_at, time.time()))
    return t
