"""`resources.shm_size` (the container's /dev/shm) and `resources.disk` (a minimum against the host's
container storage, a maximum as the container's limit where the storage can) from the config to the
container module's argument vector; `spot_policy`; dstack's port forms and what `gpufleet attach`
makes of them (issue 14). The CPU architecture and disk placement: tests/unit/test_resources_forms.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from conftest import container_module
from runforms import problems, run
from test_hostpolicy import Failed, FakeModule

from gpufleet import runs
from gpufleet.launch import container_vars, published_ports
from gpufleet.models import GPU, RUN_CONFIG, HostFacts, RunRequest
from gpufleet.queue import request_of
from gpufleet.runconfig import UNSUPPORTED, parse_run
from gpufleet.tunnel import Forwarder

ROOT = Path(__file__).resolve().parents[2]




def vars_of(cfg) -> dict:
    facts = HostFacts(runtime={"name": "podman", "gpu_support": {"nvidia": "cdi"}})
    return container_vars(RunRequest(name="r", source="r.yml", config=cfg), "r1", {}, facts,
                          [GPU(vendor="nvidia", index=0, uuid="GPU-0")], 2, 1024, set())


def argv(mod, **params) -> list[str]:
    m = FakeModule(**params)
    return mod.run_argv(m.params["runtime"], m.params, mod.validate(m), "r1")


# ------------------------------------------------------------------------------------------ shm_size, disk

@pytest.mark.parametrize("shm,mib", [("256MB", 256), ("16GB", 16384), (2, 2048), ("1.5GB", 1536), (None, None)])
def test_shm_size_reaches_the_role_in_mib(shm, mib):
    v = vars_of(run(resources={"shm_size": shm} if shm is not None else {}))
    assert v["workload_shm_size_mib"] == mib


@pytest.mark.parametrize("disk,mib", [("100GB", 102400), ("100GB..", None), ("..1TB", 1048576),
                                      ({"size": "50GB..60GB"}, 61440), (None, None)])
def test_disk_maximum_is_the_containers_limit(disk, mib):
    v = vars_of(run(resources={"disk": disk} if disk is not None else {}))
    assert v["workload_disk_limit_mib"] == mib


def test_module_applies_shm_size_and_the_disk_limit(monkeypatch):
    mod = container_module(monkeypatch)
    args = argv(mod, shm_size_mib=256, disk_limit_mib=102400)
    dash = args.index("--")
    assert "--shm-size=256m" in args[:dash] and "--storage-opt=size=102400m" in args[:dash]
    assert not [a for a in argv(mod) if a.startswith(("--shm-size", "--storage-opt"))]
    for bad in ({"shm_size_mib": 0}, {"disk_limit_mib": -1}):
        with pytest.raises(Failed, match="must be > 0"):
            argv(mod, **bad)
    m = FakeModule()
    plain = mod.config_run_id(m.params, mod.validate(m))  # a container made before these options keeps its id
    m = FakeModule(shm_size_mib=256)
    assert mod.config_run_id(m.params, mod.validate(m)) != plain
    options = yaml.safe_load(mod.DOCUMENTATION)["options"]
    assert {"shm_size_mib", "disk_limit_mib"} <= set(options)


def test_the_role_passes_shm_size_and_the_disk_limit():
    root = ROOT / "roles" / "workload"
    start = next(t["gpufleet_container"] for t in yaml.safe_load((root / "tasks" / "main.yml").read_text())
                 if "gpufleet_container" in t)
    spec = yaml.safe_load((root / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    defaults = yaml.safe_load((root / "defaults" / "main.yml").read_text())
    for option in ("shm_size_mib", "disk_limit_mib"):
        assert start[option] == f"{{{{ workload_{option} }}}}"
        assert spec[f"workload_{option}"]["type"] == "int" and defaults[f"workload_{option}"] is None


@pytest.mark.parametrize("line,message", [
    ("resources: {shm_size: 0.5MB}", "shm_size '0.5MB' is less than 1MB"),
    ("resources: {shm_size: lots}", "is not a size"),
    ("resources: {disk: 2GB..1GB}", "is empty"),
])
def test_bad_shm_size_and_disk_point_at_the_field(tmp_path, line, message):
    text = problems(tmp_path, f"type: task\nimage: busybox\n{line}\n")
    assert f"{tmp_path / 'run.yml'}:3:" in text and message in text


def test_the_request_carries_the_arch_and_the_disk():
    req = request_of(run(resources={"cpu": "x86:4", "disk": "100GB.."}))
    assert (req.arch, req.cpu.min, req.disk.min, req.disk.max) == ("x86", 4, 100, None)
    assert request_of(run(resources={"cpu": 4})).arch is None


# ------------------------------------------------------------------------------------------ spot_policy

@pytest.mark.parametrize("policy", ["auto", "on-demand"])
def test_spot_policy_auto_and_on_demand_are_taken(tmp_path, policy):
    req = parse_run(f"type: task\nimage: busybox\nspot_policy: {policy}\n", str(tmp_path / "run.yml"))
    assert req.config.spot_policy == policy
    assert "spot_policy" not in UNSUPPORTED["task"]


def test_spot_policy_spot_is_refused_saying_why(tmp_path):
    text = problems(tmp_path, "type: dev-environment\nimage: busybox\nspot_policy: spot\n")
    assert f"{tmp_path / 'run.yml'}:3:" in text and "spot_policy" in text and "never spot instances" in text
    assert "Input should be" in problems(tmp_path, "type: task\nimage: busybox\nspot_policy: sometimes\n")


def test_real_dstack_runs_with_spot_policy_load():
    corpus = ROOT.parent / "shared" / "fixtures" / "dstack-configs" / "corpus"
    assert corpus.is_dir()
    found = 0
    for path in sorted(corpus.rglob("*.yml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and data.get("type") in ("task", "dev-environment", "service") and \
                data.get("spot_policy") is not None:
            found += 1
            assert run(data["type"], spot_policy=data["spot_policy"]).spot_policy == "auto"
    assert found >= 3


# ------------------------------------------------------------------------------------------ ports

@pytest.mark.parametrize("port,stored,pair", [
    (8000, 8000, (8000, 8000)),
    ("8080:8000", "8080:8000", (8080, 8000)),
    ("*:8000", "*:8000", (0, 8000)),
    ({"container_port": 8000, "local_port": 9000}, "9000:8000", (9000, 8000)),
    ({"container_port": 8000}, "*:8000", (0, 8000)),
    ({"container_port": 8000, "local_port": None}, "*:8000", (0, 8000)),
])
def test_dstacks_port_forms(port, stored, pair):
    cfg = run(ports=[port])
    assert cfg.ports == [stored]
    assert RUN_CONFIG.validate_python(cfg.model_dump(mode="json")).ports == [stored]
    assert runs.forwards(cfg.model_dump(mode="json")) == [pair]
    assert published_ports(cfg) == [str(pair[1])]


@pytest.mark.parametrize("port,message", [
    ("*:*", "is not a port"), ("8000:*", "is not a port"), ("*", "is not a port"), ("0", "between 1 and 65535"),
    ("*:70000", "between 1 and 65535"), ({"local_port": 8000}, "needs container_port"),
    ({"container_port": 8000, "host_port": 1}, "unknown field 'host_port'"),
    ({"container_port": "80"}, "must be a port number"), (True, "must be a number"),
])
def test_bad_ports_say_which_forms_there_are(port, message):
    with pytest.raises(ValueError, match=message):
        run(ports=[port])


def test_a_service_port_and_star_ports_are_published_once():
    cfg = run("service", ports=["*:8000", 9000, {"container_port": 9000, "local_port": 9100}])
    assert published_ports(cfg) == ["8000", "9000"]
    assert runs.forwards(cfg.model_dump(mode="json")) == [(8000, 8000), (0, 8000), (9000, 9000), (9100, 9000)]


def test_the_forwarder_binds_a_free_port_for_star():
    fwd = Forwarder(client=None, name="r", forwards=[(0, 8000)])
    fwd.listen()
    try:
        (local, remote), = fwd.forwards
        assert remote == 8000 and local > 0
        with socket.create_connection(("127.0.0.1", local), timeout=5):
            pass  # it listens there
    finally:
        fwd.close()
