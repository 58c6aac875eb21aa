"""gpufleet apply: apply a fleet, or submit a task, service or dev-environment (through the server).

The file is read and checked here first (errors with file, line and field, before anything is
sent); its secrets' values are taken from this environment and sent to the server, which keeps
those of a waiting run sealed until it starts."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_project, project
from gpufleet.errors import EXIT_FAILED, EXIT_OK, UsageError


def register(sub) -> None:
    a = sub.add_parser("apply", help="apply a fleet, or submit a task, service or dev-environment")
    a.add_argument("-f", "--file", required=True, help="a fleet (dstack SSH-fleet schema) or run configuration")
    a.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    a.add_argument("-d", "--detach", action="store_true", help="runs: return once submitted; do not wait or follow")
    a.add_argument("--no-queue", action="store_true",
                   help="runs: refuse at once when it does not fit now, instead of waiting (as retry: false)")
    a.add_argument("--dry-run", action="store_true",
                   help="validate and show the plan (the server's, for a fleet or a run); change or submit nothing")
    add_project(a)
    a.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.runconfig import RUN_TYPES, config_type

    if config_type(args.file) in RUN_TYPES:
        return submit(args, console)
    if args.no_queue:
        raise UsageError("--no-queue is for runs")
    return apply_fleet(args, console)


def _project_field(args: argparse.Namespace, client) -> dict:
    """The body's "project" (left out when there is none: the server picks, and a server without
    projects is sent what it always was)."""
    p = project(args, client)
    return {"project": p} if p else {}


# --------------------------------------------------------------------------- runs

def submit(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect
    from gpufleet.models import Run, RunStatus
    from gpufleet.runconfig import parse_run
    from gpufleet.yamlsource import read_config_text

    path = Path(args.file)
    text = read_config_text(path)
    # checked here, with positions; takes its secrets from this environment (a dry run sends none,
    # so it needs none, as a fleet's)
    req = parse_run(text, str(path), values=not args.dry_run)
    # before anything is sent: a missing path or too much is said now (a dry run clones no remote repo)
    packed = _pack(req, text, path, clone=not args.dry_run)
    client = connect()
    source = str(path)
    where = _project_field(args, client)
    plan = client.post("/api/runs/plan", {"source": source, "text": text, **where})
    if plan["never"]:
        from gpufleet.errors import GpufleetError

        raise GpufleetError(plan["never"] + ("; it would be refused" if args.dry_run else "; not queued"))
    if plan["placements"]:
        console.print(present.run_plan_table(req.name, req.config.type, present.run_plan_rows(plan)))
        for image in dict.fromkeys(p.get("image") for p in plan["placements"] if p.get("image")):
            present.plain(console, f"image: {image}")
        for p in plan["placements"]:
            if p["note"]:
                present.note(console, "note", f"{req.name} {p['note']}")
    else:
        present.plain(console, f"{req.name} ({req.config.type}) does not fit now: {plan['waits']}")
        if not args.no_queue and req.config.schedule is None:
            present.plain(console, "It will wait in the queue and start when blocks are free.")
    if packed is not None:
        present.plain(console, packed.summary() if not args.dry_run else
                      packed.summary().replace("uploading", "would upload", 1))
    if req.config.schedule is not None:
        from gpufleet.models.cron import utc_text

        first = utc_text(req.config.schedule.next_start(time.time()))
        present.plain(console, f"{req.name} is scheduled ({', '.join(req.config.schedule.cron)}, UTC): it waits "
                               f"until {first}, starts then and at each time after, until gpufleet stop {req.name}")
    if args.dry_run:
        present.dim(console, "--dry-run: nothing was submitted")
        return EXIT_OK
    if not args.yes and not present.confirm(console, "Submit the run?"):
        console.print("Nothing was changed.")
        return EXIT_OK
    before = _live_service(client, req.name) if req.config.type == "service" else None
    sent = {"upload": client.post("/api/uploads", packed.data)["id"]} if packed is not None else {}
    view = Run.model_validate(client.post("/api/runs", {"source": source, "text": text,
                                                                    "secrets": req.secrets,
                                                                    "no_queue": args.no_queue, **where, **sent}))
    if view.is_service:
        return _service_applied(client, view, before, console, detach=args.detach)
    if view.status == RunStatus.PENDING and view.next_at is not None:  # scheduled: nothing to wait for now
        present.plain(console, f"{view.name} is {view.message or 'scheduled'}")
        return EXIT_OK
    if args.detach and view.status == RunStatus.PENDING and view.message:
        present.plain(console, f"{view.name} is queued (#{view.position}): {view.message}")
        return EXIT_OK
    # attached, or detached from a run that fits now: wait until it runs (or ends), as a start always did
    view = _wait_started(client, view, console, detach=args.detach)
    if view.status == RunStatus.PENDING:  # detached, and it waits after all (another run came first)
        return EXIT_OK
    if not view.active:
        if view.started_at is not None and view.type == "task" and not args.detach:
            _follow_logs(client, view.name)  # it ran and ended between two looks: its output all the same
        return _ended(view, console)
    where = ", ".join(f"instance {n.instance_num} ({n.alias})" for n in view.nodes) or view.alias
    present.plain(console, f"{view.name} is running on {view.fleet} {where}")
    if args.detach or view.type != "task":
        return EXIT_OK
    _follow_logs(client, view.name)
    view = _wait_ended(client, view.name)
    return _ended(view, console)


def _pack(req, text: str, path: Path, clone: bool = True):
    """The run's `repos` and `files` packed (gpufleet.upload), None without; a missing path is an error
    with its line. A remote repo is cloned here first (``clone=False``, a dry run: not)."""
    from gpufleet.errors import ConfigError
    from gpufleet.upload import pack
    from gpufleet.yamlsource import load_yaml

    uploads = req.config.uploads
    if not uploads:
        return None
    src = load_yaml(text, str(path))
    return pack(uploads, path.absolute().parent, lambda loc, msg: ConfigError([src.problem(loc, msg)]),
                clone_repos=clone)


def _live_service(client, name: str):
    """The live service ``name`` before an apply (None: there is none), to tell an update from a new one."""
    from gpufleet.errors import NotFound
    from gpufleet.models import Run

    try:
        view = Run.model_validate(client.get(f"/api/runs/{name}"))
    except NotFound:
        return None
    return view if view.is_service and view.live else None


def _service_applied(client, view, before, console: Console, detach: bool = False) -> int:
    """After a service's submission: an update says what it does. A new service waits until a replica
    runs, saying why while it waits (detached: until then, or until a replica waits in the queue with a
    reason). Then where its replicas are, its URL, and its model's."""
    from gpufleet.models import Run, RunStatus

    def replicas() -> list:
        return sorted((Run.model_validate(r) for r in client.get("/api/runs", project=view.project)
                       if r.get("replica_of") == view.name), key=lambda r: r.created_at)

    if before is not None:
        if view.updated_at == before.updated_at:
            present.plain(console, f"{view.name}: nothing changed (the same configuration)")
        else:
            present.plain(console, f"{view.name} is updated: {view.replicas} replica(s) wanted; replicas of an "
                                   "older configuration are replaced one at a time, each once a new one is ready "
                                   "(gpufleet ps shows them)")
    elif not view.replicas:
        present.plain(console, f"{view.name} is submitted with 0 replicas: the first request to its URL starts one")
    else:
        said = ""
        while view.status == RunStatus.PENDING:
            queued = next((r for r in replicas() if r.status == RunStatus.PENDING and r.message), None)
            if queued is not None and queued.message != said:
                present.plain(console, f"{view.name} {'is queued' if detach else 'waits'}: replica {queued.name} "
                                       f"(#{queued.position}): {queued.message}")
                said = queued.message
                if detach:
                    break
            time.sleep(0.5)
            view = Run.model_validate(client.get(f"/api/runs/{view.name}"))
        if not view.live:
            return _ended(view, console)
    for r in replicas():
        where = f"on {r.fleet} instance {r.instance_num} ({r.alias})" if r.alias else f"({r.message or 'waiting'})"
        group = f" (group {r.replica_group})" if r.replica_group else ""
        present.plain(console, f"  replica {r.name}{group}: {r.status} {where}")
    if view.service is not None:  # where the server serves it
        present.plain(console, f"{view.name} is served at {view.service.url}" +
                      ("" if view.service.ready else " (not ready yet: gpufleet ps shows when it is)"))
        if view.service.model:  # a model service: OpenAI's clients reach it by its model's name
            present.plain(console, f"model {view.service.model} is served at {view.service.model_url} "
                                   "(OpenAI-compatible: base URL, a member's token as the API key)")
    return EXIT_OK


def _wait_started(client, view, console: Console, detach: bool = False):
    """Poll until the run holds its blocks and runs (or ended), saying why it waits when that changes;
    ``detach``: until then, or until it waits with a reason (it is queued: no need to stay)."""
    from gpufleet.models import Run, RunStatus

    said = ""
    while view.status in (RunStatus.PENDING, RunStatus.STARTING):
        if view.status == RunStatus.PENDING and view.message and view.message != said:
            present.plain(console, f"{view.name} {'is queued' if detach else 'waits'} (#{view.position}): "
                                   f"{view.message}")
            said = view.message
            if detach:
                return view
        time.sleep(0.5)
        view = Run.model_validate(client.get(f"/api/runs/{view.name}"))
    return view


def _follow_logs(client, name: str) -> None:
    import sys

    out = sys.stdout.buffer
    for chunk in client.chunks(f"/api/runs/{name}/logs", follow=True):
        out.write(chunk)
        out.flush()


def _wait_ended(client, name: str, timeout: float = 60):
    """After the followed logs end: wait (bounded) for the server to see every node's container exit."""
    from gpufleet.models import Run

    deadline = time.monotonic() + timeout
    while True:
        view = Run.model_validate(client.get(f"/api/runs/{name}"))
        if not view.live or time.monotonic() > deadline:
            return view
        time.sleep(0.5)


def _ended(view, console: Console) -> int:
    from gpufleet.models import RunStatus

    text = f"{view.name}: {view.status}"
    if view.exit_code is not None:
        text += f" (exit code {view.exit_code})"
    elif view.message and view.status != RunStatus.DONE:
        text += f": {view.message}"
    present.plain(console, text)
    return EXIT_OK if view.status == RunStatus.DONE else EXIT_FAILED


# --------------------------------------------------------------------------- fleets

def apply_fleet(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect
    from gpufleet.config import load_fleet
    from gpufleet.errors import GpufleetError
    from gpufleet.models import FleetState, split_env
    from gpufleet.secrets import fleet_secrets
    from gpufleet.yamlsource import read_config_text

    path = Path(args.file)
    fleet = load_fleet(path)  # checked here, with positions, before anything is sent
    source = str(path.resolve())
    text = read_config_text(path)
    client = connect()
    where = _project_field(args, client)
    plan = client.post("/api/fleets/plan", {"source": source, "text": text, **where})
    console.print(present.styled("Fleet", "bold") + f" {fleet.name} ({fleet.source})")
    touched = [fleet.target(a) for a in plan["add"] + plan["reprobe"]]
    console.print(present.fleet_plan_table(touched, plan["add"], plan["remove"], plan["busy_removals"]))
    if plan["busy_removals"]:
        raise GpufleetError(f"cannot remove {', '.join(plan['busy_removals'])} from fleet {fleet.name}: "
                            "workloads run there; stop them first")
    if args.dry_run:
        present.dim(console, "--dry-run: nothing was changed")
        return EXIT_OK
    if not args.yes and not present.confirm(console, "Apply this plan?"):
        console.print("Nothing was changed.")
        return EXIT_OK
    _, names = split_env(fleet.config.env)
    secrets = fleet_secrets(fleet.name, fleet.source, names)
    result = None
    with present.probe_progress(console, plan["add"] + plan["reprobe"]) as update:
        for item in client.lines("POST", "/api/fleets", {"source": source, "text": text, "secrets": secrets,
                                                          **where}):
            if "progress" in item:
                p = item["progress"]
                update(p["alias"], p["state"], p["message"])
            elif "result" in item:
                result = item["result"]
    if result is None:
        raise GpufleetError("the server ended the apply without a result; see gpufleet events")
    view = FleetState.model_validate(result["fleet"])
    console.print(present.fleet_table([view]))
    for w in result["warnings"]:
        present.note(console, "warning", w)
    present.dim(console, f"inventory: {result['inventory']}\nssh_config: {result['ssh_config']}")
    return EXIT_OK if result["ok"] else EXIT_FAILED
