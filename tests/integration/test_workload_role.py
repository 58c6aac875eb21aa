"""The workload role on the local lab: real containers started over real ssh (through the login node)
with podman through sudo, checked from inside the containers and on the host."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import tool
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

from gpufleet.config import load_fleet
from gpufleet.inventory import write_fleet_files
from gpufleet.lab import core

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
IMAGE = core.LAB_IMAGE
# a long-running task that exits with 7 when stopped (sh as PID 1 needs a trap to see SIGTERM)
STR_TAG = "tag:yaml.org,2002:str"
WAIT_FOR_STOP = "echo READY; trap 'exit 7' TERM; sleep 1000 & wait"


@dataclass
class Site:
    lab: core.Lab
    node: core.LabHost
    inventory: Path
    env: dict[str, str]
    tmp: Path

    @property
    def host(self) -> str:  # the inventory name of the node
        return self.node.address


@dataclass
class Task:
    name: str
    status: str  # ok | changed | fatal | skipping
    result: dict


@dataclass
class Play:
    rc: int
    output: str
    tasks: list[Task] = field(default_factory=list)
    recap: dict[str, int] = field(default_factory=dict)

    def module(self, key: str) -> Task:
        """The (last) task whose result holds ``key`` (e.g. container, containers)."""
        found = [t for t in self.tasks if key in t.result]
        assert found, f"no task result with {key!r}:\n{self.output}"
        return found[-1]

    @property
    def container(self) -> dict:
        return self.module("container").result["container"]

    @property
    def containers(self) -> list[dict]:
        return self.module("containers").result["containers"]

    def fact(self, name: str):
        for t in reversed(self.tasks):
            facts = t.result.get("ansible_facts") or {}
            if name in facts:
                return facts[name]
        raise AssertionError(f"no fact {name}:\n{self.output}")


def unsafe_yaml(variables: dict) -> str:
    """A vars file in which every string from the user is tagged !unsafe, as gpufleet writes them.

    ansible-core 2.19 resolves the type of a `!unsafe` scalar again, ignoring its quotes (`!unsafe "true"`
    loads as a boolean, `!unsafe "007"` as 7), so lists and mappings are tagged as a whole (what is inside
    keeps its quotes and is unsafe too), and a string on its own only when it reads as a string anyway
    (one that reads as a bool, number or null cannot hold template syntax).
    """
    lines = []
    for key, value in variables.items():
        text = json.dumps(value, ensure_ascii=False)
        if isinstance(value, dict | list) or (
                isinstance(value, str) and Resolver().resolve(ScalarNode, value, (True, False)) == STR_TAG):
            text = "!unsafe " + text
        lines.append(f"{json.dumps(key)}: {text}")
    return "\n".join(lines) + "\n" if lines else "{}\n"


def _site(lab: core.Lab, tmp: Path) -> Site:
    from gpufleet.runner import ansible_env

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPUFLEET_HOME", str(tmp / "home"))
        files = write_fleet_files(load_fleet(lab.fleet_file), tmp / "inventory")
        env = {**os.environ, **ansible_env(), "GPUFLEET_HOME": str(tmp / "home"),
               "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_STDOUT_CALLBACK": "default",
               "ANSIBLE_CALLBACK_RESULT_FORMAT": "json", "ANSIBLE_CALLBACK_FORMAT_PRETTY": "False"}
    return Site(lab, lab.nodes[0], files.inventory, env, tmp)


@pytest.fixture(scope="module")
def nvidia(lab_factory, tmp_path_factory) -> Site:
    return _site(lab_factory(nodes=1, gpus=4, vendor="nvidia"), tmp_path_factory.mktemp("wl-nvidia"))


@pytest.fixture(scope="module")
def amd(lab_factory, tmp_path_factory) -> Site:
    return _site(lab_factory(nodes=1, gpus=4, vendor="amd"), tmp_path_factory.mktemp("wl-amd"))


RESULT_RE = re.compile(r"^(ok|changed|fatal|failed|skipping): \[([^\]]+)\](?:: FAILED!)? => (\{.*\})$")
RECAP_RE = re.compile(r"^(\S+)\s+:\s+(ok=.*)$")


def play(site: Site, playbook: str, variables: dict | None = None, *args: str) -> Play:
    """ansible-playbook -i INVENTORY playbooks/PLAYBOOK.yml --limit HOST -e @vars.yml (strings !unsafe)."""
    vars_file = site.tmp / f"vars-{uuid.uuid4().hex[:8]}.yml"
    vars_file.write_text(unsafe_yaml(variables or {}))
    p = subprocess.run([tool("ansible-playbook"), "-i", str(site.inventory), f"playbooks/{playbook}.yml",
                        "--limit", site.host, "-e", f"@{vars_file}", "-v", *args],
                       capture_output=True, text=True, cwd=ROOT, env=site.env, timeout=300)
    out = p.stdout + p.stderr
    result = Play(p.returncode, out)
    task = ""
    for line in p.stdout.splitlines():
        if line.startswith("TASK ["):
            task = line[6:line.rindex("]")]
        elif m := RESULT_RE.match(line):
            assert m.group(2) == site.host, line
            result.tasks.append(Task(task, m.group(1), json.loads(m.group(3))))
        elif (m := RECAP_RE.match(line)) and m.group(1) == site.host:
            result.recap = {k: int(v) for k, v in (kv.split("=") for kv in m.group(2).split())}
    assert result.recap, f"no play recap:\n{out}"
    assert result.recap["unreachable"] == 0, out
    return result


def ok(site: Site, playbook: str, variables: dict | None = None, *args: str) -> Play:
    p = play(site, playbook, variables, *args)
    assert p.rc == 0 and p.recap["failed"] == 0, p.output
    return p


def podman(site: Site, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """podman as root on the lab node (its namespaces, its container storage)."""
    return core.host_exec(site.lab, site.node, ["podman", *args], check=check, timeout=60)


def exists(site: Site, name: str) -> bool:
    return podman(site, "container", "exists", name, check=False).returncode == 0


def logs_until(site: Site, name: str, marker: str = "READY", timeout: float = 30) -> list[str]:
    """The container's output lines before ``marker`` (waits for it)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = podman(site, "logs", name).stdout.splitlines()
        if marker in lines:
            return lines[:lines.index(marker)]
        assert time.monotonic() < deadline, f"{name} never printed {marker}: {lines}"
        time.sleep(0.3)


def wait_exited(site: Site, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while podman(site, "container", "inspect", "--format", "{{.State.Status}}", name).stdout.strip() != "exited":
        assert time.monotonic() < deadline, f"{name} did not exit"
        time.sleep(0.3)


def job(name: str, run_id: str, script: str, **extra) -> dict:
    return {"workload_name": name, "workload_run_id": run_id, "workload_image": IMAGE,
            "workload_command": ["/bin/sh", "-c", script], **extra}


# --------------------------------------------------------------------------- tests


def test_module_docs():
    p = subprocess.run([tool("ansible-doc"), "-M", "roles/workload/library", "gpufleet_container"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0 and "gpufleet_container" in p.stdout and "run_id" in p.stdout, p.stderr
    p = subprocess.run([tool("ansible-doc"), "-M", "roles/workload/library", "gpufleet_container_info"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0 and "containers" in p.stdout, p.stderr


def test_cdi_gpus_by_uuid_idempotent_stop_and_remove(nvidia):
    gpus = nvidia.node.gpus
    chosen = [gpus[1], gpus[3]]
    spec = job("wl-cdi", "run-cdi-1", f"ls -1 /dev/nvidia*; {WAIT_FOR_STOP}",
               workload_devices=[f"nvidia.com/gpu={g['uuid']}" for g in chosen])

    first = ok(nvidia, "start", spec)
    assert first.recap["changed"] == 1, first.output
    assert first.container["state"] == "running" and first.container["run_id"] == "run-cdi-1"
    assert first.fact("workload_container")["id"] == first.container["id"]
    # inside the container: exactly the two GPUs asked for (by UUID), plus the spec's common nodes
    seen = logs_until(nvidia, "wl-cdi")
    assert sorted(seen) == sorted([f"/dev/nvidia{g['index']}" for g in chosen] + ["/dev/nvidiactl",
                                                                                   "/dev/nvidia-uvm"])

    again = ok(nvidia, "start", spec)
    assert again.recap["changed"] == 0, again.output
    assert again.container["id"] == first.container["id"] and again.container["state"] == "running"

    stopped = ok(nvidia, "stop", spec)
    assert stopped.recap["changed"] == 1, stopped.output
    assert stopped.container["state"] == "exited" and stopped.container["exit_code"] == 7
    assert stopped.container["finished_at"]
    assert podman(nvidia, "container", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}",
                  "wl-cdi").stdout.split() == ["exited", "7"]
    assert ok(nvidia, "stop", spec).recap["changed"] == 0
    # the same run started again stays exited, so its exit code can still be read
    kept = ok(nvidia, "start", spec)
    assert kept.recap["changed"] == 0 and kept.container["state"] == "exited"
    assert kept.container["exit_code"] == 7 and kept.container["id"] == first.container["id"]

    status = ok(nvidia, "status")
    assert [(c["name"], c["state"], c["exit_code"], c["run_id"]) for c in status.containers] == \
        [("wl-cdi", "exited", 7, "run-cdi-1")]
    assert status.fact("workload_containers") == status.containers

    gone = ok(nvidia, "stop", spec, "-e", "workload_state=absent")
    assert gone.recap["changed"] == 1 and gone.container["state"] == "missing", gone.output
    assert not exists(nvidia, "wl-cdi")
    assert ok(nvidia, "status").containers == []
    assert ok(nvidia, "stop", spec, "-e", "workload_state=absent").recap["changed"] == 0


def test_amd_devices(amd):
    assert podman(amd, "--version").returncode == 0
    on_host = core.host_exec(amd.lab, amd.node, ["ls", "/dev/dri"]).stdout.split()
    assert on_host == ["renderD128", "renderD129", "renderD130", "renderD131"]
    spec = job("wl-amd", "run-amd", f"ls /dev/kfd /dev/dri; {WAIT_FOR_STOP}",
               workload_devices=["/dev/kfd", "/dev/dri/renderD130"])
    ok(amd, "start", spec)
    seen = logs_until(amd, "wl-amd")
    assert "/dev/kfd" in seen and "renderD130" in seen
    assert not {"renderD128", "renderD129", "renderD131"} & set(seen), seen
    gone = ok(amd, "stop", spec, "-e", "workload_state=absent")
    assert gone.container["state"] == "missing" and not exists(amd, "wl-amd")


def test_task_exit_code_and_a_new_run_replaces_the_container(nvidia):
    spec = job("wl-exit", "run-a", "echo bye; exit 3")
    first = ok(nvidia, "start", spec)
    wait_exited(nvidia, "wl-exit")
    status = ok(nvidia, "status", {"workload_info_names": ["wl-exit"]})
    (info,) = status.containers
    assert (info["state"], info["exit_code"], info["run_id"]) == ("exited", 3, "run-a")
    assert info["labels"]["gpufleet.run_id"] == "run-a" and info["id"] == first.container["id"]
    assert info["started_at"] and info["finished_at"]
    # the same run again: not restarted
    same = ok(nvidia, "start", spec)
    assert same.recap["changed"] == 0 and same.container["exit_code"] == 3
    # stopping it as another run does nothing
    other = ok(nvidia, "stop", {**spec, "workload_run_id": "run-x"}, "-e", "workload_state=absent")
    assert other.recap["changed"] == 0 and exists(nvidia, "wl-exit")
    assert "left alone" in other.output
    # a new run under the same name replaces it
    new = ok(nvidia, "start", {**spec, "workload_run_id": "run-b",
                               "workload_command": ["/bin/sh", "-c", f"echo second; {WAIT_FOR_STOP}"]})
    assert new.recap["changed"] == 1 and new.module("container").result["actions"] == ["remove", "create"]
    assert new.container["id"] != first.container["id"] and new.container["run_id"] == "run-b"
    assert logs_until(nvidia, "wl-exit") == ["second"]
    ok(nvidia, "stop", {**spec, "workload_run_id": "run-b"}, "-e", "workload_state=absent")
    assert not exists(nvidia, "wl-exit")


def test_failures_give_podmans_message_and_leave_no_container(nvidia):
    missing = play(nvidia, "start", job("wl-noimage", "r1", "true",
                                        workload_image="localhost/gpufleet-missing:latest"))
    assert missing.rc != 0 and missing.recap["failed"] == 1
    fatal = missing.module("container")
    assert fatal.status == "fatal"
    assert fatal.result["msg"].startswith("pulling localhost/gpufleet-missing:latest failed: initializing source "
                                          "docker://localhost/gpufleet-missing:latest")
    assert not exists(nvidia, "wl-noimage")

    # podman creates the container before it resolves CDI devices: it must not be left behind
    bad_gpu = play(nvidia, "start", job("wl-badgpu", "r1", "true",
                                        workload_devices=["nvidia.com/gpu=GPU-00000000-no-such-gpu"]))
    assert bad_gpu.rc != 0
    assert "unresolvable CDI devices nvidia.com/gpu=GPU-00000000-no-such-gpu" in bad_gpu.module("container") \
        .result["msg"]
    assert not exists(nvidia, "wl-badgpu")

    # the OCI runtime fails to start the process: also created first, also removed
    no_exec = play(nvidia, "start", {**job("wl-noexec", "r1", "true"), "workload_command": ["/no/such/program"]})
    assert no_exec.rc != 0 and "/no/such/program" in no_exec.module("container").result["msg"]
    assert not exists(nvidia, "wl-noexec")

    # a container of that name that gpufleet did not make is never replaced
    podman(nvidia, "create", "--name", "wl-foreign", IMAGE, "true")
    try:
        foreign = play(nvidia, "start", job("wl-foreign", "r1", "true"))
        assert foreign.rc != 0 and "gpufleet did not create" in foreign.module("container").result["msg"]
        assert podman(nvidia, "container", "inspect", "--format", "{{.State.Status}}", "wl-foreign").stdout.strip() \
            == "created"
    finally:
        podman(nvidia, "rm", "-f", "wl-foreign")

    # values that would be options are refused before podman runs
    bad = play(nvidia, "start", {**job("wl-opt", "r1", "true"), "workload_image": "--privileged"})
    assert bad.rc != 0 and "not a valid image reference" in bad.module("msg").result["msg"]
    assert ok(nvidia, "status").containers == []


def test_templates_in_values_reach_the_container_literally(nvidia):
    template = "{{ lookup('pipe','id') }}"
    script = 'printf "%s\\n" "$TEMPLATE" "$SHELLISH" "$TILDE" "$YES" "$OCTAL" "{{ 6 * 7 }}" "$1" "$2"; ' + WAIT_FOR_STOP
    spec = job("wl-literal", "r-lit", script,
               workload_env={"TEMPLATE": template, "SHELLISH": "$HOME `id` $(id)", "TILDE": "~root/x",
                             "YES": "yes", "OCTAL": "007"},
               workload_labels={"note": "{{ 1 + 1 }}"})
    spec["workload_command"] += ["sh", "$HOME", "~/x"]
    ok(nvidia, "start", spec)
    assert logs_until(nvidia, "wl-literal") == [template, "$HOME `id` $(id)", "~root/x", "yes", "007",
                                                "{{ 6 * 7 }}", "$HOME", "~/x"]
    labels = json.loads(podman(nvidia, "container", "inspect", "--format", "{{json .Config.Labels}}",
                               "wl-literal").stdout)
    assert labels == {"gpufleet.run_id": "r-lit", "note": "{{ 1 + 1 }}"}
    ok(nvidia, "stop", spec, "-e", "workload_state=absent")


def test_cpu_and_memory_limits(nvidia):
    cpu = str(os.cpu_count() - 1)
    spec = job("wl-limits", "r-lim", "grep Cpus_allowed_list /proc/self/status; "
               "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max; "
               + WAIT_FOR_STOP, workload_cpuset_cpus=cpu, workload_memory_mib=96, workload_cpus=0.5)
    ok(nvidia, "start", spec)
    allowed, memory = logs_until(nvidia, "wl-limits")
    assert allowed.split() == ["Cpus_allowed_list:", cpu]
    assert int(memory) == 96 * 1024 * 1024
    quota = podman(nvidia, "container", "inspect", "--format", "{{.HostConfig.NanoCpus}}", "wl-limits").stdout
    assert int(quota) == 500_000_000
    ok(nvidia, "stop", spec, "-e", "workload_state=absent")


def test_check_mode_changes_nothing(nvidia):
    spec = job("wl-check", "r-check", WAIT_FOR_STOP)
    dry = ok(nvidia, "start", spec, "--check")
    assert dry.recap["changed"] == 1 and dry.module("container").result["actions"] == ["create"]
    assert not exists(nvidia, "wl-check")
    # tags select a phase: the start playbook run for the stop phase only does nothing
    tagged = ok(nvidia, "start", spec, "--tags", "workload_stop")
    assert tagged.recap["changed"] == 0 and not exists(nvidia, "wl-check")
    ok(nvidia, "start", spec, "--tags", "workload_start")
    assert [c["name"] for c in ok(nvidia, "status", None, "--tags", "workload_info").containers] == ["wl-check"]
    dry_stop = ok(nvidia, "stop", spec, "--check", "-e", "workload_state=absent")
    assert dry_stop.module("container").result["actions"] == ["stop", "remove"]
    assert podman(nvidia, "container", "inspect", "--format", "{{.State.Status}}", "wl-check").stdout.strip() \
        == "running"
    ok(nvidia, "stop", spec, "-e", "workload_state=absent")
    assert not exists(nvidia, "wl-check")
