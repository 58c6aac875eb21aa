"""The lab's stand-in GPU tools (gpufleet/lab/gputools.py): run the generated scripts, parse what
they print with the probe's parsers, and compare with the ground truth they were written from."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import gpu_tool_fixture, tool

from gpufleet.lab.gputools import CATALOGUE, DRIVERS, TOOLS, TOPO_LEGEND, GpuSpec, write_standins

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins" / "module_utils"))

import gpufleet_gpus as g  # noqa: E402

PARSERS = {"nvidia": g.parse_nvidia_query, "amd": g.parse_amd_static, "intel": g.parse_hlsmi_query,
           "tenstorrent": g.parse_ttsmi_snapshot}
ALL_MODELS = [(vendor, model) for vendor, models in CATALOGUE.items() for model in models]


def fixture(name: str) -> str:
    return gpu_tool_fixture(name)


class Host:
    """A bin dir of stand-ins and a way to run them as the probe would."""

    def __init__(self, tmp_path: Path, specs: list[GpuSpec], host_index: int = 1, **kw):
        self.bin = tmp_path / f"host{host_index}" / "bin"
        self.truth = write_standins(self.bin, specs, host_index=host_index, **kw)
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(self, argv: list[str]) -> tuple[int, str, str]:
        p = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=30)
        return p.returncode, p.stdout, p.stderr

    def which(self, name: str) -> str | None:
        found = shutil.which(name, path=str(self.bin))  # only the stand-ins, never a real tool of this machine
        return found

    def output(self, vendor: str, number: int = 0) -> str:
        rc, out, err = self.run(g.PROBE_COMMANDS[vendor][1][number])
        assert rc == 0, err
        return out

    def probe(self) -> dict:
        return g.probe_gpus(self.run, self.which, pci_numa=lambda bus_id: None)


# --------------------------------------------------------------------------- ground truth

@pytest.mark.parametrize("vendor, model", ALL_MODELS)
def test_eight_gpus_parse_back_to_the_ground_truth(tmp_path, vendor, model):
    host = Host(tmp_path, [GpuSpec(vendor, model, 8)])
    assert len(host.truth) == 8
    assert [x["index"] for x in host.truth] == list(range(8))
    assert {(x["vendor"], x["model"], x["name"]) == (vendor, model, x["name"]) for x in host.truth} == {True}
    parsed = PARSERS[vendor](host.output(vendor))
    if vendor == "nvidia":
        numa = g.parse_nvidia_topo(host.output(vendor, 1))
        for gpu in parsed:
            gpu["numa_node"] = numa[gpu["index"]]
    assert parsed == host.truth
    assert host.probe() == {"gpus": host.truth, "drivers": {vendor: DRIVERS[vendor]}, "problems": []}


@pytest.mark.parametrize("vendor, model", [("nvidia", "H100"), ("amd", "MI300X")])
def test_numa_split_in_order(tmp_path, vendor, model):
    host = Host(tmp_path, [GpuSpec(vendor, model, 8)])
    assert [x["numa_node"] for x in host.truth] == [0, 0, 0, 0, 1, 1, 1, 1]
    host4 = Host(tmp_path, [GpuSpec(vendor, model, 8)], host_index=2, numa_nodes=4)
    assert [x["numa_node"] for x in host4.truth] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [x["numa_node"] for x in host4.probe()["gpus"]] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_mixed_h100_l40s_host(tmp_path):
    host = Host(tmp_path, [GpuSpec("nvidia", "H100", 4), GpuSpec("nvidia", "L40S", 4)])
    result = host.probe()
    assert result["gpus"] == host.truth
    assert [x["model"] for x in result["gpus"]] == ["H100"] * 4 + ["L40S"] * 4
    assert [x["memory_mib"] for x in result["gpus"]] == [81559] * 4 + [46068] * 4
    topo = host.output("nvidia", 1)
    row0 = [line for line in topo.splitlines() if line.startswith("GPU0\t")][0].split("\t")
    assert row0[1:9] == [" X ", "NV18", "NV18", "NV18", "SYS", "SYS", "SYS", "SYS"]  # L40S on the other node


def test_every_vendor_on_one_host(tmp_path):
    specs = [GpuSpec("tenstorrent", "n150", 1), GpuSpec("amd", "MI300X", 2), GpuSpec("nvidia", "A100", 2),
             GpuSpec("intel", "Gaudi2", 2), GpuSpec("nvidia", "L40S", 1)]
    host = Host(tmp_path, specs)
    result = host.probe()
    assert result["gpus"] == host.truth
    assert [(x["vendor"], x["index"]) for x in result["gpus"]] == [
        ("nvidia", 0), ("nvidia", 1), ("nvidia", 2), ("amd", 0), ("amd", 1), ("intel", 0), ("intel", 1),
        ("tenstorrent", 0)]
    assert result["drivers"] == DRIVERS and result["problems"] == []
    assert len({x["bus_id"] for x in result["gpus"]}) == 8


def test_n300_boards_have_l_and_r_chips(tmp_path):
    host = Host(tmp_path, [GpuSpec("tenstorrent", "n300", 8)])
    assert [x["name"] for x in host.truth] == ["n300 L"] * 4 + ["n300 R"] * 4
    devices = json.loads(host.output("tenstorrent"))["device_info"]
    assert [d["board_info"]["board_id"] for d in devices[:4]] == [d["board_info"]["board_id"] for d in devices[4:]]
    odd = Host(tmp_path, [GpuSpec("tenstorrent", "n300", 3)], host_index=2)
    assert [x["name"] for x in odd.truth] == ["n300 L", "n300 L", "n300 R"]
    assert odd.probe()["gpus"] == odd.truth


def test_ids_are_deterministic_and_unique_across_hosts(tmp_path):
    specs = [GpuSpec("nvidia", "H100", 8)]
    a = write_standins(tmp_path / "a" / "bin", specs, host_index=1)
    again = write_standins(tmp_path / "again" / "bin", specs, host_index=1)
    b = write_standins(tmp_path / "b" / "bin", specs, host_index=2)
    assert a == again
    assert not {x["uuid"] for x in a} & {x["uuid"] for x in b}
    assert all(re.match(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", x["uuid"]) for x in a)


def test_no_gpus_and_stale_tools(tmp_path):
    bin_dir = tmp_path / "bin"
    write_standins(bin_dir, [GpuSpec("nvidia", "H100", 2)], host_index=1)
    assert (bin_dir / "nvidia-smi").exists()
    assert write_standins(bin_dir, [GpuSpec("amd", "MI300X", 2)], host_index=1)[0]["vendor"] == "amd"
    assert not (bin_dir / "nvidia-smi").exists() and (bin_dir / "amd-smi").exists()
    assert write_standins(bin_dir, [], host_index=1) == []
    assert [p.name for p in bin_dir.iterdir()] == ["gpu-burn"]  # kept: on a host with no GPU it says so


def test_unknown_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="H100"):
        write_standins(tmp_path / "bin", [GpuSpec("nvidia", "B300", 8)], host_index=1)


# --------------------------------------------------------------------------- the command lines

def test_standins_answer_exactly_the_probe_commands(tmp_path):
    host = Host(tmp_path, [GpuSpec(v, m, 2) for v, m in [("nvidia", "H100"), ("amd", "MI300X"),
                                                          ("intel", "Gaudi3"), ("tenstorrent", "n150")]])
    for vendor, (name, commands) in g.PROBE_COMMANDS.items():
        assert TOOLS[vendor] == name
        for argv in commands:
            rc, out, err = host.run(argv)
            assert rc == 0 and out and not err, argv


@pytest.mark.parametrize("argv", [
    ["nvidia-smi"], ["nvidia-smi", "-q"], ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
    ["nvidia-smi", "topo", "-m", "-i", "0"], ["nvidia-smi", "topo -m"],
    ["amd-smi"], ["amd-smi", "static"], ["amd-smi", "list", "--json"],
    ["hl-smi"], ["hl-smi", "-Q", "index,name", "-f", "csv,noheader"],
    ["tt-smi"], ["tt-smi", "-s", "-f", "x.json"],
])
def test_other_command_lines_fail_like_the_tool(tmp_path, argv):
    host = Host(tmp_path, [GpuSpec(v, m, 1) for v, m in [("nvidia", "H100"), ("amd", "MI300X"),
                                                          ("intel", "Gaudi3"), ("tenstorrent", "n150")]])
    rc, out, err = host.run(argv)
    assert rc != 0 and out == "" and err.strip()


def test_nvidia_smi_list(tmp_path):
    host = Host(tmp_path, [GpuSpec("nvidia", "A100", 2)])
    rc, out, err = host.run(["nvidia-smi", "-L"])
    assert out == "".join(f"GPU {x['index']}: NVIDIA A100-SXM4-80GB (UUID: {x['uuid']})\n" for x in host.truth)
    real = fixture("nvidia-smi_L_8xH100-MIG-1g.10gb.txt").splitlines()[0]
    pattern = r"^GPU \d+: [^()]+ \(UUID: GPU-[0-9a-f-]{36}\)$"
    assert re.match(pattern, real) and re.match(pattern, out.splitlines()[0])


# --------------------------------------------------------------------------- byte format vs the real tools

NVIDIA_FIELD_PATTERNS = [r"\d+", r"GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", r"NVIDIA [A-Za-z0-9 -]+", r"\d+",
                         r"[0-9A-F]{8}:[0-9A-F]{2}:[0-9A-F]{2}\.\d", r"\d+\.\d+(\.\d+)?"]


def test_nvidia_query_format_matches_real(tmp_path):
    host = Host(tmp_path, [GpuSpec("nvidia", "H100", 1)])
    ours = host.output("nvidia")
    [record] = g._query_records(fixture("nvidia-smi_query-gpu_1xH100_allfields_idle.csv"), g.NVIDIA_QUERY_FIELDS)
    real = ", ".join(record[f].replace(" MiB", "") for f in g.NVIDIA_QUERY_FIELDS) + "\n"  # nounits
    for line in (real, ours):
        assert line.endswith("\n") and line.count("\n") == 1
        cells = line[:-1].split(", ")
        assert [bool(re.fullmatch(p, c)) for p, c in zip(NVIDIA_FIELD_PATTERNS, cells, strict=True)] == [True] * 6, line
    assert ours.split(", ")[2:4] == real.split(", ")[2:4]  # same name and size as the recorded H100


def test_nvidia_topo_format_matches_real(tmp_path):
    host = Host(tmp_path, [GpuSpec("nvidia", "L40S", 1)], numa_nodes=1)
    ours = host.output("nvidia", 1)
    real = fixture("nvidia-smi_topo-m_1xL40S.txt")
    assert real[real.index("\nLegend:"):] == TOPO_LEGEND
    assert ours.replace("0-127", "0-7") == real  # a one-GPU, one-node host: only the CPU list differs
    h200 = fixture("nvidia-smi_topo-m_8xH200-NVSwitch_10NIC.txt").splitlines()
    ours8 = Host(tmp_path, [GpuSpec("nvidia", "H100", 8)], host_index=2).output("nvidia", 1).splitlines()
    assert ours8[0] == h200[0].replace("\tNIC0\tNIC1\tNIC2\tNIC3\tNIC4\tNIC5\tNIC6\tNIC7\tNIC8\tNIC9", "")
    for real_row, our_row in zip(h200[1:9], ours8[1:9], strict=True):
        real_cells = real_row.split("\t")
        assert our_row.split("\t") == real_cells[:9] + real_cells[19:]  # without the NIC columns


def test_amd_static_format_matches_real(tmp_path):
    ours = Host(tmp_path, [GpuSpec("amd", "MI300X", 8)]).output("amd")
    real = fixture("amd-smi_static_json_8xMI300X_rocm7.2.1_root.json")
    for text in (ours, real):
        assert text == json.dumps(json.loads(text), indent=4)  # indent 4, no final newline

    def shape(value):
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(v) for v in value]
        return type(value).__name__

    ours_doc, real_doc = json.loads(ours), json.loads(real)
    assert list(ours_doc) == list(real_doc) == ["gpu_data"]
    for our_gpu, real_gpu in zip(ours_doc["gpu_data"], real_doc["gpu_data"], strict=True):
        assert shape(our_gpu) == shape(real_gpu)  # same keys, order and value types, all the way down
        assert our_gpu["numa"]["node"] == real_gpu["numa"]["node"]
    expected = json.loads(real)["gpu_data"][0]
    mine = json.loads(ours)["gpu_data"][0]
    for section in ("ifwi", "limit", "ras", "soc_pstate", "xgmi_plpd", "cache_info", "clock", "vram"):
        assert mine[section] == expected[section], section


def test_hlsmi_format_matches_real(tmp_path):
    ours = Host(tmp_path, [GpuSpec("intel", "Gaudi3", 8)]).output("intel")
    records = g._query_records(fixture("hl-smi_query_8xGaudi3_HL-325L.csv"), g.HLSMI_QUERY_FIELDS)
    real = "".join(", ".join(r[f] for f in g.HLSMI_QUERY_FIELDS) + "\n" for r in records)

    def shape(text):
        return [re.sub(r"[0-9a-f]", "h", re.sub(r"[A-Z]", "A", re.sub(r"\d", "9", line))) for line in text.splitlines()]

    assert shape(ours.replace("1.22.1-97ec1a4", "1.24.1-b336d5e")) == shape(real)
    assert ours.endswith(" MiB\n")


@pytest.mark.parametrize("model, recorded", [("n150", "tt-smi_s_n150.json"), ("n300", "tt-smi_s_QuietBox_4xn300.json")])
def test_ttsmi_format_matches_real(tmp_path, model, recorded):
    ours = Host(tmp_path, [GpuSpec("tenstorrent", model, 2)]).output("tenstorrent")
    assert ours == json.dumps(json.loads(ours), indent=4) + "\n"
    real = json.loads(fixture(recorded))
    doc = json.loads(ours)
    assert list(doc) == list(real)
    assert list(doc["host_info"]) == list(real["host_info"])
    for device in doc["device_info"]:
        assert {k: list(v) for k, v in device.items()} == {k: list(v) for k, v in real["device_info"][0].items()}


# --------------------------------------------------------------------------- the module, end to end

PLAYBOOK = """
- hosts: all
  gather_facts: false
  roles: [gpu_probe]
  tasks:
    - name: Keep the facts
      ansible.builtin.copy:
        content: "{{ ansible_facts.gpufleet_probe | to_json }}"
        dest: "{{ facts_file }}"
        mode: "0600"
"""


def test_role_probes_standins_through_ansible(tmp_path):
    host = Host(tmp_path, [GpuSpec("nvidia", "H100", 4), GpuSpec("nvidia", "L40S", 4)])
    playbook = tmp_path / "probe.yml"
    playbook.write_text(PLAYBOOK)
    facts_file = tmp_path / "facts.json"
    env = {**host.env, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_HOST_KEY_CHECKING": "False",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_NOCOLOR": "1"}
    p = subprocess.run([tool("ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook),
                        "-e", f"ansible_python_interpreter={sys.executable}", "-e", f"facts_file={facts_file}"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    facts = json.loads(facts_file.read_text())
    assert facts["gpus"] == host.truth
    assert facts["drivers"] == {"nvidia": DRIVERS["nvidia"]}
    assert set(facts) == {"hostname", "gpus", "drivers", "cpu", "memory_mib", "disk", "runtime", "problems"}
    assert facts["cpu"]["count"] >= 1 and facts["memory_mib"] > 0 and facts["disk"]["total_mib"] > 0
    assert set(facts["runtime"]) == {"name", "version", "usable", "via_sudo", "root", "gpu_support", "storage"}
    assert set(facts["runtime"]["gpu_support"]) == {"nvidia"}
    assert re.search(r"TASK \[gpu_probe : Probe GPUs[^\n]*\n+ok: \[localhost\]", p.stdout), p.stdout  # not changed
