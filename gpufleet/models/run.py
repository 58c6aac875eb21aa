"""Runs: `type: task`, `service` and `dev-environment` (dstack-compatible fields) and what they ask for.

GPU requests accept dstack's forms: `4`, `2..4`, `H100:4`, `H100:80GB:4`, `A100,H100:2`,
`amd:2`, `24GB..:1`, or a mapping {name, count, memory, vendor}.

Queueing fields, with dstack's meaning unless a field's description says otherwise: `priority`,
`max_duration`, `stop_duration` (durations in dstack's forms: `90`, `90s`, `30m`, `2h`, `1d`, `1w`,
`off`; stored as seconds) and `retry` (`true`, `false` or {on_events, duration}; read through
`retry_policy`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    TypeAdapter,
    field_serializer,
    field_validator,
    model_validator,
)

from gpufleet.models.core import CoreModel, Range
from gpufleet.models.env import Env, split_env
from gpufleet.models.fleet import Name


class RunType(StrEnum):
    """dstack's run configuration types (`type:`)."""

    TASK = "task"
    SERVICE = "service"
    DEV_ENVIRONMENT = "dev-environment"


VENDORS = {"nvidia": "nvidia", "amd": "amd", "intel": "intel", "gaudi": "intel", "habana": "intel",
           "tenstorrent": "tenstorrent", "tt": "tenstorrent"}
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(MB|GB|TB)?$", re.I)
_MAX_GPUS = 1024

RUN_PRIORITY_MIN, RUN_PRIORITY_MAX = 0, 100
RUN_PRIORITY_DEFAULT = 50  # the scheduler's PRIORITY_DEFAULT; dstack's default is 0
STOP_DURATION_DEFAULT = 300.0  # dstack's DEFAULT_STOP_DURATION (5m)
RETRY_DURATION_DEFAULT = 3600.0  # dstack's DEFAULT_RETRY_DURATION (1h), for `retry: true` or no `duration`
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 24 * 3600, "w": 7 * 24 * 3600}
_DURATION_RE = re.compile(r"(\d+) *([smhdw])")
_DURATION_FORMS = "seconds (90) or a number and one unit s, m, h, d or w (90s, 30m, 2h, 1d, 1w)"


def _dumped(value: Any) -> Range | None:
    """A Range as model_dump(mode="json") writes it ({"min": .., "max": ..}): a stored run's config
    read back (the server keeps it that way), not something a user writes."""
    if isinstance(value, dict) and value and set(value) <= {"min", "max"}:
        return Range(value.get("min"), value.get("max"))
    return None


def parse_count(value: Any, what: str = "count", limit: int = _MAX_GPUS) -> Range:
    if (dumped := _dumped(value)) is not None:
        return Range(*(None if v is None else int(v) for v in (dumped.min, dumped.max)))
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number or a range like 2..4, not {str(value).lower()}")
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, str) and re.fullmatch(r"\d*\.\.\d*", value.strip()) and value.strip() != "..":
        a, b = value.strip().split("..")
        lo, hi = (int(a) if a else None), (int(b) if b else None)
    elif isinstance(value, str) and value.strip().isdigit():
        lo = hi = int(value)
    else:
        raise ValueError(f"{what} {value!r} must be a number or a range like 2..4")
    for v in (lo, hi):
        if v is not None and (v < 0 or v > limit):
            raise ValueError(f"{what} {value!r} is out of range (0..{limit})")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{what} range {value!r} is empty ({lo} > {hi})")
    return Range(lo, hi)


def parse_size_gb(text: str) -> float:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size like 80GB")
    value, unit = float(m.group(1)), (m.group(2) or "GB").upper()
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large")
    return value * {"MB": 1 / 1024, "GB": 1, "TB": 1024}[unit]


def parse_size_range(value: Any, what: str = "memory") -> Range:
    if (dumped := _dumped(value)) is not None:
        return dumped
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size like 80GB")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what} {value!r} must be a size like 80GB (a number of GB >= 0)")
        return Range(float(value), None)
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a size like 80GB or a range like 24GB..80GB")
    if ".." in value:
        a, b = value.split("..", 1)
        r = Range(parse_size_gb(a) if a.strip() else None, parse_size_gb(b) if b.strip() else None)
        if r.min is not None and r.max is not None and r.min > r.max:
            raise ValueError(f"{what} range {value!r} is empty")
        return r
    return Range(parse_size_gb(value), None)  # "80GB" means at least 80GB


def _is_size(token: str) -> bool:
    return bool(re.fullmatch(r"[\d.]*\s*(MB|GB|TB)\s*(\.\.\s*([\d.]+\s*(MB|GB|TB))?)?|\.\.[\d.]+\s*(MB|GB|TB)",
                             token.strip(), re.I))


class GPUSpec(CoreModel):
    """Which GPUs a run needs. `count` defaults to 1 when a model or vendor is named."""

    name: list[str] | None = Field(None, description="Accepted models, e.g. [H100, A100].")
    vendor: str | None = Field(None, description="nvidia, amd, intel (gaudi) or tenstorrent.")
    count: Range = Field(Range(1, 1), description="Number of GPUs or a range, e.g. 2..4.")
    memory: Range | None = Field(None, description="Memory per GPU, e.g. 80GB or 40GB..")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, (int, bool)):
            return {"count": parse_count(v)}
        if isinstance(v, str):
            return _parse_gpu_string(v)
        if isinstance(v, dict):
            v = dict(v)
            if "count" in v and not isinstance(v["count"], Range):
                v["count"] = parse_count(v["count"])
            if "memory" in v and v["memory"] is not None and not isinstance(v["memory"], Range):
                v["memory"] = parse_size_range(v["memory"])
            if isinstance(v.get("name"), str):
                v["name"] = [n.strip() for n in v["name"].split(",") if n.strip()]
        return v

    @field_validator("vendor")
    @classmethod
    def _vendor(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.lower() not in VENDORS:
            raise ValueError(f"unknown GPU vendor {v!r} (nvidia, amd, intel, tenstorrent)")
        return VENDORS[v.lower()]

    def describe(self) -> str:
        what = ",".join(self.name) if self.name else (self.vendor.upper() if self.vendor else "GPU")
        mem = f" ({self.memory} GB)" if self.memory else ""
        return f"{self.count} {what}{mem}"


def _parse_gpu_string(text: str) -> dict:
    out: dict[str, Any] = {}
    for token in [t.strip() for t in text.split(":")]:
        if not token:
            raise ValueError(f"GPU spec {text!r} has an empty part")
        if re.fullmatch(r"\d+|\d*\.\.\d*", token):
            if "count" in out:
                raise ValueError(f"GPU spec {text!r} gives the count twice")
            out["count"] = parse_count(token)
        elif _is_size(token):
            if "memory" in out:
                raise ValueError(f"GPU spec {text!r} gives the memory twice")
            out["memory"] = parse_size_range(token)
        elif token.lower() in VENDORS:
            out["vendor"] = VENDORS[token.lower()]
        elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.,-]*", token):
            if "name" in out:
                raise ValueError(f"GPU spec {text!r}: {token!r} is not a count, a size (80GB) or a vendor, "
                                 f"and the model was already given ({','.join(out['name'])})")
            out["name"] = [n for n in token.split(",") if n]
        else:
            raise ValueError(f"GPU spec {text!r}: cannot read {token!r} (e.g. H100:80GB:4, 2..4, amd:2)")
    return out


class ResourcesSpec(CoreModel):
    gpu: GPUSpec | None = Field(None, description="GPUs: 4, 2..4, H100:4, H100:80GB:4, amd:2, {name, count}.")
    cpu: Annotated[Range | None, BeforeValidator(lambda v: v if v is None or isinstance(v, Range)
                                                 else parse_count(v, "cpu", 4096))] = Field(
        None, description="CPU cores, e.g. 8 or 4..")
    memory: Annotated[Range | None, BeforeValidator(lambda v: v if v is None or isinstance(v, Range)
                                                    else parse_size_range(v))] = Field(
        None, description="Memory, e.g. 64GB or 32GB..")
    disk: Annotated[Range | None, BeforeValidator(lambda v: v if v is None or isinstance(v, Range)
                                                  else parse_size_range(v, "disk"))] = Field(
        None, description="Disk, e.g. 100GB..")
    shm_size: str | None = Field(None, description="Shared memory size, e.g. 16GB.")


def _port(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("a port must be a number")
    if isinstance(v, str) and re.fullmatch(r"\d{1,5}(:\d{1,5})?", v):
        numbers = [int(p) for p in v.split(":")]
    elif isinstance(v, int):
        numbers = [v]
    else:
        raise ValueError(f"{v!r} is not a port (8000) or a mapping (8080:8000)")
    if not all(1 <= n <= 65535 for n in numbers):
        raise ValueError(f"{v!r}: a port must be between 1 and 65535")
    return v


Port = Annotated[int | str, BeforeValidator(_port)]


def _scalar_text(v: Any) -> Any:
    """A command YAML read as a scalar (`true`, `3`) is still the command the user wrote."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return str(v)
    return v


def parse_duration(value: Any, what: str = "") -> float:
    """Seconds from dstack's duration forms: a number of seconds (`90`, also as a string) or one number
    and one unit, `s`, `m`, `h`, `d` or `w` (`90s`, `30m`, `2h`, `1d`, `1w`; a space may come between).
    As dstack's parser: no combined forms (`1h30m`), no fractions in strings (`1.5h`), lower-case units."""
    what = f"{what} " if what else ""
    if isinstance(value, bool):
        raise ValueError(f"{what}must be a duration: {_DURATION_FORMS}, not {str(value).lower()}")
    if isinstance(value, (int, float)):
        number, unit = value, "s"
    elif isinstance(value, str) and re.fullmatch(r"[+-]?\d{1,20}", value.strip()):
        number, unit = int(value), "s"
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())) and len(m.group(1)) <= 20:
        number, unit = int(m.group(1)), m.group(2)
    else:
        raise ValueError(f"{what}{str(value)[:40]!r} is not a duration: {_DURATION_FORMS}")
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds):
        raise ValueError(f"{what}must be a finite number of seconds")
    return seconds


def _max_duration(value: Any) -> float | None:
    if value is None or value is True or value is False or value == "off":
        return None  # true: dstack's default (off for every run type); false (YAML's `off`) or "off": no limit
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be more than 0 seconds (got {value!r}; `off` for no limit)")
    return seconds


def _stop_duration(value: Any) -> float | None:
    if value is None or value is True:
        return None  # the default grace (STOP_DURATION_DEFAULT)
    if value is False or value == "off":
        return math.inf  # wait for the run to stop by itself, however long it takes
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError(f"must be 0 seconds or more (got {value!r}; `off` to wait forever)")
    return seconds


def _retry_duration(value: Any) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be more than 0 seconds (got {value!r})")
    return seconds


def _priority(value: Any) -> Any:
    if value is None:
        return RUN_PRIORITY_DEFAULT  # dstack accepts `priority: null` for its default
    if isinstance(value, bool):
        raise ValueError(f"must be a number from {RUN_PRIORITY_MIN} to {RUN_PRIORITY_MAX}, "
                         f"not {str(value).lower()}")
    if isinstance(value, int) and not RUN_PRIORITY_MIN <= value <= RUN_PRIORITY_MAX:
        raise ValueError(f"must be a number from {RUN_PRIORITY_MIN} to {RUN_PRIORITY_MAX} (got {value})")
    return value


class RetryEvent(StrEnum):
    """dstack's retry events."""

    NO_CAPACITY = "no-capacity"
    INTERRUPTION = "interruption"
    ERROR = "error"


class RetrySpec(CoreModel):
    """`retry:` as a mapping (dstack's ProfileRetry)."""

    on_events: list[RetryEvent] | None = Field(
        None, description="Events to retry on: no-capacity, interruption, error. Omitted: all three (as dstack).")
    duration: Annotated[float | None, BeforeValidator(_retry_duration)] = Field(
        None, description="How long to retry, in seconds (dstack's forms: 3600, 30m, 1h, 1d, 1w); for "
                          "no-capacity counted from submission. Omitted: 1h (dstack's default).")

    @field_validator("on_events")
    @classmethod
    def _events(cls, v: list[RetryEvent] | None) -> list[RetryEvent] | None:
        if v is not None and not v:
            raise ValueError("cannot be empty (omit it to retry on every event)")
        return v


@dataclass(frozen=True)
class RetryPolicy:
    """What `retry:` means for gpufleet (see `_Run.retry`).

    queue: wait for capacity when there is none now (False: refused at once).
    on_events: the events retried on (no-capacity, interruption, error).
    duration: seconds to keep retrying (for no-capacity: from submission); None: no bound."""

    queue: bool
    on_events: frozenset[RetryEvent]
    duration: float | None


def _retry_member(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (dict, RetrySpec)):
        return "dict"  # "dict" and "bool" are dropped from error locations by the config loader
    return None


Retry = Annotated[
    Annotated[RetrySpec, Tag("dict")] | Annotated[StrictBool, Tag("bool")],
    Discriminator(_retry_member, custom_error_type="retry_type",
                  custom_error_message="must be true, false or a mapping {on_events, duration}"),
]


class _Run(CoreModel):
    name: Name = Field(None, description="Run name (default: the file name).")
    image: str = Field(description="Container image, e.g. localhost/gpufleet-lab:latest.")
    commands: list[Annotated[str, BeforeValidator(_scalar_text)]] = Field(
        [], description="Shell commands, run in order in the container.")
    env: Env = Field(
        None, description="Environment: a mapping or KEY=VALUE list. A name without a value (`- HF_TOKEN`) "
                          "is a secret: its value comes from the environment of `gpufleet apply` and is "
                          "never stored, logged or shown.")
    resources: ResourcesSpec = Field(ResourcesSpec(), description="What the run needs.")
    ports: list[Port] = Field([], description="Ports to forward with `gpufleet attach` (8000 or 8080:8000).")
    fleets: list[str] | None = Field(None, description="Only place the run on these fleets.")
    volumes: list[str] = Field([], description="Host paths bound into the container: /host/path:/path[:ro].")
    working_dir: str | None = Field(None, description="Working directory in the container.")
    privileged: StrictBool = Field(
        False, description="dstack's `privileged`: run the container privileged (every capability, every "
                           "device): root on the host. Allowed only where the fleet's `policy.privileged` "
                           "says so.")
    docker: StrictBool = Field(
        False, description="dstack's `docker`: Docker inside the container. gpufleet runs it privileged (a "
                           "Docker daemon needs it), so it needs the fleet's `policy.privileged`; the image "
                           "brings the daemon (e.g. dstackai/dind, started in `commands`).")
    network: Literal["host"] | None = Field(
        None, description="gpufleet's extension (dstack decides this itself): `host` runs a single-node run on "
                          "the host's network (needs the fleet's `policy.host_network`). Omitted: a single-node "
                          "run gets its own network namespace, its `ports` (and a service's `port`) published "
                          "on the host's 127.0.0.1 for `gpufleet attach`. Multi-node runs always use the "
                          "host's network (NCCL between hosts needs it).")
    priority: Annotated[int, BeforeValidator(_priority)] = Field(
        RUN_PRIORITY_DEFAULT, ge=RUN_PRIORITY_MIN, le=RUN_PRIORITY_MAX,
        description=f"Priority from {RUN_PRIORITY_MIN} to {RUN_PRIORITY_MAX}; higher runs are started first. "
                    f"Default {RUN_PRIORITY_DEFAULT}, the middle (dstack's default is 0).")
    max_duration: Annotated[float | None, BeforeValidator(_max_duration)] = Field(
        None, description="The longest the run may run, in seconds, then it is stopped: a number of seconds or "
                          "dstack's forms (90s, 30m, 2h, 1d, 1w); `off` or omitted: no limit (stored as null). "
                          "Must be more than 0.")
    stop_duration: Annotated[float | None, BeforeValidator(_stop_duration)] = Field(
        None, description="Grace period when the run is stopped, in seconds: how long its processes have "
                          "after SIGTERM before they are killed (dstack's forms: 0, 90s, 5m, 1h). Omitted "
                          "(null): dstack's default, 5m (see `stop_timeout`). `off`: wait however long it "
                          "takes, stored as infinity (written `off` in JSON).")
    retry: Retry | None = Field(
        None, description="dstack's retry policy: `true` (retry on no-capacity, interruption and error for "
                          "1h), `false`, or {on_events: [no-capacity, interruption, error], duration: 1h} "
                          "(omitted on_events: all three; omitted duration: 1h). A run waits for capacity "
                          "when `retry` lists no-capacity (or is true) for that duration, and is refused at "
                          "once when it is `false` or leaves no-capacity out. Unlike dstack (whose default "
                          "is `false`), a run without `retry` waits for capacity with no time bound. "
                          "See `retry_policy`.")

    @field_serializer("stop_duration", when_used="json")
    def _stop_duration_json(self, v: float | None) -> float | str | None:
        return "off" if v == math.inf else v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not _IMAGE_RE.match(v) or len(v) > 255:
            raise ValueError(f"{v!r} is not an image reference (no leading '-', spaces or shell characters)")
        return v

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, v: list[str]) -> list[str]:
        for item in v:
            parts = item.split(":")
            if len(parts) not in (2, 3) or not all(p.startswith("/") for p in parts[:2]) or \
                    (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ValueError(f"{item!r} must be /host/path:/container/path or /host/path:/path:ro")
            if "," in item:
                raise ValueError(f"{item!r}: paths may not contain ','")
        return v

    @property
    def runs_privileged(self) -> bool:
        """The container runs privileged: `privileged: true`, or `docker: true` (a daemon inside needs it)."""
        return self.privileged or self.docker

    @property
    def host_network(self) -> bool:
        """The container uses the host's network: `network: host`, or a multi-node task (always)."""
        return self.network == "host" or getattr(self, "nodes", 1) > 1

    @property
    def env_dict(self) -> dict[str, str]:
        """The variables given with a value (secrets, given without one, are not here)."""
        return split_env(self.env)[0]

    @property
    def stop_timeout(self) -> float:
        """Seconds of grace when the run is stopped: `stop_duration`, or STOP_DURATION_DEFAULT (5m, dstack's
        default) when not set; math.inf for `off` (wait however long it takes)."""
        return STOP_DURATION_DEFAULT if self.stop_duration is None else self.stop_duration

    @property
    def retry_policy(self) -> RetryPolicy:
        """`retry` as gpufleet applies it: no `retry` queues for capacity with no time bound (dstack
        would not retry); `true` and a mapping mean what dstack makes of them (every event when
        on_events is omitted, 1h when duration is); `false` never waits."""
        if self.retry is None:
            return RetryPolicy(queue=True, on_events=frozenset({RetryEvent.NO_CAPACITY}), duration=None)
        if self.retry is False:
            return RetryPolicy(queue=False, on_events=frozenset(), duration=None)
        spec = RetrySpec() if self.retry is True else self.retry
        events = frozenset(spec.on_events or RetryEvent)
        return RetryPolicy(queue=RetryEvent.NO_CAPACITY in events, on_events=events,
                           duration=RETRY_DURATION_DEFAULT if spec.duration is None else spec.duration)



class TaskConfig(_Run):
    """A batch job: runs its commands and ends."""

    type: Literal["task"]
    nodes: int = Field(1, ge=1, le=1024, description="Number of hosts, one container on each "
                                                     "(needs a `placement: cluster` fleet).")


class ServiceConfig(_Run):
    """A long-running server listening on `port`."""

    type: Literal["service"]
    port: Port = Field(description="The port the service listens on.")


class DevEnvironmentConfig(_Run):
    """A long-running container for interactive work (`gpufleet attach`)."""

    type: Literal["dev-environment"]
    ide: str | None = Field(None, description="Accepted for dstack compatibility; gpufleet opens a shell.")


RunConfigType = TaskConfig | ServiceConfig | DevEnvironmentConfig
RunConfig = Annotated[RunConfigType, Field(discriminator="type")]
RUN_CONFIG = TypeAdapter(RunConfig)


class RunRequest(CoreModel):
    """A run configuration as submitted: its name, file, config, and its secrets' values."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str
    config: RunConfigType
    # the values of the run's secret env names, from this process's environment: never stored
    secrets: dict[str, str] = Field(default_factory=dict, repr=False, exclude=True)

    @property
    def type(self) -> RunType:
        return RunType(self.config.type)

    @property
    def nodes(self) -> int:
        return getattr(self.config, "nodes", 1)
