"""dstack's `schedule` on the lab (real hosts, real podman, a real local server): a task with
`cron: '* * * * *'` is accepted and waits, survives a restart of the server, starts at the next
minute by itself, runs, waits for the next minute again, and `gpufleet stop` ends it for good."""

from __future__ import annotations

import json
import time

import pytest
from conftest import Cli, wait_for

from gpufleet.lab import core
from gpufleet.models.cron import utc_text

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def site(lab_factory, tmp_path_factory):
    lab = lab_factory(nodes=1, gpus=2, vendor="nvidia")
    cli = Cli(tmp_path_factory.mktemp("schedule-home") / "home")
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    yield cli
    cli("server", "stop")


def view(cli: Cli, name: str) -> dict:
    return {r["name"]: r for r in json.loads(cli("ps", "-a", "--json", check=0).stdout)}[name]


def events(cli: Cli, name: str) -> list[dict]:
    return json.loads(cli("events", "--json", "-n", "1000", "--run", name, check=0).stdout)


def test_every_minute_until_stopped(site, tmp_path):
    path = tmp_path / "minutely.yml"
    path.write_text(f"type: task\nname: minutely\nimage: {IMAGE}\nresources: {{gpu: 1}}\n"
                    "commands:\n  - echo ran-on-schedule\n"
                    "schedule:\n  cron: '* * * * *'\n")
    p = site("apply", "-f", str(path), "-y", check=0, timeout=60)  # attached, yet back at once: it waits for its time
    first = view(site, "minutely")
    assert first["status"] == "pending" and first["next_at"] % 60 == 0
    assert 0 < first["next_at"] - first["created_at"] <= 60
    assert first["message"] == f"scheduled: next {utc_text(first['next_at'])}"
    assert f"minutely is scheduled: next {utc_text(first['next_at'])}" in p.stdout, p.stdout
    assert "#" not in site("ps", check=0).stdout.split("minutely", 1)[1].splitlines()[0]  # no place in the queue yet

    # kept across a restart of the server
    site("server", "stop", check=0)
    assert view(site, "minutely")["next_at"] == first["next_at"]
    back = time.time()  # the server answers again (if it came back after the minute, it starts the run at once)

    # it starts at its time by itself, runs to its end, and waits for the next time
    def started() -> list[dict]:
        return [e for e in events(site, "minutely") if e["kind"] == "starting"]

    (start,) = wait_for("the scheduled start", started, timeout=first["next_at"] - time.time() + 45, every=1)
    assert first["next_at"] <= start["ts"] < max(first["next_at"], back) + 5, (start, first["next_at"], back)

    def again() -> dict | None:
        v = view(site, "minutely")
        return v if v["status"] == "pending" and v["next_at"] != first["next_at"] else None

    second = wait_for("it waits for the next minute", again, timeout=60, every=1)
    assert second["next_at"] >= first["next_at"] + 60 and second["message"].startswith("scheduled: next ")
    kinds = [e["kind"] for e in events(site, "minutely")]
    assert kinds[-3:] == ["running", "done", "scheduled"] or kinds[-2:] == ["done", "scheduled"], kinds
    done = [e for e in events(site, "minutely") if e["kind"] == "done"]
    assert done[-1]["message"] == "finished: exit code 0"

    # a user's stop ends it: no more starts
    site("stop", "minutely", "-y", check=0)
    stopped = view(site, "minutely")
    assert stopped["status"] == "stopped" and stopped["next_at"] is None
    assert not [e for e in events(site, "minutely") if e["kind"] == "scheduled" and e["ts"] > time.time()]
