"""How a server runs: where it listens, which database it keeps its state in, how often its loops turn.

The values come from, last one winning: the defaults here, the configuration file (server.yml in the
state directory, or the one given with --config), the environment (GPUFLEET_DATABASE_URL, so that a
database password can stay out of files), and the command line's flags.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError

from gpufleet import paths
from gpufleet.config import validate
from gpufleet.errors import ConfigError, ConfigProblem
from gpufleet.models.core import CoreModel
from gpufleet.models.images import ImageList
from gpufleet.yamlsource import format_loc, load_yaml, read_config_text

SETTINGS_FILE = "server.yml"
DATABASE_URL_ENV = "GPUFLEET_DATABASE_URL"


DEFAULT_UPLOAD_LIMIT = 100 * 2**20  # gpufleet.upload.DEFAULT_LIMIT


def _size(value: Any) -> Any:
    from gpufleet.upload import UploadError, parse_limit

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("must be a size: a number of bytes or 100MB, 1GB")
    try:
        return parse_limit(value, "upload_limit")
    except UploadError as e:
        raise ValueError(str(e)) from None


def _seconds(default: float, what: str, zero: bool = False) -> Any:
    # strict: `yes` in YAML is true, and true is not 1 second here
    bound = {"ge": 0} if zero else {"gt": 0}
    return Field(default, description=f"Seconds: {what}", strict=True, allow_inf_nan=False, **bound)


class ServerSettings(CoreModel):
    """The settings of `gpufleet server`. Every field has a default: a file holds only what it changes."""

    host: str = Field("127.0.0.1", min_length=1,
                      description="Address to listen on; 0.0.0.0 (or ::) for every interface.")
    port: int = Field(8300, ge=0, le=65535, strict=True,
                      description="Port to listen on; 0 picks a free one (what a local server does).")
    database_url: str | None = Field(None, min_length=1,
                                     description="SQLAlchemy URL of the database (e.g. postgresql+psycopg://"
                                                 "user@host/gpufleet); unset: the state directory's SQLite file.")
    reconcile_interval: float = _seconds(1.0, "how often the hosts of active runs are asked how their containers "
                                              "are (a run's end is seen, and its blocks go to the next run, within "
                                              "this).")
    sweep_interval: float = _seconds(30.0, "how often every ready host is also asked for containers that no run "
                                           "owns (left by a crash), which are stopped.")
    schedule_interval: float = _seconds(2.0, "how often the scheduler runs when nothing else woke it.")
    limits_interval: float = _seconds(5.0, "how often running runs are checked against their max_duration "
                                           "(and stopped at it).")
    replicas_interval: float = _seconds(2.0, "how often services' replicas are looked at: replaced when they end, "
                                             "rolled out after an update, scaled by `scaling`.")
    idle_exit: float = _seconds(600.0, "how long a local server with no active or waiting run waits before "
                                       "it exits; 0: it never exits.", zero=True)
    leader_retry: float = _seconds(1.0, "how often a server that does not run the loops tries to become "
                                        "their leader.")
    workers: int = Field(8, ge=1, le=1024, strict=True, description="Threads that start and stop containers.")
    upload_limit: Annotated[int, BeforeValidator(_size)] = Field(
        DEFAULT_UPLOAD_LIMIT, ge=0, description="The most a run's code upload (its `repos` and `files`) may hold, "
                                                "in bytes or with a unit (100MB, 1GB); default 100 MiB.")
    images: ImageList | None = Field(
        None, description="The images a run without `image` may get on a fleet that has no `images` of its own, "
                          "each {image, python, nvcc, default} (see the fleet's `images`). Omitted: dstack's default "
                          "images (dstackai/base), pulled from Docker Hub.")
    fair_share_half_life: float = _seconds(7 * 86400.0, "fair share: how long before a GPU-hour used counts "
                                                        "half as much (as Slurm's PriorityDecayHalfLife); "
                                                        "default 7 days.")
    metrics_interval: float = _seconds(10.0, "how often every ready host's GPUs (utilization, memory, temperature, "
                                             "power, processes) and run containers (CPU, memory) are sampled.")
    metrics_raw_retention: float = _seconds(3600.0, "how long each sample is kept as taken; older ones are kept "
                                                    "as 1-minute means.")
    metrics_retention: float = _seconds(7 * 86400.0, "how long the 1-minute means of the samples are kept; "
                                                     "default 7 days.")


def settings_file() -> Path:
    """The configuration file read when none is given: server.yml in the state directory."""
    return paths.home() / SETTINGS_FILE


def load_settings(path: Path | None = None, overrides: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> ServerSettings:
    """The settings from ``path`` (or server.yml in the state directory, if it exists), then
    ``env`` (default: this process's environment), then ``overrides`` (flags; None means not given).
    A bad value is a ConfigError pointing at its file, line and field, or naming the variable or flag."""
    env = os.environ if env is None else env
    if path is None and settings_file().exists():
        path = settings_file()
    settings = ServerSettings() if path is None else _from_file(path)
    if env.get(DATABASE_URL_ENV):
        settings = _update(settings, {"database_url": env[DATABASE_URL_ENV]}, "environment",
                           lambda field: DATABASE_URL_ENV)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given:
        settings = _update(settings, given, "command line", lambda field: field)
    return settings


def _from_file(path: Path) -> ServerSettings:
    src = load_yaml(read_config_text(path), str(path))
    if not isinstance(src.data, dict):
        raise ConfigError([src.problem((), "server settings must be a mapping (host: ..., port: ...)")])
    return validate(ServerSettings, src)


def _update(settings: ServerSettings, values: dict[str, Any], source: str,
            name: Callable[[str], str]) -> ServerSettings:
    """``settings`` with ``values`` (from ``source``) put over them, validated again."""
    try:
        return ServerSettings.model_validate({**settings.model_dump(exclude_unset=True), **values})
    except ValidationError as e:
        raise ConfigError([ConfigProblem(source, None, None, name(format_loc(tuple(err["loc"]))),
                                         err["msg"].removeprefix("Value error, "))
                           for err in e.errors(include_url=False)]) from None
