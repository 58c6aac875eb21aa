"""OpenAI-compatible model routing on the lab (issue 16): a service with `model: my-llm` (the lab image's
openai-stub, a tiny OpenAI-speaking server) answers an OpenAI chat request sent to the server's
`/proxy/models/default/v1/chat/completions`, routed by the request's `model`, through the fleet's jump
chain; a streamed request arrives as server-sent events chunk by chunk; `/v1/models` lists it; an
unknown model is a 404 in OpenAI's shape naming it; the route needs a member's token even though the
service itself is open (`auth: false`), as dstack's does."""

from __future__ import annotations

import http.client
import json
import time

import pytest
import yaml
from conftest import Cli, start_server, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE
MODELS = "/proxy/models/default"


def call(port: int, method: str, path: str, token: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        text = r.read().decode(errors="replace")
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, {"text": text}
    finally:
        conn.close()


def chat(content: str, model: str = "my-llm", **extra) -> dict:
    return {"model": model, "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": content}], **extra}


def test_a_model_service_answers_openai_requests_routed_by_model(lab_factory, tmp_path):
    lab = lab_factory(nodes=1, gpus=2)
    fleet = core.fleet_name(lab)
    server = start_server(tmp_path / "home")
    admin = Cli(server.home, server=server.url)
    token = server.admin_token
    try:
        admin("apply", "-f", str(lab.fleet_file), "-y", check=0)
        svc = tmp_path / "llm.yml"
        svc.write_text(yaml.safe_dump({
            "type": "service", "name": "llm", "image": IMAGE, "port": 8000, "fleets": [fleet], "auth": False,
            "model": "my-llm", "commands": ["exec openai-stub --model my-llm --port 8000 --delay 0.5"]},
            sort_keys=False))
        p = admin("apply", "-f", str(svc), "-y", "-d", check=0)
        assert f"model my-llm is served at {server.url}{MODELS}/" in p.stdout, p.stdout

        # ready once dstack's default probe (a one-token chat completion of my-llm) passes
        ask = chat("hello lab")
        wait_for("my-llm to answer", lambda: call(server.port, "POST", f"{MODELS}/v1/chat/completions", token,
                                                  ask)[0] == 200, timeout=90)
        status, got = call(server.port, "POST", f"{MODELS}/v1/chat/completions", token, ask)
        assert status == 200 and (got["object"], got["model"]) == ("chat.completion", "my-llm"), got
        assert got["choices"][0]["message"] == {"role": "assistant", "content": "echo: hello lab"}, got
        # dstack's path (its base URL has no /v1) reaches the same
        assert call(server.port, "POST", f"{MODELS}/chat/completions", token, ask)[1]["choices"] == got["choices"]

        row = next(r for r in json.loads(admin("ps", "--json", check=0).stdout) if r["name"] == "llm")
        assert (row["model"], row["model_url"]) == ("my-llm", f"{server.url}{MODELS}/"), row
        assert row["url"] == f"{server.url}/proxy/services/default/llm/" and row["ready"] is True, row

        # streamed: server-sent events, each chunk as the model sends it (0.5 s apart), then [DONE]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", f"{MODELS}/v1/chat/completions", body=json.dumps(chat("one two three", stream=True)),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        started = time.monotonic()
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        arrivals = []
        while chunk := r.read1(65536):
            arrivals.append((time.monotonic() - started, chunk))
        conn.close()
        events = [e.removeprefix(b"data: ") for e in b"".join(c for _, c in arrivals).split(b"\n\n") if e.strip()]
        assert events[-1] == b"[DONE]", events
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "echo: one two three "
        first = next(t for t, c in arrivals if b'"echo: "' in c)
        last = next(t for t, c in arrivals if b'"three "' in c)
        assert last - first >= 1.2, arrivals  # 3 gaps of 0.5 s: not gathered and sent at the end

        # the project's models, in OpenAI's list format
        status, listed = call(server.port, "GET", f"{MODELS}/v1/models", token)
        assert status == 200 and listed["object"] == "list", listed
        assert [(m["id"], m["object"], m["owned_by"]) for m in listed["data"]] == [("my-llm", "model", "default")]

        # an unknown model: 404 in OpenAI's shape, naming it and what is served; the model saw nothing
        status, err = call(server.port, "POST", f"{MODELS}/v1/chat/completions", token, chat("hi", model="gpt-9"))
        assert status == 404 and err["error"]["code"] == "model_not_found", err
        assert "'gpt-9'" in err["error"]["message"] and "it serves my-llm" in err["error"]["message"], err

        # no token: 401, though the service itself is open (auth: false) at its own URL
        status, err = call(server.port, "POST", f"{MODELS}/v1/chat/completions", None, ask)
        assert status == 401 and "token" in err["detail"], err
        assert call(server.port, "GET", f"{MODELS}/v1/models")[0] == 401
        status, direct = call(server.port, "POST", "/proxy/services/default/llm/v1/chat/completions", None, ask)
        assert status == 200 and direct["choices"][0]["message"]["content"] == "echo: hello lab", direct

        # stopped: no longer listed, and its model is unknown
        admin("stop", "llm", "-y", check=0)
        assert call(server.port, "GET", f"{MODELS}/v1/models", token)[1]["data"] == []
        assert call(server.port, "POST", f"{MODELS}/v1/chat/completions", token, ask)[0] == 404
    finally:
        admin("stop", "llm", "-y")
        server.stop()
