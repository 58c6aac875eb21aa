"""`gpufleet apply -f RUN.yml --dry-run`: the run is checked here, the server's plan (POST /api/runs/plan,
what apply asks before it submits) is shown, and nothing is submitted; exit 0. The CLI runs in this
process against a real HTTP server on loopback (fakeapi.py)."""

# ruff: noqa: F811 (the fixtures imported from fakeapi are the tests' arguments)
from __future__ import annotations

from pathlib import Path

import pytest
from fakeapi import Api, api, gf, server, write  # noqa: F401 (pytest fixtures)

from gpufleet import cli
from gpufleet.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE

RUN = "type: task\nname: train\nimage: busybox\ncommands: [echo hi]\nenv: [HF_TOKEN]\nresources: {gpu: 2}\n"
FITS = {"never": "", "waits": "", "placements": [
    {"fleet": "lab", "num": 1, "alias": "node-1", "blocks": [0, 1], "gpus": ["H100", "H100"], "cpus": 16,
     "memory_mib": 65536, "note": ""}]}


def test_parser_takes_dry_run_for_runs() -> None:
    args = cli.parser().parse_args(["apply", "-f", "run.yml", "--dry-run", "--no-queue", "--project", "ml"])
    assert args.dry_run and args.no_queue


def _posted(api: Api) -> list[str]:
    return [path for method, path, _ in api.asked if method == "POST"]


def test_dry_run_shows_the_servers_plan_and_submits_nothing(gf, api: Api, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)  # a dry run sends no secrets, so needs none (as a fleet's)
    api.routes["POST", "/api/runs/plan"] = (200, FITS)
    path = write(tmp_path, "train.yml", RUN)
    code, out, err = gf("apply", "-f", str(path), "--dry-run", "--project", "ml")  # no -y, no terminal: no prompt
    assert code == EXIT_OK, (out, err)
    assert _posted(api) == ["/api/runs/plan"]
    (_, _, body), = [a for a in api.asked if a[1] == "/api/runs/plan"]
    assert body == {"source": str(path), "text": RUN, "project": "ml"}
    assert "train" in out and "node-1" in out and "H100, H100" in out and "64GB" in out
    assert "--dry-run: nothing was submitted" in out
    assert "is for fleets" not in out + err


def test_dry_run_of_a_run_that_waits_says_so(gf, api: Api, tmp_path: Path) -> None:
    api.routes["POST", "/api/runs/plan"] = (200, {"never": "", "placements": [],
                                                  "waits": "waiting for 2 GPUs: node-1 0/8 free"})
    path = write(tmp_path, "train.yml", RUN)
    code, out, err = gf("apply", "-f", str(path), "--dry-run")
    assert code == EXIT_OK, (out, err)
    assert "train (task) does not fit now: waiting for 2 GPUs: node-1 0/8 free" in out
    assert "It will wait in the queue" in out and "--dry-run: nothing was submitted" in out
    assert _posted(api) == ["/api/runs/plan"]


def test_dry_run_of_a_run_that_can_never_fit_fails(gf, api: Api, tmp_path: Path) -> None:
    api.routes["POST", "/api/runs/plan"] = (200, {"never": "no host has 2 GPUs", "placements": [], "waits": ""})
    path = write(tmp_path, "train.yml", RUN)
    code, out, err = gf("apply", "-f", str(path), "--dry-run")
    assert code == EXIT_FAILED
    assert "no host has 2 GPUs; it would be refused" in err
    assert _posted(api) == ["/api/runs/plan"]


@pytest.mark.parametrize("text,message", [
    ("type: task\nimage: busybox\ncomands: [x]\n", "comands: unknown field 'comands'; did you mean 'commands'?"),
    ("type: task\nutilization_policy: {min_gpu_utilization: 10, time_window: 1m}\ncommands: [x]\n",
     "utilization_policy.time_window: must be at least 5m"),
])
def test_dry_run_of_a_bad_run_is_refused_before_the_server_is_asked(gf, api: Api, tmp_path: Path, text, message):
    path = write(tmp_path, "bad.yml", text)
    code, out, err = gf("apply", "-f", str(path), "--dry-run")
    assert code == EXIT_USAGE
    assert message in err
    assert api.asked == []


def test_without_dry_run_a_missing_secret_is_still_refused(gf, api: Api, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    path = write(tmp_path, "train.yml", RUN)
    code, out, err = gf("apply", "-f", str(path), "-y")
    assert code == EXIT_USAGE and "HF_TOKEN" in err
    assert api.asked == []
