"""A service's `rate_limits` (issue 16): what the check costs per request on the server's event loop, and the
memory its counts take at most. The check (gpufleet.server.proxy._over_limit) for

1. a service without rate_limits (what every such request pays: one look at the running service);
2. a service with a rule per client address, one client, every request passing (rps far above the load);
3. the same with a header key (its value hashed), and with 4 rules (the longest prefix chosen);

then the counts of SIZE distinct clients (a spread of addresses: bounded by Limiter.size), by tracemalloc.
No I/O, no lab: `python -m benchmarks.bench_ratelimit [--n 200000]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from starlette.datastructures import Headers  # noqa: E402

from gpufleet import ratelimit  # noqa: E402
from gpufleet.models import Run  # noqa: E402
from gpufleet.server import proxy  # noqa: E402

FAST, BIG = 1e9, 10**12  # requests a second, burst: no request of the loop is ever over them


def _run(limits: list[dict]) -> Run:
    spec = {"type": "service", "port": 8000, **({"rate_limits": limits} if limits else {})}
    return Run(name="web", run_id="r1", type="service", fleet="f", instance_id=1, alias="h", status="running",
               spec=spec, container="c", created_at=0, updated_at=0, project="main")


def per_request(limits: list[dict], n: int) -> float:
    """Microseconds one check takes (the route's call, the running service looked up under a lock)."""
    run, lock = _run(limits), threading.Lock()

    def known(name: str) -> Run:
        with lock:
            return run

    ctx = SimpleNamespace(services=SimpleNamespace(known=known))
    limiter = ratelimit.Limiter()
    headers = Headers(raw=[(b"host", b"server"), (b"authorization", b"Bearer " + b"t" * 40)])
    started = time.perf_counter()
    for _ in range(n):
        assert proxy._over_limit(ctx, limiter, "main", "web", "v1/chat/completions", "10.0.0.1", headers) is None
    return (time.perf_counter() - started) / n * 1e6


def memory(size: int) -> dict:
    limiter = ratelimit.Limiter(size=size)
    limits = [{"prefix": "/", "rps": 1, "burst": 0, "key": {"type": "ip_address"}}]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(size * 2):  # twice as many clients as it keeps, none drained yet
        limiter.check("r1", limits, "/", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", lambda h: [], 0.0)
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    return {"clients": size * 2, "entries kept": len(limiter), "MiB": grown / 2**20}


def bench(n: int) -> dict:
    ip = {"prefix": "/", "rps": FAST, "burst": BIG, "key": {"type": "ip_address"}}
    header = {"prefix": "/", "rps": FAST, "burst": BIG, "key": {"type": "header", "header": "Authorization"}}
    four = [ip, *({"prefix": p, "rps": FAST, "burst": BIG, "key": {"type": "ip_address"}}
                  for p in ("/v1/", "/v1/chat/", "/api/"))]
    return {"per request (us)": {"no rate_limits": per_request([], n), "1 rule, client address": per_request([ip], n),
                                 "1 rule, header (hashed)": per_request([header], n),
                                 "4 rules, longest prefix": per_request(four, n)},
            "memory at most": memory(ratelimit.SIZE)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200000)
    out = bench(ap.parse_args().n)
    for label, us in out["per request (us)"].items():
        print(f"{label:<28} {us:6.2f} us")
    m = out["memory at most"]
    print(f"{m['clients']} clients: {m['entries kept']} entries kept, {m['MiB']:.1f} MiB")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
