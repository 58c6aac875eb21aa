"""A service's `rate_limits` (issue 16): dstack's forms and their validation (each problem at its
file:line:field, in gpufleet's words), and the decision (gpufleet.ratelimit: nginx's limit_req as dstack's
gateway configures it) with a fake clock: the steady rate, the burst, keys counted apart, a header key,
the longest prefix, memory bounded. The route's 429 on a real server: test_service_proxy_ws.py."""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from gpufleet import ratelimit
from gpufleet.errors import ConfigError
from gpufleet.ratelimit import Limiter, Rule, match, normal_path, rules
from gpufleet.runconfig import parse_run

SERVICE = "type: service\nimage: busybox\nport: 80\n"


def _load(text: str):
    return parse_run(SERVICE + text, "s.yml", values=False).config


def _problem(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        _load(text)
    return str(e.value)


# ------------------------------------------------------------------ the forms dstack takes


def test_dstacks_forms_load_with_dstacks_defaults():
    cfg = _load("rate_limits:\n- rps: 4\n  burst: 9\n- prefix: /api/auth/\n  rps: 1\n"
                "- prefix: /v1/\n  rps: 0.5\n  key: {type: header, header: X-Api_Key}\n")
    a, b, c = cfg.rate_limits
    assert (a.prefix, a.rps, a.burst, a.key.type) == ("/", 4.0, 9, "ip_address")
    assert (b.prefix, b.rps, b.burst) == ("/api/auth/", 1.0, 0)
    assert (c.key.type, c.key.header) == ("header", "X-Api_Key")
    assert _load("").rate_limits == []
    spec = cfg.model_dump(mode="json")["rate_limits"]
    assert rules(spec) == (Rule("/", 4.0, 9), Rule("/api/auth/", 1.0, 0), Rule("/v1/", 0.5, 0, "x-api-key"))


@pytest.mark.parametrize("line,where,words", [
    ("rate_limits: [{rps: 0}]", "4:21: rate_limits[0].rps", "at least 1/60 (one a minute) (got 0)"),
    ("rate_limits: [{rps: true}]", "4:21: rate_limits[0].rps", "a number of requests a second"),
    ("rate_limits: [{rps: .inf}]", "4:21: rate_limits[0].rps", "(got inf)"),
    ("rate_limits: [{burst: 1}]", "4:15: rate_limits[0].rps", "required field 'rps' is missing"),
    ("rate_limits: [{rps: 1, burst: -1}]", "4:31: rate_limits[0].burst", "0 or more (got -1)"),
    ("rate_limits: [{rps: 1, burst: 1.5}]", "4:31: rate_limits[0].burst", "a whole number of requests"),
    ("rate_limits: [{rps: 1, prefix: v1}]", "4:32: rate_limits[0].prefix", "starts with / "),
    ("rate_limits: [{rps: 1, prefix: '/a b'}]", "4:32: rate_limits[0].prefix", "without spaces"),
    ("rate_limits: [{rps: 1, key: {type: header}}]", "4:29: rate_limits[0].key", "`type: header` needs `header`"),
    ("rate_limits: [{rps: 1, key: {type: header, header: 'a b'}}]", "4:52: rate_limits[0].key.header",
     "must be a header name"),
    ("rate_limits: [{rps: 1, key: {type: foo}}]", "4:29: rate_limits[0].key", "type must be ip_address or header"),
    ("rate_limits: [{rps: 1, key: ip_address}]", "4:29: rate_limits[0].key", "must be a mapping"),
    ("rate_limits: [{rps: 1, key: {header: X-A}}]", "4:29: rate_limits[0].key", "`header` goes with `type: header`"),
    ("rate_limits: [{rps: 1, brust: 2}]", "4:24: rate_limits[0].brust", "did you mean 'burst'?"),
    ("rate_limits: {rps: 1}", "4:14: rate_limits", "must be a list of rate limits"),
    ("rate_limits: [{rps: 1}, {prefix: /, rps: 2}]", "4:14: rate_limits",
     "prefix '/' is given more than once; each rate limit needs its own prefix"),
])
def test_a_bad_rate_limit_is_refused_at_its_field_in_gpufleets_words(line, where, words):
    text = _problem(line + "\n")
    assert f"s.yml:{where}: " in text and words in text, text
    assert "Input should" not in text and "Value error" not in text, text


# ------------------------------------------------------------------ the decision


def _no_headers(name: str) -> list[str]:
    return []


def _count(lim: Limiter, limits, times, path="/", client="1.2.3.4", headers=_no_headers) -> list[bool]:
    """Whether each request (at each time) passed."""
    return [lim.check("run1", limits, path, client, headers, t) is None for t in times]


def test_burst_plus_one_pass_at_once_then_one_per_interval():
    lim = Limiter()
    limits = [{"prefix": "/", "rps": 2, "burst": 2}]
    assert _count(lim, limits, [100.0] * 10) == [True] * 3 + [False] * 7  # burst + 1
    # the rate (2/s) drains one request every 500 ms: 499 ms later still over, at 500 ms one passes
    assert _count(lim, limits, [100.499]) == [False]
    assert _count(lim, limits, [100.5, 100.5]) == [True, False]
    # a steady 2 a second passes, every one of them; 4 a second: about half
    steady = _count(lim, limits, [101 + i * 0.5 for i in range(20)])
    assert all(steady), steady
    fast = _count(lim, limits, [112 + i * 0.25 for i in range(40)])
    assert 20 <= sum(fast) <= 20 + 3, fast  # the rate, plus what the burst had left
    # after a quiet second and a half the whole burst is back
    assert _count(lim, limits, [200.0] * 5) == [True] * 3 + [False] * 2


def test_no_burst_passes_one_request_per_interval():
    lim = Limiter()
    limits = [{"prefix": "/", "rps": 10, "burst": 0}]
    assert _count(lim, limits, [0.0, 0.05, 0.099, 0.1, 0.15, 0.2]) == [True, False, False, True, False, True]


def test_a_refusal_says_which_limit_and_when_to_retry():
    lim = Limiter()
    limits = [{"prefix": "/v1/", "rps": 0.5, "burst": 1, "key": {"type": "ip_address"}}]
    assert _count(lim, limits, [0.0, 0.0], path="/v1/chat") == [True, True]
    over = lim.check("run1", limits, "/v1/chat", "1.2.3.4", _no_headers, 0.5)
    assert over is not None and over.retry_after == 2  # 0.5 r/s: one drains in 2 s, 0.5 s of it gone: 1.5 -> 2
    assert over.rule == Rule("/v1/", 0.5, 1)
    assert over.message("web") == ("service web: too many requests under /v1/ (its rate limit: 0.5 requests/s, "
                                   "burst 1, per client address); retry in 2 s")
    assert over.rule.describe() == {"prefix": "/v1/", "rps": 0.5, "burst": 1, "key": {"type": "ip_address"}}
    assert _count(lim, limits, [1.99], path="/v1/chat") == [False]
    assert _count(lim, limits, [2.0], path="/v1/chat") == [True]


def test_rps_is_kept_as_nginx_keeps_it_in_requests_a_minute():
    assert Rule("/", 1 / 60, 0).per_minute == 1 and Rule("/", 1 / 60, 0).rate == 16  # 16.67 thousandths, floored
    assert Rule("/", 2.5, 0).per_minute == 150 and Rule("/", 2.5, 0).rate == 2500
    lim = Limiter()
    limits = [{"prefix": "/", "rps": 1 / 60, "burst": 0}]
    assert _count(lim, limits, [0.0, 30.0, 62.0, 63.0]) == [True, False, False, True]  # 1000/16 ms = 62.5 s


def test_two_clients_are_counted_apart_and_two_services_too():
    lim = Limiter()
    limits = [{"prefix": "/", "rps": 1, "burst": 0}]
    assert _count(lim, limits, [0.0, 0.0], client="10.0.0.1") == [True, False]
    assert _count(lim, limits, [0.0, 0.0], client="10.0.0.2") == [True, False]
    assert lim.check("run2", limits, "/", "10.0.0.1", _no_headers, 0.0) is None  # another run, its own count


def test_a_header_key_counts_per_value_and_leaves_requests_without_it_alone():
    lim = Limiter()
    limits = [{"prefix": "/", "rps": 1, "burst": 1, "key": {"type": "header", "header": "X_Api-Key"}}]
    alice = Headers(raw=[(b"x-api-key", b"alice")]).getlist
    bob = Headers(raw=[(b"x-api-key", b"bob")]).getlist
    empty = Headers(raw=[(b"x-api-key", b"")]).getlist
    underscore = Headers(raw=[(b"x_api_key", b"alice")]).getlist  # nginx ignores such a header
    assert _count(lim, limits, [0.0] * 3, client="10.0.0.1", headers=alice) == [True, True, False]
    assert _count(lim, limits, [0.0] * 3, client="10.0.0.1", headers=bob) == [True, True, False]
    assert _count(lim, limits, [0.0] * 3, client="10.0.0.9", headers=alice) == [False] * 3  # not by address
    assert _count(lim, limits, [0.0] * 5, headers=_no_headers) == [True] * 5
    assert _count(lim, limits, [0.0] * 5, headers=empty) == [True] * 5
    assert _count(lim, limits, [0.0] * 5, headers=underscore) == [True] * 5
    # the value is kept as a hash only (it may be a credential)
    assert not any("alice" in "".join(k) or "bob" in "".join(k) for k in lim._seen)


def test_the_longest_prefix_alone_limits_a_request():
    rs = rules([{"prefix": "/", "rps": 4, "burst": 9}, {"prefix": "/api/auth/", "rps": 1},
                {"prefix": "/api", "rps": 2}])
    assert match(rs, "/api/auth/login").prefix == "/api/auth/"
    assert match(rs, "/api/auth").prefix == "/api"  # a prefix is text, as nginx's location: /api matches it
    assert match(rs, "/apix").prefix == "/api"
    assert match(rs, "/v1/chat").prefix == "/"
    assert match(rs, "").prefix == "/"
    assert match(rules([{"prefix": "/v1/", "rps": 1}]), "/v2/x") is None  # under no prefix: not limited
    # the path as nginx matches it: slashes merged, dot segments resolved (no way round a limit)
    assert match(rs, "/x/../api//auth/./login").prefix == "/api/auth/"
    lim = Limiter()
    limits = [{"prefix": "/", "rps": 1, "burst": 0}, {"prefix": "/api/auth/", "rps": 1, "burst": 0}]
    assert _count(lim, limits, [0.0, 0.0], path="api/auth/x") == [True, False]
    assert _count(lim, limits, [0.0, 0.0], path="other") == [True, False]  # its own count, under /
    assert _count(lim, limits, [0.0], path="/v2/../api/auth/y") == [False]


@pytest.mark.parametrize("path,normal", [
    ("", "/"), ("/", "/"), ("a", "/a"), ("a/", "/a/"), ("//a//b", "/a/b"), ("/a/./b/../c", "/a/c"),
    ("/a/..", "/"), ("/a/b/..", "/a/"), ("/../../x", "/x"), ("/a/.", "/a/"),
])
def test_normal_path(path, normal):
    assert normal_path(path) == normal


def test_memory_stays_bounded_and_drained_keys_are_dropped():
    lim = Limiter(size=100)
    limits = [{"prefix": "/", "rps": 10, "burst": 0}]
    for i in range(1000):
        lim.check("run1", limits, "/", f"10.0.{i // 256}.{i % 256}", _no_headers, 0.0)
    assert len(lim) == 100
    # keys whose count has drained are dropped as others come (two looked at per request)
    lim = Limiter()
    for i in range(50):
        lim.check("run1", limits, "/", f"10.1.0.{i}", _no_headers, 0.0)
        lim.check("run1", limits, "/", f"10.1.0.{i}", _no_headers, 0.0)
    assert len(lim) == 50
    for i in range(30):
        lim.check("run1", limits, "/", f"10.2.0.{i}", _no_headers, 10.0)
    assert len(lim) == 30
    # a key dropped when drained reads as it would have: its next request passes
    assert _count(lim, limits, [10.0, 10.0], client="10.1.0.1") == [True, False]


def test_the_module_is_pure():
    src = open(ratelimit.__file__).read()
    for word in ("import time", "import os", "import socket", "import httpx", "starlette", "fastapi"):
        assert word not in src, word


def test_a_runs_rules_are_read_once_and_again_when_its_limits_change():
    lim = Limiter()
    first = [{"prefix": "/", "rps": 1, "burst": 0}]
    assert _count(lim, first, [0.0, 0.0]) == [True, False]
    assert lim._rules_of("run1", first) is lim._rules_of("run1", first)
    second = [{"prefix": "/", "rps": 1, "burst": 5}]  # the same run seen anew with other limits: they count
    assert _count(lim, second, [0.0] * 3) == [True] * 3
