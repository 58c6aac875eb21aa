"""dstack's utilization_policy on the lab (issue 15): a run whose GPU stays under the minimum for the
whole window is stopped by the server with the reason; a busy one with the same policy keeps running.
dstack's smallest window (5m) makes this the longest lab test but one: everything else waits on it.
The GPUs are the lab's stand-ins, driven by gpu-burn inside the runs' containers; the server's own
metrics loop samples them through the fleet's ssh masters."""

from __future__ import annotations

import json
import time

import pytest
from conftest import Cli, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab

POLICY = "utilization_policy:\n  min_gpu_utilization: 50\n  time_window: 5m\n"


def test_an_idle_run_is_stopped_and_a_busy_one_is_not(lab_factory, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "server.yml").write_text("metrics_interval: 2\n")
    lab = lab_factory(nodes=1, gpus=2, vendor="nvidia")
    cli = Cli(home)
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    for name, percent in (("idle", 20), ("busy", 90)):
        spec = tmp_path / f"{name}.yml"
        spec.write_text(f"type: task\nname: {name}\nimage: {core.LAB_IMAGE}\nresources:\n  gpu: 1\n  cpu: 1..\n"
                        f"stop_duration: 1s\n{POLICY}commands:\n  - gpu-burn --percent {percent}\n")
        cli("apply", "-f", str(spec), "-y", "-d", check=0)

    def runs() -> dict[str, dict]:
        return {r["name"]: r for r in json.loads(cli("ps", "-a", "--json", check=0).stdout)}

    started = wait_for("both runs to run", lambda: (lambda r: r if all(
        r.get(n, {}).get("status") == "running" for n in ("idle", "busy")) else None)(runs()), timeout=120)
    idle_gpu = started["idle"]["nodes"][0]["gpus"][0]["index"]
    host = started["idle"]["nodes"][0]["alias"]
    t0 = time.time()
    # not before its window has passed (samples must cover it) ...
    time.sleep(200)
    assert {n: r["status"] for n, r in runs().items()} == {"idle": "running", "busy": "running"}
    # ... then within about a minute of it
    ended = wait_for("the idle run to be stopped", lambda: (lambda r: r if r["status"] == "stopped" else None)(
        runs()["idle"]), timeout=300)
    assert time.time() - t0 < 300 + 120
    assert (f"its utilization_policy: GPU {idle_gpu} on {host} stayed below 50% for 5m (at most 20% in"
            in ended["message"]), ended
    events = json.loads(cli("events", "--json", check=0).stdout)
    stop = next(e for e in events if e["run"] == "idle" and "utilization_policy" in e["message"])
    assert stop["ts"] - ended["started_at"] >= 300, (stop, ended)  # never before it held its GPU for the window
    assert runs()["busy"]["status"] == "running"
    metrics = json.loads(cli("metrics", "busy", "--json", check=0).stdout)
    assert metrics["latest"][0]["utilization"] == 90
    cli("stop", "busy", "-y", check=0)
