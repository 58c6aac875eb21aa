"""What the CLI shows: tables for people, JSON for scripts, the y/n prompt, errors and warnings.

Text that comes from users or hosts (names, reasons, messages) is never read as rich markup: every
message is a rich Text or printed with markup=False, and every table cell given as a string becomes
a Text (a host `[fd00::1]` or a run named `[/x]` is shown as written). cli.py's consoles also have
markup off, so a string printed elsewhere cannot be read as markup either.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gpufleet.errors import UsageError
from gpufleet.models import Event, FleetState, InstanceStatus, Run, RunStatus, Target

STATUS_STYLE = {InstanceStatus.READY: "", InstanceStatus.UNREACHABLE: "yellow", InstanceStatus.ERROR: "red"}
PROBE_STYLE = {"ok": "green", "unreachable": "yellow", "failed": "red", "running": "cyan"}


def age(ts: float, now: float | None = None) -> str:
    s = max(0, int((now or time.time()) - ts))
    for unit, size in (("day", 86400), ("hour", 3600), ("min", 60)):
        if s >= size:
            n = s // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return f"{s} sec{'s' if s != 1 else ''} ago"


class PlainTable(Table):
    """A rich Table whose string cells are shown as written, never read as markup."""

    def add_row(self, *renderables, **kw) -> None:  # type: ignore[override]
        super().add_row(*(Text(r) if isinstance(r, str) else r for r in renderables), **kw)


def table(*columns: str, fold: bool = False, **kw) -> Table:
    t = PlainTable(box=None, pad_edge=False, header_style="bold", **kw)
    for col in columns:
        t.add_column(col, overflow="fold" if fold else "ellipsis")
    return t


def styled(text: str, style: str) -> Text:
    return Text(text, style=style)


# --------------------------------------------------------------------------- prompts and messages

def confirm(console: Console, question: str, flag: str = "-y") -> bool:
    """Ask ``question [y/n]``; without a terminal nobody can answer, so ask for ``flag`` instead."""
    if not sys.stdin.isatty():
        raise UsageError(f"not a terminal, so no one can confirm: pass {flag} to {question_verb(question)}")
    return console.input(Text(f"{question} [y/n]: ")).strip().lower() in ("y", "yes")


def question_verb(question: str) -> str:
    """`Apply this plan?` -> `apply`: what the flag stands in for, in the refusal."""
    return question.split()[0].lower()


def note(console: Console, kind: str, message: str, style: str = "yellow") -> None:
    """`warning: ...`, `note: ...`: the kind styled, the message (from hosts or users) as plain text."""
    console.print(Text.assemble((kind, style), " ", message), highlight=False, soft_wrap=True)


def error(console: Console, message: str) -> None:
    note(console, "error", message, "red")


def dim(console: Console, message: str) -> None:
    console.print(Text(message, style="dim"), highlight=False, soft_wrap=True)


def plain(console: Console, message: str) -> None:
    console.print(message, markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- fleets

def fleet_table(views: list[FleetState]) -> Table:
    t = table("FLEET", "INSTANCE", "HOST", "RESOURCES", "STATUS", "CREATED", fold=True)
    for v in views:
        if not v.instances:
            t.add_row(v.name, "-", "", "", "no instances", age(v.created_at))
        for i, inst in enumerate(v.instances):
            t.add_row(v.name if i == 0 else "", str(inst.num), f"{inst.hostname}:{inst.port}", inst.resources or "-",
                      styled(inst.status_text, STATUS_STYLE.get(inst.status, "")), age(inst.created_at))
    return t


def fleets_json(views: list[FleetState]) -> str:
    out = []
    for v in views:
        out.append({
            "name": v.name, "source": v.source, "created_at": v.created_at,
            "instances": [{
                "instance": i.num, "alias": i.alias, "hostname": i.hostname, "port": i.port,
                "status": i.status, "reason": i.reason, "status_text": i.status_text,
                "resources": i.resources, "blocks": {"total": i.blocks_total, "busy": i.blocks_busy},
                "withheld": i.withheld,
                "gpus": [g.model_dump(mode="json") for g in i.facts.gpus] if i.facts else [],
                "cpus": i.facts.cpu.count if i.facts else None,
                "memory_mib": i.facts.memory_mib if i.facts else None,
                "runtime": i.facts.runtime.model_dump(mode="json") if i.facts else None,
                "created_at": i.created_at, "updated_at": i.updated_at,
            } for i in v.instances],
        })
    return json.dumps(out, indent=2)


def fleet_plan_table(targets: list[Target], add: list[str], remove: list[str], busy: list[str]) -> Table:
    t = table("HOST", "ADDRESS", "VIA", "BLOCKS", "ACTION")
    for target in targets:
        t.add_row(target.alias, target.address, target.via, str(target.blocks),
                  "add" if target.alias in add else "re-probe")
    for alias in remove:
        t.add_row(alias, "", "", "", styled("remove (busy: refused)", "red") if alias in busy else "remove")
    return t


@contextmanager
def probe_progress(console: Console, aliases: list[str]) -> Iterator[Callable[[str, str, str], None]]:
    """A live table of each host's probe; yields ``update(alias, state, message)``."""
    status = {a: "waiting" for a in aliases}

    def render() -> Table:
        t = PlainTable(box=None, pad_edge=False, title="Probing", title_justify="left")
        t.add_column("HOST")
        t.add_column("PROBE")
        for a, s in status.items():
            t.add_row(a, styled(s, PROBE_STYLE.get(s.split(":")[0], "dim")))
        return t

    with Live(render(), console=console, transient=True, refresh_per_second=8) as live:
        def update(alias: str, state: str, message: str) -> None:
            status[alias] = "done" if state == "ok" else (state if not message else f"{state}: {message[:80]}")
            live.update(render())

        yield update


# --------------------------------------------------------------------------- runs

def run_plan_table(name: str, kind: str, rows: list[tuple[str, int, str, str, str, int, int]]) -> Table:
    """rows: (fleet, instance num, alias, blocks, gpus, cpus, memory MiB), rank 0 first."""
    t = table("RUN", "TYPE", "NODE", "FLEET", "INSTANCE", "BLOCKS", "GPUS", "CPUS", "MEMORY")
    for rank, (fleet, num, alias, blocks, gpus, cpus, memory_mib) in enumerate(rows):
        t.add_row(name if rank == 0 else "", kind if rank == 0 else "", str(rank), fleet, f"{num} ({alias})", blocks,
                  gpus, str(cpus), f"{round(memory_mib / 1024)}GB")
    return t


def kept_gpus_table(rows: list[dict]) -> Table:
    """GPUs that no new run is placed on (rows of /api/gpus whose status is outside or unhealthy)."""
    t = table("GPU KEPT FROM RUNS", "FLEET", "HOST", "STATUS", "WHY", fold=True)
    for g in rows:
        t.add_row(f"{g['index']}:{g.get('model') or '?'}", g["fleet"], g["host"], styled(g["status"], "red"),
                  g.get("reason") or "")
    return t


def with_replicas_under(views: list[Run]) -> list[Run]:
    """``views`` with each service's replicas right under it (oldest first); a replica whose service is
    not among them stays where it is."""
    names = {r.name for r in views}
    under: dict[str, list[Run]] = {}
    for r in views:
        if r.replica_of in names:
            under.setdefault(r.replica_of, []).append(r)
    out = []
    for r in views:
        if r.replica_of in names:
            continue
        out.append(r)
        out.extend(sorted(under.get(r.name, []), key=lambda x: x.created_at))
    return out


def ps_table(views: list[Run]) -> Table:
    who = _who(views, "project", "user")
    t = table("NAME", *(c.upper() for c in who), "TYPE", "FLEET", "INSTANCE", "GPUS", "STATUS", "AGE", fold=True)
    names = {r.name for r in views}
    for r in with_replicas_under(views):
        gpus = ", ".join(g.label for g in r.gpus) or "-"
        instance = "-" if r.instance_num is None else str(r.instance_num)
        if len(r.nodes) > 1:
            gpus = " + ".join(str(len(n.gpus)) for n in r.nodes) + " GPUs"
            instance = ",".join(str(n.instance_num) for n in r.nodes)
        status = str(r.status) + (f" ({r.exit_code})" if r.exit_code not in (None, 0) else "")
        if r.status == RunStatus.PENDING and r.position:
            status += f" #{r.position}"
        message = r.message
        if r.service is not None and r.live:  # a service: its replicas ready (as this server's probes say)
            status += " (ready)" if r.service.ready and r.service.replicas == 1 else \
                f" ({r.service.replicas_ready}/{r.service.replicas} ready)"
            message = message.partition(" replicas ready")[2].lstrip(", ") if r.status != RunStatus.PENDING \
                or r.service.replicas else message  # the count is said already
        if message and (r.live or r.status == RunStatus.FAILED):  # why it waits, failed, is unchecked
            status += f": {message[:160]}"
        name = f"  {r.name}" if r.replica_of in names else r.name  # a replica, under its service
        kind = (f"replica ({r.replica_group})" if r.replica_group else "replica") if r.replica_of else r.type
        t.add_row(name, *_cells(r, who), Text(kind), r.fleet or "-", instance, gpus, Text(status),
                  age(r.created_at, time.time()))
    return t


def _who(views: list, *fields: str) -> list[str]:
    """Of ``fields`` (project, user, actor), those worth a column: where ``views`` differ in them
    (one user's runs in one project, the single-user case, need neither)."""
    return [f for f in fields if len({getattr(v, f, None) for v in views}) > 1]


def _cells(view, fields: list[str]) -> list[Text]:
    return [Text(getattr(view, f, None) or "-") for f in fields]


def runs_json(views: list[Run]) -> str:
    return json.dumps([{
        "name": r.name, "project": r.project, "user": r.user,
        "type": r.type, "fleet": r.fleet, "instance": r.instance_num, "host": r.alias,
        "status": r.status, "exit_code": r.exit_code, "message": r.message,
        "gpus": [g.model_dump(mode="json") for g in r.gpus], "blocks": r.blocks,
        "nodes": [n.model_dump(mode="json") for n in r.nodes], "created_at": r.created_at, "updated_at": r.updated_at,
        "priority": r.priority, "max_duration": r.max_duration, "started_at": r.started_at, "position": r.position,
        "next_at": r.next_at, "replica_of": r.replica_of, "replicas_wanted": r.replicas,
        "replica_group": r.replica_group, "group_replicas_wanted": r.group_replicas,
        **({"url": r.service.url, "ready": r.service.ready,
            "replicas": f"{r.service.replicas_ready}/{r.service.replicas}"} if r.service is not None else {}),
        **({"model": r.service.model, "model_url": r.service.model_url}
           if r.service is not None and r.service.model else {}),
    } for r in views], indent=2)


def run_plan_rows(plan: dict) -> list[tuple]:
    """The server's plan of a run (POST /api/runs/plan) as run_plan_table's rows."""
    return [(p["fleet"], p["num"], p["alias"], ",".join(map(str, p["blocks"])), ", ".join(p["gpus"]) or "-",
             p["cpus"], p["memory_mib"]) for p in plan["placements"]]


def events_table(events: list[Event]) -> Table:
    who = _who(events, "project", "actor")
    t = table("TIME", "KIND", *(c.upper() for c in who), "RUN", "HOST", "MESSAGE", fold=True)
    for e in events:
        t.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.ts)), e.kind, *_cells(e, who), e.run or "-",
                  e.host or "-", Text(e.message))
    return t


def event_line(e: Event) -> Text:
    """One event as `events -f` prints it as it comes (`(by alice in ml)` where the server says)."""
    where = " ".join(x for x in (e.run, e.host) if x)
    actor, project = e.actor, e.project
    by = " ".join(x for x in (actor and f"by {actor}", project and f"in {project}") if x)
    return Text(f"{time.strftime('%H:%M:%S', time.localtime(e.ts))} {e.kind:<16} {where}: {e.message}"
                + (f" ({by})" if by else ""))


# --------------------------------------------------------------------------- teams

def roles(items: list[dict], name: str = "name") -> str:
    """`ml (admin), cv (member)` from [{name, role}] (or [{user, role}] with name="user")."""
    return ", ".join(f"{i[name]} ({i['role']})" for i in items) or "-"


def users_table(users: list[dict]) -> Table:
    t = table("NAME", "ROLE", "PROJECTS", "CREATED", fold=True)
    for u in users:
        t.add_row(Text(u["name"]), Text(u["role"]), Text(roles(u.get("projects") or [])),
                  age(u["created_at"]) if u.get("created_at") else "-")
    return t


def projects_table(projects: list[dict]) -> Table:
    t = table("NAME", "MEMBERS", "CREATED", fold=True)
    for p in projects:
        t.add_row(Text(p["name"]), Text(roles(p.get("members") or [], "user")),
                  age(p["created_at"]) if p.get("created_at") else "-")
    return t


def quota_scope(q: dict) -> str:
    """`project ml, user alice, H100 GPUs` (no user: the whole project; no gpu: GPUs of any model)."""
    return (f"project {q['project']}, " + (f"user {q['user']}" if q.get("user") else "the whole project") + ", "
            + (f"{q['gpu']} GPUs" if q.get("gpu") else "GPUs of any model"))


def quotas_table(quotas: list[dict]) -> Table:
    t = table("PROJECT", "USER", "GPU", "LIMIT", "IN USE", fold=True)
    for q in quotas:
        t.add_row(Text(q["project"]), Text(q.get("user") or "*"), Text(q.get("gpu") or "any"), str(q["gpus"]),
                  usage_bar(q.get("used") or 0, q["gpus"]))
    return t


def usage_bar(used: int, limit: int, width: int = 10) -> Text:
    """`███████░░░ 7/10`: green, yellow from 80%, red when full."""
    share = used / limit if limit else (1.0 if used else 0.0)
    filled = min(width, round(share * width))
    style = "red" if share >= 1 else "yellow" if share >= 0.8 else "green"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"), f" {used}/{limit}")


def usage_table(rows: list[dict]) -> Table:
    t = table("PROJECT", "USER", "GPU-HOURS", "DECAYED", "RUNS", fold=True)
    for r in sorted(rows, key=lambda r: (r["project"], r.get("user") or "")):
        t.add_row(Text(r["project"]), Text(r.get("user") or "*"), f"{r['gpu_hours']:.1f}",
                  f"{r['decayed_gpu_hours']:.1f}", str(r["runs"]))
    return t

