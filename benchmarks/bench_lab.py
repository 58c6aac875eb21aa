"""Benchmarks on the lab: fleet apply against the raw-SSH floor and plain Ansible defaults, and
`gpufleet ps` with a run on every node. Each brings up its own lab in a temporary folder."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from benchmarks.common import fmt, measure, median

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent
GPUFLEET = str(VENV / "gpufleet")

# the commands gpufleet_probe runs on a host (roles/gpu_probe), as one shell line
PROBE_SH = (
    "command -v nvidia-smi amd-smi hl-smi tt-smi >/dev/null; "
    "nvidia-smi --query-gpu=index,uuid,name,memory.total,pci.bus_id,driver_version --format=csv,noheader,nounits; "
    "nvidia-smi topo -m; hostname; nproc; cat /sys/devices/system/node/node*/cpulist 2>/dev/null; "
    "grep MemTotal /proc/meminfo; df -P /; ls /etc/cdi 2>/dev/null; "
    "podman info --format json >/dev/null 2>&1 || sudo -n podman info --format json"
)
# the minimal floor (issue 17): the cheapest commands that give the same facts. `sudo -n podman ps -q`
# proves the runtime usable as `podman info` does (it opens the storage, the state DB and the OCI runtime:
# a wrong --root or a missing runtime fails it, sudo without NOPASSWD fails it) in ~37 ms on a lab node,
# against ~200 ms for `sudo -n podman info` (dpkg-query for conmon/runc versions); `podman version`
# (~43 ms) fails the same ways. Its exit status is the script's.
MINIMAL_SH = (
    "nvidia-smi --query-gpu=index,name,memory.total,uuid,pci.bus_id --format=csv,noheader,nounits; "
    "nproc; cat /proc/meminfo; df -P; command -v podman docker; sudo -n podman ps -q"
)


@contextmanager
def lab(nodes: int, log=print, hops: int = 1):
    d = Path(tempfile.mkdtemp(prefix=f"gpufleet-bench-lab{nodes}-"))
    t0 = time.perf_counter()
    p = subprocess.run([GPUFLEET, "lab", "up", "--dir", str(d / "lab"), "--nodes", str(nodes), "--hops", str(hops)],
                       capture_output=True, text=True)
    if p.returncode:
        shutil.rmtree(d, ignore_errors=True)
        raise RuntimeError(f"lab up failed: {p.stdout}{p.stderr}")
    log(f"  lab of {nodes} nodes ({hops} hop{'s' if hops > 1 else ''}) up in {time.perf_counter() - t0:.1f}s")
    try:
        yield d
    finally:
        # the local server that the bench's applies started in its home goes with it
        subprocess.run([GPUFLEET, "server", "stop"], capture_output=True, text=True,
                       env={**os.environ, "GPUFLEET_HOME": str(d / "home")})
        subprocess.run([GPUFLEET, "lab", "down", "--dir", str(d / "lab")], capture_output=True, text=True)
        shutil.rmtree(d, ignore_errors=True)


def login_log(d: Path) -> Path:
    from gpufleet.lab.core import load
    lab_ = load(d / "lab")
    return lab_.host_dir(lab_.login) / "sshd.log"


def drops(logfile: Path, offset: int) -> tuple[int, int]:
    """Connections the login node's sshd refused past MaxStartups since ``offset``; the new offset."""
    try:
        data = logfile.read_bytes()
    except OSError:
        return 0, offset
    text = data[offset:].decode(errors="replace")
    return len(re.findall(r"MaxStartups|drop connection|exceeded MaxStartups", text)), len(data)


def close_masters(*dirs: Path) -> None:
    """Close every multiplexed master whose socket is under ``dirs``: the next run is cold."""
    socks = [p for d in dirs if d.exists() for p in d.rglob("*") if p.is_socket()]

    def close(sock: Path) -> None:
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True, timeout=10)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(close, socks))
    for _ in range(50):
        if not any(p.is_socket() for d in dirs if d.exists() for p in d.rglob("*")):
            break
        time.sleep(0.1)


def control_dir_of(home: Path) -> Path:
    """Where gpufleet run with GPUFLEET_HOME=``home`` keeps its ssh sockets: paths.control_dir, which is a
    short folder under /tmp (not home/cp) when home's path is long, as the bench's temporary homes are."""
    from gpufleet import paths

    old = os.environ.get("GPUFLEET_HOME")
    os.environ["GPUFLEET_HOME"] = str(home)
    try:
        return paths.control_dir()
    finally:
        if old is None:
            os.environ.pop("GPUFLEET_HOME", None)
        else:
            os.environ["GPUFLEET_HOME"] = old


class Contenders:
    """The same fleet reached three (four) ways."""

    def __init__(self, d: Path):
        self.d = d
        self.fleet = d / "lab" / "fleet.yml"
        self.home = d / "home"
        self.env = {**os.environ, "GPUFLEET_HOME": str(self.home), "PATH": f"{VENV}:{os.environ['PATH']}"}
        self.env.pop("GPUFLEET_DATABASE_URL", None)  # SQLite in the bench's own home
        self.control = control_dir_of(self.home)
        inv = d / "inv"
        subprocess.run([GPUFLEET, "inventory", "-f", str(self.fleet), "--out", str(inv)], env=self.env,
                       check=True, capture_output=True)
        self.inv = inv
        self.ssh_config = next(inv.rglob("ssh_config"))
        inventory = next(inv.rglob("inventory.yml"))
        text = self.ssh_config.read_text()
        self.jumps = [h for h in re.findall(r"^Host (\S+)", text, re.M) if re.search(r"-jump\d+$", h)]  # chain order
        self.jump = self.jumps[0]
        self.hosts = [h for h in re.findall(r"^Host (\S+)", text, re.M) if h not in self.jumps]
        # plain Ansible: no ControlMaster/ControlPersist in ssh_config (each host's connection makes its own
        # way through the login node), no pipelining, Ansible's own per-host ControlPersist (its default)
        plain_cfg = self.ssh_config.with_name("ssh_config.plain")
        plain_cfg.write_text("".join(line + "\n" for line in text.splitlines()
                                     if not line.strip().startswith("Control")))
        inv_text = inventory.read_text().replace(str(self.ssh_config), str(plain_cfg))
        inv_text = "".join(line + "\n" for line in inv_text.splitlines()
                           if not re.match(r"\s*(ansible_pipelining|ansible_control_path_dir):", line))
        self.plain_inventory = inventory.with_name("inventory.plain.yml")
        self.plain_inventory.write_text(inv_text)
        self.plain_playbook = d / "plain.yml"
        self.plain_playbook.write_text("- name: Probe (Ansible defaults)\n  hosts: all\n  roles:\n    - gpu_probe\n")
        self.ansible_cp = d / "ansible-cp"
        self.raw_script = d / "raw.sh"
        self.raw_script.write_text(
            "#!/bin/bash\n"
            f"CFG={shlex.quote(str(self.ssh_config))}\n"
            + "".join(f"ssh -F \"$CFG\" -o ControlPersist=120s -n {j} true || exit 3\n" for j in self.jumps) +
            "fail=0; pids=()\n"
            f"for h in {' '.join(self.hosts)}; do\n"
            f"  ssh -F \"$CFG\" -n \"$h\" {shlex.quote(PROBE_SH)} >/dev/null 2>&1 & pids+=($!)\n"
            "done\n"
            "for p in \"${pids[@]}\"; do wait $p || fail=$((fail+1)); done\n"
            "echo \"failed=$fail\"\n")
        self.minimal_script = d / "minimal.sh"
        self.minimal_script.write_text(self.raw_script.read_text().replace(shlex.quote(PROBE_SH),
                                                                           shlex.quote(MINIMAL_SH)))
        self.naive_script = d / "naive.sh"
        self.naive_script.write_text(
            "#!/bin/bash\n"
            f"CFG={shlex.quote(str(plain_cfg))}\n"
            "fail=0; pids=()\n"
            f"for h in {' '.join(self.hosts)}; do\n"
            f"  ssh -F \"$CFG\" -o ControlPath=none -n \"$h\" {shlex.quote(PROBE_SH)} >/dev/null 2>&1 & pids+=($!)\n"
            "done\n"
            "for p in \"${pids[@]}\"; do wait $p || fail=$((fail+1)); done\n"
            "echo \"failed=$fail\"\n")

    def cold(self) -> None:
        close_masters(self.home / "cp", self.control, self.inv, self.ansible_cp, Path.home() / ".ansible" / "cp")

    def run(self, who: str):
        if who == "gpufleet":
            m = measure([GPUFLEET, "apply", "-f", str(self.fleet), "-y"], env=self.env)
            m.extra["failed"] = 0 if m.rc == 0 else len(re.findall(r"unreachable|error:", m.out)) or len(self.hosts)
        elif who in ("raw", "minimal"):
            m = measure(["bash", str(self.raw_script if who == "raw" else self.minimal_script)], env=self.env)
            found = re.search(r"failed=(\d+)", m.out)
            m.extra["failed"] = int(found.group(1)) if found else len(self.hosts)
        elif who == "naive":
            m = measure(["bash", str(self.naive_script)], env=self.env)
            found = re.search(r"failed=(\d+)", m.out)
            m.extra["failed"] = int(found.group(1)) if found else len(self.hosts)
        elif who == "ansible":
            env = {k: v for k, v in self.env.items() if not k.startswith("ANSIBLE_")}
            env.update(ANSIBLE_ROLES_PATH=str(ROOT / "roles"), ANSIBLE_HOST_KEY_CHECKING="True",
                       ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.ansible_cp), ANSIBLE_NOCOLOR="1",
                       ANSIBLE_RETRY_FILES_ENABLED="False")
            m = measure([str(VENV / "ansible-playbook"), "-i", str(self.plain_inventory), str(self.plain_playbook)],
                        env=env)
            bad = sum(int(u) + int(f) for u, f in re.findall(r"unreachable=(\d+)\s+failed=(\d+)", m.out))
            m.extra["failed"] = bad if "PLAY RECAP" in m.out else len(self.hosts)
        else:
            raise ValueError(who)
        return m


LABELS = {"gpufleet": "gpufleet apply", "raw": "raw floor (1 master + parallel ssh)",
          "minimal": "minimal floor (1 master + parallel ssh, cheapest commands)",
          "ansible": "plain ansible-playbook (defaults)", "naive": "naive parallel ssh (no master)"}


def bench_apply(sizes: list[int], reps: int, ansible_max: int, log=print, hops: int = 1,
                who: list[str] | None = None) -> dict:
    """{n: {"lab_s": s, mode: {who: {"wall": [...], "cpu": [...], "mem": [...], "failed": [...], "drops": [...]}}}}"""
    results: dict = {}
    for n in sizes:
        t0 = time.perf_counter()
        with lab(n, log, hops) as d:
            results[n] = res = {"lab_s": time.perf_counter() - t0, "cold": {}, "warm": {}}
            c = Contenders(d)
            logf = login_log(d)
            who_all = who or ["gpufleet", "raw", "minimal"] + (["ansible"] if n <= ansible_max else []) + ["naive"]
            # untimed first contact: known_hosts filled, the fleet recorded, so every timed run does the same work
            for one in who_all:
                c.cold()
                c.run(one)
            for rep in range(reps):
                order = who_all[rep % len(who_all):] + who_all[:rep % len(who_all)]
                for one in order:
                    modes = ["cold"] if one == "naive" else ["cold", "warm"]
                    for mode in modes:
                        if mode == "cold":
                            c.cold()
                        _, off = drops(logf, 0)
                        m = c.run(one)
                        dropped, _ = drops(logf, off)
                        r = res[mode].setdefault(one, {"wall": [], "cpu": [], "mem": [], "failed": [], "drops": []})
                        r["wall"].append(m.wall)
                        r["cpu"].append(m.cpu)
                        r["mem"].append(m.peak_mib)
                        r["failed"].append(m.extra["failed"])
                        r["drops"].append(dropped)
                        log(f"  apply N={n} rep {rep + 1} {mode:4} {one:8}: {m.wall:6.2f}s wall, {m.cpu:6.2f}s cpu, "
                            f"{m.peak_mib:6.0f} MiB, {m.extra['failed']} failed, {dropped} dropped")
            c.cold()
    return results


TASK = """type: task
name: {name}
image: localhost/gpufleet-lab:latest
commands:
  - sleep 3600
resources:
  gpu: 8
"""


def bench_ps(nodes: int, reps: int, log=print) -> dict:
    with lab(nodes, log) as d:
        c = Contenders(d)
        p = subprocess.run([GPUFLEET, "apply", "-f", str(c.fleet), "-y"], env=c.env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"fleet apply failed: {p.stdout[-2000:]}")
        names = [f"psb-{i}" for i in range(nodes)]
        for name in names:
            (d / f"{name}.yml").write_text(TASK.format(name=name))

        def submit(name: str) -> int:
            return subprocess.run([GPUFLEET, "apply", "-f", str(d / f"{name}.yml"), "-y", "-d"], env=c.env,
                                  capture_output=True, text=True).returncode

        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            rcs = list(pool.map(submit, names))
        log(f"  ps: {nodes} runs started in {time.perf_counter() - t0:.1f}s ({rcs.count(0)} ok)")
        try:
            measure([GPUFLEET, "ps"], env=c.env)  # warm-up: connections open
            walls, cpus, running = [], [], []
            for rep in range(reps):
                m = measure([GPUFLEET, "ps"], env=c.env)
                walls.append(m.wall)
                cpus.append(m.cpu)
                running.append(m.out.count("running"))
                log(f"  ps rep {rep + 1}: {m.wall:.2f}s wall, {m.cpu:.2f}s cpu, {running[-1]} running")
        finally:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda n: subprocess.run([GPUFLEET, "stop", n, "-y"], env=c.env, capture_output=True),
                              names))
            c.cold()
        return {"nodes": nodes, "wall": walls, "cpu": cpus, "running": running, "started": rcs.count(0)}


def summarize_apply(results: dict) -> list[str]:
    lines = ["| N | mode | contender | wall s (median) | x raw floor | x minimal floor | controller CPU s | peak MiB "
             "| failed host-runs (all reps) | MaxStartups lines in the login log |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, res in results.items():
        for mode in ("cold", "warm"):
            raw = median(res[mode].get("raw", {}).get("wall", []))
            low = median(res[mode].get("minimal", {}).get("wall", []))  # nan in results from before issue 17
            for who, r in res[mode].items():
                w = median(r["wall"])
                lines.append(f"| {n} | {mode} | {LABELS.get(who, who)} | {fmt(w)} | {fmt(w / raw)} | {fmt(w / low)} | "
                             f"{fmt(median(r['cpu']))} | "
                             f"{fmt(max(r['mem']), 0)} | {sum(r['failed'])}/{len(r['failed']) * n} | "
                             f"{sum(r['drops'])} |")
    return lines
