"""Probe a fleet's hosts: open the login node connections first, then run playbooks/probe.yml."""

from __future__ import annotations

import shlex
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from gpufleet import ssherrors
from gpufleet.inventory import CONTROL_PERSIST, GeneratedFiles, SshEntry
from gpufleet.models import HostFacts, HostStatus, Target
from gpufleet.runner import HostOutcome, PlaybookResult, run_playbook

JUMP_TIMEOUT = 40  # seconds for one hop's master connection (ConnectTimeout is 10 per attempt)
MAX_DIAGNOSES = 8  # failed hosts re-checked one by one for the login node's reason
# tasks of the gpu_probe role that gpufleet's own probe leaves out (issue 17): the role's argument check
# (tagged always; gpufleet sets none of the role's variables, and the module checks its own arguments) and
# the summary line (shown only with -v). Each is a worker process per host on the controller; a user's
# playbook running the role keeps both.
PROBE_SKIP_TAGS = ["always", "gpu_probe_summary"]


@dataclass
class ProbeOutcome:
    alias: str
    status: HostStatus
    reason: str = ""
    facts: HostFacts | None = None


@dataclass(frozen=True)
class HopPlace:
    """Where a hop sits in its jump chain: hop ``number`` of ``of`` (counted from 1)."""
    number: int
    of: int

    def name(self, entry: SshEntry) -> str:
        """How messages name the hop: the login node is the last hop (the one targets are reached
        from); a hop before it is a gateway."""
        where = f"{entry.hostname}:{entry.port}"
        if self.of == 1:
            return f"login node {where}"
        kind = "login node" if self.number == self.of else "gateway"
        return f"{kind} {where} (hop {self.number} of {self.of})"

    def settings(self) -> str:
        """The fleet settings a refused login at this hop points at."""
        which = "ssh_config.proxy_jump" if self.of == 1 else f"ssh_config.proxy_jump[{self.number - 1}]"
        return f"the user and identity_file of {which} (or of the host's own proxy_jump)"


def hop_places(files: GeneratedFiles) -> dict[str, HopPlace]:
    """Each jump hop's place in its chain (alias -> place), from the connection plan."""
    plan = files.plan
    by_alias = {e.alias: e for e in plan.jumps}

    def chain(last: str | None) -> list[str]:
        out = []
        while last:
            out.append(last)
            last = by_alias[last].proxy_jump if last in by_alias else None
        return out[::-1]

    places: dict[str, HopPlace] = {}
    for last in {a for a in plan.jump_of.values() if a}:
        hops = chain(last)
        for i, alias in enumerate(hops):
            places.setdefault(alias, HopPlace(i + 1, len(hops)))
    for e in plan.jumps:  # a hop no target goes through ends a chain of its own
        places.setdefault(e.alias, HopPlace(len(chain(e.alias)), len(chain(e.alias))))
    return places


def open_jump(files: GeneratedFiles, entry: SshEntry, place: HopPlace | None = None,
              before: SshEntry | None = None, before_place: HopPlace | None = None) -> str | None:
    """Open (or reuse) the multiplexed master connection to one hop. Return the error, if any.
    ``before`` is the hop it goes through (whose master is open): when that hop's master hides why it
    could not reach this one, the connection is tried again without it for the reason."""
    cmd = ["ssh", "-F", str(files.ssh_config), "-o", f"ControlPersist={CONTROL_PERSIST}", "-n", entry.alias, "true"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=JUMP_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"no answer within {JUMP_TIMEOUT}s"
    if p.returncode == 0:
        return None
    raw = p.stderr
    if before is not None and ssherrors.hides_cause(raw):
        raw = diagnose_through(str(files.ssh_config), before.alias, entry.alias) or raw
    via = (before_place or HopPlace(1, 1)).name(before) if before is not None else "the login node"
    return ssherrors.explain(raw, f"{entry.hostname}:{entry.port}", str(files.known_hosts), via=via,
                             check=(place or HopPlace(1, 1)).settings())


def probe_fleet(files: GeneratedFiles, aliases: list[str],
                on_update: Callable[[str, str, str], None] | None = None,
                cancel: threading.Event | None = None) -> dict[str, ProbeOutcome]:
    """Probe ``aliases`` of the fleet in ``files``. ``on_update(alias, status, message)`` reports
    progress; setting ``cancel`` stops the probe (KeyboardInterrupt)."""
    plan = files.plan
    outcomes: dict[str, ProbeOutcome] = {}
    failed_jumps: dict[str, str] = {}
    by_alias = {e.alias: e for e in plan.jumps}
    places = hop_places(files)
    for entry in plan.jumps:  # in chain order: a hop after the hop it goes through
        if entry.proxy_jump in failed_jumps:
            failed_jumps[entry.alias] = failed_jumps[entry.proxy_jump]
            continue
        if not any(plan.jump_of[t.alias] and _chain_has(by_alias, plan.jump_of[t.alias], entry.alias)
                   for t in plan.targets if t.alias in aliases):
            continue
        before = by_alias.get(entry.proxy_jump) if entry.proxy_jump else None
        error = open_jump(files, entry, places[entry.alias], before, places.get(before.alias) if before else None)
        if error:
            failed_jumps[entry.alias] = f"{places[entry.alias].name(entry)} unreachable: {error}"
    reachable = []
    for t in plan.targets:
        if t.alias not in aliases:
            continue
        if plan.jump_of[t.alias] in failed_jumps:
            outcomes[t.alias] = ProbeOutcome(t.alias, HostStatus.UNREACHABLE, failed_jumps[plan.jump_of[t.alias]])
            if on_update:
                on_update(t.alias, HostStatus.UNREACHABLE, outcomes[t.alias].reason)
        else:
            reachable.append(t.alias)
    if not reachable:
        return outcomes

    def update(o: HostOutcome) -> None:
        if on_update:
            on_update(o.host, o.status, o.message)

    result = run_playbook("probe", files.inventory, limit=reachable, on_update=update, cancel=cancel,
                          skip_tags=PROBE_SKIP_TAGS)  # a fork per host
    if result.canceled:
        raise KeyboardInterrupt
    targets = {t.alias: t for t in plan.targets}
    outcomes.update(probe_outcomes(result, [targets[a] for a in reachable], str(files.known_hosts),
                                   lambda t: diagnose(files, t)))
    return outcomes


def probe_outcomes(result: PlaybookResult, targets: list[Target], known_hosts: str,
                   diagnose_one: Callable[[Target], str | None]) -> dict[str, ProbeOutcome]:
    """What the probe playbook's result means for each of ``targets``: its facts, typed, or why
    not. For an unreachable host whose message hides the cause (a multiplexed login node), up to
    MAX_DIAGNOSES hosts are asked again one by one with ``diagnose_one``."""
    outcomes: dict[str, ProbeOutcome] = {}
    diagnosed = 0
    for target in targets:
        alias = target.alias
        o = result.hosts.get(alias) or HostOutcome(alias, HostStatus.FAILED, "no result from the probe")
        raw = (o.results.get("gpufleet_probe") or {}).get("ansible_facts", {}).get("gpufleet_probe")
        if o.status == HostStatus.UNREACHABLE:
            message = o.message
            if diagnosed < MAX_DIAGNOSES and ssherrors.hides_cause(message):
                diagnosed += 1
                message = diagnose_one(target) or message
            outcomes[alias] = ProbeOutcome(alias, HostStatus.UNREACHABLE,
                                           ssherrors.explain(message, target.address, known_hosts))
        elif o.status == HostStatus.FAILED or raw is None:
            outcomes[alias] = ProbeOutcome(alias, HostStatus.FAILED, o.message or "the probe returned no facts")
        else:
            try:
                outcomes[alias] = ProbeOutcome(alias, HostStatus.OK, "", HostFacts.model_validate(raw))
            except ValidationError as e:
                first = e.errors()[0]
                outcomes[alias] = ProbeOutcome(alias, HostStatus.FAILED,
                                               f"the probe's facts are not what gpufleet reads: {first['msg']} "
                                               f"at {'.'.join(map(str, first['loc']))}")
    return outcomes


def diagnose(files: GeneratedFiles, target: Target) -> str | None:
    """Reconnect once without multiplexing on the last hop, so the login node's own reason
    (connection refused, no route...) reaches us instead of the shared master's log."""
    jump = files.plan.jump_of.get(target.alias)
    return diagnose_through(str(files.ssh_config), jump, target.alias) if jump else None


def diagnose_through(ssh_config: str, jump: str, alias: str) -> str | None:
    """``diagnose`` for ``alias`` whose last hop is ``jump`` (both aliases of ``ssh_config``): ssh's error
    output, or None when it connects."""
    hop = ["ssh", "-F", ssh_config, "-o", "ControlPath=none", "-W", "%h:%p", jump]
    cmd = ["ssh", "-F", ssh_config, "-o", "ControlPath=none", "-o",
           "ProxyCommand=" + shlex.join(hop), "-n", alias, "true"]
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
