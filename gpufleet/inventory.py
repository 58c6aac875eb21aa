"""Turn a resolved fleet into an Ansible inventory and an ssh_config (Jinja2 templates).

The connection plan is computed here once: each distinct jump hop (with its own
upstream chain) becomes one ``Host`` entry, so every target behind the same login
node shares one multiplexed connection to it. The templates only format.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2

from gpufleet import paths
from gpufleet.config import Fleet, Hop, Target

CONNECT_TIMEOUT = 10
CONTROL_PERSIST = "120s"


@dataclass(frozen=True)
class SshEntry:
    alias: str
    hostname: str
    port: int
    user: str | None
    identity_file: str | None
    proxy_jump: str | None


@dataclass(frozen=True)
class PlannedTarget:
    alias: str
    target: Target
    jump_alias: str | None  # the last hop, i.e. the login node the target is reached from


@dataclass(frozen=True)
class ConnectionPlan:
    jumps: list[SshEntry]  # in dependency order: a hop comes after the hop it goes through
    targets: list[PlannedTarget]

    @property
    def entries(self) -> list[SshEntry]:
        return self.jumps + [_target_entry(t) for t in self.targets]


@dataclass(frozen=True)
class GeneratedFiles:
    dir: Path
    inventory: Path
    ssh_config: Path
    known_hosts: Path
    plan: ConnectionPlan


def _ssh_path(value: str | None) -> str | None:
    # '%' starts a token in ssh_config paths and in HostName (fe80::1%eth0 must stay as written)
    return value.replace("%", "%%") if value else value


def _target_entry(t: PlannedTarget) -> SshEntry:
    return SshEntry(t.alias, _ssh_path(t.target.hostname), t.target.port, t.target.user,
                    _ssh_path(t.target.identity_file), t.jump_alias)


def target_aliases(targets: tuple[Target, ...]) -> list[str]:
    """Inventory names: the hostname, or hostname-port where a hostname appears with several ports."""
    counts: dict[str, int] = {}
    for t in targets:
        counts[t.hostname] = counts.get(t.hostname, 0) + 1
    return [t.hostname if counts[t.hostname] == 1 else f"{t.hostname}-{t.port}" for t in targets]


def plan_connections(fleet: Fleet) -> ConnectionPlan:
    hop_alias: dict[tuple[Hop, ...], str] = {}
    jumps: list[SshEntry] = []
    targets: list[PlannedTarget] = []
    for alias, t in zip(target_aliases(fleet.targets), fleet.targets, strict=True):
        previous: str | None = None
        for depth in range(len(t.jumps)):
            chain = t.jumps[: depth + 1]
            if chain not in hop_alias:
                hop = chain[-1]
                hop_alias[chain] = f"{fleet.name}-jump{len(hop_alias)}"
                jumps.append(SshEntry(hop_alias[chain], _ssh_path(hop.hostname), hop.port, hop.user,
                                      _ssh_path(hop.identity_file), previous))
            previous = hop_alias[chain]
        targets.append(PlannedTarget(alias, t, previous))
    return ConnectionPlan(jumps, targets)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.content_root() / "inventory_templates")),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined, autoescape=False)


def fleet_control_dir(fleet_name: str) -> Path:
    """Each fleet multiplexes its own connections: a master opened with another fleet's key or
    known_hosts is never reused for this one. Short (a hash) so socket paths fit in 108 bytes."""
    digest = hashlib.sha1(fleet_name.encode()).hexdigest()[:8]
    return paths.ensure_private_dir(paths.control_dir() / digest)


def group_name(fleet_name: str) -> str:
    return "fleet_" + re.sub(r"[^A-Za-z0-9_]", "_", fleet_name)


def write_fleet_files(fleet: Fleet, out_dir: Path | None = None,
                      probed: dict[str, dict] | None = None) -> GeneratedFiles:
    """Render inventory.yml and ssh_config for ``fleet`` into its state folder (or ``out_dir``).
    ``probed`` (alias -> probe facts) adds what the probe found that plays need, e.g. the runtime."""
    out = paths.ensure_private_dir(out_dir) if out_dir else paths.fleet_dir(fleet.name)
    plan = plan_connections(fleet)
    inventory = out / "inventory.yml"
    ssh_config = out / "ssh_config"
    known_hosts = out / "known_hosts"
    if not known_hosts.exists():
        known_hosts.touch(mode=0o600)
    env = _environment()
    env.filters["quote"] = shlex.quote
    common = dict(fleet=fleet, ssh_config_path=str(ssh_config), inventory_path=str(inventory),
                  control_dir=str(fleet_control_dir(fleet.name)))
    _write(ssh_config, env.get_template("ssh_config.j2").render(
        entries=plan.entries, known_hosts=_ssh_path(str(known_hosts)),
        ssh_control_dir=_ssh_path(common["control_dir"]), connect_timeout=CONNECT_TIMEOUT,
        control_persist=CONTROL_PERSIST, **common))
    runtimes = {alias: facts.get("runtime") or {} for alias, facts in (probed or {}).items()}
    _write(inventory, env.get_template("inventory.yml.j2").render(
        group=group_name(fleet.name), targets=plan.targets, runtimes=runtimes, **common))
    return GeneratedFiles(out, inventory, ssh_config, known_hosts, plan)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
