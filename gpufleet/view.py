"""What the CLI shows: tables for people, JSON for scripts."""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.table import Table

from gpufleet.state import FleetView


def age(ts: float, now: float | None = None) -> str:
    s = max(0, int((now or time.time()) - ts))
    for unit, size in (("day", 86400), ("hour", 3600), ("min", 60)):
        if s >= size:
            n = s // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return f"{s} sec{'s' if s != 1 else ''} ago"


def fleet_table(views: list[FleetView]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("FLEET", "INSTANCE", "HOST", "RESOURCES", "STATUS", "CREATED"):
        table.add_column(col, overflow="fold")
    for v in views:
        if not v.instances:
            table.add_row(v.name, "-", "", "", "no instances", age(v.created_at))
        for i, inst in enumerate(v.instances):
            status = inst.status_text
            style = {"ready": "", "unreachable": "yellow", "error": "red"}.get(inst.status, "")
            table.add_row(v.name if i == 0 else "", str(inst.num), f"{inst.hostname}:{inst.port}",
                          inst.resources or "-", f"[{style}]{status}[/]" if style else status,
                          age(inst.created_at))
    return table


def fleets_json(views: list[FleetView]) -> str:
    out = []
    for v in views:
        out.append({
            "name": v.name, "source": v.source, "created_at": v.created_at,
            "instances": [{
                "instance": i.num, "alias": i.alias, "hostname": i.hostname, "port": i.port,
                "status": i.status, "reason": i.reason, "status_text": i.status_text,
                "resources": i.resources, "blocks": {"total": i.blocks_total, "busy": i.blocks_busy},
                "gpus": i.probe.get("gpus", []), "cpus": (i.probe.get("cpu") or {}).get("count"),
                "memory_mib": i.probe.get("memory_mib"), "runtime": i.probe.get("runtime"),
                "created_at": i.created_at, "updated_at": i.updated_at,
            } for i in v.instances],
        })
    return json.dumps(out, indent=2)


def print_fleets(console: Console, views: list[FleetView]) -> None:
    console.print(fleet_table(views))
