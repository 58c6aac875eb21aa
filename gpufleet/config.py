"""Fleet configuration: the dstack SSH-fleet schema as pydantic models.

``load_fleet(path)`` is the only way in: it reads the YAML, validates it, checks
identity files, and resolves per-host values (user, port, key, jump chain, blocks)
into :class:`Fleet`. Every problem is reported with file, line, column and field.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from gpufleet.errors import ConfigError, ConfigProblem
from gpufleet.sshkeys import check_private_key
from gpufleet.yamlsource import Loc, YamlSource, load_yaml, read_config_text

_HOST_RE = re.compile(r"^[A-Za-z0-9_.:%\[\]-]+$")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# dstack fields of cloud fleets: named in the error so a dstack user knows why.
_CLOUD_ONLY = {"nodes", "resources", "backends", "regions", "availability_zones", "instance_types",
               "spot_policy", "retry", "max_price", "idle_duration", "reservation", "termination_policy",
               "termination_idle_time", "tags", "instances"}


def _no_bool_int(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"must be a whole number, not {str(v).lower()}")
    return v


def _blocks(v: Any) -> int | str:
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f'must be "auto" or a whole number >= 1 (got {v!r})')
    return v


def _hostname(v: Any) -> Any:
    if isinstance(v, str):
        if not v:
            raise ValueError("must not be empty")
        if v.startswith("-"):
            raise ValueError(f"{v!r} starts with '-' and would be read as an ssh option")
        if not _HOST_RE.match(v) or len(v) > 253:
            raise ValueError(f"{v!r} is not a valid host name or address "
                             "(letters, digits, '.', '-', '_', ':' only; no spaces or control characters)")
    return v


def _user(v: Any) -> Any:
    if isinstance(v, str):
        if v.startswith("-"):
            raise ValueError(f"{v!r} starts with '-' and would be read as an ssh option")
        if not _USER_RE.match(v) or len(v) > 64:
            raise ValueError(f"{v!r} is not a valid user name (letters, digits, '.', '-', '_' only)")
    return v


Port = Annotated[int, BeforeValidator(_no_bool_int), Field(ge=1, le=65535)]
Blocks = Annotated[int | str, BeforeValidator(_blocks)]
HostName = Annotated[str, BeforeValidator(_hostname)]
UserName = Annotated[str, BeforeValidator(_user)]


def _identity(v: Any, info: ValidationInfo) -> Any:
    if v is None or not isinstance(v, str):
        return v
    if any(ord(c) < 32 or c in '"\x7f' for c in v):
        raise ValueError(f"{v!r}: a path with control characters or '\"' cannot be written to ssh_config")
    try:
        path = Path(v).expanduser()
    except RuntimeError:  # ~nosuchuser/key
        raise ValueError(f"{v!r}: cannot expand '~' (no such user)") from None
    if not path.is_absolute():
        base = (info.context or {}).get("base_dir")
        path = (Path(base) if base else Path.cwd()) / path
    problem = check_private_key(path)
    if problem:
        raise ValueError(problem)
    return str(path)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProxyJump(_Model):
    """A login node (jump host) that the target is reached through."""

    hostname: HostName = Field(description="Address of the login node.")
    port: Port | None = Field(None, description="SSH port of the login node (default 22).")
    user: UserName | None = Field(None, description="User on the login node (default: ssh_config.user).")
    identity_file: str | None = Field(
        None, description="Private key for the login node (default: ssh_config.identity_file).")

    _identity = field_validator("identity_file", mode="before")(_identity)


def _jump_list(v: Any) -> Any:
    return [v] if isinstance(v, dict) else v


JumpChain = Annotated[list[ProxyJump], BeforeValidator(_jump_list)]


class HostParams(_Model):
    """One host of the fleet. A plain string is the same as ``{hostname: ...}``."""

    hostname: HostName = Field(description="Address of the host (as seen from the last jump hop).")
    port: Port | None = Field(None, description="SSH port (default: ssh_config.port, else 22).")
    user: UserName | None = Field(None, description="Login user (default: ssh_config.user).")
    identity_file: str | None = Field(None, description="Private key (default: ssh_config.identity_file).")
    proxy_jump: JumpChain | None = Field(
        None, description="Login node(s) for this host; overrides ssh_config.proxy_jump. "
                          "A list is a chain of hops, used in order.")
    internal_ip: ipaddress.IPv4Address | None = Field(
        None, description="Address of the host on the cluster network (for multi-node tasks).")
    blocks: Blocks | None = Field(None, description='Blocks for this host: "auto" or N (overrides the fleet).')

    _identity = field_validator("identity_file", mode="before")(_identity)


def _host_item(v: Any) -> Any:
    return {"hostname": v} if isinstance(v, str) else v


class SSHParams(_Model):
    """How to reach the hosts of an SSH fleet."""

    user: UserName | None = Field(None, description="Login user for every host.")
    port: Port | None = Field(None, description="SSH port for every host (default 22).")
    identity_file: str | None = Field(None, description="Private key for every host.")
    proxy_jump: JumpChain | None = Field(
        None, description="Login node every host is reached through; a list is a chain of hops.")
    hosts: list[Annotated[HostParams, BeforeValidator(_host_item)]] = Field(
        description="The hosts: hostnames, or objects with per-host settings.", min_length=1)
    network: str | None = Field(None, description="Cluster network, e.g. 10.0.0.0/24.")

    _identity = field_validator("identity_file", mode="before")(_identity)

    @field_validator("network")
    @classmethod
    def _network(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError:
                raise ValueError(f"{v!r} is not a network (e.g. 10.0.0.0/24)") from None
        return v


EnvSpec = dict[str, str | int | float | bool | None] | list[str] | None


def split_env(env: EnvSpec) -> tuple[dict[str, str], list[str]]:
    """``env`` as dstack writes it (a mapping, or a ``KEY=VALUE`` list) -> (values, secret names).

    A name given without a value (``- HF_TOKEN`` in the list, ``HF_TOKEN:`` with nothing after it
    in the mapping) is a secret: its value is read from the environment of the gpufleet process
    when a run starts, passed to the host without being written to state, logs or artifacts, and
    never shown.
    """
    values: dict[str, str] = {}
    secrets: list[str] = []
    items = env.items() if isinstance(env, dict) else (
        (item.split("=", 1)[0], item.split("=", 1)[1] if "=" in item else None) for item in (env or []))
    for name, value in items:
        if value is None:
            secrets.append(name)
            values.pop(name, None)
        else:
            values[name] = str(value).lower() if isinstance(value, bool) else str(value)
            if name in secrets:
                secrets.remove(name)
    return values, secrets


class FleetConfig(_Model):
    """A fleet of existing hosts reached over SSH (dstack's SSH fleet)."""

    type: Literal["fleet"] = Field(description="Always `fleet`.")
    name: str | None = Field(None, description="Fleet name (default: the file name).")
    env: dict[str, str | int | float | bool | None] | list[str] | None = Field(
        None, description="Environment for every workload on the fleet: a mapping or KEY=VALUE list. A name "
                          "without a value is a secret, read from the environment of `gpufleet apply`.")
    placement: Literal["any", "cluster"] = Field(
        "any", description="`cluster`: hosts are interconnected, for multi-node tasks.")
    blocks: Blocks = Field(1, description='Slices per host: "auto" (one per GPU) or N dividing the GPU count.')
    ssh_config: SSHParams = Field(description="How to reach the hosts.")
    plugin: str | None = Field(None, description="Set by Ansible's inventory plugin loader; ignored here.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME_RE.match(v):
            raise ValueError(f"{v!r} must be lowercase letters, digits and '-', starting with a letter")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: Any) -> Any:
        names = v.keys() if isinstance(v, dict) else [item.split("=", 1)[0] for item in (v or [])]
        for name in names:
            if not _ENV_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return v


@dataclass(frozen=True)
class Hop:
    """One SSH hop: a login node on the way to a target."""

    hostname: str
    port: int
    user: str | None
    identity_file: str | None


@dataclass(frozen=True)
class Target:
    """A fleet host with every setting resolved."""

    hostname: str
    port: int
    user: str | None
    identity_file: str | None
    jumps: tuple[Hop, ...]
    blocks: int | str
    internal_ip: str | None

    @property
    def address(self) -> str:
        return f"{self.hostname}:{self.port}"


@dataclass(frozen=True)
class Fleet:
    name: str
    source: str
    placement: str
    env: dict[str, str]
    network: str | None
    targets: tuple[Target, ...]
    config: FleetConfig


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path)
    src = load_yaml(read_config_text(path), str(path))
    if not isinstance(src.data, dict):
        raise ConfigError([src.problem((), "a fleet configuration must be a mapping (type: fleet, ssh_config: ...)")])
    kind = src.data.get("type", "fleet")
    if kind != "fleet":
        raise ConfigError([src.problem(("type",), f"must be fleet (or, for runs, task, service or "
                                                  f"dev-environment); got {kind!r}")])
    cfg = validate(FleetConfig, src, context={"base_dir": str(path.resolve().parent)})
    return resolve(cfg, src, default_name=path.stem)


def validate(model: Any, src: YamlSource, context: dict | None = None) -> Any:
    """Validate ``src.data`` against a pydantic model (or a TypeAdapter), errors with positions."""
    adapter = model if isinstance(model, TypeAdapter) else TypeAdapter(model)
    try:
        return adapter.validate_python(src.data, context=context)
    except ValidationError as e:
        root = model if isinstance(model, type) and issubclass(model, BaseModel) else None
        problems = sorted(_problems(e, src, root), key=lambda p: (p.line or 0, p.column or 0))
        raise ConfigError(problems) from None


def resolve(cfg: FleetConfig, src: YamlSource, default_name: str) -> Fleet:
    ssh = cfg.ssh_config
    problems: list[ConfigProblem] = []
    targets: list[Target] = []
    seen: dict[str, int] = {}
    for i, h in enumerate(ssh.hosts):
        user = h.user or ssh.user
        key = h.identity_file or ssh.identity_file
        chain = h.proxy_jump if h.proxy_jump is not None else (ssh.proxy_jump or [])
        jumps = tuple(Hop(j.hostname, j.port or 22, j.user or ssh.user, j.identity_file or ssh.identity_file)
                      for j in chain)
        t = Target(hostname=h.hostname, port=h.port or ssh.port or 22, user=user, identity_file=key,
                   jumps=jumps, blocks=h.blocks if h.blocks is not None else cfg.blocks,
                   internal_ip=str(h.internal_ip) if h.internal_ip else None)
        loc: Loc = ("ssh_config", "hosts", i)
        if user is None:
            problems.append(src.problem(loc, "no user: set ssh_config.user or the host's user"))
        if t.address in seen:
            problems.append(src.problem(loc, f"{t.address} is listed twice (first as hosts[{seen[t.address]}])"))
        seen.setdefault(t.address, i)
        targets.append(t)
    name = cfg.name or re.sub(r"[^a-z0-9-]+", "-", default_name.lower().split(".")[0]).strip("-") or "fleet"
    if not name[0].isalpha():
        name = "fleet-" + name
    if not problems:
        problems += _alias_clashes(src, name, targets)
    if problems:
        raise ConfigError(problems)
    env, _secrets = split_env(cfg.env)
    return Fleet(name=name, source=src.file, placement=cfg.placement, env=env, network=ssh.network,
                 targets=tuple(targets), config=cfg)


def _alias_clashes(src: YamlSource, fleet_name: str, targets: list[Target]) -> list[ConfigProblem]:
    """Two hosts may not get the same Host alias in ssh_config and inventory (e.g. `n` on ports 1 and
    2 becomes n-1 and n-2, which clashes with a host named n-1), nor a jump hop's alias."""
    from gpufleet.inventory import target_aliases  # inventory imports this module

    out = []
    first: dict[str, int] = {}
    for i, alias in enumerate(target_aliases(tuple(targets))):
        if alias in first:
            out.append(src.problem(("ssh_config", "hosts", i), f"its inventory name {alias!r} is also the name "
                                                              f"of hosts[{first[alias]}]; rename one"))
        elif re.fullmatch(re.escape(fleet_name) + r"-jump\d+", alias):
            out.append(src.problem(("ssh_config", "hosts", i),
                                   f"{alias!r} is the name gpufleet gives to jump hosts of fleet {fleet_name}"))
        first.setdefault(alias, i)
    return out


def _problems(err: ValidationError, src: YamlSource, model: type[BaseModel] | None) -> list[ConfigProblem]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if model is None and loc and isinstance(loc[0], str) and loc[0] not in (src.data or {}):
            loc = loc[1:]  # a tagged union's member name (e.g. 'task'), not a field of the file
        loc = _source_loc(src.data, loc)
        kind = e["type"]
        if kind == "extra_forbidden":
            field = loc[-1]
            msg = f"unknown field {field!r}"
            if field in _CLOUD_ONLY and len(loc) == 1:
                msg += " (a dstack cloud-fleet field; gpufleet manages SSH fleets only)"
            elif model is not None:
                close = difflib.get_close_matches(str(field), _fields_at(model, loc[:-1]), n=1)
                if close:
                    msg += f"; did you mean {close[0]!r}?"
            out.append(src.problem(loc, msg, prefer_key=True))
        elif kind == "missing":
            out.append(src.problem(loc, f"required field {loc[-1]!r} is missing"))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if kind == "literal_error":
                msg = f"{msg} (got {e.get('input')!r})"
            out.append(src.problem(loc, msg))
    return out


_UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _source_loc(data: Any, loc: tuple) -> Loc:
    """Pydantic's loc, minus the list indices our validators added (a single hop given as a mapping)
    and the names pydantic gives the members of a union (`env.dict[str,union].A.str`)."""
    out = []
    for part in loc:
        if isinstance(part, int) and not isinstance(data, list):
            continue
        if isinstance(part, str) and ("[" in part or part in _UNION_MEMBERS) and \
                not (isinstance(data, dict) and part in data):
            continue
        out.append(part)
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            data = None
    return tuple(out)


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        if info is None:
            return []
        nested = _model_in(info.annotation)
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found:
            return found
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and isinstance(origin, type) and issubclass(origin, BaseModel):
        return origin
    return None
