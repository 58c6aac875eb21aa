"""One metrics sample of each host: a short POSIX sh script sent over the fleet's ssh_config (its
multiplexed masters through the jump chain, as gpufleet.containers asks hosts), its output parsed into
gpufleet.models.metrics.HostSample.

The script runs, for each vendor tool the host has (``command -v``), hostcmd's command lines; then
reads /proc/PID/cgroup of every process holding a GPU (which container it is in), and asks the
container runtime for the running gpufleet containers (full ids and names) and their CPU and memory
use. Each output is printed in a section headed by a marker line with the section's name and exit
status; the marker carries a random nonce per sample, so no output (a process or container name) can
pass for a header.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from gpufleet import probe, ssherrors
from gpufleet.containers import commands, ssh_argv
from gpufleet.metrics import hostcmd, parse
from gpufleet.models import InstanceStatus
from gpufleet.models.metrics import GpuProcess, HostSample
from gpufleet.paths import FleetFiles

SAMPLE_TIMEOUT = 30  # seconds for one host's answer (connect timeouts are 10 s a hop)
MAX_THREADS = 32  # hosts asked at once (each an ssh client through the masters)
CONTAINERS_FAILED = "the container runtime could not list the containers"

# section name -> (vendor tool, its hostcmd argv); the order the script runs them in
TOOLS = {
    "nvidia-gpus": ("nvidia-smi", hostcmd.NVIDIA_GPUS),
    "nvidia-apps": ("nvidia-smi", hostcmd.NVIDIA_APPS),
    "amd-gpus": ("amd-smi", hostcmd.AMD_METRIC),
    "amd-apps": ("amd-smi", hostcmd.AMD_PROCESS),
    "intel-gpus": ("hl-smi", hostcmd.HLSMI_METRICS),
    "tenstorrent-gpus": ("tt-smi", hostcmd.TTSMI_SNAPSHOT),
}


def _cmd(tool: str, argv: tuple[str, ...]) -> str:
    return shlex.join([tool, *argv])


def host_script(runtime: list[str], marker: str) -> str:
    """The sh script that samples one host, printing ``MARKER NAME RC`` before each output. A command's
    stderr is printed only when it fails (a warning must not spoil an output that is read)."""
    rt = shlex.join(runtime)
    docker = os.path.basename(runtime[-1]) == "docker"
    stats_format = "{{json .}}" if docker else "json"  # docker: one object a line; podman: a JSON list
    label = "label=" + commands().RUN_ID_LABEL

    def tool(section: str) -> str:
        return f"run {_cmd(*TOOLS[section])}; out {section}"

    return "\n".join([
        f"M={shlex.quote(marker)}",
        "E=$(mktemp) || exit 3",
        "trap 'rm -f \"$E\"' EXIT",
        'run() { o=$("$@" 2>"$E"); r=$?; [ $r -eq 0 ] || o="$o$(printf \'\\n\'; cat "$E")"; }',
        'out() { printf \'%s %s %s\\n%s\\n\' "$M" "$1" "$r" "$o"; }',
        "pids=",
        "if command -v nvidia-smi >/dev/null 2>&1; then",
        f"  run {_cmd('nvidia-smi', hostcmd.NVIDIA_GPUS)}; k=nvidia-gpus",
        # a driver older than the health fields refuses the whole query: ask the fields it has
        f"  if [ $r -ne 0 ]; then case $o in *'valid field'*) run {_cmd('nvidia-smi', hostcmd.NVIDIA_GPUS_BASIC)}; "
        "k=nvidia-gpus-basic;; esac; fi",
        '  out "$k"',
        f"  {tool('nvidia-apps')}",
        '  [ $r -ne 0 ] || pids="$pids $(printf \'%s\\n\' "$o" | cut -d, -f2)"',
        "fi",
        "if command -v amd-smi >/dev/null 2>&1; then",
        f"  {tool('amd-gpus')}",
        f"  {tool('amd-apps')}",
        '  [ $r -ne 0 ] || pids="$pids $(printf \'%s\\n\' "$o" | sed -n \'s/.*"pid": *\\([0-9][0-9]*\\).*/\\1/p\')"',
        "fi",
        f"if command -v hl-smi >/dev/null 2>&1; then {tool('intel-gpus')}; fi",
        f"if command -v tt-smi >/dev/null 2>&1; then {tool('tenstorrent-gpus')}; fi",
        "for p in $(printf '%s\\n' $pids | sort -u); do",
        "  case $p in ''|*[!0-9]*) continue;; esac",
        "  o=$(cat /proc/$p/cgroup 2>/dev/null); r=$?; out cgroup:$p",
        "done",
        f"run {rt} ps --no-trunc --filter {shlex.quote(label)} --format '{{{{.ID}}}} {{{{.Names}}}}'; out containers",
        "if [ $r -eq 0 ]; then",
        "  ids=$(printf '%s\\n' \"$o\" | grep -E '^[0-9a-f]{64} ' | cut -d' ' -f1)",
        f"  if [ -n \"$ids\" ]; then run {rt} stats --no-stream --format {shlex.quote(stats_format)} $ids; "
        "out stats; fi",
        "fi",
        "exit 0",
    ])


def sections(text: str, marker: str) -> list[tuple[str, int, str]]:
    """(name, exit status, output) of each section of a host script's output, in order."""
    found: list[tuple[str, int, str]] = []
    current: tuple[str, int] | None = None
    body: list[str] = []
    for line in text.split("\n"):
        parts = line.split(" ")
        if len(parts) == 3 and parts[0] == marker and parts[2].lstrip("-").isdigit():
            if current:
                found.append((*current, "\n".join(body)))
            current, body = (parts[1], int(parts[2])), []
        elif current:
            body.append(line)
    if current:
        found.append((*current, "\n".join(body)))
    return [(name, rc, out[:-1] if out.endswith("\n") else out) for name, rc, out in found]


_PARSERS = {
    "nvidia-gpus": lambda out: parse.nvidia_gpus(out),
    "nvidia-gpus-basic": lambda out: parse.nvidia_gpus(out, basic=True),
    "amd-gpus": parse.amd_gpus,
    "intel-gpus": parse.hlsmi_gpus,
    "tenstorrent-gpus": parse.ttsmi_gpus,
}
_APP_PARSERS = {"nvidia-apps": parse.nvidia_apps, "amd-apps": parse.amd_processes}
_TOOL_OF = {"nvidia-gpus-basic": "nvidia-smi", **{k: v[0] for k, v in TOOLS.items()}}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return parse._gpus().shorten(lines[-1], 200) if lines else "no output"


def host_sample(fleet: str, alias: str, at: float, text: str, marker: str) -> HostSample:
    """The HostSample that a host script's output ``text`` makes."""
    sample = HostSample(fleet=fleet, alias=alias, at=at)
    errors: list[str] = []
    cgroups: dict[int, str | None] = {}
    containers_known = False
    for name, rc, out in sections(text, marker):
        if name.startswith("cgroup:"):
            if rc == 0:
                cgroups[int(name.split(":", 1)[1])] = parse.cgroup_container(out)
            continue  # the process ended in between: not counted
        if rc != 0:
            if name == "containers":
                errors.append(f"{CONTAINERS_FAILED}: {_last_line(out)}")
            elif name == "stats":
                errors.append(f"container stats failed: {_last_line(out)}")
            else:
                errors.append(f"`{_TOOL_OF.get(name, name)}` failed for {name} (exit {rc}): {_last_line(out)}")
            continue
        try:
            if name in _PARSERS:
                sample.gpus.extend(_PARSERS[name](out))
            elif name in _APP_PARSERS:
                sample.processes.extend(_APP_PARSERS[name](out))
            elif name == "containers":
                sample.container_ids = parse.runtime_ps(out)
                containers_known = True
            elif name == "stats":
                sample.containers = parse.runtime_stats(out)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            errors.append(f"could not read the output of {_TOOL_OF.get(name, name)} ({name}): "
                          f"{parse._gpus().shorten(str(e), 200)}")
    # a process whose cgroup could not be read ended before it was: nothing holds the GPU now
    sample.processes = [p for p in sample.processes if p.pid in cgroups]
    for p in sample.processes:
        p.container = cgroups[p.pid]
    for index, p in held(sample):
        p.gpu_index = index
    if not containers_known and not any(e.startswith(CONTAINERS_FAILED) for e in errors):
        errors.append(f"{CONTAINERS_FAILED}: no answer")
    sample.error = "; ".join(errors)
    return sample


def held(sample: HostSample) -> list[tuple[int, GpuProcess]]:
    """Each process holding a GPU of ``sample``, with that GPU's index (looked up by its uuid where the
    tool names only that); processes on a GPU the sample does not list are left out."""
    by_uuid = {(g.vendor, g.uuid): g.index for g in sample.gpus if g.uuid}
    found = []
    for p in sample.processes:
        index = p.gpu_index if p.gpu_index is not None else by_uuid.get((p.vendor, p.gpu_uuid))
        if index is not None:
            found.append((index, p))
    return found


def outside(sample: HostSample) -> dict[int, list[GpuProcess]]:
    """Per GPU index, the processes holding it that are in no gpufleet container: GPUs used behind
    gpufleet's back (someone's job started by hand on the host, or another tool's container). When the
    runtime could not list its containers, only processes in no container at all are counted (one in a
    container may be a run's)."""
    known = CONTAINERS_FAILED not in sample.error
    found: dict[int, list[GpuProcess]] = {}
    for index, p in held(sample):
        if p.container is None or (known and p.container not in sample.container_ids):
            found.setdefault(index, []).append(p)
    return found


DIAGNOSIS_TTL = 60.0  # seconds a host's diagnosed cause is reused: a host down stays down a while
_diagnosed: dict[tuple[str, str], tuple[float, str | None]] = {}
_diagnosed_lock = threading.Lock()


def _diagnose(files: FleetFiles, alias: str) -> str | None:
    """The login node's own reason why ``alias`` cannot be reached, which a multiplexed jump hides
    (probe.diagnose_through); None when there is no jump or no answer. Asked again after DIAGNOSIS_TTL."""
    key = (str(files.ssh_config), alias)
    with _diagnosed_lock:
        cached = _diagnosed.get(key)
    if cached and time.monotonic() - cached[0] < DIAGNOSIS_TTL:
        return cached[1]
    try:
        p = subprocess.run(["ssh", "-F", str(files.ssh_config), "-G", alias], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=10)
    except subprocess.TimeoutExpired:
        return None
    jump = next((line.split(None, 1)[1] for line in p.stdout.splitlines() if line.startswith("proxyjump ")), None)
    if not jump or "," in jump:  # the generated ssh_config names one alias, the last hop
        return None
    raw = probe.diagnose_through(str(files.ssh_config), jump, alias)
    with _diagnosed_lock:
        _diagnosed[key] = (time.monotonic(), raw)
    return raw


def sample_host(files: FleetFiles, fleet: str, alias: str, runtime: list[str], at: float,
                diagnoses: threading.Semaphore | None = None) -> HostSample:
    """One host's sample. ``diagnoses``: how many hosts of this round may still be diagnosed (an ssh
    connection of their own past the login node's master: see probe.diagnose)."""
    marker = f"@@gpufleet-sample-{secrets.token_hex(6)}"
    argv = ssh_argv(files, alias, None) + ["--", host_script(runtime, marker)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=SAMPLE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return HostSample(fleet=fleet, alias=alias, at=at, error=f"{alias}: no answer within {SAMPLE_TIMEOUT}s")
    if p.returncode != 0:  # the script itself always exits 0: this is ssh failing (255) or the shell
        if p.returncode == 255:
            raw = p.stderr
            if ssherrors.hides_cause(raw) and diagnoses is not None and diagnoses.acquire(blocking=False):
                raw = _diagnose(files, alias) or raw  # not released: a few per round (probe.MAX_DIAGNOSES)
            cause = ssherrors.explain(raw, alias, str(files.known_hosts))
        else:
            cause = f"the sample script failed (exit {p.returncode}): {_last_line(p.stderr)}"
        return HostSample(fleet=fleet, alias=alias, at=at, error=f"{alias}: {cause}")
    return host_sample(fleet, alias, at, p.stdout, marker)


def _sample_hosts(jobs: list[tuple[FleetFiles, str, str, list[str]]], now: float | None) -> list[HostSample]:
    """(files, fleet, alias, runtime) each, all at once on a bounded thread pool, in order."""
    if not jobs:
        return []
    at = time.time() if now is None else now
    diagnoses = threading.Semaphore(probe.MAX_DIAGNOSES)  # hosts whose hidden cause is asked for, this round
    with ThreadPoolExecutor(min(len(jobs), MAX_THREADS)) as pool:
        return list(pool.map(lambda job: sample_host(*job, at, diagnoses), jobs))


def sample_fleet(files: FleetFiles, fleet: str, runtimes: dict[str, list[str]],
                 now: float | None = None) -> list[HostSample]:
    """One sample of each host of ``runtimes`` (alias -> the container runtime's argv there), all hosts
    at once on a bounded thread pool; in the order of ``runtimes``. An unreachable host gives a sample
    whose ``error`` names it and says why."""
    return _sample_hosts([(files, fleet, alias, runtime) for alias, runtime in runtimes.items()], now)


def sample_all(store, now: float | None = None) -> list[HostSample]:
    """A sample of every ready instance (probed) of every fleet in ``store`` (a gpufleet.state.Store), all
    hosts of all fleets at once; fleets in the store's order, hosts in their fleet's."""
    jobs = []
    for state in store.fleets():
        files = FleetFiles.of(state.name)
        if not files.inventory.exists():
            continue
        jobs += [(files, state.name, i.alias, state.runtime_argv(i.alias)) for i in state.instances
                 if i.status == InstanceStatus.READY and i.facts]
    return _sample_hosts(jobs, now)
