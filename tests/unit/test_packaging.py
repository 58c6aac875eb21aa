"""Packaging: one version everywhere, and an sdist that carries the Ansible content (a wheel built
from it has the content inside the package). The wheel installed and used on the lab:
tests/integration/test_wheel_lab.py."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import yaml

import gpufleet

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GALAXY_VERSION = yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"]
CONTENT = ["playbooks/probe.yml", "playbooks/start.yml", "roles/workload/tasks/main.yml",
           "roles/workload/library/gpufleet_container.py", "roles/workload/module_utils/gpufleet_inspect.py",
           "roles/gpu_probe/library/gpufleet_probe.py", "roles/gpu_probe/module_utils/gpufleet_gpus.py",
           "plugins/modules/gpufleet_probe.py", "plugins/module_utils/gpufleet_inspect.py",
           "plugins/inventory/fleet.py", "inventory_templates/ssh_config.j2",
           "inventory_templates/inventory.yml.j2"]

# the state store's Alembic scripts, read from the package's folder at run time
MIGRATIONS = ["gpufleet/migrations/__init__.py", "gpufleet/migrations/env.py", "gpufleet/migrations/script.py.mako",
              "gpufleet/migrations/versions/0004_baseline.py", "gpufleet/migrations/versions/0005_queue.py",
              "gpufleet/migrations/versions/0006_teams.py", "gpufleet/migrations/versions/0007_schedule.py",
              "gpufleet/migrations/versions/0008_metrics.py"]


def test_version_is_stated_once_and_everything_agrees(tmp_path):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in pyproject and "version" in pyproject["dynamic"]  # setup.py reads galaxy.yml
    assert not re.search(r"""__version__\s*=\s*["']\d+\.\d""", (ROOT / "gpufleet" / "__init__.py").read_text())
    assert importlib.metadata.version("gpufleet") == GALAXY_VERSION, "stale install: pip install -e '.[test]'"
    assert gpufleet.__version__ == GALAXY_VERSION
    p = subprocess.run([sys.executable, "-m", "gpufleet", "--version"], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == f"gpufleet {GALAXY_VERSION}"
    # the collection ansible-galaxy builds from this checkout
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(tmp_path), str(ROOT)],
                   capture_output=True, text=True, check=True, env={"ANSIBLE_HOME": str(tmp_path / "ah"),
                                                                    "PATH": f"{BIN}:/usr/bin:/bin"})
    artifact = tmp_path / f"gpufleet-fleet-{GALAXY_VERSION}.tar.gz"
    with tarfile.open(artifact) as tar:
        manifest = json.load(tar.extractfile("MANIFEST.json"))
        names = tar.getnames()
    assert manifest["collection_info"]["version"] == GALAXY_VERSION
    assert not {"setup.py", "MANIFEST.in", "pyproject.toml"} & set(names)


def test_sdist_carries_the_content_and_its_wheel_has_it_in_the_package(tmp_path):
    """`python -m build` makes the sdist, then the wheel from that sdist (not from the checkout), with
    this environment's setuptools (no build isolation, so no network)."""
    src = tmp_path / "src"  # a copy, so the build leaves no egg-info or build/ in the checkout
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
        ".ansible", "benchmarks", "tests", "molecule"))
    p = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "project.license" not in p.stdout + p.stderr  # the TOML-table deprecation warning is gone

    sdist = tmp_path / "dist" / f"gpufleet-{GALAXY_VERSION}.tar.gz"
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
    for name in [*CONTENT, "galaxy.yml", "setup.py", "pyproject.toml", "gpufleet/paths.py"]:
        assert name in members, name
        assert members[name].isfile(), f"{name} is not a plain file in the sdist"  # links became copies
    assert not any(n.startswith("playbooks/roles") or "__pycache__" in n for n in members)

    wheel = tmp_path / "dist" / f"gpufleet-{GALAXY_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        metadata = whl.read(f"gpufleet-{GALAXY_VERSION}.dist-info/METADATA").decode()
        inspect = whl.read("gpufleet/_content/plugins/module_utils/gpufleet_inspect.py")
        role_inspect = whl.read("gpufleet/_content/roles/workload/module_utils/gpufleet_inspect.py")
    for name in CONTENT:
        assert f"gpufleet/_content/{name}" in names, name
    for name in MIGRATIONS:
        assert name in names, name
    for name in ("index.html", "app.js", "app.css", "icon.svg"):  # the web console (gpufleet.server.console)
        assert f"gpufleet/server/console/static/{name}" in names, name
    # the roles' links to plugins/ became copies of the same file
    assert inspect == role_inspect == (ROOT / "plugins/module_utils/gpufleet_inspect.py").read_bytes()
    assert not any(n.startswith("gpufleet/_content/playbooks/roles") or n.endswith(".pyc") for n in names)
    assert not any(n.split("/")[0] in ("playbooks", "roles", "plugins", "inventory_templates") for n in names)
    assert f"Version: {GALAXY_VERSION}\n" in metadata and "License-Expression: Apache-2.0\n" in metadata
    assert "Requires-Dist: alembic<2,>=1.13\n" in metadata
    assert "Requires-Dist: prometheus-client>=0.20\n" in metadata

    # the state store migrates from the installed package's folder: a new database, and one from
    # before Alembic, opened by the gpufleet unpacked from the wheel
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)
    code = """if True:
        import sqlite3, sys
        import gpufleet
        from gpufleet.state import Store
        assert gpufleet.__file__.startswith(sys.argv[1]), gpufleet.__file__
        Store("sqlite:///" + sys.argv[2] + "/new.db")
        old = sqlite3.connect(sys.argv[2] + "/old.db")
        old.executescript("CREATE TABLE fleets (name VARCHAR(64) PRIMARY KEY);"  # enough for revisions 0005 to 0008
                          "CREATE TABLE runs (name VARCHAR(64) PRIMARY KEY, status VARCHAR(32) NOT NULL);"
                          "CREATE TABLE gpufleet_schema (id INTEGER PRIMARY KEY, version INTEGER NOT NULL, "
                          "description VARCHAR(200) NOT NULL); INSERT INTO gpufleet_schema VALUES (1, 4, 'x')")
        old.close()
        print(Store("sqlite:///" + sys.argv[2] + "/old.db").engine.connect().exec_driver_sql(
            "SELECT version_num FROM alembic_version").scalar())
    """
    p = subprocess.run([sys.executable, "-c", code, str(site), str(tmp_path)], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0 and p.stdout.strip() == "0010_replicas", p.stderr[-4000:]
