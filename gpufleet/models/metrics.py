"""What one look at a host's GPUs and containers found (gpufleet.metrics samples it, the state store
keeps it, the API, /metrics, the console and the scheduler read it).

A sample is taken over the fleet's own multiplexed ssh connections by one short shell script per
host (gpufleet.metrics.hostcmd): the vendor tools' query outputs, the GPU processes with the cgroup
each lives in, and the runtime's per-container CPU and memory use. Parsed on the server.
"""

from __future__ import annotations

from pydantic import Field

from gpufleet.models.core import CoreModel


class GpuSample(CoreModel):
    """One GPU as its vendor tool reported it. None: the tool does not report it (``[N/A]``)."""

    index: int  # the vendor tool's index, as the probe's GPU.index
    vendor: str  # nvidia | amd | intel | tenstorrent
    uuid: str | None = None
    utilization: float | None = None  # percent, 0-100
    memory_used_mib: int | None = None
    memory_total_mib: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    faults: list[str] = Field(default_factory=list)  # why it is unhealthy, as the tool says it; empty: healthy


class GpuProcess(CoreModel):
    """A process holding a GPU (nvidia-smi --query-compute-apps and the like), seen from the host."""

    vendor: str
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    pid: int  # in the host's PID namespace
    name: str = ""
    memory_mib: int | None = None
    container: str | None = None  # the id of the container whose cgroup holds it; None: none (a host process)


class ContainerUsage(CoreModel):
    """One gpufleet container's CPU and memory use (the runtime's stats)."""

    name: str
    cpu_percent: float | None = None  # of one CPU (200: two CPUs busy)
    memory_bytes: int | None = None
    memory_limit_bytes: int | None = None


class HostSample(CoreModel):
    """One host at one time. ``error``: why nothing (or not all) could be read; ``gpus`` then holds
    what could."""

    fleet: str
    alias: str
    at: float  # unix time the sample was taken (the server's clock)
    error: str = ""
    gpus: list[GpuSample] = Field(default_factory=list)
    processes: list[GpuProcess] = Field(default_factory=list)
    containers: list[ContainerUsage] = Field(default_factory=list)
    container_ids: dict[str, str] = Field(default_factory=dict)  # gpufleet container id (full) -> its name
