#!/usr/bin/env python3
"""What the cap on forks buys: cold `gpufleet apply` of N nodes with runner.MAX_FORKS set to each
value, alternating. `sudo .venv/bin/python benchmarks/forks.py --nodes 64 --forks 64,32,16 --reps 2`"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_lab  # noqa: E402
from benchmarks.common import fmt, measure, median  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--forks", default="64,32,16")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    forks = [int(x) for x in args.forks.split(",")]
    res: dict[int, list] = {f: [] for f in forks}
    with bench_lab.lab(args.nodes) as d:
        c = bench_lab.Contenders(d)
        c.cold()
        c.run("gpufleet")  # first contact
        for _ in range(args.reps):
            for f in forks:
                c.cold()
                code = (f"import sys, gpufleet.runner as p; p.MAX_FORKS = {f}; from gpufleet.cli import main; "
                        f"sys.exit(main(['apply', '-f', {str(c.fleet)!r}, '-y']))")
                m = measure([sys.executable, "-c", code], env=c.env)
                res[f].append(m)
                print(f"  N={args.nodes} forks {f:3}: {m.wall:6.2f}s wall, {m.cpu:6.2f}s cpu, "
                      f"{m.peak_mib:5.0f} MiB, rc {m.rc}")
        c.cold()
    print("| forks | cold wall s (median) | controller CPU s | peak MiB |\n|---|---|---|---|")
    for f, ms in res.items():
        print(f"| {f} | {fmt(median([m.wall for m in ms]))} | {fmt(median([m.cpu for m in ms]))} | "
              f"{fmt(max(m.peak_mib for m in ms), 0)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
