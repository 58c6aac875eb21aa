"""Applying a fleet, server side: plan (which hosts are added, probed again, removed), probe, slice
into blocks, record. `gpufleet apply -f fleet.yml` shows the plan, asks, and follows the progress."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from gpufleet import blocks as blockslib
from gpufleet.errors import GpufleetError
from gpufleet.inventory import GeneratedFiles, write_fleet_files
from gpufleet.models import DEFAULT_PROJECT, Fleet, FleetState, HostStatus, InstanceStatus, Target
from gpufleet.probe import ProbeOutcome, probe_fleet
from gpufleet.state import Store


@dataclass
class FleetPlan:
    """Which hosts applying a fleet adds, probes again and removes (and which of those run workloads)."""

    fleet: Fleet
    add: list[str]
    reprobe: list[str]
    remove: list[str]
    busy_removals: list[str]


def make_plan(fleet: Fleet, store: Store) -> FleetPlan:
    current = store.fleet(fleet.name)
    known = {i.alias for i in current.instances} if current else set()
    wanted = [t.alias for t in fleet.targets]
    busy = set(store.busy_aliases(fleet.name)) if current else set()
    removed = sorted(known - set(wanted))
    return FleetPlan(fleet, [a for a in wanted if a not in known], [a for a in wanted if a in known],
                     removed, [a for a in removed if a in busy])


@dataclass
class Applied:
    """What applying a fleet left: its state, warnings, whether every host is ready, its files."""

    view: FleetState
    warnings: list[str]
    ok: bool
    files: GeneratedFiles


def apply_fleet(store: Store, fleet: Fleet, secrets: dict[str, str], seal: Callable[[dict[str, str]], str],
                on_update: Callable[[str, str, str], None] | None = None,
                cancel: threading.Event | None = None, project: str = DEFAULT_PROJECT) -> Applied:
    """Write the fleet's files, record it in ``project`` (its secrets sealed), drop removed hosts,
    probe the others and record what each has. Server side: the CLI shows the plan and the progress."""
    current = store.fleet(fleet.name)
    if current is not None and current.project != project:
        raise GpufleetError(f"a fleet named {fleet.name} belongs to project {current.project}: choose another name")
    plan = make_plan(fleet, store)
    if plan.busy_removals:
        raise GpufleetError(f"cannot remove {', '.join(plan.busy_removals)} from fleet {fleet.name}: "
                            "workloads run there; stop them first")
    files = write_fleet_files(fleet)
    store.save_fleet(fleet.name, fleet.source, fleet.config.model_dump(mode="json"), project)
    store.seal_fleet(fleet.name, seal(secrets) if secrets else None)
    for alias in plan.remove:
        store.remove_instance(fleet.name, alias)
    aliases = plan.add + plan.reprobe
    outcomes = probe_fleet(files, aliases, on_update=on_update, cancel=cancel)
    all_ready = True
    warnings: list[str] = []
    for alias in aliases:
        ready, notes = record(store, fleet.name, fleet.target(alias), outcomes[alias])
        all_ready &= ready
        warnings += [f"{alias}: {n}" for n in notes]
    view = store.fleet(fleet.name)
    write_fleet_files(fleet, facts=view.facts())
    return Applied(view, warnings, all_ready, files)


def record(store: Store, fleet: str, target: Target, outcome: ProbeOutcome) -> tuple[bool, list[str]]:
    """Store one host's probe outcome; return whether it is ready, and warnings."""
    alias, hostname, port = target.alias, target.hostname, target.port
    if outcome.status == HostStatus.UNREACHABLE:
        store.record_instance(fleet, alias, hostname, port, InstanceStatus.UNREACHABLE, outcome.reason)
        return False, []
    if outcome.status != HostStatus.OK or outcome.facts is None:
        store.record_instance(fleet, alias, hostname, port, InstanceStatus.ERROR, outcome.reason)
        return False, []
    facts = outcome.facts
    resources = blockslib.describe_resources(facts.gpus, facts.cpu.count, facts.memory_mib)
    notes = [str(p) for p in facts.problems]
    if not facts.runtime.usable:
        reason = next((n for n in notes if "runtime" in n or "podman" in n or "docker" in n),
                      "no usable container runtime")
        store.record_instance(fleet, alias, hostname, port, InstanceStatus.ERROR, reason, resources, facts, [])
        return False, [n for n in notes if n != reason]
    try:
        layout = blockslib.split(facts.gpus, target.blocks, facts.cpu.count, facts.memory_mib)
    except blockslib.BlocksError as e:
        store.record_instance(fleet, alias, hostname, port, InstanceStatus.ERROR, str(e), resources, facts, [])
        return False, notes
    store.record_instance(fleet, alias, hostname, port, InstanceStatus.READY, "", resources, facts, layout)
    return True, notes
