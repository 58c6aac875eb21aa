"""Probe a fleet's hosts: open the login node connections first, then run playbooks/probe.yml."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from gpufleet import ssherrors
from gpufleet.inventory import GeneratedFiles, PlannedTarget, SshEntry
from gpufleet.runner import HostOutcome, run_playbook

JUMP_TIMEOUT = 40  # seconds for one hop's master connection (ConnectTimeout is 10 per attempt)
MAX_DIAGNOSES = 8  # failed hosts re-checked one by one for the login node's reason


@dataclass
class ProbeOutcome:
    alias: str
    status: str  # ok | unreachable | failed
    reason: str = ""
    facts: dict = field(default_factory=dict)


def open_jump(files: GeneratedFiles, entry: SshEntry) -> str | None:
    """Open (or reuse) the multiplexed master connection to one hop. Return the error, if any."""
    cmd = ["ssh", "-F", str(files.ssh_config), "-o", "ControlPersist=120s", "-n", entry.alias, "true"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=JUMP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"no answer within {JUMP_TIMEOUT}s"
    if p.returncode == 0:
        return None
    return ssherrors.explain(p.stderr, f"{entry.hostname}:{entry.port}", str(files.known_hosts))


def probe_fleet(files: GeneratedFiles, aliases: list[str],
                on_update: Callable[[str, str, str], None] | None = None) -> dict[str, ProbeOutcome]:
    """Probe ``aliases`` of the fleet in ``files``. ``on_update(alias, status, message)`` reports progress."""
    plan = files.plan
    outcomes: dict[str, ProbeOutcome] = {}
    failed_jumps: dict[str, str] = {}
    by_alias = {e.alias: e for e in plan.jumps}
    for entry in plan.jumps:  # in chain order: a hop after the hop it goes through
        if entry.proxy_jump in failed_jumps:
            failed_jumps[entry.alias] = failed_jumps[entry.proxy_jump]
            continue
        if not any(t.jump_alias and _chain_has(by_alias, t.jump_alias, entry.alias)
                   for t in plan.targets if t.alias in aliases):
            continue
        error = open_jump(files, entry)
        if error:
            failed_jumps[entry.alias] = f"login node {entry.hostname}:{entry.port} unreachable: {error}"
    reachable = []
    for t in plan.targets:
        if t.alias not in aliases:
            continue
        if t.jump_alias in failed_jumps:
            outcomes[t.alias] = ProbeOutcome(t.alias, "unreachable", failed_jumps[t.jump_alias])
            if on_update:
                on_update(t.alias, "unreachable", outcomes[t.alias].reason)
        else:
            reachable.append(t.alias)
    if not reachable:
        return outcomes

    def update(o: HostOutcome) -> None:
        if on_update:
            on_update(o.host, o.status, o.message)

    result = run_playbook("probe", files.inventory, limit=reachable, on_update=update)  # a fork per host
    if result.canceled:
        raise KeyboardInterrupt
    by_target = {t.alias: t for t in plan.targets}
    diagnosed = 0
    for alias in reachable:
        o = result.hosts.get(alias) or HostOutcome(alias, "failed", "no result from the probe")
        facts = (o.results.get("gpufleet_probe") or {}).get("ansible_facts", {}).get("gpufleet_probe")
        target = next(t.target for t in plan.targets if t.alias == alias)
        if o.status == "unreachable":
            message = o.message
            if diagnosed < MAX_DIAGNOSES and ssherrors.hides_cause(message):
                diagnosed += 1
                message = diagnose(files, by_target[alias]) or message
            outcomes[alias] = ProbeOutcome(alias, "unreachable",
                                           ssherrors.explain(message, target.address, str(files.known_hosts)))
        elif o.status == "failed" or facts is None:
            outcomes[alias] = ProbeOutcome(alias, "failed", o.message or "the probe returned no facts")
        else:
            outcomes[alias] = ProbeOutcome(alias, "ok", "", facts)
    return outcomes


def diagnose(files: GeneratedFiles, target: PlannedTarget) -> str | None:
    """Reconnect once without multiplexing on the last hop, so the login node's own reason
    (connection refused, no route...) reaches us instead of the shared master's log."""
    if not target.jump_alias:
        return None
    hop = ["ssh", "-F", str(files.ssh_config), "-o", "ControlPath=none", "-W", "%h:%p", target.jump_alias]
    cmd = ["ssh", "-F", str(files.ssh_config), "-o", "ControlPath=none", "-o",
           "ProxyCommand=" + shlex.join(hop), "-n", target.alias, "true"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=JUMP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    return None if p.returncode == 0 else p.stderr


def _chain_has(by_alias: dict[str, SshEntry], last: str, alias: str) -> bool:
    current: str | None = last
    while current:
        if current == alias:
            return True
        current = by_alias[current].proxy_jump if current in by_alias else None
    return False
