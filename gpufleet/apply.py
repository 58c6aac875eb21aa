"""`gpufleet apply -f fleet.yml`: plan, confirm, probe, slice into blocks, record, show."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from gpufleet import blocks as blockslib
from gpufleet import present
from gpufleet.config import load_fleet
from gpufleet.errors import EXIT_FAILED, EXIT_OK, GpufleetError
from gpufleet.inventory import write_fleet_files
from gpufleet.models import Fleet, HostStatus, InstanceStatus, Target
from gpufleet.probe import ProbeOutcome, probe_fleet
from gpufleet.state import Store


@dataclass
class FleetPlan:
    fleet: Fleet
    add: list[str]
    reprobe: list[str]
    remove: list[str]
    busy_removals: list[str]

    def render(self, console: Console) -> None:
        console.print(present.styled("Fleet", "bold") + f" {self.fleet.name} ({self.fleet.source})")
        touched = [self.fleet.target(a) for a in self.add + self.reprobe]
        console.print(present.fleet_plan_table(touched, self.add, self.remove, self.busy_removals))


def make_plan(fleet: Fleet, store: Store) -> FleetPlan:
    current = store.fleet(fleet.name)
    known = {i.alias for i in current.instances} if current else set()
    wanted = [t.alias for t in fleet.targets]
    busy = set(store.busy_aliases(fleet.name)) if current else set()
    removed = sorted(known - set(wanted))
    return FleetPlan(fleet, [a for a in wanted if a not in known], [a for a in wanted if a in known],
                     removed, [a for a in removed if a in busy])


def apply_fleet(path: str, yes: bool = False, dry_run: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    fleet = load_fleet(path)
    store = Store()
    plan = make_plan(fleet, store)
    plan.render(console)
    if plan.busy_removals:
        raise GpufleetError(f"cannot remove {', '.join(plan.busy_removals)} from fleet {fleet.name}: "
                            "workloads run there; stop them first")
    if dry_run:
        present.dim(console, "--dry-run: nothing was changed")
        return EXIT_OK
    if not yes and not present.confirm(console, "Apply this plan?"):
        console.print("Nothing was changed.")
        return EXIT_OK
    files = write_fleet_files(fleet)
    store.save_fleet(fleet.name, fleet.source, fleet.config.model_dump(mode="json"))
    for alias in plan.remove:
        store.remove_instance(fleet.name, alias)
    aliases = plan.add + plan.reprobe
    with present.probe_progress(console, aliases) as update:
        outcomes = probe_fleet(files, aliases, on_update=update)
    all_ready = True
    warnings: list[str] = []
    for alias in aliases:
        ready, notes = record(store, fleet.name, fleet.target(alias), outcomes[alias])
        all_ready &= ready
        warnings += [f"{alias}: {n}" for n in notes]
    view = store.fleet(fleet.name)
    write_fleet_files(fleet, facts=view.facts())
    console.print(present.fleet_table([view]))
    for w in warnings:
        present.note(console, "warning", w)
    present.dim(console, f"inventory: {files.inventory}\nssh_config: {files.ssh_config}")
    return EXIT_OK if all_ready else EXIT_FAILED


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
