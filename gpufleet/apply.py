"""`gpufleet apply -f fleet.yml`: plan, confirm, probe, slice into blocks, record, show."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table

from gpufleet import blocks as blockslib
from gpufleet.config import Fleet, Target, load_fleet
from gpufleet.errors import EXIT_FAILED, EXIT_OK, GpufleetError, UsageError
from gpufleet.inventory import target_aliases, write_fleet_files
from gpufleet.probe import ProbeOutcome, probe_fleet
from gpufleet.state import ERROR, READY, UNREACHABLE, Store
from gpufleet.view import print_fleets


@dataclass
class FleetPlan:
    fleet: Fleet
    add: list[str]
    reprobe: list[str]
    remove: list[str]
    busy_removals: list[str]

    def render(self, console: Console) -> None:
        console.print(f"[bold]Fleet[/] {self.fleet.name} ({self.fleet.source})")
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("HOST", "ADDRESS", "VIA", "BLOCKS", "ACTION"):
            table.add_column(col)
        targets = dict(zip(target_aliases(self.fleet.targets), self.fleet.targets, strict=True))
        for alias in self.add + self.reprobe:
            t = targets[alias]
            via = " -> ".join(f"{j.hostname}:{j.port}" for j in t.jumps) or "direct"
            table.add_row(alias, t.address, via, str(t.blocks), "add" if alias in self.add else "re-probe")
        for alias in self.remove:
            table.add_row(alias, "", "", "", "[red]remove (busy: refused)[/]" if alias in self.busy_removals
                          else "remove")
        console.print(table)


def make_plan(fleet: Fleet, store: Store) -> FleetPlan:
    current = store.fleet(fleet.name)
    known = {i.alias for i in current.instances} if current else set()
    wanted = target_aliases(fleet.targets)
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
        console.print("[dim]--dry-run: nothing was changed[/]")
        return EXIT_OK
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("not a terminal, so no one can confirm: pass -y to apply")
        answer = console.input("Apply this plan? [y/n]: ").strip().lower()
        if answer not in ("y", "yes"):
            console.print("Nothing was changed.")
            return EXIT_OK
    files = write_fleet_files(fleet)
    store.save_fleet(fleet.name, fleet.source, fleet.config.model_dump(mode="json"))
    for alias in plan.remove:
        store.remove_instance(fleet.name, alias)
    aliases = plan.add + plan.reprobe
    outcomes = _probe_with_progress(console, files, aliases)
    targets = dict(zip(target_aliases(fleet.targets), fleet.targets, strict=True))
    all_ready = True
    warnings: list[str] = []
    for alias in aliases:
        ready, notes = record(store, fleet.name, alias, targets[alias], outcomes[alias])
        all_ready &= ready
        warnings += [f"{alias}: {n}" for n in notes]
    view = store.fleet(fleet.name)
    write_fleet_files(fleet, probed={i.alias: i.probe for i in view.instances if i.probe})
    print_fleets(console, [view])
    for w in warnings:
        console.print(f"[yellow]warning[/] {w}")
    console.print(f"[dim]inventory: {files.inventory}\nssh_config: {files.ssh_config}[/]")
    return EXIT_OK if all_ready else EXIT_FAILED


def record(store: Store, fleet: str, alias: str, target: Target, outcome: ProbeOutcome) -> tuple[bool, list[str]]:
    """Store one host's probe outcome; return whether it is ready, and warnings."""
    if outcome.status == "unreachable":
        store.record_instance(fleet, alias, target.hostname, target.port, UNREACHABLE, outcome.reason)
        return False, []
    if outcome.status != "ok":
        store.record_instance(fleet, alias, target.hostname, target.port, ERROR, outcome.reason)
        return False, []
    facts = outcome.facts
    gpus = facts.get("gpus") or []
    cpus = (facts.get("cpu") or {}).get("count") or 0
    memory = facts.get("memory_mib") or 0
    resources = blockslib.describe_resources(gpus, cpus, memory)
    runtime = facts.get("runtime") or {}
    problems = facts.get("problems") or []
    notes = [f"{p.get('reason')}" + (f" ({p['fix']})" if p.get("fix") else "") for p in problems]
    if not runtime.get("usable"):
        reason = next((n for n in notes if "runtime" in n or "podman" in n or "docker" in n),
                      "no usable container runtime")
        store.record_instance(fleet, alias, target.hostname, target.port, ERROR, reason, resources, facts, [])
        return False, [n for n in notes if n != reason]
    try:
        layout = blockslib.split(gpus, target.blocks, cpus, memory)
    except blockslib.BlocksError as e:
        store.record_instance(fleet, alias, target.hostname, target.port, ERROR, str(e), resources, facts, [])
        return False, notes
    store.record_instance(fleet, alias, target.hostname, target.port, READY, "", resources, facts, layout)
    return True, notes


def _probe_with_progress(console: Console, files, aliases: list[str]) -> dict[str, ProbeOutcome]:
    status = {a: "waiting" for a in aliases}
    style = {"ok": "green", "unreachable": "yellow", "failed": "red", "running": "cyan"}

    def table() -> Table:
        t = Table(box=None, pad_edge=False, title="Probing", title_justify="left")
        t.add_column("HOST")
        t.add_column("PROBE")
        for a, s in status.items():
            t.add_row(a, f"[{style.get(s.split(':')[0], 'dim')}]{s}[/]")
        return t

    with Live(table(), console=console, transient=True, refresh_per_second=8) as live:
        def update(alias: str, state: str, message: str) -> None:
            status[alias] = "done" if state == "ok" else (state if not message else f"{state}: {message[:80]}")
            live.update(table())

        outcomes = probe_fleet(files, aliases, on_update=update)
    return outcomes
