"""A run's `volumes` in both of dstack's forms (and its network volumes refused), its container options
(`user`, `entrypoint`, `shell`, `init`), what the fleet's policy makes of them, what launch hands the
workload role, and the argument vector the container module builds from it (issue 14)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import container_module
from runforms import problems, run
from test_hostpolicy import Failed, FakeModule

from gpufleet import hostpolicy
from gpufleet.launch import KEEP_ALIVE, container_vars, run_command
from gpufleet.models import GPU, RUN_CONFIG, FleetPolicy, HostFacts, RunRequest
from gpufleet.models.run import Volume
from gpufleet.runconfig import parse_run

DSTACK_CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "dstack-configs"




# ------------------------------------------------------------------------------------------ volumes

def test_both_forms_read_into_one_volume():
    cfg = run(volumes=["/data:/data", "/data/sub:/s:ro", "/x:/y:rw",
                       {"instance_path": "/scratch", "path": "/scratch", "optional": True},
                       {"instance_path": "/models", "path": "/m", "read_only": True}])
    assert cfg.volumes == [
        Volume(instance_path="/data", path="/data"),
        Volume(instance_path="/data/sub", path="/s", read_only=True),
        Volume(instance_path="/x", path="/y"),
        Volume(instance_path="/scratch", path="/scratch", optional=True),
        Volume(instance_path="/models", path="/m", read_only=True),
    ]
    assert [str(v) for v in cfg.volumes] == ["/data:/data", "/data/sub:/s:ro", "/x:/y", "/scratch:/scratch",
                                             "/models:/m:ro"]
    # a stored run's config (JSON) reads back to the same volumes
    stored = json.loads(cfg.model_dump_json())
    assert stored["volumes"][3] == {"instance_path": "/scratch", "path": "/scratch", "optional": True,
                                    "read_only": False}
    assert RUN_CONFIG.validate_python(stored).volumes == cfg.volumes


def test_a_file_with_object_volumes_loads(tmp_path):
    req = parse_run("type: dev-environment\nimage: i\nvolumes:\n  - instance_path: /mnt/cache\n    path: /root/.cache"
                    "\n    optional: true\n  - /data:/data\n", str(tmp_path / "d.yml"))
    assert [(str(v), v.optional) for v in req.config.volumes] == [("/mnt/cache:/root/.cache", True),
                                                                  ("/data:/data", False)]


@pytest.mark.parametrize("lines,where,message", [
    ("volumes: [my-volume:/data]", "3:11: volumes[0]",
     "'my-volume' is a dstack network volume (a volume name, not a host path): gpufleet has instance volumes "
     "only, host paths bound into the container; write /host/path:/data or {instance_path: /host/path, "
     "path: /data} (a path the fleet's policy.volumes allows)"),
    ("volumes:\n  - name: my-volume\n    path: /data", "4:5: volumes[0]", "'my-volume' is a dstack network volume"),
    ("volumes:\n  - {name: [a, b], path: /data}", "4:5: volumes[0]", "['a', 'b'] is a dstack network volume"),
    ("volumes: [data/x:/data]", "3:11: volumes[0]", "'data/x' must be an absolute host path"),
    ("volumes: ['/data:data']", "3:11: volumes[0]", "'data' must be an absolute path in the container"),
    ("volumes: ['/data:/a/../b']", "3:11: volumes[0]", "'..' is not allowed in a container path"),
    ("volumes: ['/a,b:/b']", "3:11: volumes[0]", "may not contain ':' or ','"),
    ("volumes: ['/a:/b:z']", "3:11: volumes[0]", "must be /host/path:/container/path, /host/path:/path:ro or "
                                                 "{instance_path, path, optional}"),
    ("volumes: [7]", "3:11: volumes[0]", "must be /host/path:/container/path"),
    ("volumes:\n  - instance_path: /a\n    path: x", "5:11: volumes[0].path", "must be an absolute path"),
    ("volumes:\n  - instance_path: /a\n    path: /x\n    optional: maybe", "6:15: volumes[0].optional", "boolean"),
    ("volumes:\n  - instance_path: /a:/b\n    path: /x", "4:20: volumes[0].instance_path", "':' or ','"),
    ("volumes:\n  - instance_path: /a\n    pth: /x", "5:5: volumes[0].pth", "did you mean 'path'?"),
    ("user: 'a:b:c'", "3:7: user", "must be USER or USER:GROUP"),
    ("user: ':1000'", "3:7: user", "empty user name or id"),
    ("user: '1000:'", "3:7: user", "empty group name or id"),
    ("user: '-1'", "3:7: user", "'-1' is not a user name or id"),
    ("user: 'a b'", "3:7: user", "is not a user name or id"),
    ("shell: zsh", "3:8: shell", "must be sh, bash or an absolute path to a shell"),
    ("shell: bin/zsh", "3:8: shell", "must be sh, bash or an absolute path"),
    ("entrypoint: ''", "3:13: entrypoint", "is empty"),
    ("entrypoint: \"python 'x\"", "3:13: entrypoint", "cannot be split into words"),
    ("init: [echo hi]", "3:1: init", "unknown field 'init'"),
])
def test_bad_volumes_and_options_point_at_the_field_and_say_why(tmp_path, lines, where, message):
    text = problems(tmp_path, f"type: task\nimage: i\n{lines}\n")
    assert f"{tmp_path / 'run.yml'}:{where}: " in text and message in text, text


def test_real_dstack_volumes_are_read_and_only_network_volumes_refused():
    """Of the volumes of dstack's own run files (that dstack accepts), every instance volume is read, in
    either form; every other one is a network volume, refused as such."""
    ok = json.loads((DSTACK_CONFIGS / "dstack_results.json").read_text())
    with (DSTACK_CONFIGS / "manifest.tsv").open() as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["dup_of"] == "-" and ok.get(r["id"], {}).get("ok")
                and r["dstack_type"] in ("task", "service", "dev-environment")]
    read = refused = objects = 0
    for r in rows:
        for item in yaml.safe_load((DSTACK_CONFIGS / r["file"]).read_text()).get("volumes") or []:
            network = isinstance(item, dict) and "name" in item or isinstance(item, str) and \
                "/" not in item.split(":")[0]
            try:
                Volume.model_validate(item)
            except ValueError as e:
                assert network and "dstack network volume" in str(e), (r["id"], item, e)
                refused += 1
            else:
                assert not network, (r["id"], item)
                read += 1
                objects += isinstance(item, dict)
    assert read >= 40 and objects >= 10 and refused >= 1, (read, objects, refused)


# ------------------------------------------------------------------------------------------ the fleet's policy

POLICY = FleetPolicy.model_validate({"volumes": ["/data"]})


def test_policy_checks_object_volumes_as_strings():
    for volumes in (["/data/x:/x", "/etc:/e"],
                    [{"instance_path": "/data/x", "path": "/x"}, {"instance_path": "/etc", "path": "/e"}],
                    [{"instance_path": "/data/x", "path": "/x", "optional": True},
                     {"instance_path": "/etc", "path": "/e", "optional": True}]):
        got = hostpolicy.violations(run(volumes=volumes), POLICY, "member", fleet="gpu-a")
        assert got == ["volume /etc:/e: fleet gpu-a lets runs mount only /data (policy.volumes)"], volumes
    got = hostpolicy.violations(run(volumes=[{"instance_path": "/data/../etc", "path": "/e", "read_only": True}]),
                                POLICY, "member")
    assert got == ["volume /data/../etc:/e:ro: '/data/../etc': '..' is not allowed in a host path (write the path "
                   "it leads to) (policy.volumes)"]
    assert hostpolicy.violations(run(volumes=[{"instance_path": "/", "path": "/h", "optional": True}]), POLICY,
                                 "server-admin") == []


# ------------------------------------------------------------------------------------------ container options

@pytest.mark.parametrize("user", ["ubuntu", "1000", "1000:1000", "app:staff", "_svc.x-1"])
def test_user_takes_dstacks_forms(user):
    assert run(user=user).user == user


def test_a_dev_environment_takes_no_entrypoint(tmp_path):
    text = problems(tmp_path, "type: dev-environment\nimage: i\nentrypoint: /bin/bash\n")
    assert f"{tmp_path / 'run.yml'}:3:13: entrypoint: a dev environment takes no entrypoint (as in dstack)" in text


def test_shell_is_read_as_dstack_reads_it():
    assert (run().shell_path, run(shell="sh").shell_path, run(shell="bash").shell_path,
            run(shell="/usr/bin/zsh").shell_path) == ("/bin/sh", "/bin/sh", "/bin/bash", "/usr/bin/zsh")


def test_the_command_with_shell_init_and_entrypoint():
    assert run_command(run(commands=["echo a", "echo b"])) == (None, ["/bin/sh", "-c", "set -e\necho a\necho b"])
    assert run_command(run(shell="bash", commands=["echo a"])) == (None, ["/bin/bash", "-c", "set -e\necho a"])
    assert run_command(run()) == (None, [])  # the image's command
    dev = run("dev-environment", init=["pip install x", "echo ready"], commands=["echo c"], shell="bash")
    assert run_command(dev, prelude="P") == (
        None, ["/bin/bash", "-c", f"set -e\nP\npip install x\necho ready\necho c\n{KEEP_ALIVE}"])
    # dstack's docker-like form: the entrypoint's words, then each command as one argument, no shell
    task = run(entrypoint="python -u", commands=["train.py", "--name=a b; rm -rf /"])
    assert run_command(task) == ("python", ["-u", "train.py", "--name=a b; rm -rf /"])
    assert run_command(run("service", entrypoint="'/opt/my app/serve'")) == ("/opt/my app/serve", [])
    # a multi-node prelude (the MPI hostfile) is run by /bin/sh, which then execs the entrypoint
    assert run_command(run(nodes=2, entrypoint="torchrun", commands=["t.py"]), prelude="P") == (
        "/bin/sh", ["-c", 'set -e\nP\nexec "$@"', "gpufleet", "torchrun", "t.py"])


def vars_of(cfg, roots=None):
    facts = HostFacts(runtime={"name": "podman", "gpu_support": {"nvidia": "cdi"}})
    return container_vars(RunRequest(name="r", source="r.yml", config=cfg), "r1", {}, facts,
                          [GPU(vendor="nvidia", index=0, uuid="GPU-0")], 2, 1024, set(), volume_roots=roots)


def test_container_vars_carry_volumes_user_and_entrypoint():
    v = vars_of(run(volumes=["/data:/d:ro", {"instance_path": "/cache", "path": "/c", "optional": True},
                             {"instance_path": "/m", "path": "/m"}],
                    user="1000:1000", entrypoint="python -u", commands=["x.py"]), roots=["/data"])
    assert v["workload_volumes"] == ["/data:/d:ro", "/m:/m"]
    assert v["workload_optional_volumes"] == ["/cache:/c"]
    assert v["workload_volume_roots"] == ["/data"]
    assert (v["workload_user"], v["workload_entrypoint"], v["workload_command"]) == ("1000:1000", "python",
                                                                                     ["-u", "x.py"])
    v = vars_of(run(commands=["echo hi"]))
    assert (v["workload_user"], v["workload_entrypoint"], v["workload_optional_volumes"]) == (None, None, [])
    assert v["workload_command"] == ["/bin/sh", "-c", "set -e\necho hi"]


def test_the_role_passes_every_new_option_to_the_module():
    root = Path(__file__).resolve().parents[2] / "roles" / "workload"
    start = next(t for t in yaml.safe_load((root / "tasks" / "main.yml").read_text())
                 if "gpufleet_container" in t)["gpufleet_container"]
    spec = yaml.safe_load((root / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    defaults = yaml.safe_load((root / "defaults" / "main.yml").read_text())
    for option in ("optional_volumes", "user", "entrypoint"):
        assert start[option] == f"{{{{ workload_{option} }}}}"
        assert f"workload_{option}" in spec and f"workload_{option}" in defaults
    v = vars_of(run())
    assert {k for k in v if k.startswith("workload_")} <= set(spec)


# ------------------------------------------------------------------------------------------ the container module

def argv_spec(mod, **params):
    m = FakeModule(**params)
    spec = mod.validate(m)
    return mod.run_argv(m.params["runtime"], m.params, spec, "r1"), spec


def test_module_user_and_entrypoint(monkeypatch):
    mod = container_module(monkeypatch)
    argv, _ = argv_spec(mod, user="1000:1000", entrypoint="python", command=["-u", "x.py"])
    dash = argv.index("--")
    assert "--user=1000:1000" in argv[:dash] and '--entrypoint=["python"]' in argv[:dash]
    assert argv[dash:] == ["--", "img", "-u", "x.py"]
    argv, _ = argv_spec(mod, runtime="docker", entrypoint="/opt/my app/serve")
    assert "--entrypoint=/opt/my app/serve" in argv
    argv, _ = argv_spec(mod)
    assert not [a for a in argv if a.startswith(("--user", "--entrypoint"))]
    for bad in ({"user": "a b"}, {"user": "-1"}, {"user": "a:b:c"}, {"entrypoint": ""}, {"entrypoint": "a\0b"}):
        with pytest.raises(Failed):
            argv_spec(mod, **bad)


def test_module_leaves_out_an_optional_volume_whose_path_is_missing(monkeypatch, tmp_path):
    mod = container_module(monkeypatch)
    (tmp_path / "here").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    argv, spec = argv_spec(mod, volumes=[f"{tmp_path}/here:/a"],
                           optional_volumes=[f"{tmp_path}/here:/b:ro", f"{tmp_path}/gone:/c",
                                             f"{tmp_path}/dangling:/d"])
    assert [a for a in argv if a.startswith("--volume")] == [f"--volume={tmp_path}/here:/a",
                                                              f"--volume={tmp_path}/here:/b:ro"]
    assert spec["skipped_volumes"] == [f"{tmp_path}/gone:/c", f"{tmp_path}/dangling:/d"]
    # volume_roots applies to optional volumes too, present or not
    with pytest.raises(Failed, match="is not below"):
        argv_spec(mod, optional_volumes=[f"{tmp_path}/gone:/c"], volume_roots=[f"{tmp_path}/here"])
    with pytest.raises(Failed, match="only a host path can be optional"):
        argv_spec(mod, optional_volumes=["named:/c"])


def test_module_config_id(monkeypatch, tmp_path):
    mod = container_module(monkeypatch)

    def cid(**params):
        m = FakeModule(**params)
        return mod.config_run_id(m.params, mod.validate(m))

    assert len({cid(), cid(user="1000"), cid(entrypoint="python"), cid(optional_volumes=[f"{tmp_path}:/x"])}) == 4
    # which optional volumes this host has does not count: the same config keeps its id
    before = cid(optional_volumes=[f"{tmp_path}/later:/x"])
    (tmp_path / "later").mkdir()
    assert cid(optional_volumes=[f"{tmp_path}/later:/x"]) == before


def test_module_documents_the_new_options(monkeypatch):
    mod = container_module(monkeypatch)
    options = yaml.safe_load(mod.DOCUMENTATION)["options"]
    assert {"optional_volumes", "user", "entrypoint"} <= set(options)
    assert "skipped_volumes" in yaml.safe_load(mod.RETURN)


# ------------------------------------------------------------------------------------------ registry_auth

def test_registry_auth_password_is_never_in_the_spec_nor_in_an_error(tmp_path):
    """The password (as written, or through `${{ secrets.X }}`) is sealed with the run's secrets: the
    stored spec holds only the username, and a problem in the file never echoes it (see test_images)."""
    password = "hunter2-s3cr3t"
    for lines in (f"registry_auth:\n  username: u\n  password: {password}\n",
                  f"registry_auth: {{username: u, password: {password}}}\n"):
        req = parse_run(f"type: task\nimage: registry.example.com/private:1\n{lines}", str(tmp_path / "r.yml"))
        assert password not in json.dumps(req.config.model_dump(mode="json"))
        text = problems(tmp_path, f"type: task\nimage: registry.example.com/private:1\nnvcc: 7\n{lines}")
        assert password not in text


# ------------------------------------------------------------------------------------------ through the real role

def test_the_workload_role_hands_user_entrypoint_and_optional_volumes_to_the_runtime(tmp_path, monkeypatch):
    """playbooks/start.yml and the role `workload` on localhost, a stand-in podman recording its argv."""
    import sys

    from test_injection import FAKE_PODMAN, play

    from gpufleet import runner

    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path / "home"))
    (tmp_path / "data").mkdir()
    cfg = run(entrypoint="python -u", commands=["x.py"], user="1000:1000",
              volumes=[f"{tmp_path}/data:/d", {"instance_path": f"{tmp_path}/data", "path": "/o", "optional": True},
                       {"instance_path": f"{tmp_path}/gone", "path": "/g", "optional": True}])
    vars_file = runner.write_unsafe_vars(vars_of(cfg, roots=[str(tmp_path)]))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "podman.log"
    (bin_dir / "podman").write_text(FAKE_PODMAN.format(python=sys.executable, log=str(log)))
    (bin_dir / "podman").chmod(0o755)
    p = play(tmp_path, Path(__file__).resolve().parents[2] / "playbooks" / "start.yml", vars_file,
             "-e", "workload_runtime=podman", "-e", "workload_become=false", path=bin_dir)
    argv = next(c for c in map(json.loads, log.read_text().splitlines()) if c and c[0] == "run")
    dash = argv.index("--")
    assert "--user=1000:1000" in argv[:dash] and '--entrypoint=["python"]' in argv[:dash]
    assert [a for a in argv if a.startswith("--volume")] == [f"--volume={tmp_path}/data:/d",
                                                              f"--volume={tmp_path}/data:/o"]
    assert argv[dash + 1:] == ["localhost/x:1", "-u", "x.py"]
    assert f"optional volume {tmp_path}/gone:/g" in p.stdout + p.stderr
