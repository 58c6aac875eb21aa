"""The API's contract with the CLI, on a real store: the token, and errors that keep their meaning
(status, message, exit code, a config error's file and line) through HTTP and back into the CLI's
exceptions. The lab tests drive a real server over a real socket; these pin the mapping itself."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from gpufleet import client as clientlib
from gpufleet.errors import ConfigError, GpufleetError, NotFound
from gpufleet.server.api import Context, create_app
from gpufleet.server.auth import FAILURES_ALLOWED, FailedLogins, token_hash
from gpufleet.server.vault import Vault
from gpufleet.state import Store

TOKEN = "t0k3n-for-tests"


@pytest.fixture()
def api(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    store.bootstrap("admin", token_hash(TOKEN))  # what a server's first start does
    launched = []
    ctx = Context(store=store, seal=Vault(tmp_path / "secret.key").seal, kick=lambda: None,
                  launch=lambda run, placements: launched.append(run.name), background=lambda work: work(),
                  info=lambda: {"url": "x"},
                  shutdown=lambda: None)
    with TestClient(create_app(ctx)) as http:
        yield http, store, launched


def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def as_cli_error(response) -> GpufleetError:
    return clientlib._error(response.status_code, response.content)


def test_every_state_route_needs_the_token(api):
    http, _, _ = api
    assert http.get("/api/health").status_code == 200
    assert "/api/runs" in http.get("/openapi.json").json()["paths"]
    # every route of the API, as its schema lists them (a route added later is checked too)
    paths = http.get("/openapi.json").json()["paths"]
    routes = [(method, path.replace("{name}", "x")) for path, methods in paths.items()
              if path.startswith("/api/") and path != "/api/health" for method in methods]
    assert len(routes) >= 15, routes
    for method, path in routes:
        http.app.state.ctx.failures = FailedLogins()  # the limit on failed logins is tested below
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = http.request(method, path, headers=headers, json={"source": "x.yml", "text": "type: task"})
            assert r.status_code == 401, (method, path, headers, r.text)
            assert "token" in r.json()["detail"] and TOKEN not in r.text
    assert http.get("/api/runs", headers=auth()).json() == []


def test_failed_logins_are_limited_per_address(api):
    """Ten bad tokens from one address in a minute: the eleventh try is 429 with Retry-After, and
    its token is not even looked at (the right one too); requests with no token are no guesses."""
    http, _, _ = api
    for _ in range(FAILURES_ALLOWED + 5):
        assert http.get("/api/runs").status_code == 401
    for i in range(FAILURES_ALLOWED):
        r = http.get("/api/runs", headers={"Authorization": f"Bearer guess-{i}"})
        assert r.status_code == 401 and f"guess-{i}" not in r.text
    r = http.get("/api/runs", headers=auth())
    assert r.status_code == 429 and 50 <= int(r.headers["Retry-After"]) <= 61
    assert "too many failed logins" in r.json()["detail"] and r.json()["exit_code"] == 3
    assert TOKEN not in r.text
    http.app.state.ctx.failures = FailedLogins(window=0.0)  # as a minute later
    assert http.get("/api/runs", headers=auth()).status_code == 200


def test_a_bad_run_file_comes_back_with_its_file_line_and_field(api):
    http, _, _ = api
    text = "type: task\nimage: busybox\nresources:\n  gpu: 2\npriority: 101\ncommands: ['true']\n"
    r = http.post("/api/runs", json={"source": "/w/run.yml", "text": text}, headers=auth())
    assert r.status_code == 422
    err = as_cli_error(r)
    assert isinstance(err, ConfigError) and err.exit_code == 2
    assert str(err).startswith("/w/run.yml:5:") and "priority" in str(err)


def test_refusals_and_missing_things_keep_their_exit_codes(api):
    http, store, _ = api
    from test_state import add_host

    text = "type: task\nname: big\nimage: busybox\nresources: {gpu: 4}\ncommands: ['true']\n"
    r = http.post("/api/runs", json={"source": "big.yml", "text": text}, headers=auth())
    assert r.status_code == 409 and "project default has no fleet yet" in r.json()["detail"]
    add_host(store, "f", "node-0", n=2)
    r = http.post("/api/runs", json={"source": "big.yml", "text": text}, headers=auth())
    assert r.status_code == 409
    err = as_cli_error(r)
    assert type(err) is GpufleetError and err.exit_code == 1 and "never fits" in str(err) and "not queued" in str(err)
    r = http.get("/api/runs/nope", headers=auth())
    assert r.status_code == 404 and isinstance(as_cli_error(r), NotFound)
    # refused (401, 403, 429): exit 3, with the server's message, whatever exit code its body says
    for status in (401, 403, 429):
        err = clientlib._error(status, b'{"detail": "stopping run r1 needs ...", "exit_code": 1}')
        assert err.exit_code == 3 and str(err) == "stopping run r1 needs ..."
    r = http.post("/api/runs", json={"source": "x.yml", "text": text, "surprise": 1}, headers=auth())
    assert r.status_code == 422 and as_cli_error(r).exit_code == 2  # FastAPI's own check of the body


def test_a_waiting_runs_secret_is_sealed_and_never_shown(api, tmp_path):
    http, store, _ = api
    from test_state import add_host  # one 8-GPU host in fleet f

    add_host(store, "f", "node-0", n=8)
    text = "type: task\nname: s\nimage: busybox\nenv: [TOKEN]\nresources: {gpu: 16}\ncommands: ['true']\n"
    # 16 GPUs never fit one 8-GPU host: refused, and nothing of it is kept
    r = http.post("/api/runs", json={"source": "s.yml", "text": text, "secrets": {"TOKEN": "s3cr3t"}}, headers=auth())
    assert r.status_code == 409 and "s3cr3t" not in r.text
    assert store.run("s") is None
    text = text.replace("gpu: 16", "gpu: 8")
    # a plan looks at the run only: no secret value is needed for it, none is sent
    plan = http.post("/api/runs/plan", json={"source": "s.yml", "text": text}, headers=auth())
    assert plan.status_code == 200 and plan.json()["placements"][0]["alias"] == "node-0"
    store.allocate("holder", "h1", "task", {}, "c", lambda hosts: _all_of(hosts))
    r = http.post("/api/runs", json={"source": "s.yml", "text": text, "secrets": {"TOKEN": "s3cr3t"}}, headers=auth())
    assert r.status_code == 201 and r.json()["status"] == "pending" and r.json()["position"] == 1
    sealed = store.sealed(run="s")
    assert sealed and "s3cr3t" not in sealed
    for path in ("/api/runs?all=true", "/api/runs/s", "/api/events"):
        assert "s3cr3t" not in http.get(path, headers=auth()).text
    assert "s3cr3t" not in (tmp_path / "state.db").read_bytes().decode(errors="replace")


def _all_of(hosts):
    from gpufleet.allocator import Request, place
    from gpufleet.models import GPUSpec

    return place(Request(gpu=GPUSpec.model_validate(8)), hosts)


def test_the_cli_prints_a_systemd_unit_for_this_server(tmp_path, monkeypatch, capsys):
    from gpufleet.cli import main

    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "state dir"))
    (tmp_path / "server.yml").write_text("port: 8300\n")
    assert main(["server", "--print-systemd-unit", "--config", str(tmp_path / "server.yml")]) == 0
    unit = capsys.readouterr().out
    assert "[Service]" in unit and f'Environment="GPUFLEET_HOME={tmp_path / "state dir"}"' in unit
    assert " server --config " in unit and "server.yml" in unit
