"""The control plane (`gpufleet server`, issue: CLI as a client of the server):

1. start-up: the first command in a fresh state directory starts the local server; later commands
   only ask it. Against the CLI before the server (commit 81baa83, run from a `git archive` of it),
   and against a server named by GPUFLEET_SERVER;
2. queue latency on the lab: every node full with an 8-GPU task, as many 8-GPU tasks waiting
   behind; the time from a task's last output line to the first line of the task that gets its
   host (both stamped on the lab hosts, which share this machine's clock);
3. the HTTP API under load: concurrent clients reading (runs, events) and writing (submissions,
   stops) for a while, on SQLite and on PostgreSQL; failed requests, read latency, and afterwards
   whether a run was lost, started twice, or a block held by two runs.

Every lab section brings up its own lab in a folder of its own under /tmp and takes it down, and stops
the servers it started, in a `finally`. The gpufleet run is always this checkout's (`python -m
gpufleet` from the repository root), never an installed console script.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import fmt, median, percentile

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "gpufleet"]
BEFORE_SERVER = "81baa83"  # the last commit whose CLI read the state itself (no server)
IMAGE = "localhost/gpufleet-lab:latest"
# the lab image is busybox: its date has no %N, but adjtimex prints the kernel's time to the microsecond
ADJTIMEX = "adjtimex | awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf \"%d.%06d\\n\", s, u}'"
NOW = f"t=$(date +%s.%N); case $t in *N) {ADJTIMEX};; *) echo $t;; esac"
STAMP = re.compile(r"^\d{9,}\.\d+$")
ENDED = ("done", "failed", "stopped")


# --------------------------------------------------------------------------- plumbing

def base_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GPUFLEET_SERVER", "GPUFLEET_TOKEN", "GPUFLEET_DATABASE_URL", "GPUFLEET_SERVER_IDLE_EXIT")}
    env.update(GPUFLEET_HOME=str(home), COLUMNS="200", TERM="dumb", **extra)
    return env


def cli(env: dict, *args: str, timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def timed(env: dict, *args: str, cwd: Path = ROOT) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = cli(env, *args, cwd=cwd)
    return time.perf_counter() - t0, p


@contextmanager
def workdir(tag: str):
    d = Path(tempfile.mkdtemp(prefix=f"bench-server-{tag}-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def lab(d: Path, nodes: int, log=print):
    t0 = time.perf_counter()
    p = cli(base_env(d / "labhome"), "lab", "up", "--dir", str(d / "lab"), "--nodes", str(nodes), "--gpus", "8")
    try:
        if p.returncode:
            raise RuntimeError(f"lab up failed: {p.stdout}{p.stderr}")
        log(f"  lab of {nodes} nodes up in {time.perf_counter() - t0:.1f}s")
        yield d / "lab" / "fleet.yml"
    finally:
        cli(base_env(d / "labhome"), "lab", "down", "--dir", str(d / "lab"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def server_pid(home: Path) -> int | None:
    try:
        return int(json.loads((home / "server" / "local.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


@contextmanager
def local_server(env: dict):
    """Stops this state directory's local server at the end (the first command starts it)."""
    home = Path(env["GPUFLEET_HOME"])
    seen: set[int] = set()
    try:
        yield seen
    finally:
        pid = server_pid(home)
        if pid:
            seen.add(pid)
        cli(env, "server", "stop", timeout=60)
        for pid in seen:  # only servers of this state directory, which this benchmark started
            deadline = time.monotonic() + 20
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGTERM)


# The workaround for the ansible-runner artifact race (see the README): the local server, started by
# the benchmark before any command, with gpufleet.runner's artifact rotation off. Nothing else changes.
NO_ROTATION_SERVER = ("import sys, gpufleet.runner as r; r.ROTATE_ARTIFACTS = 0; from gpufleet.cli import main; "
                      "sys.argv = ['gpufleet', 'server', '--local']; sys.exit(main())")


def start_local_server_without_rotation(env: dict, timeout: float = 60) -> int:
    """Start this state directory's local server as the CLI would, but with artifact rotation off;
    the CLI's later commands find it (local.json) and use it. Its pid."""
    sdir = Path(env["GPUFLEET_HOME"]) / "server"
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(sdir / "server.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", NO_ROTATION_SERVER], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_pid(Path(env["GPUFLEET_HOME"])) == proc.pid:
            try:
                Api.of(Path(env["GPUFLEET_HOME"])).get("/api/runs")
                return proc.pid
            except (OSError, RuntimeError):
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"the local server (artifact rotation off) did not start: see {sdir / 'server.log'}")


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` and its waited-for children (seconds)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Api:
    """One request per connection, as the CLI does (gpufleet/client.py)."""

    def __init__(self, url: str, token: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.token = parts.hostname, parts.port, token

    @classmethod
    def of(cls, home: Path) -> Api:
        url = json.loads((home / "server" / "local.json").read_text())["url"]
        return cls(url, (home / "server" / "token").read_text().strip())

    def request(self, method: str, path: str, body=None, timeout: float = 60) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def get(self, path: str):
        status, raw = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {raw[:500]!r}")
        return json.loads(raw)

    def events(self, run: str | None = None) -> list[dict]:
        out, after = [], 0
        while True:
            q = f"/api/events?after={after}&limit=10000" + (f"&run={urllib.parse.quote(run)}" if run else "")
            page = self.get(q)
            out += page
            if len(page) < 10000:
                return out
            after = page[-1]["id"]

    def wait_settled(self, timeout: float) -> list[dict]:
        """Wait until no run is waiting or active; the live runs left at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.get("/api/runs")
            if not live or time.monotonic() > deadline:
                return live
            time.sleep(1)


def apply_fleet(env: dict, fleet: Path) -> None:
    p = cli(env, "apply", "-f", str(fleet), "-y")
    if p.returncode:
        raise RuntimeError(f"fleet apply failed: {p.stdout[-2000:]}{p.stderr[-2000:]}")


def task_yaml(name: str, gpu: int, commands: list[str], **extra) -> str:
    lines = ["type: task", f"name: {name}", f"image: {IMAGE}", "commands:"]
    lines += [f"  - {json.dumps(c)}" for c in commands]
    lines += ["resources:", f"  gpu: {gpu}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- 1. start-up

def bench_startup(reps_first: int = 5, reps_later: int = 20, log=print) -> dict:
    """Wall time of `gpufleet ps` (empty state): the first one in a fresh GPUFLEET_HOME (it starts
    the local server), later ones, later ones against a server named by GPUFLEET_SERVER, and the CLI
    before the server (commit 81baa83, which opened the SQLite state itself)."""
    res: dict = {"first": [], "later": [], "remote": [], "before": [], "before_first": [], "python": []}
    with workdir("startup") as d:
        old = d / "old"
        old.mkdir()
        have_old = subprocess.run(f"git -C {ROOT} archive {BEFORE_SERVER} gpufleet | tar -x -C {old}", shell=True,
                                  capture_output=True).returncode == 0 and (old / "gpufleet").is_dir()
        for rep in range(reps_first):
            env = base_env(d / f"fresh{rep}")
            with local_server(env):
                wall, p = timed(env, "ps")
                assert p.returncode == 0, p.stderr
                res["first"].append(wall)
                log(f"  first ps in a fresh home (starts the server): {wall:.2f}s")
            if have_old:
                wall, p = timed(base_env(d / f"oldfresh{rep}"), "ps", cwd=old)
                assert p.returncode == 0, p.stderr
                res["before_first"].append(wall)
        env = base_env(d / "local")
        shared_home = d / "shared"
        remote_env = None
        port = _free_port()
        srv = subprocess.Popen([*CLI, "server", "--port", str(port)], cwd=ROOT, env=base_env(shared_home),
                               stdout=subprocess.DEVNULL, stderr=open(d / "shared-server.log", "wb"),
                               start_new_session=True)
        try:
            with local_server(env):
                cli(env, "ps")  # starts it
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < 60:
                    token = shared_home / "server" / "token"
                    if token.exists():
                        try:
                            Api(f"http://127.0.0.1:{port}", token.read_text().strip()).get("/api/runs")
                            remote_env = base_env(d / "client", GPUFLEET_SERVER=f"http://127.0.0.1:{port}",
                                                  GPUFLEET_TOKEN=token.read_text().strip())
                            break
                        except (OSError, RuntimeError):
                            pass
                    time.sleep(0.1)
                if remote_env is None:
                    raise RuntimeError("the shared server did not answer in 60 s")
                kinds = ["later", "remote", "python"] + (["before"] if have_old else [])
                if have_old:
                    cli(base_env(d / "oldhome"), "ps", cwd=old)  # its state file made
                for i in range(reps_later):  # alternating, the order rotating
                    for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
                        if kind == "python":
                            t0 = time.perf_counter()
                            subprocess.run([sys.executable, "-c", "pass"], check=True)
                            res[kind].append(time.perf_counter() - t0)
                            continue
                        e, where = {"later": (env, ROOT), "remote": (remote_env, ROOT),
                                    "before": (base_env(d / "oldhome"), old)}[kind]
                        wall, p = timed(e, "ps", cwd=where)
                        assert p.returncode == 0, p.stderr
                        res[kind].append(wall)
        finally:
            srv.send_signal(signal.SIGTERM)
            try:
                srv.wait(timeout=30)
            except subprocess.TimeoutExpired:
                srv.kill()
    log("  ps medians: first {:.2f}s, later {:.2f}s, GPUFLEET_SERVER {:.2f}s, before the server {:.2f}s "
        "(its first {:.2f}s), python -c pass {:.2f}s".format(
            median(res["first"]), median(res["later"]), median(res["remote"]), median(res["before"]),
            median(res["before_first"]), median(res["python"])))
    res["have_before"] = have_old
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- 2. queue latency

def bench_queue(nodes: int = 8, waiters: int = 40, rotation: bool = True, log=print) -> dict:
    """Fill every node with an 8-GPU task, queue ``waiters`` 8-GPU tasks behind them; each task
    prints the time first and last. Latency = a task's first line - the last line of the task that
    held its host before it. ``rotation=False``: the server runs with ansible-runner's artifact
    rotation off (the workaround for the race it has under concurrent plays)."""
    with workdir("queue") as d, lab(d, nodes, log) as fleet:
        env = base_env(d / "home")
        with local_server(env) as pids:
            if not rotation:
                pids.add(start_local_server_without_rotation(env))
            apply_fleet(env, fleet)
            api = Api.of(d / "home")
            files = d / "runs"
            files.mkdir()
            # the fillers run until a deadline on the clock (staggered by 0.5 s), long enough for every
            # waiter to be submitted; a waiter submitted after its host was freed would be no sample
            # (checked below: such pairs are dropped and counted)
            submit_s = 8 + 0.8 * waiters
            deadline = time.time() + 15 + submit_s
            names = []
            for i in range(nodes):
                name = f"fill-{i}"
                until = f"{deadline + 0.5 * i:.1f}"
                (files / f"{name}.yml").write_text(task_yaml(name, 8, [
                    NOW, f"t=$({ADJTIMEX}); sleep $(awk -v t=$t 'BEGIN{{d={until}-t; print (d>0?d:0)}}')", NOW]))
                names.append(name)
            for i in range(waiters):
                name = f"wait-{i}"
                (files / f"{name}.yml").write_text(task_yaml(name, 8, [NOW, f"sleep {3 + (i * 7) % 4}", NOW]))
                names.append(name)
            t0 = time.time()
            fill_rc = _parallel(lambda n: cli(env, "apply", "-f", str(files / f"{n}.yml"), "-y", "-d").returncode,
                                names[:nodes], 4)
            log(f"  {nodes} fillers running in {time.time() - t0:.1f}s (rc {Counter(fill_rc)})")
            t1 = time.time()
            wait_rc = []
            for n in names[nodes:]:  # in order: the queue's order is the submission order
                wait_rc.append(cli(env, "apply", "-f", str(files / f"{n}.yml"), "-y", "-d").returncode)
            log(f"  {waiters} waiters submitted in {time.time() - t1:.1f}s (rc {Counter(wait_rc)}); "
                f"fillers end in {deadline - time.time():.0f}s")
            left = api.wait_settled(timeout=deadline - time.time() + 60 + waiters * 15 / nodes)
            runs = {r["name"]: r for r in json.loads(cli(env, "ps", "-a", "--json").stdout)}
            events = api.events()
            outs = dict(zip(names, _parallel(lambda n: cli(env, "logs", n).stdout, names, 4), strict=True))
            hosts = host_overlaps(d / "home")
            kept = keep_log(d / "home", "queue")
    res = queue_samples(names, runs, events, outs, nodes, waiters, left, fill_rc + wait_rc)
    res["rotation"] = rotation
    res["hosts"] = hosts
    res["server_log_tracebacks"], res["server_log"] = kept
    res["failed_messages"] = dict(Counter(_shape(r.get("message", "")) for r in runs.values()
                                          if r["status"] == "failed"))
    # what happened to each failed run, from the events (for the README's account of the failures)
    res["failed_runs"] = {n: [(round(e["ts"], 3), e["kind"], e["message"][:200]) for e in events if e.get("run") == n]
                          for n, r in runs.items() if r["status"] == "failed"}
    lat = [x["latency"] for x in res["samples"]]
    clean = [x["latency"] for x in res["samples"] if not x["failed_between"]]
    log(f"  queue latency{'' if rotation else ' (artifact rotation off)'} over {len(lat)} samples "
        f"({res['dropped']} dropped): p50 {percentile(lat, 50):.2f}s, p99 {percentile(lat, 99):.2f}s, "
        f"max {max(lat, default=float('nan')):.2f}s; without a failed start between: {len(clean)} samples, "
        f"p99 {percentile(clean, 99):.2f}s; statuses {res['statuses']}")
    return res


def queue_samples(names, runs, events, outs, nodes, waiters, left, rcs) -> dict:
    stamps = {}
    for n in names:
        s = [float(x) for x in outs.get(n, "").split() if STAMP.match(x)]
        if len(s) >= 2:
            stamps[n] = (s[0], s[-1])
    ev = defaultdict(dict)
    starts_on = defaultdict(list)  # host -> [(ts, run)] of every `starting`
    for e in events:
        if e.get("run"):
            ev[e["run"]].setdefault(e["kind"], e["ts"])
            m = re.search(r"\((\S+)\) blocks", e["message"]) if e["kind"] == "starting" else None
            if m:
                starts_on[m.group(1)].append((e["ts"], e["run"]))
    by_host = defaultdict(list)
    for n in names:
        r = runs.get(n)
        if r and r.get("host") and n in stamps:
            by_host[r["host"]].append(n)
    samples, dropped = [], 0
    for host, ns in by_host.items():
        ns.sort(key=lambda n: stamps[n][0])
        for prev, nxt in zip(ns, ns[1:], strict=False):
            freed = stamps[prev][1]
            if ev[nxt].get("submitted", 0) > freed:  # it was not waiting yet when the host was freed
                dropped += 1
                continue
            end_seen = next((ev[prev][k] for k in ENDED if k in ev[prev]), None)
            started = ev[nxt].get("starting")
            between = [r for ts, r in starts_on[host] if freed < ts < stamps[nxt][0] and r != nxt]
            samples.append({"host": host, "freed": prev, "next": nxt, "latency": stamps[nxt][0] - freed,
                            "failed_between": len(between),
                            "detect": (end_seen - freed) if end_seen else None,
                            "schedule": (started - end_seen) if started and end_seen else None,
                            "start": (stamps[nxt][0] - started) if started else None})
    statuses = Counter(runs[n]["status"] if n in runs else "missing" for n in names)
    return {"nodes": nodes, "waiters": waiters, "samples": samples, "dropped": dropped, "statuses": dict(statuses),
            "no_output": [n for n in names if n not in stamps], "left_live": len(left), "submit_failed":
            sum(1 for rc in rcs if rc)}


def keep_log(home: Path, tag: str) -> tuple[int, str | None]:
    """The number of tracebacks in the server's log; the log is kept (its path returned) if any."""
    try:
        text = (home / "server" / "server.log").read_text(errors="replace")
    except OSError:
        return 0, None
    n = text.count("Traceback")
    if not n:
        return 0, None
    keep = Path(tempfile.gettempdir()) / f"bench-server-{tag}-{os.getpid()}-server.log"
    keep.write_text(text)
    return n, str(keep)


def _shape(message: str) -> str:
    """A message with its numbers and names blurred, to count alike failures together."""
    return re.sub(r"\d+", "N", message)[:160]


def _parallel(fn, items, workers: int) -> list:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


# --------------------------------------------------------------------------- 3. API load

class Load:
    """``clients`` threads, each one request every ~``pace`` s (exponential gaps) for ``seconds``:
    reads (active runs, all runs, events after the client's last id) and, at ``write_rate`` a second
    over all clients, writes (submissions of 1-GPU `sleep 1` tasks, stops of a recent submission,
    and re-submissions of a name just submitted: 409 while it is live)."""

    def __init__(self, api: Api, prefix: str, clients: int, seconds: float, pace: float, write_rate: float,
                 seed: int = 1):
        self.api, self.prefix, self.clients, self.seconds, self.pace = api, prefix, clients, seconds, pace
        self.write_rate = write_rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.records: list[tuple[str, int, float, float]] = []  # (kind, status (0: no answer), latency s, at)
        self.errors: list[str] = []
        self.accepted: list[tuple[str, float]] = []  # (name, when) of every 201
        self.stops: list[tuple[str, int, str]] = []
        self.double_held: list[str] = []
        self.followers: list[tuple[set, int]] = []  # (event ids seen, highest id) per client
        self.snapshots = 0
        self._n = 0
        self._next_write = 0.0

    def _write_turn(self, now: float) -> bool:
        if self.write_rate <= 0:
            return False
        with self.lock:
            if now >= self._next_write:
                self._next_write = max(self._next_write, now) + self.rng.expovariate(self.write_rate)
                return True
            return False

    def _name(self) -> str:
        with self.lock:
            self._n += 1
            return f"{self.prefix}-{self._n}"

    def _call(self, kind: str, method: str, path: str, body=None) -> tuple[int, bytes]:
        t0 = time.perf_counter()
        try:
            status, raw = self.api.request(method, path, body, timeout=60)
        except (OSError, http.client.HTTPException) as e:
            status, raw = 0, repr(e).encode()
        lat = time.perf_counter() - t0
        with self.lock:
            self.records.append((kind, status, lat, time.time()))
            if status == 0 or status >= 500 or (status >= 400 and status != 409):
                self.errors.append(f"{method} {path}: {status} {raw[:300]!r}")
        return status, raw

    def _check_blocks(self, raw: bytes) -> None:
        try:
            active = [r for r in json.loads(raw) if r["status"] in ("starting", "running")]
        except (ValueError, KeyError, TypeError):
            return
        held: dict = {}
        for r in active:
            for n in r.get("nodes") or []:
                for b in n["blocks"]:
                    key = (n["instance_id"], b)
                    if key in held:
                        with self.lock:
                            self.double_held.append(f"{key} held by {held[key]} and {r['name']}")
                    held[key] = r["name"]
        with self.lock:
            self.snapshots += 1

    def client(self, i: int, until: float) -> None:
        rng = random.Random(i)
        seen: set = set()
        after = 0
        while True:
            now = time.time()
            if now >= until:
                break
            if self._write_turn(now):
                roll = rng.random()
                with self.lock:
                    recent = [n for n, t in self.accepted if now - t < 6]
                if roll < 0.25 and recent:
                    name = rng.choice(recent)
                    status, raw = self._call("stop", "POST", f"/api/runs/{name}/stop")
                    with self.lock:
                        self.stops.append((name, status, raw[:200].decode(errors="replace")))
                else:
                    dup = roll < 0.35 and recent
                    name = rng.choice(recent) if dup else self._name()
                    text = task_yaml(name, 1, ["sleep 1"])
                    status, _ = self._call("resubmit" if dup else "submit", "POST", "/api/runs",
                                           {"source": f"{name}.yml", "text": text, "secrets": {}, "no_queue": False})
                    if status == 201:
                        with self.lock:
                            self.accepted.append((name, time.time()))
            else:
                roll = rng.random()
                if roll < 0.45:
                    status, raw = self._call("runs", "GET", "/api/runs")
                    if status == 200:
                        self._check_blocks(raw)
                elif roll < 0.55:
                    self._call("runs_all", "GET", "/api/runs?all=true")
                else:
                    status, raw = self._call("events", "GET", f"/api/events?after={after}")
                    if status == 200:
                        for e in json.loads(raw):
                            seen.add(e["id"])
                            after = max(after, e["id"])
            time.sleep(min(rng.expovariate(1 / self.pace), max(0.0, until - time.time())))
        with self.lock:
            self.followers.append((seen, after))

    def run(self) -> float:
        until = time.time() + self.seconds
        threads = [threading.Thread(target=self.client, args=(i, until), daemon=True) for i in range(self.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0


def verify(load: Load, api: Api, env: dict, settle_s: float) -> dict:
    """After the load: no run lost, none started twice, no block held by two runs, no event skipped."""
    left = api.wait_settled(settle_s)
    ps = json.loads(cli(env, "ps", "-a", "--json").stdout)
    by_name = {r["name"]: r for r in ps}
    events = api.events()
    accepted = Counter(n for n, _ in load.accepted)
    lost = sorted(n for n in accepted if n not in by_name)
    per_run = defaultdict(list)
    for e in events:
        if e.get("run"):
            per_run[e["run"]].append(e)
    submitted_mismatch, started_twice = [], []
    intervals = defaultdict(list)  # (alias, block) -> [(start ts, end ts, run)]
    for name, n in accepted.items():
        evs = per_run.get(name, [])
        subs = [e for e in evs if e["kind"] == "submitted"]
        if len(subs) != n:
            submitted_mismatch.append(f"{name}: {n} accepted, {len(subs)} submitted events")
        # each submission: the events from its `submitted` up to the next one
        cuts = [i for i, e in enumerate(evs) if e["kind"] == "submitted"] + [len(evs)]
        for a, b in zip(cuts, cuts[1:], strict=False):
            part = evs[a:b]
            starts = [e for e in part if e["kind"] == "starting"]
            if len(starts) > 1:
                started_twice.append(f"{name}: {len(starts)} starting events")
            for s in starts:
                m = re.search(r"\((\S+)\) blocks ([\d,]+)", s["message"])
                end = next((e["ts"] for e in part if e["kind"] in ENDED and e["id"] > s["id"]), float("inf"))
                if m:
                    for blk in m.group(2).split(","):
                        intervals[(m.group(1), int(blk))].append((s["ts"], end, name))
    overlaps = []
    for key, spans in intervals.items():
        spans.sort()
        for (s1, e1, n1), (s2, _e2, n2) in zip(spans, spans[1:], strict=False):
            if s2 < e1:
                overlaps.append(f"{key}: {n1} [{s1:.3f}, {e1:.3f}] and {n2} from {s2:.3f}")
    ids = {e["id"] for e in events}
    skipped = sum(len({i for i in ids if i <= top} - seen) for seen, top in load.followers)
    statuses = Counter(by_name[n]["status"] for n in accepted if n in by_name)
    failed_msgs = Counter(_shape(by_name[n].get("message", ""))
                          for n in accepted if n in by_name and by_name[n]["status"] == "failed")
    return {"accepted": sum(accepted.values()), "lost": lost, "submitted_mismatch": submitted_mismatch,
            "started_twice": started_twice, "overlaps": overlaps, "double_held": load.double_held,
            "snapshots": load.snapshots, "events_skipped": skipped, "left_live": [r["name"] for r in left],
            "statuses": dict(statuses), "failed_messages": dict(failed_msgs),
            "orphan_events": sum(1 for e in events if e["kind"] == "orphan")}


def summarize_load(load: Load, took: float) -> dict:
    by_kind = defaultdict(list)
    status = Counter()
    for kind, st, lat, _ in load.records:
        status[(kind, st)] += 1
        if st and st < 500:
            by_kind[kind].append(lat)
    reads = [lat for k in ("runs", "runs_all", "events") for lat in by_kind[k]]
    writes = [lat for k in ("submit", "resubmit", "stop") for lat in by_kind[k]]
    failed = sum(n for (k, st), n in status.items() if st == 0 or st >= 500)
    other_4xx = sum(n for (k, st), n in status.items() if 400 <= st < 500 and st != 409)
    conflicts = sum(n for (k, st), n in status.items() if st == 409)
    lat = {k: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v) if v else float("nan")}
           for k, v in by_kind.items()}
    for k, v in (("reads", reads), ("writes", writes)):
        lat[k] = {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v) if v else float("nan")}
    return {"requests": len(load.records), "seconds": took, "per_s": len(load.records) / took,
            "writes_per_s": sum(1 for r in load.records if r[0] in ("submit", "resubmit", "stop")) / took,
            "failed": failed, "other_4xx": other_4xx, "conflicts": conflicts, "latency": lat,
            "status": {f"{k} {st}": n for (k, st), n in sorted(status.items())}, "errors": load.errors[:20]}


def machine_busy() -> float:
    """CPU seconds this machine has spent busy (all processes, every core) since boot."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_api(backend: str, db_url: str | None, nodes: int = 8, clients: int = 50, seconds: float = 60,
              reads_seconds: float = 20, pace: float = 0.5, write_rate: float = 0.3, log=print) -> dict:
    """Two phases against one local server: reads only (the API alone), then reads and writes
    (submissions really start containers on the lab hosts); then the checks."""
    out: dict = {"backend": backend, "nodes": nodes, "clients": clients, "pace": pace, "write_rate": write_rate}
    with workdir(f"api-{backend.lower()}") as d, lab(d, nodes, log) as fleet:
        extra = {}
        if db_url:
            wipe_postgres(db_url)
            extra["GPUFLEET_DATABASE_URL"] = db_url
        env = base_env(d / "home", **extra)
        with local_server(env) as pids:
            apply_fleet(env, fleet)
            api = Api.of(d / "home")
            pid = server_pid(d / "home")
            pids.add(pid)
            prefix = f"ld{backend[0].lower()}"
            for phase, secs, rate in (("reads", reads_seconds, 0.0), ("mixed", seconds, write_rate)):
                if not secs:
                    continue
                cpu0, busy0, self0 = proc_cpu(pid), machine_busy(), _self_cpu()
                load = Load(api, f"{prefix}{phase[0]}", clients, secs, pace, rate)
                took = load.run()
                res = summarize_load(load, took)
                res["server_cpu_s"] = proc_cpu(pid) - cpu0
                res["clients_cpu_s"] = _self_cpu() - self0
                res["machine_busy_cores"] = (machine_busy() - busy0) / took
                out[phase] = res
                lat = res["latency"]["reads"]
                log(f"  {backend} {phase}: {res['requests']} requests in {took:.0f}s ({res['per_s']:.0f}/s, writes "
                    f"{res['writes_per_s']:.2f}/s), failed {res['failed']}, 409 {res['conflicts']}, other 4xx "
                    f"{res['other_4xx']}, reads p50 {lat['p50'] * 1000:.0f} ms p99 {lat['p99'] * 1000:.0f} ms; "
                    f"server CPU {res['server_cpu_s']:.0f}s, machine busy {res['machine_busy_cores']:.2f} cores")
            out["check"] = verify(load, api, env, settle_s=180)
            out["hosts"] = host_overlaps(d / "home")
            out["server_log_tracebacks"], out["server_log"] = keep_log(d / "home", backend.lower())
    c = out["check"]
    log(f"  {backend} checks: accepted {c['accepted']}, lost {len(c['lost'])}, "
        f"started twice {len(c['started_twice'])}, "
        f"blocks held twice (state {len(c['overlaps'])}, snapshots {len(c['double_held'])}/{c['snapshots']}, "
        f"hosts {len(out['hosts']['overlaps'])}), events skipped {c['events_skipped']}, still live "
        f"{len(c['left_live'])}, statuses {c['statuses']}, tracebacks {out['server_log_tracebacks']}")
    return out


INSPECT = ("sudo -n podman ps -aq | xargs -r sudo -n podman inspect --format "
           "'{{.Name}}|{{index .Config.Labels \"gpufleet.run\"}}|{{index .Config.Labels \"gpufleet.gpus\"}}|"
           "{{.State.StartedAt}}|{{.State.FinishedAt}}'")
GO_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(\.\d+)? ([+-]\d{4})")


def _go_time(text: str) -> float | None:
    """A Go time as podman prints it (2026-12-02 15:35:12.123456789 +0000 UTC); None for the zero time."""
    from datetime import datetime

    m = GO_TIME.search(text)
    if not m or m.group(1).startswith("0001-"):
        return None
    when = datetime.strptime(f"{m.group(1)} {m.group(3)}", "%Y-%m-%d %H:%M:%S %z").timestamp()
    return when + float(m.group(2) or 0)


def host_overlaps(home: Path) -> dict:
    """Ask every lab host for its gpufleet containers (when each ran, on which GPUs): two containers
    that ran at the same time on one GPU would be a block given twice, whatever the state says."""
    configs = list((home / "fleets").glob("*/ssh_config"))
    out = {"containers": 0, "overlaps": [], "hosts_failed": []}
    for cfg in configs:
        text = cfg.read_text()
        hosts = [h for h in re.findall(r"^Host (\S+)", text, re.M) if "jump" not in h]

        def ask(h, cfg=cfg):
            return h, subprocess.run(["ssh", "-F", str(cfg), "-n", h, INSPECT], capture_output=True, text=True,
                                     timeout=120)

        for h, p in _parallel(ask, hosts, 8):
            if p.returncode:
                out["hosts_failed"].append(f"{h}: {p.stderr.strip()[-200:]}")
                continue
            spans = defaultdict(list)
            for line in p.stdout.splitlines():
                parts = line.split("|")
                if len(parts) != 5 or not parts[2]:
                    continue
                out["containers"] += 1
                start = _go_time(parts[3])
                if start is None:  # created, never started
                    continue
                end = _go_time(parts[4]) or float("inf")
                for g in parts[2].split(","):
                    spans[g].append((start, end, parts[1]))
            for g, ss in spans.items():
                ss.sort()
                for (_s1, e1, n1), (s2, _, n2) in zip(ss, ss[1:], strict=False):
                    if s2 < e1:
                        out["overlaps"].append(f"{h} GPU {g}: {n1} until {e1:.3f}, {n2} from {s2:.3f}")
    return out


def wipe_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text

    from gpufleet import migrations
    from gpufleet.state import metadata

    engine = create_engine("postgresql+psycopg://" + url.split("://", 1)[1])
    with engine.begin() as c:
        metadata.drop_all(c)
        for table in migrations.VERSION_TABLES:
            c.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


def pg_url() -> str | None:
    return os.environ.get("GPUFLEET_BENCH_DATABASE_URL")


# --------------------------------------------------------------------------- all of it

def bench(quick: bool = False, log=print) -> dict:
    out: dict = {}
    log("  -- start-up")
    out["startup"] = bench_startup(reps_first=3 if quick else 5, reps_later=5 if quick else 20, log=log)
    log("  -- queue latency")
    out["queue"] = bench_queue(nodes=4 if quick else 8, waiters=12 if quick else 40, log=log)
    log("  -- queue latency, ansible-runner's artifact rotation off (workaround)")
    out["queue_no_rotation"] = bench_queue(nodes=4 if quick else 8, waiters=12 if quick else 40, rotation=False,
                                           log=log)
    out["api"] = []
    for backend, url in (("SQLite", None), ("PostgreSQL", pg_url())):
        if backend == "PostgreSQL" and not url:
            log("  PostgreSQL skipped: set GPUFLEET_BENCH_DATABASE_URL")
            continue
        log(f"  -- API load, {backend}")
        out["api"].append(bench_api(backend, url, nodes=4 if quick else 8, clients=20 if quick else 50,
                                    seconds=15 if quick else 60, log=log))
    return out


# --------------------------------------------------------------------------- the README's tables

def _ms(x: float) -> str:
    return fmt(x * 1000, 0)


def render(res: dict, targets: list) -> list[str]:
    out = ["### Control plane (`gpufleet server`)", ""]
    s = res.get("startup")
    if s:
        rows = [("first `ps` in a fresh GPUFLEET_HOME (starts the local server)", "first"),
                ("later `ps`, the local server running", "later"),
                ("`ps` with GPUFLEET_SERVER (a server started by hand)", "remote"),
                (f"`ps` before the server ({BEFORE_SERVER}: the CLI read SQLite itself), later calls", "before"),
                (f"`ps` before the server ({BEFORE_SERVER}), first call in a fresh GPUFLEET_HOME", "before_first"),
                ("`python -c pass` (the interpreter alone)", "python")]
        out += ["Start-up, empty state, wall s of the command (calls alternating):", "",
                "| command | calls | median | min | max |", "|---|---|---|---|---|"]
        for label, k in rows:
            xs = s.get(k) or []
            if xs:
                out.append(f"| {label} | {len(xs)} | {fmt(median(xs))} | {fmt(min(xs))} | {fmt(max(xs))} |")
        cost = median(s["first"]) - median(s["later"])
        out += ["", f"Start-up cost of the local server, paid once (first - later median): {cost:.2f} s.", ""]
        if s.get("before"):
            later, before = median(s["later"]), median(s["before"])
            targets.append(("Server start-up: later commands no slower than before the server (`ps` median, "
                            "within 10%)", f"{later:.2f} s vs {before:.2f} s before the server "
                                           f"(first call {median(s['first']):.2f} s)", later <= 1.1 * before))
    queues = [q for q in (res.get("queue"), res.get("queue_no_rotation")) if q]
    if queues:
        q0 = queues[0]
        out += [f"Queue latency on the lab ({q0['nodes']} nodes x 8 GPUs, every node full, {q0['waiters']} 8-GPU tasks "
                "waiting): a task's first output line - the last line of the task that held its host before it, "
                "both stamped on the lab hosts. Parts from the server's events: *seen* = the freed run's end "
                "recorded - its last line; *scheduled* = the next run's `starting` - that; *started* = the next "
                "run's first line - its `starting`. *clean* = samples with no failed start on that host in between "
                "(a failed start holds the host for a while, then hands it on).", "",
                "| server | samples (clean) | p50 s | p99 s | max s | clean p50 / p99 s | seen p50 / p99 "
                "| scheduled p50 / p99 | started p50 / p99 | runs ended | containers on one GPU at once |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for q in queues:
            lat = [x["latency"] for x in q["samples"]]
            clean = [x["latency"] for x in q["samples"] if not x.get("failed_between")]

            def part(k, p, q=q):
                return percentile([x[k] for x in q["samples"] if x[k] is not None], p)

            label = "as is" if q.get("rotation", True) else "artifact rotation off (workaround)"
            out.append(f"| {label} | {len(lat)} ({len(clean)}) | {fmt(percentile(lat, 50))} | "
                       f"{fmt(percentile(lat, 99))} | {fmt(max(lat, default=float('nan')))} | "
                       f"{fmt(percentile(clean, 50))} / {fmt(percentile(clean, 99))} | "
                       f"{fmt(part('detect', 50))} / {fmt(part('detect', 99))} | "
                       f"{fmt(part('schedule', 50))} / {fmt(part('schedule', 99))} | {fmt(part('start', 50))} / "
                       f"{fmt(part('start', 99))} | {', '.join(f'{k} {v}' for k, v in sorted(q['statuses'].items()))} "
                       f"| {len(q['hosts']['overlaps'])} |")
        out.append("")
        for q in queues:
            if q.get("failed_messages"):
                kinds = Counter()
                for m, n in q["failed_messages"].items():
                    kinds[re.sub(r": '.*", "", m)] += n
                label = "as is" if q.get("rotation", True) else "artifact rotation off"
                out.append(f"Failed runs ({label}): " + "; ".join(f"{n} x `{m}`" for m, n in kinds.most_common()))
                out.append("")
        lat = [x["latency"] for x in q0["samples"]]
        p99 = percentile(lat, 99)
        more = ""
        if len(queues) > 1:
            w = [x["latency"] for x in queues[1]["samples"]]
            more = f"; artifact rotation off: {percentile(w, 99):.2f} s (p50 {percentile(w, 50):.2f} s)"
        targets.append((f"Queue latency p99 at most 5 s ({q0['nodes']} nodes, at least 30 samples)",
                        f"{p99:.2f} s over {len(lat)} samples (p50 {percentile(lat, 50):.2f} s){more}",
                        len(lat) >= 30 and p99 <= 5))
    api = res.get("api") or []
    if api:
        out += ["API under load: clients on loopback, one request per connection (as the CLI), each client one "
                "request every ~0.5 s (exponential gaps); reads = GET /api/runs (45%), /api/runs?all=true (10%), "
                "/api/events?after=<its last id> (45%); writes (mixed phase only) = POST /api/runs of a 1-GPU "
                "`sleep 1` task (65%), POST /api/runs/{name}/stop of a run submitted in the last 6 s (25%), "
                "the same name again (10%: 409 while it is live). *failed* = 5xx or no answer.", "",
                "| backend | phase | clients | s | requests/s | writes/s | failed | 409 | other 4xx | reads p50 ms "
                "| reads p99 ms | reads max ms | submit p50 / p99 ms | stop p50 / p99 ms | server CPU s "
                "(with its ansible) | machine busy, cores of 2 |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in api:
            for phase in ("reads", "mixed"):
                r = a.get(phase)
                if not r:
                    continue
                lat = r["latency"]
                sub = lat.get("submit", {"p50": float("nan"), "p99": float("nan")})
                stop = lat.get("stop", {"p50": float("nan"), "p99": float("nan")})
                out.append(f"| {a['backend']} | {phase} | {a['clients']} | {r['seconds']:.0f} | {r['per_s']:.0f} | "
                           f"{r['writes_per_s']:.2f} | {r['failed']} | {r['conflicts']} | {r['other_4xx']} | "
                           f"{_ms(lat['reads']['p50'])} | {_ms(lat['reads']['p99'])} | {_ms(lat['reads']['max'])} | "
                           f"{_ms(sub['p50'])} / {_ms(sub['p99'])} | {_ms(stop['p50'])} / {_ms(stop['p99'])} | "
                           f"{r['server_cpu_s']:.0f} | {r['machine_busy_cores']:.2f} |")
        out += ["", "After the mixed phase (every run ended first):", "",
                "| backend | submissions accepted | lost (not in `ps -a`) | started twice | blocks held by two runs "
                "(events / live snapshots / containers on the hosts) | events skipped by a follower | "
                "still live | how they ended (each name's last submission) | tracebacks in server.log |",
                "|---|---|---|---|---|---|---|---|---|"]
        for a in api:
            c, h = a["check"], a["hosts"]
            ends = ", ".join(f"{k} {v}" for k, v in sorted(c["statuses"].items()))
            out.append(f"| {a['backend']} | {c['accepted']} | {len(c['lost'])} | {len(c['started_twice'])} | "
                       f"{len(c['overlaps'])} / {len(c['double_held'])} of {c['snapshots']} / "
                       f"{len(h['overlaps'])} of {h['containers']} | {c['events_skipped']} | {len(c['left_live'])} | "
                       f"{ends} | {a['server_log_tracebacks']} |")
        out.append("")
        for a in api:
            failed = sum(a[p]["failed"] for p in ("reads", "mixed") if p in a)
            targets.append((f"API, {a['backend']}: 0 failed requests ({a['clients']} clients)", str(failed),
                            failed == 0))
            if "mixed" in a:
                p99 = a["mixed"]["latency"]["reads"]["p99"]
                ro = a.get("reads", {}).get("latency", {}).get("reads", {}).get("p99", float("nan"))
                targets.append((f"API, {a['backend']}: reads p99 under 200 ms (with writes)",
                                f"{p99 * 1000:.0f} ms (reads only: {ro * 1000:.0f} ms)", p99 < 0.2))
            c, h = a["check"], a["hosts"]
            bad = len(c["lost"]) + len(c["started_twice"]) + len(c["overlaps"]) + len(c["double_held"]) + \
                len(h["overlaps"]) + len(c["submitted_mismatch"])
            targets.append((f"API, {a['backend']}: no run lost or started twice, no block held by two runs",
                            f"{bad} ({c['accepted']} submissions)", bad == 0))
    return out
