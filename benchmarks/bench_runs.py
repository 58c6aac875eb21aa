"""Runs on the lab with the server running (issue 17's run-side targets):

1. time to a running container: from `gpufleet apply -f task.yml -y -d` to the container's
   State.StartedAt on the host (asked on the host, not gpufleet), for 1 run and for 16 runs submitted at
   once on 16 hosts; against the floor: one `ssh` through the fleet's login-node master running the same
   `podman run` (the argv podman recorded for gpufleet's container, Config.CreateCommand), 16 in parallel;
2. `gpufleet ps` with a run on every node (16 and 64 nodes): wall time of ~20 calls, and how stale its
   answer can be (a run's container killed by hand on its host: how long until `ps` says so);
3. queue latency on 16 nodes: every host busy with a short run, more waiting; from a container's
   FinishedAt to the next waiting run's container's StartedAt on that host;
4. controller peak memory at 64 nodes: summed PSS of the server's process tree and the CLI's;
5. the biggest lab this machine holds: lab up (time, memory), fleet apply against the raw floor, and
   connections dropped.

Each part brings up its own lab (bench_server.lab) and state directory in a folder under /tmp and takes
both down, stopping its server, in a `finally`. gpufleet is this checkout's (`python -m gpufleet`).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.bench_server import (
    Api,
    _go_time,
    apply_fleet,
    base_env,
    cli,
    lab,
    local_server,
    server_pid,
    task_yaml,
    workdir,
)
from benchmarks.common import TreeMemory, fmt, median, percentile

LONG = ["sleep 3600"]


def run_env(home: Path) -> dict:
    """The CLI's and the local server's environment: bench_server's, with Python's bytecode cache on (an
    installed gpufleet has its .pyc files; without them every command compiles gpufleet again, ~0.25 s)."""
    env = base_env(home)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def load_now() -> dict:
    """The machine's load when a part begins and ends: the other users of this 2-CPU machine show here."""
    from benchmarks.bench_server import machine_busy

    return {"loadavg": os.getloadavg()[0], "busy": machine_busy(), "t": time.time()}


def load_between(a: dict, b: dict) -> dict:
    return {"loadavg_start": a["loadavg"], "loadavg_end": b["loadavg"],
            "busy_cores": (b["busy"] - a["busy"]) / max(1e-9, b["t"] - a["t"])}


# --------------------------------------------------------------------------- the lab's hosts, asked directly

class Hosts:
    """The lab's nodes by the ssh alias gpufleet gives them (its fleet's ssh_config); podman asked inside a
    node's namespaces (gpufleet.lab.core.host_exec), as root with the node's podman storage: what the host
    itself says, not gpufleet."""

    def __init__(self, lab_dir: Path, home: Path):
        from gpufleet.lab.core import load

        self.lab = load(lab_dir)
        self.cfg = next((home / "fleets").glob("*/ssh_config"))
        by_address = {h.address: h for h in self.lab.nodes}
        self.by_name = {}
        for block in re.split(r"(?m)^Host ", self.cfg.read_text())[1:]:
            found = re.search(r"(?mi)^\s*HostName\s+(\S+)", block)
            if found and found.group(1) in by_address:
                self.by_name[block.split()[0]] = by_address[found.group(1)]

    def exec(self, hostname: str, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        from gpufleet.lab.core import host_exec

        return host_exec(self.lab, self.by_name[hostname], cmd, check=False,
                         timeout=timeout)

    def inspect(self, hostname: str, container: str) -> dict | None:
        p = self.exec(hostname, ["podman", "inspect", container])
        if p.returncode:
            return None
        data = json.loads(p.stdout or "[]")
        return data[0] if data else None

    def containers(self, hostname: str) -> list[dict]:
        """Every container on the host: name, started, finished (epoch s; None when not)."""
        p = self.exec(hostname, ["sh", "-c", "podman ps -aq | xargs -r podman inspect --format "
                                             "'{{.Name}}|{{.State.StartedAt}}|{{.State.FinishedAt}}|{{.State.Status}}'"])
        out = []
        for line in p.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 4:
                out.append({"name": parts[0], "started": _go_time(parts[1]), "finished": _go_time(parts[2]),
                            "status": parts[3]})
        return out


def started_at(info: dict | None) -> float | None:
    if not info or not info.get("State", {}).get("Running"):
        return None
    return _iso(info["State"]["StartedAt"])


def _iso(text: str) -> float | None:
    """podman inspect's JSON times (2026-12-03T22:30:01.123456789Z or +00:00)."""
    from datetime import datetime

    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    if not m or m.group(1).startswith("0001-"):
        return None
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + tz).timestamp() + float(m.group(2) or 0)


def run_hosts(api: Api) -> dict[str, str]:
    """Active run name -> the ssh alias of its (first) node."""
    return {r["name"]: r["nodes"][0]["alias"] for r in api.get("/api/runs") if r.get("nodes")}


def wait_running(api: Api, hosts: Hosts, names: list[str], timeout: float = 300) -> dict[str, tuple[str, dict]]:
    """Wait until each run's container runs on its host; name -> (hostname, podman inspect)."""
    found: dict[str, tuple[str, dict]] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(names) and time.monotonic() < deadline:
        where = run_hosts(api)
        todo = [n for n in names if n not in found and n in where]

        def look(n, where=where):
            return n, where[n], hosts.inspect(where[n], f"gpufleet-{n}")

        with ThreadPoolExecutor(8) as pool:
            for n, h, info in pool.map(look, todo):
                if started_at(info):
                    found[n] = (h, info)
        if len(found) < len(names):
            time.sleep(0.5)
    missing = [n for n in names if n not in found]
    if missing:
        raise RuntimeError(f"not running after {timeout:.0f}s: {missing[:5]}")
    return found


def submit(env: dict, files: Path, names: list[str], workers: int) -> list[int]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda n: cli(env, "apply", "-f", str(files / f"{n}.yml"), "-y", "-d").returncode,
                             names))


def stop_all(api: Api, names: list[str], timeout: float = 300) -> None:
    """Stop the runs (the API, as `gpufleet stop` does, all at once) and wait until none is live."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: api.request("POST", f"/api/runs/{n}/stop"), names))
    deadline = time.monotonic() + timeout
    want = set(names)
    while time.monotonic() < deadline:
        if not want & {r["name"] for r in api.get("/api/runs")}:
            return
        time.sleep(0.5)
    raise RuntimeError(f"runs still live {timeout:.0f}s after their stop")


def floor_argv(info: dict, name: str) -> list[str]:
    """gpufleet's container's `podman run` argv (as podman recorded it), under another name, label-free of
    gpufleet's run id (so no gpufleet sweep takes it for one of its own)."""
    argv = list(info["Config"]["CreateCommand"])
    out = []
    for a in argv:
        if a.startswith("--name="):
            a = f"--name={name}"
        elif a.startswith("--label=gpufleet"):
            continue
        out.append(a)
    if "--name" in out:
        out[out.index("--name") + 1] = name
    return out


def floor_start(cfg: Path, alias: str, argv: list[str]) -> subprocess.CompletedProcess:
    """One ssh through the fleet's (already open) login-node master, running the same `podman run`."""
    return subprocess.run(["ssh", "-F", str(cfg), "-n", alias, "sudo -n " + shlex.join(argv)], capture_output=True,
                          text=True, timeout=120)


# --------------------------------------------------------------------------- 1 + 2. start, ps, freshness

def bench_start_ps(nodes: int = 16, reps_one: int = 5, reps_all: int = 3, ps_calls: int = 20,
                   log=print) -> dict:
    """On ``nodes`` nodes: 1 run (``reps_one`` times) and ``nodes`` runs at once (``reps_all`` times) against
    the floor; then with a run on every node, `ps` and its freshness."""
    res: dict = {"nodes": nodes, "one": [], "one_floor": [], "all": [], "all_floor": [], "all_spread": [],
                 "floor_spread": []}
    with workdir("runs") as d, lab(d, nodes, log) as fleet:
        env = run_env(d / "home")
        with local_server(env):
            apply_fleet(env, fleet)
            api = Api.of(d / "home")
            hosts = Hosts(d / "lab", d / "home")
            cfg = hosts.cfg
            files = d / "runs"
            files.mkdir()
            # warm: one run started and stopped first (images, masters, the server's imports)
            _one(env, api, hosts, files, "warm", log)

            for rep in range(reps_one):
                name = f"one-{rep}"
                t0, (h, info) = _one(env, api, hosts, files, name, log, stop=False)
                res["one"].append(started_at(info) - t0)
                ev = {e["kind"]: e["ts"] for e in reversed(api.events(run=name))}
                if "submitted" in ev and "starting" in ev:  # where the time goes (server's clock = this one)
                    res.setdefault("one_parts", []).append({
                        "submit": ev["submitted"] - t0, "schedule": ev["starting"] - ev["submitted"],
                        "start": started_at(info) - ev["starting"]})
                argv = floor_argv(info, f"floor-{rep}")
                t1 = time.time()
                p = floor_start(cfg, h, argv)
                if p.returncode:
                    raise RuntimeError(f"floor podman run on {h} failed: {p.stderr[-500:]}")
                res["one_floor"].append(started_at(hosts.inspect(h, f"floor-{rep}")) - t1)
                hosts.exec(h, ["podman", "rm", "-f", "-t", "0", f"floor-{rep}"])
                stop_all(api, [name])
                log(f"  1 run: {res['one'][-1]:.2f}s to running; floor {res['one_floor'][-1]:.2f}s; "
                    f"parts {res.get('one_parts', [{}])[-1]}")

            for rep in range(reps_all + 1):  # the last one stays for ps
                names = [f"all{rep}-{i}" for i in range(nodes)]
                for n in names:
                    (files / f"{n}.yml").write_text(task_yaml(n, 8, LONG))
                t0 = time.time()
                rcs = submit(env, files, names, nodes)
                if any(rcs):
                    raise RuntimeError(f"submissions failed: {Counter(rcs)}")
                found = wait_running(api, hosts, names, timeout=120 + 10 * nodes)
                starts = [started_at(info) for _, info in found.values()]
                if rep < reps_all:
                    res["all"].append(max(starts) - t0)
                    res["all_spread"].append(max(starts) - min(starts))
                    # the floor: the same podman runs, all at once, one ssh each through the master
                    jobs = [(h, h, floor_argv(info, f"floor-{n}")) for n, (h, info) in
                            found.items()]
                    t1 = time.time()
                    with ThreadPoolExecutor(len(jobs)) as pool:
                        ps_ = list(pool.map(lambda j: floor_start(cfg, j[0], j[2]), jobs))
                    bad = [p.stderr[-300:] for p in ps_ if p.returncode]
                    if bad:
                        raise RuntimeError(f"floor podman runs failed: {bad[:3]}")
                    fs = [started_at(hosts.inspect(h, f"floor-{n}")) for n, (h, _) in found.items()]
                    res["all_floor"].append(max(fs) - t1)
                    res["floor_spread"].append(max(fs) - min(fs))
                    with ThreadPoolExecutor(8) as pool:
                        list(pool.map(lambda n, f=found: hosts.exec(f[n][0], ["podman", "rm", "-f", "-t", "0",
                                                                              f"floor-{n}"]), names))
                    stop_all(api, names)
                    log(f"  {nodes} runs at once: all running {res['all'][-1]:.2f}s after the submissions "
                        f"(spread {res['all_spread'][-1]:.2f}s); floor {res['all_floor'][-1]:.2f}s")
            res.update(bench_ps(env, api, hosts, found, ps_calls, log))
            stop_all(api, list(found))
    return res


def _one(env, api, hosts, files, name, log, stop=True):
    (files / f"{name}.yml").write_text(task_yaml(name, 8, LONG))
    t0 = time.time()
    p = cli(env, "apply", "-f", str(files / f"{name}.yml"), "-y", "-d")
    if p.returncode:
        raise RuntimeError(f"apply of {name} failed: {p.stdout[-1000:]}{p.stderr[-1000:]}")
    found = wait_running(api, hosts, [name], timeout=120)
    if stop:
        stop_all(api, [name])
    return t0, found[name]


def bench_ps(env: dict, api: Api, hosts: Hosts, found: dict, calls: int, log=print) -> dict:
    """`gpufleet ps` wall time with a run on every node; then one run's container killed on its host and
    `ps` called until it no longer says running."""
    walls, cpus = [], []
    cli(env, "ps")
    for _ in range(calls):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = cli(env, "ps")
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        assert p.returncode == 0, p.stderr
    running = cli(env, "ps", "--json").stdout.count('"running"')
    log(f"  ps over {len(found)} runs: median {median(walls):.3f}s, p95 {percentile(walls, 95):.3f}s, "
        f"CPU median {median(cpus):.3f}s ({running} running)")
    victim = sorted(found)[0]
    host = found[victim][0]
    t_kill = time.time()
    hosts.exec(host, ["podman", "kill", f"gpufleet-{victim}"])
    seen, ps_walls = None, []
    while time.time() - t_kill < 60:
        t0 = time.perf_counter()
        runs = {r["name"]: r for r in json.loads(cli(env, "ps", "-a", "--json").stdout)}
        ps_walls.append(time.perf_counter() - t0)
        if runs.get(victim, {}).get("status") not in ("running", "starting"):
            seen = time.time() - t_kill
            break
    info = hosts.inspect(host, f"gpufleet-{victim}")
    finished = _iso(info["State"]["FinishedAt"]) if info else None
    log(f"  a killed container is out of `ps` {seen:.2f}s after the kill "
        f"({len(ps_walls)} ps calls; container finished {finished - t_kill if finished else float('nan'):.2f}s after)")
    return {"ps": walls, "ps_cpu": cpus, "stale_s": seen, "stale_calls": len(ps_walls), "ps_running": running,
            "killed_finished_after": (finished - t_kill) if finished else None}


# --------------------------------------------------------------------------- 3. queue latency

def bench_queue(nodes: int = 16, waiters: int = 48, log=print) -> dict:
    """Every node busy with a run, ``waiters`` more waiting (each `sleep 5`-`8`); a sample is one host's
    hand-over: the next container's StartedAt - the one before's FinishedAt, when the next run was
    already submitted by then."""
    with workdir("runsq") as d, lab(d, nodes, log) as fleet:
        env = run_env(d / "home")
        with local_server(env):
            apply_fleet(env, fleet)
            api = Api.of(d / "home")
            hosts = Hosts(d / "lab", d / "home")
            files = d / "runs"
            files.mkdir()
            # fillers long enough for every waiter to be submitted first
            fill = [f"fill-{i}" for i in range(nodes)]
            for i, n in enumerate(fill):
                (files / f"{n}.yml").write_text(task_yaml(n, 8, [f"sleep {30 + 2 * nodes + 0.5 * i}"]))
            wait = [f"wait-{i}" for i in range(waiters)]
            for i, n in enumerate(wait):
                (files / f"{n}.yml").write_text(task_yaml(n, 8, [f"sleep {5 + (i * 7) % 4}.{(i * 3) % 10}"]))
            t0 = time.time()
            rcs = submit(env, files, fill, 4)
            log(f"  {nodes} fillers submitted in {time.time() - t0:.1f}s (rc {Counter(rcs)})")
            t1 = time.time()
            rcs += [cli(env, "apply", "-f", str(files / f"{n}.yml"), "-y", "-d").returncode for n in wait]
            log(f"  {waiters} waiters submitted in {time.time() - t1:.1f}s (rc {Counter(rcs)})")
            left = api.wait_settled(timeout=300 + waiters * 10)
            runs = {r["name"]: r for r in json.loads(cli(env, "ps", "-a", "--json").stdout)}
            submitted = {e["run"]: e["ts"] for e in api.events() if e.get("run") and e["kind"] == "submitted"}
            with ThreadPoolExecutor(8) as pool:
                per_host = dict(zip(hosts.by_name, pool.map(hosts.containers, hosts.by_name), strict=True))
    samples, dropped = [], 0
    for h, cs in per_host.items():
        cs = sorted((c for c in cs if c["started"] and c["name"].startswith("gpufleet-")), key=lambda c: c["started"])
        for prev, nxt in zip(cs, cs[1:], strict=False):
            name = nxt["name"].removeprefix("gpufleet-")
            if prev["finished"] is None or submitted.get(name, 0) > prev["finished"]:
                dropped += 1
                continue
            samples.append({"host": h, "prev": prev["name"], "next": nxt["name"],
                            "latency": nxt["started"] - prev["finished"]})
    lat = [s["latency"] for s in samples]
    statuses = Counter(r["status"] for r in runs.values())
    log(f"  queue latency over {len(lat)} hand-overs ({dropped} dropped): p50 {percentile(lat, 50):.2f}s "
        f"p99 {percentile(lat, 99):.2f}s max {max(lat, default=float('nan')):.2f}s; runs {dict(statuses)}")
    return {"nodes": nodes, "waiters": waiters, "samples": samples, "dropped": dropped, "statuses": dict(statuses),
            "left_live": len(left)}


# --------------------------------------------------------------------------- 4. memory at 64 nodes (+ ps)

def cli_mem(env: dict, *args: str) -> tuple[float, float, subprocess.CompletedProcess]:
    """A CLI command with its tree's peak PSS (MiB) and wall time."""
    from benchmarks.bench_server import CLI, ROOT

    t0 = time.perf_counter()
    p = subprocess.Popen([*CLI, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMemory(p.pid) as m:
        out, err = p.communicate(timeout=900)
    return m.peak_mib, time.perf_counter() - t0, subprocess.CompletedProcess(p.args, p.returncode, out, err)


def bench_big_ps_memory(nodes: int = 64, ps_calls: int = 20, log=print) -> dict:
    """At ``nodes`` nodes: the server's and the CLI's peak memory over a fleet apply, a run on every node,
    ps; ps wall time and freshness with a run on every node."""
    res: dict = {"nodes": nodes}
    with workdir("runsmem") as d, lab(d, nodes, log) as fleet:
        env = run_env(d / "home")
        with local_server(env):
            cli(env, "ps")  # starts the local server; its tree sampled from now on
            pid = server_pid(d / "home")
            with TreeMemory(pid) as server:
                res["cli_apply_mib"], res["apply_s"], p = cli_mem(env, "apply", "-f", str(fleet), "-y")
                if p.returncode:
                    raise RuntimeError(f"fleet apply failed: {p.stdout[-1500:]}{p.stderr[-1500:]}")
                res["server_after_apply_mib"] = server.peak_mib
                api = Api.of(d / "home")
                hosts = Hosts(d / "lab", d / "home")
                files = d / "runs"
                files.mkdir()
                names = [f"m-{i}" for i in range(nodes)]
                for n in names:
                    (files / f"{n}.yml").write_text(task_yaml(n, 8, LONG))
                res["cli_run_mib"], _, _ = cli_mem(env, "apply", "-f", str(files / f"{names[0]}.yml"), "-y", "-d")
                t0 = time.time()
                rcs = submit(env, files, names[1:], 8)
                found = wait_running(api, hosts, names, timeout=120 + 10 * nodes)
                res["all_running_s"] = max(started_at(i) for _, i in found.values()) - t0
                log(f"  {nodes} runs running {res['all_running_s']:.1f}s after the submissions (rc {Counter(rcs)})")
                res["cli_ps_mib"], _, _ = cli_mem(env, "ps")
                res["server_peak_mib"] = server.peak_mib
                res.update(bench_ps(env, api, hosts, found, ps_calls, log))
                res["server_peak_mib"] = max(res["server_peak_mib"], server.peak_mib)
            res["server_children"] = _tree_rss(pid)
            log(f"  memory: server peak {res['server_peak_mib']:.0f} MiB; CLI apply fleet {res['cli_apply_mib']:.0f}, "
                f"apply run {res['cli_run_mib']:.0f}, ps {res['cli_ps_mib']:.0f} MiB")
            stop_all(api, names)
    return res


def _tree_rss(pid: int) -> list[str]:
    """What the server's tree is now (command and PSS), for the account of where memory goes."""
    from benchmarks.common import _children, _pss_kib

    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        out.append(f"{_pss_kib(p) // 1024} MiB {cmd}")
        todo.extend(_children(p))
    return out


# --------------------------------------------------------------------------- 5. the biggest lab

def _mem_used_mib() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
    return kib / 1024


def bench_biggest(asked: int = 256, fallback: int = 200, log=print) -> dict:
    """Try a lab of ``asked`` nodes; if the lab refuses, ``fallback``. Lab up time and memory; fleet apply
    (gpufleet, cold and warm) against the raw floor; connections dropped."""
    from benchmarks import bench_lab

    res: dict = {"asked": asked}
    with workdir("big") as d:
        p = cli(base_env(d / "labhome"), "lab", "up", "--dir", str(d / "lab"), "--nodes", str(asked), "--gpus", "8")
        res["asked_rc"], res["asked_out"] = p.returncode, (p.stdout + p.stderr).strip()[-500:]
        cli(base_env(d / "labhome"), "lab", "down", "--dir", str(d / "lab"))
    log(f"  lab up --nodes {asked}: rc {res['asked_rc']}: {res['asked_out'][-200:]}")
    n = asked if res["asked_rc"] == 0 else fallback
    res["nodes"] = n
    before = _mem_used_mib()
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.5):
            peak[0] = max(peak[0], _mem_used_mib())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        res["apply"] = bench_lab.bench_apply([n], 1, 0, log=log, who=["gpufleet", "raw"])[n]
    finally:
        stop.set()
        t.join()
    res["mem_before_mib"], res["mem_peak_mib"] = before, peak[0]
    log(f"  machine memory in use: {before:.0f} MiB before, {peak[0]:.0f} MiB at the peak")
    return res


# --------------------------------------------------------------------------- all of it, and the README's table

def bench(quick: bool = False, big: bool = False, log=print) -> dict:
    out: dict = {}
    n = 4 if quick else 16
    m = 4 if quick else 64
    parts = [("start", f"start and ps, {n} nodes", lambda: bench_start_ps(
                 n, reps_one=2 if quick else 5, reps_all=1 if quick else 3, ps_calls=5 if quick else 20, log=log)),
             ("queue", f"queue latency, {n} nodes", lambda: bench_queue(n, waiters=8 if quick else 48, log=log)),
             ("big", f"ps and memory, {m} nodes", lambda: bench_big_ps_memory(m, ps_calls=5 if quick else 20,
                                                                               log=log))]
    if big:
        parts.append(("biggest", "the biggest lab", lambda: bench_biggest(log=log)))
    for key, what, fn in parts:
        log(f"  -- {what}")
        before = load_now()
        out[key] = fn()
        out[key]["machine"] = load_between(before, load_now())
        log(f"  machine during it: {out[key]['machine']}")
    return out


def render(res: dict, targets: list) -> list[str]:
    out = ["### Runs with the server running (`benchmarks/bench_runs.py`)", ""]
    busy = [f"{k} {v['machine']['busy_cores']:.2f} cores busy (load average {v['machine']['loadavg_start']:.0f} to "
            f"{v['machine']['loadavg_end']:.0f})" for k, v in res.items() if isinstance(v, dict) and v.get("machine")]
    if busy:
        out += ["The machine (2 CPUs, shared with other users while this ran), per part: " + "; ".join(busy) + ".", ""]
    s = res.get("start")
    if s:
        n = s["nodes"]
        one, onef = median(s["one"]), median(s["one_floor"])
        a, af = median(s["all"]), median(s["all_floor"])
        out += [f"Time to a running container (the container's StartedAt on its host - the moment the command "
                f"began), {n} nodes x 8 GPUs, 8-GPU `sleep` tasks:", "",
                "| what | reps | gpufleet median s | min | max | floor median s | min | max | x floor |",
                "|---|---|---|---|---|---|---|---|---|",
                f"| 1 run (`apply -d`) | {len(s['one'])} | {fmt(one)} | {fmt(min(s['one']))} | {fmt(max(s['one']))} | "
                f"{fmt(onef)} | {fmt(min(s['one_floor']))} | {fmt(max(s['one_floor']))} | {fmt(one / onef)} |",
                f"| {n} runs at once, the last running | {len(s['all'])} | {fmt(a)} | {fmt(min(s['all']))} | "
                f"{fmt(max(s['all']))} | {fmt(af)} | {fmt(min(s['all_floor']))} | {fmt(max(s['all_floor']))} | "
                f"{fmt(a / af)} |", ""]
        parts = s.get("one_parts") or []
        if parts:
            out += ["Where a single run's time goes (medians, from the server's events): the CLI until the "
                    f"submission is recorded {fmt(median([x['submit'] for x in parts]))} s; submitted to `starting` "
                    f"(scheduled) {fmt(median([x['schedule'] for x in parts]))} s; `starting` to the container's "
                    f"StartedAt (the start playbook) {fmt(median([x['start'] for x in parts]))} s.", ""]
        targets.append(("Time to a running container, 1 run: at most 1.5x the floor (ssh through the master, "
                        "same `podman run`)", f"{one:.2f} s vs {onef:.2f} s: {one / onef:.2f}x", one <= 1.5 * onef))
        targets.append((f"Time to a running container, {n} runs at once on {n} hosts: at most 1.5x the floor",
                        f"{a:.2f} s vs {af:.2f} s: {a / af:.2f}x", a <= 1.5 * af))
    rows = [x for x in (s, res.get("big")) if x and x.get("ps")]
    if rows:
        out += ["`gpufleet ps` with the server running, a run on every node; *stale* = a run's container killed "
                "on its host (`podman kill`) until `ps -a --json` no longer says it runs:", "",
                "| nodes | runs running | calls | median s | p95 s | max s | CPU s of the command (median) "
                "| stale s (ps calls) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['nodes']} | {r['ps_running']} | {len(r['ps'])} | {fmt(median(r['ps']))} | "
                       f"{fmt(percentile(r['ps'], 95))} | {fmt(max(r['ps']))} | "
                       f"{fmt(median(r.get('ps_cpu') or []))} | "
                       f"{fmt(r['stale_s'] if r['stale_s'] is not None else float('nan'))} ({r['stale_calls']}) |")
        out.append("")
        for r in rows:
            limit = 0.3 if r["nodes"] <= 16 else 0.5
            m = median(r["ps"])
            targets.append((f"`gpufleet ps` at {r['nodes']} nodes at most {limit} s (median; p95 beside)",
                            f"{m:.3f} s (p95 {percentile(r['ps'], 95):.3f} s)", m <= limit))
        for r in rows:  # no older than the interval + one ps: the first or second ps after the kill says so
            ok = r["stale_s"] is not None and r["stale_calls"] <= 2
            targets.append((f"`ps` no older than the reconcile interval (1 s) + one ps, {r['nodes']} nodes (the "
                            "kill seen by the first or second `ps` after it)",
                            f"seen {fmt(r['stale_s'] or float('nan'))} s after the kill, by ps call "
                            f"{r['stale_calls']}", ok))
    q = res.get("queue")
    if q:
        lat = [x["latency"] for x in q["samples"]]
        out += [f"Queue latency, {q['nodes']} nodes x 8 GPUs, every node busy, {q['waiters']} 8-GPU `sleep 5`-`8.9` "
                "tasks waiting: the next container's StartedAt - the FinishedAt of the one before it on that host "
                "(podman's times on the host):", "",
                "| hand-overs | p50 s | p90 s | p99 s | max s | dropped (not yet waiting) | runs ended |",
                "|---|---|---|---|---|---|---|",
                f"| {len(lat)} | {fmt(percentile(lat, 50))} | {fmt(percentile(lat, 90))} | "
                f"{fmt(percentile(lat, 99))} | "
                f"{fmt(max(lat, default=float('nan')))} | {q['dropped']} | "
                f"{', '.join(f'{k} {v}' for k, v in sorted(q['statuses'].items()))} |", ""]
        targets.append((f"Queue latency p99 at most 5 s ({q['nodes']} nodes, at least 40 hand-overs)",
                        f"{percentile(lat, 99):.2f} s over {len(lat)} (p50 {percentile(lat, 50):.2f} s)",
                        len(lat) >= 40 and percentile(lat, 99) <= 5))
    b = res.get("big")
    if b:
        total = b["server_peak_mib"] + max(b["cli_apply_mib"], b["cli_run_mib"], b["cli_ps_mib"])
        out += [f"Controller memory at {b['nodes']} nodes (summed PSS, sampled every 0.2 s): the server's tree "
                f"(with its ansible-playbook children) over the whole part, peak {b['server_peak_mib']:.0f} MiB; "
                f"the CLI: fleet apply {b['cli_apply_mib']:.0f} MiB, a run's apply {b['cli_run_mib']:.0f} MiB, "
                f"ps {b['cli_ps_mib']:.0f} MiB.", ""]
        targets.append((f"Controller peak memory at {b['nodes']} nodes under 300 MiB (server tree + largest CLI "
                        "tree)", f"{total:.0f} MiB", total < 300))
    g = res.get("biggest")
    if g:
        from benchmarks.bench_lab import summarize_apply

        why = g["asked_out"].splitlines()[-1] if g["asked_out"] else ""
        out += [f"The biggest lab: `lab up --nodes {g['asked']}`: "
                + ("up" if g["asked_rc"] == 0 else f"refused ({why})")
                + f"; measured at {g['nodes']} nodes: lab up {g['apply']['lab_s']:.0f} s, machine memory in use "
                f"{g['mem_before_mib']:.0f} MiB before, {g['mem_peak_mib']:.0f} MiB at the peak.", ""]
        out += summarize_apply({g["nodes"]: g["apply"]})
        out += ["", "(gpufleet apply's CPU and memory here are the CLI's alone: the probe's `ansible-playbook` runs "
                "in the local server. A raw-floor host that failed is an ssh that did not get through at this "
                "size; the floor is then a lower bound.)", ""]
        r = g["apply"]["cold"]
        ratio = median(r["gpufleet"]["wall"]) / median(r["raw"]["wall"])
        dropped = sum(r["gpufleet"]["drops"]) + sum(r["gpufleet"]["failed"])
        targets.append((f"{g['asked']} nodes (measured at {g['nodes']}): apply with 0 dropped connections",
                        str(dropped), dropped == 0 and g["nodes"] == g["asked"]))
        targets.append((f"{g['asked']} nodes (measured at {g['nodes']}): cold apply within 1.5x the raw floor",
                        f"{ratio:.2f}x", ratio <= 1.5 and g["nodes"] == g["asked"]))
    return out

