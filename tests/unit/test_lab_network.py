"""The lab's addresses (gpufleet.lab.core.Lab): a lab's nodes share one /23 behind the login node, so one lab
holds MAX_NODES (256) nodes; no node takes the network's or a /24's edge addresses or the login node's."""

from __future__ import annotations

import ipaddress

import pytest

from gpufleet.errors import UsageError
from gpufleet.lab import core


@pytest.mark.parametrize("index", [0, 7, core.MAX_LABS - 1])
def test_every_node_of_the_biggest_lab_has_its_own_address_in_the_labs_network(index):
    lab = core.Lab(dir="/nonexistent", index=index, vendor="nvidia", gpus_per_node=8, hosts=[])
    net = ipaddress.ip_network(lab.cluster_network)
    addresses = [ipaddress.ip_address(lab.node_address(i)) for i in range(core.MAX_NODES)]
    assert len(set(addresses)) == core.MAX_NODES
    assert all(a in net for a in addresses)
    assert ipaddress.ip_address(lab.cluster_gateway) in net and ipaddress.ip_address(lab.cluster_gateway) \
        not in addresses
    assert not [a for a in addresses if int(a) % 256 in (0, 255)]  # no /24's network or broadcast address
    others = [ipaddress.ip_network(core.Lab(dir="/x", index=j, vendor="nvidia", gpus_per_node=8,
                                            hosts=[]).cluster_network) for j in range(core.MAX_LABS) if j != index]
    assert not [o for o in others if o.overlaps(net)]  # labs side by side do not share addresses


def test_more_nodes_than_a_lab_holds_are_refused_before_anything_is_made(tmp_path):
    with pytest.raises(UsageError, match=f"between 1 and {core.MAX_NODES}"):
        core.up(tmp_path / "lab", nodes=core.MAX_NODES + 1)
    assert not (tmp_path / "lab").exists()
