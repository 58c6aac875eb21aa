"""Images on the lab, in real podman containers: a run without `image` gets the fleet's image for its
`python` (the server's, from its server.yml, when the fleet has none); a host that cannot pull the
image fails the start naming the host, the image and podman's reason; `registry_auth` pulls from a
real registry (distribution's `docker-registry`, htpasswd) whose password is in no process list, log,
state file or API response, and a wrong one fails naming the host and the registry's refusal
(issue 14)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Cli, wait_for

from gpufleet.lab import core

pytestmark = pytest.mark.lab
IMAGE = core.LAB_IMAGE
OTHER = "localhost/gpufleet-lab-py311:1"  # the lab's image under a second name, on the node
PASSWORD = "s3cr3t-Registry-pw-7Q"
REGISTRY_PORT = 5000


def _registry_binary() -> str:
    found = shutil.which("docker-registry") or shutil.which("registry")
    if not found or not shutil.which("htpasswd"):
        pytest.fail("docker-registry and htpasswd are needed (scripts/setup.sh installs docker-registry and "
                    "apache2-utils)")
    return found


@pytest.fixture(scope="module")
def site(lab_factory, tmp_path_factory):
    lab = lab_factory(nodes=1, gpus=1, vendor="nvidia")
    node = lab.nodes[0]
    core.host_exec(lab, node, ["podman", "tag", IMAGE, OTHER])
    fleet = tmp_path_factory.mktemp("images-fleet") / "fleet.yml"
    fleet.write_text(lab.fleet_file.read_text() + "images:\n"
                     f"  - {{image: {IMAGE}, python: '3.12', default: true}}\n"
                     f"  - {{image: {OTHER}, python: '3.11'}}\n")
    cli = Cli(tmp_path_factory.mktemp("images-home") / "home")
    # the server's images (its settings file), for a fleet without its own
    cli.home.mkdir(parents=True)
    (cli.home / "server.yml").write_text(f"images:\n  - {{image: {OTHER}, python: '3.13'}}\n")
    cli("apply", "-f", str(fleet), "-y", check=0)
    return lab, node, cli


def _task(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(f"type: task\nname: {name}\n{body}")
    return path


def _run(cli: Cli, name: str) -> dict:
    runs = json.loads(cli("ps", "-a", "--json", check=0).stdout)
    return next(r for r in runs if r["name"] == name)


def _image_of(lab, node, container: str) -> str:
    p = core.host_exec(lab, node, ["podman", "inspect", "--format", "{{.ImageName}}", container])
    return p.stdout.strip()


def test_python_chooses_among_the_fleets_images_and_none_fitting_is_refused(site, tmp_path):
    lab, node, cli = site
    path = _task(tmp_path, "py311", "python: '3.11'\ncommands: [echo hello-from-3.11, sleep 30]\n")
    plan = cli("apply", "-f", str(path), "--dry-run", check=0).stdout
    assert f"image: {OTHER}" in plan, plan
    cli("apply", "-f", str(path), "-y", "-d", check=0)
    wait_for("py311 to run", lambda: _run(cli, "py311")["status"] == "running", timeout=90)
    assert _image_of(lab, node, "gpufleet-py311") == OTHER
    cli("stop", "py311", "-y", check=0)
    # no python: the default one
    plain = _task(tmp_path, "plain", "commands: [echo hi]\n")
    assert f"image: {IMAGE}" in cli("apply", "-f", str(plain), "--dry-run", check=0).stdout
    # nothing configured for 3.10: refused, saying what is there
    p = cli("apply", "-f", str(_task(tmp_path, "py310", "python: '3.10'\ncommands: [echo hi]\n")), "-y")
    assert p.returncode != 0
    assert "python: 3.10: no image for Python 3.10 on fleet" in p.stderr, p.stderr
    assert f"(configured: {IMAGE} (3.12), {OTHER} (3.11))" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_a_fleet_without_images_takes_the_servers(site, tmp_path):
    lab, _, cli = site
    py313 = _task(tmp_path, "py313", "python: '3.13'\ncommands: [echo hi]\n")
    p = cli("apply", "-f", str(py313), "--dry-run")  # the fleet's list wins, and has no 3.13
    assert p.returncode != 0 and "no image for Python 3.13 on fleet" in p.stderr, p.stderr
    cli("apply", "-f", str(lab.fleet_file), "-y", check=0)  # the same fleet, without `images`
    assert f"image: {OTHER}" in cli("apply", "-f", str(py313), "--dry-run", check=0).stdout
    p = cli("apply", "-f", str(_task(tmp_path, "py39", "python: '3.9'\ncommands: [echo hi]\n")), "--dry-run")
    assert p.returncode != 0 and f"(configured: {OTHER} (3.13)); add one to the server's `images` (server.yml)" \
        in p.stderr, p.stderr


def test_a_host_that_cannot_pull_the_image_fails_the_start_naming_it(site, tmp_path):
    _, node, cli = site
    p = cli("apply", "-f", str(_task(tmp_path, "nope", "image: localhost/nope:1\ncommands: [echo hi]\n")), "-y")
    assert p.returncode != 0 and f"{node.address}: pulling localhost/nope:1 failed: " in p.stdout + p.stderr, p
    run = wait_for("nope to fail", lambda: (r := _run(cli, "nope"))["status"] == "failed" and r, timeout=90)
    assert run["message"].startswith(f"{node.address}: pulling localhost/nope:1 failed: "), run["message"]
    assert len(run["message"]) > len(f"{node.address}: pulling localhost/nope:1 failed: ") + 10


# ------------------------------------------------------------------------------------------ registry_auth

@pytest.fixture(scope="module")
def registry(site, tmp_path_factory):
    """docker-registry (htpasswd, plain HTTP) on the login node's cluster address, with the lab's image
    pushed as lab:1; the node's podman (only its own, in its mount namespace) takes it without TLS."""
    lab, node, _ = site
    binary = _registry_binary()
    d = tmp_path_factory.mktemp("registry")
    addr = f"{lab.cluster_gateway}:{REGISTRY_PORT}"
    htpasswd = subprocess.run(["htpasswd", "-iBn", "pulluser"], input=PASSWORD, capture_output=True, text=True,
                              check=True).stdout
    (d / "htpasswd").write_text(htpasswd)
    (d / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {d / 'data'}\nhttp:\n  addr: {addr}\n  secret: lab-only\n"
        f"auth:\n  htpasswd:\n    realm: lab\n    path: {d / 'htpasswd'}\n")
    log = open(d / "registry.log", "wb")
    proc = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{lab.login.netns}", "--", binary, "serve",
                             str(d / "config.yml")], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for("the registry to listen", lambda: b"listening on" in (d / "registry.log").read_bytes(), timeout=30)
        # the node's podman: this registry without TLS (a drop-in, bind-mounted in the node's namespace only)
        conf = d / "registries.conf.d"
        conf.mkdir()
        (conf / "50-lab.conf").write_text(f'[[registry]]\nlocation = "{addr}"\ninsecure = true\n')
        core.host_exec(lab, node, ["mount", "--bind", str(conf), "/etc/containers/registries.conf.d"])
        # push with an auth file (never the password on a command line, not even the test's)
        auth = d / "push-auth.json"
        auth.write_text(json.dumps({"auths": {addr: {"auth": __import__("base64").b64encode(
            f"pulluser:{PASSWORD}".encode()).decode()}}}))
        os.chmod(auth, 0o600)
        p = core.host_exec(lab, node, ["podman", "push", "--quiet", f"--authfile={auth}", IMAGE, f"{addr}/lab:1"],
                           check=False)
        assert p.returncode == 0, p.stderr
        auth.unlink()
        yield addr, d
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


class ProcessWatch:
    """Reads every process's command line on this machine (the lab hosts' among them) until stopped;
    ``seen`` holds the command lines that held the needle."""

    def __init__(self, needle: str):
        self.needle = needle.encode()
        self.seen: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if self.needle in cmdline:
                    self.seen.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
            self.scans += 1
            time.sleep(0.02)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            try:
                if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def test_registry_auth_pulls_and_the_password_is_nowhere(site, registry, tmp_path):
    lab, node, cli = site
    addr, d = registry
    body = (f"image: {addr}/lab:1\nregistry_auth:\n  username: pulluser\n  password: ${{{{ secrets.REG_PW }}}}\n"
            "commands: [echo pulled-with-auth]\n")
    with ProcessWatch(PASSWORD) as watch:
        p = cli("apply", "-f", str(_task(tmp_path, "private", body)), "-y", env={"REG_PW": PASSWORD}, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr + cli.server_log()
    assert "pulled-with-auth" in p.stdout
    assert watch.scans > 10 and watch.seen == [], watch.seen
    assert _run(cli, "private")["status"] == "done"
    # the registry was asked with the credentials (a pull by pulluser)
    assert b"pulluser" in (d / "registry.log").read_bytes()
    # nowhere: the CLI's output, the API's answers, the state directory (database, server log, ansible's
    # artifacts), the node's podman (its events log, its storage), the registry's log; no auth file left
    needle = PASSWORD.encode()
    assert needle not in (p.stdout + p.stderr).encode()
    for args in (("ps", "-a", "--json"), ("events",), ("logs", "private")):
        out = cli(*args)
        assert needle not in (out.stdout + out.stderr).encode(), args
    assert _files_holding(cli.home, needle) == []
    assert _files_holding(lab.host_dir(node), needle) == []
    assert needle not in (d / "registry.log").read_bytes()
    assert not [n for n in os.listdir("/tmp") if n.startswith("gpufleet-pull-")]


def test_registry_auth_with_a_wrong_password_fails_naming_the_host(site, registry, tmp_path):
    _, node, cli = site
    addr, _ = registry
    wrong = "not-the-Password-42"
    body = (f"image: {addr}/lab:1\nregistry_auth: {{username: pulluser, password: '{wrong}'}}\n"
            "commands: [echo should-not-run]\n")
    p = cli("apply", "-f", str(_task(tmp_path, "badauth", body)), "-y")
    assert p.returncode != 0 and "should-not-run" not in p.stdout and wrong not in p.stdout + p.stderr
    run = wait_for("badauth to fail", lambda: (r := _run(cli, "badauth"))["status"] == "failed" and r, timeout=90)
    assert run["message"].startswith(f"{node.address}: pulling {addr}/lab:1 failed: "), run["message"]
    assert "unauthorized" in run["message"].lower() or "authentication required" in run["message"].lower(), \
        run["message"]
    assert wrong not in json.dumps(run)
    assert _files_holding(cli.home, wrong.encode()) == []
