"""`${{ namespace.name }}` references in run configurations, read with dstack's rules.

The rules are those of dstack's VariablesInterpolator (utils/interpolator.py, read at dstack
511c318c8; none of its code is here):

- A reference is `${{`, a name, `}}`: the first `}}` after the `${{` closes it, and whitespace
  around the name is dropped (`${{env.A}}` and `${{  env.A  }}` are the same). A `${{` with no `}}`
  after it is an error.
- A name is `namespace.name`, exactly one dot, each side a letter or `_` then letters, digits or `_`
  (`secrets.hf_token`; not `secrets.a.b`, `secrets.007`, `secrets.pass-word`).
- `$$` is one literal `$`, so `$${{ x }}` is the text `${{ x }}`. As in dstack this is read where a
  stretch of text begins (at the start, or just after a reference or a `$$`): at its first `$` only.
  When that first `$` is not doubled (`$HOME`), the stretch up to the next `${{` (or to the end) is
  kept as written, `$$` included. So `echo $$` gives `echo $`, and `echo $HOME $$` is unchanged.
  Other text, `$VAR`, `${VAR}` and `$(cmd)` among it, is kept as written.
- A value filled in is not read again.

Where gpufleet fills what (dstack fills `secrets` in `env` when a job starts, `run.args` in
`commands` at submission, `dstack.node_rank` in volume names per node, and refuses any other
name; gpufleet refuses every unknown namespace or name at load, with its line):

- ``env`` values: `env.NAME` (NAME must be in the run's `env`: its value as written, or, for a
  name without a value, the secret's value from the submitter's environment), `secrets.NAME` (the
  submitter's environment variable NAME, taken and sealed as the run's secrets are), and run
  variables. A value that uses a secret is a secret itself.
- ``commands`` (a task's groups' too): `run.args` (empty: `gpufleet apply` takes no run arguments,
  dstack's value without them), node addresses and run variables. `env` and `secrets` are refused
  there, as dstack does not fill them in commands: the run's env is the container's environment
  (`$NAME`), and a secret must not be put in a command line.
- Node addresses, `groups[I].nodes[J].IP_ADDRESS` (dstack's grammar for them): the cluster address of
  node J of group I of a multi-node task (its `groups`, or one group of all its `nodes`), in
  `commands` only, filled per node when the run starts; a group or node the task does not have is a
  load error. dstack's `groups[I].replicas[J]` (services) is refused.
- Run variables, `dstack.NAME` or `gpufleet.NAME`: the node's values of the `GPUFLEET_*` variables
  the container gets (see RUN_VARIABLES), filled per node when the run starts. dstack's `job_num`
  is `node_rank`. `master_node_ip`, `nodes_ips` and `mpi_hostfile` exist for multi-node tasks only.

Nothing here reads the environment: values are given by the caller (runconfig at load, launch at
start). Messages name references, never a value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpufleet.errors import ConfigError, ConfigProblem
from gpufleet.yamlsource import Loc, YamlSource, format_loc

OPEN, CLOSE = "${{", "}}"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
# dstack's node addresses of a multi-node task: `groups[I].nodes[J].IP_ADDRESS` (its nodes_interpolator's
# grammar), kept as namespace `groups`, name `[I].nodes[J].IP_ADDRESS`
_GROUPS_RE = re.compile(r"groups(\[(\d+)\]\.nodes\[(\d+)\]\.IP_ADDRESS)")
GROUPS = "groups"

RUN_NAMESPACES = ("dstack", "gpufleet")
# run variable -> the node's variable (GPUFLEET_<it>, also DSTACK_<it>) whose value it is
RUN_VARIABLES = {
    "node_rank": "NODE_RANK", "job_num": "NODE_RANK", "nodes_num": "NODES_NUM",
    "gpus_per_node": "GPUS_PER_NODE", "gpus_num": "GPUS_NUM", "run_name": "RUN_NAME",
    "master_node_ip": "MASTER_NODE_IP", "nodes_ips": "NODES_IPS", "mpi_hostfile": "MPI_HOSTFILE",
}
MULTI_NODE_ONLY = frozenset({"master_node_ip", "nodes_ips", "mpi_hostfile"})
RUN_ARGS = ""  # `${{ run.args }}`: gpufleet apply takes no run arguments


@dataclass(frozen=True)
class Ref:
    """A reference `${{ namespace.name }}` at ``offset`` (of its `${{`) in its string."""

    namespace: str
    name: str
    offset: int

    def __str__(self) -> str:
        dot = "" if self.name.startswith("[") else "."  # groups[0].nodes[1].IP_ADDRESS
        return f"${{{{ {self.namespace}{dot}{self.name} }}}}"


class InterpolationError(ValueError):
    """A string that cannot be read or filled; ``offset``: where in it (its `${{`)."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


def parse(text: str) -> list[str | Ref]:
    """``text`` as literal pieces and references, `$$` escapes undone (see the module's rules)."""
    parts: list[str | Ref] = []
    pos = 0
    while pos < len(text):
        dollar = text.find("$", pos)
        if dollar < 0 or dollar == len(text) - 1:
            break
        if text[dollar + 1] == "$":  # `$$` first in the stretch: one `$`, and a new stretch after it
            parts.append(text[pos:dollar + 1])
            pos = dollar + 2
            continue
        start = text.find(OPEN, dollar)
        if start < 0:
            break
        end = text.find(CLOSE, start)
        if end < 0:
            raise InterpolationError("`${{` is not closed with `}}` (write `$${{` for a literal `${{`)", start)
        name = text[start + len(OPEN):end].strip()
        if (m := _GROUPS_RE.fullmatch(name)) is not None:
            parts += [text[pos:start], Ref(GROUPS, m.group(1), offset=start)]
            pos = end + len(CLOSE)
            continue
        if name.startswith(GROUPS) and name[len(GROUPS):len(GROUPS) + 1] in ("[", "."):
            shown = name if len(name) <= 60 else name[:57] + "..."
            raise InterpolationError(f"`{shown}` is not a node address: write "
                                     f"`${{{{ groups[I].nodes[J].IP_ADDRESS }}}}` (node J of group I)", start)
        if not _NAME_RE.fullmatch(name):
            shown = name if len(name) <= 60 else name[:57] + "..."
            raise InterpolationError(f"`{shown}` is not a name: a reference is `${{{{ namespace.name }}}}` (letters, "
                                     f"digits and _, one dot); `$${{{{` is a literal `${{{{`", start)
        parts += [text[pos:start], Ref(*name.split("."), offset=start)]
        pos = end + len(CLOSE)
    parts.append(text[pos:])
    return [p for p in parts if p != ""]


def refs(text: str) -> list[Ref]:
    return [p for p in parse(text) if isinstance(p, Ref)]


def fill(text: str, namespaces: Mapping[str, Mapping[str, str]]) -> str:
    """``text`` with its references filled from ``namespaces`` (namespace -> name -> value);
    InterpolationError for one that has no value (named, never a value)."""
    out = []
    for part in parse(text):
        if isinstance(part, Ref):
            value = namespaces.get(part.namespace, {}).get(part.name)
            if value is None:
                raise InterpolationError(f"{part} has no value here", part.offset)
            part = value
        out.append(part)
    return "".join(out)


# ----------------------------------------------------------------- a run's references, at load

def _env_items(env: Any) -> list[tuple[Loc, str, str | None]]:
    """(where, name, value as text; None for a secret or a value that is not text)."""
    if isinstance(env, dict):
        return [(("env", k), k, v if isinstance(v, str) else None) for k, v in env.items()]
    out = []
    for i, item in enumerate(env or []):
        name, eq, value = item.partition("=")
        out.append((("env", i), name, value if eq else None))
    return out


def _run_variable(ref: Ref, nodes: int) -> str | None:
    """Why ``ref`` (a run variable) cannot be used in a run of ``nodes`` nodes, or None."""
    if ref.name not in RUN_VARIABLES:
        return (f"{ref}: unknown run variable {ref.name!r}; {ref.namespace}. has "
                + ", ".join(dict.fromkeys(RUN_VARIABLES)))
    if ref.name in MULTI_NODE_ONLY and nodes < 2:
        return f"{ref} is set only on the nodes of a multi-node task (`nodes` 2 or more)"
    return None


def _in_env(ref: Ref, names: set[str], nodes: int) -> str | None:
    if ref.namespace == "env":
        return None if ref.name in names else (
            f"{ref}: {ref.name} is not in the run's `env` (list it: `- {ref.name}` takes its value from your "
            f"environment, as a secret, or give it a value)")
    if ref.namespace == "secrets":
        return None
    if ref.namespace in RUN_NAMESPACES:
        return _run_variable(ref, nodes)
    if ref.namespace == GROUPS:
        return f"{ref}: a node's address is filled in `commands` only (as in dstack), not in `env`"
    if ref.namespace == "run":
        return f"{ref}: `run.args` is filled in `commands` only" if ref.name == "args" else \
            f"{ref}: unknown name; `run.` has only `args` (in `commands`)"
    return _unknown_namespace(ref, "env, secrets, dstack and gpufleet")


def _node_address(ref: Ref, sizes: list[int]) -> str | None:
    """Why ``ref`` (`groups[I].nodes[J].IP_ADDRESS`) names no node of a task of groups of ``sizes`` nodes, or None."""
    m = _GROUPS_RE.fullmatch(GROUPS + ref.name)
    group, node = int(m.group(2)), int(m.group(3))
    if sum(sizes) < 2:
        return f"{ref} is set only on the nodes of a multi-node task (`nodes` 2 or more, or `groups`)"
    if group >= len(sizes):
        return f"{ref}: there is no group {group}: the task has {len(sizes)} group(s), 0..{len(sizes) - 1}"
    if node >= sizes[group]:
        return f"{ref}: group {group} has {sizes[group]} node(s), 0..{sizes[group] - 1}"
    return None


def _in_commands(ref: Ref, nodes: int, sizes: list[int] | None = None) -> str | None:
    if ref.namespace == GROUPS:
        return _node_address(ref, sizes if sizes is not None else [nodes])
    if ref.namespace == "run":
        return None if ref.name == "args" else f"{ref}: unknown name; `run.` has only `args`"
    if ref.namespace in RUN_NAMESPACES:
        return _run_variable(ref, nodes)
    if ref.namespace == "env":
        return (f"{ref}: `env` is not filled in `commands` (nor in dstack): the run's env is the container's "
                f"environment, write ${ref.name}")
    if ref.namespace == "secrets":
        return (f"{ref}: a secret is filled in `env` only (as in dstack), never in a command line: set "
                f"`env: [NAME={ref}]` and use $NAME")
    return _unknown_namespace(ref, "run, dstack, gpufleet and groups")


def _unknown_namespace(ref: Ref, known: str) -> str:
    return f"{ref}: unknown namespace {ref.namespace!r}; here gpufleet fills {known}"


def check_run(src: YamlSource, cfg: Any, text: str | None = None) -> dict[str, Callable[[str], ConfigProblem]]:
    """Check every reference in the run's ``env`` values and ``commands`` (``src`` is the file it was
    read from, ``text`` its text, for the line and column of a reference in a longer string); raise
    ConfigError with each bad one. Returns the names of the secrets referenced (`secrets.NAME`),
    each with how to point at its first use: ``problem(message)``."""
    nodes = getattr(cfg, "nodes", 1)
    sizes = getattr(cfg, "group_sizes", [nodes])
    env = _env_items(cfg.env)
    names = {name for _, name, _ in env}
    problems: list[ConfigProblem] = []
    secrets: dict[str, Callable[[str], ConfigProblem]] = {}

    def look(loc: Loc, value: str, why: Callable[[Ref], str | None]) -> None:
        def at(offset: int) -> Callable[[str], ConfigProblem]:
            return lambda message: _problem(src, text, loc, value, offset, message)
        try:
            found = refs(value)
        except InterpolationError as e:
            problems.append(at(e.offset)(str(e)))
            return
        for ref in found:
            reason = why(ref)
            if reason:
                problems.append(at(ref.offset)(reason))
            elif ref.namespace == "secrets":
                secrets.setdefault(ref.name, at(ref.offset))

    for loc, _, value in env:
        if value is not None:
            look(loc, value, lambda r: _in_env(r, names, nodes))
    items = cfg.command_items() if hasattr(cfg, "command_items") else [(("commands", i), c)
                                                                       for i, c in enumerate(cfg.commands)]
    for loc, command in items:
        look(loc, command, lambda r: _in_commands(r, nodes, sizes))
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: (p.line or 0, p.column or 0)))
    return secrets


def _problem(src: YamlSource, text: str | None, loc: Loc, value: str, offset: int, message: str) -> ConfigProblem:
    """A problem at the reference at ``offset`` in ``value`` (the YAML string at ``loc``, or its part
    after `NAME=`): its own line and column when it can be found in the file's text, else the
    string's."""
    line, col = src.position(loc)
    if text is not None and line is not None and col is not None:
        found = _locate(src, text, line, col, value[:offset].count(OPEN))
        if found:
            line, col = found
    return ConfigProblem(src.file, line, col, format_loc(loc), message)


def _locate(src: YamlSource, text: str, line: int, col: int, before: int) -> tuple[int, int] | None:
    """Where the reference is in ``text``: the `${{` after ``before`` others from the string's start
    (``line``, ``col``), if it comes before the next key or value of the file (None otherwise: the
    string was written with escapes, and its own start is all that is known)."""
    starts = [0]
    for row in text.split("\n"):
        starts.append(starts[-1] + len(row) + 1)
    if line > len(starts) - 1:
        return None
    pos = starts[line - 1] + col - 1
    later = [p for p in (*src.values.values(), *src.keys.values()) if p > (line, col)]
    limit = starts[min(later)[0] - 1] + min(later)[1] - 1 if later else len(text)
    for _ in range(before + 1):
        pos = text.find(OPEN, pos)
        if pos < 0 or pos >= limit:
            return None
        found = pos
        pos += len(OPEN)
    row = text.count("\n", 0, found)
    return row + 1, found - starts[row] + 1


# ----------------------------------------------------------------- at start, on each node

def group_addresses(sizes: list[int], ips: list[str]) -> dict[str, str]:
    """The `groups` namespace of a multi-node task: `[I].nodes[J].IP_ADDRESS` -> the address of node J
    of group I (``ips``: the nodes' addresses, rank order; ranks follow the groups' order)."""
    out: dict[str, str] = {}
    rank = 0
    for group, size in enumerate(sizes):
        for node in range(size):
            if rank < len(ips):
                out[f"[{group}].nodes[{node}].IP_ADDRESS"] = ips[rank]
            rank += 1
    return out


def run_variables(node_env: Mapping[str, str]) -> dict[str, str]:
    """The run variables of a node, from the `GPUFLEET_*` variables its container gets."""
    return {name: node_env[f"GPUFLEET_{var}"] for name, var in RUN_VARIABLES.items() if f"GPUFLEET_{var}" in node_env}


def fill_run(commands: list[str], env: Mapping[str, str], secret_names: list[str], secrets: Mapping[str, str],
             variables: Mapping[str, str], addresses: Mapping[str, str] | None = None
             ) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """A node's commands and env filled: (commands, env values, env values that use a secret).
    ``env``: the run's env values as written; ``secret_names``: its env names without a value;
    ``secrets``: the run's secrets' values (those names and each `secrets.NAME` referenced);
    ``variables``: the node's run variables; ``addresses``: the task's node addresses (group_addresses),
    filled in commands. InterpolationError names the first reference that
    has no value (checked at load, so only a run stored before it was checked, or a lost secret)."""
    run_ns = {ns: variables for ns in RUN_NAMESPACES}
    commands = [fill(c, {"run": {"args": RUN_ARGS}, GROUPS: addresses or {}, **run_ns}) for c in commands]
    own = {**env, **{n: secrets[n] for n in secret_names if n in secrets}}
    namespaces = {"env": own, "secrets": secrets, **run_ns}
    plain: dict[str, str] = {}
    sealed: dict[str, str] = {}
    for name, value in env.items():
        uses_secret = any(r.namespace == "secrets" or (r.namespace == "env" and r.name in secret_names)
                          for r in refs(value))
        (sealed if uses_secret else plain)[name] = fill(value, namespaces)
    return commands, plain, sealed
