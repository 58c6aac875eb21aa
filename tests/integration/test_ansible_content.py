"""gpufleet's Ansible content as pipelines use it, and its quality gates, on the local lab.

- ansible-lint (production profile) and yamllint report nothing;
- `molecule test -s <role>` for each role's scenario (default driver, unmanaged, the lab's node as
  the instance, reached through the login node with an inventory gpufleet exported);
- the gpufleet.fleet collection built, installed into a temporary path, its docs readable and its
  probe playbook run by FQCN;
- the inventory plugin (fleet file -> groups and connection settings; GPU groups once applied);
- a pipeline: export an inventory, then the user's own playbook (docs/ansible.md) probes, starts a
  job on two GPUs and stops it, with no gpufleet CLI call in between.

Every tool runs from the virtualenv next to sys.executable, with host-key checking on, and with
ANSIBLE_HOME in a temporary folder (nothing lands in ~/.ansible or the checkout).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import BIN, tool

from gpufleet.config import load_fleet
from gpufleet.inventory import GeneratedFiles, group_name, write_fleet_files
from gpufleet.lab import core

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
GPUS = 4
SCENARIOS = ["gpu_probe", "container_runtime", "workload"]
COLLECTION_VERSION = yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"]
RECAP_RE = re.compile(r"^(\S+)\s+:\s+(ok=.*)$", re.M)


def base_env(tmp: Path) -> dict[str, str]:
    """This environment without Ansible or Molecule settings of its own, and with a private ANSIBLE_HOME
    (ansible-lint and Molecule would otherwise install the collection into ~/.ansible or ./.ansible)."""
    env = {k: v for k, v in os.environ.items()
           if k != "VIRTUAL_ENV" and not k.startswith(("ANSIBLE_", "MOLECULE_", "GPUFLEET_MOLECULE_"))}
    (tmp / "ansible-home").mkdir(parents=True, exist_ok=True)
    env.update(PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]), ANSIBLE_HOME=str(tmp / "ansible-home"),
               ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_NOCOLOR="1", NO_COLOR="1", PY_COLORS="0",
               ANSIBLE_RETRY_FILES_ENABLED="False", ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-home" / "tmp"),
               TERM="dumb", COLUMNS="200")
    return env


def run(argv: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def output(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-20000:]}\n--- stderr\n{p.stderr[-8000:]}"


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, output(p)
    return p


def recap(p: subprocess.CompletedProcess, host: str) -> dict[str, int]:
    found = {m.group(1): m.group(2) for m in RECAP_RE.finditer(p.stdout)}
    assert host in found, output(p)
    return {k: int(v) for k, v in (kv.split("=") for kv in found[host].split())}


@dataclass
class Site:
    lab: core.Lab
    node: core.LabHost
    files: GeneratedFiles
    home: Path
    tmp: Path
    env: dict[str, str]

    @property
    def host(self) -> str:  # the node's inventory name
        return self.node.address

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """podman as root on the lab node (its namespaces, its container storage)."""
        return core.host_exec(self.lab, self.node, ["podman", *args], check=check, timeout=60)


@pytest.fixture(scope="module")
def site(lab_factory, tmp_path_factory) -> Site:
    lab = lab_factory(nodes=1, gpus=GPUS, vendor="nvidia")
    tmp = tmp_path_factory.mktemp("ansible-content")
    home = tmp / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPUFLEET_HOME", str(home))
        files = write_fleet_files(load_fleet(lab.fleet_file), tmp / "inventory")
    env = {**base_env(tmp), "GPUFLEET_HOME": str(home)}
    return Site(lab, lab.nodes[0], files, home, tmp, env)


@pytest.fixture(scope="module")
def collection(site) -> Path:
    """The collection built from this checkout and installed into a temporary collections path."""
    dist, installed = site.tmp / "dist", site.tmp / "collections"
    ok(run([tool("ansible-galaxy"), "collection", "build", "--output-path", str(dist), str(ROOT)], site.env))
    artifact = dist / f"gpufleet-fleet-{COLLECTION_VERSION}.tar.gz"
    assert artifact.exists(), list(dist.iterdir())
    ok(run([tool("ansible-galaxy"), "collection", "install", "-p", str(installed), str(artifact)], site.env,
           cwd=site.tmp))
    return artifact


def collection_env(site: Site) -> dict[str, str]:
    """Only the installed collection: no roles path, run outside the checkout."""
    return {**site.env, "ANSIBLE_COLLECTIONS_PATH": str(site.tmp / "collections")}


# --------------------------------------------------------------------------- lint


def test_ansible_lint_production_profile_reports_nothing(tmp_path):
    config = yaml.safe_load((ROOT / ".ansible-lint").read_text())
    assert config["profile"] == "production"
    assert not config.get("skip_list") and not config.get("warn_list"), "no blanket skips"
    cache_before = (ROOT / ".ansible").exists()
    p = run([tool("ansible-lint"), "--profile", "production", "--nocolor"], base_env(tmp_path))
    assert p.returncode == 0, output(p)
    assert "0 failure(s), 0 warning(s)" in p.stdout + p.stderr, output(p)
    assert cache_before or not (ROOT / ".ansible").exists(), "ansible-lint left its cache in the checkout"


def test_yamllint_is_clean(tmp_path):
    ok(run([tool("yamllint"), "--strict", "."], base_env(tmp_path)))


# --------------------------------------------------------------------------- molecule


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(site, scenario):
    env = {**site.env, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"),
           "GPUFLEET_MOLECULE_INVENTORY": str(site.files.inventory), "GPUFLEET_MOLECULE_HOST": site.host,
           "GPUFLEET_MOLECULE_GPUS": str(GPUS), "GPUFLEET_MOLECULE_IMAGE": core.LAB_IMAGE,
           "MOLECULE_GLOB": "molecule/*/molecule.yml",
           "MOLECULE_EPHEMERAL_DIRECTORY": str(site.tmp / f"molecule-{scenario}")}
    p = run([tool("molecule"), "test", "-s", scenario], env)
    text = p.stdout + p.stderr
    assert p.returncode == 0, output(p)
    for step in ("converge", "idempotence", "verify"):
        assert re.search(rf"{scenario}\W+{step}\W+Executed: Successful", text), f"{step} did not run:\n{text}"
    assert re.search(rf"^{scenario}\s+: .*failed=0", text, re.M), text
    # through the login node, host keys checked: the node's key was recorded on first contact
    assert site.host in site.files.known_hosts.read_text()
    if scenario == "workload":
        assert site.podman("container", "exists", "molecule-workload", check=False).returncode == 1


# --------------------------------------------------------------------------- the collection


def test_collection_holds_the_ansible_content_only(collection):
    with tarfile.open(collection) as tar:
        names = set(tar.getnames())
    for role in ("gpu_probe", "container_runtime", "workload"):
        for part in ("tasks/main.yml", "defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml", "README.md"):
            assert f"roles/{role}/{part}" in names, (role, part)
    for name in ("playbooks/probe.yml", "playbooks/start.yml", "playbooks/stop.yml", "playbooks/status.yml",
                 "playbooks/container_runtime.yml", "plugins/inventory/fleet.py", "meta/runtime.yml",
                 "plugins/modules/gpufleet_probe.py", "plugins/modules/gpufleet_container.py",
                 "plugins/modules/gpufleet_container_info.py", "plugins/module_utils/gpufleet_gpus.py",
                 "plugins/module_utils/gpufleet_inspect.py", "roles/workload/module_utils/gpufleet_inspect.py",
                 "tests/sanity/ignore-2.19.txt"):
        assert name in names, name
    for prefix in ("gpufleet/", ".venv", "molecule/", "scripts/", "inventory_templates/", ".git/", "benchmarks/",
                   "pyproject.toml", "playbooks/roles"):
        assert not [n for n in names if n.startswith(prefix)], prefix
    # of tests/, only ansible-test's sanity ignore file (tests/integration/test_sanity.py)
    assert not [n for n in names if n.startswith("tests/") and not n.startswith("tests/sanity")], names


def test_collection_docs(site, collection):
    env = collection_env(site)
    for module, word in (("gpufleet_probe", "runtime_root"), ("gpufleet_container", "run_id"),
                         ("gpufleet_container_info", "containers")):
        p = ok(run([tool("ansible-doc"), f"gpufleet.fleet.{module}"], env, cwd=site.tmp))
        assert word in p.stdout, p.stdout
    p = ok(run([tool("ansible-doc"), "-t", "inventory", "gpufleet.fleet.fleet"], env, cwd=site.tmp))
    assert "enable_plugins" in p.stdout
    for role in ("gpu_probe", "container_runtime", "workload"):
        ok(run([tool("ansible-doc"), "-t", "role", f"gpufleet.fleet.{role}"], env, cwd=site.tmp))


def test_collection_probe_playbook_by_fqcn(site, collection):
    p = ok(run([tool("ansible-playbook"), "gpufleet.fleet.probe", "-i", str(site.files.inventory), "-v"],
               collection_env(site), cwd=site.tmp))
    assert recap(p, site.host)["failed"] == 0
    # the collection's role ran (not a checkout's), and found the node's GPUs
    assert "TASK [gpufleet.fleet.gpu_probe : Probe GPUs" in p.stdout, p.stdout
    assert f"GPUs: {' '.join(['H100'] * GPUS)}; runtime: podman (usable: True); problems: 0" in p.stdout, p.stdout


def test_collection_runtime_start_and_stop_playbooks_by_fqcn(site, collection):
    env, inventory = collection_env(site), str(site.files.inventory)
    # container_runtime includes gpu_probe by its short name: resolved inside the collection
    p = ok(run([tool("ansible-playbook"), "gpufleet.fleet.container_runtime", "-i", inventory], env, cwd=site.tmp))
    assert "TASK [gpufleet.fleet.gpu_probe : Probe GPUs" in p.stdout, p.stdout
    assert re.search(r"podman \S+; GPU support: nvidia=cdi; missing: nothing", p.stdout), p.stdout
    job = site.tmp / "fqcn-job.yml"
    job.write_text('workload_name: !unsafe "fqcn-job"\nworkload_run_id: !unsafe "fqcn-1"\n'
                   f'workload_image: !unsafe "{core.LAB_IMAGE}"\n'
                   'workload_command: !unsafe ["/bin/sh", "-c", "sleep 1000"]\n')
    common = ["-i", inventory, "--limit", site.host, "-e", f"@{job}"]
    p = ok(run([tool("ansible-playbook"), "gpufleet.fleet.start", *common], env, cwd=site.tmp))
    assert recap(p, site.host)["changed"] == 1
    assert site.podman("container", "inspect", "--format", "{{.State.Status}}", "fqcn-job").stdout.strip() == "running"
    p = ok(run([tool("ansible-playbook"), "gpufleet.fleet.stop", *common, "-e", "workload_state=absent"], env,
               cwd=site.tmp))
    assert recap(p, site.host)["changed"] == 1
    assert site.podman("container", "exists", "fqcn-job", check=False).returncode == 1


# --------------------------------------------------------------------------- inventory plugin


def plugin_fleet(site: Site, path: Path, plugin: bool = True) -> Path:
    text = site.lab.fleet_file.read_text()
    path.write_text(("plugin: gpufleet.fleet.fleet\n" if plugin else "") + text)
    return path


def inventory_json(p: subprocess.CompletedProcess) -> dict:
    return json.loads(ok(p).stdout)


def test_inventory_plugin(site, collection):
    home = site.tmp / "plugin-home"
    env = {**collection_env(site), "GPUFLEET_HOME": str(home), "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True"}
    fleet_file = plugin_fleet(site, site.tmp / "fleet.yml")
    fleet = load_fleet(fleet_file)
    group = group_name(fleet.name)
    inventory = [tool("ansible-inventory"), "-i", str(fleet_file)]

    # without state: the fleet's group only, and the generated connection settings on the host
    listing = inventory_json(run(inventory + ["--list"], env, cwd=site.tmp))
    assert listing[group]["hosts"] == [site.host]
    assert not [g for g in listing if g.startswith("gpu_")], listing
    host_vars = inventory_json(run(inventory + ["--host", site.host], env, cwd=site.tmp))
    ssh_config = home / "fleets" / fleet.name / "ssh_config"
    assert host_vars["ansible_ssh_common_args"] == f"-F {ssh_config}"
    assert host_vars["ansible_host_key_checking"] is True and host_vars["gpufleet_fleet"] == fleet.name
    assert ssh_config.exists() and not (home / "state.db").exists()
    # and they work: through the login node, host keys checked (recorded on first contact)
    ok(run([tool("ansible"), "-i", str(fleet_file), group, "-m", "ansible.builtin.ping"], env, cwd=site.tmp))
    assert site.host in (home / "fleets" / fleet.name / "known_hosts").read_text()

    # applied: groups per GPU vendor and model from the state, and the probed runtime
    ok(run([sys.executable, "-m", "gpufleet", "apply", "-f", str(fleet_file), "-y"], env, cwd=site.tmp))
    graph = ok(run(inventory + ["--graph"], env, cwd=site.tmp)).stdout
    listing = inventory_json(run(inventory + ["--list"], env, cwd=site.tmp))
    for g in (group, "gpu_vendor_nvidia", "gpu_model_h100"):
        assert f"@{g}:" in graph and listing[g]["hosts"] == [site.host], graph
    host_vars = inventory_json(run(inventory + ["--host", site.host], env, cwd=site.tmp))
    assert host_vars["gpufleet_runtime"] == "podman" and host_vars["gpufleet_runtime_become"] is True
    p = ok(run([tool("ansible-playbook"), "gpufleet.fleet.status", "-i", str(fleet_file), "--limit",
                "gpu_model_h100"], env, cwd=site.tmp))
    assert recap(p, site.host)["failed"] == 0

    # enabled by name, it takes a fleet file without the plugin line
    bare = plugin_fleet(site, site.tmp / "bare-fleet.yml", plugin=False)
    listing = inventory_json(run([tool("ansible-inventory"), "-i", str(bare), "--list"],
                                 {**env, "ANSIBLE_INVENTORY_ENABLED": "gpufleet.fleet.fleet"}, cwd=site.tmp))
    assert listing[group]["hosts"] == [site.host]


def test_inventory_plugin_bad_fleet_is_refused_with_gpufleets_message(site, collection):
    env = {**collection_env(site), "GPUFLEET_HOME": str(site.tmp / "plugin-home-bad"),
           "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True"}
    bad = plugin_fleet(site, site.tmp / "bad-fleet.yml")
    bad.write_text(bad.read_text().replace("blocks: auto", "blocks: 0"))
    p = run([tool("ansible-inventory"), "-i", str(bad), "--graph"], env, cwd=site.tmp)
    assert p.returncode != 0
    assert re.search(r"bad-fleet\.yml:\d+:\d+: blocks: must be \"auto\" or a whole number >= 1", p.stderr), p.stderr


def test_inventory_plugin_without_gpufleet_says_so(site, collection):
    shadow = site.tmp / "no-gpufleet" / "gpufleet"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named gpufleet (simulated)')\n")
    env = {**collection_env(site), "PYTHONPATH": str(shadow.parent), "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True"}
    p = run([tool("ansible-inventory"), "-i", str(plugin_fleet(site, site.tmp / "fleet-nogf.yml")), "--graph"],
            env, cwd=site.tmp)
    assert p.returncode != 0
    assert "inventory plugin needs the gpufleet Python package" in p.stderr, p.stderr
    assert "No module named gpufleet (simulated)" in p.stderr and "pip install gpufleet" in p.stderr


# --------------------------------------------------------------------------- a pipeline


def example_playbook() -> str:
    """The example playbook of docs/ansible.md (the yaml block after its marker), as users copy it."""
    text = (ROOT / "docs" / "ansible.md").read_text()
    marker = text.index("<!-- example-playbook:")
    match = re.compile(r"```yaml\n(.*?)```", re.S).search(text, marker)
    assert match, "docs/ansible.md: no yaml block after the example-playbook marker"
    return match.group(1)


def test_pipeline_export_then_own_playbook_probes_starts_and_stops(site, collection):
    # 1. export an inventory (the only gpufleet call)
    home, out = site.tmp / "pipeline-home", site.tmp / "pipeline-inv"
    p = ok(run([sys.executable, "-m", "gpufleet", "inventory", "-f", str(site.lab.fleet_file), "--out", str(out)],
               {**site.env, "GPUFLEET_HOME": str(home)}))
    inventory = out / "inventory.yml"
    for line in (f"inventory:   {inventory}", f"ssh_config:  {out / 'ssh_config'}",
                 f"known_hosts: {out / 'known_hosts'}", f"ansible-playbook -i {inventory} gpufleet.fleet.probe"):
        assert line in p.stdout, p.stdout

    # 2. the user's own playbook, with the installed collection only, from the user's own folder
    work = site.tmp / "pipeline"
    work.mkdir()
    (work / "train.yml").write_text(example_playbook())
    env = {**collection_env(site), "GPUFLEET_HOME": str(site.tmp / "pipeline-unused-home")}
    playbook = [tool("ansible-playbook"), "-i", str(inventory), "train.yml"]

    started = ok(run(playbook, env, cwd=work))
    assert recap(started, site.host)["changed"] == 1, started.stdout
    assert "train is running" in started.stdout, started.stdout
    state = json.loads(site.podman("container", "inspect", "train").stdout)[0]
    assert state["State"]["Status"] == "running" and state["Config"]["Labels"]["gpufleet.run_id"] == "train-1"
    devices = site.podman("exec", "train", "ls", "-1", "/dev").stdout.split()
    first_two = [f"nvidia{g['index']}" for g in site.node.gpus[:2]]
    assert sorted(d for d in devices if re.fullmatch(r"nvidia\d+", d)) == sorted(first_two), devices
    assert site.host in (out / "known_hosts").read_text()

    again = ok(run(playbook, env, cwd=work))
    assert recap(again, site.host)["changed"] == 0, again.stdout

    stopped = ok(run(playbook + ["-e", "train_state=absent"], env, cwd=work))
    assert recap(stopped, site.host)["changed"] == 1, stopped.stdout
    assert "train is missing" in stopped.stdout, stopped.stdout
    assert site.podman("container", "exists", "train", check=False).returncode == 1
    # nothing of gpufleet's state was needed or made
    assert not (site.tmp / "pipeline-unused-home").exists()
