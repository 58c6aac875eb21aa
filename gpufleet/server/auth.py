"""Who is asking, and what they may do: API tokens (kept only as hashes), the caller of a request,
the rules of docs/teams.md, and the limit on failed logins.

Every route of the API asks here and nowhere else: `Caller` is who made the request (from its
bearer token), and its `need_*` methods raise Forbidden with a message that says what is missing.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from gpufleet.errors import Forbidden, NotFound, Unauthorized, UsageError
from gpufleet.models import DEFAULT_PROJECT, ProjectRole, Run, ServerRole, User
from gpufleet.state import Store

TOKEN_PREFIX = "gft_"
BOOTSTRAP_ADMIN = "admin"
FAILURES_ALLOWED = 10  # failed logins from one address ...
FAILURE_WINDOW = 60.0  # ... within this many seconds, then 429 until the oldest is older than that


def new_token() -> str:
    """A new API token: random (256 bits), recognisable by its prefix (secret scanners, people)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the store keeps of a token. A token is 256 random bits, so a plain SHA-256 cannot be
    reversed or guessed (a password would need a slow hash; a token does not)."""
    return hashlib.sha256(token.encode()).hexdigest()


class TooManyFailures(Unauthorized):
    """Too many failed logins from one address (HTTP 429)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class FailedLogins:
    """Failed logins per client address in the last FAILURE_WINDOW seconds (in this server
    process: a replica counts its own)."""

    allowed: int = FAILURES_ALLOWED
    window: float = FAILURE_WINDOW
    _seen: dict[str, deque] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = self._prune(client, now)
            if seen is not None and len(seen) >= self.allowed:
                wait = max(1, int(seen[0] + self.window - now) + 1)
                raise TooManyFailures(f"too many failed logins from {client}: try again in {wait}s", wait)

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._seen) > 10000:  # a flood of addresses: forget the quiet ones
                for key in [k for k, v in self._seen.items() if not v or v[-1] < now - self.window]:
                    del self._seen[key]
            self._seen.setdefault(client, deque()).append(now)

    def _prune(self, client: str, now: float) -> deque | None:
        seen = self._seen.get(client)
        while seen and seen[0] < now - self.window:
            seen.popleft()
        return seen


@dataclass(frozen=True)
class Caller:
    """The user behind a request, with their roles."""

    user: User

    @property
    def name(self) -> str:
        return self.user.name

    @property
    def admin(self) -> bool:
        return self.user.role == ServerRole.ADMIN

    def role_in(self, project: str) -> ProjectRole | None:
        return self.user.projects.get(project)

    def visible(self) -> set[str] | None:
        """The projects whose runs, fleets and events the caller may see; None: all (server admin)."""
        return None if self.admin else set(self.user.projects)

    def _you(self, project: str) -> str:
        role = self.role_in(project)
        return f"you are {'a member' if role == ProjectRole.MEMBER else 'an admin'} of it" if role \
            else "you are not a member of it"

    def need_admin(self, what: str) -> None:
        if not self.admin:
            raise Forbidden(f"{what} needs a server admin; {self.name} is a user")

    def need_member(self, project: str, what: str) -> None:
        if not self.admin and self.role_in(project) is None:
            raise Forbidden(f"{what} needs membership of project {project}; {self._you(project)}")

    def need_project_admin(self, project: str, what: str) -> None:
        if not self.admin and self.role_in(project) != ProjectRole.ADMIN:
            raise Forbidden(f"{what} needs to be an admin of project {project}; {self._you(project)}")

    def need_run(self, run: Run, what: str) -> None:
        """Acting on a run (its logs, attach, stop): its submitter, an admin of its project, or a server admin."""
        if self.admin or self.role_in(run.project) == ProjectRole.ADMIN:
            return
        if run.user == self.name and self.role_in(run.project) is not None:
            return
        raise Forbidden(f"{what} needs to be its submitter or an admin of project {run.project}; "
                        f"{self._you(run.project)}")

    def project(self, asked: str | None) -> str:
        """The project a request is for: the one asked (the caller must belong to it), else the
        caller's only project, else `default` if they are in it."""
        if asked:
            self.need_member(asked, f"working in project {asked}")
            return asked
        mine = sorted(self.user.projects)
        if len(mine) == 1:
            return mine[0]
        if DEFAULT_PROJECT in mine or (self.admin and not mine):
            return DEFAULT_PROJECT
        if not mine:
            raise Forbidden(f"{self.name} is in no project: a project admin adds them (gpufleet project member add)")
        raise UsageError(f"say which project (--project): {self.name} is in {', '.join(mine)}")

    def sees_run(self, store: Store, name: str) -> Run:
        """Run ``name``, if the caller may see it (a member of its project)."""
        run = store.run(name)
        if run is None:
            raise NotFound(f"no run named {name!r} (see gpufleet ps -a)")
        self.need_member(run.project, f"run {name}")
        return run


def authenticate(store: Store, token: str | None, client: str, failures: FailedLogins) -> Caller:
    """The caller a token stands for; Unauthorized (401) for none or an unknown one. An unknown
    one counts against ``client``'s failed logins: past FAILURES_ALLOWED in FAILURE_WINDOW, its
    tokens are not even looked at (429). A request with no token is no guess and is not counted."""
    if not token:
        raise Unauthorized("no token")
    failures.check(client)
    user = store.user_by_token(token_hash(token))
    if user is None:
        failures.failed(client)
        raise Unauthorized("bad token")
    return Caller(user)


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (None when there is none)."""
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def current_caller(request: Request) -> Caller:
    """The API's dependency: the caller of a request, on the app's Context (`app.state.ctx`).
    A plain function: FastAPI runs it on a worker thread, as it reads the store."""
    return request.app.state.ctx.caller(bearer(request.headers.get("authorization")), client_of(request))


Me = Annotated[Caller, Depends(current_caller)]
