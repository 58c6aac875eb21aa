"""The server's HTTP API under concurrent clients on a lab: reads (runs, events) and writes
(submissions of 1-GPU tasks that really start containers, stops, a name submitted again) at once,
then: no request failed, no accepted run lost or started twice, no block held by two runs, no event
skipped by a client following the events. On SQLite, and on PostgreSQL too when
GPUFLEET_TEST_DATABASE_URL is set (scripts/test.sh sets it).

Not a timing test: how fast the API answers is benchmarks/bench_server.py's business."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import Cli
from sqlalchemy import create_engine, text

from gpufleet import migrations
from gpufleet.lab import core
from gpufleet.state import metadata

pytestmark = pytest.mark.lab
PG_URL = os.environ.get("GPUFLEET_TEST_DATABASE_URL")
CLIENTS = 20
SECONDS = 15
PACE = 0.3  # seconds between one client's requests (exponential gaps)
WRITES_PER_S = 0.7  # over all clients: each submission starts a container (an Ansible play on this machine)
ENDED = ("done", "failed", "stopped")


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(nodes=2, gpus=8)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, monkeypatch) -> str:
    monkeypatch.delenv("GPUFLEET_DATABASE_URL", raising=False)
    if request.param == "postgresql":
        if not PG_URL:
            if os.environ.get("CI"):
                pytest.fail("CI must provide GPUFLEET_TEST_DATABASE_URL (scripts/test.sh starts PostgreSQL)")
            pytest.skip("no PostgreSQL: set GPUFLEET_TEST_DATABASE_URL (scripts/test.sh does)")
        engine = create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as c:  # fresh tables, as tests/unit/test_state.py's db_url
            metadata.drop_all(c)
            for table in migrations.VERSION_TABLES:
                c.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()
        monkeypatch.setenv("GPUFLEET_DATABASE_URL", PG_URL)
    return request.param


def task(name: str) -> str:
    return (f"type: task\nname: {name}\nimage: {core.LAB_IMAGE}\nresources:\n  gpu: 1\n"
            "commands:\n  - sleep 1\n")


class Clients:
    """CLIENTS threads against one server, one request per connection (as the CLI)."""

    def __init__(self, url: str, token: str):
        self.host, self.port = re.match(r"http://([^:/]+):(\d+)", url).groups()
        self.token = token
        self.lock = threading.Lock()
        self.failed: list[str] = []  # no answer, 5xx, or a 4xx other than 409
        self.answers: Counter = Counter()
        self.accepted: list[tuple[str, float]] = []
        self.double_held: list[str] = []
        self.followers: list[tuple[set, int]] = []
        self.next_write = 0.0
        self.n = 0

    def call(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        try:
            conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
            r = conn.getresponse()
            status, raw = r.status, r.read()
        except (OSError, http.client.HTTPException) as e:
            status, raw = 0, repr(e).encode()
        finally:
            conn.close()
        with self.lock:
            self.answers[(method, re.sub(r"/runs/[^/]+/stop", "/runs/NAME/stop", path.split("?")[0]), status)] += 1
            if status == 0 or status >= 500 or (status >= 400 and status != 409):
                self.failed.append(f"{method} {path}: {status} {raw[:500]!r}")
        return status, raw

    def write_turn(self, now: float, rng: random.Random) -> bool:
        with self.lock:
            if now < self.next_write:
                return False
            self.next_write = max(self.next_write, now) + rng.expovariate(WRITES_PER_S)
            return True

    def client(self, i: int, until: float) -> None:
        rng = random.Random(i)
        seen: set = set()
        after = 0
        while time.time() < until:
            now = time.time()
            if self.write_turn(now, rng):
                with self.lock:
                    recent = [n for n, t in self.accepted if now - t < 6]
                roll = rng.random()
                if roll < 0.25 and recent:
                    self.call("POST", f"/api/runs/{rng.choice(recent)}/stop")
                else:
                    if roll < 0.35 and recent:
                        name = rng.choice(recent)  # 409 while it is live; accepted again once it ended
                    else:
                        with self.lock:
                            self.n += 1
                            name = f"load-{self.n}"
                    status, _ = self.call("POST", "/api/runs", {"source": f"{name}.yml", "text": task(name),
                                                                "secrets": {}, "no_queue": False})
                    if status == 201:
                        with self.lock:
                            self.accepted.append((name, time.time()))
            elif rng.random() < 0.5:
                status, raw = self.call("GET", "/api/runs")
                if status == 200:
                    held = {}
                    for r in json.loads(raw):
                        if r["status"] in ("starting", "running"):
                            for n in r["nodes"]:
                                for b in n["blocks"]:
                                    if (n["instance_id"], b) in held:
                                        with self.lock:
                                            self.double_held.append(f"{(n['instance_id'], b)}: "
                                                                    f"{held[(n['instance_id'], b)]} and {r['name']}")
                                    held[(n["instance_id"], b)] = r["name"]
            else:
                status, raw = self.call("GET", f"/api/events?after={after}")
                if status == 200:
                    for e in json.loads(raw):
                        seen.add(e["id"])
                        after = max(after, e["id"])
            time.sleep(min(rng.expovariate(1 / PACE), max(0.0, until - time.time())))
        with self.lock:
            self.followers.append((seen, after))

    def run(self, seconds: float) -> None:
        until = time.time() + seconds
        threads = [threading.Thread(target=self.client, args=(i, until)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def get(self, path: str):
        status, raw = self.call("GET", path)
        assert status == 200, (path, status, raw)
        return json.loads(raw)


def test_api_under_concurrent_clients_loses_no_run_and_gives_no_block_twice(lab, backend, tmp_path: Path):
    cli = Cli(tmp_path / "home")
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)  # starts the local server
    try:
        server = json.loads((cli.home / "server" / "local.json").read_text())
        load = Clients(server["url"], (cli.home / "server" / "token").read_text().strip())
        load.run(SECONDS)
        deadline = time.monotonic() + 240
        while load.get("/api/runs") and time.monotonic() < deadline:
            time.sleep(1)
        live = load.get("/api/runs")
        ps = {r["name"]: r for r in json.loads(cli("ps", "-a", "--json", check=0).stdout)}
        events = load.get("/api/events?after=0&limit=10000")
        log = (cli.home / "server" / "server.log").read_text(errors="replace")
    finally:
        cli("server", "stop")

    answers = "\n".join(f"{m} {p} {s}: {n}" for (m, p, s), n in sorted(load.answers.items()))
    assert not load.failed, "\n".join(load.failed[:10]) + f"\n{answers}\nserver log:\n{log[-4000:]}"
    assert "Traceback" not in log, log[-4000:]
    accepted = Counter(n for n, _ in load.accepted)
    assert len(accepted) >= 3, answers  # the load did write
    assert not live, f"runs still live 4 minutes after the load: {[(r['name'], r['status']) for r in live]}"
    assert sorted(n for n in accepted if n not in ps) == [], "accepted submissions missing from ps -a"

    by_run = defaultdict(list)
    for e in events:
        if e["run"]:
            by_run[e["run"]].append(e)
    spans = defaultdict(list)  # (host, block) -> [(from, to, run)]
    for name, n in accepted.items():
        evs = by_run[name]
        cuts = [i for i, e in enumerate(evs) if e["kind"] == "submitted"]
        assert len(cuts) == n, f"{name}: {n} submissions accepted, {len(cuts)} recorded: {evs}"
        for a, b in zip(cuts, [*cuts[1:], len(evs)], strict=False):
            part = evs[a:b]
            starts = [e for e in part if e["kind"] == "starting"]
            assert len(starts) <= 1, f"{name} started twice for one submission: {part}"
            for s in starts:
                host, blocks = re.search(r"\((\S+)\) blocks ([\d,]+)", s["message"]).groups()
                end = next((e["ts"] for e in part if e["kind"] in ENDED and e["id"] > s["id"]), float("inf"))
                for blk in blocks.split(","):
                    spans[(host, int(blk))].append((s["ts"], end, name))
    for key, ss in spans.items():
        ss.sort()
        for (_, e1, n1), (s2, _, n2) in zip(ss, ss[1:], strict=False):
            assert s2 >= e1, f"block {key}: {n2} started at {s2} while {n1} held it until {e1}"
    assert not load.double_held, load.double_held[:10]
    ids = {e["id"] for e in events}
    for seen, top in load.followers:
        assert {i for i in ids if i <= top} <= seen, "a client following the events skipped some"
