"""What a metrics sample costs the controller (issue 15: 64 hosts every 10 s, well under one core).

Two parts, printed as Markdown tables:

- *parse*: `gpufleet.metrics.sample.host_sample` (every parser) on a synthetic 64-host fleet made of real
  recorded outputs (8 GPUs a host, from the H100 gpu-burn capture in ../shared/fixtures/gpu-tools and
  tests/fixtures/gpu-tools: GPU rows, compute apps, a cgroup, podman ps and stats). No lab, no root.
- *lab*: `sample_fleet` on a real lab (`gpufleet lab up --nodes N`: real sshd hosts behind a real login
  node, podman), every node with a gpu-burn started by hand on all its GPUs and a labelled container, so
  every section of the host script has something to read. Controller CPU per round = this process
  (RUSAGE_SELF: the sampling threads and the parsing) + the ssh clients it ran (RUSAGE_CHILDREN) + the
  fleet's ssh master connections (utime + stime from /proc, since they are daemonised and not children).

    sudo .venv/bin/python -m benchmarks.bench_metrics               # parse + lab of 16 nodes, 20 rounds
    .venv/bin/python -m benchmarks.bench_metrics --only parse
    sudo .venv/bin/python -m benchmarks.bench_metrics --nodes 8 --rounds 10
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "fixtures" / "gpu-tools"
LOCAL = ROOT / "tests" / "fixtures" / "gpu-tools"
INTERVAL = 10.0  # the sampling interval, seconds
TARGET_HOSTS = 64


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- parse only

def synthetic_host_output(marker: str, gpus: int = 8) -> str:
    """One host's script output, as the host script prints it, from real recorded outputs."""
    from gpufleet.metrics import hostcmd

    lines = (SHARED / "nvidia-smi_query-gpu_1xH100_allfields_load.csv").read_text().splitlines()
    names = [re.sub(r" \[[^\]]*\]$", "", c.strip()) for c in lines[0].split(",")]
    row = dict(zip(names, (c.strip() for c in lines[1].split(",")), strict=True))

    def nounits(v: str) -> str:
        return re.sub(r" (MiB|%|W|MHz|C)$", "", v)

    rows = []
    for i in range(gpus):
        r = {**row, "index": str(i), "uuid": f"GPU-{i:08x}-0000-0000-0000-000000000000"}
        rows.append(", ".join(nounits(r[f]) for f in hostcmd.NVIDIA_GPU_FIELDS))
    apps_lines = (LOCAL / "nvidia-smi_query-compute-apps_1xH100_load.csv").read_text().splitlines()[1:]
    apps = []
    for i in range(gpus):  # the capture's three processes, on every GPU
        for line in apps_lines:
            c = [x.strip() for x in line.split(",")]
            apps.append(f"GPU-{i:08x}-0000-0000-0000-000000000000, {c[5]}, {nounits(c[7])}, {c[6]}")
    cgroup = (LOCAL / "proc-cgroup_podman-4.3.1_cgroupfs_v1.txt").read_text()
    cid = re.search(r"libpod-([0-9a-f]{64})", cgroup).group(1)
    stats = (LOCAL / "podman-4.3.1_stats_no-stream_json_1container.json").read_text()
    pids = sorted({line.split(",")[1].strip() for line in apps})
    parts = [("nvidia-gpus", "\n".join(rows)), ("nvidia-apps", "\n".join(apps))]
    parts += [(f"cgroup:{pid}", cgroup) for pid in pids]
    parts += [("containers", f"{cid} gf-probe"), ("stats", stats)]
    return "".join(f"{marker} {name} 0\n{text.rstrip(chr(10))}\n" for name, text in parts)


def bench_parse(hosts: int = TARGET_HOSTS, reps: int = 20) -> dict:
    from gpufleet.metrics import sample

    marker = "@@gpufleet-sample-0123456789ab"
    texts = [synthetic_host_output(marker) for _ in range(hosts)]
    sample.host_sample("f", "warm", 0.0, texts[0], marker)  # imports, the probe's module_utils loaded
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        for i, text in enumerate(texts):
            s = sample.host_sample("f", f"h{i}", 0.0, text, marker)
    cpu = time.process_time() - c0
    wall = time.perf_counter() - t0
    assert s.error == "" and len(s.gpus) == 8 and len(s.processes) == 24, s
    return {"hosts": hosts, "reps": reps, "bytes": len(texts[0]), "cpu_per_host_ms": cpu / (hosts * reps) * 1000,
            "wall_per_round_ms": wall / reps * 1000}


# --------------------------------------------------------------------------- lab

def _master_pids(ssh_config: Path) -> list[int]:
    aliases = [line.split()[1] for line in ssh_config.read_text().splitlines() if line.startswith("Host ")]
    pids = []
    for alias in aliases:
        p = subprocess.run(["ssh", "-F", str(ssh_config), "-O", "check", alias], capture_output=True, text=True)
        m = re.search(r"pid=(\d+)", p.stderr)
        if m:
            pids.append(int(m.group(1)))
    return sorted(set(pids))


def _proc_cpu(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            pass
    return total


def bench_lab(nodes: int, rounds: int, log=print) -> dict:
    from gpufleet.lab import core

    d = Path(tempfile.mkdtemp(prefix=f"gpufleet-bench-metrics{nodes}-"))
    home = d / "home"
    os.environ["GPUFLEET_HOME"] = str(home)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    lab = core.up(d / "lab", nodes=nodes, gpus=8, vendor="nvidia", log=lambda *_: None)
    burns = []
    try:
        p = subprocess.run([sys.executable, "-m", "gpufleet", "apply", "-f", str(lab.fleet_file), "-y"], env=env,
                           capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            raise RuntimeError(f"fleet apply failed: {p.stdout[-2000:]}{p.stderr[-2000:]}")
        from gpufleet.metrics import sample
        from gpufleet.paths import FleetFiles
        from gpufleet.state import Store

        store = Store()
        fleet = core.fleet_name(lab)
        state = store.fleet(fleet)
        runtimes = {i.alias: state.runtime_argv(i.alias) for i in state.instances}
        for host in lab.nodes:  # a stray job on every GPU and a labelled container: every section has data
            burns.append(core.start_gpu_burn(lab, host, "--seconds", "3600"))
            core.host_exec(lab, host, ["podman", "run", "-d", "--label", "gpufleet.run_id=bench", "--name",
                                       "bench-metrics", core.LAB_IMAGE, "sleep", "3600"], check=True, timeout=120)
        files = FleetFiles.of(fleet)
        first = sample.sample_fleet(files, fleet, runtimes)  # warm: masters open
        bad = [s.error for s in first if s.error]
        if bad:
            raise RuntimeError(f"sample errors: {bad[:3]}")
        masters = _master_pids(files.ssh_config)
        walls, cpus = [], []
        for _ in range(rounds):
            s0, c0, m0, t0 = _cpu_self(), _cpu_children(), _proc_cpu(masters), time.perf_counter()
            got = sample.sample_fleet(files, fleet, runtimes)
            walls.append(time.perf_counter() - t0)
            cpus.append((_cpu_self() - s0, _cpu_children() - c0, _proc_cpu(masters) - m0))
            assert all(not s.error and len(s.gpus) == 8 and len(s.processes) == 8 and s.containers for s in got), got
        log(f"  lab: {nodes} nodes, {rounds} rounds, masters {len(masters)}")
        return {"nodes": nodes, "rounds": rounds, "walls": walls, "cpus": cpus, "masters": len(masters)}
    finally:
        for b in burns:
            b.stop()
        core.down(d / "lab", log=lambda *_: None)
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- report

def report(parse: dict | None, lab: dict | None) -> str:
    out = []
    if parse:
        per_host = parse["cpu_per_host_ms"]
        out += ["| parse only (synthetic, real outputs) | value |", "|---|---:|",
                f"| hosts x rounds | {parse['hosts']} x {parse['reps']} |",
                f"| one host's script output | {parse['bytes']:,} bytes (8 GPUs, 24 GPU processes, 1 container) |",
                f"| CPU per host per sample | {per_host:.2f} ms |",
                f"| {TARGET_HOSTS} hosts every {INTERVAL:.0f} s | "
                f"{per_host * TARGET_HOSTS / INTERVAL / 10:.2f}% of a core |",
                ""]
    if lab:
        n, r = lab["nodes"], lab["rounds"]
        own = sum(c[0] for c in lab["cpus"]) / (n * r) * 1000
        clients = sum(c[1] for c in lab["cpus"]) / (n * r) * 1000
        masters = sum(c[2] for c in lab["cpus"]) / (n * r) * 1000
        total = own + clients + masters
        walls = sorted(lab["walls"])
        out += ["| lab, sample_fleet | value |", "|---|---:|",
                f"| nodes x rounds | {n} x {r} (8 GPUs a node, gpu-burn on all, 1 container) |",
                f"| wall per round (median, max) | {walls[len(walls) // 2]:.2f} s, {walls[-1]:.2f} s |",
                f"| CPU per host per sample: gpufleet (threads, parsing) | {own:.1f} ms |",
                f"| CPU per host per sample: ssh clients | {clients:.1f} ms |",
                f"| CPU per host per sample: ssh masters ({lab['masters']}) | {masters:.1f} ms |",
                f"| CPU per host per sample, total | {total:.1f} ms |",
                f"| projected: {TARGET_HOSTS} hosts every {INTERVAL:.0f} s | "
                f"{total * TARGET_HOSTS / INTERVAL / 10:.1f}% of a core |", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--only", choices=("parse", "lab"))
    args = ap.parse_args()
    parse = bench_parse() if args.only in (None, "parse") else None
    lab = bench_lab(args.nodes, args.rounds) if args.only in (None, "lab") else None
    print(report(parse, lab))
    return 0


if __name__ == "__main__":
    sys.exit(main())
