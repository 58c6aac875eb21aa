"""Metrics end to end on the lab (issue 15): the server's own metrics loop samples a real host
through the fleet's ssh masters and keeps the samples; a run made busy by gpu-burn has its
utilization in `gpufleet metrics`, /api/gpus and /metrics; a gpu-burn started by hand on the host
makes its GPU `outside`; a simulated fault makes one `unhealthy`; both are what the scheduler is
told to withhold. The GPUs are the lab's stand-ins; the server, sshd, podman and SQLite are real."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from conftest import Cli, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE
pytest.importorskip("gpufleet.metrics.sample", reason="the sampler (gpufleet.metrics.sample) is not in this tree")
if not hasattr(core, "start_gpu_burn"):
    pytest.skip("the lab has no gpu-burn in this tree", allow_module_level=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("mstore-home")
    (home / "server.yml").write_text("metrics_interval: 1\n")  # the local server's settings
    return home


@pytest.fixture(scope="module")
def lab(lab_factory, home):
    lab = lab_factory(nodes=1, gpus=4, vendor="nvidia")
    Cli(home)("apply", "-f", str(lab.fleet_file), "-y", check=0)
    return lab


def get(home: Path, path: str) -> bytes:
    """``path`` of the home's local server, as its admin (the state directory's token)."""
    url = json.loads((home / "server" / "local.json").read_text())["url"]
    token = (home / "server" / "token").read_text().strip()
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def test_busy_outside_and_unhealthy_gpus_are_seen_everywhere(lab, home, tmp_path, monkeypatch):
    from prometheus_client.parser import text_string_to_metric_families

    cli = Cli(home)
    task = tmp_path / "burn.yml"
    task.write_text(f"type: task\nname: burn\nimage: {IMAGE}\nresources:\n  gpu: 1\nstop_duration: 1s\n"
                    "commands:\n  - gpu-burn --seconds 300 --percent 80\n")
    cli("apply", "-f", str(task), "-y", "-d", check=0)
    run = wait_for("the run to start", lambda: next(
        (r for r in json.loads(cli("ps", "-a", "--json", check=0).stdout)
         if r["name"] == "burn" and r["status"] == "running"), None), timeout=120)
    [node] = run["nodes"]
    [mine] = [g["index"] for g in node["gpus"]]
    host = lab.nodes[0]
    stray_gpu, sick_gpu = [i for i in range(4) if i != mine][:2]
    by_hand = core.start_gpu_burn(lab, host, "--gpus", str(stray_gpu), "--seconds", "300")
    core.fault(lab, host, sick_gpu, "ecc")
    try:
        def seen():
            gpus = {g["index"]: g for g in json.loads(get(home, "/api/gpus"))}
            done = (gpus[mine]["utilization"] == 80 and gpus[stray_gpu]["status"] == "outside"
                    and gpus[sick_gpu]["status"] == "unhealthy")
            return gpus if done else None

        gpus = wait_for("the server's samples to show the three GPUs", seen, timeout=60)
        assert (gpus[mine]["status"], gpus[mine]["run"], gpus[mine]["block"]) == ("busy", "burn", mine)
        assert [p["run"] for p in gpus[mine]["processes"]] == ["burn"]
        assert gpus[stray_gpu]["reason"].startswith(f"pid {by_hand.pid} (") and gpus[stray_gpu]["run"] is None
        assert gpus[sick_gpu]["reason"] and gpus[sick_gpu]["run"] is None
        others = [i for i in range(4) if i not in (mine, stray_gpu, sick_gpu)]
        assert [gpus[i]["status"] for i in others] == ["free"]
        # /metrics
        fams = {f.name: f for f in text_string_to_metric_families(get(home, "/metrics").decode())}

        def value(name: str, gpu: int) -> float:
            [v] = [s.value for s in fams[name].samples if s.labels["gpu"] == str(gpu)]
            return v

        assert value("gpufleet_gpu_utilization_percent", mine) == 80
        [labels] = [s.labels for s in fams["gpufleet_gpu_busy"].samples if s.value == 1]
        assert (labels["gpu"], labels["run"], labels["host"]) == (str(mine), "burn", host.address)
        assert value("gpufleet_gpu_outside", stray_gpu) == 1 and value("gpufleet_gpu_healthy", sick_gpu) == 0
        assert [s.value for s in fams["gpufleet_run_memory_bytes"].samples if s.labels["run"] == "burn"][0] > 0
        # the scheduler: a new 1-GPU run gets the one GPU that is free, never the stray's or the faulty one;
        # the next waits; the fault cleared, it starts on that GPU
        fleets = json.loads(get(home, "/api/fleets"))
        [inst] = [i for f in fleets for i in f["instances"]]
        assert len(inst["withheld"]) == 2, inst
        shown = cli("ps", check=0).stdout  # what ps says under its runs: the two GPUs no run gets, and why
        assert "GPU KEPT FROM RUNS" in shown and f"pid {by_hand.pid}" in shown and "uncorrected ECC" in shown, shown
        for name in ("next", "waits"):
            spec = tmp_path / f"{name}.yml"
            spec.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\nresources:\n  gpu: 1\n  cpu: 1..\n"
                            "stop_duration: 1s\ncommands:\n  - sleep 300\n")
            cli("apply", "-f", str(spec), "-y", "-d", check=0)

        def status(name: str) -> dict:
            return next(r for r in json.loads(cli("ps", "-a", "--json", check=0).stdout) if r["name"] == name)

        placed = wait_for("next to start", lambda: status("next") if status("next")["status"] == "running" else None,
                          timeout=120)
        [free] = [i for i in range(4) if i not in (mine, stray_gpu, sick_gpu)]
        assert [g["index"] for g in placed["nodes"][0]["gpus"]] == [free]
        waiting = status("waits")
        assert waiting["status"] == "pending"
        assert f"(GPU {stray_gpu} used outside gpufleet, GPU {sick_gpu} unhealthy)" in waiting["message"], waiting
        core.fault(lab, host, sick_gpu, None)
        placed = wait_for("waits to start on the GPU that is healthy again",
                          lambda: status("waits") if status("waits")["status"] == "running" else None, timeout=120)
        assert [g["index"] for g in placed["nodes"][0]["gpus"]] == [sick_gpu]
        events = [e for e in json.loads(cli("events", "--json", check=0).stdout) if e["kind"].startswith("gpu-")]
        assert [e["kind"] for e in events].count("gpu-withheld") == 2, events
        assert any(e["kind"] == "gpu-released" and f"GPU {sick_gpu} " in e["message"] for e in events), events
        # the CLI
        got = json.loads(cli("metrics", "burn", "--json", check=0).stdout)
        assert got["gpus"][0]["index"] == mine and got["latest"][0]["utilization"] == 80
        assert got["resolution"] == "raw" and got["series"][0]["points"] and got["containers"]
        table = cli("metrics", "burn", check=0).stdout
        assert "80%" in table and "Over its life" in table
    finally:
        by_hand.stop()
        core.fault(lab, host, sick_gpu, None)
        for name in ("burn", "next", "waits"):
            cli("stop", name, "-y", check=0)
