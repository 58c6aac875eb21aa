"""`ssh RUN-NAME` into a dev environment, on the lab: the image's sshd runs in the container (an image
made here of busybox and this machine's own Debian sshd with its libraries), `gpufleet attach
--no-shell` writes the user's ssh entry (HOME is a temporary folder), and the real `ssh` reaches the
container through the server's tunnel and the fleet's jump chain, its host key pinned: a shell in
the container with the run's environment; a wrong pinned key is refused. `ide` on an image without
sshd fails the start with the reason; stopping the run removes its entry."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import Cli, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab
SSHD_IMAGE = "localhost/gpufleet-lab-sshd:latest"


def sshd_rootfs(busybox_tar: Path, out: Path) -> Path:
    """The lab's busybox root filesystem with /usr/sbin/sshd and the libraries it loads, the privilege
    separation user `sshd` and its /run/sshd (what OpenSSH 9.2 needs), as a tar for `podman import`."""
    sshd = Path("/usr/sbin/sshd")
    libs = set()
    for line in subprocess.run(["ldd", str(sshd)], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.add(path)
    with tarfile.open(busybox_tar) as src, tarfile.open(out, "w") as tar:
        have = set()
        for member in src.getmembers():
            if member.name in ("etc/passwd", "etc/group"):
                continue
            tar.addfile(member, src.extractfile(member) if member.isfile() else None)
            have.add(member.name.rstrip("/"))
        for d in ("usr", "usr/sbin", "usr/lib", "lib", "lib64", "lib/x86_64-linux-gnu", "run/sshd"):
            if d in have:  # the lab image's own (e.g. usr/ for usr/bin/gpu-burn): a second entry breaks the import
                continue
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path in [str(sshd), *sorted(libs)]:
            tar.add(os.path.realpath(path), path.lstrip("/"))
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/bin/false\n"),
                           ("etc/group", "root:x:0:\nnogroup:x:65534:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture(scope="module")
def site(lab_factory, tmp_path_factory):
    lab = lab_factory(nodes=1, gpus=2, vendor="nvidia")
    rootfs = sshd_rootfs(lab.run_dir / "busybox-rootfs.tar", tmp_path_factory.mktemp("sshd-image") / "rootfs.tar")
    for host in lab.nodes:
        subprocess.run(["podman", "import", "--quiet", str(rootfs), SSHD_IMAGE], check=True, capture_output=True,
                       env={**os.environ, **lab.host_env(host)})
    cli = Cli(tmp_path_factory.mktemp("ide-home") / "home")
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)
    return cli


def ssh(home: Path, name: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-F", str(home / ".ssh" / "config"), "-o", "BatchMode=yes", name, command],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(home)})


def test_ssh_run_name_reaches_the_dev_environment_with_its_host_key_pinned(site, tmp_path):
    assert shutil.which("ssh")
    home = tmp_path / "user"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host mine\n  User someone\n")  # the user's own: kept
    spec = tmp_path / "dev.yml"
    spec.write_text(f"type: dev-environment\nname: ide-dev\nimage: {SSHD_IMAGE}\nide: vscode\nstop_duration: 1\n"
                    "working_dir: /root\nenv:\n  GREETING: hello from the run\n"
                    "init:\n  - echo made-by-init > /root/marker\n")
    site("apply", "-f", str(spec), "-y", check=0, timeout=240)

    env = {"HOME": str(home)}
    out = site("attach", "ide-dev", "--no-shell", check=0, env=env).stdout
    assert "ssh ide-dev" in out and "vscode://vscode-remote/ssh-remote+ide-dev/root" in out, out
    user_config = (home / ".ssh" / "config").read_text()
    assert user_config.startswith("# gpufleet") and "Host mine\n  User someone\n" in user_config
    entry = (home / ".ssh" / "gpufleet" / "config").read_text()
    assert "Host ide-dev" in entry and "StrictHostKeyChecking yes" in entry
    assert (home / ".ssh" / "config").stat().st_mode & 0o077 == 0

    p = ssh(home, "ide-dev", 'cat /root/marker; echo "$GREETING"; id -u; cat /proc/1/cmdline | tr "\\0\\n" "  "')
    assert p.returncode == 0, p.stderr
    marker, greeting, uid, init = p.stdout.splitlines()[:4]
    assert (marker, greeting, uid) == ("made-by-init", "hello from the run", "0")
    assert "made-by-init" in init  # PID 1 of where ssh landed is the run's own start script: the container
    # a second attach keeps one entry and one pinned key
    site("attach", "ide-dev", "--no-shell", check=0, env=env)
    known = home / ".ssh" / "gpufleet" / "known_hosts"
    assert len(known.read_text().splitlines()) == 1

    # a wrong host key pinned: refused (strict checking, as no dstack entry does)
    good = known.read_text()
    from gpufleet.devssh import new_host_key

    known.write_text(f"gpufleet-ide-dev {new_host_key()[1]}\n")
    p = ssh(home, "ide-dev", "true")
    assert p.returncode != 0 and "host key" in p.stderr.lower(), p.stderr
    known.write_text(good)

    site("stop", "ide-dev", "-y", check=0, env=env)
    assert "Host ide-dev" not in (home / ".ssh" / "gpufleet" / "config").read_text()


def test_ide_on_an_image_without_sshd_fails_with_the_reason(site, tmp_path):
    spec = tmp_path / "nossh.yml"
    spec.write_text(f"type: dev-environment\nname: ide-nossh\nimage: {core.LAB_IMAGE}\nide: cursor\n")
    site("apply", "-f", str(spec), "-y", "-d", timeout=240)
    view = wait_for("the dev environment to fail",
                    lambda: '"status": "failed"' in (out := site("ps", "-a", "--json").stdout) and out, timeout=90)
    assert "has no sshd and could not install openssh-server" in view, view
    logs = site("logs", "ide-nossh").stdout
    assert "no package manager" in logs, logs


def test_inactivity_duration_stops_a_dev_environment_once_nobody_is_connected(site, tmp_path):
    home = tmp_path / "user"
    spec = tmp_path / "idle.yml"
    spec.write_text(f"type: dev-environment\nname: ide-idle\nimage: {SSHD_IMAGE}\ninactivity_duration: 15s\n"
                    "stop_duration: 1\n")
    site("apply", "-f", str(spec), "-y", check=0, timeout=240)
    site("attach", "ide-idle", "--no-shell", check=0, env={"HOME": str(home)})
    # connected for longer than its inactivity_duration: it keeps running
    p = ssh(home, "ide-idle", "sleep 18; echo still-here")
    assert p.returncode == 0 and "still-here" in p.stdout, p.stderr

    def status() -> dict:
        import json

        return next(r for r in json.loads(site("ps", "-a", "--json").stdout) if r["name"] == "ide-idle")

    assert status()["status"] == "running"
    # nobody connected: stopped after 15s (and a look or two)
    run = wait_for("the idle dev environment to be stopped",
                   lambda: (r := status())["status"] == "stopped" and r, timeout=60, every=2)
    assert "inactivity_duration (15s)" in run["message"], run
