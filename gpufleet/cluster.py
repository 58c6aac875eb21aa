"""Cluster networking for multi-node runs, and the environment gpufleet gives every run's
container: ranks, master address, MPI hostfile, under GPUFLEET_ and dstack's DSTACK_ names."""

from __future__ import annotations

import ipaddress
import re

from gpufleet.errors import GpufleetError
from gpufleet.runner import HostOutcome, run_playbook

MPI_HOSTFILE = "/tmp/gpufleet_mpi_hostfile"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def probe_addresses(inventory, aliases: list[str], hostnames: dict[str, str]) -> dict[str, HostOutcome]:
    """Run playbooks/addresses.yml on the nodes; each routes to the next node's address."""
    peers = {a: hostnames[aliases[(i + 1) % len(aliases)]] for i, a in enumerate(aliases)
             if _is_ip(hostnames[aliases[(i + 1) % len(aliases)]])}
    return run_playbook("addresses", inventory, limit=aliases, unsafe_vars={"gpufleet_peers": peers}).hosts


def choose_address(alias: str, outcome: HostOutcome | None, internal_ip: str | None, network: str | None) -> str:
    """The node's cluster address: internal_ip (must exist on the host), else its address inside
    ``network``, else the source address of the route to the other nodes. Raise with the reason."""
    if outcome is None or outcome.status.bad:
        raise GpufleetError(f"{alias}: cannot read its addresses: {outcome.message if outcome else 'no result'}")
    facts = next((r.get("ansible_facts", {}) for a, r in outcome.results.items() if a.endswith("setup")), {})
    addresses = [a for a in facts.get("ansible_all_ipv4_addresses", []) if not a.startswith("127.")]
    if internal_ip:
        if internal_ip not in addresses:
            raise GpufleetError(f"{alias}: internal_ip {internal_ip} is not an address of the host "
                                f"(it has {', '.join(addresses) or 'none'})")
        return internal_ip
    if network:
        net = ipaddress.ip_network(network, strict=False)
        inside = [a for a in addresses if ipaddress.ip_address(a) in net]
        if not inside:
            raise GpufleetError(f"{alias}: no address in ssh_config.network {net} (it has {', '.join(addresses)})")
        return inside[0]
    route = next((r for a, r in outcome.results.items() if a.endswith("command")), {})
    m = re.search(r"\bsrc (\S+)", route.get("stdout", ""))
    if m:
        return m.group(1)
    default = (facts.get("ansible_default_ipv4") or {}).get("address")
    if default:
        return default
    raise GpufleetError(f"{alias}: cannot tell its cluster address: set internal_ip or ssh_config.network")


def node_env(rank: int, ips: list[str], gpus_per_node: int) -> dict[str, str]:
    """The environment of node ``rank`` of a run on ``ips`` (one address a node; a single-node run
    passes no addresses), under both prefixes."""
    env = {"NODE_RANK": str(rank), "NODES_NUM": str(max(len(ips), 1)), "GPUS_PER_NODE": str(gpus_per_node)}
    if len(ips) > 1:
        env.update({"MASTER_NODE_IP": ips[0], "NODES_IPS": "\n".join(ips), "GPUS_NUM": str(gpus_per_node * len(ips)),
                    "MPI_HOSTFILE": MPI_HOSTFILE})
    return _prefixed(env)


def run_env(run_name: str, gpu_indices: list[int]) -> dict[str, str]:
    """What every container of a run is told about the run and its GPUs on its node."""
    return {**_prefixed({"RUN_NAME": run_name, "GPUS_NUM": str(len(gpu_indices))}),
            "GPUFLEET_GPUS": ",".join(map(str, gpu_indices))}


def _prefixed(env: dict[str, str]) -> dict[str, str]:
    return {f"{prefix}_{k}": v for prefix in ("GPUFLEET", "DSTACK") for k, v in env.items()}


def hostfile_script(ips: list[str], gpus_per_node: int) -> str:
    """Shell lines writing the MPI hostfile in the container (slots never 0, even on CPU nodes)."""
    lines = "\n".join(f"{ip} slots={max(gpus_per_node, 1)}" for ip in ips)
    return f"cat > {MPI_HOSTFILE} <<'GPUFLEET_HOSTFILE'\n{lines}\nGPUFLEET_HOSTFILE"
