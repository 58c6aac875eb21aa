"""The metrics parsers (gpufleet/metrics/parse.py) and the reading of a host sample
(gpufleet/metrics/sample.py) on real recorded outputs: the shared set (../shared/fixtures/gpu-tools, read
from there) and this repository's tests/fixtures/gpu-tools (see its SOURCES.md)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import gpu_tool_fixture

from gpufleet.metrics import hostcmd, parse, sample
from gpufleet.models.metrics import GpuProcess, HostSample

LOCAL = Path(__file__).resolve().parents[1] / "fixtures" / "gpu-tools"
LAB_ID = "d1dfb416356d2a606a9c065e359ff9405ccd5cccfc673dad0e9ef5fdd8aac140"  # the container in the lab captures
MASKED_UUID = "GPU-00000000-0000-0000-0000-000000000000"


def local(name: str) -> str:
    return (LOCAL / name).read_text(encoding="utf-8")


def shared(name: str) -> str:
    return gpu_tool_fixture(name)


def header_csv(text: str) -> dict[str, str]:
    """The one GPU row of a `--format=csv` output, by column name (units dropped from the names)."""
    lines = text.splitlines()
    names = [re.sub(r" \[[^\]]*\]$", "", c.strip()) for c in lines[0].split(",")]
    return dict(zip(names, (c.strip() for c in lines[1].split(",")), strict=True))


def nounits(value: str) -> str:
    """A value as `--format=csv,nounits` prints it ("81559 MiB" -> "81559", "[N/A]" stays)."""
    return re.sub(r" (MiB|%|W|MHz|C)$", "", value)


def noheader_line(row: dict[str, str], fields: tuple[str, ...]) -> str:
    """The row as hostcmd's `--format=csv,noheader,nounits` query of ``fields`` prints it."""
    return ", ".join(nounits(row[f]) for f in fields) + "\n"


# --------------------------------------------------------------------------- nvidia-smi --query-gpu

ALLFIELDS = [  # file, utilization, memory used, memory total, temperature, power
    (shared, "nvidia-smi_query-gpu_1xH100_allfields_idle.csv", 0.0, 0, 81559, 41.0, 69.85),
    (shared, "nvidia-smi_query-gpu_1xH100_allfields_load.csv", 100.0, 19818, 81559, 59.0, 631.95),
    (shared, "nvidia-smi_query-gpu_1xH100-MIG_allfields_idle.csv", None, 59, 81559, 42.0, 71.15),  # [N/A] on MIG
    (shared, "nvidia-smi_query-gpu_1xH200_allfields_idle.csv", 0.0, 0, 143771, None, None),
    (shared, "nvidia-smi_query-gpu_1xL40S_allfields_idle.csv", 100.0, 0, 46068, None, None),  # as captured
    (local, "nvidia-smi_query-gpu_1xH200_allfields_load.csv", 100.0, 32362, 143771, 52.0, 627.4),
]


@pytest.mark.parametrize("source, name, util, used, total, temp, power", ALLFIELDS)
def test_nvidia_gpus_reads_a_csv_with_header_and_units_by_column_name(source, name, util, used, total, temp,
                                                                      power):
    text = source(name)
    [gpu] = parse.nvidia_gpus(text)
    row = header_csv(text)
    assert gpu.index == 0 and gpu.vendor == "nvidia" and gpu.uuid == row["uuid"]
    assert (gpu.utilization, gpu.memory_used_mib, gpu.memory_total_mib) == (util, used, total)
    if temp is not None:
        assert (gpu.temperature_c, gpu.power_w) == (temp, power)
    else:  # the same reading, whatever this capture's values
        assert gpu.temperature_c == float(row["temperature.gpu"])
        assert gpu.power_w == float(row["power.draw"].split()[0])
    assert gpu.faults == []  # healthy: ECC 0, retired/remapped "No" or [N/A], recovery action "None"


@pytest.mark.parametrize("source, name, util, used, total, temp, power", ALLFIELDS)
def test_nvidia_gpus_noheader_nounits_form_reads_the_same(source, name, util, used, total, temp, power):
    # hostcmd.NVIDIA_GPUS prints exactly its fields, no header, no units: the same row read that way
    text = source(name)
    row = header_csv(text)
    full = parse.nvidia_gpus(noheader_line(row, hostcmd.NVIDIA_GPU_FIELDS))
    assert full == parse.nvidia_gpus(text)
    basic = parse.nvidia_gpus(noheader_line(row, hostcmd.NVIDIA_GPU_FIELDS[:7]), basic=True)
    assert basic == parse.nvidia_gpus(text)  # the basic query has no health fields: no faults either way
    with pytest.raises(ValueError, match="expected 12 comma-separated fields, got 7"):
        parse.nvidia_gpus(noheader_line(row, hostcmd.NVIDIA_GPU_FIELDS[:7]))


def test_nvidia_no_value_forms_are_none():
    # as real outputs print them: [N/A], N/A, [Not Supported], [Requested functionality has been deprecated]
    h100 = header_csv(shared("nvidia-smi_query-gpu_1xH100_allfields_idle.csv"))
    gtx = [c.strip() for c in shared("nvidia-smi_query-gpu_GTX770_NotSupported_noheader.csv").split(",")]
    newer = shared("nvidia-smi_query-gpu_newDriver_fan-NA_noheader-nounits.csv").strip().split(", ")
    for value in (h100["display_mode"], h100["retired_pages.pending"], gtx[1], newer[4]):
        assert value.startswith("[") or value == "N/A"
        assert parse._number(value) is None and parse._clean(value) is None
    assert parse._number(gtx[6]) == 52.0  # "52 %"


def test_nvidia_faults_from_the_health_fields():
    row = header_csv(shared("nvidia-smi_query-gpu_1xH100_allfields_load.csv"))
    assert parse.nvidia_faults(row) == []
    # No real output of a faulty GPU was found (tests/fixtures/gpu-tools/SOURCES.md): the real row with
    # its health fields set as nvidia-smi prints them on one
    faulty = {**row, "ecc.errors.uncorrected.volatile.total": "3", "retired_pages.pending": "Yes",
              "remapped_rows.pending": "Yes", "remapped_rows.failure": "Yes", "gpu_recovery_action": "GPU Reset"}
    assert parse.nvidia_faults(faulty) == [
        "3 uncorrected ECC errors since the driver loaded",
        "retired pages pending (a GPU reset or reboot retires them)",
        "row remapping pending (a GPU reset applies it)",
        "row remapping failed (the GPU needs service)",
        "the driver asks for recovery: GPU Reset"]
    [gpu] = parse.nvidia_gpus(noheader_line({**row, "ecc.errors.uncorrected.volatile.total": "1"},
                                            hostcmd.NVIDIA_GPU_FIELDS))
    assert gpu.faults == ["1 uncorrected ECC error since the driver loaded"]


# --------------------------------------------------------------------------- nvidia-smi --query-compute-apps

def test_nvidia_apps_with_header_any_column_order():
    procs = parse.nvidia_apps(local("nvidia-smi_query-compute-apps_1xH200_load.csv"))
    assert [(p.pid, p.name, p.memory_mib, p.gpu_uuid) for p in procs] == [
        (10291, "/root/tools/memhog", 2566, MASKED_UUID), (10293, "/root/tools/memhog", 1542, MASKED_UUID),
        (10309, "./gpu_burn", 28234, MASKED_UUID)]
    assert all(p.vendor == "nvidia" and p.container is None and p.gpu_index is None for p in procs)
    assert [p.pid for p in parse.nvidia_apps(local("nvidia-smi_query-compute-apps_1xH100_load.csv"))] == \
        [11327, 11328, 11345]
    assert parse.nvidia_apps(local("nvidia-smi_query-compute-apps_1xH100_idle.csv")) == []
    desktop = parse.nvidia_apps(local("nvidia-smi_query-compute-apps_RTX4080S_load.csv"))
    assert [(p.pid, p.name, p.memory_mib) for p in desktop] == [
        (2165, "/usr/bin/kwin_wayland", 25), (5022, "ffmpeg", 503), (5021, "ffmpeg", 360)]


def test_nvidia_apps_memory_na_and_names_with_spaces():
    procs = parse.nvidia_apps(local("nvidia-smi_query-compute-apps_RTX2080S_windows_NA-memory.csv"))
    assert len(procs) == 21 and all(p.memory_mib is None for p in procs)
    assert procs[7].name == r"C:\Program Files\NVIDIA Corporation\NVIDIA App\CEF\NVIDIA Overlay.exe"


def test_nvidia_apps_noheader_form_and_a_name_with_commas():
    text = local("nvidia-smi_query-compute-apps_1xH200_load.csv")
    lines = text.splitlines()
    names = [re.sub(r" \[[^\]]*\]$", "", c.strip()) for c in lines[0].split(",")]
    rows = [dict(zip(names, (c.strip() for c in line.split(",")), strict=True)) for line in lines[1:]]
    # as hostcmd.NVIDIA_APPS prints them: gpu_uuid, pid, used_memory, process_name; noheader, nounits
    noheader = "".join(f"{r['gpu_uuid']}, {r['pid']}, {nounits(r['used_gpu_memory'])}, {r['process_name']}\n"
                       for r in rows)
    assert parse.nvidia_apps(noheader) == parse.nvidia_apps(text)
    # a process name is the user's: a comma in it must not shift the columns
    [p] = parse.nvidia_apps(f"{MASKED_UUID}, 10309, 28234, /opt/my,job/gpu_burn --x=1,2\n")
    assert (p.pid, p.memory_mib, p.name) == (10309, 28234, "/opt/my,job/gpu_burn --x=1,2")


# --------------------------------------------------------------------------- amd-smi, hl-smi, tt-smi

def test_amd_metric_json():
    [gpu] = parse.amd_gpus(local("amd-smi_metric_json_1xRX6600.json"))
    assert (gpu.index, gpu.vendor, gpu.utilization, gpu.memory_used_mib, gpu.memory_total_mib) == \
        (0, "amd", 1.0, 202, 8176)
    assert (gpu.temperature_c, gpu.power_w, gpu.faults) == (37.0, 6.0, [])  # hotspot (junction), socket power


def test_amd_metric_ras_errors_are_faults():
    import json

    [entry] = json.loads(local("amd-smi_metric_json_1xRX6600.json"))
    assert parse.amd_faults(entry) == []
    # no real output with RAS errors was found (SOURCES.md): the real entry with its counters set
    entry["ecc"].update(total_uncorrectable_count=2, total_deferred_count=1)
    assert parse.amd_faults(entry) == ["2 uncorrectable ECC (RAS) errors", "1 deferred ECC (RAS) error"]
    [gpu] = parse.amd_gpus(json.dumps({"gpu_data": [entry]}))  # the ROCm 7 shape
    assert len(gpu.faults) == 2


def test_amd_process_json():
    procs = parse.amd_processes(local("amd-smi_process_json_2xR9700_rocm7.2.0.json"))
    assert len(procs) == 8 and {p.gpu_index for p in procs} == {0, 1}
    assert [(p.pid, p.memory_mib) for p in procs if p.gpu_index == 0] == [
        (213534, 0), (213890, 0), (213952, 21008920000 // 2 ** 20), (213953, 20503796000 // 2 ** 20)]
    assert {p.name for p in procs} == {"/usr/bin/python3.12"} and all(p.vendor == "amd" for p in procs)


def test_hlsmi_metrics_noheader():
    gpus = parse.hlsmi_gpus(shared("hl-smi_query_2xGaudi3_HL-325L_allsmi-excerpt.csv"))
    assert [(g.index, g.uuid, g.utilization, g.memory_used_mib, g.memory_total_mib, g.temperature_c, g.power_w)
            for g in gpus] == [
        (0, "01P4-HL3090A0-18-U4V193-22-07-00", 0.0, 672, 131072, 36.0, 226.0),
        (1, "01P4-HL3090A0-18-U4V298-03-04-04", 0.0, 672, 131072, 39.0, 230.0)]
    assert all(g.vendor == "intel" for g in gpus)


def test_hlsmi_with_header_reads_the_columns_it_has():
    gpus = parse.hlsmi_gpus(shared("hl-smi_query_8xGaudi3_HL-325L.csv"))
    assert [g.index for g in gpus] == list(range(8))
    assert {(g.memory_used_mib, g.memory_total_mib, g.utilization, g.power_w) for g in gpus} == \
        {(672, 131072, None, None)}


@pytest.mark.parametrize("name, chips, first", [
    ("tt-smi_s_n150.json", 1, (54.3, 12.0)),
    ("tt-smi_s_QuietBox_4xn300.json", 8, (54.3, 12.0)),  # its R chips say temperature, power_consumption
    ("tt-smi_s_Galaxy-Wormhole_32chip.json", 32, None),
    ("tt-smi_s_Galaxy-Blackhole_32chip.json", 32, (45.4, 39.0)),
])
def test_ttsmi_power_and_asic_temperature(name, chips, first):
    gpus = parse.ttsmi_gpus(shared(name))
    assert [g.index for g in gpus] == list(range(chips))
    assert all(g.vendor == "tenstorrent" and g.utilization is None and g.temperature_c and g.power_w for g in gpus)
    if first:
        assert (gpus[0].temperature_c, gpus[0].power_w) == first
    if name == "tt-smi_s_QuietBox_4xn300.json":
        assert (gpus[1].temperature_c, gpus[1].power_w) == (48.7, 15.2)


# --------------------------------------------------------------------------- cgroups, the runtime

def test_cgroup_container_podman_cgroupfs_from_the_lab():
    assert parse.cgroup_container(local("proc-cgroup_podman-4.3.1_cgroupfs_v1.txt")) == LAB_ID


@pytest.mark.parametrize("cgroup", [
    f"0::/machine.slice/libpod-{LAB_ID}.scope/container",  # podman, systemd manager, crun's sub-cgroup
    f"0::/machine.slice/libpod-{LAB_ID}.scope",
    f"0::/system.slice/docker-{LAB_ID}.scope",  # docker, systemd manager
    f"12:memory:/docker/{LAB_ID}\n11:cpu:/docker/{LAB_ID}",  # docker, cgroupfs
])
def test_cgroup_container_other_managers(cgroup):
    assert parse.cgroup_container(cgroup + "\n") == LAB_ID


@pytest.mark.parametrize("cgroup", [
    "0::/user.slice/user-1000.slice/session-3.scope",  # a login session: a process started by hand
    f"0::/machine.slice/libpod-conmon-{LAB_ID}.scope",  # podman's monitor, not the container
    "0::/init.scope", ""])
def test_cgroup_of_no_container(cgroup):
    assert parse.cgroup_container(cgroup) is None


def test_runtime_stats_podman_json():
    [usage] = parse.runtime_stats(local("podman-4.3.1_stats_no-stream_json_1container.json"))
    assert usage.name == "gf-probe" and usage.cpu_percent == 2.65
    assert (usage.memory_bytes, usage.memory_limit_bytes) == (401_400, 25_280_000_000)  # "401.4kB / 25.28GB"
    warned = 'time="..." level=warning msg="something"\n' + local("podman-4.3.1_stats_no-stream_json_1container.json")
    assert parse.runtime_stats(warned) == [usage]


def test_runtime_ps():
    assert parse.runtime_ps(f"{LAB_ID} gf-probe\nWARN something\n") == {LAB_ID: "gf-probe"}


# --------------------------------------------------------------------------- a host sample

def script_output(marker: str, sections: list[tuple[str, int, str]]) -> str:
    """What the host script prints: ``MARKER NAME RC``, the output, a newline (its `out` function)."""
    return "".join(f"{marker} {name} {rc}\n{text.rstrip(chr(10))}\n" for name, rc, text in sections)


def h200_sections(marker: str) -> str:
    row = header_csv(local("nvidia-smi_query-gpu_1xH200_allfields_load.csv"))
    apps = local("nvidia-smi_query-compute-apps_1xH200_load.csv")
    cgroup = local("proc-cgroup_podman-4.3.1_cgroupfs_v1.txt")
    return script_output(marker, [
        ("nvidia-gpus", 0, noheader_line(row, hostcmd.NVIDIA_GPU_FIELDS)),
        ("nvidia-apps", 0, apps),
        ("cgroup:10291", 0, "0::/user.slice/user-0.slice/session-1.scope"),  # memhog, started by hand
        ("cgroup:10309", 0, cgroup),  # gpu_burn, in the lab's container
        # 10293 ended before its cgroup was read: no section
        ("containers", 0, f"{LAB_ID} gf-probe"),
        ("stats", 0, local("podman-4.3.1_stats_no-stream_json_1container.json")),
    ])


def test_host_sample_joins_gpus_processes_cgroups_and_containers():
    s = sample.host_sample("lab", "node0", 5.0, h200_sections("@@M"), "@@M")
    assert s.error == "" and (s.fleet, s.alias, s.at) == ("lab", "node0", 5.0)
    assert [(g.index, g.utilization) for g in s.gpus] == [(0, 100.0)]
    assert [(p.pid, p.gpu_index, p.container) for p in s.processes] == [(10291, 0, None), (10309, 0, LAB_ID)]
    assert s.container_ids == {LAB_ID: "gf-probe"} and [c.name for c in s.containers] == ["gf-probe"]
    assert {i: [p.pid for p in ps] for i, ps in sample.outside(s).items()} == {0: [10291]}
    # the container is not gpufleet's: its process is behind gpufleet's back too
    other = s.model_copy(update={"container_ids": {}})
    assert {i: [p.pid for p in ps] for i, ps in sample.outside(other).items()} == {0: [10291, 10309]}


def test_host_sample_failures_are_said_and_the_rest_kept():
    text = script_output("@@M", [
        ("nvidia-gpus", 2, "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help."),
        ("nvidia-apps", 0, local("nvidia-smi_query-compute-apps_1xH100_load.csv")),
        ("cgroup:11345", 0, "0::/init.scope"),
        ("containers", 125, "Error: something broke"),
    ])
    s = sample.host_sample("lab", "n", 1.0, text, "@@M")
    assert "`nvidia-smi` failed for nvidia-gpus (exit 2): Invalid combination" in s.error
    assert f"{sample.CONTAINERS_FAILED}: Error: something broke" in s.error
    assert [p.pid for p in s.processes] == [11345] and s.processes[0].gpu_index is None  # no GPU row to match
    in_container = GpuProcess(vendor="nvidia", gpu_index=1, pid=7, container=LAB_ID)
    by_hand = GpuProcess(vendor="nvidia", gpu_index=2, pid=8)
    unknown = HostSample(fleet="f", alias="a", at=0, error=s.error, processes=[in_container, by_hand])
    assert list(sample.outside(unknown)) == [2]  # the runtime could not say: a container's process may be a run's


def test_a_forged_marker_in_an_output_is_not_a_section():
    text = script_output("@@M", [("nvidia-apps", 0, f"{MASKED_UUID}, 5, 1, @@X containers 0\n"),
                                 ("containers", 0, "")])
    assert [name for name, _, _ in sample.sections(text, "@@M")] == ["nvidia-apps", "containers"]


@pytest.mark.parametrize("runtime", [["sudo", "-n", "podman"], ["docker"], ["/usr/bin/podman"]])
def test_host_script_is_posix_sh(runtime):
    script = sample.host_script(runtime, "@@gpufleet-sample-0123")
    p = subprocess.run(["dash", "-n"], input=script, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    for argv in (hostcmd.NVIDIA_GPUS, hostcmd.NVIDIA_GPUS_BASIC, hostcmd.NVIDIA_APPS, hostcmd.AMD_METRIC,
                 hostcmd.AMD_PROCESS, hostcmd.HLSMI_METRICS, hostcmd.TTSMI_SNAPSHOT):
        assert " ".join(argv) in script  # hostcmd's command lines, unchanged


def test_host_script_runs_without_gpu_tools(tmp_path):
    # a host with no vendor tool and a runtime that lists nothing: one section, the containers, and exit 0
    rt = tmp_path / "rt"
    rt.write_text("#!/bin/sh\nexit 0\n")
    rt.chmod(0o755)
    script = sample.host_script([str(rt)], "@@M")
    p = subprocess.run(["dash", "-c", script], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0 and sample.sections(p.stdout, "@@M") == [("containers", 0, "")]


def test_host_script_falls_back_to_the_basic_query_on_an_older_driver(tmp_path):
    # an nvidia-smi older than the health fields refuses the whole query, as drivers say it
    # (huggingface/candle#733: 'Field "compute_cap" is not a valid field to query.'); the basic query
    # then prints the real H100 row
    row = header_csv(shared("nvidia-smi_query-gpu_1xH100_allfields_load.csv"))
    basic = noheader_line(row, hostcmd.NVIDIA_GPU_FIELDS[:7])
    (tmp_path / "basic.csv").write_text(basic)
    tool = tmp_path / "nvidia-smi"
    tool.write_text(f"""#!/bin/sh
case "$1" in
  {hostcmd.NVIDIA_GPUS[0]}) echo 'Field "gpu_recovery_action" is not a valid field to query.'; exit 2;;
  {hostcmd.NVIDIA_GPUS_BASIC[0]}) cat {tmp_path}/basic.csv;;
  --query-compute-apps=*) ;;
  *) exit 2;;
esac
""")
    tool.chmod(0o755)
    rt = tmp_path / "rt"
    rt.write_text("#!/bin/sh\nexit 0\n")
    rt.chmod(0o755)
    p = subprocess.run(["dash", "-c", sample.host_script([str(rt)], "@@M")], capture_output=True, text=True,
                       env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    s = sample.host_sample("f", "a", 0.0, p.stdout, "@@M")
    assert [n for n, _, _ in sample.sections(p.stdout, "@@M")] == ["nvidia-gpus-basic", "nvidia-apps", "containers"]
    assert s.error == "" and [(g.index, g.utilization, g.faults) for g in s.gpus] == [(0, 100.0, [])]
