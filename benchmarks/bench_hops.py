"""What a second jump hop costs: `gpufleet apply` (cold and warm) and the raw-SSH floor on a lab behind one
login node and on a lab behind a gateway and a login node (`gpufleet lab up --hops 2`), same size.

    sudo .venv/bin/python -m benchmarks.bench_hops     # 16 nodes, 3 repetitions; rewrites its README section
    sudo .venv/bin/python -m benchmarks.bench_hops --nodes 4 --reps 1 --no-readme

Both labs are up at once and measured in turns (an untimed first contact each, then per repetition each
lab's cold = every master closed and warm = the masters of the run before kept, as benchmarks/bench_lab.py),
so a change in the machine's load falls on both alike. The raw floor opens one master per hop, in chain
order, then runs the probe's commands on every node in parallel through them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_lab  # noqa: E402
from benchmarks.common import fmt, median  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"
RESULTS = Path(__file__).resolve().parent / "results_hops.json"
BEGIN, END = "<!-- bench_hops:begin -->", "<!-- bench_hops:end -->"
LABELS = {"gpufleet": "gpufleet apply", "raw": "raw floor (a master per hop, then parallel ssh)"}
TITLE = "## What the second jump hop costs (`gpufleet lab up --hops 2`, `benchmarks/bench_hops.py`)"


def bench(nodes: int, reps: int, log=print) -> dict:
    """{hops: {"lab_s": s, "cold"/"warm": {who: {"wall": [...], "failed": [...]}}, "open": {hop: [s...]}}}

    Both labs are up at once and measured in turns (1 hop, 2 hops; then 2, 1...), so that a change in
    the machine's load falls on both alike."""
    res: dict = {}
    with ExitStack() as stack:
        labs = {}
        for hops in (1, 2):
            t0 = time.perf_counter()
            d = stack.enter_context(bench_lab.lab(nodes, log, hops))
            res[hops] = {"lab_s": time.perf_counter() - t0, "cold": {}, "warm": {}, "open": {}}
            labs[hops] = bench_lab.Contenders(d)
            stack.callback(labs[hops].cold)
        for c in labs.values():  # untimed first contact: host keys recorded, the fleet in the state
            for who in ("gpufleet", "raw"):
                c.cold()
                c.run(who)
        for rep in range(reps):
            for hops in ((1, 2) if rep % 2 == 0 else (2, 1)):
                c = labs[hops]
                for who in ("gpufleet", "raw"):
                    for mode in ("cold", "warm"):
                        if mode == "cold":
                            c.cold()
                        m = c.run(who)
                        r = res[hops][mode].setdefault(who, {"wall": [], "failed": []})
                        r["wall"].append(m.wall)
                        r["failed"].append(m.extra["failed"])
                        log(f"  {hops} hop(s) rep {rep + 1} {mode:4} {who:8}: {m.wall:6.2f}s, "
                            f"{m.extra['failed']} failed")
                # one master per hop opened in chain order from cold: what each handshake takes
                c.cold()
                for i, jump in enumerate(c.jumps):
                    t0 = time.perf_counter()
                    subprocess.run(["ssh", "-F", str(c.ssh_config), "-o", "ControlPersist=120s", "-n", jump, "true"],
                                   check=True, capture_output=True, timeout=60)
                    res[hops]["open"].setdefault(str(i + 1), []).append(time.perf_counter() - t0)
    return res


def render(res: dict, nodes: int, reps: int, took: float) -> str:
    lines = [f"Run `sudo .venv/bin/python -m benchmarks.bench_hops --nodes {nodes} --reps {reps}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
             f"{took / 60:.1f} min; {nodes} lab nodes x 8 simulated H100; medians of {reps} repetitions.", "",
             "| mode | contender | 1 hop: wall s | 2 hops: wall s | second hop costs | 1 hop: x raw floor "
             "| 2 hops: x raw floor | failed host-runs (1 hop / 2 hops) |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in ("cold", "warm"):
        for who in ("gpufleet", "raw"):
            one, two = (res[h][mode][who] for h in (1, 2))
            w1, w2 = median(one["wall"]), median(two["wall"])
            r1, r2 = (median(res[h][mode]["raw"]["wall"]) for h in (1, 2))
            lines.append(f"| {mode} | {LABELS[who]} | {fmt(w1)} | {fmt(w2)} | {w2 - w1:+.2f} s "
                         f"({100 * (w2 - w1) / w1:+.0f}%) | {fmt(w1 / r1)} | {fmt(w2 / r2)} | "
                         f"{sum(one['failed'])}/{sum(two['failed'])} |")
    lines += ["", "Opening the masters from cold, in chain order (median ms): "
              + "; ".join(f"{h} hop{'s' if h > 1 else ''}: " + ", ".join(
                  f"hop {i} {1000 * median(ts):.0f}" for i, ts in res[h]["open"].items()) for h in (1, 2))]
    lines += ["", "Lab creation: " + ", ".join(f"{h} hop{'s' if h > 1 else ''} {res[h]['lab_s']:.1f}s" for h in (1, 2))]
    return "\n".join(lines)


def write_readme(text: str) -> None:
    doc = README.read_text()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + f"\n\n{TITLE}\n\n{block}\n"
    README.write_text(doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    res = bench(args.nodes, args.reps)
    text = render(res, args.nodes, args.reps, time.time() - t0)
    print(text)
    if not args.no_readme:
        RESULTS.write_text(json.dumps({"nodes": args.nodes, "reps": args.reps, "results": res}, indent=1))
        write_readme(text)
        print(f"results written into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
