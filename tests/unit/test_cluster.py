from __future__ import annotations

import pytest

from gpufleet.cluster import choose_address, hostfile_script, node_env
from gpufleet.errors import GpufleetError
from gpufleet.runner import HostOutcome


def outcome(addresses, route_src=None, default=None) -> HostOutcome:
    o = HostOutcome("n", "ok")
    o.results["ansible.builtin.setup"] = {"ansible_facts": {
        "ansible_all_ipv4_addresses": addresses, "ansible_default_ipv4": {"address": default} if default else {}}}
    if route_src:
        o.results["ansible.builtin.command"] = {"stdout": f"10.0.0.9 dev eth1 src {route_src} uid 1000"}
    return o


def test_internal_ip_must_exist_on_the_host():
    assert choose_address("n", outcome(["10.0.0.5", "192.0.2.1"]), "10.0.0.5", None) == "10.0.0.5"
    with pytest.raises(GpufleetError, match="internal_ip 10.0.0.7 is not an address of the host"):
        choose_address("n", outcome(["10.0.0.5"]), "10.0.0.7", None)


def test_network_is_parsed_leniently():
    assert choose_address("n", outcome(["192.0.2.1", "10.0.0.5"]), None, "10.0.0.77/24") == "10.0.0.5"
    with pytest.raises(GpufleetError, match="no address in ssh_config.network"):
        choose_address("n", outcome(["192.0.2.1"]), None, "10.0.0.0/24")


def test_route_then_default():
    assert choose_address("n", outcome(["10.0.0.5", "192.0.2.1"], route_src="192.0.2.1"), None, None) == "192.0.2.1"
    assert choose_address("n", outcome(["10.0.0.5"], default="10.0.0.5"), None, None) == "10.0.0.5"
    with pytest.raises(GpufleetError, match="cannot tell its cluster address"):
        choose_address("n", outcome([]), None, None)


def test_environment_and_hostfile():
    env = node_env(1, ["10.0.0.1", "10.0.0.2"], 0)
    assert env["GPUFLEET_NODE_RANK"] == env["DSTACK_NODE_RANK"] == "1"
    assert env["DSTACK_NODES_IPS"] == "10.0.0.1\n10.0.0.2" and env["GPUFLEET_MASTER_NODE_IP"] == "10.0.0.1"
    assert "10.0.0.2 slots=1" in hostfile_script(["10.0.0.1", "10.0.0.2"], 0)  # never 0 slots on CPU nodes
