"""`${{ ns.name }}` references: dstack's grammar, load errors with their lines, how env and secret
values flow (a secret's value never in the spec or a message), and the per-node fill at start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gpufleet import cluster
from gpufleet.errors import ConfigError, GpufleetError
from gpufleet.interpolate import InterpolationError, Ref, fill, parse, refs
from gpufleet.launch import container_vars
from gpufleet.models import GPU, RUN_CONFIG, HostFacts, RunRequest, split_env
from gpufleet.runconfig import parse_run

SECRET = "s3cr3t-VALUE-never-shown"
NS = {"run": {"args": "qwerty"}, "env": {"A": "1"}, "dstack": {"node_rank": "3"}}


# ------------------------------------------------------------------ grammar (dstack's rules)

@pytest.mark.parametrize("text,filled", [
    ("", ""),
    ("${ENV}", "${ENV}"),                              # shell syntax is kept
    ("$(date) $HOME", "$(date) $HOME"),
    ("$${{ENV}}", "${{ENV}}"),                         # `$$` escapes: a literal `${{`
    ("echo $${{ENV}}", "echo ${{ENV}}"),
    ("echo $${{ env.FOO }}", "echo ${{ env.FOO }}"),   # dstack's test_homogeneous_service_interpolates_commands_once
    ("${{ run.args }}", "qwerty"),
    ("${{run.args}}", "qwerty"),                       # whitespace around the name is dropped
    ("${{ \t run.args  }}x", "qwertyx"),
    ("a ${{ env.A }} b ${{ dstack.node_rank }}", "a 1 b 3"),
    ("${{ env.A }}}", "1}"),                           # the first `}}` closes
    ("$$${{ env.A }}", "$1"),                          # `$$` then a reference
    ("echo $$", "echo $"),                             # dstack's scan: `$$` first in a stretch is one `$`
    ("echo $HOME $$", "echo $HOME $$"),                # ... but kept after a single `$`
    ("a$b$$${{ env.A }}", "a$b$$1"),
    ("x$", "x$"),
])
def test_grammar(text, filled):
    assert fill(text, NS) == filled


def test_a_filled_value_is_not_read_again():
    assert fill("${{ env.A }}", {"env": {"A": "${{ env.A }} $$"}}) == "${{ env.A }} $$"


def test_references_and_their_offsets():
    assert parse("x ${{ env.A }} $${{ b.c }}") == ["x ", Ref("env", "A", 2), " $", "{{ b.c }}"]


@pytest.mark.parametrize("text,offset,message", [
    ("${{ secrets.password }", 0, "not closed"),
    ("ok ${{ secrets.pass-word }}", 3, "`secrets.pass-word` is not a name"),
    ("${{ .password }}", 0, "is not a name"),
    ("${{ password. }}", 0, "is not a name"),
    ("${{ secrets.password.hash }}", 0, "is not a name"),
    ("${{ secrets.007 }}", 0, "is not a name"),
    ("${{ groups[0].replicas[0].IP_ADDRESS }}", 0, "is not a node address"),
    ("${{ groups.x }}", 0, "is not a node address"),
    ("${{}}", 0, "is not a name"),
])
def test_grammar_errors(text, offset, message):
    with pytest.raises(InterpolationError, match=message) as e:
        parse(text)
    assert e.value.offset == offset


def test_a_missing_value_names_the_reference():
    with pytest.raises(InterpolationError, match=r"\$\{\{ env.B \}\} has no value"):
        fill("${{ env.B }}", NS)


# ------------------------------------------------------------------ at load: errors with their lines

def _load(tmp_path: Path, text: str, **kw) -> RunRequest:
    path = tmp_path / "run.yml"
    path.write_text(text)
    return parse_run(text, str(path), **kw)


def _problems(tmp_path: Path, text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text, **kw)
    return [str(p) for p in e.value.problems]


BAD = """\
type: task
image: i
env:
  A: ${{ env.NOPE }}
  B: "x ${{ foo.bar }}"
  C: ${{ run.args }}
  D: ${{ dstack.nodes_numb }}
commands:
  - echo ${{ env.A }}
  - |
    echo one
    echo ${{ secrets.tok }} two
  - echo ${{ dstack.master_node_ip }}
  - echo ${{ run.other }}
  - echo ok ${{ dstack.node_rank
"""


def test_every_bad_reference_is_a_load_error_at_its_line_and_column(tmp_path):
    problems = _problems(tmp_path, BAD)
    f = tmp_path / "run.yml"
    assert problems[0] == (f"{f}:4:6: env.A: ${{{{ env.NOPE }}}}: NOPE is not in the run's `env` (list it: "
                           f"`- NOPE` takes its value from your environment, as a secret, or give it a value)")
    assert problems[1].startswith(f"{f}:5:9: env.B: ${{{{ foo.bar }}}}: unknown namespace 'foo'")
    assert problems[2].startswith(f"{f}:6:6: env.C: ${{{{ run.args }}}}: `run.args` is filled in `commands` only")
    assert problems[3].startswith(f"{f}:7:6: env.D: ${{{{ dstack.nodes_numb }}}}: unknown run variable 'nodes_numb'")
    assert problems[4].startswith(f"{f}:9:10: commands[0]: ${{{{ env.A }}}}: `env` is not filled in `commands`")
    assert "write $A" in problems[4]
    # inside a block scalar: the reference's own line
    assert problems[5].startswith(f"{f}:12:10: commands[1]: ${{{{ secrets.tok }}}}: a secret is filled in `env` only")
    assert problems[6].startswith(f"{f}:13:10: commands[2]: ${{{{ dstack.master_node_ip }}}} is set only on the "
                                  f"nodes of a multi-node task")
    assert problems[7].startswith(f"{f}:14:10: commands[3]: ${{{{ run.other }}}}: unknown name")
    assert problems[8].startswith(f"{f}:15:13: commands[4]: `${{{{` is not closed")
    assert len(problems) == 9


def test_list_form_env_and_a_run_variable_under_both_namespaces(tmp_path):
    run = _load(tmp_path, "type: task\nimage: i\nnodes: 2\nenv:\n  - R=${{ gpufleet.node_rank }}\n"
                          "  - M=${{ dstack.master_node_ip }}\ncommands: ['echo ${{ dstack.job_num }}']\n")
    assert run.config.env == ["R=${{ gpufleet.node_rank }}", "M=${{ dstack.master_node_ip }}"]
    problems = _problems(tmp_path, "type: task\nimage: i\nenv:\n  - OK=1\n  - X=a ${{ gpufleet.nope }}\n")
    assert problems == [f"{tmp_path / 'run.yml'}:5:9: env[1]: ${{{{ gpufleet.nope }}}}: unknown run variable "
                        f"'nope'; gpufleet. has node_rank, job_num, nodes_num, gpus_per_node, gpus_num, run_name, "
                        f"master_node_ip, nodes_ips, mpi_hostfile"]


def test_references_are_checked_for_a_plan_too(tmp_path):
    assert _problems(tmp_path, "type: service\nimage: i\nport: 80\ncommands: ['${{ foo.x }}']\n", values=False)


# ------------------------------------------------------------------ env and secrets

SECRETS_RUN = """\
type: task
image: i
env:
  - TOKEN
  - HF=${{ secrets.hf_token }}
  - BEARER=Bearer ${{ env.TOKEN }}
  - PLAIN=epochs-${{ env.EPOCHS }}
  - EPOCHS=3
commands: ['echo $HF']
"""


def test_a_secret_reference_takes_its_value_like_a_secret_and_never_stores_it(tmp_path, monkeypatch):
    monkeypatch.setenv("hf_token", SECRET)
    monkeypatch.setenv("TOKEN", SECRET + "-2")
    run = _load(tmp_path, SECRETS_RUN)
    assert run.secrets == {"TOKEN": SECRET + "-2", "hf_token": SECRET}
    import os
    assert "hf_token" not in os.environ and "TOKEN" not in os.environ  # taken, as every secret is
    spec = json.dumps(run.config.model_dump(mode="json")) + run.model_dump_json()
    assert SECRET not in spec and "${{ secrets.hf_token }}" in spec
    # the server is given the values the client took
    again = _load(tmp_path, SECRETS_RUN, secrets=dict(run.secrets))
    assert again.secrets == run.secrets


def test_a_missing_secret_is_named_at_its_line_without_any_value(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKEN", SECRET)
    monkeypatch.delenv("hf_token", raising=False)
    problems = _problems(tmp_path, SECRETS_RUN)
    assert problems == [f"{tmp_path / 'run.yml'}:5:8: env[1]: ${{{{ secrets.hf_token }}}}: hf_token is not set in "
                        f"the environment: export hf_token=... before gpufleet apply"]
    # a dry run (plan) needs no value
    assert _load(tmp_path, SECRETS_RUN, values=False).secrets == {}


def _vars(run: RunRequest, rank: int = 0, ips: list[str] | None = None, gpus: int = 2) -> dict:
    facts = HostFacts(runtime={"name": "podman", "gpu_support": {"nvidia": "cdi"}})
    devices = [GPU(vendor="nvidia", index=i, uuid=f"GPU-{i}") for i in range(gpus)]
    node = cluster.node_env(rank, ips or [], gpus) if ips is not None else None
    return container_vars(run, "r1", {"FLEET": "f"}, facts, devices, 2, 1024, set(), node)


def test_secret_values_reach_the_container_only_as_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("hf_token", SECRET)
    monkeypatch.setenv("TOKEN", "tok")
    v = _vars(_load(tmp_path, SECRETS_RUN))
    assert v["workload_secret_env"] == {"TOKEN": "tok", "HF": SECRET, "BEARER": "Bearer tok"}
    assert v["workload_env"]["PLAIN"] == "epochs-3" and v["workload_env"]["EPOCHS"] == "3"
    assert "hf_token" not in v["workload_env"] and "hf_token" not in v["workload_secret_env"]
    shown = json.dumps({k: w for k, w in v.items() if k != "workload_secret_env"})
    assert SECRET not in shown and "tok" not in json.dumps(v["workload_env"])


# ------------------------------------------------------------------ at start, per node

NODES_RUN = """\
type: task
image: i
nodes: 2
env:
  RANK: ${{ dstack.node_rank }}
  MASTER: ${{ gpufleet.master_node_ip }}:29500
  LITERAL: $${{ dstack.node_rank }}
commands:
  - >-
    torchrun --node-rank ${{ dstack.node_rank }} --nnodes ${{ dstack.nodes_num }}
    --nproc-per-node ${{ gpufleet.gpus_per_node }} ${{ run.args }}
  - echo ${{ dstack.gpus_num }} ${{ dstack.run_name }} $${{ dstack.node_rank }} $$
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_run_variables_are_filled_for_each_node(tmp_path, rank):
    run = _load(tmp_path, NODES_RUN)
    assert run.config.commands[0].startswith("torchrun --node-rank ${{ dstack.node_rank }}")  # stored as written
    v = _vars(run, rank, ["10.0.0.1", "10.0.0.2"], gpus=4)
    script = v["workload_command"][2]
    assert f"torchrun --node-rank {rank} --nnodes 2 --nproc-per-node 4 \n" in script
    # after a reference a new stretch begins: its `$$` is one `$` (dstack's scan)
    assert "echo 8 run ${{ dstack.node_rank }} $" in script.splitlines()
    env = v["workload_env"]
    assert (env["RANK"], env["MASTER"], env["LITERAL"]) == (str(rank), "10.0.0.1:29500", "${{ dstack.node_rank }}")
    assert env["GPUFLEET_NODE_RANK"] == str(rank)


def test_a_single_node_run_gets_rank_0_without_a_node_env(tmp_path):
    run = _load(tmp_path, "type: service\nimage: i\nport: 80\ncommands: ['serve --rank ${{ dstack.node_rank }}/"
                          "${{ dstack.nodes_num }} ${{ gpufleet.gpus_num }}']\n")
    assert v_script(_vars(run)) == "set -e\nserve --rank 0/1 2"
    assert v_script(_vars(run, 0, [], gpus=1)) == "set -e\nserve --rank 0/1 1"


def v_script(v: dict) -> str:
    return v["workload_command"][2]


def test_a_reference_without_a_value_at_start_fails_the_start_naming_it(tmp_path):
    # a run stored before its references were checked, or whose secret was lost: never a value shown
    cfg = RUN_CONFIG.validate_python({"type": "task", "image": "i", "env": {"A": "${{ secrets.gone }}"},
                                      "commands": ["true"]})
    with pytest.raises(GpufleetError, match=r"run x: \$\{\{ secrets.gone \}\} has no value"):
        _vars(RunRequest(name="x", source="x", config=cfg, secrets={"other": SECRET}))


# ------------------------------------------------------------------ what dstack's users write

DSTACK_CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "dstack-configs"


@pytest.mark.skipif(not (DSTACK_CONFIGS / "manifest.tsv").exists(), reason="no dstack-configs fixtures")
def test_real_dstack_references_in_env_and_commands_load(tmp_path, monkeypatch):
    """The `env` and `commands` of real dstack files with a reference, in a task gpufleet takes."""
    ok = json.loads((DSTACK_CONFIGS / "dstack_results.json").read_text())
    seen = 0
    for row in (DSTACK_CONFIGS / "manifest.tsv").read_text().splitlines()[1:]:
        ident, *_, dup, file = row.split("\t")
        text = (DSTACK_CONFIGS / file).read_text()
        if "${{" not in text:
            continue
        data = yaml.safe_load(text)
        if dup != "-" or not ok.get(ident, {}).get("ok") or not isinstance(data, dict) or \
                data.get("type") not in ("task", "service", "dev-environment"):
            continue
        part = {k: data[k] for k in ("env", "commands") if k in data}
        if "${{" not in json.dumps(part):
            continue
        secrets = [r.name for r in refs(json.dumps(part)) if r.namespace == "secrets"]
        for name in split_env(part.get("env"))[1] + secrets:
            monkeypatch.setenv(name, SECRET)
        text = yaml.safe_dump({"type": "task", "image": "i", **part})
        run = parse_run(text, file)
        assert SECRET not in json.dumps(run.config.model_dump(mode="json"))
        _vars(run)
        seen += 1
    assert seen >= 2
