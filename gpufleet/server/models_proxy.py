"""The server's OpenAI-compatible endpoint for models: ``/proxy/models/<project>/...``, dstack's path.

A POST (``v1/chat/completions``, ``v1/completions``...; the ``v1/`` may be left out, as dstack's base URL
does) is routed by its JSON body's `model` to the live service of the project that serves that model,
and carried to it as the service endpoint carries a request (gpufleet.server.proxy's ``carry``: the same
forward, headers and streaming, server-sent events chunk by chunk), at the model's `prefix` + the rest
of the path. ``GET v1/models`` lists the models of the project's running services. The decisions are
gpufleet.models_route's.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gpufleet import models_route, services
from gpufleet.models import Run, RunStatus
from gpufleet.server.auth import bearer, client_of


def add_routes(app: FastAPI, ctx, carry, callers) -> None:
    """``carry(request, run, sock, path, auth, content)``: the service endpoint's carrier; ``callers``: its
    cache of the users of tokens seen lately (gpufleet.server.proxy.CallerCache)."""
    route = models_route.PREFIX + "/{project}/{path:path}"

    def look(project: str, token: str | None, client: str, caller) -> list[Run]:
        """The project's live runs, once the caller may use its models (on a worker thread)."""
        if caller is None and token:
            caller = ctx.caller(token, client)
            callers.put(token, caller)
        models_route.check_access(caller, project)
        return ctx.store.runs(projects={project})

    async def runs_of(request: Request, project: str) -> list[Run]:
        token = bearer(request.headers.get("authorization"))
        return await asyncio.to_thread(look, project, token, client_of(request), callers.get(token))

    def has_ready(run: Run) -> bool:
        """Whether a replica of ``run`` is ready (without taking a turn of its round robin)."""
        proxy = ctx.services
        return proxy is not None and run.status == RunStatus.RUNNING and proxy.status(run)[0] > 0

    def socket_of(run: Run) -> str | None:
        proxy = ctx.services
        return proxy.socket_for(run) if proxy is not None and run.status == RunStatus.RUNNING else None

    @app.api_route(route, methods=["POST"], tags=["models"])
    async def model_request(request: Request, project: str, path: str):
        """An OpenAI request (`v1/chat/completions`, `v1/completions`...) to the live service of `project`
        whose `model` is the body's `model`, at the model's prefix + the rest of the path; a project member's
        token (whatever the service's `auth`); 404 (OpenAI's error) for a model no service serves; 503 until
        its service has a ready replica."""
        runs = await runs_of(request, project)
        try:
            rest = models_route.rest_of(path)
            if not rest.strip("/"):
                raise models_route.unknown_path(path, project)
            body = await _read(request)
            name = models_route.requested_model(body)
            run = models_route.pick(runs, project, name, has_ready)
            if run is None:
                raise models_route.not_found(name, project, models_route.served(runs, project))
            sock = socket_of(run)
            if sock is None:
                ready, total = ctx.services.status(run) if ctx.services is not None else (0, 1)
                raise models_route.not_ready(services.not_ready_message(run.name, ready, total)
                                             if ctx.services is not None else "this server does not proxy services")
        except models_route.BadRequest as e:
            return _error(e)
        return await carry(request, run, sock, models_route.upstream_path(run, rest, request.url.query), True, body)

    @app.api_route(route, methods=["GET"], tags=["models"])
    async def model_list(request: Request, project: str, path: str):
        """`v1/models`: the models of the running services of `project` in OpenAI's list format
        (`v1/models/NAME`: one of them); a project member's token."""
        runs = await runs_of(request, project)
        if models_route.is_models_list(path):
            return JSONResponse(models_route.models_list(runs, project))
        name = models_route.listed_model(path)
        if name is None:
            return _error(models_route.unknown_path(path, project))
        listed = {m["id"]: m for m in models_route.models_list(runs, project)["data"]}
        if name not in listed:
            return _error(models_route.not_found(name, project, listed))
        return JSONResponse(listed[name])


async def _read(request: Request, limit: int = models_route.BODY_LIMIT) -> bytes:
    """The request's body, refused (413) past ``limit`` bytes without reading the rest."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise models_route.too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _error(e: models_route.BadRequest) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status, headers={"Retry-After": "1"} if e.status == 503 else None)
