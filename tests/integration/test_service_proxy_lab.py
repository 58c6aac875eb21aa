"""A service's endpoint on the server, on the lab: `/proxy/services/PROJECT/RUN/...` reaches the service's
container (busybox httpd: a file and CGI scripts) through the fleet's jump chain, once its probe passes,
with a token of a member of its project (`auth: true`, dstack's default) or with none (`auth: false`),
streaming what the service streams, with and without `strip_prefix`."""

from __future__ import annotations

import base64
import http.client
import json
import time

import pytest
import yaml
from conftest import Cli, start_server, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE

STREAM = """#!/bin/sh
printf 'Content-Type: text/event-stream\\r\\n\\r\\n'
for i in 1 2 3; do echo "data: tick $i"; echo; sleep 1; done
"""
ENV = """#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
echo "uri=$REQUEST_URI"
echo "xff=$HTTP_X_FORWARDED_FOR"
echo "proto=$HTTP_X_FORWARDED_PROTO"
echo "auth=$HTTP_AUTHORIZATION"
echo "method=$REQUEST_METHOD"
[ -n "$CONTENT_LENGTH" ] && echo "body=$(head -c "$CONTENT_LENGTH")"
"""


def _script(path: str, text: str) -> str:
    return f"echo {base64.b64encode(text.encode()).decode()} | base64 -d > {path} && chmod +x {path}"


def service(name: str, fleet: str, extra: dict, docroot: str = "/www") -> str:
    commands = [f"mkdir -p {docroot}/cgi-bin /www", f"echo hello-from-{name} > {docroot}/index.html",
                _script(f"{docroot}/cgi-bin/stream", STREAM), _script(f"{docroot}/cgi-bin/env", ENV),
                _script(f"{docroot}/env.sh", ENV), "echo '*.sh:/bin/sh' > /www/httpd.conf"]  # CGI anywhere
    commands.append("exec httpd -f -p 8000 -h /www")
    return yaml.safe_dump({"type": "service", "name": name, "image": IMAGE, "port": 8000, "fleets": [fleet],
                           "commands": commands, **extra}, sort_keys=False)


def call(port: int, method: str, path: str, token: str | None = None, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={**({"Authorization": f"Bearer {token}"} if token else {}),
                                                       **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def test_a_service_is_reached_through_the_server_once_ready_with_its_auth_and_prefix(lab_factory, tmp_path):
    lab = lab_factory(nodes=1, gpus=2)
    fleet = core.fleet_name(lab)
    server = start_server(tmp_path / "home")
    admin = Cli(server.home, server=server.url)
    token = server.admin_token
    try:
        admin("apply", "-f", str(lab.fleet_file), "-y", check=0)
        dave = json.loads(admin("user", "add", "dave", "--json", check=0).stdout)["token"]
        admin("project", "add", "other", check=0)
        admin("project", "member", "add", "other", "dave", check=0)

        web = tmp_path / "web.yml"
        web.write_text(service("web", fleet, {"probes": [{"type": "http", "url": "/ready.txt", "interval": 1,
                                                          "ready_after": 2}]}))
        p = admin("apply", "-f", str(web), "-y", "-d", check=0)
        base = "/proxy/services/default/web"
        assert f"web is served at {server.url}{base}/" in p.stdout, p.stdout

        # until its probe passes twice in a row: 503, saying so; ps says it is not ready
        status, text = call(server.port, "GET", f"{base}/", token)
        assert status == 503 and "service web is not ready yet (0/1 replicas ready)" in text, (status, text)
        ps = {r["name"]: r for r in json.loads(admin("ps", "--json", check=0).stdout)}
        assert ps["web"]["url"] == f"{server.url}{base}/" and ps["web"]["ready"] is False, ps["web"]
        time.sleep(3)  # probes (every second) keep failing: still not ready
        assert call(server.port, "GET", f"{base}/", token)[0] == 503
        container = server.request("GET", "/api/runs/web.0", token).json()["container"]  # its replica
        core.host_exec(lab, lab.nodes[0], ["podman", "exec", container, "sh", "-c", "echo ok > /www/ready.txt"],
                       check=True)
        wait_for("web to be ready", lambda: call(server.port, "GET", f"{base}/", token)[0] == 200, timeout=60)
        assert call(server.port, "GET", f"{base}/", token) == (200, "hello-from-web\n")
        assert "running (ready)" in admin("ps", check=0).stdout
        assert json.loads(admin("ps", "--json", check=0).stdout)[0]["ready"] is True

        # auth: no token 401, a user of another project 403, saying what is missing
        status, text = call(server.port, "GET", f"{base}/")
        assert status == 401 and "needs a gpufleet token of a member of project default" in text, text
        status, text = call(server.port, "GET", f"{base}/", dave)
        assert status == 403 and "service web needs membership of project default" in text, text

        # strip_prefix (the default): the service sees /cgi-bin/env; no gpufleet token, who asked
        status, text = call(server.port, "POST", f"{base}/cgi-bin/env?a=1", token, body=b"payload")
        assert status == 200, text
        assert "uri=/cgi-bin/env?a=1\n" in text and "method=POST\n" in text and "body=payload\n" in text, text
        assert "auth=\n" in text and "xff=127.0.0.1\n" in text and "proto=http\n" in text, text

        # a streamed answer (server-sent events) arrives tick by tick, not at its end
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("GET", f"{base}/cgi-bin/stream", headers={"Authorization": f"Bearer {token}"})
        started = time.monotonic()
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("content-type") == "text/event-stream"
        arrivals = []
        while chunk := r.read1(65536):
            arrivals.append((time.monotonic() - started, chunk))
        conn.close()
        body = b"".join(c for _, c in arrivals)
        assert body.count(b"data: tick") == 3, body
        first = next(t for t, c in arrivals if b"tick 1" in c)
        last = next(t for t, c in arrivals if b"tick 3" in c)
        assert last - first >= 1.5, arrivals  # tick 1 came about 2 s before tick 3: not buffered

        # auth: false, strip_prefix: false, no probes (ready once its port accepts): open, the whole path
        opened = tmp_path / "open.yml"
        docroot = "/www/proxy/services/default/open"
        opened.write_text(service("open", fleet, {"auth": False, "strip_prefix": False}, docroot=docroot))
        admin("apply", "-f", str(opened), "-y", "-d", check=0)
        obase = "/proxy/services/default/open"
        wait_for("open to be ready", lambda: call(server.port, "GET", f"{obase}/")[0] == 200, timeout=60)
        assert call(server.port, "GET", f"{obase}/") == (200, "hello-from-open\n")
        status, text = call(server.port, "GET", f"{obase}/env.sh?q=1", headers={"Authorization": "Bearer own"})
        assert status == 200 and f"uri={obase}/env.sh?q=1\n" in text and "auth=Bearer own\n" in text, text
        status, text = call(server.port, "GET", f"{obase}/env.sh", dave)  # a gpufleet token never goes on
        assert status == 200 and "auth=\n" in text, text

        # a run of another project, or no such run: 404
        assert call(server.port, "GET", "/proxy/services/other/web/", dave)[0] == 404
        # once stopped: gone from the endpoint
        admin("stop", "web", "-y", check=0)
        wait_for("web's endpoint to go", lambda: call(server.port, "GET", f"{base}/", token)[0] == 404, timeout=60)
    finally:
        admin("stop", "web", "-y")
        admin("stop", "open", "-y")
        server.stop()
