"""The server's endpoint for services (issue 16): requests/s and p50/p99 latency of small GETs to one
service replica (busybox httpd serving a 1 kB file, on a lab node behind the login node) reached

1. through the server's proxy: ``/proxy/services/default/web/`` with a token (`auth: true`), over a
   kept-alive client connection; the server carries each request over its pooled ssh forward;
2. directly over the jump chain: an ``ssh -N -L`` forward through the fleet's ssh_config (what
   `gpufleet attach` runs), the client connecting to its local port.

and, as a baseline, the server's own /api/health (no proxy, no token). Both paths in one run, on the same
replica, with the same bounded loops: ``--requests`` sequential requests,
then the same number spread over ``--concurrency`` client threads. Everything on loopback and the lab's
network namespaces of this machine. Needs root (the lab).

    sudo .venv/bin/python -m benchmarks.bench_proxy [--requests 500] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks.common import fmt, median, percentile  # noqa: E402


def _get(conn_factory, path: str, headers: dict, n: int, out: list[float], errors: list[str]) -> None:
    conn = conn_factory()
    for _ in range(n):
        t = time.perf_counter()
        try:
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            body = r.read()
            if r.status != 200 or not body:
                errors.append(f"{r.status}")
            if r.getheader("connection", "").lower() == "close" or r.version == 10:
                conn.close()
                conn = conn_factory()
        except OSError as e:
            errors.append(str(e))
            conn.close()
            conn = conn_factory()
        out.append(time.perf_counter() - t)
    conn.close()


def loop(port: int, path: str, headers: dict, requests: int, concurrency: int) -> dict:
    def factory():
        return http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    result = {}
    for label, threads in (("sequential", 1), (f"{concurrency} clients", concurrency)):
        times: list[float] = []
        errors: list[str] = []
        per = max(1, requests // threads)
        started = time.perf_counter()
        workers = [threading.Thread(target=_get, args=(factory, path, headers, per, times, errors))
                   for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        took = time.perf_counter() - started
        result[label] = {"requests": len(times), "errors": len(errors), "rps": len(times) / took,
                         "p50_ms": median(times) * 1000, "p99_ms": percentile(times, 99) * 1000}
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(requests: int = 500, concurrency: int = 8) -> dict:
    from conftest import Cli, start_server, wait_for

    from gpufleet.lab import core

    work = Path(tempfile.mkdtemp(prefix="gpufleet-bench-proxy-"))
    lab = core.up(work / "lab", nodes=1, gpus=1, log=lambda *_: None)
    server = forward = None
    try:
        server = start_server(work / "home")
        admin = Cli(server.home, server=server.url)
        admin("apply", "-f", str(lab.fleet_file), "-y", check=0)
        svc = work / "web.yml"
        svc.write_text(json.dumps({"type": "service", "name": "web", "image": core.LAB_IMAGE, "port": 8000,
                                   "fleets": [core.fleet_name(lab)], "commands": [
                                       "mkdir -p /www && head -c 1024 /dev/zero | tr '\\0' x > /www/index.html",
                                       "exec httpd -f -p 8000 -h /www"]}))
        admin("apply", "-f", str(svc), "-y", "-d", check=0)
        token = server.admin_token
        auth = {"Authorization": f"Bearer {token}"}

        def ready():
            try:
                return server.request("GET", "/proxy/services/default/web/", token).status == 200
            except OSError:
                return False

        wait_for("the service to be ready", ready, timeout=120)
        plan = server.request("GET", "/api/runs/web/attach", token).json()
        local = free_port()
        argv = [a.replace(f"127.0.0.1:{plan['bound'][0][0]}:", f"127.0.0.1:{local}:") for a in plan["argv"]]
        env = {**os.environ, "GPUFLEET_HOME": str(server.home)}
        forward = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)

        def direct_up():
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=2):
                    return True
            except OSError:
                return False

        wait_for("the direct forward", direct_up, timeout=30)
        out = {"direct (ssh -L over the jump chain)": loop(local, "/", {}, requests, concurrency),
               "through the server's proxy": loop(server.port, "/proxy/services/default/web/", auth, requests,
                                                  concurrency),
               # the server's own cost of a request, nothing carried: what the proxy adds on top of it
               "the server's /api/health (baseline, no proxy)": loop(server.port, "/api/health", {}, requests,
                                                                     concurrency)}
        admin("stop", "web", "-y")
        return out
    finally:
        if forward is not None:
            forward.terminate()
            forward.wait(10)
        if server is not None:
            server.stop()
        core.down(work / "lab", log=lambda *_: None)


def render(results: dict) -> list[str]:
    lines = ["| path | load | requests | errors | requests/s | p50 | p99 |", "|---|---|---:|---:|---:|---:|---:|"]
    for path, loads in results.items():
        for load, r in loads.items():
            lines.append(f"| {path} | {load} | {r['requests']} | {r['errors']} | {fmt(r['rps'])} | "
                         f"{r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    results = bench(args.requests, args.concurrency)
    print("\n".join(render(results)))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
