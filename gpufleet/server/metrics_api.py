"""The API's routes for metrics: which GPU is whose and how it is (`/api/gpus`), a run's GPUs over
its life (`/api/runs/{name}/metrics`), and `/metrics` for Prometheus. What they read is
gpufleet.metrics.store (kept by the leader's metrics loop).

Who sees what (docs/teams.md): `/api/gpus` lists the GPUs of the fleets of the caller's projects (a
server admin: all), naming the run, user and project holding a GPU only when the caller may see that
run; a run's metrics need the rights of reading its logs; `/metrics` takes any user's token and
exports what that user sees (a server admin's token: everything).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from gpufleet.errors import NotFound
from gpufleet.metrics import export
from gpufleet.metrics import store as metrics
from gpufleet.server.auth import Me


def router(ctx: Any) -> APIRouter:
    """The /api routes, on ``ctx`` (the API's Context)."""
    r = APIRouter()

    @r.get("/gpus", tags=["metrics"])
    def list_gpus(who: Me, project: str | None = None) -> list[dict]:
        """One row per GPU of the fleets the caller sees: where, whose (run, user, project), its
        status (free, busy, outside, unhealthy, unreachable, unknown) and why, its latest numbers
        and processes."""
        if project:
            who.need_member(project, f"seeing project {project}")
        return metrics.gpu_rows(ctx.store, who.visible(), project=project, interval=ctx.metrics_interval)

    @r.get("/runs/{name}/metrics", tags=["metrics"])
    def run_metrics(name: str, who: Me, since: float | None = None, project: str | None = None) -> dict:
        """A run's GPUs, their latest numbers, their utilization and memory since ``since`` (unix
        time; default: the run's submission) and its containers' CPU and memory: raw samples where
        kept, else 1-minute means (``resolution``). ``project``: the run must be of it."""
        run = who.sees_run(ctx.store, name)
        if project and run.project != project:
            raise NotFound(f"no run named {name!r} in project {project} (it is of project {run.project})")
        who.need_run(run, f"reading the metrics of run {name}")
        return metrics.run_metrics(ctx.store, run, since, raw_retention=ctx.metrics_raw_retention)

    return r


def prometheus_router(ctx: Any) -> APIRouter:
    """`/metrics`, Prometheus' text format, with a user's token (Authorization: Bearer ...)."""
    r = APIRouter()

    @r.get("/metrics", tags=["metrics"], response_class=Response)
    async def prometheus(who: Me) -> Response:
        body = await asyncio.to_thread(export.exposition, ctx.store, who.visible(), ctx.metrics_interval)
        return Response(content=body, media_type=CONTENT_TYPE_LATEST)

    return r
