"""`/metrics` in Prometheus' text format: built at each scrape from the latest samples and the state
(a Collector on a registry of its own; nothing kept between scrapes). The names below are the ones
docs/grafana/gpufleet-dashboard.json uses (tests/unit/test_metrics_store.py holds the two together).
"""

from __future__ import annotations

import time
from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from gpufleet.metrics import store as metrics
from gpufleet.state import Store

GPU_LABELS = ("fleet", "host", "gpu", "uuid", "model", "run", "user", "project")
HOST_LABELS = ("fleet", "host")
RUN_LABELS = ("fleet", "host", "run", "user", "project")
MIB = 2**20

# name -> (help, labels): every metric /metrics exports
METRICS = {
    "gpufleet_gpu_utilization_percent": ("GPU utilization, percent (0-100), at the host's latest sample.", GPU_LABELS),
    "gpufleet_gpu_memory_used_bytes": ("GPU memory in use, bytes.", GPU_LABELS),
    "gpufleet_gpu_memory_total_bytes": ("GPU memory, bytes.", GPU_LABELS),
    "gpufleet_gpu_temperature_celsius": ("GPU temperature, degrees Celsius.", GPU_LABELS),
    "gpufleet_gpu_power_watts": ("GPU power draw, watts.", GPU_LABELS),
    "gpufleet_gpu_healthy": ("1 unless the GPU reports a hardware fault (then it is not allocated).", GPU_LABELS),
    "gpufleet_gpu_outside": ("1 when a process that no gpufleet run owns holds the GPU (then it is not allocated).",
                             GPU_LABELS),
    "gpufleet_gpu_busy": ("1 when a gpufleet run holds the GPU.", GPU_LABELS),
    "gpufleet_gpu_sampled_timestamp_seconds": ("When the GPU was last sampled (unix time).", GPU_LABELS),
    "gpufleet_blocks_total": ("Blocks of the host.", HOST_LABELS),
    "gpufleet_blocks_busy": ("Blocks of the host held by a run.", HOST_LABELS),
    "gpufleet_host_up": ("1 when the host is ready and its latest sample read its GPUs.", HOST_LABELS),
    "gpufleet_queue_length": ("Runs waiting in the queue.", ("project",)),
    "gpufleet_run_cpu_percent": ("A run container's CPU use, percent of one CPU.", RUN_LABELS),
    "gpufleet_run_memory_bytes": ("A run container's memory use, bytes.", RUN_LABELS),
    "gpufleet_run_memory_limit_bytes": ("A run container's memory limit, bytes.", RUN_LABELS),
}


class FleetCollector:
    """The metrics of the fleets of ``visible`` projects (None: all), as of one scrape."""

    def __init__(self, store: Store, visible: set[str] | None, interval: float, now: float | None = None):
        self.store, self.visible, self.interval = store, visible, interval
        self.now = time.time() if now is None else now

    def collect(self):
        fam = {name: GaugeMetricFamily(name, text, labels=list(labels)) for name, (text, labels) in METRICS.items()}

        def put(name: str, labels: list, value) -> None:
            if value is not None:
                fam[name].add_metric([str(v) if v is not None else "" for v in labels], float(value))

        rows = metrics.gpu_rows(self.store, self.visible, interval=self.interval, now=self.now)
        for g in rows:
            labels = [g["fleet"], g["host"], g["index"], g["uuid"], g["model"], g["run"], g["user"], g["project"]]
            put("gpufleet_gpu_utilization_percent", labels, g["utilization"])
            put("gpufleet_gpu_memory_used_bytes", labels,
                None if g["memory_used_mib"] is None else g["memory_used_mib"] * MIB)
            put("gpufleet_gpu_memory_total_bytes", labels,
                None if g["memory_total_mib"] is None else g["memory_total_mib"] * MIB)
            put("gpufleet_gpu_temperature_celsius", labels, g["temperature_c"])
            put("gpufleet_gpu_power_watts", labels, g["power_w"])
            put("gpufleet_gpu_healthy", labels, 0 if g["status"] == "unhealthy" else 1)
            put("gpufleet_gpu_outside", labels, 1 if g["status"] == "outside" else 0)
            put("gpufleet_gpu_busy", labels, 1 if g["status"] == "busy" or g["run"] is not None else 0)
            put("gpufleet_gpu_sampled_timestamp_seconds", labels, g["at"])
        samples = metrics.latest(self.store)
        stale = metrics.stale_after(self.interval)
        for fleet in self.store.fleets(projects=self.visible):
            for host in fleet.instances:
                put("gpufleet_blocks_total", [fleet.name, host.alias], host.blocks_total)
                put("gpufleet_blocks_busy", [fleet.name, host.alias], host.blocks_busy)
                s = samples.get((fleet.name, host.alias))
                up = (host.status == "ready" and s is not None and self.now - s.at <= stale
                      and not (s.error and not s.gpus))
                put("gpufleet_host_up", [fleet.name, host.alias], 1 if up else 0)
        waiting = Counter(r.project for r in self.store.pending()
                          if self.visible is None or r.project in self.visible)
        for project in sorted({p.name for p in self.store.projects(self.visible)} | set(waiting)):
            put("gpufleet_queue_length", [project], waiting.get(project, 0))  # 0 too: a graph with no gap
        active = [r for r in self.store.runs() if r.active and (self.visible is None or r.project in self.visible)]
        held = metrics.holders(self.store, active)
        for (fleet, alias), s in sorted(samples.items()):
            if self.now - s.at > stale:
                continue
            for u in s.containers:
                run = held.containers.get((fleet, alias), {}).get(u.name)
                if run is None:
                    continue
                labels = [fleet, alias, run.name, run.user, run.project]
                put("gpufleet_run_cpu_percent", labels, u.cpu_percent)
                put("gpufleet_run_memory_bytes", labels, u.memory_bytes)
                put("gpufleet_run_memory_limit_bytes", labels, u.memory_limit_bytes)
        yield from fam.values()


def exposition(store: Store, visible: set[str] | None, interval: float = 10.0, now: float | None = None) -> bytes:
    """The text a scrape gets."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(store, visible, interval, now))
    return generate_latest(registry)
