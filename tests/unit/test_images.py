"""Default images (a run without `image`), `python` and `nvcc` choosing among the configured ones,
`registry_auth` at load and on its way to the container module, and the module's pull (issue 14)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import container_module
from runforms import problems
from test_hostpolicy import Failed, FakeModule

from gpufleet import images
from gpufleet.launch import container_vars
from gpufleet.models import GPU, RUN_CONFIG, FleetConfig, HostFacts, RunRequest
from gpufleet.models.images import IMAGE_LIST
from gpufleet.runconfig import REGISTRY_PASSWORD, parse_run
from gpufleet.server.settings import load_settings

LIST = IMAGE_LIST.validate_python([
    {"image": "localhost/py312:1", "python": "3.12", "default": True},
    {"image": "localhost/py311:1", "python": "3.11"},
    {"image": "localhost/cuda311:1", "python": "3.11", "nvcc": True},
])


def cfg(**fields):
    return RUN_CONFIG.validate_python({"type": "task", "commands": ["true"], **fields})


def choose(fleet=LIST, server=None, **fields):
    return images.choose(cfg(**fields), fleet, server, "lab")



# ------------------------------------------------------------------------------------------ choosing

def test_python_and_nvcc_choose_among_the_fleets_images():
    assert choose().image == "localhost/py312:1"  # no python: the default
    assert choose(python="3.11").image == "localhost/py311:1"  # the first that fits
    assert choose(nvcc=True).image == "localhost/cuda311:1"
    assert choose(python="3.11", nvcc=True).image == "localhost/cuda311:1"
    assert choose(python="3.11", nvcc=False).image == "localhost/py311:1"
    # none marked default: the first that fits
    plain = IMAGE_LIST.validate_python([{"image": "a:1", "python": "3.10"}, {"image": "b:1"}])
    assert choose(plain).image == "a:1"
    # the configured images need no venv nor another shell
    assert (choose().venv_python, choose().shell, choose().prelude()) == (None, None, "")


def test_no_fitting_image_is_refused_saying_what_is_configured():
    with pytest.raises(images.NoImage) as e:
        choose(python="3.10")
    assert str(e.value) == ("python: 3.10: no image for Python 3.10 on fleet lab (configured: localhost/py312:1 "
                            "(3.12), localhost/py311:1 (3.11), localhost/cuda311:1 (3.11, nvcc)); add one to fleet "
                            "lab's `images`")
    with pytest.raises(images.NoImage, match=r"^python: 3.12, nvcc: true: no image for Python 3.12 with nvcc on"):
        choose(python="3.12", nvcc=True)
    with pytest.raises(images.NoImage, match=r"^nvcc: true: no image with nvcc on fleet lab .* the server's"):
        choose(fleet=None, server=IMAGE_LIST.validate_python([{"image": "x:1"}]), nvcc=True)


def test_the_fleets_list_wins_over_the_servers_and_dstacks_is_last():
    server = IMAGE_LIST.validate_python([{"image": "srv:1", "python": "3.12"}])
    assert choose(fleet=LIST, server=server).image == "localhost/py312:1"
    assert choose(fleet=None, server=server).image == "srv:1"
    dstack = choose(fleet=None, server=None, python="3.10")
    assert dstack.image == "docker.io/dstackai/base:0.15-base-ubuntu24.04"
    assert dstack.venv_python == "3.10" and dstack.shell == "bash"
    assert "uv venv -q --prompt dstack -p 3.10 --seed" in dstack.prelude()
    assert choose(fleet=None, nvcc=True).image == "docker.io/dstackai/base:0.15-devel-ubuntu24.04"
    assert choose(fleet=None).venv_python == images.default_python()
    # an image given, or docker: true (dstack's dind image), is not chosen
    assert choose(image="busybox").image == "busybox"
    dind = choose(docker=True)
    assert (dind.image, dind.shell, dind.prelude()) == ("docker.io/dstackai/dind", "bash", "start-dockerd")


def test_the_fleets_stored_config_and_the_servers_settings_carry_images(tmp_path):
    fleet = FleetConfig.model_validate({"type": "fleet", "ssh_config": {"hosts": ["10.0.0.1"], "user": "u"},
                                        "images": [{"image": "a:1", "python": 3.1}]})
    stored = fleet.model_dump(mode="json")
    assert images.fleet_images(stored)[0].python == "3.10"  # YAML's 3.10 is 3.1, read as dstack reads it
    assert images.fleet_images({"name": "x"}) is None
    (tmp_path / "server.yml").write_text("images:\n  - {image: 'localhost/base:1', default: true}\n")
    assert load_settings(tmp_path / "server.yml", env={}).images[0].image == "localhost/base:1"


@pytest.mark.parametrize("items,message", [
    ([], "cannot be empty"),
    ([{"image": "a:1", "default": True}, {"image": "b:1", "default": True}], "only one image can be the default"),
    ([{"image": "a:1", "python": "2.7"}], "is not a Python version"),
    ([{"image": "-rm"}], "is not an image reference"),
    ([{"image": "a:1", "nvcc": "yes"}], "valid boolean"),
])
def test_a_bad_images_list_is_refused(items, message):
    with pytest.raises(ValueError, match=message):
        FleetConfig.model_validate({"type": "fleet", "ssh_config": {"hosts": ["10.0.0.1"], "user": "u"},
                                    "images": items})


# ------------------------------------------------------------------------------------------ at load

@pytest.mark.parametrize("text,message", [
    ("image: busybox\npython: '3.12'\n", "3:9: python: `image` and `python` are mutually exclusive fields"),
    ("image: busybox\nnvcc: true\n", "3:7: nvcc: `image` and `nvcc` are mutually exclusive fields"),
    ("python: '3.12'\ndocker: true\n", "3:9: docker: `python` and `docker` are mutually exclusive fields"),
    ("python: '3.8'\n", "2:9: python: '3.8' is not a Python version dstack takes"),
    ("nvcc: 1\n", "2:7: nvcc:"),
    ("image: r.io/x:1\nregistry_auth: {username: u}\n", "3:16: registry_auth: needs a password (or an access token)"),
    ("image: r.io/x:1\nregistry_auth: {username: u, password: '${{ env.PW }}'}\n",
     "registry_auth.password: ${{ env.PW }}: PW is not in the run's `env`"),
    ("image: r.io/x:1\nregistry_auth: {username: '${{ run.args }}', password: p}\n",
     "registry_auth.username: ${{ run.args }}: registry_auth is filled with env and secrets only"),
    ("image: r.io/x:1\nregistry_auth: {username: u, password: '${{ secrets.NOPE }}'}\n",
     "registry_auth.password: ${{ secrets.NOPE }}: NOPE is not set in the environment"),
])
def test_load_time_refusals(tmp_path, text, message):
    assert message in problems(tmp_path, f"type: task\n{text}", env={}), message


def test_python_as_yaml_numbers_and_no_image(tmp_path):
    req = parse_run("type: task\npython: 3.10\ncommands: [x]\n", str(tmp_path / "r.yml"))
    assert (req.config.python, req.config.image) == ("3.10", None)
    assert parse_run("type: dev-environment\npython: 3.12\nnvcc: true\n", "r.yml").config.nvcc is True


def test_registry_auth_password_is_sealed_with_the_secrets_never_in_the_spec(tmp_path):
    text = ("type: task\nimage: r.io/x:1\nregistry_auth:\n  username: u\n  password: ${{ secrets.REG_PW }}\n"
            "commands: [x]\n")
    req = parse_run(text, "r.yml", secrets={"REG_PW": "pw-value-1"})
    assert req.secrets == {"REG_PW": "pw-value-1", REGISTRY_PASSWORD: "${{ secrets.REG_PW }}"}
    spec = req.config.model_dump(mode="json")
    assert spec["registry_auth"] == {"username": "u"} and "pw-value-1" not in json.dumps(spec)
    assert "password" not in repr(req.config)
    # read back from the stored spec, its sealed secrets give it the password again
    back = RunRequest(name="r", source="r", config=RUN_CONFIG.validate_python(spec), secrets=req.secrets)
    v = _vars(back)
    assert v["workload_registry_auth"] == {"username": "u", "password": "pw-value-1"}
    assert "pw-value-1" not in json.dumps({k: x for k, x in v.items() if k != "workload_registry_auth"})
    # a literal password (dstack takes one) is sealed the same way
    req = parse_run("type: task\nimage: r.io/x:1\nregistry_auth: {username: u, password: lit-pw}\n", "r.yml")
    assert req.secrets == {REGISTRY_PASSWORD: "lit-pw"} and "lit-pw" not in json.dumps(req.config.model_dump())
    # a plan (values=False) keeps no password
    assert parse_run(text, "r.yml", values=False).secrets == {}


def _vars(req: RunRequest, image: str | None = None) -> dict:
    facts = HostFacts(runtime={"name": "podman", "gpu_support": {"nvidia": "cdi"}})
    return container_vars(req, "r1", {}, facts, [GPU(vendor="nvidia", index=0, uuid="GPU-0")], 2, 1024, set(),
                          image=image)


def test_container_vars_take_the_chosen_image():
    req = RunRequest(name="r", source="r", config=cfg(python="3.12"))
    assert _vars(req, image="localhost/py312:1")["workload_image"] == "localhost/py312:1"
    assert _vars(req)["workload_registry_auth"] is None
    req = RunRequest(name="r", source="r", config=cfg(image="busybox"))
    assert _vars(req)["workload_image"] == "busybox"


# ------------------------------------------------------------------------------------------ the module's pull

class PullModule(FakeModule):
    """The module's AnsibleModule, with run_command recording each argv and what the auth file held."""

    def __init__(self, results: dict[str, int], **params):
        super().__init__(**params)
        self.calls: list[tuple[list[str], dict]] = []
        self.auth_files: list[tuple[str, int, str]] = []
        self.results = results

    def run_command(self, argv, expand_user_and_vars=True, environ_update=None):
        self.calls.append((list(argv), dict(environ_update or {})))
        for a in argv:
            if a.startswith("--authfile="):
                path = a.split("=", 1)[1]
                self.auth_files.append((path, stat.S_IMODE(os.stat(path).st_mode), Path(path).read_text()))
        if "DOCKER_CONFIG" in (environ_update or {}):
            path = os.path.join(environ_update["DOCKER_CONFIG"], "config.json")
            self.auth_files.append((path, stat.S_IMODE(os.stat(path).st_mode), Path(path).read_text()))
        return self.results.get(argv[1], 0), "", self.results.get("stderr", "")


class Runtime:
    def __init__(self, module):
        self.module, self.binary = module, "podman"

    def run(self, argv):
        return self.module.run_command(argv)


def test_pull_with_registry_auth_uses_a_private_file_removed_after(monkeypatch):
    mod = container_module(monkeypatch)
    auth = {"username": "u", "password": "pw-secret-9"}
    m = PullModule({}, registry_auth=auth, image="r.io:5000/team/x:1")
    spec = mod.validate(m)
    assert mod.pull(m, Runtime(m), spec["image"], spec["registry_auth"]) is None
    (argv, _), = m.calls  # always pulled with credentials, even when the host has the image
    assert argv[:3] == ["podman", "pull", "--quiet"] and argv[-2:] == ["--", "r.io:5000/team/x:1"]
    assert not any("pw-secret-9" in a for a in argv)
    (path, mode, content), = m.auth_files
    assert mode == 0o600 and not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    assert list(json.loads(content)["auths"]) == ["r.io:5000"]
    assert "pw-secret-9" not in json.dumps(mod.config_run_id(m.params, spec))
    # docker: the same file as DOCKER_CONFIG's config.json; Docker Hub under its own key
    m = PullModule({}, registry_auth=auth, image="team/x:1", runtime="docker")
    mod.pull(m, Runtime(m), "team/x:1", auth)
    (path, mode, content), = m.auth_files
    assert mode == 0o600 and list(json.loads(content)["auths"]) == ["https://index.docker.io/v1/"]
    assert not os.path.exists(path)


def test_pull_only_when_missing_and_a_failure_names_the_image(monkeypatch):
    mod = container_module(monkeypatch)
    m = PullModule({"image": 0})
    mod.pull(m, Runtime(m), "img:1", None)
    assert [c[0][1] for c in m.calls] == ["image"]  # it has it: no pull
    m = PullModule({"image": 1, "pull": 125, "stderr": "Trying to pull x\nError: reading manifest: unauthorized\n"})
    assert mod.pull(m, Runtime(m), "img:1", None) == ("pulling img:1 failed: reading manifest: unauthorized", 125)
    for bad in ({"username": "u"}, {"username": "", "password": "p"}, {"username": "a:b", "password": "p"}):
        with pytest.raises(Failed, match="registry_auth"):
            mod.validate(PullModule({}, registry_auth=bad))


@pytest.mark.parametrize("image,registry", [("busybox", "docker.io"), ("library/busybox:1", "docker.io"),
                                            ("localhost/x:1", "localhost"), ("r.io/a/b:1", "r.io"),
                                            ("10.0.0.1:5000/x", "10.0.0.1:5000")])
def test_registry_of(monkeypatch, image, registry):
    assert container_module(monkeypatch).registry_of(image) == registry


def test_usable_keeps_the_fleets_that_have_an_image():
    configured = {"a": LIST, "b": IMAGE_LIST.validate_python([{"image": "x:1", "python": "3.10"}])}
    assert images.usable(cfg(python="3.10"), ["a", "b"], configured) == (["b"], "")
    assert images.usable(cfg(python="3.11"), ["a", "b"], configured) == (["a"], "")
    fits, why = images.usable(cfg(python="3.9"), ["a", "b"], configured)
    assert fits == [] and "on fleet a (configured:" in why and "on fleet b (configured: x:1 (3.10))" in why


def test_registry_auth_takes_the_runs_env_as_dstacks_cli_does():
    """dstack's own test file (its CLI fills `env.NAME` in registry_auth from the run's env)."""
    path = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "dstack-configs" / \
        "corpus" / "unit-edge" / "unit-edge-031" / "registry-auth-env-interpolation.yml"
    req = parse_run(path.read_text(), str(path))
    assert _vars(req)["workload_registry_auth"] == {"username": "test_user", "password": "test_password"}
    # an env name without a value: a secret from the environment, sealed
    text = ("type: task\nimage: r.io/x:1\nenv: [NGC_API_KEY]\n"
            "registry_auth: {username: $oauthtoken, password: '${{ env.NGC_API_KEY }}'}\n")
    req = parse_run(text, "r.yml", secrets={"NGC_API_KEY": "ngc-1"})
    assert _vars(req)["workload_registry_auth"] == {"username": "$oauthtoken", "password": "ngc-1"}


def test_on_dstacks_image_commands_run_with_bash_after_the_venv():
    from gpufleet.launch import on_image

    req = RunRequest(name="r", source="r", config=cfg(python="3.11", commands=["python -V"]))
    run, prelude = on_image(req, images.choose(req.config, None, None, "f"), "HOSTFILE")
    v = _vars(run, image="docker.io/dstackai/base:0.15-base-ubuntu24.04")
    script = container_vars(run, "r1", {}, HostFacts(runtime={"name": "podman"}), [], 1, 0, set(),
                            prelude=prelude)["workload_command"]
    assert script[:2] == ["/bin/bash", "-c"] and v["workload_command"][0] == "/bin/bash"
    assert script[2].index("uv venv -q --prompt dstack -p 3.11") < script[2].index("HOSTFILE") < \
        script[2].index("python -V")
    # a configured image: the run as it is; `shell` given: kept; an entrypoint: no venv
    assert on_image(req, images.Choice("localhost/x:1"), "P") == (req, "P")
    shell = RunRequest(name="r", source="r", config=cfg(shell="sh"))
    assert on_image(shell, images.choose(shell.config, None, None, "f"))[0].config.shell_path == "/bin/sh"
    entry = RunRequest(name="r", source="r", config=cfg(entrypoint="python"))
    assert on_image(entry, images.choose(entry.config, None, None, "f"))[1] == ""
