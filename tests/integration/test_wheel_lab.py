"""gpufleet as platform engineers install it: a wheel built from this checkout, installed with pip into a
fresh virtualenv outside the repository, drives the whole lab flow with nothing from the checkout.

The wheel is built the way `pip install .` builds it (build isolation: setuptools from PyPI); the
venv gets its dependencies from PyPI too. Every command runs that venv's `gpufleet`, from a folder
outside the checkout, with this checkout's .venv off PATH and GPUFLEET_HOME in a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from gpufleet.lab import core

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
VERSION = yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"]


def run(argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, \
        f"exit {p.returncode}: {p.args}\n--- stdout\n{p.stdout[-8000:]}\n--- stderr\n{p.stderr[-8000:]}"
    return p


def test_wheel_in_a_fresh_venv_runs_the_lab_flow(lab_factory, tmp_path):
    del lab_factory  # only for its skip when not root; this test brings its lab up with the wheel's CLI
    assert not tmp_path.is_relative_to(ROOT)

    # 1. the wheel, as pip builds it (no project.license deprecation warning)
    dist = tmp_path / "dist"
    p = ok(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(dist), str(ROOT)]))
    assert "project.license" not in p.stdout + p.stderr
    wheel = dist / f"gpufleet-{VERSION}-py3-none-any.whl"
    assert wheel.exists(), list(dist.iterdir())

    # 2. a fresh venv (from the base interpreter, not this .venv) with only the wheel and its dependencies
    venv = tmp_path / "venv"
    ok(run([sys.executable, "-m", "venv", "--clear", str(venv)]))
    py, gf = venv / "bin" / "python", venv / "bin" / "gpufleet"
    ok(run([str(py), "-m", "pip", "install", "-q", str(wheel)], timeout=900))

    work = tmp_path / "work"  # cwd: outside the checkout
    work.mkdir()
    home = tmp_path / "home"
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not Path(d).resolve().is_relative_to(ROOT)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith(("GPUFLEET_", "ANSIBLE_"))}
    env.update(PATH=os.pathsep.join([str(venv / "bin"), *path]), GPUFLEET_HOME=str(home), COLUMNS="200",
               TERM="dumb", NO_COLOR="1")

    def gpufleet(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return ok(run([str(gf), *args], env=env, cwd=work, timeout=timeout))

    # the install refers to nothing in the checkout: package and content are under the venv
    assert gpufleet("--version").stdout.strip() == f"gpufleet {VERSION}"
    site = Path(ok(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       env=env, cwd=work)).stdout.strip())
    assert site.is_relative_to(venv) and site != Path(sysconfig.get_paths()["purelib"])
    where = json.loads(ok(run([str(py), "-c", "import json, gpufleet, gpufleet.paths as p, importlib.metadata as m; "
                                              "print(json.dumps([gpufleet.__file__, str(p.content_root()), "
                                              "m.version('gpufleet')]))"], env=env, cwd=work)).stdout)
    assert Path(where[0]).parent == site / "gpufleet"
    assert Path(where[1]) == site / "gpufleet" / "_content"
    assert where[2] == VERSION
    for name in ("playbooks/start.yml", "roles/workload/library/gpufleet_container.py",
                 "roles/workload/module_utils/gpufleet_inspect.py", "inventory_templates/ssh_config.j2"):
        assert (site / "gpufleet" / "_content" / name).is_file(), name
    installed = [f for f in site.rglob("*") if f.is_file() and (f.suffix == ".pth" or f.relative_to(site).parts[0]
                                                              in ("gpufleet", f"gpufleet-{VERSION}.dist-info"))]
    assert not [f for f in installed if os.fsencode(ROOT) in f.read_bytes()], "the install points into the checkout"
    assert not any(f.is_symlink() for f in (site / "gpufleet").rglob("*"))

    # 3. the lab flow with that CLI only
    lab_dir = home / "lab"
    gpufleet("lab", "up", "--nodes", "2", "--gpus", "8", timeout=900)
    lab = core.load(lab_dir)
    try:
        fleet_file = lab_dir / "fleet.yml"
        fleet = yaml.safe_load(fleet_file.read_text())["name"]
        gpufleet("apply", "-f", str(fleet_file), "-y")
        listed = {f["name"]: f for f in json.loads(gpufleet("fleet", "list", "--json").stdout)}
        instances = listed[fleet]["instances"]
        assert sorted(i["hostname"] for i in instances) == sorted(n.address for n in lab.nodes)
        for inst in instances:
            assert inst["status"] == "ready", inst
            assert inst["blocks"] == {"total": 8, "busy": 0}
            assert len(inst["gpus"]) == 8 and inst["resources"] == "8xH100 (80GB)"

        task = work / "task.yml"
        task.write_text(f"type: task\nname: wheel-task\nimage: {core.LAB_IMAGE}\nfleets: [{fleet}]\n"
                        "resources: {gpu: H100:2}\ncommands:\n"
                        "  - echo \"from-the-wheel gpus=$GPUFLEET_GPUS_NUM name=$DSTACK_RUN_NAME\"\n")
        out = gpufleet("apply", "-f", str(task), "-y", timeout=300).stdout
        assert "from-the-wheel gpus=2 name=wheel-task" in out, out

        assert gpufleet("ps").returncode == 0
        runs = {r["name"]: r for r in json.loads(gpufleet("ps", "-a", "--json").stdout)}
        run_ = runs["wheel-task"]
        assert run_["status"] == "done" and run_["exit_code"] == 0, run_
        assert len(run_["gpus"]) == 2 and run_["fleet"] == fleet
        assert "from-the-wheel gpus=2 name=wheel-task" in gpufleet("logs", "wheel-task").stdout
        after = json.loads(gpufleet("fleet", "list", "--json").stdout)
        assert all(i["blocks"]["busy"] == 0 for f in after if f["name"] == fleet for i in f["instances"])
        assert (home / "state.db").exists()  # the state went to this GPUFLEET_HOME
    finally:
        down = run([str(gf), "lab", "down"], env=env, cwd=work, timeout=600)
        if down.returncode != 0:  # never leave a lab behind
            core.down(lab_dir, log=lambda *_: None)
    ok(down)
    assert core.load(lab_dir) is None
    netns = run(["ip", "netns", "list"]).stdout
    assert not any(line.split()[0] == h.netns for h in lab.hosts for line in netns.splitlines() if line.strip())
