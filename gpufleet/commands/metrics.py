"""gpufleet metrics RUN: a run's GPUs now (utilization, memory, temperature, power; per host for a
multi-node run) and over its life (min/mean/max utilization, peak memory), and its containers' CPU
and memory, as the server sampled them (dstack's `dstack metrics`)."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.text import Text

from gpufleet.commands.common import add_json, add_name, add_project
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    m = sub.add_parser("metrics", help="a run's GPU utilization, memory, temperature and power, now and over its life")
    add_name(m)
    add_json(m)
    add_project(m)
    m.set_defaults(func=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from gpufleet import present
    from gpufleet.client import connect
    from gpufleet.commands.common import project

    client = connect()
    got = client.get(f"/api/runs/{args.name}/metrics", project=project(args, client))
    if args.json:
        print(json.dumps(got, indent=2))
        return EXIT_OK
    if not got["latest"] and not got["series"]:
        gpus = ", ".join(f"{g['host']} GPU {g['index']}" for g in got["gpus"])
        present.plain(console, f"No metrics of run {got['run']} yet" + (f" ({gpus})" if gpus else " (no GPUs)")
                      + ": the server samples its hosts every few seconds.")
        _containers(console, got)
        return EXIT_OK
    now = time.time()
    models = {(g["host"], g["index"]): g.get("model") or "" for g in got["gpus"]}
    t = present.table("HOST", "GPU", "UTIL", "MEMORY", "TEMP", "POWER", "SAMPLED")
    for g in got["latest"]:
        t.add_row(Text(g["host"]), Text(f"{g['index']}:{models.get((g['host'], g['index']), '')}".rstrip(":")),
                  _pct(g["utilization"]), _mem(g["memory_used_mib"], g["memory_total_mib"]),
                  "-" if g["temperature_c"] is None else f"{g['temperature_c']:.0f}°C",
                  "-" if g["power_w"] is None else f"{g['power_w']:.0f} W",
                  present.age(g["at"], now) if g["at"] else "-")
    present.plain(console, f"Run {got['run']}: its GPUs now")
    console.print(t)
    life = present.table("HOST", "GPU", "MIN", "MEAN", "MAX", "PEAK MEMORY", "SAMPLES")
    for s in got["series"]:
        util = [p[1] for p in s["points"] if p[1] is not None]
        mem = [p[2] for p in s["points"] if p[2] is not None]
        life.add_row(Text(s["host"]), str(s["index"]), _pct(min(util) if util else None),
                     _pct(sum(util) / len(util) if util else None), _pct(max(util) if util else None),
                     _mem(max(mem) if mem else None, None), str(len(s["points"])))
    first = min((p[0] for s in got["series"] for p in s["points"]), default=None)
    resolution = "every sample" if got["resolution"] == "raw" else "1-minute means"
    present.plain(console, f"\nOver its life ({resolution}" + (f", since {_when(first)})" if first else ")"))
    console.print(life)
    _containers(console, got)
    return EXIT_OK


def _containers(console: Console, got: dict) -> None:
    from gpufleet import present

    last: dict[str, dict] = {}
    for c in got["containers"]:
        last[c["host"]] = c
    if not last:
        return
    t = present.table("HOST", "CPU", "MEMORY", "LIMIT", "SAMPLED")
    for host, c in sorted(last.items()):
        t.add_row(Text(host), "-" if c["cpu_percent"] is None else f"{c['cpu_percent']:.0f}%",
                  _bytes(c["memory_bytes"]), _bytes(c["memory_limit_bytes"]), _when(c["at"]))
    present.plain(console, "\nIts containers (latest)")
    console.print(t)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _mem(used: int | None, total: int | None) -> str:
    if used is None:
        return "-"
    gib = used / 1024
    return f"{gib:.1f}/{total / 1024:.1f} GiB" if total else f"{gib:.1f} GiB"


def _bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
