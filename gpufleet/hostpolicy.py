"""What a run may touch on a fleet's hosts: a run's config checked against the fleet's `policy`.

Pure: models only, nothing is read from disk, the state or the hosts, and no path is resolved here
(host paths are compared by their text, normalized by `normal_host_path`; the container module
resolves symlinks on the host itself, against `volume_roots`). A run's `volumes` are checked as the
one model both of their forms are read into (models.run.Volume): a string `/data:/d` and
{instance_path: /data, path: /d, optional: true} meet the same rule, and an optional volume is no
exception.

Roles: ``member`` and ``admin`` are a user's role in the run's project; ``server-admin`` is a server
admin, who holds the fleet's SSH keys anyway and is not limited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpufleet.models import FleetConfig, FleetPolicy, RunConfigType, normal_host_path, path_is_under

ROLES = ("member", "admin", "server-admin")


@dataclass(frozen=True)
class Rules:
    """What one role's runs may do on a fleet (the policy's rules for members, plus `admins` for admins)."""

    volumes: tuple[str, ...]
    privileged: bool
    host_network: bool
    where: str  # the policy fields these come from, for messages: "policy.X" or "policy.X, policy.admins.X"


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")


def policy_of(config: FleetPolicy | FleetConfig | Mapping[str, Any] | None) -> FleetPolicy:
    """The policy of a fleet: from its config (a FleetConfig, or the config dict the state keeps, whose
    `policy` may be missing: a fleet applied before policies had none, so it gets the default, which
    allows nothing), or a policy itself (a FleetPolicy or its dict). None: the default."""
    if config is None:
        return FleetPolicy()
    if isinstance(config, FleetPolicy):
        return config
    if isinstance(config, FleetConfig):
        return config.policy
    if "type" in config or "ssh_config" in config:  # a whole fleet config
        return FleetPolicy.model_validate(config.get("policy") or {})
    return FleetPolicy.model_validate(config)


def rules(policy: FleetPolicy | None, role: str) -> Rules | None:
    """What ``role``'s runs may do under ``policy``; None for a server admin (not limited). An admin's
    rules are the members' plus `policy.admins` (it adds, never takes away)."""
    _check_role(role)
    if role == "server-admin":
        return None
    p = policy or FleetPolicy()
    if role == "member":
        return Rules(tuple(p.volumes), p.privileged, p.host_network, "policy.{}")
    a = p.admins
    return Rules(tuple(dict.fromkeys([*p.volumes, *a.volumes])), p.privileged or a.privileged,
                 p.host_network or a.host_network, "policy.{0}, policy.admins.{0}")


def volume_roots(policy: FleetPolicy | None, role: str) -> list[str] | None:
    """The host paths ``role``'s runs may mount (the container module checks each volume's real path,
    symlinks resolved on the host, against them); None: not limited (a server admin)."""
    r = rules(policy, role)
    return None if r is None else list(r.volumes)


def _who(role: str) -> str:
    return "runs" if role == "member" else "project admins' runs"


def violations(cfg: RunConfigType, policy: FleetPolicy | None, role: str, fleet: str = "this fleet") -> list[str]:
    """Every rule of ``policy`` that run ``cfg`` submitted by ``role`` breaks, one message each (empty:
    allowed). ``fleet`` names the fleet in the messages, e.g. `volume /:/host: fleet gpu-a lets runs
    mount only /data, /scratch (policy.volumes)`."""
    r = rules(policy, role)
    if r is None:
        return []
    name = fleet if fleet == "this fleet" else f"fleet {fleet}"
    out: list[str] = []
    for volume in cfg.volumes:  # each a Volume, whichever form it was written in (optional ones too)
        try:
            path = normal_host_path(volume.instance_path)
        except ValueError as e:
            out.append(f"volume {volume}: {e} ({r.where.format('volumes')})")
            continue
        if not any(path_is_under(path, root) for root in r.volumes):
            allowed = f"only {', '.join(r.volumes)}" if r.volumes else "no host path"
            out.append(f"volume {volume}: {name} lets {_who(role)} mount {allowed} ({r.where.format('volumes')})")
    if not r.privileged:
        for field in ("privileged", "docker"):
            if getattr(cfg, field):
                needs = "" if field == "privileged" else ", which docker: true needs"
                out.append(f"{field}: {name} does not allow privileged {_who(role)}{needs} "
                           f"({r.where.format('privileged')})")
    if cfg.network == "host" and getattr(cfg, "nodes", 1) == 1 and not r.host_network:
        out.append(f"network: host: {name} does not allow single-node {_who(role)} on the host's network "
                   f"({r.where.format('host_network')})")
    return out


def allowed_fleets(cfg: RunConfigType, policies: Mapping[str, FleetPolicy | None], role: str
                   ) -> tuple[list[str], dict[str, list[str]]]:
    """Of the fleets in ``policies`` (name -> its policy), the ones run ``cfg`` submitted by ``role``
    may use, in the mapping's order, and for each other one why not: the rules it breaks, or that the
    run's `fleets` does not name it."""
    _check_role(role)
    allowed: list[str] = []
    out: dict[str, list[str]] = {}
    for fleet, policy in policies.items():
        if cfg.fleets is not None and fleet not in cfg.fleets:
            out[fleet] = [f"fleet {fleet}: not among the run's fleets ({', '.join(cfg.fleets) or 'none'})"]
            continue
        broken = violations(cfg, policy, role, fleet=fleet)
        if broken:
            out[fleet] = broken
        else:
            allowed.append(fleet)
    return allowed, out
