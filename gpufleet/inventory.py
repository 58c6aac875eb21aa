"""Turn a resolved fleet into an Ansible inventory and an ssh_config (Jinja2 templates).

The connection plan is computed here once: each distinct jump hop (with its own
upstream chain) becomes one ``Host`` entry, so every target behind the same login
node shares one multiplexed connection to it. The templates only format.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from gpufleet import paths
from gpufleet.models import Fleet, Hop, HostFacts, Target
from gpufleet.paths import FleetFiles

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
class ConnectionPlan:
    jumps: list[SshEntry]  # in dependency order: a hop comes after the hop it goes through
    targets: list[Target]
    jump_of: dict[str, str | None] = field(default_factory=dict)  # target alias -> its last hop's alias

    @property
    def entries(self) -> list[SshEntry]:
        return self.jumps + [SshEntry(t.alias, _ssh_path(t.hostname), t.port, t.user, _ssh_path(t.identity_file),
                                      self.jump_of[t.alias]) for t in self.targets]


@dataclass(frozen=True)
class GeneratedFiles(FleetFiles):
    plan: ConnectionPlan = field(default_factory=lambda: ConnectionPlan([], []))


def _ssh_path(value: str | None) -> str | None:
    # '%' starts a token in ssh_config paths and in HostName (fe80::1%eth0 must stay as written)
    return value.replace("%", "%%") if value else value


def plan_connections(fleet: Fleet) -> ConnectionPlan:
    hop_alias: dict[tuple[Hop, ...], str] = {}
    jumps: list[SshEntry] = []
    jump_of: dict[str, str | None] = {}
    for t in fleet.targets:
        previous: str | None = None
        for depth in range(len(t.jumps)):
            chain = t.jumps[: depth + 1]
            if chain not in hop_alias:
                hop = chain[-1]
                hop_alias[chain] = f"{fleet.name}-jump{len(hop_alias)}"
                jumps.append(SshEntry(hop_alias[chain], _ssh_path(hop.hostname), hop.port, hop.user,
                                      _ssh_path(hop.identity_file), previous))
            previous = hop_alias[chain]
        jump_of[t.alias] = previous
    return ConnectionPlan(jumps, list(fleet.targets), jump_of)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.content_root() / "inventory_templates")),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["quote"] = shlex.quote
    return env


def group_name(fleet_name: str) -> str:
    return "fleet_" + re.sub(r"[^A-Za-z0-9_]", "_", fleet_name)


def write_fleet_files(fleet: Fleet, out_dir: Path | None = None,
                      facts: dict[str, HostFacts] | None = None) -> GeneratedFiles:
    """Render inventory.yml and ssh_config for ``fleet`` into its state folder (or ``out_dir``).
    ``facts`` (alias -> probe facts) adds what the probe found that plays need: the runtime."""
    base = FleetFiles.of(fleet.name) if out_dir is None else FleetFiles(fleet.name, out_dir)
    files = GeneratedFiles(base.name, base.dir, plan_connections(fleet))
    files.create()
    env = _environment()
    control_dir = str(files.control_dir)
    common = dict(fleet=fleet, ssh_config_path=str(files.ssh_config), inventory_path=str(files.inventory))
    _write(files.ssh_config, env.get_template("ssh_config.j2").render(
        entries=files.plan.entries, known_hosts=_ssh_path(str(files.known_hosts)),
        ssh_control_dir=_ssh_path(control_dir), connect_timeout=CONNECT_TIMEOUT,
        control_persist=CONTROL_PERSIST, **common))
    # the runtime each play uses on a host, as the probe found it (the workload role's default otherwise)
    runtimes = {alias: (f.runtime.name, f.runtime.become) for alias, f in (facts or {}).items() if f.runtime.name}
    _write(files.inventory, env.get_template("inventory.yml.j2").render(
        group=group_name(fleet.name), targets=files.plan.targets, jump_of=files.plan.jump_of, runtimes=runtimes,
        control_dir=control_dir, **common))
    return files


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
