"""What a run may touch on a host: the fleet's `policy` (config), the run's privileged/docker/network
fields, the pure check (gpufleet.hostpolicy), and what the container module and launch make of them."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT, container_module

from gpufleet import hostpolicy
from gpufleet.config import parse_fleet
from gpufleet.errors import ConfigError
from gpufleet.models import RUN_CONFIG, FleetPolicy, normal_host_path, path_is_under
from gpufleet.runconfig import load_run


def run(**fields):
    return RUN_CONFIG.validate_python({"type": "task", "image": "localhost/x:1", **fields})


POLICY = FleetPolicy.model_validate({"volumes": ["/data", "/scratch/"], "admins": {"volumes": ["/"],
                                                                                  "privileged": True}})


# ------------------------------------------------------------------------------------------ paths

@pytest.mark.parametrize("text,normal", [("/data", "/data"), ("/data/", "/data"), ("//data//x/./", "/data/x"),
                                         ("/", "/"), ("/./", "/")])
def test_host_paths_are_normalized_by_their_text(text, normal):
    assert normal_host_path(text) == normal


@pytest.mark.parametrize("text,why", [("data", "absolute"), ("/data/../etc", "'..'"), ("/data/..", "'..'"),
                                      ("/a:b", "':'"), ("/a,b", "','"), ("/a\nb", "control")])
def test_host_paths_that_are_refused(text, why):
    with pytest.raises(ValueError, match=why):
        normal_host_path(text)


@pytest.mark.parametrize("path,root,under", [("/data", "/data", True), ("/data/x/y", "/data", True),
                                             ("/database", "/data", False), ("/dat", "/data", False),
                                             ("/etc", "/", True), ("/", "/data", False)])
def test_under_is_by_whole_parts(path, root, under):
    assert path_is_under(path, root) is under


# ------------------------------------------------------------------------------------------ fleet file

def fleet_text(policy: str) -> str:
    return ("type: fleet\nname: gpu-a\nssh_config:\n  user: u\n  hosts: [h1]\n" + policy)


def test_fleet_policy_defaults_allow_nothing(tmp_path):
    fleet = parse_fleet(fleet_text(""), str(tmp_path / "f.yml"))
    p = fleet.config.policy
    assert (p.volumes, p.privileged, p.host_network) == ([], False, False)
    assert (p.admins.volumes, p.admins.privileged, p.admins.host_network) == ([], False, False)


def test_fleet_policy_is_read_and_normalized(tmp_path):
    text = fleet_text("policy:\n  volumes: [/data/, /scratch]\n  host_network: true\n"
                      "  admins:\n    volumes: [/]\n    privileged: true\n")
    p = parse_fleet(text, str(tmp_path / "f.yml")).config.policy
    assert p.volumes == ["/data", "/scratch"] and p.host_network and not p.privileged
    assert p.admins.volumes == ["/"] and p.admins.privileged


@pytest.mark.parametrize("policy,where,message", [
    ("policy:\n  volumes: [/data/../etc]\n", "7:13: policy.volumes[0]", "'..' is not allowed"),
    ("policy:\n  volumes: [data]\n", "7:13: policy.volumes[0]", "must be an absolute host path"),
    ("policy:\n  privileged: yes-please\n", "7:15: policy.privileged", "boolean"),
    ("policy:\n  privilegd: true\n", "7:3: policy.privilegd", "privileged"),
    ("policy:\n  admins:\n    root: true\n", "8:5: policy.admins.root", ""),
])
def test_bad_policies_point_at_file_line_and_field(tmp_path, policy, where, message):
    path = tmp_path / "f.yml"
    with pytest.raises(ConfigError) as e:
        parse_fleet(fleet_text(policy), str(path))
    text = str(e.value)
    assert f"{path}:{where}" in text and message in text, text


# ------------------------------------------------------------------------------------------ run config

def test_run_fields_privileged_docker_network(tmp_path):
    plain = run()
    assert (plain.privileged, plain.docker, plain.network) == (False, False, None)
    assert not plain.runs_privileged and not plain.host_network
    assert run(docker=True).runs_privileged and run(privileged=True).runs_privileged
    assert run(network="host").host_network
    assert run(nodes=2).host_network  # multi-node: always the host's network
    path = tmp_path / "r.yml"
    path.write_text("type: task\nimage: localhost/x:1\nnetwork: bridge\nprivileged: maybe\n")
    with pytest.raises(ConfigError) as e:
        load_run(path)
    text = str(e.value)
    assert f"{path}:3:10: network" in text and "'host'" in text, text
    assert f"{path}:4:13: privileged" in text, text


def test_real_dstack_files_privileged_and_docker_fields_are_read():
    """Every real dstack file that sets `privileged` or `docker` at the top: gpufleet never names those
    fields in an error (most files are refused for other fields: `python:` instead of `image:`...), and
    where the file loads, the value is dstack's."""
    corpus = ROOT.parent / "shared" / "fixtures" / "dstack-configs" / "corpus"
    assert corpus.is_dir(), f"{corpus} is missing (real dstack files, read from shared/)"
    found = loaded = 0
    for path in sorted(corpus.rglob("*.yml")):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or data.get("type") not in ("task", "service", "dev-environment") or \
                not ({"privileged", "docker"} & set(data)):
            continue
        found += 1
        try:
            cfg = load_run(path).config
        except ConfigError as e:
            assert not [str(p) for p in e.problems if p.field in ("privileged", "docker")], path
            continue
        loaded += 1
        assert (cfg.privileged, cfg.docker) == (data.get("privileged", False), data.get("docker", False)), path
        assert cfg.runs_privileged
    assert found >= 10 and loaded >= 1, (found, loaded)


# ------------------------------------------------------------------------------------------ the check

def test_a_member_may_mount_only_the_policys_paths():
    ok = run(volumes=["/data:/data", "/data/sub/:/x:ro", "/scratch:/s"])
    assert hostpolicy.violations(ok, POLICY, "member") == []
    bad = run(volumes=["/:/host", "/database:/db", "/data/../etc:/e", "/etc/ssh:/k"])
    got = hostpolicy.violations(bad, POLICY, "member", fleet="gpu-a")
    assert got == [
        "volume /:/host: fleet gpu-a lets runs mount only /data, /scratch (policy.volumes)",
        "volume /database:/db: fleet gpu-a lets runs mount only /data, /scratch (policy.volumes)",
        "volume /data/../etc:/e: '/data/../etc': '..' is not allowed in a host path (write the path it leads to) "
        "(policy.volumes)",
        "volume /etc/ssh:/k: fleet gpu-a lets runs mount only /data, /scratch (policy.volumes)",
    ]


def test_default_policy_refuses_every_host_path_privileged_and_host_network():
    cfg = run(volumes=["/data:/d"], privileged=True, docker=True, network="host")
    got = hostpolicy.violations(cfg, FleetPolicy(), "member", fleet="gpu-a")
    assert got == [
        "volume /data:/d: fleet gpu-a lets runs mount no host path (policy.volumes)",
        "privileged: fleet gpu-a does not allow privileged runs (policy.privileged)",
        "docker: fleet gpu-a does not allow privileged runs, which docker: true needs (policy.privileged)",
        "network: host: fleet gpu-a does not allow single-node runs on the host's network (policy.host_network)",
    ]
    assert hostpolicy.violations(cfg, None, "member") == [m.replace("fleet gpu-a", "this fleet") for m in got]
    # a multi-node run is on the host's network by necessity, not by asking
    assert hostpolicy.violations(run(nodes=2, network="host"), FleetPolicy(), "member") == []


def test_project_admins_get_the_admins_additions_and_server_admins_everything():
    cfg = run(volumes=["/:/host"], privileged=True)
    assert hostpolicy.violations(cfg, POLICY, "admin") == []
    assert len(hostpolicy.violations(cfg, POLICY, "member")) == 2
    got = hostpolicy.violations(run(network="host", volumes=["/x:/x"]), FleetPolicy(), "admin", fleet="f")
    assert got == ["volume /x:/x: fleet f lets project admins' runs mount no host path "
                   "(policy.volumes, policy.admins.volumes)",
                   "network: host: fleet f does not allow single-node project admins' runs on the host's network "
                   "(policy.host_network, policy.admins.host_network)"]
    assert hostpolicy.violations(cfg, FleetPolicy(), "server-admin") == []
    # `admins` adds to the members' rules, never takes away
    p = FleetPolicy.model_validate({"volumes": ["/data"], "privileged": True})
    assert hostpolicy.violations(run(volumes=["/data:/d"], docker=True), p, "admin") == []
    with pytest.raises(ValueError, match="unknown role"):
        hostpolicy.violations(cfg, POLICY, "owner")


def test_volume_roots_per_role():
    assert hostpolicy.volume_roots(POLICY, "member") == ["/data", "/scratch"]
    assert hostpolicy.volume_roots(POLICY, "admin") == ["/data", "/scratch", "/"]
    assert hostpolicy.volume_roots(POLICY, "server-admin") is None
    assert hostpolicy.volume_roots(None, "member") == []


def test_allowed_fleets_says_why_each_other_is_out():
    policies = {"open": POLICY.model_copy(update={"privileged": True}), "closed": FleetPolicy(), "other": None}
    cfg = run(volumes=["/data:/d"], privileged=True)
    allowed, out = hostpolicy.allowed_fleets(cfg, policies, "member")
    assert allowed == ["open"]
    assert out["closed"] == ["volume /data:/d: fleet closed lets runs mount no host path (policy.volumes)",
                             "privileged: fleet closed does not allow privileged runs (policy.privileged)"]
    assert set(out) == {"closed", "other"}
    allowed, out = hostpolicy.allowed_fleets(run(fleets=["closed"]), policies, "member")
    assert allowed == ["closed"]
    assert out["open"] == ["fleet open: not among the run's fleets (closed)"]
    assert hostpolicy.allowed_fleets(cfg, policies, "server-admin")[0] == ["open", "closed", "other"]


def test_policy_of_a_stored_config():
    assert hostpolicy.policy_of({"type": "fleet", "ssh_config": {}}) == FleetPolicy()  # applied before policies
    stored = {"type": "fleet", "policy": {"volumes": ["/data"]}, "ssh_config": {}}
    assert hostpolicy.policy_of(stored).volumes == ["/data"]
    assert hostpolicy.policy_of({"privileged": True}).privileged
    assert hostpolicy.policy_of(None) == FleetPolicy()


# ------------------------------------------------------------------------------------------ the container

class Failed(Exception):
    pass


class FakeModule:
    def __init__(self, **params):
        self.params = {"name": "c", "state": "started", "stop_timeout": 10, "image": "img", "command": [],
                       "env": {}, "secret_env": {}, "labels": {}, "devices": [], "volumes": [], "network": "host",
                       "oci_runtime": None, "cpuset_cpus": None, "gpus": None, "workdir": None, "cpus": None,
                       "memory_mib": None, "runtime": "podman", "ports": [], "privileged": False,
                       "volume_roots": None, "optional_volumes": [], "user": None, "entrypoint": None,
                       "shm_size_mib": None, "disk_limit_mib": None,
                       **params}

    def fail_json(self, msg, **_):
        raise Failed(msg)


def argv(mod, **params):
    m = FakeModule(**params)
    return mod.run_argv("podman", m.params, mod.validate(m), "r1")


def test_container_argv_no_new_privileges_privileged_and_ports(monkeypatch):
    mod = container_module(monkeypatch)
    plain = argv(mod)
    assert "--security-opt=no-new-privileges" in plain and "--privileged" not in plain
    assert not [a for a in plain if a.startswith("--cap-add")]
    priv = argv(mod, privileged=True)
    assert "--privileged" in priv and "--security-opt=no-new-privileges" not in priv
    bridged = argv(mod, network="bridge", ports=["8000", "9000:9001"])
    assert "--network=bridge" in bridged
    assert [a for a in bridged if a.startswith("--publish")] == ["--publish=127.0.0.1::8000",
                                                                  "--publish=127.0.0.1:9000:9001"]
    with pytest.raises(Failed, match="host's network"):
        argv(mod, network="host", ports=["8000"])
    with pytest.raises(Failed, match="not PORT"):
        argv(mod, network="bridge", ports=["0.0.0.0:80:80"])


def test_container_config_id_changes_with_privileged_and_ports(monkeypatch):
    mod = container_module(monkeypatch)

    def cid(**params):
        m = FakeModule(**params)
        return mod.config_run_id(m.params, mod.validate(m))

    assert cid() == cid()
    assert len({cid(), cid(privileged=True), cid(network="bridge"), cid(network="bridge", ports=["80"])}) == 4


def test_container_volume_roots_resolve_symlinks_on_the_host(monkeypatch, tmp_path):
    mod = container_module(monkeypatch)
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "evil").symlink_to("/")
    (tmp_path / "database").mkdir()
    roots = [str(data)]
    argv(mod, volumes=[f"{data}:/d", f"{data}/sub:/s:ro"], volume_roots=roots)
    with pytest.raises(Failed, match="really /"):
        argv(mod, volumes=[f"{data}/evil:/host"], volume_roots=roots)
    with pytest.raises(Failed, match="is not below"):
        argv(mod, volumes=[f"{tmp_path}/database:/db"], volume_roots=roots)
    with pytest.raises(Failed, match="only host paths"):
        argv(mod, volumes=["named:/v"], volume_roots=roots)
    with pytest.raises(Failed, match=r"\(none\)"):
        argv(mod, volumes=[f"{data}:/d"], volume_roots=[])
    argv(mod, volumes=["/:/host"])  # not given: not checked (a server admin's run)


def test_container_vars_from_the_run():
    from gpufleet.launch import container_vars, published_ports
    from gpufleet.models import GPU, HostFacts, RunRequest

    def vars_of(roots=None, **fields):
        cfg = RUN_CONFIG.validate_python({"type": "service", "image": "i", "port": 8000, **fields})
        facts = HostFacts(runtime={"name": "podman", "gpu_support": {"nvidia": "cdi"}})
        return container_vars(RunRequest(name="s", source="s.yml", config=cfg), "r1", {}, facts,
                              [GPU(vendor="nvidia", index=0, uuid="GPU-0")], 2, 1024, set(), volume_roots=roots)

    v = vars_of()
    assert (v["workload_network"], v["workload_ports"], v["workload_privileged"]) == ("bridge", ["8000"], False)
    assert v["workload_volume_roots"] is None
    v = vars_of(roots=["/data"], network="host", docker=True)
    assert (v["workload_network"], v["workload_ports"], v["workload_privileged"]) == ("host", [], True)
    assert v["workload_volume_roots"] == ["/data"]
    svc = RUN_CONFIG.validate_python({"type": "service", "image": "i", "port": 8000, "ports": ["8080:9000", 8000]})
    assert published_ports(svc) == ["8000", "9000"]  # host ports: the runtime's choice
    assert published_ports(run(ports=[7000])) == ["7000"]
