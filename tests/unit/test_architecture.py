"""The shape of the code: data flows one way, so no module imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[2] / "gpufleet"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """gpufleet's modules and what each imports from gpufleet, at the top or inside a function."""
    graph = nx.DiGraph()
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        graph.add_node(name)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpufleet"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("gpufleet")]
            for target in targets:
                if target in modules and target != name:
                    graph.add_edge(name, target)
    return graph


def test_no_module_imports_one_that_imports_it_back():
    cycles = list(nx.simple_cycles(import_graph()))
    assert cycles == []


def test_the_domain_and_scheduling_depend_on_nothing_above_them():
    graph = import_graph()
    below = {"gpufleet.models", "gpufleet.errors", "gpufleet.sshkeys"}
    pure = ["gpufleet.allocator", "gpufleet.blocks", "gpufleet.hostpolicy", "gpufleet.fairshare"]
    for module in [m for m in graph if m.startswith("gpufleet.models")] + pure:
        deps = {d for d in nx.descendants(graph, module) if not d.startswith("gpufleet.models.")}
        assert deps <= below, (module, deps - below)
    # the scheduler decides on the domain, the allocator's placement and fair share's usage, nothing else
    deps = {d for d in nx.descendants(graph, "gpufleet.scheduler") if not d.startswith("gpufleet.models.")}
    assert deps <= below | {"gpufleet.allocator", "gpufleet.fairshare"}, deps - below



# what only the server may touch: the state, and the modules that change it or the hosts
SERVER_SIDE = {"gpufleet.state", "gpufleet.queue", "gpufleet.runs", "gpufleet.apply", "gpufleet.launch",
               "gpufleet.probe", "gpufleet.runner", "gpufleet.containers", "gpufleet.server.api",
               "gpufleet.server.control", "gpufleet.server.main", "gpufleet.server.tunnel",
               "gpufleet.server.auth", "gpufleet.server.teams"}


def test_the_cli_reaches_state_only_through_the_servers_api():
    """One code path: every command that reads or changes state is a client of the server (the
    `server` command runs it; `lab` builds a local lab and touches no state)."""
    graph = import_graph()
    for module in [m for m in graph if m.startswith("gpufleet.commands.")] + ["gpufleet.client"]:
        if module in ("gpufleet.commands.server", "gpufleet.commands.lab", "gpufleet.commands"):
            continue
        reached = set(nx.descendants(graph, module))
        assert not reached & SERVER_SIDE, (module, sorted(reached & SERVER_SIDE))
