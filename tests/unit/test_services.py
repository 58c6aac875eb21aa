"""The service endpoint's decisions (gpufleet.services): paths, headers, who may call, readiness."""

from __future__ import annotations

import pytest

from gpufleet import services
from gpufleet.errors import Forbidden, Unauthorized
from gpufleet.models import ProjectRole, ServerRole, User
from gpufleet.server.auth import Caller


def test_the_url_and_the_path_a_replica_sees_with_and_without_strip_prefix():
    assert services.service_url("http://h:8080/", "main", "web") == "http://h:8080/proxy/services/main/web/"
    assert services.upstream_path("main", "web", "v1/x", "a=1&b=2", True) == "/v1/x?a=1&b=2"
    assert services.upstream_path("main", "web", "", "", True) == "/"
    assert services.upstream_path("main", "web", "v1/x", "", False) == "/proxy/services/main/web/v1/x"
    assert services.upstream_path("main", "web", "", "q=1", False) == "/proxy/services/main/web/?q=1"


def test_headers_upstream_drop_hop_by_hop_and_the_gpufleet_token_and_say_who_asked():
    got = services.upstream_headers(
        [("Host", "srv:80"), ("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"),
         ("Keep-Alive", "5"), ("Transfer-Encoding", "chunked"), ("Authorization", "Bearer gft_abc"),
         ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "forged"), ("Accept", "text/event-stream")],
        "127.0.0.9", "http", "srv:80", auth=True)
    names = [k.lower() for k, _ in got]
    assert "authorization" not in names and "connection" not in names and "x-secret-hop" not in names
    assert "keep-alive" not in names and "transfer-encoding" not in names
    assert ("X-Forwarded-For", "10.0.0.1, 127.0.0.9") in got
    assert ("X-Forwarded-Proto", "http") in got and ("X-Forwarded-Host", "srv:80") in got
    assert ("Accept", "text/event-stream") in got and names.count("x-forwarded-proto") == 1
    # behind a proxy uvicorn trusts, the client it reports is the chain's last: not added twice
    again = services.upstream_headers([("X-Forwarded-For", "10.0.0.1, 10.0.0.2")], "10.0.0.2", "http", "", auth=True)
    assert ("X-Forwarded-For", "10.0.0.1, 10.0.0.2") in again


def test_an_open_service_gets_its_own_authorization_but_never_a_gpufleet_token():
    own = services.upstream_headers([("Authorization", "Bearer sk-service")], "c", "http", "", auth=False)
    assert ("Authorization", "Bearer sk-service") in own
    ours = services.upstream_headers([("authorization", "bearer gft_x")], "c", "http", "", auth=False)
    assert all(k.lower() != "authorization" for k, _ in ours)


def test_response_headers_keep_cookies_and_length_but_not_hop_by_hop():
    got = services.response_headers([("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Content-Length", "3"),
                                     ("Transfer-Encoding", "chunked"), ("Connection", "close")])
    assert got == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Content-Length", "3")]


def _caller(role=ServerRole.USER, projects=None):
    return Caller(User(name="u", role=role, projects=projects or {}, created_at=0))


def test_auth_decisions():
    services.check_access(False, None, "main", "web")  # auth: false: open
    with pytest.raises(Unauthorized, match="needs a gpufleet token of a member of project main"):
        services.check_access(True, None, "main", "web")
    with pytest.raises(Forbidden, match="service web needs membership of project main; you are not a member"):
        services.check_access(True, _caller(projects={"other": ProjectRole.ADMIN}), "main", "web")
    services.check_access(True, _caller(projects={"main": ProjectRole.MEMBER}), "main", "web")
    services.check_access(True, _caller(role=ServerRole.ADMIN), "main", "web")


def test_a_replica_is_ready_after_ready_after_successes_in_a_row_and_a_failure_starts_over():
    s = services.ProbeState()
    assert services.probe_due(s, 0.0, 5, 2, False)  # never probed: now
    s = services.probe_step(s, True, 1.0)
    assert not services.replica_ready([s], [2])
    assert not services.probe_due(s, 5.9, 5, 2, False) and services.probe_due(s, 6.0, 5, 2, False)
    s = services.probe_step(s, False, 6.0, "probe / answered 503")
    assert (s.streak, s.last_error) == (0, "probe / answered 503")
    s = services.probe_step(services.probe_step(s, True, 11.0), True, 16.0)
    assert services.replica_ready([s], [2]) and s.last_error == ""
    assert services.probe_due(s, 21.0, 5, 2, until_ready=False)
    assert not services.probe_due(s, 21.0, 5, 2, until_ready=True)  # ready: no more probes
    assert not services.replica_ready([s, services.ProbeState()], [2, 1])  # every probe must pass


def test_the_not_ready_answer():
    assert services.not_ready_message("web", 0, 1) == "service web is not ready yet (0/1 replicas ready)"


def test_a_tokens_user_is_kept_a_few_seconds_and_only_by_its_hash(monkeypatch):
    from gpufleet.server import proxy

    now = [100.0]
    monkeypatch.setattr(proxy.time, "monotonic", lambda: now[0])
    cache = proxy.CallerCache(ttl=5.0, size=2)
    who = _caller(projects={"main": ProjectRole.MEMBER})
    cache.put("gft_one", who)
    assert cache.get("gft_one") is who and cache.get("gft_two") is None and cache.get(None) is None
    assert "gft_one" not in repr(cache._seen)
    now[0] += 5.1
    assert cache.get("gft_one") is None  # looked up again: a revoked token stops working within the TTL
