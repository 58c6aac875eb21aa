from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, container_module

from gpufleet import launch
from gpufleet.containers import commands
from gpufleet.errors import ConfigError
from gpufleet.models import (
    RETRY_DURATION_DEFAULT,
    RUN_CONFIG,
    RUN_PRIORITY_DEFAULT,
    STOP_DURATION_DEFAULT,
    GPUSpec,
    Range,
    RetryEvent,
    RetryPolicy,
    RetrySpec,
    TaskConfig,
    parse_duration,
)
from gpufleet.models.core import HostStatus
from gpufleet.runconfig import load_run
from gpufleet.runner import HostOutcome, PlaybookResult
from gpufleet.scheduler import PRIORITY_DEFAULT


@pytest.mark.parametrize("spec,count,names,vendor,memory", [
    (4, Range(4, 4), None, None, None),
    ("2..4", Range(2, 4), None, None, None),
    ("H100:4", Range(4, 4), ["H100"], None, None),
    ("H100:80GB:4", Range(4, 4), ["H100"], None, Range(80, 80)),  # a single size is exact, as in dstack
    ("A100,H100:2", Range(2, 2), ["A100", "H100"], None, None),
    ("amd:2", Range(2, 2), None, "amd", None),
    ("gaudi:MI-ignored:1", Range(1, 1), ["MI-ignored"], "intel", None),
    ("24GB..:1", Range(1, 1), None, None, Range(24, None)),
    ({"name": "H100", "count": "1..2", "memory": "40GB..80GB"}, Range(1, 2), ["H100"], None, Range(40, 80)),
])
def test_gpu_specs(spec, count, names, vendor, memory):
    g = GPUSpec.model_validate(spec)
    assert (g.count, g.name, g.vendor, g.memory) == (count, names, vendor, memory)


def test_task_loads_and_bad_run_configs_point_at_the_field(tmp_path: Path):
    good = tmp_path / "train.yml"
    good.write_text("type: task\nimage: localhost/gpufleet-lab:latest\ncommands: [echo hi]\n"
                    "env: {A: '1'}\nresources: {gpu: H100:4}\n")
    run = load_run(good)
    assert run.name == "train" and run.config.resources.gpu.count == Range(4, 4)
    bad = tmp_path / "bad.yml"
    bad.write_text("type: task\nimage: '-v /:/host'\nresources:\n  gpu: H100:x!:4\nvolumes: [relative:/x]\n")
    with pytest.raises(ConfigError) as e:
        load_run(bad)
    text = "\n".join(map(str, e.value.problems))
    assert f"{bad}:2:8: image:" in text
    assert f"{bad}:4:8: resources.gpu:" in text
    assert f"{bad}:5:11: volumes[0]: 'relative' is a dstack network volume" in text
    unknown = tmp_path / "u.yml"
    unknown.write_text("type: job\nimage: x\n")
    with pytest.raises(ConfigError, match="type must be task, service or dev-environment"):
        load_run(unknown)


# ------------------------------------------------------------------ queueing: priority, durations, retry

DSTACK_CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "dstack-configs"
ALL_EVENTS = frozenset({"no-capacity", "interruption", "error"})


def _task(**fields):
    return TaskConfig.model_validate({"type": "task", "image": "localhost/gpufleet-lab:latest", **fields})


def _problems(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_run(path)
    return "\n".join(map(str, e.value.problems))


@pytest.mark.parametrize("value,seconds", [
    (90, 90.0), (2.5, 2.5), ("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1d", 86400.0),
    ("1w", 604800.0), ("5 m", 300.0), (" 2h ", 7200.0),
])
def test_duration_forms(value, seconds):
    assert parse_duration(value) == seconds
    assert _task(max_duration=value).max_duration == seconds
    assert _task(stop_duration=value).stop_duration == seconds
    assert _task(retry={"duration": value}).retry_policy.duration == seconds


@pytest.mark.parametrize("value", ["1h30m", "1.5h", "2H", "1e3", "h", "5mm", "ten", "", True, [1], {"h": 1}])
def test_duration_forms_dstack_does_not_take_are_refused(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_max_duration_off_and_unset_mean_no_limit():
    assert _task().max_duration is None
    for off in ("off", False, True, None):  # `max_duration: off` reads as False in YAML 1.1; true: dstack's default
        assert _task(max_duration=off).max_duration is None


def test_stop_duration_default_off_zero_and_json():
    cfg = _task()
    assert cfg.stop_duration is None and cfg.stop_timeout == STOP_DURATION_DEFAULT == 300.0
    off = _task(stop_duration="off")
    assert off.stop_duration == math.inf and off.stop_timeout == math.inf
    assert _task(stop_duration=False).stop_duration == math.inf and _task(stop_duration=True).stop_duration is None
    assert _task(stop_duration=0).stop_timeout == 0.0
    # what is stored (model_dump(mode="json")) reads back the same: `off` stays `off`, not null
    dumped = off.model_dump(mode="json")
    assert dumped["stop_duration"] == "off" and json.loads(off.model_dump_json())["stop_duration"] == "off"
    assert RUN_CONFIG.validate_python(dumped) == off
    full = _task(priority=9, max_duration="2h", stop_duration="90s", retry={"on_events": ["error"], "duration": "1h"})
    assert RUN_CONFIG.validate_python(json.loads(full.model_dump_json())) == full


def test_priority_default_range_and_null():
    assert _task().priority == RUN_PRIORITY_DEFAULT == PRIORITY_DEFAULT == 50
    assert _task(priority=None).priority == 50  # dstack takes `priority: null` for its default
    assert [_task(priority=p).priority for p in (0, 100, "7")] == [0, 100, 7]


@pytest.mark.parametrize("line,message", [
    ("priority: 101", "3:11: priority: must be a number from 0 to 100 (got 101)"),
    ("priority: -1", "3:11: priority: must be a number from 0 to 100 (got -1)"),
    ("priority: true", "3:11: priority: must be a number from 0 to 100, not true"),
    ("priority: high", "3:11: priority: Input should be a valid integer"),
    ("max_duration: 0", "3:15: max_duration: must be more than 0 seconds"),
    ("max_duration: -5", "3:15: max_duration: must be more than 0 seconds"),
    ("max_duration: 1h30m", "3:15: max_duration: '1h30m' is not a duration"),
    ("max_duration: 2H", "3:15: max_duration: '2H' is not a duration"),
    ("stop_duration: -1", "3:16: stop_duration: must be 0 seconds or more"),
    ("stop_duration: 1.5h", "3:16: stop_duration: '1.5h' is not a duration"),
    ("retry: maybe", "3:8: retry: must be true, false or a mapping {on_events, duration}"),
    ("retry: 1", "3:8: retry: must be true, false or a mapping {on_events, duration}"),
    ("retry:\n  on_events: []", "4:14: retry.on_events: cannot be empty"),
    ("retry:\n  on_events: [no-capacity, oops]", "4:28: retry.on_events[1]: Input should be 'no-capacity', "
                                                  "'interruption' or 'error'"),
    ("retry:\n  duration: off", "4:13: retry.duration: must be a duration"),  # YAML 1.1: off is false
    ("retry:\n  duration: 'off'", "4:13: retry.duration: 'off' is not a duration"),
    ("retry:\n  duration: 0", "4:13: retry.duration: must be more than 0 seconds"),
    ("retry:\n  durration: 1h", "4:3: retry.durration: unknown field 'durration'"),
])
def test_bad_queueing_fields_point_at_the_field_and_line(tmp_path, line, message):
    text = _problems(tmp_path, f"type: task\nimage: localhost/gpufleet-lab:latest\n{line}\n")
    assert f"{tmp_path / 'run.yml'}:{message}" in text, text


@pytest.mark.parametrize("retry,queue,events,duration", [
    (None, True, {"no-capacity"}, None),  # gpufleet: no `retry` waits for capacity, no time bound
    (False, False, set(), None),
    (True, True, ALL_EVENTS, 3600.0),  # dstack: every event, 1h
    ({}, True, ALL_EVENTS, 3600.0),
    ({"duration": "30m"}, True, ALL_EVENTS, 1800.0),
    ({"on_events": ["no-capacity"]}, True, {"no-capacity"}, 3600.0),
    ({"on_events": ["no-capacity"], "duration": "48h"}, True, {"no-capacity"}, 172800.0),
    ({"on_events": ["error", "interruption"], "duration": "48h"}, False, {"error", "interruption"}, 172800.0),
    ({"on_events": ["error"]}, False, {"error"}, 3600.0),
])
def test_retry_policy(retry, queue, events, duration):
    policy = _task(**({} if retry is None else {"retry": retry})).retry_policy
    assert policy == RetryPolicy(queue=queue, on_events=frozenset(events), duration=duration)
    assert isinstance(policy.on_events, frozenset) and all(isinstance(e, RetryEvent) for e in policy.on_events)
    assert RETRY_DURATION_DEFAULT == 3600.0


def test_queueing_fields_in_a_file_for_every_run_type(tmp_path):
    path = tmp_path / "svc.yml"
    path.write_text("type: service\nimage: localhost/gpufleet-lab:latest\nport: 8000\npriority: 80\n"
                    "max_duration: 1d\nstop_duration: 'off'\nretry: false\n")
    cfg = load_run(path).config
    assert (cfg.priority, cfg.max_duration, cfg.stop_timeout, cfg.retry_policy.queue) == (80, 86400.0, math.inf, False)
    path.write_text("type: dev-environment\nimage: localhost/gpufleet-lab:latest\nretry: true\nstop_duration: 30s\n")
    cfg = load_run(path).config
    assert (cfg.priority, cfg.max_duration, cfg.stop_timeout, cfg.retry_policy.duration) == (50, None, 30.0, 3600.0)


# real dstack files (../shared/fixtures/dstack-configs) that use the queueing fields, and what they mean
DSTACK_QUEUEING = {
    "md-head/md-head-025/.dstack.yml": {"retry": RetryPolicy(True, ALL_EVENTS, 3600.0)},
    "md-head/md-head-080/.dstack.yml": {"retry": RetryPolicy(True, ALL_EVENTS, 3600.0)},
    "md-head/md-head-102/.dstack.yml": {"retry": RetryPolicy(True, ALL_EVENTS, 3600.0)},
    "md-head/md-head-202/.dstack.yml": {"retry": RetryPolicy(True, frozenset({"no-capacity"}), 3600.0)},
    "md-head/md-head-191/.dstack.yml": {"retry": RetryPolicy(False, frozenset({"error", "interruption"}), 172800.0)},
    "md-head/md-head-178/.dstack.yml": {"priority": 50, "max_duration": 7200.0,
                                        "retry": RetryPolicy(True, frozenset({"no-capacity"}), 172800.0)},
    "md-head/md-head-103/.dstack.yml": {"priority": 50},
    "md-head/md-head-173/.dstack.yml": {"max_duration": 7200.0},
    "md-head/md-head-176/.dstack.yml": {"max_duration": 86400.0},
    "md-head/md-head-187/dev.dstack.yml": {"max_duration": 28800.0},
    "blog-head/blog-head-004/.dstack.yml": {"max_duration": 7200.0},
}
QUEUEING_FIELDS = ("priority", "max_duration", "stop_duration", "retry")


def test_real_dstack_files_queueing_fields():
    """Each file's queueing fields read as dstack means them. Most of these files are refused for other
    fields (`python:` instead of `image:`, `repos`...): their errors never name a queueing field."""
    assert DSTACK_CONFIGS.is_dir(), f"{DSTACK_CONFIGS} is missing (real dstack files, read from shared/)"
    found = {str(p.relative_to(DSTACK_CONFIGS / "corpus")) for p in (DSTACK_CONFIGS / "corpus").rglob("*.yml")
             if any(f"\n{f}:" in "\n" + p.read_text() for f in QUEUEING_FIELDS)}
    assert found == set(DSTACK_QUEUEING)
    for rel, want in DSTACK_QUEUEING.items():
        path = DSTACK_CONFIGS / "corpus" / rel
        data = yaml.safe_load(path.read_text())
        cfg = _task(**{k: data[k] for k in QUEUEING_FIELDS if k in data})
        got = {"priority": cfg.priority, "max_duration": cfg.max_duration, "retry": cfg.retry_policy}
        assert {k: got[k] for k in want} == want, rel
        try:
            load_run(path)
        except ConfigError as e:
            named = [str(p) for p in e.problems if p.field.split(".")[0].split("[")[0] in QUEUEING_FIELDS]
            assert named == [], rel


def test_real_dstack_service_with_retry_loads():
    run = load_run(DSTACK_CONFIGS / "corpus/md-head/md-head-080/.dstack.yml")
    assert run.type == "service" and run.config.retry == RetrySpec(on_events=["no-capacity", "error", "interruption"],
                                                                  duration=3600)
    assert run.config.retry_policy == RetryPolicy(queue=True, on_events=ALL_EVENTS, duration=3600.0)


# ------------------------------------------------------------------ stop timeout: launch -> role -> module -> argv

def test_stop_argv_with_a_timeout():
    cmd = commands()
    assert cmd.stop_argv(["sudo", "-n", "podman"], "gpufleet-x", 300) == \
        ["sudo", "-n", "podman", "stop", "-t", "300", "gpufleet-x"]
    assert cmd.stop_argv(["docker"], "gpufleet-x") == ["docker", "stop", "-t", "10", "gpufleet-x"]


@pytest.mark.parametrize("params,want", [({"stop_timeout": 300}, "300"), ({"stop_timeout": 0}, "0"),
                                         ({"stop_timeout": 10}, "10")])
def test_container_module_stops_with_its_stop_timeout(monkeypatch, params, want):
    mod = container_module(monkeypatch)
    ran = []

    class FakeAnsibleModule:
        def __init__(self):
            self.params = {"runtime": "podman", **params}

        def run_command(self, argv, expand_user_and_vars=True):
            ran.append(argv)
            return 0, "", ""

    runtime = object.__new__(mod.Runtime)
    runtime.module, runtime.binary = FakeAnsibleModule(), "/usr/bin/podman"
    runtime.stop("gpufleet-x")
    assert ran == [["/usr/bin/podman", "stop", "-t", want, "gpufleet-x"]]


def test_stop_timeout_documented_alike_in_module_and_role(monkeypatch):
    mod = container_module(monkeypatch)
    option = yaml.safe_load(mod.DOCUMENTATION)["options"]["stop_timeout"]
    assert (option["type"], option["default"]) == ("int", commands().STOP_TIMEOUT)
    role = ROOT / "roles" / "workload"
    spec = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert spec["workload_stop_timeout"]["type"] == "int"
    assert spec["workload_stop_timeout"]["default"] == commands().STOP_TIMEOUT
    assert yaml.safe_load((role / "defaults" / "main.yml").read_text())["workload_stop_timeout"] == 10
    tasks = yaml.safe_load((role / "tasks" / "main.yml").read_text())
    stop = next(t for t in tasks if "stop" in (t.get("tags") or []) or t["name"].startswith("Stop"))
    assert stop["gpufleet_container"]["stop_timeout"] == "{{ workload_stop_timeout }}"


@pytest.mark.parametrize("timeout,expected", [(None, None), (300.0, 300), (0, 0), (2.5, 3)])
def test_stop_containers_passes_the_timeout_to_the_stop_playbook(monkeypatch, timeout, expected):
    calls = []

    def fake_run_playbook(name, inventory, *, limit=None, unsafe_vars=None, **_):
        calls.append((name, limit, unsafe_vars))
        return PlaybookResult("successful", 0, {a: HostOutcome(a, HostStatus.OK) for a in limit}, "")

    class Files:
        inventory = Path("/nonexistent/inventory.ini")

        def require(self):
            return self

    monkeypatch.setattr(launch, "run_playbook", fake_run_playbook)
    monkeypatch.setattr(launch.FleetFiles, "of", classmethod(lambda cls, fleet: Files()))
    launch.stop_containers("lab", "gpufleet-x", "r1", ["n1", "n2"], timeout=timeout)
    (name, limit, variables), = calls
    assert (name, limit) == ("stop", ["n1", "n2"])
    assert variables.get("workload_stop_timeout") == expected
    assert ("workload_stop_timeout" in variables) == (timeout is not None)


@pytest.mark.parametrize("timeout", [-1, math.inf, math.nan])
def test_stop_containers_refuses_a_timeout_it_cannot_give(timeout):
    with pytest.raises(ValueError, match="stop timeout"):
        launch.stop_containers("lab", "gpufleet-x", "r1", ["n1"], timeout=timeout)


# ------------------------------------------------------------------ errors a user can act on (issue 14)

@pytest.mark.parametrize("text,message", [
    ("type: task\nimage: busybox\ncomands: [echo hi]\n",
     "3:1: comands: unknown field 'comands'; did you mean 'commands'?"),
    ("type: task\nimage: busybox\nresources:\n  gpus: 2\n",
     "4:3: resources.gpus: unknown field 'gpus'; did you mean 'gpu'?"),
    ("type: service\nimage: busybox\nprot: 8000\nport: 80\n", "3:1: prot: unknown field 'prot'; did you mean 'port'?"),
    ("type: dev-environment\nimage: busybox\nidee: vscode\n", "3:1: idee: unknown field 'idee'; did you mean 'ide'?"),
    ("type: task\nimage: busybox\nretry:\n  durration: 1h\n", "4:3: retry.durration: unknown field 'durration'; "
                                                             "did you mean 'duration'?"),
])
def test_a_typo_in_a_run_gets_did_you_mean(tmp_path, text, message):
    assert f"{tmp_path / 'run.yml'}:{message}" in _problems(tmp_path, text)


@pytest.mark.parametrize("kind,line,hint", [
    ("task", "single_branch: true", "; gpufleet uploads a repo's working tree without its .git folder"),
    ("task", "dstack: \">=0.19\"", ""),
    ("task", "max_price: 1.5", "; a dstack cloud field"),
    ("service", "gateway: true", "; gpufleet has no gateway"),
    ("dev-environment", "version: 1.95.0", "; gpufleet pre-installs no IDE server"),
])
def test_a_dstack_field_gpufleet_does_not_support_is_named_with_what_to_do(tmp_path, kind, line, hint):
    port = "port: 8000\n" if kind == "service" else ""
    text = _problems(tmp_path, f"type: {kind}\nimage: busybox\n{port}{line}\n")
    field = line.split(":")[0]
    at = 4 if port else 3
    expected = f"{tmp_path / 'run.yml'}:{at}:1: {field}: a dstack field that gpufleet does not support: {field!r}{hint}"
    assert expected in text, text
    if not hint:
        assert text.rstrip().endswith(f"{field!r}"), text


def test_a_dstack_field_of_another_run_type_is_just_unknown(tmp_path):
    # `init` is a dev environment's field: in a task it is no dstack field at all
    text = _problems(tmp_path, "type: task\nimage: busybox\ninit: [x]\n")
    assert "init: unknown field 'init'" in text and "dstack field" not in text


def test_the_unsupported_list_names_no_field_gpufleet_takes():
    from gpufleet.runconfig import _MODELS, UNSUPPORTED

    assert set(UNSUPPORTED) == set(_MODELS)
    for kind, fields in UNSUPPORTED.items():
        assert not set(fields) & set(_MODELS[kind].model_fields), kind


def _real_run_files() -> list[tuple[str, str, Path]]:
    import csv

    assert DSTACK_CONFIGS.is_dir(), f"{DSTACK_CONFIGS} is missing (real dstack files, read from shared/)"
    ok = json.loads((DSTACK_CONFIGS / "dstack_results.json").read_text())
    with (DSTACK_CONFIGS / "manifest.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [(r["id"], r["dstack_type"], DSTACK_CONFIGS / r["file"]) for r in rows
            if r["dstack_type"] in ("task", "service", "dev-environment") and r["dup_of"] == "-"
            and ok.get(r["id"], {}).get("ok")]


def test_every_top_level_field_of_real_dstack_runs_is_taken_or_named_as_unsupported():
    """Of dstack's own run files (that dstack accepts), each top-level field is one gpufleet takes or one
    the error names as dstack's, with no bare `unknown field` and no traceback."""
    from gpufleet.runconfig import _MODELS, UNSUPPORTED

    files = _real_run_files()
    assert len(files) > 200
    for ident, kind, path in files:
        data = yaml.safe_load(path.read_text())
        for key in data:
            assert key in _MODELS[kind].model_fields or key in UNSUPPORTED[kind], (ident, kind, key)
        try:
            load_run(path)
        except ConfigError as e:
            bare = [str(p) for p in e.problems if "." not in p.field and "[" not in p.field
                    and "unknown field" in p.message]
            assert bare == [], (ident, bare)


def test_a_command_read_as_a_mapping_says_so_and_how_to_quote_it(tmp_path):
    text = _problems(tmp_path, 'type: task\nimage: busybox\ncommands:\n  - echo ok\n'
                               '  - echo "I have $GPUFLEET_GPUS_NUM GPUs: $GPUFLEET_GPUS"\n  - sleep: 10\n'
                               "  - it's: ok\n  - x: yes\n")
    path = tmp_path / "run.yml"
    assert (f"{path}:5:5: commands[1]: this line is read as a YAML mapping because of ': ' — quote the whole "
            f"line: 'echo \"I have $GPUFLEET_GPUS_NUM GPUs: $GPUFLEET_GPUS\"'") in text, text
    assert f"{path}:6:5: commands[2]: this line is read as a YAML mapping because of ': ' — quote the whole line: " \
           f"'sleep: 10'" in text
    assert "commands[3]: this line is read as a YAML mapping because of ': ' — quote the whole line: 'it''s: ok'" \
        in text
    assert text.rstrip().endswith("commands[4]: this line is read as a YAML mapping because of ': ' — quote the "
                                  "whole line"), text  # `yes` is YAML's true: no example rebuilt from it
    # the example it gives loads
    fixed = yaml.safe_load("commands:\n  - 'echo \"I have $GPUFLEET_GPUS_NUM GPUs: $GPUFLEET_GPUS\"'\n"
                           "  - 'it''s: ok'\n")
    assert fixed["commands"] == ['echo "I have $GPUFLEET_GPUS_NUM GPUs: $GPUFLEET_GPUS"', "it's: ok"]


def test_a_service_takes_auth_strip_prefix_probes_and_replicas(tmp_path):
    path = tmp_path / "svc.yml"
    path.write_text("type: service\nimage: busybox\nport: 8000\ncommands: [httpd -f]\nauth: false\n"
                    "strip_prefix: false\nreplicas: 1\nprobes:\n- type: http\n  url: /health?x=1\n  interval: 2s\n"
                    "  ready_after: 3\n  headers: [{name: X-Probe, value: probe}]\n")
    cfg = load_run(path).config
    assert (cfg.auth, cfg.strip_prefix, str(cfg.replicas), cfg.scaling) == (False, False, "1", None)
    probe = cfg.probes[0]
    assert (probe.url, probe.method, probe.interval, probe.timeout, probe.ready_after, probe.until_ready) == \
        ("/health?x=1", "get", 2.0, 10.0, 3, False)
    assert probe.headers[0].value == "probe"


@pytest.mark.parametrize("line,message", [
    ("replicas: 65", "4:11: replicas: replicas 65 is out of range (0..64)"),
    ("replicas: 2..", "4:11: replicas: replicas '2..': the maximum number of replicas is needed (e.g. 1..4)"),
    ("replicas: 1..4", "scaling: `replicas: 1..4` is a range: it needs `scaling`"),
    ("replicas: 2\nscaling: {metric: rps, target: 1}", "scaling: `replicas` must be a range (e.g. 1..4)"),
    ("replicas: 1..2\nscaling: {metric: rps, target: 0}", "scaling.target: Input should be greater than 0"),
    ("replicas: 1..2\nscaling: {metric: rps, target: 1, window: 10s}", "scaling.window: window '10s' must be one "
                                                                         "of 30s, 60s, 300s"),
    ("replicas: 1..2\nscaling: {metric: cpu, target: 1}", "scaling.metric: Input should be 'rps'"),
    ("probes: [{type: http, url: health}]", "4:28: probes[0].url: String should match pattern"),
    ("probes: [{type: http, interval: 0.5}]", "4:33: probes[0].interval: must be at least 1 second (got 0.5)"),
    ("probes: [{type: tcp}]", "probes[0].type: Input should be 'http'"),
])
def test_a_service_refuses_what_it_cannot_do_yet(tmp_path, line, message):
    assert message in _problems(tmp_path, f"type: service\nimage: busybox\nport: 8000\n{line}\n")


def test_a_router_replica_group_other_than_sglang_is_refused_saying_so(tmp_path):
    text = _problems(tmp_path, "type: service\nimage: busybox\nport: 8000\nreplicas:\n- count: 1\n  commands: [x]\n"
                               "  router: {type: dynamo}\n- count: 1\n  commands: [y]\n")
    assert ":7:" in text and "replicas[0].router.type: `dynamo`" in text and "is not supported" in text, text


def test_replicas_and_scaling_take_dstack_forms(tmp_path):
    path = tmp_path / "svc.yml"
    path.write_text("type: service\nimage: busybox\nport: 8000\nreplicas: 0..4\nscaling:\n  metric: rps\n"
                    "  target: 2.5\n  window: 30s\n  scale_up_delay: 10s\n  scale_down_delay: 1m\n")
    cfg = load_run(path).config
    assert (cfg.replicas.min, cfg.replicas.max) == (0, 4)
    s = cfg.scaling
    assert (s.metric, s.target, s.window, s.scale_up_delay, s.scale_down_delay) == ("rps", 2.5, 30, 10, 60)
    again = type(cfg).model_validate(cfg.model_dump(mode="json"))  # as stored and read back
    assert (str(again.replicas), again.scaling) == ("0..4", s)
    assert str(type(cfg).model_validate({**cfg.model_dump(mode="json"), "replicas": 3, "scaling": None})
               .replicas) == "3"
