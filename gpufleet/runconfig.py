"""Reading run configuration files (`type: task`, `service`, `dev-environment`).

``load_run(path)`` reads and validates a file against :mod:`gpufleet.models.run`, with the same
file:line:column errors as fleets, and reads its secrets' values from the environment.
"""

from __future__ import annotations

from pathlib import Path

from gpufleet.config import name_from_file, validate
from gpufleet.errors import ConfigError
from gpufleet.models import RUN_CONFIG, RunRequest, RunType
from gpufleet.secrets import run_secrets
from gpufleet.yamlsource import load_yaml, read_config_text

RUN_TYPES = tuple(t.value for t in RunType)


def load_run(path: str | Path) -> RunRequest:
    """A run file, its secrets' values taken from this process's environment."""
    return parse_run(read_config_text(Path(path)), str(path))


def parse_run(text: str, source: str, secrets: dict[str, str] | None = None, values: bool = True) -> RunRequest:
    """A run configuration's text (from file ``source``, for messages); its secrets' values are
    ``secrets`` (what a client sent), else taken from this process's environment. ``values=False``:
    the run is only looked at (a plan), its secrets' values are neither needed nor kept."""
    path = Path(source)
    src = load_yaml(text, source)
    if not isinstance(src.data, dict):
        raise ConfigError([src.problem((), "a run configuration must be a mapping (type: task, ...)")])
    if src.data.get("type") not in RUN_TYPES:
        raise ConfigError([src.problem(("type",), f"type must be task, service or dev-environment "
                                                  f"(got {src.data.get('type')!r})")])
    cfg = validate(RUN_CONFIG, src)
    taken = run_secrets(src, cfg, secrets) if values else {}
    return RunRequest(name=cfg.name or name_from_file(path, "run", limit=41), source=source, config=cfg,
                      secrets=taken)


def config_type(path: str | Path) -> str | None:
    """The `type:` of a config file, for dispatching `gpufleet apply` (None if unreadable)."""
    try:
        data = load_yaml(read_config_text(Path(path)), str(path)).data
    except ConfigError:
        return None
    return data.get("type") if isinstance(data, dict) else None
