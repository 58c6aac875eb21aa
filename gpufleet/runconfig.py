"""Reading run configuration files (`type: task`, `service`, `dev-environment`).

``load_run(path)`` reads and validates a file against :mod:`gpufleet.models.run`, with the same
file:line:column errors as fleets, and reads its secrets' values from the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gpufleet.config import name_from_file, validate
from gpufleet.errors import ConfigError, ConfigProblem
from gpufleet.interpolate import InterpolationError, check_run, refs
from gpufleet.models import DevEnvironmentConfig, RunRequest, RunType, ServiceConfig, TaskConfig, split_env
from gpufleet.models.run import group_problems, service_group_problems
from gpufleet.secrets import run_secrets, take
from gpufleet.yamlsource import YamlSource, load_yaml, read_config_text

RUN_TYPES = tuple(t.value for t in RunType)
_MODELS = {"task": TaskConfig, "service": ServiceConfig, "dev-environment": DevEnvironmentConfig}

# dstack's run configuration fields (configurations.py and profiles.py of dstack 0.19/0.20) that
# gpufleet does not take, each with what to do instead ("" where there is nothing to suggest). A field
# gpufleet takes is a field of the model and never looked up here. The error names them as dstack's,
# so that a dstack user's file is refused with a reason rather than a bare "unknown field".
_CLOUD = "a dstack cloud field; gpufleet runs on the hosts of SSH fleets: choose them with `fleets`"
_NO_GATEWAY = ("gpufleet has no gateway: the server itself serves a service at /proxy/services/PROJECT/RUN/ "
               "(put a reverse proxy such as nginx or Caddy in front of it for HTTPS and domains)")
_COMMON = {
    "single_branch": "gpufleet uploads a repo's working tree without its .git folder, so which branches a clone "
                     "tracks makes no difference in the container; remove it",
    "home_dir": "it has no effect in dstack either (deprecated); remove it",
    "setup": "deprecated in dstack; put those lines first in `commands`",
    "dstack": "",
    "backends": _CLOUD, "regions": _CLOUD, "availability_zones": _CLOUD, "instance_types": _CLOUD,
    "reservation": _CLOUD, "max_price": _CLOUD, "creation_policy": _CLOUD,
    "idle_duration": _CLOUD, "instances": _CLOUD, "tags": _CLOUD, "backend_options": _CLOUD,
}
UNSUPPORTED: dict[str, dict[str, str]] = {
    "task": {**_COMMON, **{
    }},
    "service": {**_COMMON, **{
        "gateway": _NO_GATEWAY, "https": _NO_GATEWAY,
        "router": _NO_GATEWAY,
        "groups": "write the replica groups as a list under `replicas` (dstack's other form)",
    }},
    "dev-environment": {**_COMMON, **{
        "version": "gpufleet pre-installs no IDE server (VS Code, Cursor, Windsurf install their own over "
                   "`ssh RUN-NAME`); remove it",
    }},
}


def load_run(path: str | Path) -> RunRequest:
    """A run file, its secrets' values taken from this process's environment."""
    return parse_run(read_config_text(Path(path)), str(path))


def parse_run(text: str, source: str, secrets: dict[str, str] | None = None, values: bool = True) -> RunRequest:
    """A run configuration's text (from file ``source``, for messages); its secrets' values (of its env
    names without a value, and of each `${{ secrets.NAME }}` it uses) are ``secrets`` (what a client
    sent), else taken from this process's environment. ``values=False``: the run is only looked at
    (a plan), its secrets' values are neither needed nor kept."""
    path = Path(source)
    src = load_yaml(text, source)
    if not isinstance(src.data, dict):
        raise ConfigError([src.problem((), "a run configuration must be a mapping (type: task, ...)")])
    if src.data.get("type") not in RUN_TYPES:
        raise ConfigError([src.problem(("type",), f"type must be task, service or dev-environment "
                                                  f"(got {src.data.get('type')!r})")])
    kind = src.data["type"]
    cfg = validate(_MODELS[kind], src, unsupported=UNSUPPORTED[kind])
    if isinstance(cfg, ServiceConfig) and (wrong := service_group_problems(cfg, set(src.data))):
        problems = [src.problem(loc, why) for loc, why in wrong]
        raise ConfigError(sorted(problems, key=lambda p: (p.line or 0, p.column or 0)))
    if isinstance(cfg, TaskConfig) and (wrong := group_problems(cfg, set(src.data))):
        problems = [src.problem(loc, why) for loc, why in wrong]
        raise ConfigError(sorted(problems, key=lambda p: (p.line or 0, p.column or 0)))
    # `${{ ... }}` references: checked now, filled when each node starts (launch.container_vars); the
    # values of `${{ secrets.NAME }}` join the run's secrets (sealed, never in its spec)
    referenced = check_run(src, cfg, text)
    referenced |= _registry_auth(src, cfg)
    taken = run_secrets(src, cfg, secrets) if values else {}
    if values:
        taken |= take([n for n in referenced if n not in taken], lambda n: referenced[n](
            f"${{{{ secrets.{n} }}}}: {n} is not set in the environment: export {n}=... before gpufleet apply"),
            secrets)
    if values and cfg.registry_auth is not None:
        taken[REGISTRY_PASSWORD] = cfg.registry_auth.password  # as written: filled when it is used (launch)
    return RunRequest(name=cfg.name or name_from_file(path, "run", limit=41), source=source, config=cfg,
                      secrets=taken)


# where a run's `registry_auth.password` (as written, `${{ secrets.NAME }}` unfilled) is kept among its
# sealed secrets: not an env name, so never one of the container's variables
REGISTRY_PASSWORD = "registry_auth.password"


def _registry_auth(src: YamlSource, cfg) -> dict[str, Callable[[str], ConfigProblem]]:
    """Check `registry_auth`: a password is given, and its `${{ }}` references are what dstack fills
    there: `secrets.NAME`, and `env.NAME` of a name in the run's `env` (its value, or for a name without
    one the secret's value from the environment). The names of the secrets it uses, each with how to
    point at it."""
    auth = cfg.registry_auth
    if auth is None:
        return {}
    if auth.password is None:
        raise ConfigError([src.problem(("registry_auth",), "needs a password (or an access token), e.g. "
                                                           "password: ${{ secrets.REGISTRY_TOKEN }}")])
    problems, used = [], {}
    values, secret_names = split_env(cfg.env)
    env_names = set(values) | set(secret_names)
    for key in ("username", "password"):
        value = getattr(auth, key)
        loc = ("registry_auth", key)
        try:
            found = refs(value)
        except InterpolationError as e:
            problems.append(src.problem(loc, str(e)))
            continue
        for ref in found:
            if ref.namespace == "secrets":
                used.setdefault(ref.name, lambda message, loc=loc: src.problem(loc, message))
            elif ref.namespace != "env":
                problems.append(src.problem(loc, f"{ref}: registry_auth is filled with env and secrets only (as in "
                                                 "dstack): ${{ env.NAME }}, ${{ secrets.NAME }}"))
            elif ref.name not in env_names:
                problems.append(src.problem(loc, f"{ref}: {ref.name} is not in the run's `env` (list it: "
                                                 f"`- {ref.name}` takes its value from your environment, as a "
                                                 "secret, or give it a value)"))
    if problems:
        raise ConfigError(problems)
    return used


def config_type(path: str | Path) -> str | None:
    """The `type:` of a config file, for dispatching `gpufleet apply` (None if unreadable)."""
    try:
        data = load_yaml(read_config_text(Path(path)), str(path)).data
    except ConfigError:
        return None
    return data.get("type") if isinstance(data, dict) else None
