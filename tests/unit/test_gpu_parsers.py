"""The gpu_probe role's parsers (plugins/module_utils/gpufleet_gpus.py) on real recorded tool outputs, and
the gpufleet_probe module's runtime / host checks."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import gpu_tool_fixture

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins" / "module_utils"))

import gpufleet_gpus as g  # noqa: E402


def fixture(name: str) -> str:
    return gpu_tool_fixture(name)


def field_list(query: str) -> list[str]:
    return query.split(",")


# --------------------------------------------------------------------------- nvidia-smi --query-gpu

@pytest.mark.parametrize("name, model, memory, bus_id, driver", [
    ("nvidia-smi_query-gpu_1xH100_allfields_idle.csv", "H100", 81559, "0000:00:09.0", "590.48.01"),
    ("nvidia-smi_query-gpu_1xH100-MIG_allfields_idle.csv", "H100", 81559, "0000:00:09.0", "590.48.01"),
    ("nvidia-smi_query-gpu_1xH200_allfields_idle.csv", "H200", 143771, "0000:83:00.0", "590.48.01"),
    ("nvidia-smi_query-gpu_1xL40S_allfields_idle.csv", "L40S", 46068, "0000:01:00.0", "595.80"),
])
def test_nvidia_query_with_header_and_units(name, model, memory, bus_id, driver):
    # --format=csv (header, units): the header names the columns, whatever other fields there are
    gpus = g.parse_nvidia_query(fixture(name))
    assert gpus == [{"index": 0, "vendor": "nvidia", "name": gpus[0]["name"], "model": model, "memory_mib": memory,
                     "uuid": "GPU-00000000-0000-0000-0000-000000000000", "bus_id": bus_id, "numa_node": None}]
    assert g._csv_driver(fixture(name), g.NVIDIA_QUERY_FIELDS) == driver


def test_nvidia_query_noheader_four_l40s():
    gpus = g.parse_nvidia_query(fixture("nvidia-smi_query-gpu_4xL40S_noheader.csv"),
                                fields=("name", "driver_version", "memory.total", "compute_cap"))
    assert [x["index"] for x in gpus] == [0, 1, 2, 3]
    assert {(x["name"], x["model"], x["memory_mib"]) for x in gpus} == {("NVIDIA L40S", "L40S", 46068)}


def test_nvidia_query_p100_na_fields():
    gpus = g.parse_nvidia_query(fixture("nvidia-smi_query-gpu_1xP100_nounits.csv"))
    assert gpus[0]["name"] == "Tesla P100-PCIE-16GB" and gpus[0]["model"] == "P100"
    assert gpus[0]["uuid"] == "GPU-ef1b2c9b-38d8-2090-2bd1-f567a3eb42a6"
    assert gpus[0]["memory_mib"] is None and gpus[0]["bus_id"] is None


def test_nvidia_query_rtx3080_with_na_fields():
    text = fixture("nvidia-smi_query-gpu_RTX3080_NA-fields_noheader.csv")
    columns = len(text.split(","))
    fields = ["timestamp", "index", "name", "uuid", "memory.total"] + [f"f{i}" for i in range(columns - 5)]
    gpus = g.parse_nvidia_query(text, fields=fields)
    assert gpus[0]["model"] == "RTX3080" and gpus[0]["uuid"] == "GPU-8fe3a97d-51f6-a669-0d80-b4530b81b816"
    assert gpus[0]["memory_mib"] is None  # [N/A]


@pytest.mark.parametrize("name, fields", [
    ("nvidia-smi_query-gpu_GTX770_NotSupported_noheader.csv",
     "name,utilization.gpu,utilization.memory,temperature.gpu,power.draw,power.limit,fan.speed,pstate,"
     "clocks.current.graphics,clocks.current.memory,power.max_limit,power.default_limit"),
    ("nvidia-smi_query-gpu_fan-speed_NotSupported_16GPU-server_noheader-nounits.csv", "fan.speed"),
    ("nvidia-smi_query-gpu_newDriver_fan-NA_noheader-nounits.csv",
     "memory.total,memory.free,memory.used,temperature.gpu,fan.speed,utilization.gpu,utilization.memory"),
    ("nvidia-smi_query-gpu_oldDriver_fan-NotSupported_noheader-nounits.csv",
     "memory.total,memory.free,memory.used,temperature.gpu,fan.speed,utilization.gpu,utilization.memory"),
])
def test_nvidia_query_not_supported_values_do_not_crash(name, fields):
    gpus = g.parse_nvidia_query(fixture(name), fields=field_list(fields))
    assert len(gpus) == 1 and set(gpus[0]) == set(g.GPU_KEYS)


@pytest.mark.parametrize("marker", ["[N/A]", "[Not Supported]", "N/A", "[Requested functionality has been deprecated]"])
@pytest.mark.parametrize("column", range(6))
def test_nvidia_query_missing_marker_in_any_field(marker, column):
    cells = ["3", "GPU-b42dd28e-ffdd-8720-1df0-98bd8cdc05b1", "NVIDIA H100 80GB HBM3", "81559", "00000000:18:00.0",
             "565.57.01"]
    cells[column] = marker
    [gpu] = g.parse_nvidia_query(", ".join(cells) + "\n")
    key = ["index", "uuid", "name", "memory_mib", "bus_id", None][column]
    if key == "index":
        assert gpu["index"] == 0  # its position
    elif key:
        assert gpu[key] is None
    if key == "name":
        assert gpu["model"] is None


def test_nvidia_query_wrong_column_count_is_an_error():
    with pytest.raises(ValueError):
        g.parse_nvidia_query("0, NVIDIA H100 80GB HBM3\n")


def test_fleet_names_all_normalize():
    """Every GPU name of a real fleet (pdsh over a cluster) gets a short model without spaces."""
    names = {}
    for line in fixture("nvidia-smi_query-gpu_fleet-pdsh_name-memtotal_noheader.txt").splitlines():
        if ": " not in line:
            continue
        host, rest = line.split(": ", 1)
        name, memory = rest.rsplit(", ", 1)
        model = g.normalize_model("nvidia", name)
        assert model and " " not in model, name
        names[name] = model
    assert names["NVIDIA H200"] == "H200"
    assert names["NVIDIA H100 80GB HBM3"] == "H100"
    assert names["NVIDIA A100-SXM4-80GB"] == "A100"
    assert names["NVIDIA A100 80GB PCIe"] == "A100"
    assert names["NVIDIA L40S"] == "L40S"
    assert names["Tesla K80"] == "K80"


# --------------------------------------------------------------------------- nvidia-smi topo -m

@pytest.mark.parametrize("name, expected", [
    ("nvidia-smi_topo-m_8xH200-NVSwitch_10NIC.txt", {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1, 7: 1}),
    ("nvidia-smi_topo-m_8xRTX4090-PCIe.txt", {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1, 7: 1}),
    ("nvidia-smi_topo-m_1xH100-VM.txt", {0: 0}),
    ("nvidia-smi_topo-m_1xL40S.txt", {0: 0}),
])
def test_nvidia_topo_numa(name, expected):
    assert g.parse_nvidia_topo(fixture(name)) == expected


def test_nvidia_topo_na_numa_is_none():
    text = fixture("nvidia-smi_topo-m_1xL40S.txt").replace("0-7\t0\t", "0-7\tN/A\t")
    assert g.parse_nvidia_topo(text) == {0: None}


# --------------------------------------------------------------------------- models

@pytest.mark.parametrize("vendor, raw, model", [
    ("nvidia", "NVIDIA H100 80GB HBM3", "H100"),
    ("nvidia", "NVIDIA H100 NVL", "H100NVL"),
    ("nvidia", "NVIDIA A100-SXM4-80GB", "A100"),
    ("nvidia", "NVIDIA L40S", "L40S"),
    ("nvidia", "NVIDIA RTX 6000 Ada Generation", "RTX6000Ada"),
    ("nvidia", "Tesla T4", "T4"),
    ("nvidia", "NVIDIA H200", "H200"),
    ("nvidia", "NVIDIA GH200 480GB", "GH200"),
    ("nvidia", "NVIDIA A100 80GB PCIe", "A100"),
    ("nvidia", "Tesla V100S-PCIE-32GB", "V100S"),
    ("nvidia", "NVIDIA GeForce RTX 2080 Ti", "RTX2080Ti"),
    ("nvidia", "NVIDIA RTX A6000", "RTXA6000"),
    ("nvidia", "NVIDIA A10G", "A10G"),
    ("amd", "AMD Instinct MI300X", "MI300X"),
    ("amd", "AMD Instinct MI300X OAM", "MI300X"),
    ("amd", "AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2", "MI200"),
    ("amd", "Radeon RX 7900 XT", "RX7900XT"),
    ("intel", "HL-225", "Gaudi2"),
    ("intel", "HL-325L", "Gaudi3"),
    ("intel", "HL-205", "Gaudi"),
    ("tenstorrent", "n150 L", "n150"),
    ("tenstorrent", "n300 R", "n300"),
    ("tenstorrent", "p150a", "p150a"),
    ("tenstorrent", "tt-galaxy-wh L", "galaxy-wh"),
    ("nvidia", None, None),
    ("nvidia", "[N/A]", None),
])
def test_normalize_model(vendor, raw, model):
    assert g.normalize_model(vendor, raw) == model


def test_models_in_real_query_outputs():
    # the full product names that `nvidia-smi -q` prints
    q = "".join(fixture(f"nvidia-smi_q_{n}.txt") for n in ("8xH100-SXM", "4xA100-SXM", "1xGH200"))
    names = {line.split(":", 1)[1].strip() for line in q.splitlines() if line.strip().startswith("Product Name")}
    assert {g.normalize_model("nvidia", n) for n in names} == {"H100", "A100", "GH200"}


# --------------------------------------------------------------------------- amd-smi static --json

MI300X_BUSES = ["0000:1b:00.0", "0000:3d:00.0", "0000:4e:00.0", "0000:5f:00.0",
                "0000:9d:00.0", "0000:bd:00.0", "0000:cd:00.0", "0000:dd:00.0"]


def test_amd_static_rocm7_root():
    text = fixture("amd-smi_static_json_8xMI300X_rocm7.2.1_root.json")
    gpus = g.parse_amd_static(text)
    assert [x["index"] for x in gpus] == list(range(8))
    assert {(x["vendor"], x["name"], x["model"], x["memory_mib"]) for x in gpus} == {
        ("amd", "AMD Instinct MI300X", "MI300X", 196592)}
    assert [x["bus_id"] for x in gpus] == MI300X_BUSES
    assert [x["numa_node"] for x in gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert gpus[0]["uuid"] == "0x28246CE5673B4AA0"
    assert len({x["uuid"] for x in gpus}) == 8
    assert g._collect_amd([text])[1:] == ("6.16.13", [])


def test_amd_static_nonroot_banner():
    text = fixture("amd-smi_static_json_8xMI300X_rocm7.2.1_nonroot-with-banner.txt")
    assert text.startswith("Permission needed")
    gpus = g.parse_amd_static(text)
    assert len(gpus) == 8
    assert {(x["name"], x["model"], x["memory_mib"], x["uuid"]) for x in gpus} == {
        ("AMD Instinct MI300X OAM", "MI300X", None, None)}  # market name N/A: the board's product name
    assert [x["bus_id"] for x in gpus] == MI300X_BUSES
    assert [x["numa_node"] for x in gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    gpus_, driver, problems = g._collect_amd([text])
    assert driver is None
    assert len(problems) == 1 and "render" in problems[0]["fix"] and "Permission" in problems[0]["reason"]


def test_amd_static_rocm6_flat_list():
    # No full ROCm 6 capture exists: the ROCm 6 shape is a bare list of the same per-GPU entries
    # (jq '.[0]["vram"]' in AMD's blog), whose vram entry is the recorded fragment.
    entries = json.loads(fixture("amd-smi_static_json_8xMI300X_rocm7.2.1_root.json"))["gpu_data"]
    fragment = json.loads(fixture("amd-smi_static_json_jq-vram-fragment_MI300X_rocm6-list-shape.json"))
    for entry in entries:
        entry["vram"] = fragment
    gpus = g.parse_amd_static(json.dumps(entries, indent=2))
    assert gpus == g.parse_amd_static(fixture("amd-smi_static_json_8xMI300X_rocm7.2.1_root.json"))
    assert gpus[0]["memory_mib"] == 196592


def test_amd_static_string_sizes():
    text = json.dumps([{"gpu": 0, "asic": {"market_name": "AMD Instinct MI210", "asic_serial": "N/A"},
                        "bus": {"bdf": "0000:C1:00.0"}, "vram": {"size": "65520 MB"}, "numa": {"node": -1}}])
    assert g.parse_amd_static(text) == [{"index": 0, "vendor": "amd", "name": "AMD Instinct MI210", "model": "MI210",
                                         "memory_mib": 65520, "uuid": None, "bus_id": "0000:c1:00.0",
                                         "numa_node": None}]


# --------------------------------------------------------------------------- hl-smi

GAUDI3_UUIDS = ["01P4-HL3090A0-18-UAN071-12-03-01", "01P4-HL3090A0-18-UAN071-05-08-05"]


def test_hlsmi_query_8x_gaudi3_with_header():
    text = fixture("hl-smi_query_8xGaudi3_HL-325L.csv")
    gpus = g.parse_hlsmi_query(text)
    assert [x["index"] for x in gpus] == list(range(8))
    assert {(x["vendor"], x["name"], x["model"], x["memory_mib"], x["numa_node"]) for x in gpus} == {
        ("intel", "HL-325L", "Gaudi3", 131072, None)}
    assert [x["uuid"] for x in gpus[:2]] == GAUDI3_UUIDS
    assert [x["bus_id"] for x in gpus[:3]] == ["0000:3b:00.0", "0000:4c:00.0", "0000:5d:00.0"]
    assert g._csv_driver(text, g.HLSMI_QUERY_FIELDS) == "1.24.1-b336d5e"


def test_hlsmi_query_noheader_other_fields():
    fields = field_list("index,uuid,name,driver_version,memory.total,memory.used,memory.free,power.draw,power.max,"
                        "temperature.aip,utilization.aip")
    gpus = g.parse_hlsmi_query(fixture("hl-smi_query_2xGaudi3_HL-325L_allsmi-excerpt.csv"), fields=fields)
    assert [(x["index"], x["model"], x["memory_mib"], x["bus_id"]) for x in gpus] == [
        (0, "Gaudi3", 131072, None), (1, "Gaudi3", 131072, None)]


def test_hlsmi_numa_from_sysfs(tmp_path):
    # the probe's own columns, with the recorded values of the first two Gaudi3s
    records = g._query_records(fixture("hl-smi_query_8xGaudi3_HL-325L.csv"), g.HLSMI_QUERY_FIELDS)
    text = "".join(", ".join(r[f] for f in g.HLSMI_QUERY_FIELDS) + "\n" for r in records[:2])
    for bus_id, node in [("0000:3b:00.0", "1\n"), ("0000:4c:00.0", "-1\n")]:
        (tmp_path / bus_id).mkdir()
        (tmp_path / bus_id / "numa_node").write_text(node)
    result = g.probe_gpus(fake_run({"hl-smi": (0, text, "")}), fake_which("hl-smi"),
                          pci_numa=lambda bus: g.sysfs_numa_node(bus, str(tmp_path)))
    assert [x["numa_node"] for x in result["gpus"]] == [1, None]
    assert g.sysfs_numa_node("0000:ff:00.0", str(tmp_path)) is None


# --------------------------------------------------------------------------- tt-smi -s

@pytest.mark.parametrize("name, count, model, memory, first_bus, driver", [
    ("tt-smi_s_n150.json", 1, "n150", 12288, "0000:01:00.0", "1.33"),
    ("tt-smi_s_QuietBox_4xn300.json", 8, "n300", 12288, "0000:c1:00.0", "1.34"),
    ("tt-smi_s_Galaxy-Wormhole_32chip.json", 32, "galaxy-wh", 12288, "0000:c1:00.0", "2.3.0"),
    ("tt-smi_s_Galaxy-Blackhole_32chip.json", 32, "galaxy-bh", 32768, "0000:01:00.0", "2.8.0"),
])
def test_ttsmi_snapshot(name, count, model, memory, first_bus, driver):
    text = fixture(name)
    gpus = g.parse_ttsmi_snapshot(text)
    assert len(gpus) == count
    assert [x["index"] for x in gpus] == list(range(count))
    assert {(x["vendor"], x["model"], x["memory_mib"], x["uuid"]) for x in gpus} == {
        ("tenstorrent", model, memory, None)}
    assert gpus[0]["bus_id"] == first_bus
    assert g._collect_tenstorrent([text])[1] == driver


def test_ttsmi_quietbox_l_and_r_chips():
    gpus = g.parse_ttsmi_snapshot(fixture("tt-smi_s_QuietBox_4xn300.json"))
    assert [x["name"] for x in gpus] == ["n300 L"] * 4 + ["n300 R"] * 4
    assert [x["bus_id"] is None for x in gpus] == [False] * 4 + [True] * 4  # R chips: bus_id "N/A"


# --------------------------------------------------------------------------- probe_gpus

def fake_which(*tools):
    return lambda name: f"/usr/bin/{name}" if name in tools else None


def fake_run(answers):
    """answers: {"tool" or "tool arg...": (rc, stdout, stderr)}; the longest matching key wins."""
    calls = []

    def run(argv):
        calls.append(argv)
        line = " ".join([Path(argv[0]).name] + argv[1:])
        for key in sorted(answers, key=len, reverse=True):
            if line.startswith(key):
                return answers[key]
        return 127, "", f"{argv[0]}: not expected in this test"

    run.calls = calls
    return run


def nvidia_query_line(csv_name: str) -> str:
    """The probe's --query-gpu line for a recorded all-fields CSV (same values, nounits)."""
    [gpu] = g._query_records(fixture(csv_name), g.NVIDIA_QUERY_FIELDS)
    return ", ".join(gpu[f].replace(" MiB", "") for f in g.NVIDIA_QUERY_FIELDS) + "\n"


def test_probe_no_tools_is_a_cpu_host():
    assert g.probe_gpus(fake_run({}), fake_which()) == {"gpus": [], "drivers": {}, "problems": []}


def test_probe_mixed_nvidia_and_amd_reports_every_gpu():
    run = fake_run({
        "nvidia-smi --query-gpu": (0, nvidia_query_line("nvidia-smi_query-gpu_1xH100_allfields_idle.csv")
                                   + nvidia_query_line("nvidia-smi_query-gpu_1xL40S_allfields_idle.csv")
                                   .replace("0, ", "1, ", 1), ""),
        "nvidia-smi topo -m": (0, fixture("nvidia-smi_topo-m_8xH200-NVSwitch_10NIC.txt"), ""),
        "amd-smi static --json": (0, fixture("amd-smi_static_json_8xMI300X_rocm7.2.1_root.json"), ""),
    })
    result = g.probe_gpus(run, fake_which("nvidia-smi", "amd-smi"), pci_numa=lambda bus: None)
    assert [(x["vendor"], x["index"], x["model"]) for x in result["gpus"]] == (
        [("nvidia", 0, "H100"), ("nvidia", 1, "L40S")] + [("amd", i, "MI300X") for i in range(8)])
    assert [x["numa_node"] for x in result["gpus"][:2]] == [0, 0]
    assert result["drivers"] == {"nvidia": "590.48.01", "amd": "6.16.13"}
    assert result["problems"] == []
    assert all(tuple(x) == g.GPU_KEYS for x in result["gpus"])
    # the tools are run by the path `which` found, with the probe's arguments
    assert run.calls[0] == ["/usr/bin/nvidia-smi"] + g.PROBE_COMMANDS["nvidia"][1][0][1:]


def test_probe_failing_tool_is_a_problem():
    message = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
               "Make sure that the latest NVIDIA driver is installed and running.\n")
    result = g.probe_gpus(fake_run({"nvidia-smi": (9, message, "")}), fake_which("nvidia-smi"))
    assert result["gpus"] == []
    [p] = result["problems"]
    assert "nvidia-smi" in p["reason"] and "couldn't communicate" in p["reason"] and "exit 9" in p["reason"]
    assert "driver" in p["fix"]


def test_probe_topo_failure_keeps_gpus():
    query = nvidia_query_line("nvidia-smi_query-gpu_1xH200_allfields_idle.csv")
    run = fake_run({"nvidia-smi --query-gpu": (0, query, ""), "nvidia-smi topo": (3, "", "topology not supported\n")})
    result = g.probe_gpus(run, fake_which("nvidia-smi"), pci_numa=lambda bus: 1 if bus == "0000:83:00.0" else None)
    assert [(x["model"], x["memory_mib"], x["numa_node"]) for x in result["gpus"]] == [("H200", 143771, 1)]
    assert len(result["problems"]) == 1 and "topo" in result["problems"][0]["reason"]


@pytest.mark.parametrize("output", ["", "garbage that is not csv, at all\n", "{not json"])
def test_probe_unparseable_output_is_a_problem(output):
    run = fake_run({"amd-smi": (0, output, ""), "nvidia-smi": (0, output, ""), "tt-smi": (0, output, "")})
    result = g.probe_gpus(run, fake_which("amd-smi", "nvidia-smi", "tt-smi"))
    assert result["gpus"] == []
    assert {p["what"] for p in result["problems"]} == {"amd GPUs", "nvidia GPUs", "tenstorrent GPUs"}


def test_probe_tool_that_cannot_start():
    def run(argv):
        raise OSError(8, "Exec format error")

    result = g.probe_gpus(run, fake_which("hl-smi"))
    assert result["gpus"] == [] and "Exec format error" in result["problems"][0]["reason"]


def test_probe_amd_permission_banner_is_reported_with_the_gpus():
    text = fixture("amd-smi_static_json_8xMI300X_rocm7.2.1_nonroot-with-banner.txt")
    result = g.probe_gpus(fake_run({"amd-smi": (0, text, "")}), fake_which("amd-smi"), pci_numa=lambda b: None)
    assert len(result["gpus"]) == 8 and len(result["problems"]) == 1


# --------------------------------------------------------------------------- the module

@pytest.fixture(scope="module")
def module():
    pytest.importorskip("ansible")
    sys.modules.setdefault("ansible.module_utils.gpufleet_gpus", g)
    path = ROOT / "plugins" / "modules" / "gpufleet_probe.py"
    spec = importlib.util.spec_from_file_location("gpufleet_probe_module", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PODMAN_INFO = json.dumps({"host": {"arch": "amd64"}, "store": {"graphRoot": "/var/lib/containers/storage"},
                          "version": {"Version": "4.3.1"}})
DOCKER_INFO = json.dumps({"ServerVersion": "28.2.2", "DockerRootDir": "/var/lib/docker",
                          "Runtimes": {"runc": {"path": "runc"}}})
# what `docker info --format '{{json .}}'` prints (exit 1) when its daemon is not running
DOCKER_NO_DAEMON = json.dumps({"ID": "", "ServerVersion": "", "DockerRootDir": "",
                               "ClientInfo": {"Version": "28.2.2"}})


def test_parse_runtime_info(module):
    assert module.parse_runtime_info("podman", PODMAN_INFO)[:2] == ("4.3.1", "/var/lib/containers/storage")
    assert module.parse_runtime_info("docker", DOCKER_INFO)[:2] == ("28.2.2", "/var/lib/docker")
    assert module.parse_runtime_info("docker", DOCKER_NO_DAEMON) is None
    assert module.parse_runtime_info("docker", json.dumps({"ServerErrors": ["permission denied"]})) is None
    assert module.parse_runtime_info("podman", "not json") is None


def test_runtime_usable_directly(module):
    run = fake_run({"podman info": (0, PODMAN_INFO, "")})
    runtime, info, problems = module.detect_runtime(run, fake_which("podman", "sudo"), ["podman", "docker"],
                                                    "ubuntu", False)
    assert runtime == {"name": "podman", "version": "4.3.1", "usable": True, "via_sudo": False,
                       "root": "/var/lib/containers/storage"}
    assert problems == []


def test_runtime_through_sudo(module):
    run = fake_run({"docker info": (1, DOCKER_NO_DAEMON, "permission denied while trying to connect to the "
                                    "Docker daemon socket at unix:///var/run/docker.sock"),
                    "sudo -n": (0, DOCKER_INFO, "")})
    runtime, info, problems = module.detect_runtime(run, fake_which("docker", "sudo"), ["podman", "docker"],
                                                    "ubuntu", False)
    assert (runtime["name"], runtime["usable"], runtime["via_sudo"], runtime["root"]) == (
        "docker", True, True, "/var/lib/docker")
    assert run.calls[-1] == ["/usr/bin/sudo", "-n", "/usr/bin/docker", "info", "--format", "{{json .}}"]


def test_runtime_without_passwordless_sudo_has_a_human_reason(module):
    run = fake_run({"docker info": (1, "", "permission denied while trying to connect to the Docker daemon socket"),
                    "docker --version": (0, "Docker version 28.2.2, build e6534b4\n", ""),
                    "sudo -n": (1, "", "sudo: a password is required\n")})
    runtime, info, problems = module.detect_runtime(run, fake_which("docker", "sudo"), ["podman", "docker"],
                                                    "ubuntu", False)
    assert runtime == {"name": "docker", "version": "28.2.2", "usable": False, "via_sudo": False, "root": None}
    [p] = problems
    assert p["reason"].startswith("user ubuntu cannot run docker and has no passwordless sudo")
    assert "docker group" in p["fix"] and "NOPASSWD" in p["fix"]


@pytest.mark.parametrize("user, is_root", [("root", True), ("ubuntu", False)])
def test_runtime_docker_daemon_down(module, user, is_root):
    no_daemon = "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?\n"
    run = fake_run({"docker info": (1, DOCKER_NO_DAEMON, no_daemon),
                    "docker --version": (0, "Docker version 28.2.2, build e6534b4\n", ""),
                    "sudo -n": (1, "", "sudo: a password is required\n")})
    runtime, info, problems = module.detect_runtime(run, fake_which("docker", "sudo"), ["docker"], user, is_root)
    assert runtime["usable"] is False and runtime["version"] == "28.2.2"
    assert "daemon is not running" in problems[0]["reason"] and "systemctl" in problems[0]["fix"]


def test_no_runtime(module):
    runtime, info, problems = module.detect_runtime(fake_run({}), fake_which(), ["podman", "docker"], "ubuntu", False)
    assert runtime["name"] is None and runtime["usable"] is False
    assert problems[0]["reason"].startswith("no container runtime")
    assert "install podman or docker" in problems[0]["fix"]


def test_gpu_support(module, tmp_path):
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    podman = {"name": "podman"}
    support, problems = module.gpu_support({"nvidia"}, podman, None, fake_which(), cdi_dirs=[str(cdi)])
    assert support == {"nvidia": None} and "nvidia-ctk cdi generate" in problems[0]["fix"]
    support, problems = module.gpu_support({"nvidia"}, podman, None, fake_which("nvidia-ctk"), cdi_dirs=[str(cdi)])
    assert support == {"nvidia": "nvidia-container-toolkit"} and "CDI" in problems[0]["reason"]
    (cdi / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices: []\n")
    support, problems = module.gpu_support({"nvidia"}, podman, None, fake_which(), cdi_dirs=[str(cdi)])
    assert support == {"nvidia": "cdi"} and problems == []
    support, problems = module.gpu_support({"amd", "intel", "tenstorrent"}, podman, None, fake_which(),
                                           exists=lambda path: path == "/dev/kfd", cdi_dirs=[str(cdi)])
    assert support == {"amd": True, "intel": False, "tenstorrent": False}
    assert {p["what"] for p in problems} == {"intel GPUs", "tenstorrent GPUs"}
    assert module.gpu_support(set(), podman, None, fake_which())[0] == {}


def test_host_facts(module, tmp_path):
    for node, cpus in [("node0", "0-63,128-191"), ("node1", "64-127,192-255")]:
        (tmp_path / node).mkdir()
        (tmp_path / node / "cpulist").write_text(cpus + "\n")
    assert module.cpu_facts(str(tmp_path))["numa_nodes"] == {"0": "0-63,128-191", "1": "64-127,192-255"}
    assert module.cpu_facts(str(tmp_path / "absent"))["numa_nodes"] == {}
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684220 kB\nMemFree:         1000 kB\n")
    assert module.memory_mib(str(meminfo)) == 24105
    disk = module.disk_facts(str(tmp_path / "no" / "such" / "dir"))
    assert disk["path"] == str(tmp_path) and disk["total_mib"] > 0


def test_cpu_arch_in_dstacks_names(module):
    assert [module.cpu_arch(m) for m in ("x86_64", "AMD64", "aarch64", "arm64", "ppc64le", "")] == \
        ["x86", "x86", "arm", "arm", "ppc64le", None]
    assert module.cpu_facts("/nonexistent")["arch"] == module.cpu_arch(os.uname().machine)


MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
30 22 253:1 / /var/lib/containers rw,relatime shared:2 - xfs /dev/vdb rw,attr2,inode64,prjquota
31 22 253:2 / /srv/plain rw,relatime shared:3 - xfs /dev/vdc rw,attr2,inode64,noquota
"""


@pytest.mark.parametrize("name,info,root,expected", [
    ("podman", {"store": {"graphDriverName": "overlay", "graphStatus": {"Backing Filesystem": "extfs"}}},
     "/var/lib/other", ("overlay", "ext4", False, "overlay on ext4")),
    ("podman", {"store": {"graphDriverName": "overlay", "graphStatus": {"Backing Filesystem": "xfs"}}},
     "/var/lib/containers/storage", ("overlay", "xfs", True, None)),
    ("podman", {"store": {"graphDriverName": "overlay", "graphStatus": {"Backing Filesystem": "xfs"}}},
     "/srv/plain/storage", ("overlay", "xfs", False, "overlay on xfs without project quotas")),
    ("podman", {"store": {"graphDriverName": "vfs", "graphStatus": {}}}, "/var/lib/containers/storage",
     ("vfs", "xfs", False, "vfs on xfs without project quotas")),
    ("docker", {"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", "xfs"]]}, "/var/lib/containers/d",
     ("overlay2", "xfs", True, None)),
    ("docker", None, None, (None, None, False, "unknown storage on an unknown file system")),
])
def test_storage_facts(module, tmp_path, name, info, root, expected):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    got = module.storage_facts(name, info, root, str(mountinfo))
    assert (got["driver"], got["backing_fs"], got["size_limit"], got["why_not"]) == expected


# what `sudo -n podman --log-level=debug version --format {{.Client.Version}}` wrote on a lab node (podman 4.3.1)
PODMAN_QUICK_ERR = """\
time="2026-12-03T22:13:53Z" level=debug msg="Called version.PersistentPreRunE(podman --log-level=debug version)"
time="2026-12-03T22:13:53Z" level=debug msg="Using graph driver overlay"
time="2026-12-03T22:13:53Z" level=debug msg="Using graph root /var/lib/containers/storage"
time="2026-12-03T22:13:53Z" level=debug msg="backingFs=xfs, projectQuotaSupported=true, useNativeDiff=true"
"""


def test_podman_quick_check_gives_the_facts_without_podman_info(module):
    run = fake_run({"podman --log-level=debug version": (1, "", 'time="x" level=debug msg="Using graph driver "\n'
                                                               "Error: creating runtime static files directory: "
                                                               "permission denied\n"),
                    "sudo -n /usr/bin/podman --log-level=debug version": (0, "4.3.1\n", PODMAN_QUICK_ERR)})
    runtime, info, problems = module.detect_runtime(run, fake_which("podman", "sudo"), ["podman"], "ubuntu", False)
    assert runtime == {"name": "podman", "version": "4.3.1", "usable": True, "via_sudo": True,
                       "root": "/var/lib/containers/storage"}
    assert problems == [] and not any("info" in argv for argv in run.calls), run.calls
    assert info["store"]["graphDriverName"] == "overlay"
    assert info["store"]["graphStatus"] == {"Backing Filesystem": "xfs"}
    # the terminal form of podman's log gives the same
    terminal = "DEBU[0000] Using graph driver vfs\nDEBU[0000] Using graph root /srv/c s\n"
    assert module.parse_podman_quick("5.2.0\n", terminal)[:2] == ("5.2.0", "/srv/c s")


def test_podman_quick_check_failing_is_reported_without_its_debug_lines(module):
    err = PODMAN_QUICK_ERR + "Error: no valid executable found for OCI runtime crun: invalid argument\n"
    run = fake_run({"podman --log-level=debug version": (125, "", err),
                    "sudo -n /usr/bin/podman --log-level=debug version": (125, "", err),
                    "podman --version": (0, "podman version 4.3.1\n", "")})
    runtime, info, problems = module.detect_runtime(run, fake_which("podman", "sudo"), ["podman"], "ubuntu", False)
    assert runtime["usable"] is False and runtime["version"] == "4.3.1"
    [p] = problems
    assert "no valid executable found for OCI runtime" in p["reason"] and "level=debug" not in p["reason"]
    assert not any("info" in argv for argv in run.calls), run.calls


def test_podman_quick_check_that_tells_too_little_falls_back_to_podman_info(module):
    run = fake_run({"podman --log-level=debug version": (0, "4.3.1\n", "no debug lines from this podman\n"),
                    "podman info": (0, PODMAN_INFO, "")})
    runtime, info, problems = module.detect_runtime(run, fake_which("podman"), ["podman"], "ubuntu", False)
    assert (runtime["usable"], runtime["root"]) == (True, "/var/lib/containers/storage")
    assert run.calls[-1] == ["/usr/bin/podman", "info", "--format", "json"]
