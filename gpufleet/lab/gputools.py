"""Stand-in GPU tools for the local lab.

Each lab host gets its own bin dir, first on its PATH. ``write_standins`` puts POSIX sh scripts
named like the vendors' tools there (nvidia-smi, amd-smi, hl-smi, tt-smi). They answer only the
command lines the probe runs (plus ``nvidia-smi -L``) by printing data files written next to them,
in the byte format the real tools use (taken from the recorded outputs in
../shared/fixtures/gpu-tools/ beside the checkout: separators, units, ANSI header escapes, JSON indent). Any other
command line fails with an error, as the real tool would for arguments it does not know.

``write_standins`` returns the ground truth: the GPU dicts (keys as the probe's parsers return)
that a correct probe must report for the host.

The GPUs can be driven: each host has a "driver" directory (``driver_dir``) where ``gpu-burn`` (the
lab's stand-in workload, installed in the host's bin dir and in the lab image) registers which GPUs
it holds, at what percent and with how much memory, and where ``set_fault`` marks a GPU faulty. The
sampler's command lines (gpufleet.metrics.hostcmd) are answered from it at each call: utilization,
memory, temperature, power and health per GPU, and the holders with their host PIDs (each gpu-burn
carries a unique token in its argv; a record whose token no live process carries is ignored).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from gpufleet.metrics import hostcmd

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
               "A100": Model("NVIDIA A100-SXM4-80GB", 81920, "NV12"),
               # pre-Ampere: retires pages instead of remapping rows (name and size from a real fleet's probe)
               "V100S": Model("Tesla V100S-PCIE-32GB", 32768)},
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


# --------------------------------------------------------------------------- live state (gpu-burn, faults)

DRIVER_ENV = "GPUFLEET_LAB_GPU_DRIVER"      # on a lab host: its driver directory (set by its sshd)
CONTAINER_DRIVER_DIR = "/run/gpufleet-lab-gpu"  # where the lab's CDI spec mounts it into a container
HOLDER_PREFIX = "gpufleet-lab-gpu-burn-"    # + a UUID: the token a gpu-burn carries in its argv

# How a model reads when idle and at full load: memory used when idle (MiB), temperature (C) idle ->
# full, power draw (W) idle -> full, power cap (W), and how its driver reports memory health: "remap"
# (rows remapped: Ampere and newer), "retire" (pages retired: before Ampere), "" (not by nvidia-smi).
# Idle and loaded values from the recorded outputs in ../shared/fixtures/gpu-tools where there are some
# (H100 idle/gpu-burn, L40S, A100, Gaudi 2 and 3 tables); the others plausible for the model.
LIVE: dict[tuple[str, str], tuple[int, int, int, float, float, int, str]] = {
    ("nvidia", "H100"): (1, 30, 59, 69.85, 631.95, 700, "remap"),
    ("nvidia", "A100"): (1, 23, 58, 58.90, 452.50, 500, "remap"),
    ("nvidia", "L40S"): (0, 29, 63, 33.52, 294.30, 350, "remap"),
    ("nvidia", "V100S"): (0, 32, 68, 25.91, 231.40, 250, "retire"),
    ("amd", "MI300X"): (283, 35, 70, 131.0, 700.0, 750, ""),
    ("intel", "Gaudi2"): (768, 22, 60, 88, 560, 600, ""),
    ("intel", "Gaudi3"): (672, 36, 70, 226, 790, 850, ""),
    ("tenstorrent", "n150"): (0, 54, 54, 12, 12, 100, ""),
    ("tenstorrent", "n300"): (0, 54, 54, 12, 12, 100, ""),
}

# Simulated hardware faults of an NVIDIA GPU, in the fields nvidia-smi reports them in (hostcmd's
# NVIDIA_GPU_FIELDS). gpu_recovery_action takes the names NVML documents (nvmlGpuRecoveryAction_t:
# None, Reset, Reboot, ...; NVIDIA's "GPU memory error management" guide: an uncorrectable error's
# row remapping is pending until the GPU is reset).
FAULT_KINDS = {
    "ecc": "uncorrected volatile ECC errors, their page retirement (before Ampere) or row remapping "
           "(Ampere and newer) pending; recovery action Reset",
    "remap-failure": "a row remapping failed (Ampere and newer only)",
    "reboot": "recovery action Reboot (a fault that may have left the OS in an inconsistent state)",
}


def driver_dir(bin_dir: Path) -> Path:
    """The "driver" directory of the host whose stand-ins are in ``bin_dir``: its GPUs (``gpus``), the
    gpu-burn records (``holders/``) and the simulated faults (``faults/``)."""
    return Path(bin_dir).parent / "gpu-driver"


GPU_BURN = r"""#!/bin/sh
# gpufleet-lab-standin: gpu-burn for the gpufleet lab, written by gpufleet.lab.gputools.
# It burns no CPU: until it exits it registers, in the host's GPU driver directory, which GPUs it
# holds, at what percent and with how much memory; the lab's nvidia-smi and hl-smi report that.
# In a container it sees the /dev/nvidiaN nodes the container was given (numbered 0.. in order, as
# CUDA does); on a lab host (GPUFLEET_LAB_GPU_DRIVER set) every GPU of the host, by its index.
usage() {
    echo "usage: gpu-burn [--gpus 0,1] [--seconds S] [--percent P] [--memory MIB]"
    echo "  --gpus     the GPUs to hold (default: all it sees)"
    echo "  --seconds  end after S seconds (default: run until killed)"
    echo "  --percent  utilization to add to each GPU, 1-100 (default: 100)"
    echo "  --memory   MiB to hold on each GPU (default: 90% of its memory, as gpu_burn allocates)"
}
fail() { echo "gpu-burn: $1" >&2; exit "${2:-2}"; }
if [ "$1" != --gpufleet-lab-holder ]; then
    # run again with a token of its own in argv: the host-side tools find this process by it
    token="@HOLDER_PREFIX@$(cat /proc/sys/kernel/random/uuid)" || exit 1
    exec /bin/sh "$0" --gpufleet-lab-holder "$token" "$@"
fi
token=$2
shift 2
gpus=
seconds=
percent=100
memory=
while [ "$#" -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0;;
        --gpus=*|--seconds=*|--percent=*|--memory=*)
            opt=${1%%=*}; val=${1#*=}; shift; set -- "$opt" "$val" "$@"; continue;;
        --gpus|--seconds|--percent|--memory) [ "$#" -ge 2 ] || fail "$1 needs a value";;
        *) usage >&2; fail "unknown argument: $1";;
    esac
    case $1 in
        --gpus) gpus=$2;;
        --seconds) seconds=$2;;
        --percent) percent=$2;;
        --memory) memory=$2;;
    esac
    shift 2
done
case $gpus in *[!0-9,]*|,*|*,|*,,*) fail "--gpus takes GPU numbers separated by commas, not '$gpus'";; esac
case $seconds in *[!0-9]*|0) fail "--seconds takes a whole number of seconds, not '$seconds'";; esac
case $percent in ''|*[!0-9]*) fail "--percent takes a whole number from 1 to 100, not '$percent'";; esac
[ "$percent" -ge 1 ] && [ "$percent" -le 100 ] || fail "--percent takes a whole number from 1 to 100, not '$percent'"
case $memory in *[!0-9]*) fail "--memory takes MiB, not '$memory'";; esac

if [ -n "$GPUFLEET_LAB_GPU_DRIVER" ]; then
    driver=$GPUFLEET_LAB_GPU_DRIVER
    on_host=1
else
    driver=@CONTAINER_DRIVER_DIR@
    on_host=
fi
visible=
first=
if [ -r "$driver/gpus" ]; then
    while IFS='	' read -r vendor index uuid total rest; do
        case $vendor in ''|'#'*) continue;; esac
        if [ -n "$on_host" ]; then
            [ -n "$first" ] || first=$vendor
            [ "$vendor" = "$first" ] || continue
        else
            [ "$vendor" = nvidia ] && [ -e "/dev/nvidia$index" ] || continue
        fi
        visible="$visible$vendor $index $uuid $total
"
    done < "$driver/gpus"
fi
[ -n "$visible" ] || fail "no GPU found (no GPU device and no GPU driver here)" 1

pick() {  # the visible GPU numbered $1: on a host its index, in a container its position
    n=0
    while read -r vendor index uuid total; do
        [ -n "$vendor" ] || continue
        if [ -n "$on_host" ]; then key=$index; else key=$n; fi
        n=$((n + 1))
        if [ "$key" = "$1" ]; then echo "$vendor $index $uuid $total"; return 0; fi
    done <<EOF
$visible
EOF
    return 1
}
chosen=$visible
if [ -n "$gpus" ]; then
    chosen=
    for id in $(echo "$gpus" | tr , ' '); do
        line=$(pick "$id") || fail "no GPU $id here (it sees $(echo "$visible" | grep -c .) GPUs)"
        chosen="$chosen$line
"
    done
fi

record="$driver/holders/$token"
child=
finish() {
    rm -f "$record"
    [ -z "$child" ] || kill "$child" 2>/dev/null
    exit "$1"
}
trap 'finish 143' TERM
trap 'finish 130' INT
trap 'finish 129' HUP
body="pid $$
name $0
"
while read -r vendor index uuid total; do
    [ -n "$vendor" ] || continue
    mib=${memory:-$((total * 9 / 10))}
    body="${body}gpu $vendor $index $percent $mib
"
    echo "gpu-burn: holding GPU $index ($uuid) at $percent% with $mib MiB"
done <<EOF
$chosen
EOF
printf '%s' "$body" > "$driver/holders/.$token" && mv -f "$driver/holders/.$token" "$record" \
    || fail "cannot register with the GPU driver in $driver" 1
if [ -n "$seconds" ]; then
    echo "gpu-burn: for $seconds s"
    sleep "$seconds" &
    child=$!
    wait "$child"
    child=
else
    echo "gpu-burn: until killed"
    while :; do
        sleep 60 &
        child=$!
        wait "$child"
    done
fi
echo "gpu-burn: done"
finish 0
""".replace("@HOLDER_PREFIX@", HOLDER_PREFIX).replace("@CONTAINER_DRIVER_DIR@", CONTAINER_DRIVER_DIR)

# The stand-ins' dynamic answers: what the GPUs read now, from the host's driver directory. POSIX sh
# and awk, run on the lab host. Holders: the records in holders/ whose token a live process carries
# in its argv (found by one grep over /proc/*/cmdline); the host PID is the one whose innermost PID
# (NSpid, as gpu-burn saw its own $$) is the record's (a fork of gpu-burn carries its argv too).
LIVE_SH = r"""#!/bin/sh
# gpufleet-lab-standin: what the lab's GPUs read now, written by gpufleet.lab.gputools.
# usage: live.sh DRIVER_DIR nvidia-gpus|nvidia-gpus-basic|nvidia-apps|hlsmi-metrics
LC_ALL=C
export LC_ALL
driver=$1
live=
if [ -n "$(ls "$driver/holders" 2>/dev/null)" ]; then
    live=$(ls "$driver/holders" | grep -x '@HOLDER_PREFIX@[0-9a-f-]*' \
        | grep -a -o -F -f - /proc/[0-9]*/cmdline 2>/dev/null)
fi
printf '%s\n' "$live" | awk -v driver="$driver" -v report="$2" '
function value(path,   line, v) {  # the first line of a file, "" if none
    v = ""
    if ((getline line < path) > 0) v = line
    close(path)
    return v
}
function nspid(pid,   path, line, n, f) {  # the innermost PID of a host PID, "" if unknown
    path = "/proc/" pid "/status"
    n = ""
    while ((getline line < path) > 0)
        if (line ~ /^NSpid:/) { split(line, f, /[ \t]+/); n = f[length(f)] }
    close(path)
    return n
}
{
    i = index($0, ":")
    if (i == 0) next
    pid = substr($0, 1, i - 1)
    sub(/^\/proc\//, "", pid)
    sub(/\/cmdline$/, "", pid)
    tok = substr($0, i + 1)
    if (!(tok in cands)) { ntok++; toks[ntok] = tok }
    cands[tok] = cands[tok] " " pid
}
END {
    path = driver "/gpus"
    while ((getline line < path) > 0) {
        if (line == "" || line ~ /^#/) continue
        split(line, f, "\t")
        n++
        vend[n] = f[1]; idx[n] = f[2]; uuid[n] = f[3]; total[n] = f[4]; used[n] = f[5]
        t0[n] = f[6]; t1[n] = f[7]; p0[n] = f[8]; p1[n] = f[9]; pcap[n] = f[10]; health[n] = f[11]
        name[n] = f[12]; drv[n] = f[13]; util[n] = 0; napps[n] = 0
        slot[f[1] " " f[2]] = n
    }
    close(path)
    # holders in the order of their host PIDs
    for (k = 1; k <= ntok; k++) {
        tok = toks[k]
        rec = driver "/holders/" tok
        want = ""
        while ((getline line < rec) > 0) if (line ~ /^pid /) want = substr(line, 5)
        close(rec)
        split(substr(cands[tok], 2), ps, " ")
        hp = ""
        for (j in ps) {
            if (nspid(ps[j]) == want) { hp = ps[j]; break }
            if (hp == "" || ps[j] + 0 < hp + 0) hp = ps[j]
        }
        hpid[tok] = hp
    }
    for (a = 1; a <= ntok; a++) for (b = a + 1; b <= ntok; b++)
        if (hpid[toks[b]] + 0 < hpid[toks[a]] + 0) { t = toks[a]; toks[a] = toks[b]; toks[b] = t }
    for (k = 1; k <= ntok; k++) {
        tok = toks[k]
        rec = driver "/holders/" tok
        pname = ""
        while ((getline line < rec) > 0) {
            if (line ~ /^name /) pname = substr(line, 6)
            if (line !~ /^gpu /) continue
            split(line, g, " ")
            s = slot[g[2] " " g[3]]
            if (s == "") continue
            util[s] += g[4]
            give = g[5] + 0
            if (give > total[s] - used[s]) give = total[s] - used[s]
            used[s] += give
            napps[s]++
            app[s, napps[s]] = uuid[s] ", " hpid[tok] ", " give ", " pname
        }
        close(rec)
    }
    for (s = 1; s <= n; s++) {
        u = util[s] > 100 ? 100 : util[s]
        temp = int(t0[s] + (t1[s] - t0[s]) * u / 100 + 0.5)
        power = p0[s] + (p1[s] - p0[s]) * u / 100
        if (vend[s] == "nvidia" && report ~ /^nvidia-gpus/) {
            printf "%d, %s, %d, %d, %d, %d, %.2f", idx[s], uuid[s], u, used[s], total[s], temp, power
            if (report == "nvidia-gpus") {
                kind = value(driver "/faults/nvidia-" idx[s])
                ecc = kind == "ecc" ? 2 : 0
                retired = "[N/A]"; pending = "[N/A]"; failure = "[N/A]"
                if (health[s] == "retire") retired = kind == "ecc" ? "Yes" : "No"
                if (health[s] == "remap") {
                    pending = kind == "ecc" ? "Yes" : "No"
                    failure = kind == "remap-failure" ? "Yes" : "No"
                }
                action = kind == "ecc" ? "Reset" : kind == "reboot" ? "Reboot" : "None"
                printf ", %d, %s, %s, %s, %s", ecc, retired, pending, failure, action
            }
            printf "\n"
        } else if (vend[s] == "nvidia" && report == "nvidia-apps") {
            for (k = 1; k <= napps[s]; k++) print app[s, k]
        } else if (vend[s] == "intel" && report == "hlsmi-metrics") {
            printf "%d, %s, %s, %s, %d MiB, %d MiB, %d MiB, %d W, %d W, %d C, %d %%\n", idx[s], uuid[s], name[s], \
                drv[s], total[s], used[s], total[s] - used[s], power + 0.5, pcap[s], temp, u
        }
    }
}'
""".replace("@HOLDER_PREFIX@", HOLDER_PREFIX)

# the sampler's command lines (hostcmd) each stand-in answers from the live state, and with what report
LIVE_ANSWERS = {
    "nvidia": {hostcmd.NVIDIA_GPUS: "nvidia-gpus", hostcmd.NVIDIA_GPUS_BASIC: "nvidia-gpus-basic",
               hostcmd.NVIDIA_APPS: "nvidia-apps"},
    "intel": {hostcmd.HLSMI_METRICS: "hlsmi-metrics"},
}


def _gpus_table(gpus: list[_Gpu]) -> str:
    """The driver directory's ``gpus``: one tab-separated line per GPU, read by gpu-burn and live.sh."""
    lines = ["# vendor index uuid memory_mib idle_mib temp_idle temp_full power_idle power_full power_cap "
             "health name driver (written by gpufleet.lab.gputools)"]
    for g in gpus:
        idle, t0, t1, p0, p1, cap, health = LIVE[(g.vendor, g.model)]
        lines.append("\t".join(str(v) for v in (g.vendor, g.index, g.uuid or "-", g.info.memory_mib, idle, t0, t1,
                                                 f"{p0:.2f}", f"{p1:.2f}", cap, health or "-", g.name,
                                                 DRIVERS[g.vendor])))
    return "\n".join(lines) + "\n"


def _write_driver(bin_dir: Path, gpus: list[_Gpu]) -> Path:
    driver = driver_dir(bin_dir)
    for directory, mode in ((driver, 0o755), (driver / "holders", 0o777), (driver / "faults", 0o755)):
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, mode)  # holders: gpu-burn runs as any user, on the host and in containers
    (driver / "gpus").write_text(_gpus_table(gpus))
    os.chmod(driver / "gpus", 0o644)
    return driver


def gpus_of(bin_dir: Path) -> list[dict]:
    """The GPUs of the host whose stand-ins are in ``bin_dir`` (vendor, index, uuid, model health)."""
    rows = []
    for line in (driver_dir(bin_dir) / "gpus").read_text().splitlines():
        if line and not line.startswith("#"):
            f = line.split("\t")
            rows.append({"vendor": f[0], "index": int(f[1]), "uuid": None if f[2] == "-" else f[2],
                         "memory_mib": int(f[3]), "health": "" if f[10] == "-" else f[10], "name": f[11]})
    return rows


def set_fault(bin_dir: Path, index: int, kind: str | None, vendor: str = "nvidia") -> None:
    """Make GPU ``index`` of the host whose stand-ins are in ``bin_dir`` report the hardware fault
    ``kind`` (one of FAULT_KINDS), or none (``kind=None``)."""
    if vendor != "nvidia":
        raise ValueError(f"simulated faults are NVIDIA's (nvidia-smi's health fields), not {vendor}'s")
    gpu = next((g for g in gpus_of(bin_dir) if g["vendor"] == vendor and g["index"] == index), None)
    if gpu is None:
        raise ValueError(f"this host has no {vendor} GPU {index}")
    path = driver_dir(bin_dir) / "faults" / f"{vendor}-{index}"
    if kind is None:
        path.unlink(missing_ok=True)
        return
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r} (known: {', '.join(FAULT_KINDS)})")
    if kind == "remap-failure" and gpu["health"] != "remap":
        raise ValueError(f"GPU {index} ({gpu['name']}) does not remap rows (before Ampere): no remap-failure")
    tmp = path.with_name(f".{path.name}")
    tmp.write_text(kind + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)



# --------------------------------------------------------------------------- scripts

def _argv_test(args: tuple[str, ...]) -> str:
    return " && ".join([f'[ "$#" -eq {len(args)} ]']
                       + [f'[ "${{{i}}}" = {shlex.quote(a)} ]' for i, a in enumerate(args, 1)])


def _script(tool: str, data_dir: Path, answers: dict[tuple[str, ...], str],
            live: dict[tuple[str, ...], str] | None = None, driver: Path | None = None) -> str:
    message, rc = USAGE_ERRORS[tool]
    lines = ["#!/bin/sh",
             f"# {MARKER}: {tool} for a gpufleet lab host, written by gpufleet.lab.gputools.",
             "# It answers only the command lines below, with output in the real tool's format."]
    for args, filename in answers.items():
        lines.append(f"if {_argv_test(args)}; then exec cat {shlex.quote(str(data_dir / filename))}; fi")
    for args, report in (live or {}).items():  # what the GPUs read now
        lines.append(f"if {_argv_test(args)}; then exec /bin/sh {shlex.quote(str(data_dir / 'live.sh'))} "
                     f"{shlex.quote(str(driver))} {report}; fi")
    lines += [f'echo "{message}" >&2',
              'echo "(gpufleet lab stand-in: only the probe\'s and the sampler\'s command lines are answered)" >&2',
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
    driver = _write_driver(bin_dir, gpus)
    for path, text in ((data_dir / "live.sh", LIVE_SH), (bin_dir / "gpu-burn", GPU_BURN)):
        path.write_text(text)
        os.chmod(path, 0o755)
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
        script.write_text(_script(tool, data_dir, answers, LIVE_ANSWERS.get(vendor), driver))
        os.chmod(script, 0o755)
    return [g.truth() for g in sorted(gpus, key=lambda g: (VENDORS.index(g.vendor), g.index))]
