# Copyright (c) 2026 gpufleet contributors
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
# SPDX-License-Identifier: Apache-2.0
"""GPU inventory from the vendors' own tools.

Runs on the target host inside the ``gpufleet_probe`` module: standard library only, Python 3.8
syntax. The ``parse_*`` functions are pure (tool output in, list of GPU dicts out); ``probe_gpus``
runs the tools through the ``run``/``which`` callables it is given and never raises.

Every GPU dict has exactly the keys of ``GPU_KEYS``::

    index      int        the vendor tool's own index
    vendor     str        "nvidia" | "amd" | "intel" | "tenstorrent"
    name       str|None   the name as the tool prints it
    model      str|None   short model, see normalize_model()
    memory_mib int|None
    uuid       str|None
    bus_id     str|None   PCI address in the form Linux uses in /sys: "0000:18:00.0"
    numa_node  int|None
"""

import json
import os
import re

GPU_KEYS = ("index", "vendor", "name", "model", "memory_mib", "uuid", "bus_id", "numa_node")

NVIDIA_QUERY_FIELDS = ("index", "uuid", "name", "memory.total", "pci.bus_id", "driver_version")
HLSMI_QUERY_FIELDS = ("index", "name", "bus_id", "driver_version", "uuid", "memory.total")

# vendor -> (tool binary, the command lines the probe runs). The first command lists the GPUs;
# any further one only adds detail (NUMA placement) and may fail without losing the GPUs.
PROBE_COMMANDS = {
    "nvidia": ("nvidia-smi", [
        ["nvidia-smi", "--query-gpu=" + ",".join(NVIDIA_QUERY_FIELDS), "--format=csv,noheader,nounits"],
        ["nvidia-smi", "topo", "-m"],
    ]),
    "amd": ("amd-smi", [
        ["amd-smi", "static", "--json"],
    ]),
    "intel": ("hl-smi", [
        ["hl-smi", "-Q", ",".join(HLSMI_QUERY_FIELDS), "-f", "csv,noheader"],
    ]),
    "tenstorrent": ("tt-smi", [
        ["tt-smi", "-s"],
    ]),
}

# What to do when a vendor's tool is installed but does not work.
TOOL_FIXES = {
    "nvidia": "check that the NVIDIA driver is loaded and matches its user-space tools "
              "(run `nvidia-smi` on the host; reinstall the driver or reboot after a kernel update)",
    "amd": "check that the amdgpu driver (ROCm) is loaded and that the user is in the render and "
           "video groups (run `amd-smi static` on the host)",
    "intel": "check that the habanalabs driver is loaded (run `hl-smi` on the host)",
    "tenstorrent": "check that tt-kmd is loaded (/dev/tenstorrent) and that `tt-smi -s` works on the host",
}

SYSFS_PCI_DEVICES = "/sys/bus/pci/devices"


# --------------------------------------------------------------------------- values

def _clean(value):
    """A tool's value, or None for the ways tools say "no value" (N/A, [N/A], [Not Supported]...)."""
    if value is None:
        return None
    if not isinstance(value, str):
        return value
    value = value.strip()
    if not value or value.upper() in ("N/A", "NA", "NONE", "UNKNOWN"):
        return None
    if value.startswith("[") and value.endswith("]"):  # nvidia-smi: [N/A], [Not Supported], ...
        return None
    return value


def _int(value):
    value = _clean(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.match(r"^-?\d+$", value):
        return int(value)
    return None


def _numa(value):
    """A NUMA node number; -1 ("no affinity") and ranges like "0-1" are None."""
    node = _int(value)
    return node if node is not None and node >= 0 else None


_UNIT_FACTORS = {  # to MiB; the GPU tools' "MB" are MiB (e.g. amd-smi's 196592 MB for 192 GiB)
    "B": 1.0 / (1 << 20), "KB": 1.0 / 1024, "KIB": 1.0 / 1024, "MB": 1, "MIB": 1,
    "GB": 1024, "GIB": 1024, "TB": 1 << 20, "TIB": 1 << 20,
}


def _mib(value, default_unit="MiB"):
    """Memory in MiB from "81559", "131072 MiB", "196592 MB" or {"value": 196592, "unit": "MB"}."""
    if isinstance(value, dict):
        return _mib(value.get("value"), value.get("unit") or default_unit)
    value = _clean(value)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number, unit = value, default_unit
    else:
        m = re.match(r"^(\d+(?:\.\d+)?)\s*([A-Za-z]*)$", value)
        if not m:
            return None
        number, unit = float(m.group(1)), m.group(2) or default_unit
    factor = _UNIT_FACTORS.get(str(unit).upper())
    return None if factor is None else int(round(float(number) * factor))


_BDF = re.compile(r"^(?:([0-9a-fA-F]+):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def normalize_bus_id(value):
    """PCI address as /sys/bus/pci/devices names it: nvidia-smi's "00000000:18:00.0" -> "0000:18:00.0"."""
    value = _clean(value)
    if value is None:
        return None
    m = _BDF.match(value)
    if not m:
        return value.lower()
    domain, bus, device, function = m.groups()
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{function}"


# --------------------------------------------------------------------------- models

# Names a rule cannot derive (checked first, exact raw name).
MODEL_TABLE = {
    ("intel", "HL-205"): "Gaudi",
}

_NVIDIA_PREFIXES = ("NVIDIA", "Tesla", "GeForce", "Quadro")
# Name parts that say memory size, memory kind, form factor or edition, not the model.
_NVIDIA_DROP = re.compile(r"^(\d+GB|HBM\d*e?|SXM\d*|PCIE|Generation|Edition|Server|Workstation)$", re.I)
_HABANA_GENERATIONS = {"1": "Gaudi", "2": "Gaudi2", "3": "Gaudi3"}


def normalize_model(vendor, raw_name):
    """Short model name: "NVIDIA H100 80GB HBM3" -> "H100", "HL-325L" -> "Gaudi3", "n300 L" -> "n300"."""
    name = _clean(raw_name)
    if name is None:
        return None
    if (vendor, name) in MODEL_TABLE:
        return MODEL_TABLE[(vendor, name)]
    if vendor == "nvidia":
        words = re.split(r"[\s\-]+", name)
        while len(words) > 1 and words[0] in _NVIDIA_PREFIXES:
            words = words[1:]
        kept = [w for w in words if w and not _NVIDIA_DROP.match(w)]
        return "".join(kept) or name
    if vendor == "amd":
        m = re.search(r"\bMI\d+[A-Za-z]*\b", name, re.I)  # Instinct: MI300X, MI250X, MI210...
        if m:
            return m.group(0).upper()
        name = re.sub(r"\(.*?\)", " ", name)
        kept = [w for w in name.split() if w not in ("AMD", "Radeon", "Instinct")]
        return "".join(kept) or name.strip()
    if vendor == "intel":
        m = re.match(r"^HL-(\d)\d\d", name)  # Habana Gaudi cards: HL-2xx Gaudi2, HL-3xx Gaudi3
        if m and m.group(1) in _HABANA_GENERATIONS:
            return _HABANA_GENERATIONS[m.group(1)]
        m = re.search(r"Gaudi\s*(\d*)", name, re.I)
        if m:
            return "Gaudi" + m.group(1)
        return re.sub(r"\s+", "", name)
    if vendor == "tenstorrent":
        # board types: "n150 L", "n300 R" (one chip of a two-chip board), "p150a", "tt-galaxy-wh L"
        model = re.sub(r"\s+[LR]$", "", name.strip(), flags=re.I).lower()
        return re.sub(r"^tt-", "", model)
    return re.sub(r"\s+", "", name)


# tt-smi does not report DRAM size: per-chip DRAM of the boards, by model prefix (board specs).
TENSTORRENT_MEMORY_MIB = (
    ("n150", 12 * 1024), ("n300", 12 * 1024), ("galaxy-wh", 12 * 1024),
    ("p100", 28 * 1024), ("p150", 32 * 1024), ("p300", 32 * 1024), ("galaxy-bh", 32 * 1024),
)


def _gpu(vendor, index, name, memory_mib, uuid, bus_id, numa_node=None):
    name = _clean(name)
    return {
        "index": index, "vendor": vendor, "name": name, "model": normalize_model(vendor, name),
        "memory_mib": memory_mib, "uuid": _clean(uuid), "bus_id": normalize_bus_id(bus_id),
        "numa_node": numa_node,
    }


# --------------------------------------------------------------------------- tool output

def _query_records(text, fields):
    """Rows of a `--query... --format=csv` output as dicts by field name.

    Works with and without the header line (a header, when present, names the columns: it may
    carry units, "memory.total [MiB]") and with and without units in the values.
    """
    rows = [[cell.strip() for cell in line.split(",")] for line in text.splitlines() if line.strip()]
    if rows:
        names = [re.sub(r" \[[^\]]*\]$", "", cell) for cell in rows[0]]
        if all(re.match(r"^[A-Za-z][A-Za-z0-9_.]*$", n) for n in names) and set(names) & set(fields):
            fields, rows = names, rows[1:]
    records = []
    for row in rows:
        if len(row) != len(fields):
            raise ValueError(f"expected {len(fields)} comma-separated fields, got {len(row)} in {', '.join(row)!r}")
        records.append(dict(zip(fields, row)))  # noqa: B905 (same length, checked; zip(strict) needs 3.10)
    return records


def _csv_driver(text, fields):
    for record in _query_records(text, fields):
        version = _clean(record.get("driver_version"))
        if version:
            return version
    return None


def _json_payload(text):
    """(document, text before it): the JSON a tool printed, after any banner or warning lines."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"^[ \t]*[\[{]", text, re.M):
        start = m.end() - 1
        try:
            return decoder.raw_decode(text[start:])[0], text[:start].strip()
        except ValueError:
            continue
    raise ValueError("no JSON document in the output")


def _parse_query(vendor, text, fields, bus_field):
    """GPUs from a vendor tool's CSV query (nvidia-smi --query-gpu, hl-smi -Q): one record a GPU."""
    gpus = []
    for position, record in enumerate(_query_records(text, fields)):
        index = _int(record.get("index"))
        gpus.append(_gpu(vendor, position if index is None else index, record.get("name"),
                         _mib(record.get("memory.total")), record.get("uuid"), record.get(bus_field)))
    return gpus


def parse_nvidia_query(text, fields=NVIDIA_QUERY_FIELDS):
    """`nvidia-smi --query-gpu=index,uuid,name,memory.total,pci.bus_id,driver_version --format=csv,...`."""
    return _parse_query("nvidia", text, fields, "pci.bus_id")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def parse_nvidia_topo(text):
    """`nvidia-smi topo -m` -> {gpu index: NUMA node or None}, from the "NUMA Affinity" column."""
    header = None
    numa = {}
    for line in _ANSI.sub("", text).splitlines():
        cells = [cell.strip() for cell in line.split("\t")]
        if header is None:
            if "NUMA Affinity" in cells:
                header = cells
            continue
        m = re.match(r"^GPU(\d+)$", cells[0])
        if m:
            column = header.index("NUMA Affinity")
            numa[int(m.group(1))] = _numa(cells[column]) if column < len(cells) else None
    return numa


def _amd_entries(text):
    """(per-GPU entries, banner) of `amd-smi static --json`: ROCm 7 {"gpu_data": [...]}, ROCm 6 [...]."""
    data, banner = _json_payload(text)
    entries = data.get("gpu_data") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError("no GPU list in the amd-smi JSON")
    return entries, banner


def parse_amd_static(text):
    """`amd-smi static --json`, in either shape; banner lines before the JSON are skipped."""
    gpus = []
    for position, entry in enumerate(_amd_entries(text)[0]):
        asic = entry.get("asic") or {}
        board = entry.get("board") or {}
        bus = entry.get("bus") or {}
        vram = entry.get("vram") or {}
        numa = entry.get("numa") or {}
        index = _int(entry.get("gpu"))
        gpus.append(_gpu(
            "amd", position if index is None else index,
            _clean(asic.get("market_name")) or _clean(board.get("product_name")),
            _mib(vram.get("size"), "MB"),
            _clean(asic.get("asic_serial")) or _clean(entry.get("uuid")),
            bus.get("bdf"),
            _numa(numa.get("node")) if isinstance(numa, dict) else None))
    return gpus


def parse_hlsmi_query(text, fields=HLSMI_QUERY_FIELDS):
    """`hl-smi -Q index,name,bus_id,driver_version,uuid,memory.total -f csv,noheader`."""
    return _parse_query("intel", text, fields, "bus_id")


def parse_ttsmi_snapshot(text):
    """`tt-smi -s`: one GPU per device_info entry (an n300 board is two: its L and R chips)."""
    data = _json_payload(text)[0]
    gpus = []
    for position, device in enumerate(data.get("device_info") or []):
        board = device.get("board_info") or {}
        gpu = _gpu("tenstorrent", position, board.get("board_type"), None, None, board.get("bus_id"))
        gpu["memory_mib"] = next((mib for prefix, mib in TENSTORRENT_MEMORY_MIB
                                  if (gpu["model"] or "").startswith(prefix)), None)
        gpus.append(gpu)
    return gpus


# --------------------------------------------------------------------------- per vendor
# Each takes the outputs of the vendor's PROBE_COMMANDS (None for a detail command that failed)
# and returns (gpus, driver version or None, problems).

def _collect_nvidia(outputs):
    query, topo = outputs
    gpus = parse_nvidia_query(query)
    if topo is not None:
        numa = parse_nvidia_topo(topo)
        for gpu in gpus:
            gpu["numa_node"] = numa.get(gpu["index"])
    return gpus, _csv_driver(query, NVIDIA_QUERY_FIELDS), []


def _collect_amd(outputs):
    text = outputs[0]
    gpus = parse_amd_static(text)
    entries, banner = _amd_entries(text)
    versions = [_clean((entry.get("driver") or {}).get("version")) for entry in entries]
    driver = next((v for v in versions if v), None)
    problems = []
    if banner:  # e.g. "Permission needed to access required GPU device node(s):", then N/A fields
        first = banner.splitlines()[0].strip()
        if "permission" in banner.lower():
            user = _login_user()
            fix = (f"add {user} to the render and video groups (`sudo usermod -aG render,video {user}`) "
                   "and log in again")
        else:
            fix = "see the message that `amd-smi static --json` prints on the host"
        problems.append(problem("amd GPUs", f"amd-smi could not read every GPU detail: {first}", fix))
    return gpus, driver, problems


def _collect_intel(outputs):
    return parse_hlsmi_query(outputs[0]), _csv_driver(outputs[0], HLSMI_QUERY_FIELDS), []


def _collect_tenstorrent(outputs):
    data = _json_payload(outputs[0])[0]
    driver = _clean((data.get("host_info") or {}).get("Driver"))
    if driver:  # "TT-KMD 1.34" -> "1.34"
        driver = driver.split()[-1]
    return parse_ttsmi_snapshot(outputs[0]), driver, []


_COLLECTORS = {
    "nvidia": _collect_nvidia, "amd": _collect_amd, "intel": _collect_intel,
    "tenstorrent": _collect_tenstorrent,
}


# --------------------------------------------------------------------------- probe

def problem(what, reason, fix):
    return {"what": what, "reason": reason, "fix": fix}


def shorten(text, limit=300):
    """One line of at most ``limit`` characters."""
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def sysfs_numa_node(bus_id, devices=SYSFS_PCI_DEVICES):
    """The NUMA node Linux gives a PCI device (None where unknown or -1)."""
    try:
        with open(os.path.join(devices, bus_id, "numa_node")) as f:
            return _numa(f.read())
    except (OSError, ValueError):
        return None


def _login_user():
    try:
        import pwd  # not on every platform

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError, AttributeError):
        return "the login user"


def _run(run, argv):
    try:
        rc, out, err = run(argv)
    except Exception as e:  # a tool that cannot even be started
        return 127, "", str(e)
    return rc, out or "", err or ""


def probe_gpus(run, which, pci_numa=sysfs_numa_node):
    """Run each installed vendor tool; return {"gpus": [...], "drivers": {...}, "problems": [...]}.

    ``run(argv) -> (rc, stdout, stderr)``; ``which(name) -> path or None``;
    ``pci_numa(bus_id) -> node or None`` fills the NUMA node the tools do not give.
    A host without any GPU tool is a CPU host: no GPUs and no problem.
    """
    gpus, drivers, problems = [], {}, []
    for vendor, (tool, commands) in PROBE_COMMANDS.items():
        path = which(tool)
        if not path:
            continue
        what = f"{vendor} GPUs"
        outputs = []
        for argv in commands:
            rc, out, err = _run(run, [path] + argv[1:])
            if rc == 0:
                outputs.append(out)
                continue
            failed = f"`{' '.join(argv)}` failed (exit {rc})"
            detail = shorten(err or out) or "no output"
            if not outputs:  # the command that lists the GPUs
                problems.append(problem(what, f"{failed}: {detail}", TOOL_FIXES[vendor]))
                break
            problems.append(problem(what, f"{failed}, NUMA placement read from /sys instead: {detail}",
                                    TOOL_FIXES[vendor]))
            outputs.append(None)
        if len(outputs) < len(commands):
            continue
        command = " ".join(commands[0])
        try:
            found, driver, extra = _COLLECTORS[vendor](outputs)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            problems.append(problem(what, f"could not read the output of `{command}`: {shorten(str(e))}",
                                    f"update {tool}, or report its output (`{command}`) as a gpufleet bug"))
            continue
        if not found:
            problems.append(problem(what, f"{tool} is installed but lists no GPUs", TOOL_FIXES[vendor]))
        for gpu in found:
            if gpu["numa_node"] is None and gpu["bus_id"]:
                gpu["numa_node"] = pci_numa(gpu["bus_id"])
        gpus.extend(sorted(found, key=lambda gpu: gpu["index"]))
        if driver:
            drivers[vendor] = driver
        problems.extend(extra)
    return {"gpus": gpus, "drivers": drivers, "problems": problems}
