"""A service's router (gpufleet.router): which workers a router is told of and how (SGLang's router API, as
dstack's server uses it), which paths its endpoint serves, and that its replicas run on their hosts' network,
one per host."""

from __future__ import annotations

import pytest

from gpufleet import router
from gpufleet.allocator import NoCapacity, Request, place
from gpufleet.models.run import group_specs, router_group
from gpufleet.runconfig import parse_run

PD = """type: service
name: pd
image: x
port: 8000
replicas:
  - count: 1
    commands: [smg launch --pd-disaggregation]
    router: {type: sglang}
  - name: prefill
    count: 1..4
    scaling: {metric: rps, target: 3}
    commands: [python -m sglang.launch_server --disaggregation-mode prefill]
    resources: {gpu: 1}
  - name: decode
    count: 1
    commands: [python -m sglang.launch_server --disaggregation-mode decode]
    resources: {gpu: 1}
"""


def test_a_router_service_runs_every_replica_on_the_hosts_network():
    spec = parse_run(PD, "pd.yml").config.model_dump(mode="json")
    assert router_group(spec) == "0"  # its index: the group is not named
    specs = dict(group_specs(spec))
    assert set(specs) == {"0", "prefill", "decode"}
    assert all(s["network"] == "host" for s in specs.values())
    plain = parse_run(PD.replace("    router: {type: sglang}\n", ""), "pd.yml").config.model_dump(mode="json")
    assert router_group(plain) is None and all(s.get("network") is None for _, s in group_specs(plain))


def test_a_ready_worker_is_told_to_the_router_as_its_server_info_says():
    url = "http://10.0.0.2:8000"
    assert router.worker_of(url, {"status": "ready", "disaggregation_mode": "prefill",
                                  "disaggregation_bootstrap_port": 8998}) == {
        "url": url, "worker_type": "prefill", "connection_mode": "http", "runtime_type": "sglang",
        "bootstrap_port": 8998}
    assert router.worker_of(url, {"status": "ready", "disaggregation_mode": "decode",
                                  "disaggregation_bootstrap_port": 8998}) == {
        "url": url, "worker_type": "decode", "connection_mode": "http", "runtime_type": "sglang"}
    assert router.worker_of(url, {"status": "ready", "disaggregation_mode": "null"})["worker_type"] == "regular"
    assert router.worker_of(url, {"status": "ready"})["worker_type"] == "regular"
    for not_ready in ({"status": "starting"}, {}, [], None, "ready"):
        assert router.worker_of(url, not_ready) is None


def test_the_router_is_told_what_changed_only():
    a = {"url": "http://10.0.0.2:8000", "worker_type": "prefill"}
    b = {"url": "http://10.0.0.3:8000", "worker_type": "decode"}
    listed = [{"id": "w1", "url": "http://10.0.0.2:8000/"}, {"id": "w2", "url": "http://10.0.0.9:8000"},
              {"url": "http://10.0.0.8:8000"}, "junk", {"id": "w3"}]
    add, remove = router.plan(listed, [a, b])
    assert add == [b]  # a is listed already (a trailing slash is the same URL)
    assert remove == [("w2", "http://10.0.0.9:8000")]  # one listed without an id cannot be removed
    assert router.plan([{"id": "w1", "url": a["url"]}], [a]) == ([], [])
    assert router.plan([], []) == ([], [])


def test_a_router_service_serves_its_routers_inference_paths_only():
    for path in ("/v1/chat/completions", "/v1/models", "/generate", "/chat/completions"):
        assert router.inference_path(path), path
    for path in ("/", "/workers", "/workers/w1", "/v1", "/generate/x", "/health", "/server_info"):
        assert not router.inference_path(path), path


def test_a_replica_that_must_be_alone_on_its_host_waits_rather_than_share_it():
    from test_allocator import req  # the allocator's own test hosts and requests
    from test_allocator import host as slots

    hosts = [slots(0, n=2), slots(1, n=2)]
    first = place(req(1), hosts)
    other = place(Request(gpu=req(1).gpu, spread=frozenset({first.host.instance_id})), hosts)
    assert other.host.instance_id != first.host.instance_id  # spread: another host when one fits
    both = frozenset({0, 1})
    assert place(Request(gpu=req(1).gpu, spread=both), hosts)  # ... else any
    with pytest.raises(NoCapacity) as e:  # a replica on its host's network: never beside another one
        place(Request(gpu=req(1).gpu, spread=both, spread_only=True), hosts)
    assert "node-0, node-1 run(s) another replica of its service" in str(e.value), str(e.value)
