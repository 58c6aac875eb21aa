"""OpenAI-compatible model routing (issue 16): a service's `model` as dstack writes it, the decisions of
gpufleet.models_route (which service serves a model, the path it sees, /v1/models, who may call, the error
bodies), the routes on a real uvicorn server on loopback carrying requests to a real replica on a Unix
socket (what a replica's ssh forward is), server-sent events chunk by chunk, and the lab image's
openai-stub run by this machine's busybox. The lab test (tests/integration/test_model_route_lab.py)
covers the real server, ssh and podman."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gpufleet import models_route
from gpufleet.errors import ConfigError, Forbidden, Unauthorized
from gpufleet.lab.openai_stub import OPENAI_STUB
from gpufleet.models import ProjectRole, Run, ServerRole, User
from gpufleet.models.run import MODEL_PROBE_TIMEOUT, ServiceConfig
from gpufleet.runconfig import UNSUPPORTED, parse_run
from gpufleet.server import proxy
from gpufleet.server.auth import Caller

BASE = "type: service\nname: llm\nimage: x\nport: 8000\ncommands: [serve]\n"


def _parse(extra: str):
    return parse_run(BASE + extra, "svc.yml", values=False).config


def _problems(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        _parse(extra)
    return [str(p) for p in e.value.problems]


# --------------------------------------------------------------------------- the `model` field

def test_model_as_a_name_is_an_openai_chat_model_at_v1_with_dstacks_default_probe():
    cfg = _parse("model: meta-llama/Meta-Llama-3.1-8B-Instruct\n")
    assert cfg.model.model_dump() == {"type": "chat", "name": "meta-llama/Meta-Llama-3.1-8B-Instruct",
                                      "format": "openai", "prefix": "/v1"}
    (probe,) = cfg.probes  # dstack's: a one-token chat completion, POST PREFIX/chat/completions
    assert (probe.method, probe.url, probe.timeout) == ("post", "/v1/chat/completions", MODEL_PROBE_TIMEOUT)
    assert [(h.name, h.value) for h in probe.headers] == [("Content-Type", "application/json")]
    assert json.loads(probe.body) == {"model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
                                      "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    spec = cfg.model_dump(mode="json")  # as the run's spec keeps it, and reads it back the same
    assert spec["model"]["name"] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert ServiceConfig.model_validate(spec).model_dump(mode="json") == spec


def test_model_as_a_mapping_with_its_prefix_and_probes_given_or_turned_off():
    cfg = _parse("model:\n  type: chat\n  name: my-llm\n  format: openai\n  prefix: /api/v1/\n")
    assert (cfg.model.name, cfg.model.prefix) == ("my-llm", "/api/v1/")
    assert cfg.probes[0].url == "/api/v1/chat/completions"
    assert _parse("model: my-llm\nprobes: []\n").probes == []  # dstack: an explicit empty list, no probe
    own = _parse("model: my-llm\nprobes:\n  - type: http\n    url: /health\n").probes
    assert [p.url for p in own] == ["/health"]
    assert _parse("model:\n  name: m\n").model.format == "openai"  # the mapping's format defaults to openai
    assert _parse("").model is None and _parse("").probes == []  # without a model nothing changes
    assert "model" not in UNSUPPORTED["service"]


@pytest.mark.parametrize("extra, where, words", [
    ("model:\n  type: chat\n  name: m\n  format: tgi\n  chat_template: x\n", "svc.yml:7:3: model:",
     "`format: tgi` is not supported"),
    ("model:\n  name: ''\n", "svc.yml:7:9: model.name:", "a model name is 1 to 256 characters"),
    ("model:\n  name: m\n  prefix: v1\n", "svc.yml:8:11: model.prefix:", "starting with `/`"),
    ("model: 3\n", "svc.yml:6:8: model:", "a model name (`model: NAME`) or a mapping"),
    ("model: {format: openai}\n", "svc.yml:6:8: model.name:", "required field 'name' is missing"),
    ("model:\n  name: m\n  eos_token: x\n", "svc.yml:8:3: model.eos_token:", "unknown field"),
])
def test_a_wrong_model_is_refused_naming_the_field_and_its_line(extra, where, words):
    (problem,) = _problems(extra)
    assert problem.startswith(where) and words in problem, problem


def test_the_tgi_refusal_says_what_to_write_instead():
    (problem,) = _problems("model:\n  type: chat\n  name: m\n  format: tgi\n")
    assert "TGI serves the OpenAI API itself" in problem and "`model: NAME`" in problem


# --------------------------------------------------------------------------- the decisions

def _run(name: str, model=None, status="running", project="main", created=100.0, type_="service") -> Run:
    spec = {"type": type_, "port": 8000}
    if model is not None:
        spec["model"] = {"type": "chat", "name": model, "format": "openai", "prefix": "/v1"} \
            if isinstance(model, str) else model
    return Run(name=name, run_id=f"id-{name}", type=type_, fleet=None, instance_id=None, alias=None, status=status,
               spec=spec, container="c", created_at=created, updated_at=created, project=project,
               replicas=1 if type_ == "service" else None)  # a service's own run


def test_the_path_under_the_models_endpoint_and_what_the_service_sees():
    assert models_route.rest_of("v1/chat/completions") == "chat/completions"
    assert models_route.rest_of("chat/completions") == "chat/completions"  # dstack's base URL has no v1
    assert models_route.rest_of("v1") == "" and models_route.rest_of("v1models") == "v1models"
    run = _run("a", "m")
    assert models_route.upstream_path(run, "chat/completions", "") == "/v1/chat/completions"
    other = _run("b", {"type": "chat", "name": "m", "format": "openai", "prefix": "/openai/v1/"})
    assert models_route.upstream_path(other, "completions", "x=1") == "/openai/v1/completions?x=1"
    root = _run("c", {"type": "chat", "name": "m", "format": "openai", "prefix": "/"})
    assert models_route.upstream_path(root, "chat/completions", "") == "/chat/completions"
    assert models_route.is_models_list("v1/models") and models_route.is_models_list("models")
    assert models_route.listed_model("v1/models/meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert models_route.listed_model("v1/models") is None
    assert models_route.model_url("http://srv:8080/", "my team") == "http://srv:8080/proxy/models/my%20team/"


def test_which_service_serves_a_model():
    runs = [_run("old", "m", created=1), _run("new", "m", created=2), _run("starting", "m", "starting", created=3),
            _run("plain"), _run("elsewhere", "x", project="cv"), _run("x-here", "x"),
            _run("a-task", "m", type_="task"), _run("done", "m", "done", created=9),
            _run("stopping", "m", "stopping", created=10)]
    assert models_route.pick(runs, "main", "m").name == "new"  # running before starting, the newest of those
    ready = {"old"}
    assert models_route.pick(runs, "main", "m", lambda r: r.name in ready).name == "old"  # a ready one first
    assert models_route.pick(runs, "main", "x").name == "x-here"  # the project's own, never another's
    assert models_route.pick(runs, "cv", "m") is None
    assert models_route.pick([_run("s", "m", "starting")], "main", "m").name == "s"  # live: its 503 says why
    assert models_route.pick([_run("q", "m", "pending")], "main", "m").name == "q"
    assert models_route.pick([_run("s", "m", "stopping")], "main", "m") is None  # going: serves no more
    assert sorted(models_route.served(runs, "main")) == ["m", "x"]


def test_the_models_list_is_openais_with_the_projects_running_models():
    runs = [_run("a", "zeta", created=50.7), _run("b", "alpha", created=10), _run("b2", "alpha", created=20),
            _run("s", "starting-one", "starting"), _run("o", "other", project="cv")]
    assert models_route.models_list(runs, "main") == {"object": "list", "data": [
        {"id": "alpha", "object": "model", "created": 20, "owned_by": "main"},
        {"id": "zeta", "object": "model", "created": 50, "owned_by": "main"}]}
    assert models_route.models_list([], "main") == {"object": "list", "data": []}


def test_the_errors_are_openais_with_gpufleets_detail_beside():
    e = models_route.not_found("gpt-9", "main", ["b", "a"])
    assert e.status == 404
    assert e.body["error"] == {"message": "model 'gpt-9' is not served in project main: it serves a, b (a service "
                                          "with `model: NAME`, see gpufleet ps)",
                               "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    assert e.body["detail"] == e.body["error"]["message"] and e.body["exit_code"] == 1
    assert "none of its services has a `model`" in str(models_route.not_found("m", "main", []))
    assert models_route.requested_model(b'{"model": "m", "messages": []}') == "m"
    for body, words in [(b"", "has no `model`"), (b"{nope", "is not JSON"), (b"[1]", "has no `model`"),
                        (b'{"model": 3}', "must be a model's name"), (b'{"model": ""}', "must be a model's name")]:
        with pytest.raises(models_route.BadRequest, match=words) as got:
            models_route.requested_model(body)
        assert got.value.status == 400 and got.value.body["error"]["type"] == "invalid_request_error"
    assert models_route.not_ready("service s is not ready yet").body["error"]["code"] == "model_not_ready"
    assert models_route.too_large(1 << 20).status == 413


def _caller(role=ServerRole.USER, projects=None):
    return Caller(User(name="u", role=role, projects=projects or {}, created_at=0))


def test_a_projects_models_are_its_members_whatever_the_services_auth():
    with pytest.raises(Unauthorized, match="need a gpufleet token of a member of the project"):
        models_route.check_access(None, "main")
    with pytest.raises(Forbidden, match="needs membership of project main; you are not a member"):
        models_route.check_access(_caller(projects={"cv": ProjectRole.ADMIN}), "main")
    models_route.check_access(_caller(projects={"main": ProjectRole.MEMBER}), "main")
    models_route.check_access(_caller(role=ServerRole.ADMIN), "main")


# --------------------------------------------------------------------------- the routes, carrying for real

def _replica_app(seen: list) -> FastAPI:
    """An OpenAI-speaking replica: echoes the model and the last message; streamed: 3 chunks 0.3 s apart."""
    app = FastAPI()

    @app.post("/{path:path}")
    async def answer(request: Request, path: str):
        body = await request.json()
        seen.append(("/" + path, request.headers.get("authorization"), body.get("model")))
        text = body.get("messages", [{}])[-1].get("content", "")
        if not body.get("stream"):
            return {"object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {text}"}}]}

        async def events():
            for word in ["echo:", *text.split()]:
                yield f"data: {json.dumps({'choices': [{'delta': {'content': word}}]})}\n\n"
                await asyncio.sleep(0.3)
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/{path:path}")
    async def other(path: str):
        return JSONResponse({"path": path}, status_code=404)

    return app


def _serve(app: FastAPI, **where) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **where))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "a server did not start"
        time.sleep(0.05)
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def endpoint(tmp_path):
    """The proxy's routes on loopback over one model service (`my-llm`, ready, its replica on a Unix socket)
    and one that is starting (`later`); a member's token is `gft_member`."""
    sock = str(tmp_path / "replica.sock")
    seen: list = []
    replica = _serve(_replica_app(seen), uds=sock)
    runs = [_run("llm", "my-llm"), _run("slow", "later", "starting"), _run("web")]
    member = _caller(projects={"main": ProjectRole.MEMBER})
    ctx = SimpleNamespace(
        store=SimpleNamespace(runs=lambda projects=None: [r for r in runs if r.project in projects],
                              run=lambda name: None),
        services=SimpleNamespace(socket_for=lambda r: sock if r.name == "llm" else None,
                                 status=lambda r: (1 if r.name == "llm" else 0, 1), known=lambda n: None,
                                 lost=lambda *a: None, hit=lambda n: None),
        caller=lambda token, client: member if token == "gft_member" else _caller())
    app = FastAPI()
    proxy.add_routes(app, ctx)
    port = _free_port()
    server = _serve(app, host="127.0.0.1", port=port)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/proxy/models/main", seen=seen)
    finally:
        server.should_exit = replica.should_exit = True


AUTH = {"Authorization": "Bearer gft_member"}


def test_a_chat_request_goes_to_the_service_of_its_model_at_its_prefix(endpoint):
    ask = {"model": "my-llm", "messages": [{"role": "user", "content": "hello there"}]}
    for path in ("/v1/chat/completions", "/chat/completions"):  # OpenAI's path, and dstack's (no v1)
        r = httpx.post(endpoint.url + path, json=ask, headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "echo: hello there"
    # the replica saw its prefix + the rest, and never the member's gpufleet token
    assert endpoint.seen == [("/v1/chat/completions", None, "my-llm")] * 2


def test_a_streamed_answer_arrives_chunk_by_chunk(endpoint):
    ask = {"model": "my-llm", "stream": True, "messages": [{"role": "user", "content": "one two three"}]}
    arrived = []
    with httpx.stream("POST", endpoint.url + "/v1/chat/completions", json=ask, headers=AUTH, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrived.append((time.monotonic(), line[len("data: "):]))
    assert [x for _, x in arrived][-1] == "[DONE]"
    words = [json.loads(x)["choices"][0]["delta"]["content"] for _, x in arrived[:-1]]
    assert words == ["echo:", "one", "two", "three"]
    assert arrived[-1][0] - arrived[0][0] > 0.8  # 4 chunks 0.3 s apart: each came when sent, not all at the end


def test_an_unknown_model_a_model_not_ready_and_a_bad_body(endpoint):
    r = httpx.post(endpoint.url + "/v1/chat/completions", json={"model": "gpt-9", "messages": []}, headers=AUTH)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found" and "'gpt-9'" in r.json()["error"]["message"]
    assert "it serves later, my-llm" in r.json()["error"]["message"]
    r = httpx.post(endpoint.url + "/v1/chat/completions", json={"model": "later", "messages": []}, headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "service slow is not ready yet" in r.json()["error"]["message"]
    r = httpx.post(endpoint.url + "/v1/chat/completions", content=b"not json", headers=AUTH)
    assert r.status_code == 400 and "is not JSON" in r.json()["error"]["message"]
    assert endpoint.seen == []


def test_the_models_list_and_one_model(endpoint):
    for path in ("/v1/models", "/models"):
        r = httpx.get(endpoint.url + path, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json() == {"object": "list", "data": [{"id": "my-llm", "object": "model", "created": 100,
                                                         "owned_by": "main"}]}
    assert httpx.get(endpoint.url + "/v1/models/my-llm", headers=AUTH).json()["id"] == "my-llm"
    assert httpx.get(endpoint.url + "/v1/models/later", headers=AUTH).status_code == 404  # not running yet
    r = httpx.get(endpoint.url + "/v1/files", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


# --------------------------------------------------------------------------- the lab image's stand-in

@pytest.mark.skipif(shutil.which("busybox") is None, reason="no busybox here")
def test_the_lab_images_openai_stub_speaks_openai(tmp_path):
    """The script of /usr/bin/openai-stub run by this machine's busybox (the lab image's), its tools busybox's."""
    busybox = shutil.which("busybox")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "nc", "sed", "grep", "tr", "head", "tail", "wc", "date", "sleep", "printf", "echo"):
        (bin_dir / tool).symlink_to(busybox)
    stub = bin_dir / "openai-stub"
    stub.write_text(OPENAI_STUB.replace("#!/bin/sh", f"#!{bin_dir}/sh", 1))
    stub.chmod(0o755)
    port = _free_port()
    proc = subprocess.Popen([str(stub), "--model", "my-llm", "--port", str(port), "--delay", "0.2"],
                            env={"PATH": str(bin_dir)}, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 10
        while True:
            try:
                models = httpx.get(url + "/models", timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and proc.poll() is None, "openai-stub did not listen"
                time.sleep(0.1)
        assert models.json()["data"][0]["id"] == "my-llm"
        ask = {"model": "my-llm", "messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "hello there"}]}
        got = httpx.post(url + "/chat/completions", json=ask, timeout=10).json()
        assert (got["object"], got["model"]) == ("chat.completion", "my-llm")
        assert got["choices"][0]["message"] == {"role": "assistant", "content": "echo: hello there"}
        with httpx.stream("POST", url + "/chat/completions", json={**ask, "stream": True}, timeout=10) as r:
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "echo: hello there "
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        other = httpx.post(url + "/chat/completions", json={**ask, "model": "gpt-9"}, timeout=10)
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
        done = httpx.post(url + "/completions", json={"model": "my-llm", "prompt": "say hi"}, timeout=10).json()
        assert done["choices"][0]["text"] == "echo: say hi"
    finally:
        proc.terminate()
        proc.wait(10)
