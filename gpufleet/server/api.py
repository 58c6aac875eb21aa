"""The HTTP API of `gpufleet server` (FastAPI): runs, fleets, events and the server itself; users,
projects, quotas and usage are in gpufleet.server.teams.

Every route that reads or changes state needs a user's token (`Authorization: Bearer ...`), and
what it shows or does follows the caller's roles (gpufleet.server.auth; docs/teams.md has the
table). /api/health, /docs and /openapi.json need none (they show no state). Errors are JSON
``{"detail": message, "exit_code": N}`` with the status that says what is wrong (401 no or bad
token, 403 not allowed, 429 too many failed logins, 404 no such run or fleet, 409 refused as
things are, 422 bad config, with ``problems``: file, line, column, field, message), so the CLI
prints the message and exits as it always did. User text is never read as markup: the CLI prints
it as plain text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue as queuelib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gpufleet import __version__, devssh, images, queue, runs, upload
from gpufleet.apply import apply_fleet, make_plan
from gpufleet.config import parse_fleet
from gpufleet.errors import ConfigError, Forbidden, GpufleetError, NotFound, Unauthorized, UsageError
from gpufleet.models import Run
from gpufleet.runconfig import parse_run
from gpufleet.server import tunnel
from gpufleet.server.auth import Caller, FailedLogins, Me, TooManyFailures, authenticate
from gpufleet.state import Store


@dataclass
class Context:
    """What the routes share: the store, the sealing of secrets, the loops, who asks."""

    store: Store
    seal: Callable[[dict[str, str]], str]
    kick: Callable[[], None]
    launch: Callable  # (run, placements): start the containers of a run that holds its blocks
    background: Callable[[Callable[[], None]], None]  # run slow work (a stop) on the server's workers
    info: Callable[[], dict]
    shutdown: Callable[[], None]
    touched: list[float] = field(default_factory=lambda: [time.monotonic()])
    failures: FailedLogins = field(default_factory=FailedLogins)
    half_life: float = 7 * 86400.0  # fair share: seconds for past GPU time to count half
    token_file: Path | None = None  # the bootstrap admin's token, rewritten when it is rotated
    upload_limit: int = upload.DEFAULT_LIMIT  # bytes a run's code upload may hold (settings.upload_limit)
    metrics_interval: float = 10.0  # settings.metrics_interval: a host's sample older than 3 of these is stale
    metrics_raw_retention: float = 3600.0  # settings.metrics_raw_retention: raw samples kept this long
    services: object | None = None  # gpufleet.server.proxy.ServiceProxy: services' forwards and readiness

    def caller(self, token: str | None, client: str) -> Caller:
        who = authenticate(self.store, token, client, self.failures)
        self.touched[0] = time.monotonic()
        return who

    def authorize_run(self, token: str | None, client: str, name: str) -> Run:
        """The run ``name``, if the token's user may act on it (attach to it through the server)."""
        who = self.caller(token, client)
        run = who.sees_run(self.store, name)
        who.need_run(run, f"attaching to run {name}")
        return run


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConfigText(Body):
    source: str = Field(description="The file's path where the client read it (for messages and relative paths).")
    text: str = Field(description="The file's text.")
    project: str | None = Field(None, description="The project (default: the caller's only one, else `default`).")


class Submission(ConfigText):
    secrets: dict[str, str] = Field(default_factory=dict, description="Values of the env names given without one.")
    no_queue: bool = Field(False, description="Refuse at once if it does not fit now, instead of waiting.")
    upload: str | None = Field(None, description="A run's code upload (its `repos` and `files`): the id "
                                                 "POST /api/uploads gave.")


class SshKey(Body):
    public_key: str = Field(description="The caller's ssh public key (ssh-ed25519 AAAA...), let into a dev "
                                        "environment's sshd.")


def create_app(ctx: Context) -> FastAPI:
    app = FastAPI(title="gpufleet", version=__version__,
                  description="The gpufleet control plane: fleets of GPU hosts sliced into blocks, a queue of runs.")

    app.state.ctx = ctx  # what auth.Me's dependency reads
    @app.exception_handler(GpufleetError)
    async def _error(request: Request, e: GpufleetError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if isinstance(e, TooManyFailures) else None
        return JSONResponse(_error_body(e), status_code=_status(e), headers=headers)

    @app.get("/api/health", tags=["server"])
    def health() -> dict:
        return {"ok": True, "version": __version__}

    api = APIRouter(prefix="/api")

    # ------------------------------------------------------------------ server
    @api.get("/server", tags=["server"])
    def server_info(who: Me) -> dict:
        return ctx.info()

    @api.post("/server/stop", tags=["server"])
    def server_stop(who: Me) -> dict:
        who.need_admin("stopping the server")
        ctx.shutdown()
        return {"stopping": True}

    # ------------------------------------------------------------------ runs
    def projects_asked(who: Caller, project: str | None) -> set[str] | None:
        """The projects a list shows: the one asked (the caller must be in it), else all they see."""
        if project:
            who.need_member(project, f"seeing project {project}")
            return {project}
        return who.visible()

    def submitter(who: Caller, project: str | None) -> queue.Submitter:
        p = who.project(project)
        return queue.Submitter(user=who.name, project=p, role=queue.role_of(who.user, p))

    @api.get("/runs", tags=["runs"])
    def list_runs(request: Request, who: Me, all: bool = False, project: str | None = None) -> list[dict]:
        views = ctx.store.runs(include_finished=all, projects=projects_asked(who, project))
        return [_run_json(r, ctx, request) for r in _with_positions(views, ctx)]

    @api.get("/runs/{name}", tags=["runs"])
    def get_run(name: str, request: Request, who: Me) -> dict:
        run = who.sees_run(ctx.store, name)
        return _run_json(_with_positions([run], ctx)[0], ctx, request)

    @api.post("/runs/plan", tags=["runs"])
    def plan_run(body: ConfigText, who: Me) -> dict:
        by = submitter(who, body.project)
        req = parse_run(body.text, body.source, values=False)
        return _plan_json(req, queue.plan(ctx.store, req, by), ctx.store)

    @api.post("/uploads", tags=["runs"], status_code=201)
    async def upload_code(request: Request, who: Me) -> dict:
        """A run's code (its `repos` and `files`, packed by `gpufleet apply`), kept an hour for its
        run's submission (POST /api/runs with `upload`), then as long as the run lives."""
        body = b"".join([chunk async for chunk in _limited(request, ctx.upload_limit)])
        upload_id, size = await asyncio.to_thread(upload.receive, [body], ctx.upload_limit)
        return {"id": upload_id, "size": size}

    @api.post("/runs", tags=["runs"], status_code=201)
    def submit_run(body: Submission, request: Request, who: Me) -> dict:
        by = submitter(who, body.project)
        req = parse_run(body.text, body.source, secrets=body.secrets)
        if req.type == "dev-environment":  # its sshd's host key, made here and kept sealed with its secrets
            req = req.model_copy(update={"secrets": {**req.secrets, devssh.HOST_KEY_ENV: devssh.new_host_key()[0]}})
        uploads = req.config.uploads
        if uploads and not body.upload:
            raise UsageError(f"{req.name} has repos or files: submit it with gpufleet apply, which uploads them")
        live = ctx.store.run(req.name)
        if live is not None and live.live and live.is_service:  # an update of a live service
            who.need_run(live, f"updating service {req.name}")
        if uploads and (live is None or not live.live or live.is_service):  # else refused below, as it was
            upload.place(body.upload, req.name, len(uploads), ctx.upload_limit)
        run, placements = queue.submit(ctx.store, req, ctx.seal, no_queue=body.no_queue, who=by)
        if placements is not None:  # it took its blocks at once (it may not wait): start it
            ctx.launch(run, placements)
        ctx.kick()
        return _run_json(_with_positions([run], ctx)[0], ctx, request)

    @api.post("/runs/{name}/stop", tags=["runs"])
    def stop_run(name: str, who: Me) -> dict:
        """Cancel a waiting run, or begin stopping an active one: it is `stopping` until its
        containers are stopped (within its grace), then `stopped` (or `running` again, with why)."""
        run = who.sees_run(ctx.store, name)
        who.need_run(run, f"stopping run {name}")
        by = who.name if run.user == who.name else (
            f"{who.name} ({'server admin' if who.admin else f'admin of project {run.project}'})")
        run, work = queue.stop(ctx.store, name, by=by, actor=who.name)
        if work is not None:
            ctx.background(work)
        ctx.kick()
        return _run_json(run)

    @api.get("/runs/{name}/attach", tags=["runs"])
    def attach_run(name: str, who: Me) -> dict:
        who.need_run(who.sees_run(ctx.store, name), f"attaching to run {name}")
        return runs.attach_plan(ctx.store, name)

    @api.post("/runs/{name}/ssh", tags=["runs"])
    def ssh_run(name: str, body: SshKey, who: Me) -> dict:
        """Let the caller's public key into a dev environment's sshd; how to reach it (`ssh RUN-NAME`
        through this server's tunnel): {port, host_key, user, workdir, ide}."""
        run = who.sees_run(ctx.store, name)
        who.need_run(run, f"attaching to run {name}")
        return runs.ssh_access(ctx.store, run, body.public_key)

    @api.get("/runs/{name}/logs", tags=["runs"])
    async def run_logs(name: str, request: Request, who: Me, follow: bool = False, node: int = 0
                       ) -> StreamingResponse:
        run = await asyncio.to_thread(who.sees_run, ctx.store, name)
        who.need_run(run, f"reading the logs of run {name}")
        argv = await asyncio.to_thread(runs.logs_argv, ctx.store, name, follow, node)

        async def stream():
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
            try:
                while True:
                    chunk = await proc.stdout.read(65536)
                    if not chunk:
                        break
                    yield chunk
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

        return StreamingResponse(stream(), media_type="text/plain")

    # ------------------------------------------------------------------ fleets
    def fleet_of(name: str, who: Caller, what: str):
        view = ctx.store.fleet(name)
        if view is None:
            raise NotFound(f"no fleet named {name!r} (see gpufleet fleet list)")
        who.need_member(view.project, what)
        return view

    def fleet_admin(who: Caller, project: str | None, name: str, what: str) -> str:
        """The project a fleet is applied in; the caller must be its admin, and a fleet of that
        name must not belong to another project."""
        p = who.project(project)
        who.need_project_admin(p, f"{what} fleet {name}")
        current = ctx.store.fleet(name)
        if current is not None and current.project != p:
            who.need_member(current.project, f"{what} fleet {name}")
            raise GpufleetError(f"fleet {name} belongs to project {current.project}, not {p}: "
                                f"use --project {current.project}, or another name")
        return p

    @api.get("/fleets", tags=["fleets"])
    def list_fleets(who: Me, project: str | None = None) -> list[dict]:
        return [f.model_dump(mode="json") for f in ctx.store.fleets(projects=projects_asked(who, project))]

    @api.get("/fleets/{name}", tags=["fleets"])
    def get_fleet(name: str, who: Me) -> dict:
        return fleet_of(name, who, f"fleet {name}").model_dump(mode="json")

    @api.post("/fleets/plan", tags=["fleets"])
    def plan_fleet(body: ConfigText, who: Me) -> dict:
        fleet = parse_fleet(body.text, body.source)
        fleet_admin(who, body.project, fleet.name, "planning")
        plan = make_plan(fleet, ctx.store)
        return {"name": fleet.name, "add": plan.add, "reprobe": plan.reprobe, "remove": plan.remove,
                "busy_removals": plan.busy_removals}

    @api.post("/fleets", tags=["fleets"])
    async def apply(body: Submission, request: Request, who: Me) -> StreamingResponse:
        """Apply a fleet: a stream of JSON lines, `{"progress": {alias, state, message}}` per host
        step, then `{"result": {...}}` or `{"error": {...}}`. A client that goes away cancels the probe."""
        fleet = await asyncio.to_thread(parse_fleet, body.text, body.source)
        project = await asyncio.to_thread(fleet_admin, who, body.project, fleet.name, "applying")
        lines: queuelib.Queue = queuelib.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                done = apply_fleet(ctx.store, fleet, body.secrets, ctx.seal, cancel=cancel, project=project,
                                   on_update=lambda a, s, m: lines.put({"progress": {"alias": a, "state": str(s),
                                                                                     "message": m}}))
                ready = sum(i.status == "ready" for i in done.view.instances)
                ctx.store.add_event("fleet", f"fleet {fleet.name} applied: {ready}/{len(done.view.instances)} "
                                    "hosts ready", fleet=fleet.name, actor=who.name)
                lines.put({"result": {"fleet": done.view.model_dump(mode="json"), "warnings": done.warnings,
                                      "ok": done.ok, "inventory": str(done.files.inventory),
                                      "ssh_config": str(done.files.ssh_config)}})
            except KeyboardInterrupt:
                lines.put({"error": {"detail": "interrupted", "exit_code": 130}})
            except GpufleetError as e:
                lines.put({"error": _error_body(e)})
            except Exception as e:  # shown to the client; the server goes on
                lines.put({"error": {"detail": f"internal error: {type(e).__name__}: {e}", "exit_code": 1}})
            finally:
                ctx.kick()
                lines.put(None)

        threading.Thread(target=work, name=f"gpufleet-apply-{fleet.name}", daemon=True).start()

        async def stream():
            try:
                while True:
                    try:
                        item = await asyncio.to_thread(lines.get, True, 0.5)
                    except queuelib.Empty:
                        if await request.is_disconnected():
                            return
                        continue
                    if item is None:
                        return
                    yield json.dumps(item) + "\n"
            finally:
                cancel.set()  # harmless once the work is over; stops the probe if the client left

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    @api.delete("/fleets/{name}", tags=["fleets"])
    def delete_fleet(name: str, who: Me) -> dict:
        view = fleet_of(name, who, f"fleet {name}")
        who.need_project_admin(view.project, f"deleting fleet {name}")
        ctx.store.delete_fleet(name)
        ctx.store.add_event("fleet", f"fleet {name} deleted", fleet=None, project=view.project, actor=who.name)
        return {"deleted": name}

    # ------------------------------------------------------------------ events
    @api.get("/events", tags=["events"])
    def list_events(who: Me, run: str | None = None, after: int = 0, limit: int = 1000,
                    project: str | None = None) -> list[dict]:
        return [e.model_dump(mode="json") for e in ctx.store.events(run=run, after=after, limit=min(limit, 10000),
                                                                    projects=projects_asked(who, project))]

    from gpufleet.server import teams

    api.include_router(teams.router(ctx))
    from gpufleet.server import metrics_api

    api.include_router(metrics_api.router(ctx))
    app.include_router(metrics_api.prometheus_router(ctx))
    app.include_router(api)

    tunnel.add_routes(app, ctx, ctx.authorize_run)
    from gpufleet.server import proxy

    proxy.add_routes(app, ctx)  # /proxy/services/PROJECT/RUN/...: a service's endpoint
    from gpufleet.server import console

    app.include_router(console.router())  # the web console at / (a client of the routes above)
    return app


async def _limited(request: Request, limit: int):
    """The request's body, refused (413) past ``limit`` bytes without reading the rest."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise upload.UploadError(f"the upload is over this server's limit of {upload.human(limit)} "
                                     "(upload_limit in its server.yml): exclude files with .gitignore or "
                                     ".dstackignore")
        yield chunk


def _status(e: GpufleetError) -> int:
    if isinstance(e, TooManyFailures):
        return 429
    if isinstance(e, Unauthorized):
        return 401
    if isinstance(e, Forbidden):
        return 403
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, ConfigError):
        return 422
    if isinstance(e, UsageError):
        return 400
    return 409


def _error_body(e: GpufleetError) -> dict:
    if type(e) is Unauthorized:
        return {"detail": f"{e}: this server needs a user's token (Authorization: Bearer ...); log in with "
                          "gpufleet login --server URL --token TOKEN, or set GPUFLEET_TOKEN", "exit_code": e.exit_code}
    body = {"detail": str(e), "exit_code": e.exit_code}
    if isinstance(e, ConfigError):
        body["problems"] = [dataclasses.asdict(p) for p in e.problems]
    return body


def _with_positions(views, ctx: Context):
    """``views`` with each waiting run's place in the whole queue (fair share counted)."""
    pending = [r for r in views if r.status == "pending"]
    if not pending:
        return views
    now = time.time()
    order = queue.positions(ctx.store.pending(), now, queue.usage_of(ctx.store, now, ctx.half_life))
    return [r.model_copy(update={"position": order.get(r.name)}) if r.status == "pending" else r for r in views]


def _run_json(run, ctx: Context | None = None, request: Request | None = None) -> dict:
    if ctx is not None and request is not None and run.is_service and run.live:
        from gpufleet.models.state import ServiceView
        from gpufleet.models_route import model_name, model_url
        from gpufleet.services import service_url

        ready, total = ctx.services.status(run) if ctx.services is not None else (0, 1)
        model = model_name(run)
        run = run.model_copy(update={"service": ServiceView(
            url=service_url(str(request.base_url), run.project, run.name), ready=ready > 0, replicas_ready=ready,
            replicas=total, model=model, model_url=model_url(str(request.base_url), run.project) if model else None)})
    return run.model_dump(mode="json")


def _plan_json(req, plan: queue.Plan, store) -> dict:
    return {"name": req.name, "type": req.config.type, "waits": plan.waits, "never": plan.never,
            "placements": [{"fleet": p.host.fleet, "num": p.host.num, "alias": p.host.alias,
                            "blocks": list(p.blocks), "gpus": [p.host.gpus[g].label for g in p.gpus],
                            "cpus": p.cpus, "memory_mib": p.memory_mib, "note": p.note,
                            "image": images.for_fleet(store, req.config, p.host.fleet).image}
                           for p in plan.placements]}
