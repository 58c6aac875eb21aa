"""The vendor tools' metric outputs, typed (gpufleet.models.metrics): one pure parser per command line
of gpufleet.metrics.hostcmd, plus the pieces of a host sample that are not a vendor tool's (a process's
cgroup, the runtime's container stats).

Text in, models out; nothing here runs anything. The CSV and JSON reading is the probe's own
(plugins/module_utils/gpufleet_gpus.py: header or not, units or not, banners before JSON, the ways tools
say "no value"), loaded from the shipped content as gpufleet.containers loads its module_utils.
A parser raises ValueError for an output it cannot read at all; a field it cannot read is None.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from types import ModuleType

from gpufleet import paths
from gpufleet.metrics import hostcmd
from gpufleet.models.metrics import ContainerUsage, GpuProcess, GpuSample


@functools.cache
def _gpus() -> ModuleType:
    """plugins/module_utils/gpufleet_gpus.py, the probe's parsers (stdlib only: it runs on hosts)."""
    path = paths.content_root() / "plugins" / "module_utils" / "gpufleet_gpus.py"
    spec = importlib.util.spec_from_file_location("gpufleet_gpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- values

def _clean(value):
    """The value, or None for "no value": empty, N/A, [N/A], [Not Supported], [Requested functionality
    has been deprecated], and any other bracketed nvidia-smi remark."""
    return _gpus()._clean(value)


_NUMBER = re.compile(r"^(-?\d+(?:\.\d+)?)")


def _number(value) -> float | None:
    """A number from "35", "35 %", "69.92 W", "36 C", {"value": 35, "unit": "%"}; None for no value."""
    if isinstance(value, dict):
        value = value.get("value")
    value = _clean(value)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = _NUMBER.match(str(value))
    return float(m.group(1)) if m else None


def _int(value) -> int | None:
    number = _number(value)
    return None if number is None else int(round(number))


def _yes(value) -> bool:
    return (_clean(value) or "").lower() == "yes"


_BYTE_UNITS = {"b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
               "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def _bytes(text) -> int | None:
    """Bytes from a runtime's human size: podman "237.6kB", "25.28GB" (decimal), docker "1.5MiB"."""
    if isinstance(text, dict):  # amd-smi: {"value": 56000, "unit": "B"}
        value, unit = text.get("value"), str(text.get("unit") or "B")
        number = _number(value)
        factor = _BYTE_UNITS.get(unit.lower())
        return None if number is None or factor is None else int(round(number * factor))
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$", str(text or ""))
    if not m:
        return None
    factor = _BYTE_UNITS.get((m.group(2) or "B").lower())
    return None if factor is None else int(round(float(m.group(1)) * factor))


# --------------------------------------------------------------------------- nvidia-smi

def nvidia_faults(record: dict) -> list[str]:
    """Why an NVIDIA GPU is unhealthy, from nvidia-smi's health fields (empty: healthy, or not reported)."""
    faults = []
    ecc = _int(record.get("ecc.errors.uncorrected.volatile.total"))
    if ecc:
        faults.append(f"{ecc} uncorrected ECC error{'s' if ecc != 1 else ''} since the driver loaded")
    if _yes(record.get("retired_pages.pending")):
        faults.append("retired pages pending (a GPU reset or reboot retires them)")
    if _yes(record.get("remapped_rows.pending")):
        faults.append("row remapping pending (a GPU reset applies it)")
    if _yes(record.get("remapped_rows.failure")):
        faults.append("row remapping failed (the GPU needs service)")
    action = _clean(record.get("gpu_recovery_action"))  # "None" reads as None
    if action:
        faults.append(f"the driver asks for recovery: {action}")
    return faults


def nvidia_gpus(text: str, basic: bool = False) -> list[GpuSample]:
    """``nvidia-smi`` with hostcmd.NVIDIA_GPUS (``basic``: NVIDIA_GPUS_BASIC, no health fields). A CSV
    with a header (``--format=csv``, units or not) is read by its column names, whatever its other
    columns are."""
    fields = hostcmd.NVIDIA_GPU_FIELDS[:7] if basic else hostcmd.NVIDIA_GPU_FIELDS
    gpus = []
    for position, r in enumerate(_gpus()._query_records(text, fields)):
        index = _int(r.get("index"))
        gpus.append(GpuSample(
            index=position if index is None else index, vendor="nvidia", uuid=_clean(r.get("uuid")),
            utilization=_number(r.get("utilization.gpu")), memory_used_mib=_int(r.get("memory.used")),
            memory_total_mib=_int(r.get("memory.total")), temperature_c=_number(r.get("temperature.gpu")),
            power_w=_number(r.get("power.draw")), faults=nvidia_faults(r)))
    return gpus


_APP_NAMES = {"used_gpu_memory": "used_memory", "name": "process_name"}  # the header's name -> the query's


def nvidia_apps(text: str) -> list[GpuProcess]:
    """``nvidia-smi`` with hostcmd.NVIDIA_APPS (noheader: gpu_uuid,pid,used_memory,process_name), or any
    ``--query-compute-apps`` CSV with a header. A process name may hold commas: the cells around it are
    read from both ends."""
    lines = [line for line in text.splitlines() if line.strip()]
    fields = list(hostcmd.NVIDIA_APPS[0].split("=", 1)[1].split(","))
    if lines:
        names = [_APP_NAMES.get(n, n) for n in (re.sub(r" \[[^\]]*\]$", "", c.strip()) for c in lines[0].split(","))]
        if "pid" in names:
            fields, lines = names, lines[1:]
    if "pid" not in fields or "process_name" not in fields:
        raise ValueError("no pid or process_name column in the --query-compute-apps output")
    at = fields.index("process_name")
    after = len(fields) - at - 1
    processes = []
    for line in lines:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < len(fields):
            raise ValueError(f"expected {len(fields)} comma-separated fields, got {len(cells)} in {line!r}")
        name = ",".join(cells[at:len(cells) - after]) if after else ",".join(cells[at:])
        row = dict(zip(fields[:at], cells[:at], strict=True))
        row.update(zip(fields[at + 1:], cells[len(cells) - after:], strict=True))
        pid = _int(row.get("pid"))
        if pid is None:
            continue  # a row the driver could not fill (no PID: nothing to attribute)
        processes.append(GpuProcess(vendor="nvidia", gpu_uuid=_clean(row.get("gpu_uuid")), pid=pid,
                                    name=(_clean(name) or ""), memory_mib=_int(row.get("used_memory"))))
    return processes


# --------------------------------------------------------------------------- amd-smi

def _amd_list(text: str) -> list:
    data = _gpus()._json_payload(text)[0]
    entries = data.get("gpu_data") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError("no GPU list in the amd-smi JSON")
    return entries


def amd_faults(entry: dict) -> list[str]:
    """Why an AMD GPU is unhealthy, from the ``ecc`` block of ``amd-smi metric`` (RAS counters)."""
    ecc = entry.get("ecc") if isinstance(entry.get("ecc"), dict) else {}
    faults = []
    uncorrectable = _int(ecc.get("total_uncorrectable_count"))
    if uncorrectable:
        faults.append(f"{uncorrectable} uncorrectable ECC (RAS) error{'s' if uncorrectable != 1 else ''}")
    deferred = _int(ecc.get("total_deferred_count"))
    if deferred:
        faults.append(f"{deferred} deferred ECC (RAS) error{'s' if deferred != 1 else ''}")
    return faults


def amd_gpus(text: str) -> list[GpuSample]:
    """``amd-smi metric --json`` (ROCm 6: a list; ROCm 7: {"gpu_data": [...]}); banner lines are skipped."""
    gpus = []
    for position, entry in enumerate(_amd_list(text)):
        if not isinstance(entry, dict):
            continue
        usage = entry.get("usage") if isinstance(entry.get("usage"), dict) else {}
        mem = entry.get("mem_usage") if isinstance(entry.get("mem_usage"), dict) else {}
        temp = entry.get("temperature") if isinstance(entry.get("temperature"), dict) else {}
        power = entry.get("power") if isinstance(entry.get("power"), dict) else {}
        index = _int(entry.get("gpu"))
        hot = _number(temp.get("hotspot"))
        gpus.append(GpuSample(
            index=position if index is None else index, vendor="amd",
            utilization=_number(usage.get("gfx_activity")),
            memory_used_mib=_mib(mem.get("used_vram")), memory_total_mib=_mib(mem.get("total_vram")),
            temperature_c=hot if hot is not None else _number(temp.get("edge")),
            power_w=_number(power.get("socket_power")), faults=amd_faults(entry)))
    return gpus


def _mib(value) -> int | None:
    return _gpus()._mib(value, "MB")


def amd_processes(text: str) -> list[GpuProcess]:
    """``amd-smi process --json``: per GPU its process_list (an entry with no PID, e.g. "No running
    processes detected", is skipped)."""
    processes = []
    for entry in _amd_list(text):
        if not isinstance(entry, dict):
            continue
        index = _int(entry.get("gpu"))
        for item in entry.get("process_list") or []:
            info = item.get("process_info") if isinstance(item, dict) else None
            if not isinstance(info, dict) or _int(info.get("pid")) is None:
                continue
            usage = info.get("memory_usage") if isinstance(info.get("memory_usage"), dict) else {}
            vram = _bytes(usage.get("vram_mem")) if isinstance(usage.get("vram_mem"), dict) else None
            processes.append(GpuProcess(vendor="amd", gpu_index=index, pid=_int(info.get("pid")),
                                        name=str(_clean(info.get("name")) or ""),
                                        memory_mib=None if vram is None else vram // (1 << 20)))
    return processes


# --------------------------------------------------------------------------- hl-smi, tt-smi

def hlsmi_gpus(text: str) -> list[GpuSample]:
    """``hl-smi`` with hostcmd.HLSMI_METRICS (csv, noheader, values with units: "672 MiB", "226 W")."""
    gpus = []
    for position, r in enumerate(_gpus()._query_records(text, hostcmd.HLSMI_FIELDS)):
        index = _int(r.get("index"))
        gpus.append(GpuSample(
            index=position if index is None else index, vendor="intel", uuid=_clean(r.get("uuid")),
            utilization=_number(r.get("utilization.aip")), memory_used_mib=_int(r.get("memory.used")),
            memory_total_mib=_int(r.get("memory.total")), temperature_c=_number(r.get("temperature.aip")),
            power_w=_number(r.get("power.draw"))))
    return gpus


def ttsmi_gpus(text: str) -> list[GpuSample]:
    """``tt-smi -s``: power and ASIC temperature per chip (tt-smi reports no utilization or memory use);
    indices as the probe numbers the chips (their order in device_info)."""
    data = _gpus()._json_payload(text)[0]
    gpus = []
    for position, device in enumerate(data.get("device_info") or []):
        telemetry = device.get("telemetry") or {}
        temp = _number(telemetry.get("asic_temperature"))
        power = _number(telemetry.get("power"))
        gpus.append(GpuSample(index=position, vendor="tenstorrent",  # older tt-smi: temperature, power_consumption
                              temperature_c=temp if temp is not None else _number(telemetry.get("temperature")),
                              power_w=power if power is not None else _number(telemetry.get("power_consumption"))))
    return gpus


# --------------------------------------------------------------------------- host: cgroups, runtime

# A container's cgroup, as /proc/PID/cgroup names it: podman with cgroupfs (libpod-<id>) or systemd
# (libpod-<id>.scope, also under a conmon/container sub-cgroup), docker with cgroupfs (/docker/<id>)
# or systemd (docker-<id>.scope).
_CONTAINER_CGROUP = re.compile(r"(?:/libpod-|/docker-|/docker/)([0-9a-f]{64})(?:\.scope)?(?:/|$)")


def cgroup_container(text: str) -> str | None:
    """The container id that the cgroup of a process (the text of /proc/PID/cgroup) belongs to; None for
    a process in no container."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        m = _CONTAINER_CGROUP.search(path)
        if m:
            return m.group(1)
    return None


def runtime_ps(text: str) -> dict[str, str]:
    """``ps --no-trunc --format '{{.ID}} {{.Names}}'``: full id -> name."""
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            found[parts[0]] = parts[1]
    return found


def runtime_stats(text: str) -> list[ContainerUsage]:
    """``podman stats --no-stream --format json`` (a JSON list) or ``docker stats --no-stream --format
    '{{json .}}'`` (one object a line)."""
    if not text.strip():
        return []
    if any(line.lstrip().startswith("[") for line in text.splitlines()):
        rows = _gpus()._json_payload(text)[0]
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.lstrip().startswith("{")]
    usage = []
    for row in rows:
        name = row.get("name") or row.get("Name") or ""
        cpu = row.get("cpu_percent", row.get("CPUPerc"))
        mem = str(row.get("mem_usage", row.get("MemUsage")) or "")
        used, _, limit = mem.partition("/")
        usage.append(ContainerUsage(name=str(name).lstrip("/"), cpu_percent=_number(cpu),
                                    memory_bytes=_bytes(used), memory_limit_bytes=_bytes(limit)))
    return usage
