"""dstack's replica groups (`replicas` as a list of groups): what the file may say (file:line:field for what
it may not), what each group's replicas run (the service merged with the group), and the groups kept on a
real store (SQLite and PostgreSQL): each group's own count, placement, scaling and rolling update, the
service's status summing them, a removed group's replicas stopped. The hosts are not touched (the lab test
of replicas does that): a replica is made `running` as a start would."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_replicas_store import Loop, containers, start_waiting  # noqa: F401 (a fixture)
from test_state import add_host, db_url  # noqa: F401 (a fixture)

from gpufleet import present, queue
from gpufleet.errors import ConfigError, GpufleetError
from gpufleet.models import RunStatus
from gpufleet.models.run import RUN_CONFIG, group_specs
from gpufleet.replicas import versions, wanted_of
from gpufleet.runconfig import load_run, parse_run
from gpufleet.state import Store

WHO = queue.Submitter(user="", project="default")
HEAD = "type: service\nname: web\nimage: x\nport: 80\n"
TWO = """replicas:
  - name: big
    count: 1..2
    scaling: {metric: rps, target: 10}
    commands: [serve big]
    resources: {gpu: 4}
  - count: 1
    commands: [serve small]
    resources: {gpu: 1}
"""


def problems(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_run(path)
    return "\n".join(map(str, e.value.problems))


def test_groups_merge_over_the_service_and_survive_being_stored():
    req = parse_run(HEAD.replace("image: x\n", "") + "env: [A=1]\nprobes: [{type: http, url: /health}]\n" + TWO +
                    "  - name: gpu-image\n    count: 0..3\n    scaling: {metric: rps, target: 2}\n"
                    "    image: other\n    privileged: true\n", "web.yml")
    groups = req.config.groups
    assert [g.name for g in groups] == ["big", "1", "gpu-image"]  # the index when omitted, as dstack
    assert [str(g.replicas) for g in groups] == ["1..2", "1", "0..3"]  # dstack's `count`
    spec = req.config.model_dump(mode="json")
    assert RUN_CONFIG.validate_python(spec).model_dump(mode="json") == spec  # a stored spec reads back the same
    merged = dict(group_specs(spec))
    big, small, other = merged["big"], merged["1"], merged["gpu-image"]
    assert (big["replicas"], big["scaling"]["target"], big["commands"]) == ("1..2", 10, ["serve big"])
    assert (small["replicas"], small["scaling"], small["commands"]) == ("1", None, ["serve small"])
    assert big["resources"]["gpu"]["count"] == {"min": 4, "max": 4}
    assert small["resources"]["gpu"]["count"] == {"min": 1, "max": 1}
    assert other["resources"]["gpu"] is None or other["resources"] != big["resources"]  # its own, not inherited
    assert (other["image"], other["privileged"], big["image"], big["privileged"]) == ("other", True, None, False)
    for g in merged.values():  # the rest is the service's, and each is a plain service of its own
        assert g["env"] == ["A=1"] and g["probes"][0]["url"] == "/health" and g["port"] == 80
        assert RUN_CONFIG.validate_python(g).groups is None
    # what rolls: a group's spec without its count and scaling
    assert set(versions(spec)) == {"big", "1", "gpu-image"}
    spec2 = json.loads(json.dumps(spec))
    spec2["replicas"][0]["replicas"] = "2..2"
    spec2["replicas"][0]["scaling"] = None
    assert versions(spec2) == versions(spec)
    spec2["replicas"][1]["commands"] = ["serve smaller"]
    assert versions(spec2)["1"] != versions(spec)["1"] and versions(spec2)["big"] == versions(spec)["big"]


def test_a_plain_service_is_one_group_of_its_own():
    spec = parse_run(HEAD + "replicas: 2\n", "web.yml").config.model_dump(mode="json")
    assert group_specs(spec) == [("0", spec)]


@pytest.mark.parametrize("text,where,says", [
    ("commands: [x]\n" + TWO, ":5:", "a service with replica groups takes no top-level `commands`"),
    ("resources: {gpu: 1}\n" + TWO, ":5:", "takes no top-level `resources`"),
    ("scaling: {metric: rps, target: 1}\n" + TWO, ":5:", "takes `scaling` in each group, not at the top"),
    ("spot_policy: auto\n" + TWO.replace("commands: [serve small]", "commands: [a]\n    spot_policy: auto"), ":",
     "replicas[1].spot_policy: `spot_policy` is set for the service too"),
    (TWO.replace("count: 1\n", "count: 1..3\n"), ":11:", "the group needs `scaling`"),
    (TWO.replace("name: big", "name: '1'"), ":6:", "replica group name '1' is given more than once"),
    (TWO.replace("name: big", "name: Big"), ":6:", "replicas[0].name: 'Big': a replica group's name"),
    (TWO.replace("    commands: [serve small]\n", "    commands: [serve]\n    docker: true\n"), ":",
     "replicas[1].docker: not with the service's `image`"),
    (TWO.replace("count: 1\n", "count: 1\n    reservation: r\n"), ":", "replicas[1].reservation: unknown field"),
    (TWO.replace("resources: {gpu: 1}", "resources: {gpu: 1}\n    router: {type: dynamo}"), ":14:",
     "replicas[1].router.type: `dynamo` (NVIDIA Dynamo's frontend"),
    (TWO.replace("resources: {gpu: 4}", "resources: {gpu: 4}\n    router: {type: sglang}"), ":6:",
     "replica group 'big' has `router`: it must have `replicas: 1`"),
    (TWO.replace("resources: {gpu: 4}", "resources: {gpu: 4}\n    router: {}").replace(
        "count: 1..2\n    scaling: {metric: rps, target: 10}", "count: 1").replace(
        "resources: {gpu: 1}", "resources: {gpu: 1}\n    router: {type: sglang}"), ":6:",
     "at most one replica group may have `router`"),
    (TWO.replace("resources: {gpu: 1}", "resources: {gpu: 1}\n    router: {type: sglang, policy: x}"), ":",
     "replicas[1].router.policy: unknown field"),
    ("replicas:\n  - count: 1\n    commands: [smg launch]\n    router: {type: sglang}\n", ":6:",
     "is the router: the service needs a group of workers beside it"),
    (TWO.replace("commands: [serve big]", "commands: [python -m sglang.launch_server --grpc-mode]").replace(
        "resources: {gpu: 1}", "resources: {gpu: 1}\n    router: {type: sglang}"), ":9:",
     "replicas[0].commands[0]: a gRPC worker (`--grpc-mode`) is not supported"),
    ("replicas: []\n", ":5:", "an empty list of replica groups"),
])
def test_what_a_service_with_groups_may_not_say(tmp_path, text, where, says):
    out = problems(tmp_path, HEAD + text)
    assert where in out and says in out, out


def test_a_group_needs_commands_or_an_image(tmp_path):
    load_run_text = HEAD.replace("image: x\n", "") + "replicas:\n  - count: 1\n    image: y\n"
    path = tmp_path / "ok.yml"
    path.write_text(load_run_text)
    assert load_run(path).config.groups[0].image == "y"
    out = problems(tmp_path, HEAD.replace("image: x\n", "") + TWO.replace("    commands: [serve small]\n", ""))
    assert ":10:" in out and "replica group '1' needs `commands`, or an `image`" in out, out


def submit(store: Store, text: str):
    req = parse_run(HEAD + text, "web.yml")
    return queue.submit(store, req, seal=lambda secrets: "sealed", who=WHO)[0]


def test_each_group_has_its_own_replicas_placed_by_its_own_resources(db_url, containers):  # noqa: F811
    store = Store(db_url)
    add_host(store, "f", "a", 4)
    add_host(store, "f", "b", 4)
    web = submit(store, TWO)
    assert (web.replicas, web.group_replicas) == (2, {"big": 1, "1": 1})
    reps = store.replica_runs("web")
    assert [(r.name, r.replica_group, r.spec["commands"]) for r in reps] == [
        ("web.0", "big", ["serve big"]), ("web.1", "1", ["serve small"])]
    placed = start_waiting(store)
    assert sorted(placed) == ["web.0", "web.1"]
    assert [len(r.gpus) for r in store.replica_runs("web")] == [4, 1]  # each group's own resources
    loop = Loop(store)
    loop.ready = {"web.0"}
    loop()
    web = store.run("web")
    assert (web.status, web.message) == (RunStatus.RUNNING, "1/2 replicas ready")
    table = present.ps_table(store.runs())
    kinds = [str(c) for c in next(c for c in table.columns if c.header == "TYPE").cells]
    assert kinds == ["service", "replica (big)", "replica (1)"], kinds
    rows = json.loads(present.runs_json(store.runs()))
    assert {r["name"]: r["replica_group"] for r in rows} == {"web": None, "web.0": "big", "web.1": "1"}
    assert rows[0]["group_replicas_wanted"] == {"big": 1, "1": 1}

    # a replica that fails is replaced in its own group
    store.finish_run("web.1", RunStatus.FAILED, 1, "exit code 1")
    loop()
    assert [(r.name, r.replica_group) for r in store.replica_runs("web")] == [("web.0", "big"), ("web.2", "1")]


def test_a_group_that_cannot_fit_is_refused_naming_it(db_url):  # noqa: F811
    store = Store(db_url)
    add_host(store, "f", "a", 2)
    with pytest.raises(GpufleetError, match=r"web \(replica group big\)"):
        submit(store, TWO)
    assert store.run("web") is None
    plan = queue.plan(store, parse_run(HEAD + TWO, "web.yml"), who=WHO)
    assert "replica group big" in plan.never


def test_each_group_scales_by_its_own_target_from_the_services_rate(db_url):  # noqa: F811
    store = Store(db_url)
    add_host(store, "f", "a", 8)
    submit(store, """replicas:
  - name: fast
    count: 1..3
    scaling: {metric: rps, target: 2, scale_up_delay: 30s, scale_down_delay: 60s}
    commands: [a]
  - name: slow
    count: 1..3
    scaling: {metric: rps, target: 5, scale_up_delay: 30s, scale_down_delay: 60s}
    commands: [b]
""")
    start_waiting(store)
    loop = Loop(store)
    t0 = store.run("web").created_at
    loop.rate = 5.0  # fast wants ceil(5/2) = 3, slow ceil(5/5) = 1
    loop(now=t0 + 10)
    assert store.run("web").group_replicas == {"fast": 1, "slow": 1}  # within scale_up_delay
    loop(now=t0 + 31)
    web = store.run("web")
    assert (web.replicas, web.group_replicas) == (4, {"fast": 3, "slow": 1})
    assert sorted(r.replica_group for r in store.replica_runs("web")) == ["fast", "fast", "fast", "slow"]
    assert any("group fast: scaled from 1 to 3 replicas (5.00 requests/s, target 2 per replica)" in e.message
               for e in store.events(run="web"))
    start_waiting(store)
    loop.rate = 0.0
    loop.ready = {r.name for r in store.replica_runs("web")}
    loop(now=t0 + 92)
    web = store.run("web")
    assert (web.replicas, web.group_replicas) == (2, {"fast": 1, "slow": 1})
    assert sorted(r.replica_group for r in store.replica_runs("web")) == ["fast", "slow"]


def test_an_update_rolls_only_the_changed_group_and_a_removed_groups_replicas_go(db_url, containers):  # noqa: F811
    store = Store(db_url)
    add_host(store, "f", "a", 8)
    three = TWO.replace("count: 1..2\n    scaling: {metric: rps, target: 10}\n", "count: 1\n") + \
        "  - name: extra\n    count: 1\n    commands: [serve extra]\n"
    submit(store, three)
    start_waiting(store)
    loop = Loop(store)
    loop.ready = {"web.0", "web.1", "web.2"}
    loop()
    assert store.run("web").message == "3/3 replicas ready"

    # group 1 changes, group extra is removed: only group 1 rolls; extra's replica goes once the
    # others are ready in the numbers wanted
    two = three.replace("serve small", "serve smaller").split("  - name: extra")[0]
    submit(store, two)
    assert store.run("web").replicas == 2
    loop()
    assert loop.stopped == ["web.2"]  # the others have their 2 ready: extra's replica goes at once
    assert [(r.name, r.replica_group) for r in store.replica_runs("web")] == [
        ("web.0", "big"), ("web.1", "1"), ("web.3", "1")]
    start_waiting(store)
    loop.ready = {"web.0", "web.1", "web.3"}
    loop()
    assert loop.stopped == ["web.2", "web.1"]
    assert [(r.name, r.spec["commands"]) for r in store.replica_runs("web")] == [
        ("web.0", ["serve big"]), ("web.3", ["serve smaller"])]
    assert wanted_of(store.run("web")) == {"big": 1, "1": 1}
    events = [e.message for e in store.events(run="web.2")]
    assert any("its replica group extra was removed from the service" in m for m in events), events

    # the same file again changes nothing
    before = store.run("web").updated_at
    time.sleep(0.01)
    submit(store, two)
    assert store.run("web").updated_at == before
