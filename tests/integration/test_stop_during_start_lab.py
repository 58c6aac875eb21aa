"""A `gpufleet stop` that lands while a run is starting, on the lab (real hosts, real podman, a real
local server): the run's start is held by a failpoint (GPUFLEET_PAUSE) after its container started
and before the run is recorded running, the stop is sent then, the start let go. The run ends
`stopped`, its container removed from the host, its blocks free for the next run, and the events
name who stopped it.

The same on PostgreSQL, and at the other moments of a start (before its first container, during a
start that then fails), is tests/unit/test_stop_during_start.py's, on a real store."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import pytest
from conftest import Cli, wait_for

from gpufleet import failpoints
from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE
POINT = "after-start"


@pytest.fixture(scope="module")
def lab(lab_factory):
    return lab_factory(nodes=1, gpus=2, vendor="nvidia")


def task(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\nresources:\n  gpu: 2\nstop_duration: 1s\n"
                    f"commands:\n  - sleep 300\n")
    return path


def containers(lab) -> dict[str, str]:
    """The node's containers (name: state), as podman there says."""
    out = core.host_exec(lab, lab.nodes[0], ["podman", "ps", "-a", "--format", "json"]).stdout
    return {c["Names"][0]: c["State"] for c in json.loads(out or "[]")}


def in_background(fn) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def test_a_stop_during_the_start_ends_the_run_stopped_its_container_gone_and_its_blocks_free(lab, tmp_path):
    held, after = "held", "next"
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    cli = Cli(tmp_path / "home")
    # the first command starts the local server: with the failpoint that holds each start at POINT
    paused = {"GPUFLEET_PAUSE": POINT, "GPUFLEET_PAUSE_DIR": str(pauses)}

    def gf(*args: str, **kw):  # every command with that environment
        return cli(*args, env=paused, **kw)

    gf("apply", "-f", str(lab.fleet_file), "-y", check=0)
    try:
        submit, _ = in_background(lambda: gf("apply", "-f", str(task(tmp_path, held)), "-y", "-d"))
        wait_for("the start to reach the failpoint", lambda: failpoints.reached(pauses, POINT), timeout=60, every=0.2)
        assert containers(lab).get(f"gpufleet-{held}") == "running"  # the start made it; the run is `starting`
        assert _status(gf, held) == "starting"

        stop, stopped = in_background(lambda: gf("stop", held, "-y"))
        wait_for("the stop to begin", lambda: _status(gf, held) == "stopping", timeout=30, every=0.2)
        failpoints.release(pauses, POINT)
        stop.join(timeout=120)
        submit.join(timeout=120)
        assert not stop.is_alive() and not submit.is_alive()
        assert stopped[0].returncode == 0, stopped[0].stdout + stopped[0].stderr
        assert f"{held} stopped; its blocks are free." in stopped[0].stdout

        run = _runs(gf)[held]
        assert run["status"] == "stopped" and run["message"].startswith("stopped by "), run
        assert f"gpufleet-{held}" not in containers(lab)  # removed from the host
        events = json.loads(gf("events", "--run", held, "--json", check=0).stdout)
        kinds = [e["kind"] for e in events]
        assert kinds[kinds.index("stopping"):] == ["stopping", "stopped"] and "running" not in kinds, kinds
        stopping, end = events[-2], events[-1]
        assert end["actor"] == stopping["actor"] and end["actor"], events  # names who stopped it
        assert end["message"] == run["message"]

        # its blocks are free: the next run takes both GPUs and runs
        out = gf("apply", "-f", str(task(tmp_path, after)), "-y", "-d", check=0).stdout
        assert f"{after} is running" in out, out
        assert containers(lab).get(f"gpufleet-{after}") == "running"
        gf("stop", after, "-y", check=0)
    finally:
        failpoints.release(pauses, POINT)
        with contextlib.suppress(Exception):
            gf("server", "stop")


def _runs(gf) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(gf("ps", "-a", "--json", check=0).stdout)}


def _status(gf, name: str) -> str | None:
    return _runs(gf).get(name, {}).get("status")
