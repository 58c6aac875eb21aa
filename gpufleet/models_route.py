"""The server's OpenAI-compatible endpoint for models, the decisions alone (pure functions): which service
serves a model, the path it sees, the /v1/models list, who may call it, and the error bodies.

A service with `model: NAME` (gpufleet.models.run.ChatModel) is reached by its model's name under
``/proxy/models/<project>/`` (dstack's path): a POST (``v1/chat/completions``, ``v1/completions``,
``v1/embeddings``..., with or without the ``v1/``, which dstack's OpenAI base URL leaves out) goes to the
live service of that project whose model is the JSON body's `model`, at the model's `prefix` (default
/v1) + the rest of the path; ``GET v1/models`` lists the models of the project's running services in
OpenAI's format. gpufleet.server.models_proxy carries the requests (through the service endpoint's
carrier, gpufleet.server.proxy) and asks this module what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from gpufleet.errors import Unauthorized
from gpufleet.models import Run, RunStatus

PREFIX = "/proxy/models"
BODY_LIMIT = 64 << 20  # bytes of a request's JSON body read to find its `model` (prompts with images are large)
VERSION = "v1/"  # OpenAI's version in a client's path: optional here (dstack's base URL has none)


def model_url(server: str, project: str) -> str:
    """The OpenAI base URL of ``project``'s models on the server at ``server`` (e.g. http://host:8080)."""
    return f"{server.rstrip('/')}{PREFIX}/{quote(project, safe='')}/"


def model_of(run: Run) -> dict[str, Any] | None:
    """A service's `model` as its spec holds it ({type, name, format, prefix}), None for any other run."""
    if not run.is_service:  # a service's own run (its replicas are runs of their own)
        return None
    model = run.spec.get("model")
    return model if isinstance(model, dict) and model.get("name") else None


def model_name(run: Run) -> str | None:
    model = model_of(run)
    return model["name"] if model else None


def rest_of(path: str) -> str:
    """What follows the OpenAI version in the path under /proxy/models/PROJECT/: ``chat/completions`` for
    both ``v1/chat/completions`` and dstack's ``chat/completions``."""
    path = path.lstrip("/")
    return "" if path == VERSION.rstrip("/") else path.removeprefix(VERSION)


def upstream_path(run: Run, rest: str, query: str) -> str:
    """The path (and query) the service of ``run`` sees for a request to /proxy/models/PROJECT/v1/REST:
    its model's prefix + /REST."""
    prefix = (model_of(run) or {}).get("prefix") or "/v1"
    return prefix.rstrip("/") + "/" + rest.lstrip("/") + (f"?{query}" if query else "")


def is_models_list(path: str) -> bool:
    return rest_of(path).rstrip("/") == "models"


def listed_model(path: str) -> str | None:
    """The model a ``GET v1/models/NAME`` asks about (a name may hold `/`: meta-llama/Llama-3.1-8B), else None."""
    rest = rest_of(path)
    return rest[len("models/"):] if rest.startswith("models/") and len(rest) > len("models/") else None


# --------------------------------------------------------------------------- which service

SERVING = (RunStatus.PENDING, RunStatus.STARTING, RunStatus.RUNNING)  # a stopping service serves no more


def served(runs: Iterable[Run], project: str, statuses: Iterable[RunStatus] = SERVING) -> dict[str, list[Run]]:
    """The models of ``project``'s services that serve or will (queued, starting, running; or those in
    ``statuses``): name -> its services."""
    wanted = set(statuses)
    out: dict[str, list[Run]] = {}
    for run in runs:
        name = model_name(run)
        if name is None or run.project != project or run.status not in wanted:
            continue
        out.setdefault(name, []).append(run)
    return out


def pick(runs: Iterable[Run], project: str, name: str, ready: Callable[[Run], bool] = lambda r: True) -> Run | None:
    """The service that serves model ``name`` in ``project``: of its services (queued, starting or running), a
    ready one first, then a running one, then the newest (as dstack, which takes the most recent of those with
    the name); None: no such model (404). One that is not running or not ready yet gets its 503."""
    found = served(runs, project).get(name, [])
    if not found:
        return None
    return max(found, key=lambda r: (ready(r), r.status == RunStatus.RUNNING, r.created_at))


def models_list(runs: Iterable[Run], project: str) -> dict:
    """GET /proxy/models/PROJECT/v1/models: the models of the project's running services, in OpenAI's list
    format (each name once, `created` when its newest service was submitted, `owned_by` the project)."""
    found = served(runs, project, [RunStatus.RUNNING])
    return {"object": "list", "data": [model_object(name, max(rs, key=lambda r: r.created_at), project)
                                       for name, rs in sorted(found.items())]}


def model_object(name: str, run: Run, project: str) -> dict:
    return {"id": name, "object": "model", "created": int(run.created_at), "owned_by": project}


# --------------------------------------------------------------------------- who may call it

def check_access(caller, project: str) -> None:
    """The models of ``project`` are its members' (a server admin's too), whatever each service's `auth`, as in
    dstack: Unauthorized (401) without a token, Forbidden (403) saying what is missing."""
    if caller is None:
        raise Unauthorized(f"the models of project {project} ({PREFIX}/{project}/) need a gpufleet token of a "
                           "member of the project (Authorization: Bearer ...), whatever each service's `auth`")
    caller.need_member(project, f"using the models of project {project} ({PREFIX}/{project}/)")


# --------------------------------------------------------------------------- the request and the errors

class BadRequest(ValueError):
    """A request this endpoint cannot route: its status and OpenAI error body (``error_body``)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.param, self.kind = status, code, param, kind

    @property
    def body(self) -> dict:
        return error_body(str(self), self.kind, self.code, self.param)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None, exit_code: int = 1) -> dict:
    """An error in OpenAI's shape (what OpenAI's clients read), with gpufleet's `detail` and `exit_code` beside it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code},
            "detail": message, "exit_code": exit_code}


def requested_model(body: bytes) -> str:
    """The `model` of a request's JSON body; BadRequest (400) saying what is wrong."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"the request's body is not JSON ({e}): this endpoint routes OpenAI requests by "
                              "their `model` field") from None
    if not isinstance(data, dict) or "model" not in data:
        raise BadRequest(400, "the request's JSON body has no `model`: this endpoint routes OpenAI requests by "
                              "their `model` field", "missing_model", "model")
    if not isinstance(data["model"], str) or not data["model"]:
        raise BadRequest(400, f"`model` must be a model's name, not {data['model']!r}", "invalid_model", "model")
    return data["model"]


def not_found(name: str, project: str, names: Iterable[str]) -> BadRequest:
    """Model ``name`` is served by no live service of ``project`` (404), naming those that are."""
    names = sorted(names)
    have = f"it serves {', '.join(names)}" if names else "none of its services has a `model`"
    return BadRequest(404, f"model {name!r} is not served in project {project}: {have} (a service with "
                           f"`model: NAME`, see gpufleet ps)", "model_not_found", "model")


def unknown_path(path: str, project: str) -> BadRequest:
    return BadRequest(404, f"no such path here: {PREFIX}/{project}/{path} (this endpoint serves POST "
                           f"{PREFIX}/{project}/v1/chat/completions and the other OpenAI POST routes by `model`, "
                           f"and GET {PREFIX}/{project}/v1/models)", "unknown_url")


def too_large(limit: int = BODY_LIMIT) -> BadRequest:
    return BadRequest(413, f"the request's body is over {limit >> 20} MiB", "request_too_large")


def not_ready(message: str) -> BadRequest:
    """The model's service has no ready replica (503, as the service endpoint answers)."""
    return BadRequest(503, message, "model_not_ready", kind="service_unavailable")

