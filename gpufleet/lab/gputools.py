"""Stand-in GPU tools for the local lab.

Each lab host gets its own bin dir, first on its PATH. ``write_standins`` puts POSIX sh scripts
named like the vendors' tools there (nvidia-smi, amd-smi, hl-smi, tt-smi). They answer only the
command lines the probe runs (plus ``nvidia-smi -L``) by printing data files written next to them,
in the byte format the real tools use (taken from the recorded outputs in
../shared/fixtures/gpu-tools/ beside the checkout: separators, units, ANSI header escapes, JSON indent). Any other
command line fails with an error, as the real tool would for arguments it does not know.

``write_standins`` returns the ground truth: the GPU dicts (keys as the probe's parsers return)
that a correct probe must report for the host.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

MARKER = "gpufleet-lab-standin"
VENDORS = ("nvidia", "amd", "intel", "tenstorrent")  # the order the probe reports vendors in
TOOLS = {"nvidia": "nvidia-smi", "amd": "amd-smi", "intel": "hl-smi", "tenstorrent": "tt-smi"}
DRIVERS = {"nvidia": "565.57.01", "amd": "6.16.13", "intel": "1.22.1-97ec1a4", "tenstorrent": "1.34"}

# The command lines the stand-ins answer (argv without the tool name). They are the probe's
# PROBE_COMMANDS (plugins/module_utils/gpufleet_gpus.py); a test keeps the two in step.
NVIDIA_QUERY = ("--query-gpu=index,uuid,name,memory.total,pci.bus_id,driver_version",
                "--format=csv,noheader,nounits")
NVIDIA_TOPO = ("topo", "-m")
NVIDIA_LIST = ("-L",)
AMD_STATIC = ("static", "--json")
HLSMI_QUERY = ("-Q", "index,name,bus_id,driver_version,uuid,memory.total", "-f", "csv,noheader")
TTSMI_SNAPSHOT = ("-s",)

# What each tool says (stderr) and exits with for a command line it does not know.
USAGE_ERRORS = {
    "nvidia-smi": ("Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.", 2),
    "amd-smi": ("amd-smi: error: unrecognized arguments: $*", 2),
    "hl-smi": ("hl-smi: invalid arguments: $*", 1),
    "tt-smi": ("tt-smi: error: unrecognized arguments: $*", 2),
}


@dataclass(frozen=True)
class GpuSpec:
    vendor: str  # nvidia | amd | intel | tenstorrent
    model: str   # a CATALOGUE key of the vendor, e.g. "H100"
    count: int   # GPUs; for tenstorrent, chips (an n300 board has two: L and R)


@dataclass(frozen=True)
class Model:
    name: str              # as the tool prints it
    memory_mib: int
    nvlink: str | None = None  # nvidia-smi topo -m between two GPUs of this model


# Names and sizes as the real tools print them (see ../shared/fixtures/gpu-tools/).
CATALOGUE: dict[str, dict[str, Model]] = {
    "nvidia": {"H100": Model("NVIDIA H100 80GB HBM3", 81559, "NV18"),
               "L40S": Model("NVIDIA L40S", 46068),
               "A100": Model("NVIDIA A100-SXM4-80GB", 81920, "NV12")},
    "amd": {"MI300X": Model("AMD Instinct MI300X", 196592)},
    "intel": {"Gaudi2": Model("HL-225", 98304), "Gaudi3": Model("HL-325L", 131072)},
    "tenstorrent": {"n150": Model("n150", 12288), "n300": Model("n300", 12288)},  # DRAM per chip
}
TENSTORRENT_BOARD_ID_HIGH = {"n150": 0x1000186, "n300": 0x1000145}

CORES_PER_NODE = 64  # physical cores per NUMA node; each has an SMT sibling, numbered as Linux does


@dataclass
class _Gpu:
    """One GPU of a lab host, with everything any tool prints about it."""
    vendor: str
    model: str
    index: int      # the vendor tool's index
    numa_node: int
    bus: int | None
    seed: str       # unique across the lab: host and GPU

    def hex(self, n: int) -> str:
        return hashlib.sha256(self.seed.encode()).hexdigest()[:n]

    @property
    def info(self) -> Model:
        return CATALOGUE[self.vendor][self.model]

    @property
    def bus_id(self) -> str | None:
        return None if self.bus is None else f"0000:{self.bus:02x}:00.0"

    @property
    def uuid(self) -> str | None:
        h = self.hex(32)
        if self.vendor == "nvidia":
            return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        if self.vendor == "amd":  # amd-smi's asic_serial
            return "0x" + h[:16].upper()
        if self.vendor == "intel":  # hl-smi's uuid, e.g. 01P4-HL3090A0-18-UAN071-12-03-01
            n = int(h, 16)
            letters = chr(65 + n % 26) + chr(65 + n // 26 % 26)
            return (f"01P4-HL3090A0-18-U{letters}{n % 1000:03d}-"
                    f"{n // 10**3 % 24:02d}-{n // 10**5 % 10:02d}-{n // 10**6 % 8:02d}")
        return None  # tt-smi has no per-chip id

    def truth(self) -> dict:
        return {"index": self.index, "vendor": self.vendor, "name": self.name, "model": self.model,
                "memory_mib": self.info.memory_mib, "uuid": self.uuid, "bus_id": self.bus_id,
                "numa_node": self.numa_node if self.vendor in ("nvidia", "amd") else None}

    @property
    def name(self) -> str:
        if self.vendor == "tenstorrent":
            return f"{self.info.name} {'R' if self.bus is None else 'L'}"
        return self.info.name


# --------------------------------------------------------------------------- host layout

def _cpu_list(node: int, numa_nodes: int) -> list[int]:
    first = node * CORES_PER_NODE
    cores = range(first, first + CORES_PER_NODE)
    return [*cores, *(c + numa_nodes * CORES_PER_NODE for c in cores)]


def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def _layout(specs: list[GpuSpec], host_index: int, numa_nodes: int) -> list[_Gpu]:
    for spec in specs:
        if spec.model not in CATALOGUE.get(spec.vendor, {}):
            known = ", ".join(f"{v}/{m}" for v, models in CATALOGUE.items() for m in models)
            raise ValueError(f"no stand-in for {spec.vendor} {spec.model} (known: {known})")
        if spec.count < 0:
            raise ValueError(f"negative GPU count for {spec.vendor} {spec.model}")
    if numa_nodes < 1:
        raise ValueError("numa_nodes must be at least 1")
    total = sum(s.count for s in specs)
    per_node = -(-total // numa_nodes) if total else 1
    span = 0x100 // numa_nodes  # PCI buses behind each node's root complex, spread evenly
    if per_node >= span:
        raise ValueError(f"too many GPUs for {numa_nodes} NUMA nodes")
    gpus: list[_Gpu] = []
    indexes = {v: 0 for v in VENDORS}
    for spec in specs:
        chips = []
        for _ in range(spec.count):
            position = len(gpus) + len(chips)
            node = position * numa_nodes // total
            within = position - -(-node * total // numa_nodes)  # minus the node's first position
            chips.append(_Gpu(spec.vendor, spec.model, 0, node, node * span + span * (within + 1) // (per_node + 1),
                              f"gpufleet-lab:{host_index}:{spec.vendor}:{position}"))
        if spec.model == "n300":  # a board's R chip hangs off its L chip: no PCIe address, listed after all L chips
            boards = -(-len(chips) // 2)
            for chip in chips[boards:]:
                chip.bus = None
        for chip in chips:
            chip.index = indexes[spec.vendor]
            indexes[spec.vendor] += 1
        gpus.extend(chips)
    return gpus


# --------------------------------------------------------------------------- nvidia-smi

TOPO_LEGEND = """
Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node
  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)
  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)
  PIX  = Connection traversing at most a single PCIe bridge
  NV#  = Connection traversing a bonded set of # NVLinks
"""


def _nvidia_outputs(gpus: list[_Gpu], numa_nodes: int) -> dict[tuple[str, ...], str]:
    def bus(g: _Gpu) -> str:  # nvidia-smi prints a 32-bit domain and upper-case hex
        return f"00000000:{g.bus:02X}:00.0"

    def link(a: _Gpu, b: _Gpu) -> str:
        if a is b:
            return " X "
        if a.model == b.model and a.info.nvlink:
            return a.info.nvlink
        return "NODE" if a.numa_node == b.numa_node else "SYS"

    query = "".join(f"{g.index}, {g.uuid}, {g.name}, {g.info.memory_mib}, {bus(g)}, {DRIVERS['nvidia']}\n"
                    for g in gpus)
    listing = "".join(f"GPU {g.index}: {g.name} (UUID: {g.uuid})\n" for g in gpus)
    header = "\t".join([f"GPU{g.index}" for g in gpus] + ["CPU Affinity", "NUMA Affinity", "GPU NUMA ID"])
    rows = [f"GPU{a.index}\t" + "\t".join(link(a, b) for b in gpus)
            + f"\t{_ranges(_cpu_list(a.numa_node, numa_nodes))}\t{a.numa_node}\t\tN/A\n" for a in gpus]
    topo = f"\t\x1b[4m{header}\x1b[0m\n" + "".join(rows) + TOPO_LEGEND
    return {NVIDIA_QUERY: query, NVIDIA_TOPO: topo, NVIDIA_LIST: listing}


# --------------------------------------------------------------------------- amd-smi

def _amd_cpu_affinity(cpus: list[int]) -> dict:
    """amd-smi's per-64-CPU bitmask words for a CPU list."""
    words: dict[int, list[int]] = {}
    for cpu in cpus:
        words.setdefault(cpu // 64, []).append(cpu)
    return {f"cpu_list_{i}": {"bitmask": f"{sum(1 << (c % 64) for c in members):016X}",
                              "cpu_cores_affinity": _ranges(members)}
            for i, (_, members) in enumerate(sorted(words.items()))}


_AMD_CACHES = (  # properties, KB, level, CUs sharing, instances (MI300X, from amd-smi static)
    ("DATA_CACHE", 32, 1, 1, 304), ("INST_CACHE", 64, 1, 2, 144), ("INST_CACHE", 64, 1, 1, 16),
    ("DATA_CACHE", 16, 1, 2, 144), ("DATA_CACHE", 16, 1, 1, 16), ("DATA_CACHE", 4096, 2, 304, 1),
    ("DATA_CACHE", 262144, 3, 304, 1),
)
_AMD_CLOCKS = (  # name, current level MHz, levels MHz
    ("sys", (132, 500, 2100)), ("mem", (900, 1100, 1300)), ("df", (1300, 1550, 1800)),
    ("soc", (32, 889, 1000, 1143)), ("dcef", None), ("vclk0", (29,)), ("vclk1", (29,)), ("dclk0", (22,)),
    ("dclk1", (22,)),
)


def _value(number, unit: str) -> dict:
    return {"value": number, "unit": unit}


def _policies(first: str, n: int) -> list[dict]:
    return [{"policy_id": 0, "policy_description": first}] + [
        {"policy_id": 0, "policy_description": ""} for _ in range(n - 1)]


def _amd_entry(g: _Gpu, numa_nodes: int) -> dict:
    """One GPU of `amd-smi static --json` (ROCm 7.2, as recorded on an 8x MI300X host)."""
    affinity = _amd_cpu_affinity(_cpu_list(g.numa_node, numa_nodes))
    return {
        "gpu": g.index,
        "asic": {"market_name": g.name, "vendor_id": "0x1002", "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]",
                 "subvendor_id": "0x1002", "device_id": "0x74a1", "subsystem_id": "0x74a1", "rev_id": "0x00",
                 "asic_serial": g.uuid, "oam_id": g.index, "num_compute_units": 304,
                 "target_graphics_version": "gfx942"},
        "bus": {"bdf": g.bus_id, "max_pcie_width": 16, "max_pcie_speed": _value(32, "GT/s"), "pcie_levels": "N/A",
                "pcie_interface_version": "Gen 5", "slot_type": "OAM"},
        "ifwi": {"name": "AMD MI300X_HW_SRIOV_CVS_1VF", "build_date": "2025/07/27 14:45",
                 "part_number": "113-M3000108-103", "version": "00159017"},
        "limit": {
            "ppt0": {"max_power_limit": _value(750, "W"), "min_power_limit": _value(0, "W"),
                     "socket_power_limit": _value(750, "W")},
            "ppt1": {"max_power_limit": "N/A", "min_power_limit": "N/A", "socket_power_limit": "N/A"},
            "slowdown_edge_temperature": "N/A", "slowdown_hotspot_temperature": _value(100, "C"),
            "slowdown_vram_temperature": _value(105, "C"), "shutdown_edge_temperature": "N/A",
            "shutdown_hotspot_temperature": _value(110, "C"), "shutdown_vram_temperature": _value(115, "C"),
            "ptl_state": "N/A", "ptl_format": "N/A"},
        "driver": {"name": "amdgpu", "version": DRIVERS["amd"]},
        "board": {"model_number": "102-G30211-0C", "product_serial": str(int(g.hex(10), 16) % 10**12).zfill(12),
                  "fru_id": "113-AMDG302110C08-100-300000067H", "product_name": "AMD Instinct MI300X OAM",
                  "manufacturer_name": "AMD"},
        "ras": {"eeprom_version": "0x10000", "bad_page_threshold": 128, "bad_page_threshold_exceeded": "False",
                "parity_schema": "DISABLED", "single_bit_schema": "DISABLED", "double_bit_schema": "DISABLED",
                "poison_schema": "ENABLED",
                "ecc_block_state": {b: "DISABLED" if b in ("SEM", "FUSE") else "ENABLED" for b in (
                    "UMC", "SDMA", "GFX", "MMHUB", "ATHUB", "PCIE_BIF", "HDP", "XGMI_WAFL", "DF", "SMN", "SEM",
                    "MP0", "MP1", "FUSE", "MCA", "VCN", "JPEG", "IH", "MPIO")}},
        "soc_pstate": {"num_supported": 4, "current_id": 0, "policies": _policies("soc_pstate_default", 4)},
        "xgmi_plpd": {"num_supported": 3, "current_id": 0, "plpds": _policies("plpd_disallow", 3),
                      "policies": _policies("plpd_disallow", 3)},
        "process_isolation": "Disabled",
        "numa": {"node": g.numa_node, "affinity": g.numa_node, "cpu_affinity": affinity,
                 "socket_affinity": copy.deepcopy(affinity)},
        "vram": {"type": "HBM", "vendor": "SAMSUNG", "size": _value(g.info.memory_mib, "MB"), "bit_width": 8192,
                 "max_bandwidth": _value(5325, "GB/s")},
        "cache_info": [{"cache": i, "cache_properties": [kind, "SIMD_CACHE"], "cache_size": _value(kb, "KB"),
                        "cache_level": level, "max_num_cu_shared": shared, "num_cache_instance": instances}
                       for i, (kind, kb, level, shared, instances) in enumerate(_AMD_CACHES)],
        "clock": {name: "N/A" if levels is None else {
            "current_level": 0, "current_frequency": f"{levels[0]}MHz",
            "frequency_levels": {f"Level {i}": f"{mhz} MHz" for i, mhz in enumerate(levels)}}
            for name, levels in _AMD_CLOCKS},
    }


def _amd_outputs(gpus: list[_Gpu], numa_nodes: int) -> dict[tuple[str, ...], str]:
    doc = {"gpu_data": [_amd_entry(g, numa_nodes) for g in gpus]}
    return {AMD_STATIC: json.dumps(doc, indent=4)}  # as recorded: indent 4, no final newline


# --------------------------------------------------------------------------- hl-smi

def _intel_outputs(gpus: list[_Gpu], numa_nodes: int) -> dict[tuple[str, ...], str]:
    return {HLSMI_QUERY: "".join(f"{g.index}, {g.name}, {g.bus_id}, {DRIVERS['intel']}, {g.uuid}, "
                                 f"{g.info.memory_mib} MiB\n" for g in gpus)}


# --------------------------------------------------------------------------- tt-smi

_TT_SMBUS = {  # a Wormhole n150's smbus_telem (tt-smi 3.0.15), BOARD_ID fields filled per board
    "BOARD_ID": None, "ENUM_VERSION": "0xba5e0001", "DEVICE_ID": "0x401e1e52", "ASIC_RO": "0x2df07",
    "ASIC_IDD": "0xbf1", "BOARD_ID_HIGH": None, "BOARD_ID_LOW": None, "ARC0_FW_VERSION": "0x2200000",
    "ARC1_FW_VERSION": "0x2200000", "ARC2_FW_VERSION": None, "ARC3_FW_VERSION": "0x2200000",
    "SPIBOOTROM_FW_VERSION": "0x30c0000", "ETH_FW_VERSION": "0x6e000", "M3_BL_FW_VERSION": "0x81020000",
    "M3_APP_FW_VERSION": "0x50c0000", "DDR_SPEED": None, "DDR_STATUS": "0x2222222", "ETH_STATUS0": "0x11111111",
    "ETH_STATUS1": "0x11111111", "PCIE_STATUS": "0x10440000", "FAULTS": None, "ARC0_HEALTH": "0x6b1943",
    "ARC1_HEALTH": "0x275466", "ARC2_HEALTH": None, "ARC3_HEALTH": "0x42e0", "FAN_SPEED": "0x4cbffff",
    "AICLK": "0x3e801f4", "AXICLK": "0x384", "ARCCLK": "0x21c", "THROTTLER": None, "VCORE": "0x31b",
    "ASIC_TEMPERATURE": "0x3690365", "VREG_TEMPERATURE": None, "BOARD_TEMPERATURE": "0x323433", "TDP": "0x64000c",
    "TDC": "0xf00010", "VDD_LIMITS": "0x3e80320", "THM_LIMITS": "0x53004b", "WH_FW_DATE": "0x54010d33",
    "ASIC_TMON0": "0x37324235", "ASIC_TMON1": "0x382f", "MVDDQ_POWER": "0x190000", "GDDR_TRAIN_TEMP0": None,
    "GDDR_TRAIN_TEMP1": None, "BOOT_DATE": "0x56140b2a", "RT_SECONDS": "0x6ca", "AUX_STATUS": None,
    "ETH_DEBUG_STATUS0": "0xccddddcc", "ETH_DEBUG_STATUS1": "0xccdddddd", "TT_FLASH_VERSION": "0x30200",
    "FW_BUNDLE_VERSION": "0x50110000",
}


def _tt_device(g: _Gpu, board: _Gpu) -> dict:
    """One chip of `tt-smi -s`; ``board`` is the board's L chip (itself for an L chip)."""
    high = TENSTORRENT_BOARD_ID_HIGH[g.model]
    low = int(board.hex(8), 16)
    smbus = dict(_TT_SMBUS, BOARD_ID=f"0x{high:x}{low:08x}", BOARD_ID_HIGH=f"0x{high:x}", BOARD_ID_LOW=f"0x{low:x}")
    pcie = g.bus is not None
    return {
        "smbus_telem": smbus,
        "board_info": {"bus_id": g.bus_id or "N/A", "board_type": g.name, "board_id": f"{high:x}{low:08x}",
                       "coords": f"({g.index}, 0, 0, 0)",
                       "dram_status": True, "dram_speed": "12G", "pcie_speed": 4 if pcie else "N/A",
                       "pcie_width": ("16" if g.model == "n300" else "4") if pcie else "N/A"},
        "telemetry": {"voltage": "0.80", "current": " 16.0", "power": " 12.0", "aiclk": " 500",
                      "asic_temperature": "54.3"},
        "firmwares": {"fw_bundle_version": "80.17.0.0", "tt_flash_version": "0.3.2.0", "cm_fw": "2.32.0.0",
                      "cm_fw_date": "2025-04-01", "eth_fw": "6.14.0", "bm_bl_fw": "129.2.0.0",
                      "bm_app_fw": "5.12.0.0"},
        "limits": {"vdd_min": "0.80", "vdd_max": "1.00", "tdp_limit": "100", "tdc_limit": "240", "asic_fmax": "1000",
                   "therm_trip_l1_limit": "83", "thm_limit": "75", "bus_peak_limit": None},
    }


def _tenstorrent_outputs(gpus: list[_Gpu], numa_nodes: int, host_index: int) -> dict[tuple[str, ...], str]:
    devices = []
    for model in dict.fromkeys(g.model for g in gpus):
        chips = [g for g in gpus if g.model == model]
        boards = [g for g in chips if g.bus is not None]
        for g in chips:  # an R chip belongs to the board of the L chip listed as many places before it
            devices.append(_tt_device(g, g if g.bus is not None else boards[chips.index(g) - len(boards)]))
    doc = {
        "time": "2025-06-11T03:37:23.927792",
        "host_info": {"OS": "Linux", "Distro": "Ubuntu 22.04.5 LTS", "Kernel": "5.15.0-141-generic",
                      "Hostname": f"gpufleet-lab-{host_index}", "Platform": "x86_64", "Python": "3.10.12",
                      "Memory": "503.45 GB", "Driver": f"TT-KMD {DRIVERS['tenstorrent']}"},
        "host_sw_vers": {"tt_smi": "3.0.20", "pyluwen": "0.7.2"},
        "device_info": devices,
    }
    return {TTSMI_SNAPSHOT: json.dumps(doc, indent=4) + "\n"}


# --------------------------------------------------------------------------- scripts

def _script(tool: str, data_dir: Path, answers: dict[tuple[str, ...], str]) -> str:
    message, rc = USAGE_ERRORS[tool]
    lines = ["#!/bin/sh",
             f"# {MARKER}: {tool} for a gpufleet lab host, written by gpufleet.lab.gputools.",
             "# It answers only the command lines below, with output in the real tool's format."]
    for args, filename in answers.items():
        test = " && ".join([f'[ "$#" -eq {len(args)} ]']
                           + [f'[ "${{{i}}}" = {shlex.quote(a)} ]' for i, a in enumerate(args, 1)])
        lines.append(f"if {test}; then exec cat {shlex.quote(str(data_dir / filename))}; fi")
    lines += [f'echo "{message}" >&2',
              'echo "(gpufleet lab stand-in: only the probe\'s command lines are recorded)" >&2',
              f"exit {rc}", ""]
    return "\n".join(lines)


def _data_dir(bin_dir: Path) -> Path:
    return bin_dir.parent / "gpu-data" / bin_dir.name


def write_standins(bin_dir: Path, specs: list[GpuSpec], host_index: int, numa_nodes: int = 2) -> list[dict]:
    """Write the stand-in tools for ``specs`` into ``bin_dir``; return the GPUs the probe must find.

    GPUs are numbered per vendor in the order of ``specs``, spread evenly over ``numa_nodes`` in
    order (8 GPUs on 2 nodes: 0-3 on node 0, 4-7 on node 1). UUIDs, serials and board ids derive
    from ``host_index`` and the GPU, so they are stable and unique across lab hosts. Stand-ins of
    vendors no longer in ``specs`` are removed.
    """
    bin_dir = Path(bin_dir)
    gpus = _layout([s for s in specs if s.count], host_index, numa_nodes)
    data_dir = _data_dir(bin_dir)
    for directory in (bin_dir, data_dir.parent, data_dir):
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o755)
    for vendor in VENDORS:
        tool = TOOLS[vendor]
        script = bin_dir / tool
        mine = [g for g in gpus if g.vendor == vendor]
        if not mine:
            if script.is_file() and MARKER in script.read_text(errors="replace"):
                script.unlink()
            continue
        if vendor == "nvidia":
            outputs = _nvidia_outputs(mine, numa_nodes)
        elif vendor == "amd":
            outputs = _amd_outputs(mine, numa_nodes)
        elif vendor == "intel":
            outputs = _intel_outputs(mine, numa_nodes)
        else:
            outputs = _tenstorrent_outputs(mine, numa_nodes, host_index)
        answers = {}
        for args, text in outputs.items():
            path = data_dir / f"{tool}.{args[0].lstrip('-').split('=')[0]}.out"  # nvidia-smi.query-gpu.out
            path.write_bytes(text.encode())
            os.chmod(path, 0o644)
            answers[args] = path.name
        script.write_text(_script(tool, data_dir, answers))
        os.chmod(script, 0o755)
    return [g.truth() for g in sorted(gpus, key=lambda g: (VENDORS.index(g.vendor), g.index))]
