"""The API's routes for who uses the server: the caller (`/me`), users and their tokens, projects
and their members, quotas, and GPU usage. docs/teams.md has the table of who may do what; every
check is a `Caller.need_*` of gpufleet.server.auth."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from pydantic import Field

from gpufleet import paths
from gpufleet.errors import GpufleetError, NotFound
from gpufleet.models import CoreModel, ProjectRole, Quota, ServerRole, User
from gpufleet.server.auth import Caller, Me, new_token, token_hash
from gpufleet.server.tokens import read_private

NAME = r"^[a-z0-9][a-z0-9._-]{0,62}$"  # user and project names: safe in a URL, a table, a shell


class NewUser(CoreModel):
    name: str = Field(pattern=NAME, description="Lower-case letters, digits, '.', '_', '-'.")
    role: ServerRole = ServerRole.USER


class NewProject(CoreModel):
    name: str = Field(pattern=NAME, description="Lower-case letters, digits, '.', '_', '-'.")


class NewMember(CoreModel):
    user: str
    role: ProjectRole = ProjectRole.MEMBER


class QuotaBody(CoreModel):
    project: str
    user: str | None = None
    gpu: str | None = Field(None, max_length=64, description="A GPU model (H100); none: GPUs of any model.")
    gpus: int = Field(ge=0, le=1_000_000)


def router(ctx: Any) -> APIRouter:
    """The routes, on ``ctx`` (the API's Context)."""
    store = ctx.store
    r = APIRouter()

    def project_of(name: str):
        found = store.project(name)
        if found is None:
            raise NotFound(f"no project named {name!r} (see gpufleet project list)")
        return found

    # ------------------------------------------------------------------ who am I
    @r.get("/me", tags=["users"])
    def me(who: Me) -> dict:
        try:
            default = who.project(None)
        except GpufleetError:
            default = None
        return {"name": who.name, "role": who.user.role, "default_project": default,
                "projects": [{"name": p, "role": role} for p, role in sorted(who.user.projects.items())]}

    # ------------------------------------------------------------------ users
    @r.get("/users", tags=["users"])
    def list_users(who: Me) -> list[dict]:
        who.need_admin("listing users")
        return [_user_json(u) for u in store.users()]

    @r.post("/users", tags=["users"], status_code=201)
    def add_user(body: NewUser, who: Me) -> dict:
        who.need_admin(f"adding user {body.name}")
        token = new_token()
        user = store.add_user(body.name, body.role, token_hash(token), actor=who.name)
        return {**_user_json(user), "token": token}

    @r.post("/users/{name}/token", tags=["users"])
    def rotate_token(name: str, who: Me) -> dict:
        if name != who.name:
            who.need_admin(f"rotating the token of {name}")
        old = store.user(name)
        if old is None:
            raise NotFound(f"no user named {name!r} (see gpufleet user list)")
        token = new_token()
        in_file = _bootstrap_token(ctx)
        holder = store.user_by_token(token_hash(in_file)) if in_file else None
        store.set_token(name, token_hash(token), actor=who.name)
        if holder is not None and holder.name == name:
            _rewrite_token_file(ctx, token)  # the state directory's token is theirs: a local CLI reads it
        return {"name": name, "token": token}

    @r.delete("/users/{name}", tags=["users"])
    def delete_user(name: str, who: Me) -> dict:
        who.need_admin(f"deleting user {name}")
        store.delete_user(name, actor=who.name)
        return {"deleted": name}

    # ------------------------------------------------------------------ projects
    @r.get("/projects", tags=["projects"])
    def list_projects(who: Me) -> list[dict]:
        return [p.model_dump(mode="json") for p in store.projects(who.visible())]

    @r.post("/projects", tags=["projects"], status_code=201)
    def add_project(body: NewProject, who: Me) -> dict:
        who.need_admin(f"making project {body.name}")
        return store.add_project(body.name, who.name, actor=who.name).model_dump(mode="json")

    @r.delete("/projects/{name}", tags=["projects"])
    def delete_project(name: str, who: Me) -> dict:
        who.need_admin(f"deleting project {name}")
        store.delete_project(name, actor=who.name)
        return {"deleted": name}

    @r.post("/projects/{name}/members", tags=["projects"])
    def add_member(name: str, body: NewMember, who: Me) -> dict:
        who.need_project_admin(name, f"adding members to project {name}")
        project = project_of(name)
        admins = [m.user for m in project.members if m.role == ProjectRole.ADMIN]
        if body.role != ProjectRole.ADMIN and admins == [body.user]:  # as removing them is refused
            raise GpufleetError(f"{body.user} is the last admin of project {name}: make another member its admin first")
        store.set_member(name, body.user, body.role, actor=who.name)
        return project_of(name).model_dump(mode="json")

    @r.delete("/projects/{name}/members/{user}", tags=["projects"])
    def remove_member(name: str, user: str, who: Me) -> dict:
        who.need_project_admin(name, f"removing members from project {name}")
        project = project_of(name)
        admins = [m.user for m in project.members if m.role == ProjectRole.ADMIN]
        if admins == [user]:
            raise GpufleetError(f"{user} is the last admin of project {name}: make another member its admin first")
        store.remove_member(name, user, actor=who.name)
        return project_of(name).model_dump(mode="json")

    # ------------------------------------------------------------------ quotas
    def may_set(who: Caller, q: QuotaBody | Quota, what: str) -> None:
        if q.user is None:
            who.need_admin(f"{what} the quota of project {q.project}")
        else:
            who.need_project_admin(q.project, f"{what} the quota of {q.user} in project {q.project}")

    @r.get("/quotas", tags=["quotas"])
    def list_quotas(who: Me, project: str | None = None) -> list[dict]:
        if project:
            who.need_member(project, f"seeing the quotas of project {project}")
        seen = {project} if project else who.visible()
        running = [run for run in store.runs(projects=seen) if run.active]
        return [{**q.model_dump(mode="json"), "used": _used(q, running)} for q in store.quotas(seen)]

    @r.put("/quotas", tags=["quotas"])
    def set_quota(body: QuotaBody, who: Me) -> dict:
        may_set(who, body, "setting")
        project = project_of(body.project)
        if body.user is not None and project.role_of(body.user) is None:
            raise GpufleetError(f"{body.user} is not a member of project {body.project}: add them first")
        quota = Quota(project=body.project, user=body.user, gpu=body.gpu, gpus=body.gpus)
        store.set_quota(quota, actor=who.name)
        ctx.kick()  # a raised quota may let waiting runs start
        return quota.model_dump(mode="json")

    @r.delete("/quotas", tags=["quotas"])
    def delete_quota(who: Me, project: str, user: str | None = None, gpu: str | None = None) -> dict:
        may_set(who, Quota(project=project, user=user, gpu=gpu, gpus=0), "removing")
        if not store.delete_quota(project, user, gpu, actor=who.name):
            raise NotFound("no such quota (see gpufleet quota list)")
        ctx.kick()
        return {"deleted": True}

    # ------------------------------------------------------------------ usage
    @r.get("/usage", tags=["usage"])
    def get_usage(who: Me, project: str | None = None, since: float = 7 * 86400.0) -> list[dict]:
        """GPU-hours per project and user over the last ``since`` seconds, and the decayed
        GPU-hours fair share orders by (half-life: the server's `fair_share_half_life`)."""
        from gpufleet import fairshare

        if project:
            who.need_member(project, f"seeing the usage of project {project}")
        seen = {project} if project else who.visible()
        now = time.time()
        records = [rec for rec in store.usage_records(since=now - max(since, ctx.half_life * 10))
                   if seen is None or rec.project in seen]
        tuples = [(rec.project, rec.user, rec.gpus, rec.started_at, rec.ended_at) for rec in records]
        hours = fairshare.gpu_hours(tuples, now - since, now)
        decayed = fairshare.decayed_usage(tuples, now, ctx.half_life)
        counts: dict[tuple[str, str], int] = {}
        for rec in records:
            if (rec.ended_at or now) > now - since:
                counts[(rec.project, rec.user)] = counts.get((rec.project, rec.user), 0) + 1
        keys = sorted(set(hours) | set(counts))
        return [{"project": p, "user": u, "gpu_hours": round(hours.get((p, u), 0.0), 4),
                 "decayed_gpu_hours": round(decayed.users.get((p, u), 0.0), 4), "runs": counts.get((p, u), 0)}
                for p, u in keys]

    return r


def _user_json(user: User) -> dict:
    return {"name": user.name, "role": user.role, "created_at": user.created_at,
            "projects": [{"name": p, "role": role} for p, role in sorted(user.projects.items())]}


def _used(q: Quota, running) -> int:
    """GPUs of the runs holding blocks now that count against ``q``."""
    total = 0
    for run in running:
        if run.project != q.project or (q.user is not None and run.user != q.user):
            continue
        gpus = [g for n in run.nodes for g in n.gpus]
        total += sum(1 for g in gpus if q.gpu is None or (g.model or "").lower() == q.gpu.lower())
    return total


def _bootstrap_token(ctx) -> str | None:
    if ctx.token_file is None:
        return None
    try:
        return read_private(ctx.token_file, "API token")
    except GpufleetError:
        return None


def _rewrite_token_file(ctx, token: str) -> None:
    """Replace the token in the state directory (0600, atomically) with the admin's new one."""
    paths.replace_private_file(ctx.token_file, token + "\n", "API token")
