"""A service's `rate_limits` (dstack's, issue 16) on the server's endpoint, on the lab: a real server carrying
requests to a real container (busybox httpd) through the fleet's jump chain. A quick burst from one client
gets burst + 1 answers (plus what drains meanwhile), then 429 with the limit and Retry-After, none of them
reaching the service; another client address, and a prefix of its own (the longest prefix rules), are
counted apart; a second later the limit lets requests through again."""

from __future__ import annotations

import time

import pytest
import yaml
from conftest import Cli, start_server, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab

RPS, BURST = 2, 2


def test_a_burst_over_a_services_rate_limit_gets_429_until_it_drains(lab_factory, tmp_path):
    lab = lab_factory(nodes=1, gpus=1)
    server = start_server(tmp_path / "home")
    admin = Cli(server.home, server=server.url)
    base = "/proxy/services/default/lim"
    try:
        admin("apply", "-f", str(lab.fleet_file), "-y", check=0)
        spec = {"type": "service", "name": "lim", "image": core.LAB_IMAGE, "port": 8000, "auth": False,
                "fleets": [core.fleet_name(lab)],
                "rate_limits": [{"prefix": "/", "rps": RPS, "burst": BURST},
                                {"prefix": "/open/", "rps": 1000, "burst": 100}],
                "commands": ["mkdir -p /www/open", "echo hi > /www/index.html", "echo open > /www/open/index.html",
                             "exec httpd -f -vv -p 8000 -h /www"]}
        (tmp_path / "lim.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
        admin("apply", "-f", str(tmp_path / "lim.yml"), "-y", "-d", check=0)
        wait_for("lim to answer", lambda: server.request("GET", f"{base}/open/").status == 200, timeout=90)

        # a quick burst of 10 from one client: burst + 1 pass (and what drains meanwhile: 2 a second), then 429
        replies = [server.request("GET", f"{base}/") for _ in range(10)]
        codes = [r.status for r in replies]
        ok = codes.count(200)
        assert set(codes) <= {200, 429} and codes[:BURST + 1] == [200] * (BURST + 1), codes
        assert BURST + 1 <= ok <= BURST + 1 + 2, codes
        over = next(r for r in replies if r.status == 429)
        assert over.headers["retry-after"] == "1", over.headers
        assert over.json()["detail"] == (f"service lim: too many requests under / (its rate limit: {RPS} requests/s, "
                                         f"burst {BURST}, per client address); retry in 1 s"), over.text
        assert over.json()["rate_limit"] == {"prefix": "/", "rps": RPS, "burst": BURST, "key": {"type": "ip_address"}}

        # another client address (the server is on loopback: 127.0.0.2 is another client): its own count
        assert server.request("GET", f"{base}/", source="127.0.0.2").status == 200
        # /open/ has its own, high, limit (the longest prefix): unaffected by the burst on /
        assert [server.request("GET", f"{base}/open/").status for _ in range(10)] == [200] * 10

        # the refused requests never reached the service: its log has a `url:/` per 200 (busybox httpd -vv)
        container = server.request("GET", "/api/runs/lim.0", server.admin_token).json()["container"]  # its replica

        def served() -> list[str]:
            logs = core.host_exec(lab, lab.nodes[0], ["podman", "logs", container], check=True)
            return [line for line in (logs.stdout + logs.stderr).splitlines() if line.endswith(" url:/")]

        wait_for("the service's log", lambda: len(served()) >= ok + 1, timeout=10)
        assert len(served()) == ok + 1, served()

        # a second and a half later (3 drained at 2 a second): the whole burst again
        time.sleep(1.6)
        codes = [server.request("GET", f"{base}/").status for _ in range(BURST + 1)]
        assert codes == [200] * (BURST + 1), codes
    finally:
        admin("stop", "lim", "-y")
        server.stop()
