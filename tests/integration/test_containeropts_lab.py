"""`resources` on the lab, in real podman containers: `shm_size` is the container's /dev/shm (podman's
64 MB without it, as dstack's default); `disk` with a maximum is refused on the lab's hosts (podman's
vfs storage on ext4 cannot limit a container's disk), the host named, while a minimum the host's storage
has places; a CPU architecture places on the lab's x86 hosts and `arm` is refused, saying why; a
`*:8000` port gets a local port picked by `gpufleet attach`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import ROOT, Cli, wait_for
from test_tunnel_lab import http_get, read_until

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def site(lab_factory, tmp_path_factory):
    lab = lab_factory(nodes=1, gpus=2, vendor="nvidia")
    cli = Cli(tmp_path_factory.mktemp("containeropts-home") / "home")
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    return cli


def apply(cli: Cli, tmp_path: Path, name: str, body: str):
    """Submit task ``name`` attached (its output followed to its end)."""
    path = tmp_path / f"{name}.yml"
    path.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\n{body}")
    return cli("apply", "-f", str(path), "-y", timeout=240)


def shm_kib(out: str) -> int:
    """The size column of busybox's `df -k /dev/shm`."""
    line = next(line for line in out.splitlines() if line.rstrip().endswith("/dev/shm"))
    return int(line.split()[1])


def test_shm_size_is_the_containers_dev_shm(site, tmp_path):
    p = apply(site, tmp_path, "shm", "resources: {shm_size: 256MB, cpu: 'x86:1'}\ncommands: [df -k /dev/shm]\n")
    assert p.returncode == 0, p.stdout + p.stderr
    assert shm_kib(p.stdout) == 256 * 1024
    p = apply(site, tmp_path, "noshm", "commands: [df -k /dev/shm]\n")
    assert p.returncode == 0, p.stdout + p.stderr
    assert shm_kib(p.stdout) == 64000  # podman's default, 64 MB (65536000 bytes); dstack leaves docker's 64 MiB


def test_a_disk_limit_the_hosts_cannot_enforce_is_refused_naming_the_host(site, tmp_path):
    p = apply(site, tmp_path, "disk", "resources: {disk: 100GB}\ncommands: [echo never]\n")
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "Traceback" not in out, out
    # the lab's podman keeps its storage with vfs on the machine's file system (ext4 here)
    assert re.search(r"resources\.disk: 100GB: podman on 198\.19\.\d+\.\d+ cannot limit a container's disk "
                     r"\((vfs|overlay) on [a-z0-9]+\); remove it or use a host with xfs project quotas", out), out
    p = apply(site, tmp_path, "mindisk", "resources: {disk: 1GB..}\ncommands: [echo placed]\n")
    assert p.returncode == 0 and "placed" in p.stdout, p.stdout + p.stderr


def test_a_cpu_architecture_the_hosts_lack_is_refused_saying_why(site, tmp_path):
    p = apply(site, tmp_path, "arm", "resources: {cpu: '1..:arm'}\ncommands: [echo never]\n")
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "Traceback" not in out, out
    assert "its CPUs are x86, the run asks for arm" in out, out


@contextmanager
def attached(cli: Cli, name: str):
    """`gpufleet attach NAME` running, and the local port it forwards to the container's 8000."""
    env = {**os.environ, "GPUFLEET_HOME": str(cli.home), "COLUMNS": "200", "TERM": "dumb"}
    attach = subprocess.Popen([sys.executable, "-m", "gpufleet", "attach", name], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        printed = read_until(attach, "Ctrl-C", timeout=60)
        m = re.search(r"forwarding localhost:(\d+) -> \S+:8000", printed)
        assert m and int(m.group(1)) > 0, printed
        yield int(m.group(1))
    finally:
        attach.send_signal(signal.SIGINT)
        try:
            attach.wait(timeout=15)
        except subprocess.TimeoutExpired:
            attach.kill()


def web_task(tmp_path: Path, name: str, extra: str = "") -> Path:
    """A task serving ``name`` on the container's 8000, published as `*:8000`."""
    path = tmp_path / f"{name}.yml"
    path.write_text(f"type: task\nname: {name}\nimage: {IMAGE}\n{extra}ports: ['*:8000']\ncommands:\n"
                    f"  - mkdir -p /www && echo I-am-{name} > /www/index.html\n"
                    "  - exec httpd -f -p 8000 -h /www\n")
    return path


def test_star_port_gets_a_free_local_port_at_attach(site, tmp_path):
    """`*:8000` (dstack's form): attach binds a local port it picks, forwarded to the container's 8000."""
    site("apply", "-f", str(web_task(tmp_path, "star")), "-y", "-d", check=0)
    try:
        with attached(site, "star") as port:
            body = wait_for("the task's answer on the picked port", lambda: http_get(port), timeout=30)
            assert body.strip() == "I-am-star"
    finally:
        site("stop", "star", "-y", check=0)


def test_two_runs_on_one_host_both_listening_on_8000_both_answer(site, tmp_path):
    """Single-node runs each have their own network namespace: two of them on the lab's one host both
    listen on 8000, and `gpufleet attach` reaches each one's own server."""
    names = ("porta", "portb")
    for name in names:
        site("apply", "-f", str(web_task(tmp_path, name, "resources: {gpu: 1, cpu: 1..}\n")), "-y", "-d", check=0)
    try:
        def both_running():  # the earlier tests' runs may still be giving their blocks back
            rows = {r["name"]: r for r in json.loads(site("ps", "--json", check=0).stdout)}
            return rows if rows["porta"]["status"] == rows["portb"]["status"] == "running" else None

        rows = wait_for("both runs running", both_running, timeout=90)
        assert rows["porta"]["host"] == rows["portb"]["host"], rows  # one host
        with attached(site, "porta") as port_a, attached(site, "portb") as port_b:
            assert port_a != port_b
            for name, port in (("porta", port_a), ("portb", port_b)):
                body = wait_for(f"{name}'s answer", lambda port=port: http_get(port), timeout=30)
                assert body.strip() == f"I-am-{name}"
    finally:
        for name in names:
            site("stop", name, "-y", check=0)
