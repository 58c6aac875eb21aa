"""`gpufleet metrics RUN` against a real HTTP server on loopback answering as the API does: the
tables (now, over the run's life, its containers), --json as the API's answer, exit 3 on 403, and
user text never read as markup."""

from __future__ import annotations

import json
import time

from fakeapi import api, gf, server  # noqa: F401 - pytest fixtures

from gpufleet.errors import EXIT_OK

HOST = "[bold]node-a[/]"  # an alias a user wrote: printed as it is


def answer(now: float) -> dict:
    return {
        "run": "r", "resolution": "raw",
        "gpus": [{"host": HOST, "index": 0, "uuid": "GPU-0", "model": "H100"},
                 {"host": HOST, "index": 1, "uuid": "GPU-1", "model": "H100"}],
        "latest": [{"host": HOST, "index": 0, "at": now - 5, "utilization": 87.0, "memory_used_mib": 40960,
                    "memory_total_mib": 81920, "temperature_c": 61.0, "power_w": 402.4},
                   {"host": HOST, "index": 1, "at": now - 5, "utilization": None, "memory_used_mib": None,
                    "memory_total_mib": 81920, "temperature_c": None, "power_w": None}],
        "series": [{"host": HOST, "index": 0, "points": [[now - 25, 10.0, 1024], [now - 15, 50.0, 61440],
                                                         [now - 5, 87.0, 40960]]}],
        "containers": [{"host": HOST, "at": now - 15, "cpu_percent": 80.0, "memory_bytes": 2**30,
                        "memory_limit_bytes": 2**33},
                       {"host": HOST, "at": now - 5, "cpu_percent": 150.0, "memory_bytes": 3 * 2**30,
                        "memory_limit_bytes": 2**33}],
    }


def test_metrics_tables_and_json(gf, api) -> None:  # noqa: F811
    got = answer(time.time())
    api.routes[("GET", "/api/runs/r/metrics")] = (200, got)
    code, out, err = gf("metrics", "r")
    assert code == EXIT_OK, err
    rows = [line.split() for line in out.splitlines()]
    assert [HOST, "0:H100", "87%", "40.0/80.0", "GiB", "61°C", "402", "W"] == rows[2][:8], out
    assert [HOST, "1:H100", "-", "-", "-", "-"] == rows[3][:6], out
    assert any(r[:7] == [HOST, "0", "10%", "49%", "87%", "60.0", "GiB"] and r[-1] == "3" for r in rows), out
    assert any(r[:5] == [HOST, "150%", "3.0", "GiB", "8.0"] for r in rows), out  # the latest container sample
    code, out, _ = gf("metrics", "r", "--json")
    assert code == EXIT_OK and json.loads(out) == got


def test_no_samples_yet(gf, api) -> None:  # noqa: F811
    api.routes[("GET", "/api/runs/r/metrics")] = (200, {"run": "r", "resolution": "raw", "latest": [], "series": [],
                                                        "containers": [], "gpus": [{"host": "a", "index": 2,
                                                                                    "uuid": None, "model": "H100"}]})
    code, out, _ = gf("metrics", "r")
    assert code == EXIT_OK and "No metrics of run r yet (a GPU 2)" in out


def test_denied_exits_3(gf, api) -> None:  # noqa: F811
    api.routes[("GET", "/api/runs/r/metrics")] = (403, {"detail": "reading the metrics of run r needs to be its "
                                                                  "submitter or an admin of project default",
                                                        "exit_code": 3})
    code, out, err = gf("metrics", "r")
    assert code == 3 and "reading the metrics of run r needs" in err and "Traceback" not in err
