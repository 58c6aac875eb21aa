"""Secrets: env names given without a value, in a fleet's or a run's `env`.

Their values come from the environment of the gpufleet process, once: read, then removed from
this process's environment, so that no child (ansible-playbook among them) inherits them. Only
the workload role's no_log option carries them to the host. They are never stored, logged or shown,
and a missing one is a config error that names it, never its value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from gpufleet.errors import ConfigError, ConfigProblem
from gpufleet.models import RunConfigType
from gpufleet.models.env import split_env
from gpufleet.yamlsource import YamlSource


def _hint(name: str) -> str:
    return (f"{name} is a secret (a name without a value) but is not set in the environment: "
            f"export {name}=... before gpufleet apply")


def take(names: Iterable[str], missing: Callable[[str], ConfigProblem],
         given: dict[str, str] | None = None) -> dict[str, str]:
    """The value of each name from ``given`` (what a client sent to the server), else from this
    process's environment, which then forgets it. Raise a ConfigError with ``missing(name)`` for
    each name that has no value."""
    names = list(names)
    source = os.environ if given is None else given
    problems = [missing(n) for n in names if n not in source]
    if problems:
        raise ConfigError(problems)
    if given is not None:
        return {n: given[n] for n in names}
    return {n: os.environ.pop(n) for n in names}


def run_secrets(src: YamlSource, cfg: RunConfigType, given: dict[str, str] | None = None) -> dict[str, str]:
    """A run file's secrets (from ``given``, else the environment); a missing one points at its
    place in the file."""
    _, names = split_env(cfg.env)

    def missing(name: str) -> ConfigProblem:
        by_key = isinstance(cfg.env, dict)
        loc = ("env", name) if by_key else ("env", next(i for i, item in enumerate(cfg.env) if item == name))
        return src.problem(loc, _hint(name), prefer_key=by_key)

    return take(names, missing, given)


def fleet_secrets(fleet: str, source: str, names: list[str]) -> dict[str, str]:
    """A fleet's secrets (``names``, from its file ``source``), taken by `gpufleet apply` of the
    fleet; the server keeps them sealed for the runs that start on it."""
    return take(names, lambda name: ConfigProblem(source, None, None, f"env.{name}", f"fleet {fleet}: " + _hint(name)))
