"""Fleets: the dstack SSH-fleet schema (what a fleet file says) and the resolved fleet (every host
with its user, key, jump chain, blocks and inventory alias worked out)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from gpufleet.models.core import CoreModel
from gpufleet.models.env import Env
from gpufleet.models.images import ImageList
from gpufleet.sshkeys import check_private_key

_HOST_RE = re.compile(r"^[A-Za-z0-9_.:%\[\]-]+$")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")


def _name(v: str | None) -> str | None:
    if v is not None and not NAME_RE.match(v):
        raise ValueError(f"{v!r} must be lowercase letters, digits and '-', starting with a letter")
    return v


# a fleet's or a run's name
Name = Annotated[str | None, AfterValidator(_name)]


def _no_bool_int(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"must be a whole number, not {str(v).lower()}")
    return v


def _blocks(v: Any) -> int | str:
    if v == "auto":
        return v
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)  # dstack reads `blocks: '4'` as 4 (pydantic's lax int)
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
    if not (info.context or {}).get("check_keys", True):  # a stored config: the key concerns the next apply
        return str(path)
    problem = check_private_key(path)
    if problem:
        raise ValueError(problem)
    return str(path)


class ProxyJump(CoreModel):
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


class HostParams(CoreModel):
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


class SSHParams(CoreModel):
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


def normal_host_path(text: str) -> str:
    """A host path written the one way gpufleet compares paths: absolute, no empty or `.` parts, no
    trailing '/' (`/data/./x//` is `/data/x`). Purely by its text: nothing is resolved (the path is on
    the host, not here). ValueError for a relative path, a `..` part (whose meaning depends on the
    host's symlinks), a ':' or ',' (they separate a volume's parts) or a control character."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise ValueError(f"{text!r} must be an absolute host path, e.g. /data")
    if any(ord(c) < 32 or c == "\x7f" for c in text):
        raise ValueError(f"{text!r}: a host path may not contain control characters")
    if ":" in text or "," in text:
        raise ValueError(f"{text!r}: a host path may not contain ':' or ','")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{text!r}: '..' is not allowed in a host path (write the path it leads to)")
    return "/" + "/".join(parts)


def path_is_under(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it, both normal (normal_host_path): by whole parts, so
    /database is not under /data."""
    return root == "/" or path == root or path.startswith(root + "/")


HostPath = Annotated[str, AfterValidator(normal_host_path)]


class AdminPolicy(CoreModel):
    """What project admins may do beyond what `policy` lets every project member do. Each field adds
    to the members' rule, never takes from it (false: nothing more than members)."""

    volumes: list[HostPath] = Field(
        [], description="More host paths (and what is below them) that project admins' runs may mount.")
    privileged: StrictBool = Field(
        False, description="Project admins' runs may be `privileged: true` or `docker: true`.")
    host_network: StrictBool = Field(
        False, description="Project admins' single-node runs may use the host's network (`network: host`).")


class FleetPolicy(CoreModel):
    """What runs on this fleet may touch on its hosts (gpufleet's extension of dstack's fleet file).
    The defaults allow nothing: no host path, no privileged container, no host network for single-node
    runs. A container that mounts the host's `/` or runs privileged is root on the host, on every other
    run there and on the fleet's keys, so only the fleet's owner, writing it here, gives that. Server
    admins (who hold the fleet's SSH keys anyway) are not limited by the policy."""

    volumes: list[HostPath] = Field(
        [], description="Host paths (and what is below them) that runs may bind-mount (`volumes: "
                        "[/data:/data]`), compared part by part after normalizing (`/data/` is `/data`; "
                        "`/database` is not under `/data`; `..` is refused). Default: none.")
    privileged: StrictBool = Field(
        False, description="Runs may be `privileged: true` or `docker: true` (docker-in-docker needs a "
                           "privileged container): root on the host. Default: false.")
    host_network: StrictBool = Field(
        False, description="Single-node runs may ask for the host's network (`network: host`); without it "
                           "each gets its own network namespace with its ports published on the host's "
                           "127.0.0.1. Multi-node runs always use the host's network (NCCL between hosts "
                           "needs it). Default: false.")
    admins: AdminPolicy = Field(
        AdminPolicy(), description="What project admins may do beyond that (a project admin is not a host "
                                   "admin). Default: the same as members.")


class FleetConfig(CoreModel):
    """A fleet of existing hosts reached over SSH (dstack's SSH fleet)."""

    type: Literal["fleet"] = Field(description="Always `fleet`.")
    name: Name = Field(None, description="Fleet name (default: the file name).")
    env: Env = Field(
        None, description="Environment for every workload on the fleet: a mapping or KEY=VALUE list. A name "
                          "without a value is a secret, read from the environment of `gpufleet apply`.")
    placement: Literal["any", "cluster"] = Field(
        "any", description="`cluster`: hosts are interconnected, for multi-node tasks.")
    blocks: Blocks = Field(1, description='Slices per host: "auto" (one per GPU) or N dividing the GPU count.')
    ssh_config: SSHParams = Field(description="How to reach the hosts.")
    policy: FleetPolicy = Field(
        FleetPolicy(), description="gpufleet's extension: what runs on this fleet may touch on its hosts (host "
                                   "paths, privileged containers, host networking). Default: nothing.")
    images: ImageList | None = Field(
        None, description="gpufleet's extension: the images a run without `image` may get on this fleet, each "
                          "{image, python, nvcc, default}; a run's `python` and `nvcc` choose among them (none "
                          "fits: the run is refused). Omitted: the server's `images`, else dstack's default images.")
    plugin: str | None = Field(None, description="Set by Ansible's inventory plugin loader; ignored here.")


class Hop(CoreModel):
    """One SSH hop: a login node on the way to a target."""

    model_config = ConfigDict(frozen=True)

    hostname: str
    port: int
    user: str | None
    identity_file: str | None


class Target(CoreModel):
    """A fleet host with every setting resolved, and its name in the inventory and ssh_config."""

    model_config = ConfigDict(frozen=True)

    alias: str
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

    @property
    def via(self) -> str:
        return " -> ".join(f"{j.hostname}:{j.port}" for j in self.jumps) or "direct"


class Fleet(CoreModel):
    """A fleet as gpufleet works with it: its config validated and every host resolved."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str
    placement: str
    env: dict[str, str]
    network: str | None
    targets: tuple[Target, ...]
    config: FleetConfig

    def target(self, alias: str) -> Target:
        return next(t for t in self.targets if t.alias == alias)


def target_aliases(addresses: list[tuple[str, int]]) -> list[str]:
    """Inventory names of (hostname, port) pairs: the hostname, or hostname-port where a hostname
    appears with several ports."""
    counts: dict[str, int] = {}
    for hostname, _ in addresses:
        counts[hostname] = counts.get(hostname, 0) + 1
    return [h if counts[h] == 1 else f"{h}-{port}" for h, port in addresses]
