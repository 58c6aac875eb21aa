#!/usr/bin/env python3
"""Run the gpufleet benchmark suite and write its results table into benchmarks/README.md.

    sudo .venv/bin/python benchmarks/run.py            # everything (needs root for the lab)
    .venv/bin/python benchmarks/run.py --quick         # small sizes, one repetition, no README update
    .venv/bin/python benchmarks/run.py --only alloc,pack
    .venv/bin/python benchmarks/run.py --only sched --keep   # the trace-driven scheduler benchmark alone
    sudo .venv/bin/python benchmarks/run.py --only server --keep  # the control plane (start-up, queue, API load)
    sudo .venv/bin/python benchmarks/run.py --only runs --keep    # runs with the server: start, ps, queue, memory

PostgreSQL for the allocator and server benchmarks: GPUFLEET_BENCH_DATABASE_URL (a database of its own:
its gpufleet tables are dropped and re-created), else the PostgreSQL rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_alloc, bench_lab, bench_pack, bench_runs, bench_sched, bench_server  # noqa: E402
from benchmarks.common import fmt, median  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"
RESULTS = Path(__file__).resolve().parent / "results.json"  # the last full run's numbers, per section
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def check(ok: bool) -> str:
    return "met" if ok else "**missed**"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N=4 only, one repetition, 1,000 hosts; README untouched")
    ap.add_argument("--only", default="apply,ps,alloc,pack,sched,server,runs",
                    help="comma-separated: apply,ps,alloc,pack,sched,server,runs")
    ap.add_argument("--sizes", default=None, help="apply: fleet sizes (default 4,16,64)")
    ap.add_argument("--reps", type=int, default=None, help="apply: repetitions (default 3)")
    ap.add_argument("--ansible-max", type=int, default=16,
                    help="apply: largest N plain Ansible runs at (default 16; 64 takes minutes per run)")
    ap.add_argument("--biggest", action="store_true",
                    help="runs: also the biggest lab this machine holds (256 nodes asked; ~10 min); else its "
                         "numbers are kept from benchmarks/results.json")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument("--keep", action="store_true",
                    help="with --only: render the sections not run from benchmarks/results.json (an earlier full run)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    sizes = [int(x) for x in (args.sizes or ("4" if args.quick else "4,16,64")).split(",")]
    reps = args.reps or (1 if args.quick else 3)
    t_start = time.time()
    results: dict = {}
    if "apply" in only:
        print("== fleet apply")
        results["apply"] = bench_lab.bench_apply(sizes, reps, args.ansible_max)
    if "ps" in only:
        print("== gpufleet ps")
        results["ps"] = bench_lab.bench_ps(4 if args.quick else 16, 3 if args.quick else 5)
    if "alloc" in only:
        print("== allocator")
        results["alloc"] = bench_alloc.bench(hosts=1000 if args.quick else 10_000,
                                             per_client=50 if args.quick else 100,
                                             pg_url=bench_alloc.pg_bench_url())
    if "pack" in only:
        print("== packing")
        results["pack"] = bench_pack.bench(jobs=1000 if args.quick else 4000,
                                           seeds=(1,) if args.quick else tuple(range(1, 11)))
    if "sched" in only:
        print("== scheduling (job traces)")
        results["sched"] = bench_sched.bench(limit=5000 if args.quick else None)
    if "server" in only:
        print("== control plane (gpufleet server)")
        results["server"] = bench_server.bench(quick=args.quick)
    if "runs" in only:
        print("== runs with the server (start, ps, queue, memory)")
        results["runs"] = bench_runs.bench(quick=args.quick, big=args.biggest)
    took = time.time() - t_start
    if not args.quick:
        saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        if "runs" in results and "biggest" not in results["runs"] and "biggest" in saved.get("runs", {}):
            results["runs"]["biggest"] = saved["runs"]["biggest"]  # measured apart (--biggest)
        saved.update(json.loads(json.dumps(results, default=str)))
        RESULTS.write_text(json.dumps(saved, indent=1))
        if args.keep:
            results = {**{k: v for k, v in saved.items() if k not in results}, **results}
    results = json.loads(json.dumps(results, default=str))
    if "apply" in results:
        results["apply"] = {int(n): r for n, r in results["apply"].items()}
    for r in results.get("pack", []):
        r["refused_by_size"] = {int(k): v for k, v in r["refused_by_size"].items()}
    text = render(results, args, took)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if not args.quick and not args.no_readme and README.exists():
        doc = README.read_text()
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            README.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
            print(f"results written into {README}")
    return 0


def render(results: dict, args, took: float) -> str:
    cmd = "sudo .venv/bin/python benchmarks/run.py" + (" --quick" if args.quick else "") + \
        (" --biggest" if args.biggest else "")
    out = [f"Run `{cmd}` on {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} CPUs, "
           f"Python {platform.python_version()}, {took / 60:.1f} min in all.", ""]
    if args.keep:
        out[0] = (f"Sections {args.only} run with `{cmd} --only {args.only} --keep` on "
                  f"{time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                  f"{took / 60:.1f} min; the other sections are an earlier full run's, from benchmarks/results.json "
                  f"(see below).")
    targets = []
    if "apply" in results:
        res = results["apply"]
        out += ["### Fleet apply (probe every node behind one login node)", "",
                "Lab creation: " + ", ".join(f"N={n} {r['lab_s']:.1f}s" for n, r in res.items()), ""]
        out += bench_lab.summarize_apply(res)
        g = {n: median(r["cold"]["gpufleet"]["wall"]) for n, r in res.items()}
        out += ["", "Growth with N (gpufleet cold, raw cold): " + ", ".join(
            f"N={n}: {fmt(g[n])}s / {fmt(median(r['cold']['raw']['wall']))}s" for n, r in res.items()), ""]
        if 16 in res:
            r16 = res[16]["cold"]
            ratio = median(r16["gpufleet"]["wall"]) / median(r16["raw"]["wall"])
            dropped = sum(r16["gpufleet"]["drops"]) + sum(r16["gpufleet"]["failed"])
            targets.append(("Cold apply of 16 nodes at most 2.5x the raw floor", f"{ratio:.2f}x", ratio <= 2.5))
            targets.append(("Zero connections dropped at 16 nodes (gpufleet)",
                            f"{dropped} (naive parallel ssh: {sum(r16['naive']['failed'])} failed hosts, "
                            f"{sum(r16['naive']['drops'])} drops logged)", dropped == 0))
            if "ansible" in r16:
                for mode in ("cold", "warm"):
                    a = median(res[16][mode]["ansible"]["wall"]) / median(res[16][mode]["gpufleet"]["wall"])
                    targets.append((f"At least 3x faster than plain Ansible at 16 nodes ({mode})", f"{a:.2f}x", a >= 3))
        for n in (16, 64):  # issue 17: against the minimal floor (cheapest commands giving the same facts)
            if n in res and "minimal" in res[n]["cold"]:
                for mode, most in (("cold", 2.0), ("warm", 1.5)):
                    low = median(res[n][mode]["minimal"]["wall"])
                    ratio = median(res[n][mode]["gpufleet"]["wall"]) / low
                    targets.append((f"{mode.capitalize()} apply of {n} nodes at most {most:g}x the minimal floor",
                                    f"{ratio:.2f}x (raw floor {median(res[n][mode]['raw']['wall']) / low:.2f}x "
                                    "the minimal)", ratio <= most))
        if 16 in res and 64 in res:
            growth = g[64] / g[16]
            targets.append(("Apply of 64 nodes at most 2.5x the time of 16", f"{growth:.2f}x", growth <= 2.5))
        if 64 in res:
            mem = max(max(r["mem"]) for r in (res[64]["cold"]["gpufleet"], res[64]["warm"]["gpufleet"]))
            targets.append(("Controller peak memory for 64 nodes under 500 MB", f"{mem:.0f} MiB", mem * 1.048576 < 500))
    if "ps" in results:
        p = results["ps"]
        m = median(p["wall"])
        out += ["### `gpufleet ps`, warm, one running job on each node", "",
                "| nodes | runs started | median wall s | min | max | controller CPU s (median) |",
                "|---|---|---|---|---|---|",
                f"| {p['nodes']} | {p['started']} | {fmt(m)} | {fmt(min(p['wall']))} | {fmt(max(p['wall']))} | "
                f"{fmt(median(p['cpu']))} |", ""]
        targets.append((f"Warm `gpufleet ps` over {p['nodes']} nodes at most 1.5 s median", f"{m:.2f} s", m <= 1.5))
    if "alloc" in results:
        out += ["### Allocator (state.Store.allocate + allocator.place_gang, 8-GPU hosts, 1-GPU blocks)", "",
                "| backend | hosts | clients | allocations | allocs/s | p50 ms | p99 ms "
                "| first allocation of a fresh process, ms | lock timeouts |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in results["alloc"]:
            out.append(f"| {r['backend']} | {r['hosts']} | {r['clients']} | {r['allocs']} | {fmt(r['per_s'], 1)} | "
                       f"{fmt(r['p50_ms'], 1)} | {fmt(r['p99_ms'], 1)} | {fmt(r['first_ms'], 0)} | "
                       f"{r.get('lock_errors', 0)} |")
            if r["backend"] == "SQLite" and r["clients"] == 1:
                targets.append((f"Allocator: at least 1,000 allocs/s on SQLite, one client ({r['hosts']} hosts)",
                                f"{r['per_s']:.1f}/s", r["per_s"] >= 1000))
            if r["clients"] == 1:
                targets.append((f"Allocator p99 under 20 ms at {r['hosts']} hosts ({r['backend']})",
                                f"{r['p99_ms']:.1f} ms", r["p99_ms"] < 20))
        out.append("")
    if "pack" in results:
        out += bench_pack_table(results["pack"], targets)
    if "sched" in results:
        out += bench_sched_table(results["sched"], targets)
    if "server" in results:
        out += bench_server.render(results["server"], targets)
    if "runs" in results:
        out += bench_runs.render(results["runs"], targets)
    if targets:
        out += ["### Targets", "", "| target | measured | |", "|---|---|---|"]
        out += [f"| {t} | {m} | {check(ok)} |" for t, m, ok in targets]
    return "\n".join(out)


def bench_pack_table(rows: list[dict], targets: list) -> list[str]:
    out = ["### Packing (64 hosts x 8 GPUs, jobs of 1/2/4/8 GPUs, offered load 95%, refused when nothing fits)", "",
           "| seed | policy | GPU-hours / LP bound | GPU-hours / fluid bound | refused jobs | refused 8-GPU jobs "
           "| jobs across NUMA nodes |",
           "|---|---|---|---|---|---|---|"]
    by_seed: dict = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["policy"]] = r
        numa = "-" if r["policy"] == "repack" else r["cross_numa"]
        out.append(f"| {r['seed']} | {r['policy']} | {100 * r['lp_share']:.2f}% | {100 * r['share']:.2f}% | "
                   f"{r['refused']} | {r['refused_by_size'][8]} | {numa} |")
    policies = list(next(iter(by_seed.values())))
    out += ["", "All seeds together:", "", "| policy | GPU-hours / LP bound | GPU-hours / fluid bound | refused jobs | "
            "seeds with fewer refusals than gpufleet |", "|---|---|---|---|---|"]
    total = {p: sum(s[p]["refused"] for s in by_seed.values()) for p in policies}
    for p in policies:
        lp = sum(s[p]["gpu_hours"] for s in by_seed.values()) / sum(s[p]["lp_bound"] for s in by_seed.values())
        fluid = sum(s[p]["gpu_hours"] for s in by_seed.values()) / sum(s[p]["bound"] for s in by_seed.values())
        fewer = "" if p == "gpufleet" else \
            str(sum(s[p]["refused"] < s["gpufleet"]["refused"] for s in by_seed.values()))
        out.append(f"| {p} | {100 * lp:.2f}% | {100 * fluid:.2f}% | {total[p]} | {fewer} |")
    out.append("")
    worst = min(s["gpufleet"]["lp_share"] for s in by_seed.values())
    repack = max(s["repack"]["lp_share"] for s in by_seed.values()) if "repack" in policies else None
    targets.append(("Packing: at least 98% of the upper bound's GPU-hours (LP bound, the tighter one)",
                    f"{100 * worst:.2f}% (worst seed)" + (f"; accept-on-arrival with free repacking reaches at most "
                                                         f"{100 * repack:.2f}%" if repack else ""), worst >= 0.98))
    others = [p for p in ("first-fit", "random") if p in policies]
    n = len(by_seed)
    every = sum(all(s["gpufleet"]["refused"] < s[p]["refused"] for p in others) for s in by_seed.values())
    targets.append((f"Packing: fewer refused jobs than first fit and random, all {n} seeds together",
                    ", ".join(f"{total['gpufleet']} vs {p} {total[p]}" for p in others),
                    all(total["gpufleet"] < total[p] for p in others)))
    targets.append(("Packing: fewer refused jobs than first fit and random, on every seed",
                    f"{every} of {n} seeds", every == n))
    return out


_dur = bench_sched.dur


def bench_sched_table(rows: list[dict], targets: list) -> list[str]:
    out = ["### Scheduling on real job traces (one `decide` per event; FIFO and EASY know true durations, "
           "gpufleet only max_duration limits)", "",
           "| trace | fleet | jobs | policy | utilization | wait mean | p50 | p95 | max | bounded slowdown (mean) "
           "| never started | refused | broken reservations | simulated in |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_trace: dict = {}
    for r in rows:
        by_trace.setdefault(r["trace"], {})[r["policy"]] = r
        broken = r["broken_reservations"] if r["policy"] == "gpufleet" else "-"
        out.append(f"| {r['trace']} | {r['hosts']} x 8 GPUs | {r['jobs']} | {r['policy']} | "
                   f"{100 * r['utilization']:.2f}% | {_dur(r['wait_mean'])} | {_dur(r['wait_p50'])} | "
                   f"{_dur(r['wait_p95'])} | {_dur(r['wait_max'])} | {r['bsld_mean']:.2f} | {r['never_started']} | "
                   f"{r['refused']} | {broken} | {r['seconds']:.1f} s |")
    out.append("")
    for trace, p in by_trace.items():
        g, e = p.get("gpufleet"), p.get("easy")
        if not g or not e:
            continue
        targets.append((f"Scheduling, {trace}: gpufleet's mean wait no worse than EASY's",
                        f"{g['wait_mean']:.0f} s vs {e['wait_mean']:.0f} s", g["wait_mean"] <= e["wait_mean"]))
        targets.append((f"Scheduling, {trace}: gpufleet's utilization no lower than EASY's",
                        f"{100 * g['utilization']:.3f}% vs {100 * e['utilization']:.3f}%",
                        g["utilization"] >= e["utilization"] - 1e-12))
    gs = [r for r in rows if r["policy"] == "gpufleet"]
    if gs:
        starved = sum(r["never_started"] + r["broken_reservations"] for r in gs)
        targets.append(("Scheduling: no job starved (gpufleet: every job started, none after the time first "
                        "reserved for it)", f"{starved}", starved == 0))
        rate = min(r["jobs"] / r["seconds"] for r in gs)
        each = ", ".join(f"{r['trace']} {r['jobs']} jobs in {r['seconds']:.1f} s" for r in gs)
        targets.append(("Scheduling: 100,000 jobs simulated in under 60 s (gpufleet, slowest trace's rate)",
                        f"{100_000 / rate:.1f} s per 100,000 jobs ({each})", 100_000 / rate < 60))
    return out


if __name__ == "__main__":
    sys.exit(main())
