"""A service's `rate_limits` (dstack's, issue 16): which rule a request falls under and whether it is over it.

Pure (no I/O, the clock passed in): the server's service endpoint (gpufleet.server.proxy) asks
``Limiter.check`` before it carries a request, and answers 429 to a ``Refusal``.

dstack applies its rate limits on its gateway, as nginx's ``limit_req`` (gateway/services/registry.py
and resources/nginx/service.jinja2): one zone per rule, keyed by the client address (``$binary_remote_addr``)
or a header (``$http_NAME``), at ``round(rps * 60)`` requests a minute, one ``location PREFIX`` per rule
(nginx takes the longest prefix that matches, and only that location's limit applies; a path under no
rule's prefix is not limited), ``burst=N nodelay`` when the rule has a burst, ``limit_req_status 429``.
This module counts as nginx's limit_req does (ngx_http_limit_req_module.c: a "leaky bucket" kept in
thousandths of a request and milliseconds):

- each (service run, rule, key value) has an ``excess`` and the time of its last passed request; a new
  one starts at excess 0;
- a request at ``now``: excess' = max(0, excess - rate * elapsed_ms / 1000 + 1000), rate in thousandths
  of a request a second; excess' above burst * 1000 is refused (and changes nothing), else it passes and
  is kept. So burst + 1 requests at once pass, then one every 1/rate seconds. With `nodelay` (dstack sets
  it whenever burst > 0; with burst 0 nothing is ever delayed) a passing request is never delayed;
- a request whose key is empty (no such header, or an empty one) is not counted, as in nginx.

Memory is bounded: an entry whose excess has drained (it now reads as a new one) is dropped as the
entries are touched (the least recently used are looked at first), and past ``size`` entries the least
recently used goes. A header's value (it may be a credential: `key: {type: header, header:
Authorization}`) is kept only as a hash. State is this process's: each server process counts its own.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

SIZE = 65536  # entries kept at most (each a few hundred bytes)


@dataclass(frozen=True)
class Rule:
    """One of a service's `rate_limits`, as the server applies it."""

    prefix: str
    rps: float
    burst: int
    header: str | None = None  # the key's header (lower case, `_` read as `-`); None: the client address

    @property
    def per_minute(self) -> int:
        """The rate nginx is given (dstack: round(rps * 60) requests a minute, at least 1)."""
        return max(1, round(self.rps * 60))

    @property
    def rate(self) -> int:
        """Thousandths of a request a second that drain from a key's excess (nginx: rate * 1000 / 60)."""
        return self.per_minute * 1000 // 60

    @property
    def key_words(self) -> str:
        return f"per value of header {self.header}" if self.header else "per client address"

    def describe(self) -> dict:
        return {"prefix": self.prefix, "rps": self.rps, "burst": self.burst,
                "key": {"type": "header", "header": self.header} if self.header else {"type": "ip_address"}}


@dataclass(frozen=True)
class Refusal:
    """A request over ``rule``: it may pass again in ``retry_after`` seconds (at least 1, whole)."""

    rule: Rule
    retry_after: int

    def message(self, service: str) -> str:
        r = self.rule
        return (f"service {service}: too many requests under {r.prefix} (its rate limit: {r.rps:g} requests/s, "
                f"burst {r.burst}, {r.key_words}); retry in {self.retry_after} s")


def rules(limits: Iterable[dict]) -> tuple[Rule, ...]:
    """The rules of a run's `rate_limits` as its spec keeps them (ServiceConfig's RateLimit, dumped)."""
    out = []
    for r in limits:
        key = r.get("key") or {}
        header = key.get("header") if key.get("type") == "header" else None
        out.append(Rule(r.get("prefix", "/"), float(r["rps"]), int(r.get("burst", 0)),
                        header.lower().replace("_", "-") if header else None))
    return tuple(out)


def normal_path(path: str) -> str:
    """The path a rule's prefix is matched against, as nginx matches a location: slashes merged, `.` and `..`
    segments resolved (so that /a/../v1/ is limited as /v1/ is); ``path`` is already percent-decoded."""
    parts: list[str] = []
    segments = path.split("/")
    for seg in segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if parts:
                parts.pop()
            continue
        parts.append(seg)
    out = "/" + "/".join(parts)
    if parts and segments[-1] in ("", ".", ".."):
        out += "/"
    return out


def match(rules_: Iterable[Rule], path: str) -> Rule | None:
    """The rule of the longest prefix ``path`` (normalised) starts with; None: no rule limits it."""
    path = normal_path(path)
    best = None
    for r in rules_:
        if path.startswith(r.prefix) and (best is None or len(r.prefix) > len(best.prefix)):
            best = r
    return best


def key_value(rule: Rule, client: str, header_values: Callable[[str], list[str]]) -> str:
    """What ``rule`` counts a request by: its client address, or its header's value (a hash of it; several
    lines of it joined as nginx ≥ 1.23 joins them); "" (not counted) when there is none."""
    if rule.header is None:
        return client
    value = ", ".join(header_values(rule.header))
    return hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest() if value else ""


class Limiter:
    """The counts of every limited service of a server process."""

    def __init__(self, size: int = SIZE):
        self.size = size
        # (run id, prefix, key value) -> [excess (thousandths of a request), last passed (ms), rate]
        self._seen: OrderedDict[tuple[str, str, str], list[int]] = OrderedDict()
        self._rules: dict[str, tuple[object, tuple[Rule, ...]]] = {}  # run id -> (its limits, read as rules)

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, scope: str, limits: Iterable[dict], path: str, client: str,
              header_values: Callable[[str], list[str]], now: float) -> Refusal | None:
        """A request of run ``scope`` (its id) with ``limits`` (its spec's `rate_limits`) to ``path`` (below
        the service's prefix) from ``client``, at ``now`` (seconds, a monotonic clock): counted, and
        refused (a Refusal) when over its rule."""
        rule = match(self._rules_of(scope, limits), path)
        if rule is None:
            return None
        key = key_value(rule, client, header_values)
        if not key:
            return None
        wait = self.take((scope, rule.prefix, key), rule, now)
        return None if wait is None else Refusal(rule, max(1, math.ceil(wait)))

    def _rules_of(self, scope: str, limits: Iterable[dict]) -> tuple[Rule, ...]:
        """``limits`` read as rules, once per run (while it is the same object: a run as the server last saw it)."""
        hit = self._rules.get(scope)
        if hit is not None and hit[0] is limits:
            return hit[1]
        if len(self._rules) >= 1024:
            self._rules.clear()
        read = rules(limits)
        self._rules[scope] = (limits, read)
        return read

    def take(self, key: tuple[str, str, str], rule: Rule, now: float) -> float | None:
        """Count one request of ``key`` under ``rule`` at ``now``: None when it passes, else the seconds until
        one would."""
        ms = int(now * 1000)
        self._expire(ms)
        entry = self._seen.get(key)
        if entry is None:
            if len(self._seen) >= self.size:
                self._seen.popitem(last=False)  # the least recently used
            self._seen[key] = [0, ms, rule.rate]
            return None
        self._seen.move_to_end(key)
        excess, last, rate = entry
        elapsed = max(0, ms - last)
        new = max(0, excess - rate * elapsed // 1000 + 1000)
        if new > rule.burst * 1000:
            # passes once excess - rate * elapsed' // 1000 + 1000 <= burst * 1000
            need = excess + 1000 - rule.burst * 1000
            return max(0, -(-need * 1000 // rate) - elapsed) / 1000
        entry[0] = new
        if elapsed:
            entry[1] = ms
        return None

    def _expire(self, ms: int, n: int = 2) -> None:
        """Drop up to ``n`` of the least recently used entries whose excess has drained: a request now would
        find it at 0, as a new entry's."""
        for _ in range(n):
            if not self._seen:
                return
            key, (excess, last, rate) = next(iter(self._seen.items()))
            if excess + 1000 - rate * max(0, ms - last) // 1000 > 0:
                return
            del self._seen[key]
