"""The control plane on the lab (real hosts, real podman, a real local server): runs that do not fit
wait and start by themselves, priorities, max_duration, refusals, cancelling, and a server killed
with SIGKILL and restarted losing nothing."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import Cli, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(nodes=1, gpus=8, vendor="nvidia")


@pytest.fixture()
def q(lab, tmp_path):
    """A fresh state directory (so a local server of its own) with the one-node lab applied."""
    cli = Cli(tmp_path / "home")
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    yield cli
    cli("server", "stop")


def task(tmp_path: Path, name: str, commands: list[str], gpus: int = 8, extra: str = "") -> Path:
    path = tmp_path / f"{name}.yml"
    lines = "".join(f"  - {json.dumps(c)}\n" for c in commands)
    path.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\nresources:\n  gpu: {gpus}\n{extra}"
                    f"commands:\n{lines}")
    return path


def runs(cli: Cli) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(cli("ps", "-a", "--json", check=0).stdout)}


def events(cli: Cli, run: str | None = None) -> list[dict]:
    return json.loads(cli("events", "--json", "-n", "1000", *(["--run", run] if run else []), check=0).stdout)


def ended(cli: Cli, name: str):
    return lambda: [e for e in events(cli, name) if e["kind"] in ("done", "failed", "stopped")]


def test_a_run_that_does_not_fit_waits_and_starts_by_itself_when_blocks_free(q, tmp_path):
    first = task(tmp_path, "first", ["sleep 4", "cut -d' ' -f1 /proc/uptime"])
    second = task(tmp_path, "second", ["cut -d' ' -f1 /proc/uptime", "echo second-ran"])
    p = q("apply", "-f", str(first), "-y", "-d", check=0)
    assert "first is running" in p.stdout
    p = q("apply", "-f", str(second), "-y", "-d", check=0)
    assert "does not fit now" in p.stdout and "second is queued (#1)" in p.stdout, p.stdout
    row = runs(q)["second"]
    assert row["status"] == "pending" and row["position"] == 1
    assert "waiting for 8 GPU" in row["message"] and "0/8 free" in row["message"], row["message"]
    # nobody runs `ps` from here on: the server notices the first run's exit and starts the second
    wait_for("the second run to finish", ended(q, "second"))
    first_end = float(q("logs", "first", check=0).stdout.split()[-1])
    second_start = float(q("logs", "second", check=0).stdout.split()[0])
    # the kernel's uptime (one clock for every lab host and container); loosely (the target is 5 s from
    # the blocks being freed; benchmarks/ measures the spread, on a machine not running other tests)
    assert 0 < second_start - first_end < 10.0, second_start - first_end
    kinds = [e["kind"] for e in events(q, "second")]
    assert kinds == ["submitted", "queued", "starting", "running", "done"], kinds
    rows = runs(q)
    assert rows["first"]["status"] == rows["second"]["status"] == "done"


def test_a_higher_priority_run_overtakes_a_waiting_lower_one(q, tmp_path):
    q("apply", "-f", str(task(tmp_path, "blocker", ["sleep 300"])), "-y", "-d", check=0)
    q("apply", "-f", str(task(tmp_path, "low", ["sleep 300"], extra="priority: 10\n")), "-y", "-d", check=0)
    q("apply", "-f", str(task(tmp_path, "high", ["sleep 300"], extra="priority: 90\n")), "-y", "-d", check=0)
    rows = runs(q)
    assert (rows["high"]["position"], rows["low"]["position"]) == (1, 2)
    assert (rows["high"]["priority"], rows["low"]["priority"]) == (90, 10)
    q("stop", "blocker", "-y", check=0)
    wait_for("high to run", lambda: runs(q)["high"]["status"] == "running")
    assert runs(q)["low"]["status"] == "pending"
    q("stop", "high", "-y", check=0)
    wait_for("low to run", lambda: runs(q)["low"]["status"] == "running")
    q("stop", "low", "-y", check=0)
    starts = [e["run"] for e in events(q) if e["kind"] == "starting"]
    assert starts == ["blocker", "high", "low"], starts


def test_max_duration_stops_a_run_and_frees_its_blocks(q, tmp_path):
    path = task(tmp_path, "limited", ["sleep 600"], extra="max_duration: 3s\nstop_duration: 1s\n")
    q("apply", "-f", str(path), "-y", "-d", check=0)
    [end] = wait_for("max_duration to stop it", ended(q, "limited"), timeout=60)
    assert end["kind"] == "stopped" and "max_duration (3s)" in end["message"], end
    row = runs(q)["limited"]
    assert row["status"] == "stopped" and row["max_duration"] == 3
    fleets = json.loads(q("fleet", "list", "--json", check=0).stdout)
    assert all(i["blocks"]["busy"] == 0 for f in fleets for i in f["instances"])


def test_retry_false_and_no_queue_refuse_at_once_and_an_impossible_run_is_never_queued(q, tmp_path):
    q("apply", "-f", str(task(tmp_path, "holder", ["sleep 300"])), "-y", "-d", check=0)
    p = q("apply", "-f", str(task(tmp_path, "eager", ["true"], extra="retry: false\n")), "-y", "-d")
    assert p.returncode == 1 and "not queued: retry: false" in p.stderr, p.stdout + p.stderr
    p = q("apply", "-f", str(task(tmp_path, "eager2", ["true"])), "-y", "-d", "--no-queue")
    assert p.returncode == 1 and "not queued: --no-queue" in p.stderr, p.stdout + p.stderr
    # 16 GPUs on one host: no host of this fleet has that many, so it is refused whatever runs
    p = q("apply", "-f", str(task(tmp_path, "huge", ["true"], gpus=16)), "-y", "-d")
    assert p.returncode == 1 and "never fits" in p.stderr and "the most any ready host has is 8" in p.stderr, \
        p.stdout + p.stderr
    assert set(runs(q)) == {"holder"}  # none of the three was recorded
    q("stop", "holder", "-y", check=0)


def test_stop_cancels_a_waiting_run(q, tmp_path):
    q("apply", "-f", str(task(tmp_path, "holder", ["sleep 300"])), "-y", "-d", check=0)
    q("apply", "-f", str(task(tmp_path, "waiter", ["true"])), "-y", "-d", check=0)
    p = q("stop", "waiter", "-y", check=0)
    assert "waiter cancelled; it had not started" in p.stdout
    q("stop", "holder", "-y", check=0)
    time.sleep(3)  # longer than a scheduling pass: the cancelled run must not start
    rows = runs(q)
    assert rows["waiter"]["status"] == "stopped" and rows["waiter"]["started_at"] is None
    assert [e["kind"] for e in events(q, "waiter")] == ["submitted", "queued", "stopped"]


def test_the_server_killed_with_sigkill_loses_no_waiting_or_running_run(q, tmp_path, lab):
    q("apply", "-f", str(task(tmp_path, "long", ["sleep 300"], gpus=4)), "-y", "-d", check=0)
    q("apply", "-f", str(task(tmp_path, "half", ["sleep 300"], gpus=4)), "-y", "-d", check=0)
    q("apply", "-f", str(task(tmp_path, "queued", ["echo queued-ran"], gpus=8)), "-y", "-d", check=0)
    before = json.loads(q("server", "status", "--json", check=0).stdout)
    os.kill(before["pid"], signal.SIGKILL)
    wait_for("the killed server to be gone", lambda: not Path(f"/proc/{before['pid']}").exists(), timeout=10)
    # the next command starts a new server on the same state: it adopts what runs and keeps the queue
    rows = runs(q)
    after = json.loads(q("server", "status", "--json", check=0).stdout)
    assert after["pid"] != before["pid"]
    assert (rows["long"]["status"], rows["half"]["status"], rows["queued"]["status"]) == \
        ("running", "running", "pending"), rows
    assert rows["queued"]["position"] == 1
    time.sleep(5)  # a few reconcile passes of the new server: the containers are still there, adopted
    assert {runs(q)[n]["status"] for n in ("long", "half")} == {"running"}
    names = core.host_exec(lab, lab.nodes[0], ["sh", "-c", "podman ps --format '{{.Names}}'"]).stdout.split()
    assert {"gpufleet-long", "gpufleet-half"} <= set(names)
    q("stop", "long", "-y", check=0)
    q("stop", "half", "-y", check=0)
    wait_for("the queued run to finish", ended(q, "queued"))
    assert runs(q)["queued"]["status"] == "done"


def test_the_api_needs_the_token_and_documents_itself(q):
    import urllib.error
    import urllib.request

    info = json.loads(q("server", "status", "--json", check=0).stdout)
    url = info["url"]
    assert url.startswith("http://127.0.0.1:")  # loopback only
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=10) as r:
        assert "/api/runs" in json.load(r)["paths"]
    for path in ("/api/runs", "/api/events", "/api/fleets", "/api/server"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}{path}", timeout=10)
        assert e.value.code == 401
        assert "token" in json.load(e.value)["detail"]
    token_file = q.home / "server" / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    req = urllib.request.Request(f"{url}/api/runs", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.load(r) == []
    # another state directory has its own server
    other = Cli(q.home.parent / "other-home")
    try:
        other("ps", check=0)
        assert json.loads(other("server", "status", "--json", check=0).stdout)["url"] != url
    finally:
        other("server", "stop")


def test_retry_on_error_runs_a_failed_run_again(q, tmp_path):
    # the first try leaves a mark on the host (a bind mount) and fails; the second sees it and succeeds
    mark = tmp_path / "retry-mark"
    mark.mkdir()
    mark.chmod(0o777)
    path = task(tmp_path, "flaky", ["if [ ! -e /mark/once ]; then touch /mark/once; exit 3; fi", "echo second-try"],
                gpus=1, extra=f"retry:\n  on_events: [error]\n  duration: 1h\nvolumes: ['{mark}:/mark']\n")
    q("apply", "-f", str(path), "-y", "-d", check=0)
    [end] = wait_for("the retried run to end", ended(q, "flaky"))
    assert end["kind"] == "done", end
    kinds = [(e["kind"], e["message"]) for e in events(q, "flaky")]
    assert ("queued", "retrying after an error (exited with code 3); waiting again") in kinds, kinds
    assert [k for k, _ in kinds].count("starting") == 2
    assert "second-try" in q("logs", "flaky", check=0).stdout
    # without retry on errors, a failure is final
    q("apply", "-f", str(task(tmp_path, "once", ["exit 4"], gpus=1)), "-y", "-d")  # exit 1 if it ends at once
    [end] = wait_for("the failed run to end", ended(q, "once"))
    assert end["kind"] == "failed" and end["message"] == "exited with code 4", end
