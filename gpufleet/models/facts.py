"""What a probe learns about a host (the `gpufleet_probe` module's facts), and the containers
gpufleet finds on it. Typed from the moment the runner hands them over."""

from __future__ import annotations

from pydantic import Field

from gpufleet.models.core import CoreModel

# what the runtime is taken to be on a host never probed: podman through sudo, as the workload role's default
DEFAULT_RUNTIME = "podman"


class GPU(CoreModel):
    index: int
    vendor: str
    name: str | None = None  # as the vendor tool prints it
    model: str | None = None  # short: H100, MI300X, Gaudi3, n300
    memory_mib: int | None = None
    uuid: str | None = None
    bus_id: str | None = None
    numa_node: int | None = None

    @property
    def label(self) -> str:
        """`3:H100`, as tables show a GPU."""
        return f"{self.index}:{self.model}"


class CPU(CoreModel):
    count: int = 0
    # dstack's name of the host's CPU architecture: x86 (x86_64), arm (aarch64), else the machine as
    # uname says it; None: a host probed before gpufleet reported it (a run that names one is not placed there)
    arch: str | None = None
    numa_nodes: dict[str, str] = Field(default_factory=dict)  # NUMA node -> its CPU list ("0-63,128-191")


class Disk(CoreModel):
    path: str | None = None
    total_mib: int | None = None
    free_mib: int | None = None


class Storage(CoreModel):
    """The runtime's container storage: its driver (overlay, btrfs, vfs...), the file system under it
    (xfs, ext4...) and whether a container's writable layer can be limited (--storage-opt size=): overlay
    on xfs mounted with project quotas. ``why_not``: why it cannot, for messages (`overlay on ext4`)."""

    driver: str | None = None
    backing_fs: str | None = None
    size_limit: bool = False
    why_not: str | None = None


class Runtime(CoreModel):
    name: str | None = None  # podman | docker; None: none installed
    version: str | None = None
    usable: bool = False
    via_sudo: bool = False
    root: str | None = None
    gpu_support: dict[str, str | bool | None] = Field(default_factory=dict)
    storage: Storage | None = None  # None: a host probed before gpufleet reported it

    @property
    def become(self) -> bool:
        return self.via_sudo

    def argv(self) -> list[str]:
        """The command that runs this runtime on its host: the one place that decides which
        runtime, and whether through sudo."""
        return (["sudo", "-n"] if self.via_sudo else []) + [self.name or DEFAULT_RUNTIME]


# a host never probed (or probed before facts were kept): what the workload role assumes too
UNKNOWN_RUNTIME = Runtime(name=DEFAULT_RUNTIME, via_sudo=True)


class Problem(CoreModel):
    what: str
    reason: str
    fix: str | None = None

    def __str__(self) -> str:
        return self.reason + (f" ({self.fix})" if self.fix else "")


class HostFacts(CoreModel):
    hostname: str | None = None
    gpus: list[GPU] = Field(default_factory=list)
    drivers: dict[str, str | None] = Field(default_factory=dict)
    cpu: CPU = Field(default_factory=CPU)
    memory_mib: int = 0
    disk: Disk | None = None
    runtime: Runtime = Field(default_factory=Runtime)
    problems: list[Problem] = Field(default_factory=list)

    def runtime_argv(self) -> list[str]:
        return (self.runtime if self.runtime.name else UNKNOWN_RUNTIME).argv()

    def cpuset(self, numa_nodes: set[int | None]) -> str | None:
        """The CPU list of ``numa_nodes`` (for --cpuset-cpus), or None when it is not known for each."""
        lists = self.cpu.numa_nodes
        if not numa_nodes or None in numa_nodes or any(str(n) not in lists for n in numa_nodes):
            return None
        return ",".join(lists[str(n)] for n in sorted(numa_nodes))


ENDED_STATES = ("exited", "stopped", "dead")


class Container(CoreModel):
    """One gpufleet container on a host, as gpufleet_inspect reads it."""

    name: str
    id: str | None = None
    state: str
    exit_code: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    run_id: str | None = None
    image: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES
