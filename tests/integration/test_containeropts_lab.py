"""`resources` on the lab, in real podman containers: `shm_size` is the container's /dev/shm (podman's
64 MB without it, as dstack's default); `disk` with a maximum is refused on the lab's hosts (podman's
vfs storage on ext4 cannot limit a container's disk), the host named, while a minimum the host's storage
has places; a CPU architecture places on the lab's x86 hosts and `arm` is refused, saying why."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import Cli

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE


@pytest.fixture(scope="module")
def site(lab_factory, tmp_path_factory):
    lab = lab_factory(nodes=1, gpus=1, vendor="nvidia")
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
