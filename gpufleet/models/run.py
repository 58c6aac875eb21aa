"""Runs: `type: task`, `service` and `dev-environment` (dstack-compatible fields) and what they ask for.

`resources` takes every form of dstack's (its core/models/resources.py) with dstack's meaning: a
single count or size is exact (`gpu: 24GB` is 24 GB GPUs), `a..b` a range; see the comment above
parse_count. GPU requests: `4`, `2..4`, `H100:4`, `H100:80GB:4`, `A100,H100:2`, `amd:2`, `24GB..:1`,
`16GB..32`, or a mapping {name, count, memory, total_memory, vendor}. A CPU architecture (`x86:2`) is
matched against the probe's; what gpufleet cannot check (a compute capability) is refused at load,
never accepted and ignored. `shm_size` is the container's /dev/shm; `disk`: see ResourcesSpec.disk.

`volumes`: dstack's instance volumes, as a string (`/host/path:/path`, gpufleet adds `:ro`) or a
mapping {instance_path, path, optional} (gpufleet adds read_only), both read into one `Volume`;
dstack's network volumes (a name instead of a host path) are refused. Container options, with
dstack's meaning: `user`, `entrypoint` (not for dev environments), `shell`, and `init` (dev
environments).

Queueing fields, with dstack's meaning unless a field's description says otherwise: `priority`,
`max_duration`, `stop_duration` (durations in dstack's forms: `90`, `90s`, `30m`, `2h`, `1d`, `1w`,
`off`; stored as seconds) and `retry` (`true`, `false` or {on_events, duration}; read through
`retry_policy`).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import shlex
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from gpufleet.models.core import CoreModel, Range
from gpufleet.models.cron import next_start, parse_cron
from gpufleet.models.env import Env, split_env
from gpufleet.models.fleet import Name
from gpufleet.models.images import PythonVersion


class RunType(StrEnum):
    """dstack's run configuration types (`type:`)."""

    TASK = "task"
    SERVICE = "service"
    DEV_ENVIRONMENT = "dev-environment"


# dstack's vendors (gpuhunt's AcceleratorVendor, `tt` and `tpu` as dstack reads them) and gpufleet's
# `gaudi`/`habana` for intel (in dstack these two would be GPU names)
VENDORS = {"nvidia": "nvidia", "amd": "amd", "intel": "intel", "gaudi": "intel", "habana": "intel",
           "tenstorrent": "tenstorrent", "tt": "tenstorrent", "google": "google", "tpu": "google"}
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(MB|GB|TB)?$", re.I)
_MAX_GPUS = 1024

SSHD_PORT = 10022  # a dev environment's sshd in its container (dstack's container sshd port too); see devssh
RUN_PRIORITY_MIN, RUN_PRIORITY_MAX = 0, 100
RUN_PRIORITY_DEFAULT = 50  # the scheduler's PRIORITY_DEFAULT; dstack's default is 0
STOP_DURATION_DEFAULT = 300.0  # dstack's DEFAULT_STOP_DURATION (5m)
RETRY_DURATION_DEFAULT = 3600.0  # dstack's DEFAULT_RETRY_DURATION (1h), for `retry: true` or no `duration`
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 24 * 3600, "w": 7 * 24 * 3600}
_DURATION_RE = re.compile(r"(\d+) *([smhdw])")
_DURATION_FORMS = "seconds (90) or a number and one unit s, m, h, d or w (90s, 30m, 2h, 1d, 1w)"


# How dstack reads `resources` (dstack's core/models/resources.py, checked at dstack 511c318c8), and
# what gpufleet makes of it. dstack's `Range` reads a single value as exact (min = max) and `a..b`,
# `a..`, `..b` or {min, max} as a range; every count and size below is such a range:
#   cpu        `8` exactly 8 CPUs; `4..`, `..64`, {min, max}; `x86:8`, `8..:arm`, {arch, count}: CPUSpec
#   memory     `32GB` exactly 32 GB (a bare number is GB; MB, GB, TB in any case, spaces allowed);
#              `200GB..`, `512..1TB`, {min, max}
#   gpu.count  `2` exactly 2; `1..8`; {min, max}; not given but a GPU is named or sized: 1.. (dstack's
#              DEFAULT_GPU_COUNT)
#   gpu.memory, gpu.total_memory  `24GB` exactly 24 GB per GPU (in total); `16GB..32` (16 to 32 GB)
#   gpu.compute_capability  a minimum (`7.5`) in dstack; gpufleet cannot check it yet (see GPUSpec)
#   disk       `100GB` exactly, `100GB..`, {size: ...}: the minimum is matched against the host's storage,
#              the maximum is the container's limit (see ResourcesSpec.disk); shm_size: a size
# gpufleet gives a run whole blocks: a count or size decides how many blocks it needs (its minimum),
# and where the blocks hold more than its maximum the placement says so (allocator.place's note), as
# for GPUs. GPU memory per GPU is a property of the GPU itself and is matched as dstack matches it.


def _range_mapping(value: Any, one: Any, what: str) -> Range | None:
    """A {min, max} mapping (dstack's form, and how a stored run's config is written back), each side
    read by ``one``; None if ``value`` is not one."""
    if not isinstance(value, dict) or not set(value) <= {"min", "max"}:
        return None
    lo, hi = (None if value.get(k) is None else one(value[k]) for k in ("min", "max"))
    if lo is None and hi is None:
        raise ValueError(f"{what} {{min, max}} needs min or max (or both)")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{what} range {lo:g}..{hi:g} is empty (min > max)")
    return Range(lo, hi)


def _count_one(value: Any, what: str, limit: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a stored run's config, read back from JSON (its ranges hold floats)
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise ValueError(f"{what} {value!r} must be a whole number")
    n = int(value)
    if n < 0 or n > limit:
        raise ValueError(f"{what} {value!r} is out of range (0..{limit})")
    return n


def parse_count(value: Any, what: str = "count", limit: int = _MAX_GPUS) -> Range:
    """dstack's Range[int]: `4` is exactly 4; `2..4`, `2..`, `..4`, {min, max}."""
    if isinstance(value, Range):
        return value
    if (mapping := _range_mapping(value, lambda v: _count_one(v, what, limit), what)) is not None:
        return mapping
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number or a range like 2..4, not {str(value).lower()}")
    if isinstance(value, int):
        lo = hi = _count_one(value, what, limit)
    elif isinstance(value, str) and re.fullmatch(r"\d*\.\.\d*", value.replace(" ", "")) and \
            value.replace(" ", "") != "..":
        a, b = value.replace(" ", "").split("..")
        lo, hi = (_count_one(a, what, limit) if a else None), (_count_one(b, what, limit) if b else None)
    elif isinstance(value, str) and value.strip().isdigit():
        lo = hi = _count_one(value.strip(), what, limit)
    else:
        raise ValueError(f"{what} {value!r} must be a number or a range like 2..4")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{what} range {value!r} is empty ({lo} > {hi})")
    return Range(lo, hi)


def parse_size_gb(text: Any, what: str = "size") -> float:
    """dstack's Memory: a number is GB; `512MB`, `80GB`, `2TB` (any case, spaces allowed)."""
    if isinstance(text, bool):
        raise ValueError(f"{what} must be a size like 80GB, not {str(text).lower()}")
    if isinstance(text, (int, float)):
        value = float(text)
        if not math.isfinite(value) or value < 0:  # YAML's .nan, .inf, -1
            raise ValueError(f"{what} {text!r} must be a size like 80GB (a number of GB >= 0)")
    else:
        m = _SIZE_RE.match(str(text).replace(" ", ""))
        if not m:
            raise ValueError(f"{what} {text!r} is not a size like 80GB")
        value = float(m.group(1)) * {"MB": 1 / 1024, "GB": 1, "TB": 1024}[(m.group(2) or "GB").upper()]
    if not math.isfinite(value):
        raise ValueError(f"{what} {str(text)[:40]!r} is too large")
    if value < 0:
        raise ValueError(f"{what} {text!r} must be a size like 80GB (a number of GB >= 0)")
    return value


def parse_size_range(value: Any, what: str = "memory") -> Range:
    """dstack's Range[Memory]: `80GB` (or 80) is exactly 80 GB; `24GB..`, `16GB..32`, `..80GB`,
    {min, max}."""
    if isinstance(value, Range):
        return value
    if (mapping := _range_mapping(value, lambda v: parse_size_gb(v, what), what)) is not None:
        return mapping
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        text = value.replace(" ", "") if isinstance(value, str) else value
        if isinstance(text, str) and ".." in text:
            a, b = text.split("..", 1)
            if not a and not b:
                raise ValueError(f"{what} range '..' is empty: give a minimum, a maximum or both")
            r = Range(parse_size_gb(a, what) if a else None, parse_size_gb(b, what) if b else None)
            if r.min is not None and r.max is not None and r.min > r.max:
                raise ValueError(f"{what} range {value!r} is empty (min > max)")
            return r
        size = parse_size_gb(text, what)
        return Range(size, size)  # a single size is exact, as in dstack
    raise ValueError(f"{what} must be a size like 80GB, a range like 24GB..80GB or {{min, max}}")


def _disk(value: Any) -> Range | None:
    """`disk`: dstack's DiskSpec: a size, a range or {size: ...}, read as dstack reads it (a single size is
    exact: min = max). What gpufleet makes of it: see ResourcesSpec.disk."""
    if value is None or isinstance(value, Range):
        return value
    if isinstance(value, dict) and set(value) == {"size"}:
        value = value["size"]
    return parse_size_range(value, "disk")


def _shm_size(value: Any) -> str | None:
    """`shm_size`: dstack's Memory (`16GB`, `512MB`, a number of GB), kept as written; a number is
    written `16GB`. Checked to be at least 1 MB (the runtime's smallest /dev/shm)."""
    if value is None:
        return None
    if parse_size_gb(value, "shm_size") * 1024 < 1:
        raise ValueError(f"shm_size {value!r} is less than 1MB")
    return f"{value:g}GB" if isinstance(value, (int, float)) else value


CPU_ARCHS = ("x86", "arm")  # dstack's (gpuhunt's) CPUArchitecture, any case


def _cpu(value: Any) -> Any:
    """`cpu`, dstack's CPUSpec: a count (`8` exactly 8, `4..`, {min, max}), `ARCH:COUNT` in either order
    (`x86:2`, `2..:ARM`, `arm`) or {arch, count}; read into CPUSpec (arch in lower case, or None)."""
    if value is None or isinstance(value, (Range, CPUSpec)):
        return value
    arch = None
    if isinstance(value, dict) and not set(value) <= {"min", "max"}:
        unknown = set(value) - {"arch", "count"}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}: cpu takes arch and count")
        arch, value = value.get("arch"), value.get("count", "2..")  # dstack's DEFAULT_CPU_COUNT
        if arch is not None and (not isinstance(arch, str) or arch.lower() not in CPU_ARCHS):
            raise ValueError(f"arch {arch!r} is not a CPU architecture (x86 or arm)")
        value = "2.." if value is None else value
    elif isinstance(value, str) and (":" in value or value.strip().lower() in CPU_ARCHS):
        tokens, value = value.replace(" ", "").split(":"), None
        for token in tokens:
            if not token:
                raise ValueError("cpu has an empty part (write x86:8 or 8..:arm)")
            if ".." in token or token.isdigit():
                if value is not None:
                    raise ValueError("cpu gives the count twice")
                value = token
            elif token.lower() in CPU_ARCHS:
                if arch is not None:
                    raise ValueError("cpu gives the architecture twice")
                arch = token
            else:
                raise ValueError(f"{token!r} is neither a CPU count nor an architecture (x86, arm)")
        value = "2.." if value is None else value
    count = parse_count(value, "cpu", 4096)
    return count if arch is None else CPUSpec(arch=arch.lower(), count=count)


class CPUSpec(CoreModel):
    """dstack's CPUSpec with an architecture: `x86:8`, `2..:arm`, {arch, count}. A run is placed only on
    hosts whose probe reported that architecture (a host probed before gpufleet reported it: not matched)."""

    arch: Literal["x86", "arm"] = Field(description="x86 or arm (dstack's names; x86_64 and aarch64 hosts).")
    count: Range = Field(Range(2, None), description="Number of CPUs, as a count without an architecture.")

    def __str__(self) -> str:
        return f"{self.arch}:{self.count}"


class GPUSpec(CoreModel):
    """Which GPUs a run needs, dstack's GPUSpec. `count` defaults to 1.. (dstack's default) when the
    spec names a model, vendor or size but no count."""

    name: list[str] | None = Field(None, description="Accepted models, e.g. [H100, A100].")
    vendor: str | None = Field(None, description="nvidia, amd, intel (gaudi), tenstorrent (tt) or google (tpu).")
    count: Range = Field(Range(1, None), description="Number of GPUs: 2 (exactly), 2..4, 2.., {min, max}.")
    memory: Range | None = Field(None, description="Memory per GPU: 80GB (exactly), 40GB.., 16GB..32GB, {min, max}.")
    total_memory: Range | None = Field(None, description="Memory of all the run's GPUs together: 160GB "
                                                         "(exactly), 160GB.., {min, max}.")
    compute_capability: None = Field(None, description="dstack's minimum compute capability (7.5): refused, "
                                                       "gpufleet cannot check it yet.")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, (int, bool)):
            return {"count": parse_count(v)}
        if isinstance(v, str):
            return _parse_gpu_string(v)
        if isinstance(v, dict):
            v = dict(v)
            if "count" in v and v["count"] is not None:
                v["count"] = parse_count(v["count"])
            for key in ("memory", "total_memory"):
                if v.get(key) is not None:
                    v[key] = parse_size_range(v[key], key)
            if isinstance(v.get("name"), str):
                v["name"] = [n.strip() for n in v["name"].split(",") if n.strip()]
            if isinstance(v.get("name"), list):  # dstack drops the deprecated `tpu-` prefix
                v["name"] = [n[4:] if isinstance(n, str) and n.startswith("tpu-") else n for n in v["name"]]
        return v

    @field_validator("compute_capability", mode="before")
    @classmethod
    def _compute_capability(cls, v: Any) -> None:
        if v is not None:
            raise ValueError(f"{v!r}: gpufleet cannot check a GPU's compute capability yet (its probe does not "
                             f"report it); remove it and name the GPUs instead (name: [H100, A100])")
        return None

    @field_validator("name")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not _NAME_RE.fullmatch(n) for n in v)):
            raise ValueError(f"{v!r}: GPU names start with a letter (H100, MI300X, n150)")
        return v

    @field_validator("vendor")
    @classmethod
    def _vendor(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.lower() not in VENDORS:
            raise ValueError(f"unknown GPU vendor {v!r} (nvidia, amd, intel, tenstorrent, google)")
        return VENDORS[v.lower()]

    def describe(self) -> str:
        what = ",".join(self.name) if self.name else (self.vendor.upper() if self.vendor else "GPU")
        mem = f" ({self.memory} GB)" if self.memory else ""
        total = f" ({self.total_memory} GB in total)" if self.total_memory else ""
        return f"{self.count} {what}{mem}{total}"


_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]*")


def _parse_gpu_string(text: str) -> dict:
    """dstack's GPU shorthand: `:`-separated parts in any order, spaces dropped; each part is a vendor
    (nvidia, amd, intel, tenstorrent/tt, google/tpu; gpufleet adds gaudi/habana for intel), else a
    model list if it starts with a letter (`A100,H100`), else a GPU memory if it has a letter (a unit:
    `24GB`, `16GB..32`), else a count (`4`, `1..8`)."""
    out: dict[str, Any] = {}
    for token in text.replace(" ", "").split(":"):
        if not token:
            raise ValueError(f"GPU spec {text!r} has an empty part")
        if token.lower() in VENDORS:
            key, value = "vendor", VENDORS[token.lower()]
        elif token[0].isalpha():
            key, value = "name", token.split(",")
            if any(not n for n in value):
                raise ValueError(f"GPU spec {text!r} has an empty model name")
            if not all(_NAME_RE.fullmatch(n) for n in value):
                raise ValueError(f"GPU spec {text!r}: cannot read {token!r} (e.g. H100:80GB:4, 2..4, amd:2)")
        elif any(c.isalpha() for c in token):
            try:
                key, value = "memory", parse_size_range(token, "GPU memory")
            except ValueError as e:
                raise ValueError(f"GPU spec {text!r}: cannot read {token!r} ({e})") from None
        elif re.fullmatch(r"\d+|\d*\.\.\d*", token):
            key, value = "count", parse_count(token)
        else:
            raise ValueError(f"GPU spec {text!r}: cannot read {token!r} (e.g. H100:80GB:4, 2..4, amd:2)")
        if key == "name" and "name" in out:
            raise ValueError(f"GPU spec {text!r}: {token!r} is not a count, a size (80GB) or a vendor, "
                             f"and the model was already given ({','.join(out['name'])})")
        if key in out:
            raise ValueError(f"GPU spec {text!r} gives the {key} twice")
        out[key] = value
    return out


class ResourcesSpec(CoreModel):
    gpu: GPUSpec | None = Field(None, description="GPUs: 4, 2..4, H100:4, H100:80GB:4, 24GB, amd:2, "
                                                  "{name, count, memory, total_memory, vendor}.")
    cpu: Annotated[Range | CPUSpec | None, BeforeValidator(_cpu)] = Field(
        None, description="CPU cores: 8 (exactly), 4.., {min, max}; with an architecture (dstack's forms x86:8, "
                          "2..:arm, {arch, count}) only hosts whose probe reported it (x86_64: x86, aarch64: arm).")
    memory: Annotated[Range | None, BeforeValidator(lambda v: v if v is None else parse_size_range(v))] = Field(
        None, description="Memory: 64GB (exactly), 32GB.., {min, max}.")
    disk: Annotated[Range | None, BeforeValidator(_disk)] = Field(
        None, description="Disk (dstack's DiskSpec: 100GB exactly, 100GB.., 100GB..200GB, {size: ...}). Its minimum: "
                          "the host's container storage (the file system of the runtime's storage root) must be "
                          "at least that big. Its maximum (a single size is one): the container's writable layer "
                          "is limited to it (the runtime's --storage-opt size=), only on hosts whose storage can "
                          "(overlay on xfs with project quotas); elsewhere the run is refused at plan time, the "
                          "host and the reason named.")
    shm_size: Annotated[str | None, BeforeValidator(_shm_size)] = Field(
        None, description="The size of the container's /dev/shm (dstack's shm_size: 16GB, 512MB, a number is GB); "
                          "omitted: the runtime's default, 64MB (as in dstack).")

    @property
    def cpu_count(self) -> Range | None:
        """The CPU count asked for, with or without an architecture."""
        return self.cpu.count if isinstance(self.cpu, CPUSpec) else self.cpu

    @property
    def cpu_arch(self) -> str | None:
        """The CPU architecture asked for (x86, arm), or None."""
        return self.cpu.arch if isinstance(self.cpu, CPUSpec) else None

    @property
    def shm_size_mib(self) -> int | None:
        """shm_size in MiB (what the runtime's --shm-size gets), or None."""
        return None if self.shm_size is None else max(1, round(parse_size_gb(self.shm_size) * 1024))

    @property
    def disk_limit_mib(self) -> int | None:
        """The limit of the container's writable layer in MiB (disk's maximum), or None: no limit."""
        if self.disk is None or self.disk.max is None:
            return None
        return max(1, round(self.disk.max * 1024))


_PORT_FORMS = "8000, 8080:8000, *:8000 or {container_port, local_port}"


def _port(v: Any) -> Any:
    """dstack's port forms (its PortMapping): `8000` (local and container port 8000), `8080:8000` (local
    8080, container 8000), `*:8000` (a local port `gpufleet attach` picks) and {container_port, local_port}
    (local_port omitted or null: picked). Kept as written; the mapping is written as one of the strings."""
    if isinstance(v, bool):
        raise ValueError("a port must be a number")
    if isinstance(v, dict):
        unknown = set(v) - {"container_port", "local_port"}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}: a port mapping takes container_port and "
                             f"local_port")
        container, local = v.get("container_port"), v.get("local_port")
        if container is None:
            raise ValueError("a port mapping needs container_port")
        for what, n in (("container_port", container), ("local_port", local)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
                raise ValueError(f"{what} {n!r} must be a port number")
        v = f"{'*' if local is None else local}:{container}"
    if isinstance(v, str) and re.fullmatch(r"(\d{1,5}|\*):\d{1,5}|\d{1,5}", v):
        numbers = [int(p) for p in v.split(":") if p != "*"]
    elif isinstance(v, int):
        numbers = [v]
    else:
        raise ValueError(f"{v!r} is not a port: {_PORT_FORMS}")
    if not all(1 <= n <= 65535 for n in numbers):
        raise ValueError(f"{v!r}: a port must be between 1 and 65535")
    return v


def port_pair(port: int | str) -> tuple[int, int]:
    """(local, container) of a port as `ports` keeps it; local 0: `*`, a local port picked at attach."""
    local, _, container = str(port).partition(":")
    return (0 if local == "*" else int(local)), int(container or local)


Port = Annotated[int | str, BeforeValidator(_port)]


_VOLUME_FORMS = "/host/path:/container/path, /host/path:/path:ro or {instance_path, path, optional}"


def _no_bad_characters(text: str, what: str) -> None:
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        raise ValueError(f"{text!r}: {what} may not contain control characters")
    if ":" in text or "," in text:
        raise ValueError(f"{text!r}: {what} may not contain ':' or ','")


def _host_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError(f"{v!r} must be an absolute host path, e.g. /data")
    _no_bad_characters(v, "a host path")
    return v  # `..` and the like: the fleet's policy refuses them (hostpolicy), with the policy named


def _container_path(v: str) -> str:
    if not v.startswith("/"):
        raise ValueError(f"{v!r} must be an absolute path in the container, e.g. /data")
    _no_bad_characters(v, "a container path")
    if ".." in v.split("/"):
        raise ValueError(f"{v!r}: '..' is not allowed in a container path (as in dstack)")
    return v


def _network_volume(name: Any, path: Any) -> ValueError:
    where = path if isinstance(path, str) and path.startswith("/") else "/path"
    return ValueError(f"{name!r} is a dstack network volume (a volume name, not a host path): gpufleet has "
                      f"instance volumes only, host paths bound into the container; write /host/path:{where} "
                      f"or {{instance_path: /host/path, path: {where}}} (a path the fleet's policy.volumes allows)")


class Volume(CoreModel):
    """One volume: a host path bound into the container (dstack's instance volume, InstanceMountPoint).
    Both forms of `volumes` are read into it, so that every check (the fleet's policy, the host's)
    sees one model."""

    instance_path: str = Field(description="The host path (absolute), as written; the fleet's "
                                           "`policy.volumes` decides which may be mounted.")
    path: str = Field(description="The path in the container (absolute, no '..').")
    optional: StrictBool = Field(
        False, description="dstack's `optional`: the run may start without this volume. gpufleet checks the "
                           "host path on the host when the container starts: missing, the volume is left out "
                           "(the start reports it) instead of failing the start.")
    read_only: StrictBool = Field(False, description="gpufleet's extension (the string form's `:ro`): mount it "
                                                     "read-only.")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ValueError(f"{v!r} must be {_VOLUME_FORMS}")
            if parts[0] and "/" not in parts[0]:  # dstack reads `name:/path` as a network volume
                raise _network_volume(parts[0], parts[1])
            _host_path(parts[0])  # here, so that the error names the item, not a field it has no key for
            _container_path(parts[1])
            return {"instance_path": parts[0], "path": parts[1], "read_only": parts[2:] == ["ro"]}
        if isinstance(v, dict) and "name" in v:
            raise _network_volume(v["name"], v.get("path"))
        if not isinstance(v, dict):
            raise ValueError(f"must be {_VOLUME_FORMS}")
        return v

    _instance_path = field_validator("instance_path")(lambda v: _host_path(v))
    _path = field_validator("path")(lambda v: _container_path(v))

    def __str__(self) -> str:
        """The string form: /host/path:/path, with `:ro` when read-only (what the runtime's --volume takes)."""
        return f"{self.instance_path}:{self.path}" + (":ro" if self.read_only else "")


def _user(value: Any) -> Any:
    """dstack's `user`: `name_or_id[:group_name_or_id]` (dstack's UnixUser.parse), ids >= 0."""
    if not isinstance(value, str):
        return value
    parts = value.split(":")
    if len(parts) > 2:
        raise ValueError(f"{value!r} must be USER or USER:GROUP (a name or a number each), e.g. ubuntu, 1000:1000")
    for what, part in zip(("user", "group"), parts, strict=False):
        if not part:
            raise ValueError(f"{value!r}: empty {what} name or id (write USER or USER:GROUP)")
        if not _UNIX_NAME_RE.fullmatch(part):
            raise ValueError(f"{value!r}: {part!r} is not a {what} name or id (letters, digits, '_', '.', '-')")
    return value


_UNIX_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def _shell(value: Any) -> Any:
    """dstack's `shell`: `sh`, `bash` (in /bin) or an absolute path."""
    if not isinstance(value, str):
        return value
    if value in ("sh", "bash"):
        return value
    if not value.startswith("/") or any(ord(c) < 33 or c == "\x7f" for c in value):
        raise ValueError(f"{value!r} must be sh, bash or an absolute path to a shell (e.g. /usr/bin/zsh)")
    return value


def _entrypoint(value: Any) -> Any:
    """dstack's `entrypoint`: a command line, split as a shell would (shlex) but never run by one."""
    if not isinstance(value, str):
        return value
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise ValueError(f"{value!r} cannot be split into words ({e})") from None
    if not words:
        raise ValueError("is empty: give the program to run, e.g. python -u")
    if any("\0" in w for w in words):
        raise ValueError("may not contain a NUL character")
    return value


def _scalar_text(v: Any) -> Any:
    """A command YAML read as a scalar (`true`, `3`) is still the command the user wrote."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, float)):
        return str(v)
    return v


def format_duration(seconds: float) -> str:
    """Seconds as dstack writes a duration: `1d`, `2h`, `30m` when whole, else `90s` (`90.5s`)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


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


def _inactivity_duration(value: Any) -> float | None:
    if value is None or value is True or value is False or value == "off":
        return None  # dstack: `off` (false) and true (its default) are both no limit
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError(f"must be 0 seconds or more (got {value!r}; `off` for no limit)")
    return seconds


def _retry_duration(value: Any) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be more than 0 seconds (got {value!r})")
    return seconds


def _spot_policy(value: Any) -> Any:
    if value == "spot":
        raise ValueError("spot: gpufleet's hosts are SSH fleet hosts, never spot instances (dstack treats them "
                         "as on-demand), so the run could never be placed: remove it, or write auto or on-demand")
    return value


def _priority(value: Any) -> Any:
    if value is None:
        return RUN_PRIORITY_DEFAULT  # dstack accepts `priority: null` for its default
    if isinstance(value, bool):
        raise ValueError(f"must be a number from {RUN_PRIORITY_MIN} to {RUN_PRIORITY_MAX}, "
                         f"not {str(value).lower()}")
    if isinstance(value, int) and not RUN_PRIORITY_MIN <= value <= RUN_PRIORITY_MAX:
        raise ValueError(f"must be a number from {RUN_PRIORITY_MIN} to {RUN_PRIORITY_MAX} (got {value})")
    return value


UTILIZATION_WINDOW_MIN = 300.0  # dstack's minimum time_window (5m)


def _time_window(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds < UTILIZATION_WINDOW_MIN:
        raise ValueError(f"must be at least 5m, as in dstack (got {value!r}): GPUs are sampled every few "
                         f"seconds and a shorter window would stop runs that are only loading data")
    return seconds


class UtilizationPolicy(CoreModel):
    """dstack's `utilization_policy`: stop a run that leaves a GPU idle."""

    min_gpu_utilization: int = Field(
        ge=0, le=100, description="Percent. If any of the run's GPUs stayed below it in every sample of the "
                                  "last `time_window`, the run is stopped (as dstack).")
    time_window: Annotated[float, BeforeValidator(_time_window)] = Field(
        description="Seconds or dstack's forms (5m, 30m, 1h, 1d); at least 5m. A run is judged only once it has "
                    "been sampled for the whole window (from its start, and again after a server restart loses "
                    "nothing: samples are in the database).")


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


# Code upload (dstack's `repos`, `files`, `working_dir`): what gpufleet uploads and where it lands. The
# CLI packs the local paths (gpufleet.upload), the hosts get the archive through the fleet's jump chain
# and the container gets each item bound at its path. dstack's LEGACY_REPO_DIR: where a relative
# `working_dir` is read from (as dstack still does), and gpufleet's working directory for a run that
# uploads code and sets no `working_dir` (dstack 0.20 would use the image's; gpufleet does not read images).
REPO_DIR = "/workflow"
# dstack's remote repos: `gpufleet apply` clones them (gpufleet.upload.clone) on the user's machine, which
# has the network and the user's git credentials; the hosts never clone. The transports git may use.
GIT_PROTOCOLS = ("https", "http", "ssh", "git", "file")
_SCP_URL = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^/\\]")  # git@github.com:org/repo.git


def _repo_url(v: Any) -> Any:
    """dstack's `url`: a URL git clones (https://, http://, ssh://, git://, file://) or git's
    `user@host:path`. No password or token in it: the URL is kept with the run; git's credential
    helper or SSH key gives them. The error never repeats the URL (it may hold one)."""
    if not isinstance(v, str):
        return v
    if not v or v.startswith("-") or any(ord(c) < 33 or c == "\x7f" for c in v):
        raise ValueError("must be a git URL (https://host/org/repo.git, git@host:org/repo.git), with no spaces")
    scheme, sep, rest = v.partition("://")
    if not sep:
        if not _SCP_URL.match(v):
            raise ValueError("must be a git URL (https://host/org/repo.git, git@host:org/repo.git)")
        return v
    if scheme.lower() not in GIT_PROTOCOLS:
        raise ValueError(f"the URL's scheme must be one of {', '.join(GIT_PROTOCOLS)} (got {scheme[:20]!r})")
    userinfo = rest.split("/", 1)[0].rpartition("@")[0]
    if ":" in userinfo or (userinfo and scheme.lower() in ("https", "http")):
        raise ValueError("the URL holds a password or token, which would be kept with the run: remove it and let "
                         "git's credential helper (or an SSH key) give it; `gpufleet apply` clones with your git "
                         "setup")
    return v


def _upload_container_path(v: Any, what: str) -> str:
    """A container path of `repos`/`files`: absolute, relative (to the working directory) or `~/...`."""
    if not isinstance(v, str) or not v:
        raise ValueError(f"{what} must be a path in the container")
    if re.match(r"^[A-Za-z]:[\\/]", v):
        raise ValueError(f"{what} must be a Unix path: {v}")
    if any(ord(c) < 32 or c == "\x7f" for c in v) or ":" in v or "," in v:
        raise ValueError(f"{v!r}: {what} may not contain control characters, ':' or ','")
    if v.startswith("~") and v.split("/")[0] != "~":
        raise ValueError(f"{v!r}: `~username` is not supported (as in dstack): write an absolute path")
    return v


def _split_mapping(v: str, what: str) -> list[str]:
    """dstack's `LOCAL[:PATH]` shorthand split on ':', a Windows drive letter kept with its path."""
    parts = v.split(":")
    if len(parts) > 1 and len(parts[0]) == 1 and parts[0].isalpha() and parts[1][:1] in ("\\", "/"):
        parts = [f"{parts[0]}:{parts[1]}", *parts[2:]]
    if len(parts) > 2:
        raise ValueError(f"invalid {what}: {v!r} (write LOCAL or LOCAL:PATH)")
    return parts


class RepoSpec(CoreModel):
    """One of `repos` (dstack's RepoSpec): a local git repo whose working tree is uploaded, or a remote one
    (`url`) that `gpufleet apply` clones on this machine and uploads the same way."""

    local_path: str | None = Field(
        None, description="The git repo on this machine (relative paths: from the configuration file's directory). "
                          "Its working tree as it is (tracked files with uncommitted changes, untracked files "
                          "that .gitignore does not exclude, less .dstackignore's patterns) is uploaded. Not "
                          "with `url`.")
    url: Annotated[str | None, BeforeValidator(_repo_url)] = Field(
        None, description="dstack's remote repo (https://, ssh://, git@host:org/repo.git; not with `local_path`). "
                          "`gpufleet apply` clones it on this machine (with your git credentials; no prompt, "
                          "a timeout), and uploads its working tree as it uploads a local repo (the hosts need "
                          "no internet). No `.git` folder goes with it; submodules are not cloned.")
    branch: str | None = Field(None, description="With `url`: the branch to clone (default: the remote's default "
                                                 "branch), as dstack's. Not with `local_path` (its working tree is "
                                                 "uploaded as it is).")
    hash: str | None = Field(None, description="With `url`: the commit to check out (a full or short hash; with "
                                               "`branch`, the branch must exist too), as dstack's. Not with "
                                               "`local_path`.")
    path: str = Field(".", description="Where the repo goes in the container; relative paths are from the working "
                                       "directory (dstack's default `.`: the working directory itself).")
    if_exists: Literal["error", "skip"] = Field(
        "error", description="dstack's action when `path` is not empty when the run starts (the image's files, a "
                             "volume's): `skip` leaves it as it is and does not put the repo there (the start "
                             "script copies the repo into `path` when it is missing or empty, before `commands`; "
                             "so `skip` needs `commands` or an `entrypoint`). `error` (the default): gpufleet does "
                             "not check, it mounts the repo over `path` (what the image has there is hidden).")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        parts = v.split(":")
        if len(parts) > 1 and ("@" in parts[0] or parts[1].startswith("//")):  # git@host:x, https://...
            # URL[:PATH], as dstack splits it; a scheme URL's user, password and port are part of the URL
            head, sep, tail = v.partition("://")
            start = v.index(":") + 1 if not sep else len(head) + 3 + (tail.find("/") if "/" in tail else len(tail))
            rest, colon, path = v[start:].partition(":")
            if ":" in path:
                raise ValueError("invalid repo (write URL or URL:PATH)")
            url = v[:start] + rest
            return {"url": url} | ({"path": path} if colon else {})
        parts = _split_mapping(v, "repo")
        return {"local_path": parts[0]} | ({"path": parts[1]} if len(parts) == 2 else {})

    @field_validator("branch", "hash")
    @classmethod
    def _revision(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if info.data.get("local_path"):
            raise ValueError("gpufleet uploads the local working tree as it is: check the branch or commit out "
                             "locally and remove this")
        if not v or v.startswith("-") or any(ord(c) < 33 or c == "\x7f" for c in v):
            raise ValueError(f"{v!r} is not a git {info.field_name}")
        if info.field_name == "hash" and not re.fullmatch(r"[0-9a-fA-F]{4,64}", v):
            raise ValueError(f"{v!r} is not a commit hash (4 to 64 hex digits)")
        return v

    _path = field_validator("path")(lambda v: _upload_container_path(v, "the repo's path"))

    @model_validator(mode="after")
    def _local(self) -> RepoSpec:
        if self.local_path and self.url:
            raise ValueError("give `local_path` or `url`, not both (as in dstack)")
        if not self.local_path and not self.url:
            raise ValueError("give `local_path` (the repo's directory on this machine) or `url`")
        return self


class FileMapping(CoreModel):
    """One of `files` (dstack's FilePathMapping): a local file or directory uploaded to a container path."""

    local_path: str = Field(description="The file or directory on this machine (relative paths: from the "
                                        "configuration file's directory; `~` is your home). A directory's files "
                                        "are uploaded less what .gitignore and .dstackignore exclude.")
    path: str = Field(description="Where it goes in the container; relative paths are from the working directory, "
                                  "`~` is /root.")

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        parts = _split_mapping(v, "file path mapping")
        return {"local_path": parts[0], "path": parts[-1]}

    @field_validator("local_path")
    @classmethod
    def _local(cls, v: str) -> str:
        if not v or any(ord(c) < 32 for c in v):
            raise ValueError("must be a path on this machine")
        return v

    _path = field_validator("path")(lambda v: _upload_container_path(v, "a container path"))


@dataclass(frozen=True)
class Upload:
    """One uploaded item: ``index`` (its folder in the archive), where it comes from (as written) and
    the absolute container path it is bound at."""

    index: int
    kind: Literal["repo", "file"]
    local_path: str
    path: str
    url: str | None = None  # a remote repo, cloned by `gpufleet apply` (local_path is then "")
    branch: str | None = None
    hash: str | None = None
    if_exists: Literal["error", "skip"] = "error"  # a repo's: `skip`: copied into place at start (upload.place_repo)


def _working_dir(value: Any) -> Any:
    if not isinstance(value, str):
        return value  # pydantic says what it should be
    if not value:
        raise ValueError("must be a path in the container")
    if value.startswith("~"):
        raise ValueError(f"{value!r}: write the absolute path (gpufleet does not read the home of the image's user)")
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValueError(f"{value!r} may not contain control characters")
    return value


def _crons(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValueError("must be a cron expression ('15 23 * * *') or a list of them")
    if not value:
        raise ValueError("needs at least one cron expression (as in dstack)")
    return value


def _cron(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a cron expression in quotes, like '15 23 * * *' (got {value!r})")
    parse_cron(value)
    return value


class ScheduleSpec(CoreModel):
    """`schedule:` (dstack's Schedule): when the run starts, in UTC (gpufleet.models.cron)."""

    cron: Annotated[list[Annotated[str, BeforeValidator(_cron)]], BeforeValidator(_crons)] = Field(
        description="A cron expression or a list of them (five fields: minute hour day-of-month "
                                  "month day-of-week, UTC; day of week 0-6 is Monday to Sunday, or mon-sun, as in "
                                  "dstack); the run starts at each time any of them gives.")

    def next_start(self, now: float) -> float:
        """The first time at or after ``now`` (epoch seconds) that the run starts."""
        found = next_start(self.cron, now)
        assert found is not None  # parse_cron refuses an expression that never fires
        return found


class RegistryAuth(CoreModel):
    """dstack's `registry_auth`: credentials for pulling a private image."""

    username: str = Field(min_length=1, description="The registry user.")
    # never in a run's stored spec (exclude): runconfig seals it with the run's secrets
    password: str | None = Field(None, min_length=1, exclude=True, repr=False,
                                 description="The password or access token (usually `${{ secrets.NAME }}`).")


class _Run(CoreModel):
    name: Name = Field(None, description="Run name (default: the file name).")
    image: str | None = Field(
        None, description="Container image, e.g. localhost/gpufleet-lab:latest. Omitted: a default image, chosen "
                          "on the fleet the run is placed on by `python` and `nvcc` among the fleet's `images` "
                          "(else the server's; else dstack's own, dstackai/base).")
    python: PythonVersion = Field(
        None, description="dstack's `python`: the Python version (3.9 to 3.14) of the default image; not with "
                          "`image` (as in dstack). With configured `images`: one that has it (none: refused at "
                          "submit); with dstack's image, made with `uv venv` at start, as dstack does.")
    nvcc: StrictBool | None = Field(
        None, description="dstack's `nvcc`: `true` gets a default image with CUDA's compiler (dstack's -devel "
                          "image, or a configured image marked `nvcc: true`); not with `image`.")
    registry_auth: RegistryAuth | None = Field(
        None, description="dstack's `registry_auth`: {username, password} to pull a private `image`; each may "
                          "use `${{ secrets.NAME }}`. The password is kept sealed as secrets are, and reaches the "
                          "host's runtime only in a 0600 auth file that is removed after the pull.")
    commands: list[Annotated[str, BeforeValidator(_scalar_text)]] = Field(
        [], description="Shell commands, run in order in the container.")
    env: Env = Field(
        None, description="Environment: a mapping or KEY=VALUE list. A name without a value (`- HF_TOKEN`) "
                          "is a secret: its value comes from the environment of `gpufleet apply` and is "
                          "never stored, logged or shown.")
    resources: ResourcesSpec = Field(ResourcesSpec(), description="What the run needs.")
    ports: list[Port] = Field([], description="Ports to forward with `gpufleet attach`, dstack's forms: 8000 (local "
                                              "8000 to the container's 8000), 8080:8000 (local 8080), *:8000 (a "
                                              "free local port, picked by attach) or {container_port, local_port}.")
    fleets: list[str] | None = Field(None, description="Only place the run on these fleets.")
    volumes: list[Volume] = Field(
        [], description="Host paths bound into the container (dstack's instance volumes): /host/path:/path, "
                        "/host/path:/path:ro, or {instance_path, path, optional} (read_only: true for `:ro`). "
                        "A dstack network volume (a name, `name:`) is refused: gpufleet has instance volumes only.")
    working_dir: Annotated[str | None, BeforeValidator(_working_dir)] = Field(
        None, description="dstack's `working_dir`: the container's working directory, absolute; a relative one is "
                          f"from {REPO_DIR} (as dstack reads it). Omitted: the image's, or {REPO_DIR} for a run with "
                          "`repos` or `files` (dstack 0.20 would use the image's: gpufleet does not read images).")
    user: Annotated[str | None, BeforeValidator(_user)] = Field(
        None, description="dstack's `user`: the user the container runs as, USER[:GROUP] (a name or a number each, "
                          "e.g. ubuntu, 1000:1000); omitted: the image's user.")
    entrypoint: Annotated[str | None, BeforeValidator(_entrypoint)] = Field(
        None, description="dstack's `entrypoint`: a command line (split into words as a shell would, never run by "
                          "one) that replaces the image's entrypoint; `commands` are then its arguments, one each, "
                          "not shell lines. Not for dev environments (as in dstack).")
    shell: Annotated[str | None, BeforeValidator(_shell)] = Field(
        None, description="dstack's `shell`: the shell `commands` run with: sh, bash (in /bin) or an absolute path "
                          "(/usr/bin/zsh). Omitted: /bin/sh (dstack's default for a given image).")
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
    spot_policy: Annotated[Literal["auto", "on-demand"] | None, BeforeValidator(_spot_policy)] = Field(
        None, description="dstack's `spot_policy`: `auto` and `on-demand` are accepted and change nothing: "
                          "gpufleet's hosts are SSH fleet hosts, which dstack treats as on-demand too. `spot` is "
                          "refused: no host of an SSH fleet is a spot instance, so it could never be placed.")
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
    utilization_policy: UtilizationPolicy | None = Field(
        None, description="dstack's `utilization_policy`: {min_gpu_utilization: 10, time_window: 30m}: the run is "
                          "stopped when any of its GPUs stayed below min_gpu_utilization percent in every metrics "
                          "sample of the last time_window (the server samples each host every 10 s; past an hour "
                          "it keeps 1-minute means). An event says which GPU and how idle it was.")
    schedule: ScheduleSpec | None = Field(
        None, description="dstack's `schedule`: {cron: '15 23 * * *'} or {cron: [list]}: the run is accepted and "
                          "waits (`pending`, `scheduled: next ... UTC`) until the next of these times, starts then "
                          "(waiting for capacity as any run does), and when it ends (done, failed, or stopped by "
                          "its max_duration) waits for the next time again, until `gpufleet stop`.")

    repos: list[RepoSpec] = Field(
        [], max_length=1, description="dstack's `repos`: at most one git repo, local (`.`, `..:/my-repo`, "
                                      "{local_path, path}) or remote (`https://host/org/repo.git`, {url, branch, "
                                      "hash, path}), its working tree uploaded by `gpufleet apply` (which clones a "
                                      "remote one on this machine) and put at `path` (default: the working "
                                      "directory). The hosts never clone.")
    files: list[FileMapping] = Field(
        [], description="dstack's `files`: local files or directories uploaded to the container, `LOCAL:PATH`, a lone "
                        "`PATH` (the same relative path on both sides) or {local_path, path}.")

    @field_validator("repos", "files")
    @classmethod
    def _home_is_root(cls, v: list, info) -> list:
        user = info.data.get("user")
        workdir = info.data.get("working_dir")
        base = posixpath.join(REPO_DIR, workdir) if workdir else REPO_DIR
        for i, item in enumerate(v):
            if item.path.startswith("~") and user is not None and user.split(":")[0] not in ("root", "0"):
                raise ValueError(f"[{i}] {item.path!r}: `~` in a container path is /root; with `user: {user}` "
                                 "write the absolute path")
            path = "/root" + item.path[1:] if item.path.startswith("~") else item.path
            if posixpath.normpath(posixpath.join(base, path)) == "/":
                raise ValueError(f"[{i}] {item.path!r} is the container's root directory: give a directory below it")
            dev_environment = "dev-environment" in get_args(cls.model_fields["type"].annotation)
            if getattr(item, "if_exists", "error") == "skip" and not info.data.get("commands") and \
                    info.data.get("entrypoint") is None and not dev_environment:
                raise ValueError(f"[{i}] `if_exists: skip` needs `commands` (or an `entrypoint`): gpufleet puts the "
                                 "repo in place in the script that starts them")
        return v

    @property
    def workdir(self) -> str | None:
        """The container's working directory (None: the image's): `working_dir` (a relative one from
        /workflow, as dstack reads it), else /workflow for a run that uploads code."""
        if self.working_dir is None:
            return REPO_DIR if self.repos or self.files else None
        return posixpath.normpath(posixpath.join(REPO_DIR, self.working_dir))

    @property
    def uploads(self) -> list[Upload]:
        """What the run uploads, in archive order (the repo first), with absolute container paths:
        relative ones from the working directory, `~` as /root."""
        base = self.workdir or REPO_DIR
        items = [("repo", r.local_path, r.path) for r in self.repos] + [("file", f.local_path, f.path)
                                                                         for f in self.files]
        out = []
        for i, (kind, local, path) in enumerate(items):
            path = "/root" + path[1:] if path.startswith("~") else path
            spec = self.repos[i] if kind == "repo" else None
            remote = {"url": spec.url, "branch": spec.branch, "hash": spec.hash} if spec and spec.url else {}
            out.append(Upload(i, kind, "" if remote else local or ".", posixpath.normpath(posixpath.join(base, path)),
                              **remote, **({"if_exists": spec.if_exists} if spec else {})))
        return out

    @field_serializer("stop_duration", when_used="json")
    def _stop_duration_json(self, v: float | None) -> float | str | None:
        return "off" if v == math.inf else v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        if v is not None and (not _IMAGE_RE.match(v) or len(v) > 255):
            raise ValueError(f"{v!r} is not an image reference (no leading '-', spaces or shell characters)")
        return v

    @field_validator("python")
    @classmethod
    def _python_not_with_image(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("image"):
            raise ValueError("`image` and `python` are mutually exclusive fields (as in dstack): python chooses a "
                             "default image")
        return v

    @field_validator("nvcc")
    @classmethod
    def _nvcc_not_with_image(cls, v: bool | None, info: ValidationInfo) -> bool | None:
        if v and info.data.get("image"):
            raise ValueError("`image` and `nvcc` are mutually exclusive fields (as in dstack): nvcc chooses a "
                             "default image")
        return v

    @field_validator("docker")
    @classmethod
    def _docker_takes_no_python(cls, v: bool, info: ValidationInfo) -> bool:
        for name in ("python", "nvcc"):
            if v and info.data.get(name):
                raise ValueError(f"`{name}` and `docker` are mutually exclusive fields (as in dstack)")
        return v

    @property
    def shell_path(self) -> str:
        """The shell `commands` run with: `shell` (sh and bash are in /bin, as dstack reads them), else /bin/sh."""
        if self.shell is None:
            return "/bin/sh"
        return self.shell if self.shell.startswith("/") else f"/bin/{self.shell}"

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



class StartupOrder(StrEnum):
    """dstack's `startup_order` of a multi-node task's containers (node 0 is the master)."""

    ANY = "any"
    MASTER_FIRST = "master-first"
    WORKERS_FIRST = "workers-first"


class StopCriteria(StrEnum):
    """dstack's `stop_criteria`: when a multi-node task is over."""

    ALL_DONE = "all-done"
    MASTER_DONE = "master-done"


_GROUP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")  # dstack's replica and node group names


class NodeGroup(CoreModel):
    """One of a multi-node task's `groups` (dstack's NodeGroup): its nodes run its own commands."""

    name: str | None = Field(None, description="The group's name (lower-case letters, digits and -, up to 40); "
                                               "omitted: its index, `0`, `1`, ... (as dstack).")
    nodes: int = Field(1, ge=1, le=1024, description="How many nodes (hosts) of the task run this group's commands.")
    resources: ResourcesSpec = Field(
        ResourcesSpec(), description="What each node of the group needs (not inherited from the task, as in "
                                     "dstack). gpufleet places every node of a task alike: every group must ask "
                                     "for the same resources.")
    commands: list[Annotated[str, BeforeValidator(_scalar_text)]] = Field(
        [], description="The shell commands this group's nodes run; `${{ groups[I].nodes[J].IP_ADDRESS }}` is the "
                        "cluster address of node J of group I.")
    ports: list[Port] = Field([], description="Ports to forward with `gpufleet attach` (the first group's only: "
                                              "attach reaches the master, node 0).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _GROUP_NAME_RE.fullmatch(v):
            raise ValueError(f"{v!r}: a node group's name is 1 to 40 lower-case letters, digits and -, "
                             "starting with a letter or digit")
        return v


class TaskConfig(_Run):
    """A batch job: runs its commands and ends."""

    type: Literal["task"]
    nodes: int = Field(1, ge=1, le=1024, description="Number of hosts, one container on each "
                                                     "(needs a `placement: cluster` fleet).")
    startup_order: StartupOrder | None = Field(
        None, description="dstack's `startup_order`, the order a multi-node task's containers start in: `any` "
                          "(omitted: no order; gpufleet starts node 0 first, one node after the other), "
                          "`master-first` (the other nodes start once the master's, node 0's, container is "
                          "running) or `workers-first` (the master starts once every other node's container is "
                          "running). A container that has exited by then fails the start, naming its node. No "
                          "effect on a single node.")
    stop_criteria: StopCriteria | None = Field(
        None, description="dstack's `stop_criteria`, when a multi-node task is over: `all-done` (omitted: when "
                          "every node's container has exited) or `master-done` (when the master's, node 0's, "
                          "container exits with 0: the other nodes' containers are stopped by the server and "
                          "the run is done). Either way a container that exits non-zero fails the run and the "
                          "others are stopped. No effect on a single node.")
    groups: list[NodeGroup] | None = Field(
        None, description="dstack's node groups of a multi-node task, instead of `nodes`: each group's nodes run "
                          "its own `commands`; node 0 (the master) is the first node of the first group, ranks "
                          "follow the groups' order. The task's `nodes`, `resources` and `ports` are then the "
                          "groups' (their total, the groups' common resources, the first group's ports); a top-level "
                          "`nodes`, `commands`, `ports`, `entrypoint` or `resources` is refused. Unlike dstack, every "
                          "group must ask for the same resources (one placement for all the nodes).")

    @model_validator(mode="after")
    def _from_groups(self) -> TaskConfig:
        """With `groups`: their names (index when omitted), and the task's nodes, resources and ports as
        the groups give them (the file may not set them: group_problems; a stored spec holds both, the
        same)."""
        if self.groups:
            for i, g in enumerate(self.groups):
                if g.name is None:
                    g.name = str(i)
            self.nodes = sum(g.nodes for g in self.groups)
            self.resources = self.groups[0].resources
            self.ports = list(self.groups[0].ports)
        return self

    def node_commands(self, rank: int) -> list[str]:
        """The commands node ``rank`` runs: its group's, else the task's."""
        if not self.groups:
            return list(self.commands)
        for g in self.groups:
            if rank < g.nodes:
                return list(g.commands)
            rank -= g.nodes
        raise ValueError(f"node {rank} is not a node of the task's groups")

    @property
    def group_sizes(self) -> list[int]:
        """The number of nodes of each group (one group of all the nodes without `groups`, as dstack)."""
        return [g.nodes for g in self.groups] if self.groups else [self.nodes]

    def command_items(self) -> list[tuple[tuple, str]]:
        """Every command line with where it is in the file: (("commands", i) or ("groups", g, "commands", i), line)."""
        if not self.groups:
            return [(("commands", i), c) for i, c in enumerate(self.commands)]
        return [(("groups", g, "commands", i), c) for g, group in enumerate(self.groups)
                for i, c in enumerate(group.commands)]


def group_problems(cfg: TaskConfig, given: set[str]) -> list[tuple[tuple, str]]:
    """What is wrong with a task's `groups` beside the rest of the file (``given``: the top-level fields the
    file sets): (where, why) each, dstack's rules and gpufleet's one placement for all the nodes."""
    if cfg.groups is None:
        return []
    if not cfg.groups:
        return [(("groups",), "`groups` cannot be an empty list (as in dstack): omit it, or list the node groups")]
    out: list[tuple[tuple, str]] = []
    for key in ("nodes", "commands", "ports", "entrypoint", "resources"):
        if key in given:
            instead = {"nodes": "give each group its `nodes`", "entrypoint": "put `commands` in each group"}.get(
                key, f"put `{key}` in each group")
            out.append(((key,), f"a task with `groups` takes no top-level `{key}` (as in dstack): {instead}"))
    if cfg.nodes > 1024:
        out.append((("groups",), f"the groups have {cfg.nodes} nodes in all; at most 1024"))
    seen: dict[str, int] = {}
    first = cfg.groups[0].resources.model_dump(mode="json")
    for i, g in enumerate(cfg.groups):
        if g.name in seen:
            out.append((("groups", i, "name"), f"{g.name!r} is also the name of groups[{seen[g.name]}]; "
                                               "group names must be unique"))
        seen.setdefault(g.name, i)
        if not g.commands and "image" not in given:
            out.append((("groups", i), "a node group needs `commands` (or the task an `image` to run as it is)"))
        if i and g.resources.model_dump(mode="json") != first:
            out.append((("groups", i, "resources"),
                        "not the resources of groups[0]: gpufleet places every node of a multi-node task alike (one "
                        "request for all its nodes), so every group must ask for the same resources; give each "
                        "group the same ones, or split the task into runs"))
        if i and g.ports:
            out.append((("groups", i, "ports"), "`gpufleet attach` forwards the ports of the master (node 0, the first "
                                                "group's first node) only: list ports in the first group"))
    return out


class ProbeHeader(CoreModel):
    """An HTTP header a probe sends (dstack's HTTPHeaderSpec)."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
                      description="The header's name.")
    value: str = Field(min_length=1, max_length=2048, pattern=r"^[^\r\n\x00]*$", description="The header's value.")


def _probe_seconds(value: Any) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds < 1:
        raise ValueError(f"must be at least 1 second (got {value!r})")
    return seconds


class ProbeConfig(CoreModel):
    """dstack's service probe: an HTTP request the server sends to each running replica of a service (through
    the fleet's jump chain); a replica gets traffic once `ready_after` probes in a row succeeded (a 2xx)."""

    type: Literal["http"] = Field(description="The probe type: `http` (the only one, as in dstack).")
    url: str = Field("/", max_length=2048, pattern=r"^/[^\x00-\x1f\x7f]*$",
                     description="The path (and query) requested on the replica's port; starts with `/`. Default `/`.")
    method: Literal["get", "post", "put", "delete", "patch", "head"] = Field(
        "get", description="The HTTP method. Default `get`.")
    headers: list[ProbeHeader] = Field([], max_length=16, description="Headers sent with the probe's request.")
    body: str | None = Field(None, min_length=1, max_length=2048, description="The request's body.")
    timeout: Annotated[float, BeforeValidator(_probe_seconds)] = Field(
        10.0, description="Seconds (or a duration: `10s`) the request may take; at least 1. Default 10.")
    interval: Annotated[float, BeforeValidator(_probe_seconds)] = Field(
        15.0, description="Seconds between the end of one probe and the start of the next; at least 1. Default 15.")
    ready_after: int = Field(1, ge=1, description="Successes in a row that make the replica ready. Default 1.")
    until_ready: bool = Field(False, description="Stop probing a replica once it is ready. Default false: a "
                                                 "replica whose probe then fails stops getting traffic.")

    @field_validator("timeout", "interval", "url", "ready_after", "until_ready", "method", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[info.field_name].default if v is None else v


MAX_REPLICAS = 64


def _replicas(value: Any) -> Any:
    if isinstance(value, list):
        return value  # replica groups (ReplicaGroup), validated as such
    r = parse_count(value, "replicas", MAX_REPLICAS)
    if r.max is None:
        raise ValueError(f"replicas {value!r}: the maximum number of replicas is needed (e.g. 1..4)")
    return Range(r.min or 0, r.max)


SCALING_WINDOWS = (30, 60, 300)  # seconds (dstack's)
DEFAULT_SCALING_WINDOW = 60.0


def _scaling_window(value: Any) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds not in SCALING_WINDOWS:
        raise ValueError(f"window {value!r} must be one of 30s, 60s, 300s")
    return seconds


def _scaling_delay(value: Any) -> float:
    return parse_duration(value)


class ScalingSpec(CoreModel):
    """dstack's `scaling`: replicas between the bounds of `replicas` from the requests per second the
    server's endpoint carries to the service."""

    metric: Literal["rps"] = Field(description="The metric: `rps` (requests per second through the endpoint).")
    target: float = Field(gt=0, description="Requests per second one replica should take: the service wants "
                                            "ceil(rps / target) replicas, within `replicas`.")
    window: Annotated[float | None, BeforeValidator(_scaling_window)] = Field(
        None, description="The window the rate is measured over: 30s, 60s (default) or 300s.")
    scale_up_delay: Annotated[float, BeforeValidator(_scaling_delay)] = Field(
        300.0, description="Least time after a scaling before the next scale-up (default 5m; from zero replicas "
                           "a request scales up at once).")
    scale_down_delay: Annotated[float, BeforeValidator(_scaling_delay)] = Field(
        600.0, description="Least time after a scaling before the next scale-down (default 10m).")


MAX_INT64 = 2**63 - 1  # nginx's bound on a rate (per minute) and a burst, kept as dstack keeps it
_KEY_FORMS = "{type: ip_address} (the default) or {type: header, header: NAME}"


def _rate_key(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping: {_KEY_FORMS} (got {value!r})")
    if value.get("type", "ip_address") not in ("ip_address", "header"):
        raise ValueError(f"type must be ip_address or header (got {value.get('type')!r}): {_KEY_FORMS}")
    return value


def _rate_prefix(value: Any) -> Any:
    if not isinstance(value, str) or not re.fullmatch(r"/[^\s\\{}]*", value) or len(value) > 4094:
        raise ValueError(f"must be a path that starts with / (at most 4094 characters, without spaces, "
                         f"backslashes or braces), e.g. /v1/ (got {value!r})")
    return value


def _rate_rps(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not 1 / 60 <= value <= MAX_INT64 // 60:
        raise ValueError(f"must be a number of requests a second, at least 1/60 (one a minute) (got {value!r})")
    return value


def _rate_burst(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT64:
        raise ValueError(f"must be a whole number of requests, 0 or more (got {value!r})")
    return value


class RateLimitKey(CoreModel):
    """dstack's partitioning key of a rate limit: each client address (`ip_address`) or each value of a request
    header (`header`) has its own count."""

    type: Literal["ip_address", "header"] = Field(
        "ip_address", description="`ip_address` (the default): counted per client address (behind a proxy the "
                                  "server trusts, X-Forwarded-For's). `header`: per value of the header `header`.")
    header: str | None = Field(None, description="With `type: header`: the header's name (letters, digits, `-`, `_`; "
                                                 "`_` reads as `-`, as nginx reads dstack's). Requests without it "
                                                 "(or with it empty) are not limited by the rule, as in nginx.")

    @field_validator("header")
    @classmethod
    def _a_header_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-zA-Z0-9_-]{1,500}", v):
            raise ValueError(f"must be a header name: letters, digits, - and _ (at most 500) (got {v!r})")
        return v

    @model_validator(mode="after")
    def _header_with_header_type(self) -> RateLimitKey:
        if self.type == "header" and self.header is None:
            raise ValueError("`type: header` needs `header`: the header's name, e.g. header: Authorization")
        if self.type == "ip_address" and self.header is not None:
            raise ValueError("`header` goes with `type: header` (ip_address counts per client address)")
        return self


class RateLimit(CoreModel):
    """dstack's service rate limit (nginx's limit_req): at most `rps` requests a second, plus `burst` more at
    once, to paths under `prefix`, per partition (`key`); a request over it is answered 429."""

    prefix: Annotated[str, BeforeValidator(_rate_prefix)] = Field(
        "/", description="The path prefix (below /proxy/services/PROJECT/RUN) the limit applies to; a request under "
                         "several prefixes is limited by the longest only (nginx's locations). Default `/`.")
    key: Annotated[RateLimitKey, BeforeValidator(_rate_key)] = Field(
        default_factory=RateLimitKey, description=f"What requests are counted by: {_KEY_FORMS}.")
    rps: Annotated[float, BeforeValidator(_rate_rps)] = Field(
        description="Requests a second allowed (at least 1/60: one a minute; as in dstack, nginx keeps it in "
                    "requests a minute, rounded), tracked to the millisecond: `rps: 10` is one per 100 ms.")
    burst: Annotated[int, BeforeValidator(_rate_burst)] = Field(
        0, description="Requests allowed above the rate at once, answered without delay (dstack's nginx "
                       "`nodelay`). Default 0.")


def _rate_limits(value: Any) -> Any:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"must be a list of rate limits, e.g. [{{prefix: /, rps: 10, burst: 5}}] (got {value!r})")
    return value


MODEL_PROBE_TIMEOUT = 30.0  # seconds: dstack's default probe of a model service (its OPENAI_MODEL_PROBE_TIMEOUT)


def _model_mapping(value: Any) -> Any:
    """dstack's shorthand `model: NAME` is an OpenAI-format chat model of that name."""
    if isinstance(value, str):
        return {"name": value}
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"a model name (`model: NAME`) or a mapping (`name`, `type: chat`, `format: openai`, "
                         f"`prefix`), not {value!r}")
    return value


class ChatModel(CoreModel):
    """dstack's `model` of a service (its OpenAIChatModel): the name under which the server's OpenAI-compatible
    endpoint, /proxy/models/PROJECT/, routes requests to this service (by the `model` field of their JSON body)."""

    type: Literal["chat"] = Field("chat", description="The model's type: `chat` (the only one, as in dstack).")
    name: str = Field(description="The model's name: requests whose `model` is this name go to this service, and "
                                  "/proxy/models/PROJECT/v1/models lists it.")
    format: Literal["openai"] = Field(
        "openai", description="The API the service speaks: `openai` (the default; vLLM, SGLang, TGI, NIM and "
                              "Ollama all serve it). dstack's `tgi` (its own chat templating in front of TGI's "
                              "native API) is refused: TGI serves the OpenAI API itself.")
    prefix: str = Field("/v1", description="Where the service serves the OpenAI API: "
                                           "/proxy/models/PROJECT/v1/REST reaches PREFIX/REST on the service. "
                                           "Default `/v1`.")

    @model_validator(mode="before")
    @classmethod
    def _no_tgi(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format") == "tgi":
            raise ValueError("`format: tgi` is not supported: gpufleet routes OpenAI-format requests as they are "
                             "and renders no chat template; TGI serves the OpenAI API itself (/v1/chat/completions, "
                             "TGI 1.4 and later): write `model: NAME` (or `format: openai`) and drop `chat_template` "
                             "and `eos_token`")
        return data

    @field_validator("type", "format", "prefix", mode="before")
    @classmethod
    def _none_is_default(cls, v: Any, info: ValidationInfo) -> Any:
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("name")
    @classmethod
    def _a_name(cls, v: str) -> str:
        if not v.strip() or len(v) > 256 or re.search(r"[\x00-\x1f\x7f]", v):
            raise ValueError(f"a model name is 1 to 256 characters, none of them a control character (got {v!r})")
        return v

    @field_validator("prefix")
    @classmethod
    def _a_path(cls, v: str) -> str:
        if not v.startswith("/") or len(v) > 256 or re.search(r"[\x00-\x20\x7f?#]", v):
            raise ValueError(f"the prefix is a path on the service starting with `/`, without spaces, `?` or `#` "
                             f"(got {v!r}; dstack's default: /v1)")
        return v


def model_probe(model: ChatModel) -> ProbeConfig:
    """dstack's probe of a service with a `model` and no `probes`: a one-token chat completion of the model,
    so that the service gets traffic once the model answers (not once its port opens)."""
    body = json.dumps({"model": model.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    return ProbeConfig(type="http", method="post", url=model.prefix.rstrip("/") + "/chat/completions",
                       headers=[ProbeHeader(name="Content-Type", value="application/json")], body=body,
                       timeout=MODEL_PROBE_TIMEOUT)


DEFAULT_GROUP = "0"  # the one group of a service without replica groups (dstack's name for it)
# a replica group's fields that replace the service's in what its replicas run (`resources`, `commands`,
# `replicas`, `scaling` always; these when the group sets them)
GROUP_OVERRIDES = ("image", "python", "nvcc", "docker", "privileged", "spot_policy")


def _count_alias(data: Any) -> Any:
    """dstack's `count`, another name for a group's `replicas` (`replicas` wins when both are given)."""
    if isinstance(data, dict) and "count" in data:
        data = dict(data)
        count = data.pop("count")
        data.setdefault("replicas", count)
    return data


def _router_type(value: Any) -> Any:
    if value == "dynamo":
        raise ValueError("`dynamo` (NVIDIA Dynamo's frontend, whose workers find it through etcd and NATS at "
                         "DSTACK_ROUTER_INTERNAL_IP) is not supported: gpufleet runs SGLang's router (`type: sglang`), "
                         "which the server keeps told of the ready workers")
    return value


class ReplicaGroupRouter(CoreModel):
    """dstack's `router` of a replica group: the group's one replica runs SGLang's router (`smg launch ...` in its
    commands); the server keeps it told of the service's ready worker replicas and sends it the service's traffic."""

    model_config = ConfigDict(extra="forbid")

    type: Annotated[Literal["sglang"], BeforeValidator(_router_type)] = Field(
        "sglang", description="The router: `sglang` (SGLang's model gateway, dstack's default). dstack's `dynamo` is "
                              "refused.")


# how a gRPC worker (SGLang's `--grpc-mode`, vLLM's grpc_server) is started: the router is told of one over gRPC,
# which gpufleet does not speak
ROUTER_WORKER_GRPC = ("--grpc-mode", "vllm.entrypoints.grpc_server")


class ReplicaGroup(CoreModel):
    """One of a service's replica groups (dstack's ReplicaGroup, `replicas` written as a list): its replicas run
    the service with the group's own count, scaling, resources and commands (and image, ... where given)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="The group's name (lower-case letters, digits and -, up to 40); "
                                               "omitted: its index, `0`, `1`, ... (as dstack).")
    replicas: Annotated[Range, BeforeValidator(_replicas)] = Field(
        description="How many replicas of this group run: a number, or a range (`1..4`) with `scaling`. "
                    "dstack's `count` is another name for it.")
    scaling: ScalingSpec | None = Field(
        None, description="The group's autoscaling (`metric: rps`, `target`, ...), from the request rate of the "
                          "whole service's endpoint (as dstack); needs `replicas` a range.")
    resources: ResourcesSpec = Field(
        ResourcesSpec(), description="What each replica of the group needs (not inherited from the service, as in "
                                     "dstack).")
    commands: list[Annotated[str, BeforeValidator(_scalar_text)]] = Field(
        [], description="The shell commands the group's replicas run (the service takes no top-level `commands` "
                        "with groups).")
    image: str | None = Field(None, description="The group's container image (not with the service's `image`, "
                                                "`python` or `docker`).")
    python: PythonVersion = Field(None, description="The group's default image's Python version (not with "
                                                    "`image`).")
    nvcc: StrictBool | None = Field(None, description="The group's default image with CUDA's compiler.")
    docker: StrictBool | None = Field(None, description="Docker inside the group's containers (runs them "
                                                        "privileged; needs the fleet's `policy.privileged`).")
    privileged: StrictBool | None = Field(None, description="Run the group's containers privileged.")
    spot_policy: Annotated[Literal["auto", "on-demand"] | None, BeforeValidator(_spot_policy)] = Field(
        None, description="As the service's `spot_policy` (changes nothing on SSH fleets).")
    router: ReplicaGroupRouter | None = Field(
        None, description="dstack's router group (`router: {type: sglang}`): its one replica (`replicas: 1`) runs "
                          "SGLang's router and gets all of the service's traffic; the server registers the other "
                          "groups' ready replicas with it as workers (prefill, decode or regular, as each one's "
                          "GET /server_info says) and removes the ones gone. Every replica of such a service runs "
                          "on its host's network (the fleet's `policy.host_network`), one per host.")

    @model_validator(mode="before")
    @classmethod
    def _count(cls, data: Any) -> Any:
        return _count_alias(data)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _GROUP_NAME_RE.fullmatch(v):
            raise ValueError(f"{v!r}: a replica group's name is 1 to 40 lower-case letters, digits and -, "
                             "starting with a letter or digit")
        return v

    @field_serializer("replicas")
    def _replicas_json(self, v: Range) -> str:
        return str(v)

    @model_validator(mode="after")
    def _scaling_with_a_range(self) -> ReplicaGroup:
        r = self.replicas
        if r.min != r.max and self.scaling is None:
            raise ValueError(f"`replicas: {r}` is a range: the group needs `scaling` (e.g. scaling: {{metric: rps, "
                             "target: 10}); or give a number of replicas")
        if r.min == r.max and self.scaling is not None:
            raise ValueError("the group's `replicas` must be a range (e.g. 1..4) for the server to scale between")
        return self


def _replicas_kind(value: Any) -> str:
    return "list[groups]" if isinstance(value, list) else "int"


# `replicas`: a count or range, or dstack's replica groups (a list); the tags are left out of error locations
Replicas = Annotated[Annotated[Range, Tag("int")] | Annotated[list[ReplicaGroup], Tag("list[groups]")],
                     Discriminator(_replicas_kind)]


def group_spec(spec: dict, group: dict) -> dict:
    """What the replicas of replica group ``group`` (a ReplicaGroup as JSON) of the service ``spec`` (JSON)
    run: the service with the group's count, scaling, resources and commands, and its image, python, nvcc,
    docker, privileged and spot_policy where the group gives them (dstack's rules)."""
    out = {k: v for k, v in spec.items()}
    out.update(replicas=group["replicas"], scaling=group.get("scaling"), resources=group.get("resources") or {},
               commands=list(group.get("commands") or []))
    for key in GROUP_OVERRIDES:
        if group.get(key) is not None:
            out[key] = group[key]
    return out


def group_specs(spec: dict) -> list[tuple[str, dict]]:
    """A service's replica groups (JSON spec): (name, what its replicas run) each; a service without groups is
    one group, DEFAULT_GROUP, of its own spec."""
    groups = spec.get("replicas")
    if not isinstance(groups, list):
        return [(DEFAULT_GROUP, spec)]
    out = [(g.get("name") or str(i), group_spec(spec, g)) for i, g in enumerate(groups)]
    if router_group(spec) is not None:  # the router reaches its workers at their hosts' addresses
        out = [(name, {**s, "network": "host"}) for name, s in out]
    return out


def router_group(spec: dict) -> str | None:
    """The name of the replica group of service ``spec`` (JSON) that runs its router (None: it has none)."""
    groups = spec.get("replicas")
    if not isinstance(groups, list):
        return None
    return next(((g.get("name") or str(i)) for i, g in enumerate(groups) if g.get("router")), None)


class ServiceConfig(_Run):
    """A long-running server listening on `port`."""

    type: Literal["service"]
    port: Port = Field(description="The port the service listens on.")
    auth: StrictBool = Field(True, description="dstack's `auth`: the server's endpoint for the service "
                                               "(/proxy/services/PROJECT/RUN/) needs a gpufleet token of a member of "
                                               "the run's project (Authorization: Bearer). false: open to anyone "
                                               "who reaches the server.")
    strip_prefix: StrictBool = Field(True, description="dstack's `strip_prefix`: the service sees `/PATH` for "
                                                       "/proxy/services/PROJECT/RUN/PATH. false: it sees the whole "
                                                       "path.")
    probes: list[ProbeConfig] = Field([], description="dstack's `probes`: HTTP checks of each replica; it gets "
                                                      "traffic once they pass. None: ready once its port accepts "
                                                      "a connection.")
    replicas: Annotated[Replicas, BeforeValidator(_replicas)] = Field(
        Range(1, 1), description="dstack's `replicas`: how many copies of the service run, each a run of its own "
                                 "on its own blocks (placed as any run, through the queue); `2`, or a range "
                                 "`1..4` with `scaling`. A replica that ends is replaced. Default 1. Or dstack's "
                                 "replica groups: a list of groups (`name`, `replicas` or `count`, `scaling`, "
                                 "`resources`, `commands`, `image`, `python`, `nvcc`, `docker`, `privileged`), "
                                 "each with its own replicas of the service as the group changes it; every ready "
                                 "replica of every group gets the endpoint's traffic. A group's `resources` are its "
                                 "own (not the service's), and the service then takes no top-level `scaling` or "
                                 "`commands`.")
    scaling: ScalingSpec | None = Field(
        None, validate_default=True,
        description="dstack's `scaling`: with `replicas` a range, the server adds and removes replicas from "
                    "the request rate its endpoint carries (`metric: rps`, `target`, `scale_up_delay`, "
                    "`scale_down_delay`).")

    @field_serializer("replicas", mode="wrap")
    def _replicas_json(self, v: Range | list[ReplicaGroup], handler) -> Any:
        return str(v) if isinstance(v, Range) else handler(v)

    @field_validator("replicas")
    @classmethod
    def _group_names(cls, v: Range | list[ReplicaGroup]) -> Range | list[ReplicaGroup]:
        """Replica groups: named (their index when omitted, as dstack), each name once, at most MAX_REPLICAS
        replicas in all."""
        if isinstance(v, Range):
            return v
        if not v:
            raise ValueError("an empty list of replica groups (as in dstack): give a number of replicas, or groups")
        seen: set[str] = set()
        for i, g in enumerate(v):
            if g.name is None:
                g.name = str(i)
            if g.name in seen:
                raise ValueError(f"replica group name {g.name!r} is given more than once; each group needs its own "
                                 "name (as in dstack)")
            seen.add(g.name)
        routers = [g for g in v if g.router is not None]
        if len(routers) > 1:
            raise ValueError("at most one replica group may have `router` (as in dstack)")
        if routers and (routers[0].replicas.min != 1 or routers[0].replicas.max != 1):
            raise ValueError(f"replica group {routers[0].name!r} has `router`: it must have `replicas: 1` (as in "
                             "dstack: one router replica)")
        if routers and len(v) == 1:
            raise ValueError(f"replica group {routers[0].name!r} is the router: the service needs a group of workers "
                             "beside it")
        most = sum(int(g.replicas.max or 0) for g in v)
        if most > MAX_REPLICAS:
            raise ValueError(f"the replica groups have up to {most} replicas in all; at most {MAX_REPLICAS}")
        return v

    @property
    def groups(self) -> list[ReplicaGroup] | None:
        """Its replica groups (None: `replicas` is a count or range)."""
        return None if isinstance(self.replicas, Range) else self.replicas

    def command_items(self) -> list[tuple[tuple, str]]:
        """Every command line with where it is in the file (a group's under ("replicas", g, "commands", i))."""
        if self.groups is None:
            return [(("commands", i), c) for i, c in enumerate(self.commands)]
        return [(("commands", i), c) for i, c in enumerate(self.commands)] + [
            (("replicas", g, "commands", i), c) for g, group in enumerate(self.groups)
            for i, c in enumerate(group.commands)]

    @field_validator("scaling")
    @classmethod
    def _scaling_with_a_range(cls, v: ScalingSpec | None, info: ValidationInfo) -> ScalingSpec | None:
        r = info.data.get("replicas")
        if r is None:
            return v
        if isinstance(r, list):
            if v is not None:
                raise ValueError("a service with replica groups takes `scaling` in each group, not at the top "
                                 "(as in dstack)")
            return v
        if r.min != r.max and v is None:
            raise ValueError(f"`replicas: {r}` is a range: it needs `scaling` (e.g. scaling: {{metric: rps, "
                             "target: 10}); or give a number of replicas")
        if r.min == r.max and v is not None:
            raise ValueError("`replicas` must be a range (e.g. 1..4) for the server to scale between")
        return v

    rate_limits: Annotated[list[RateLimit], BeforeValidator(_rate_limits)] = Field(
        [], description="dstack's `rate_limits`: the server's endpoint answers 429 (with "
                                       "Retry-After) to requests over them, before `auth` (as dstack's gateway). "
                                       "Each server process counts its own requests.")

    @field_validator("rate_limits")
    @classmethod
    def _unique_prefixes(cls, v: list[RateLimit]) -> list[RateLimit]:
        seen: set[str] = set()
        for r in v:
            if r.prefix in seen:
                raise ValueError(f"prefix {r.prefix!r} is given more than once; each rate limit needs its own "
                                 "prefix (as in dstack)")
            seen.add(r.prefix)
        return v

    model: Annotated[ChatModel | None, BeforeValidator(_model_mapping)] = Field(
        None, description="dstack's `model`: the name (`model: NAME`, an OpenAI-format chat model served at `/v1`) "
                          "or mapping (`type: chat`, `name`, `format: openai`, `prefix`) under which the server's "
                          "OpenAI-compatible endpoint, /proxy/models/PROJECT/, routes requests to this service by "
                          "their `model` field. Without `probes`, the service gets dstack's default probe: a "
                          "one-token chat completion (POST PREFIX/chat/completions) every 15 s; `probes: []` "
                          "turns it off.")

    @model_validator(mode="after")
    def _model_probe(self) -> ServiceConfig:
        if self.model is not None and "probes" not in self.model_fields_set:
            self.probes = [model_probe(self.model)]
        return self


# dstack's image sources that a service and its groups may not mix: the service's field -> the groups' fields
_IMAGE_CLASHES = {"image": ("docker", "python", "nvcc"), "docker": ("image", "python", "nvcc"),
                  "python": ("image", "docker"), "nvcc": ("image", "docker")}


def service_group_problems(cfg: ServiceConfig, given: set[str]) -> list[tuple[tuple, str]]:
    """What is wrong with a service's replica groups beside the rest of the file (``given``: the top-level fields
    the file sets): (where, why) each; dstack's rules, and each group's replicas' spec valid as a service."""
    groups = cfg.groups
    if groups is None:
        return []
    out: list[tuple[tuple, str]] = []
    for key in ("commands", "resources"):
        if key in given:
            out.append(((key,), f"a service with replica groups takes no top-level `{key}` (a group's are its own, "
                                f"as in dstack): put `{key}` in each group"))
    spec = cfg.model_dump(mode="json")

    def service_sets(key: str) -> bool:
        value = getattr(cfg, key)
        return value is True if key in ("docker", "privileged", "nvcc") else value is not None

    for i, g in enumerate(groups):
        for key in GROUP_OVERRIDES:
            if service_sets(key) and getattr(g, key) is not None:
                out.append((("replicas", i, key), f"`{key}` is set for the service too: set it in one place only, "
                                                  "the service (every group) or each group (as in dstack)"))
        for key, clashes in _IMAGE_CLASHES.items():
            for other in clashes:
                if service_sets(key) and getattr(g, other) is not None:
                    out.append((("replicas", i, other), f"not with the service's `{key}`: image sources are "
                                                        "exclusive (as in dstack)"))
        if not g.commands and g.image is None and cfg.image is None:
            out.append((("replicas", i), f"replica group {g.name!r} needs `commands`, or an `image` (its own or the "
                                         "service's) to run as it is"))
        grpc = next(((j, w) for j, c in enumerate(g.commands) for w in ROUTER_WORKER_GRPC if w in c.split()), None)
        if g.router is None and any(x.router is not None for x in groups) and grpc is not None:
            out.append((("replicas", i, "commands", grpc[0]), f"a gRPC worker (`{grpc[1]}`) is not supported: "
                        "gpufleet tells the router of its workers over HTTP (each one's GET /server_info); start "
                        "the workers as HTTP servers"))
    if out:
        return out
    for i, (g, (_, gspec)) in enumerate(zip(groups, group_specs(spec), strict=True)):
        try:
            ServiceConfig.model_validate(gspec)
        except ValidationError as e:
            for err in e.errors(include_url=False):
                loc = tuple(err["loc"])
                where = ("replicas", i, *loc) if loc and loc[0] in ReplicaGroup.model_fields else ("replicas", i)
                out.append((where, f"replica group {g.name!r}: " + err["msg"].removeprefix("Value error, ")))
    return out


class DevEnvironmentConfig(_Run):
    """A long-running container for interactive work (`gpufleet attach`)."""

    type: Literal["dev-environment"]
    ide: Literal["vscode", "cursor", "windsurf", "zed"] | None = Field(
        None, description="dstack's `ide`: the editor `gpufleet attach` gives a link for (vscode://, cursor://, "
                          "windsurf://vscode-remote/ssh-remote+RUN/DIR; zed://ssh/RUN/DIR). Every dev environment "
                          "runs the image's sshd (`ssh RUN-NAME`, an entry `gpufleet attach` writes); with `ide` the "
                          "start fails when the image has no sshd and openssh-server cannot be installed. The editor "
                          "installs its own server over SSH (gpufleet pre-installs none, so dstack's `version` is "
                          "not taken).")
    init: list[Annotated[str, BeforeValidator(_scalar_text)]] = Field(
        [], description="dstack's `init`: shell commands run when the dev environment starts, before it is ready "
                        "(gpufleet installs no IDE: before `commands`, then the container stays up).")

    inactivity_duration: Annotated[float | None, BeforeValidator(_inactivity_duration)] = Field(
        None, description="dstack's `inactivity_duration`: stop the dev environment once it has had no connection "
                          "for this long: no SSH connection to its sshd (`ssh RUN-NAME`, VS Code) and no `gpufleet "
                          "attach` shell. Seconds or dstack's forms (90s, 30m, 2h, 1d, 1w); `off` or omitted: never. "
                          "Counted from the first look with none (the server looks every few seconds, and anew "
                          "after it restarts).")

    @field_validator("entrypoint")
    @classmethod
    def _no_entrypoint(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("a dev environment takes no entrypoint (as in dstack): put the commands in `init`")
        return v

    @field_validator("ports")
    @classmethod
    def _not_the_sshd_port(cls, v: list) -> list:
        if any(port_pair(p)[1] == SSHD_PORT for p in v):
            raise ValueError(f"port {SSHD_PORT} is the dev environment's SSH server's (ssh RUN-NAME); "
                             f"use another port")
        return v


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
    replica_of: str | None = None  # a replica of a service: the service (its code upload is the service's)

    @property
    def type(self) -> RunType:
        return RunType(self.config.type)

    @property
    def nodes(self) -> int:
        return getattr(self.config, "nodes", 1)
