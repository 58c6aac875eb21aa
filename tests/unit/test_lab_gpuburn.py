"""The lab's GPUs driven by a workload (gpufleet/lab/gputools.py): real gpu-burn processes started on
this machine make the stand-in nvidia-smi and hl-smi report busy GPUs, with the processes' real PIDs,
in the byte format of the real tools; simulated faults show in nvidia-smi's health fields."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import gpu_tool_fixture, wait_for

from gpufleet.lab import gputools
from gpufleet.lab.gputools import CATALOGUE, LIVE, GpuSpec, set_fault, write_standins
from gpufleet.metrics import hostcmd

GPUS = ["nvidia-smi", *hostcmd.NVIDIA_GPUS]
BASIC = ["nvidia-smi", *hostcmd.NVIDIA_GPUS_BASIC]
APPS = ["nvidia-smi", *hostcmd.NVIDIA_APPS]
HLSMI = ["hl-smi", *hostcmd.HLSMI_METRICS]


class Host:
    """A lab host's bin dir and GPU driver directory, its tools run as the sampler runs them."""

    def __init__(self, tmp_path: Path, specs: list[GpuSpec], host_index: int = 1):
        self.bin = tmp_path / f"host{host_index}" / "bin"
        self.truth = write_standins(self.bin, specs, host_index=host_index)
        self.driver = gputools.driver_dir(self.bin)
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                    gputools.DRIVER_ENV: str(self.driver)}
        self.burns: list[subprocess.Popen] = []

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=30)

    def out(self, argv: list[str]) -> str:
        p = self.run(argv)
        assert p.returncode == 0 and p.stderr == "", p.stderr
        return p.stdout

    def rows(self, argv: list[str] = GPUS) -> list[list[str]]:
        return [line.split(", ") for line in self.out(argv).splitlines()]

    def holders(self) -> list[str]:
        return sorted(n for n in os.listdir(self.driver / "holders") if not n.startswith("."))

    def burn(self, *args: str) -> subprocess.Popen:
        """Start gpu-burn by hand; return once it has registered what it holds."""
        before = set(self.holders())
        p = subprocess.Popen(["gpu-burn", *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        self.burns.append(p)
        wait_for("gpu-burn to register", lambda: set(self.holders()) - before or p.poll() is not None, timeout=10)
        assert p.poll() is None, p.communicate()
        return p

    def stop(self) -> None:
        for p in self.burns:
            if p.poll() is None:
                p.terminate()
            p.wait(timeout=10)


@pytest.fixture()
def make(tmp_path):
    made: list[Host] = []

    def factory(specs, host_index=1):
        made.append(Host(tmp_path, specs, host_index))
        return made[-1]

    yield factory
    for host in made:
        host.stop()


# --------------------------------------------------------------------------- idle, and the real tools' format

def recorded_nounits(name: str, fields: tuple[str, ...]) -> list[str]:
    """The cells of a recorded `--format=csv` row, as `--format=csv,noheader,nounits` prints them."""
    header, row = gpu_tool_fixture(name).splitlines()[:2]
    names = [h.split(" [")[0] for h in header.split(", ")]
    record = dict(zip(names, row.split(", "), strict=True))
    return [re.sub(r" (%|MiB|W)$", "", record[f]) for f in fields]


def kind(cell: str) -> str:
    for name, pattern in [("int", r"\d+"), ("decimal", r"\d+\.\d\d"), ("na", r"\[N/A\]"), ("yesno", r"Yes|No"),
                          ("uuid", r"GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}"), ("action", r"None|Reset|Reboot")]:
        if re.fullmatch(pattern, cell):
            return name
    return f"other: {cell!r}"


@pytest.mark.parametrize("model, recorded", [("H100", "nvidia-smi_query-gpu_1xH100_allfields_idle.csv"),
                                             ("L40S", "nvidia-smi_query-gpu_1xL40S_allfields_idle.csv")])
def test_idle_gpus_read_as_real_idle_ones_in_the_same_bytes(make, model, recorded):
    host = make([GpuSpec("nvidia", model, 2)])
    text = host.out(GPUS)
    assert text.endswith("\n") and "\r" not in text and text.count("\n") == 2
    real = recorded_nounits(recorded, hostcmd.NVIDIA_GPU_FIELDS)
    for row, gpu in zip(host.rows(), host.truth, strict=True):
        assert [kind(c) for c in row] == [kind(c) for c in real]  # same cells: [N/A], Yes/No, 2 decimals...
        assert row[:2] == [str(gpu["index"]), gpu["uuid"]]
        assert row[2] == "0" and row[4] == str(gpu["memory_mib"])
        assert row[3] == real[3] or int(row[3]) <= 1  # a few MiB at most, as idle GPUs show
        assert row[7:] == real[7:]  # healthy: "0, [N/A], No, No, None", as recorded
    basic = host.rows(BASIC)
    assert basic == [row[:7] for row in host.rows()]
    assert host.out(APPS) == ""  # no process, no line


def test_loaded_h100_reads_like_the_recorded_gpu_burn(make):
    host = make([GpuSpec("nvidia", "H100", 1)])
    real = recorded_nounits("nvidia-smi_query-gpu_1xH100_allfields_load.csv", hostcmd.NVIDIA_GPU_FIELDS)
    host.burn("--memory", "19817")
    [row] = host.rows()
    assert [kind(c) for c in row] == [kind(c) for c in real]
    assert row[2:8] == real[2:8]  # 100 %, 19818 MiB, 59 C, 631.95 W: the recorded H100 under gpu-burn


def test_every_model_has_its_idle_and_full_readings():
    assert set(LIVE) == {(vendor, model) for vendor, models in CATALOGUE.items() for model in models}


# --------------------------------------------------------------------------- a real process holds a GPU

def test_gpu_burn_makes_its_gpu_busy_with_its_real_pid(make):
    host = make([GpuSpec("nvidia", "H100", 4)])
    burn = host.burn("--gpus", "2", "--percent", "70")
    rows = host.rows()
    assert [r[2] for r in rows] == ["0", "0", "70", "0"]
    busy = rows[2]
    assert busy[3] == str(1 + 81559 * 9 // 10)  # idle 1 MiB + 90 % of the memory, as gpu_burn allocates
    assert 30 < int(busy[5]) < 59 and 69.85 < float(busy[6]) < 631.95  # warmer and drawing more, not at full
    apps = host.out(APPS)
    assert apps == f"{host.truth[2]['uuid']}, {burn.pid}, {81559 * 9 // 10}, {host.bin / 'gpu-burn'}\n"
    assert gputools.HOLDER_PREFIX in Path(f"/proc/{burn.pid}/cmdline").read_text()  # the token it is found by
    burn.send_signal(signal.SIGTERM)
    assert burn.wait(timeout=10) == 143
    assert [r[2] for r in host.rows()] == ["0"] * 4 and host.out(APPS) == "" and host.holders() == []


def test_percents_add_up_and_cap_at_100_and_memory_at_the_total(make):
    host = make([GpuSpec("nvidia", "L40S", 2)])
    a = host.burn("--gpus", "0,1", "--percent", "70")
    b = host.burn("--gpus", "1", "--percent", "50")
    rows = host.rows()
    assert [r[2] for r in rows] == ["70", "100"]
    assert rows[1][3] == "46068" and rows[1][5] == "63" and rows[1][6] == "294.30"  # full: memory, temp, power
    apps = [line.split(", ") for line in host.out(APPS).splitlines()]
    uuid0, uuid1 = host.truth[0]["uuid"], host.truth[1]["uuid"]
    assert [(x[0], int(x[1])) for x in apps] == [(uuid0, a.pid), (uuid1, a.pid), (uuid1, b.pid)]
    assert int(apps[1][2]) + int(apps[2][2]) == 46068  # the second one got what was left


def test_seconds_ends_it_and_the_gpu_reads_idle_again(make):
    host = make([GpuSpec("nvidia", "A100", 2)])
    burn = host.burn("--seconds", "1", "--percent", "40")
    assert [r[2] for r in host.rows()] == ["40", "40"]
    out, err = burn.communicate(timeout=15)
    assert burn.returncode == 0, err
    assert "holding GPU 0" in out and "holding GPU 1" in out
    assert [r[2] for r in host.rows()] == ["0", "0"] and host.holders() == []


def test_a_record_no_live_process_carries_is_ignored(make):
    host = make([GpuSpec("nvidia", "H100", 2)])
    killed = host.burn("--gpus", "0")
    killed.kill()  # SIGKILL: no chance to remove its record
    killed.wait(timeout=10)
    (host.driver / "holders" / f"{gputools.HOLDER_PREFIX}00000000-0000-0000-0000-000000000000").write_text(
        f"pid {os.getpid()}\nname /usr/bin/gpu-burn\ngpu nvidia 1 100 1000\n")
    assert len(host.holders()) == 2
    assert [r[2] for r in host.rows()] == ["0", "0"] and host.out(APPS) == ""


def test_gaudi_utilization_in_hlsmi_format(make):
    host = make([GpuSpec("intel", "Gaudi3", 2)])
    real = gpu_tool_fixture("hl-smi_query_2xGaudi3_HL-325L_allsmi-excerpt.csv").splitlines()
    ours = host.out(HLSMI).splitlines()

    def shape(line):
        cells = line.split(", ")
        return [re.sub(r"\d+", "9", c) for c in cells[2:]]

    assert [shape(x) for x in ours] == [shape(x) for x in real]
    assert [x.split(", ", 2)[1] for x in ours] == [g["uuid"] for g in host.truth]
    assert ours[0].endswith(", 131072 MiB, 672 MiB, 130400 MiB, 226 W, 850 W, 36 C, 0 %")  # idle, as recorded
    host.burn("--gpus", "1", "--percent", "60")
    assert [x.rsplit(", ", 1)[1] for x in host.out(HLSMI).splitlines()] == ["0 %", "60 %"]


# --------------------------------------------------------------------------- gpu-burn's own command line

@pytest.mark.parametrize("args, message", [
    (["--percent", "0"], "--percent"), (["--percent", "101"], "--percent"), (["--seconds", "x"], "--seconds"),
    (["--gpus", "7"], "no GPU 7"), (["--gpus", "0,,1"], "--gpus"), (["--bogus"], "unknown argument"),
    (["--gpus"], "needs a value"),
])
def test_gpu_burn_refuses_bad_arguments(make, args, message):
    host = make([GpuSpec("nvidia", "H100", 2)])
    p = host.run(["gpu-burn", *args])
    assert p.returncode == 2 and message in p.stderr and host.holders() == []


def test_gpu_burn_without_a_gpu_says_so(make, tmp_path):
    host = make([])
    p = host.run(["gpu-burn", "--seconds", "1"])
    assert p.returncode == 1 and "no GPU found" in p.stderr
    env = {k: v for k, v in host.env.items() if k != gputools.DRIVER_ENV}  # a container given no GPU
    p = subprocess.run(["gpu-burn"], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 1 and "no GPU found" in p.stderr


def test_gpu_burn_runs_under_busybox_sh(make):
    """The lab image's shell is busybox's: its body (after the re-exec that adds the token) runs there."""
    host = make([GpuSpec("nvidia", "H100", 2)])
    token = f"{gputools.HOLDER_PREFIX}11111111-2222-3333-4444-555555555555"
    p = subprocess.Popen(["busybox", "sh", str(host.bin / "gpu-burn"), "--gpufleet-lab-holder", token, "--gpus=1",
                          "--percent=25", "--seconds=2"], env=host.env, stdout=subprocess.PIPE, text=True)
    wait_for("gpu-burn under busybox to register", lambda: host.holders() == [token], timeout=10)
    assert [r[2] for r in host.rows()] == ["0", "25"]
    assert host.out(APPS).split(", ")[1] == str(p.pid)
    out, _ = p.communicate(timeout=15)
    assert p.returncode == 0 and "holding GPU 1" in out and host.holders() == []


# --------------------------------------------------------------------------- faults

@pytest.mark.parametrize("model, kind_, health", [
    ("H100", "ecc", ["2", "[N/A]", "Yes", "No", "Reset"]),
    ("H100", "remap-failure", ["0", "[N/A]", "No", "Yes", "None"]),
    ("A100", "reboot", ["0", "[N/A]", "No", "No", "Reboot"]),
    ("V100S", "ecc", ["2", "Yes", "[N/A]", "[N/A]", "Reset"]),
    ("V100S", None, ["0", "No", "[N/A]", "[N/A]", "None"]),
])
def test_a_fault_shows_in_the_health_fields(make, model, kind_, health):
    host = make([GpuSpec("nvidia", model, 2)])
    set_fault(host.bin, 1, kind_)
    rows = host.rows()
    assert rows[1][7:] == health
    assert rows[0][7:] == (health if kind_ is None else rows[0][7:]) and rows[0][-1] == "None"
    set_fault(host.bin, 1, None)
    assert host.rows()[1][7:] == host.rows()[0][7:]


def test_faults_that_cannot_be_are_refused(make):
    host = make([GpuSpec("nvidia", "V100S", 1), GpuSpec("intel", "Gaudi2", 1)])
    with pytest.raises(ValueError, match="does not remap rows"):
        set_fault(host.bin, 0, "remap-failure")
    with pytest.raises(ValueError, match="no nvidia GPU 3"):
        set_fault(host.bin, 3, "ecc")
    with pytest.raises(ValueError, match="unknown fault kind"):
        set_fault(host.bin, 0, "melted")
    with pytest.raises(ValueError, match="NVIDIA's"):
        set_fault(host.bin, 0, "ecc", vendor="intel")


# --------------------------------------------------------------------------- exactly the sampler's command lines

def test_standins_answer_exactly_the_samplers_command_lines(make):
    host = make([GpuSpec("nvidia", "H100", 1), GpuSpec("intel", "Gaudi2", 1), GpuSpec("tenstorrent", "n150", 1),
                 GpuSpec("amd", "MI300X", 1)])
    for argv in (GPUS, BASIC, HLSMI, ["tt-smi", *hostcmd.TTSMI_SNAPSHOT]):
        assert host.out(argv), argv
    assert host.out(APPS) == ""
    for args in (hostcmd.AMD_METRIC, hostcmd.AMD_PROCESS):  # no recorded output to copy: left unanswered
        p = host.run(["amd-smi", *args])
        assert p.returncode == 2 and p.stdout == ""


@pytest.mark.parametrize("argv", [
    ["nvidia-smi", "--query-gpu=index,uuid,utilization.gpu", "--format=csv,noheader,nounits"],
    ["nvidia-smi", *hostcmd.NVIDIA_GPUS, "-i", "0"], ["nvidia-smi", hostcmd.NVIDIA_GPUS[0], "--format=csv"],
    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
    ["hl-smi", *hostcmd.HLSMI_METRICS[:3], "csv"],
])
def test_other_command_lines_still_fail(make, argv):
    host = make([GpuSpec("nvidia", "H100", 1), GpuSpec("intel", "Gaudi3", 1)])
    p = host.run(argv)
    assert p.returncode != 0 and p.stdout == "" and p.stderr.strip()


def test_sampling_is_cheap(make):
    host = make([GpuSpec("nvidia", "H100", 8)])
    host.burn("--gpus", "0,1")
    start = time.monotonic()
    for _ in range(5):
        host.out(GPUS)
        host.out(APPS)
    assert (time.monotonic() - start) / 5 < 1.0  # a lab of many hosts is sampled every few seconds
