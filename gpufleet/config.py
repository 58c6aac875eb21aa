"""Reading configuration files: a fleet file becomes a resolved :class:`Fleet`.

``load_fleet(path)`` is the only way in for fleet files: it reads the YAML, validates it against
:mod:`gpufleet.models` (identity files checked), and resolves per-host values (user, port, key,
jump chain, blocks, inventory alias). Every problem is reported with file, line, column and field.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from gpufleet.errors import ConfigError, ConfigProblem
from gpufleet.models import Fleet, FleetConfig, Hop, Target, split_env, target_aliases
from gpufleet.yamlsource import Loc, YamlSource, load_yaml, read_config_text

# dstack fields of cloud fleets: named in the error so a dstack user knows why (see validate's
# `unsupported`).
_CLOUD_ONLY = dict.fromkeys(
    ("nodes", "resources", "backends", "regions", "availability_zones", "instance_types", "spot_policy", "retry",
     "max_price", "idle_duration", "reservation", "termination_policy", "termination_idle_time", "tags",
     "instances"),
    "a dstack cloud-fleet field: gpufleet manages SSH fleets, whose hosts are listed in ssh_config.hosts")


def load_fleet(path: str | Path) -> Fleet:
    return parse_fleet(read_config_text(Path(path)), str(Path(path)))


# dstack's configuration types that gpufleet has no counterpart for, with what to do instead
_DSTACK_ONLY_TYPES = {
    "volume": "gpufleet has no network volumes: mount a path of the hosts with a run's `volumes` "
              "(instance_path: /data, path: /data)",
    "gateway": "gpufleet has no gateway: a service is reached through `gpufleet attach` (its port forwarded)",
}


def parse_fleet(text: str, source: str) -> Fleet:
    """A fleet configuration's text, from file ``source`` (for messages, and the folder that
    relative identity files are read from)."""
    path = Path(source)
    src = load_yaml(text, source)
    if not isinstance(src.data, dict):
        raise ConfigError([src.problem((), "a fleet configuration must be a mapping (type: fleet, ssh_config: ...)")])
    kind = src.data.get("type", "fleet")
    if isinstance(kind, str) and kind in _DSTACK_ONLY_TYPES:
        raise ConfigError([src.problem(("type",), f"{kind}: a dstack configuration type that gpufleet does not "
                                                  f"support; {_DSTACK_ONLY_TYPES[kind]}")])
    if kind != "fleet":
        raise ConfigError([src.problem(("type",), f"must be fleet (or, for runs, task, service or "
                                                  f"dev-environment); got {kind!r}")])
    cfg = validate(FleetConfig, src, context={"base_dir": str(path.resolve().parent)}, unsupported=_CLOUD_ONLY)
    return resolve(cfg, src, default_name=path.stem)


def stored_fleet(name: str, source: str, config: dict) -> Fleet:
    """A fleet from the config recorded when it was applied, without checking its identity files
    again (they may be gone since: that concerns the next apply, not the runs on it)."""
    cfg = FleetConfig.model_validate(config, context={"check_keys": False})
    return resolve(cfg, YamlSource(source, config), default_name=name)


def name_from_file(path: str | Path, fallback: str, limit: int = 64) -> str:
    """A fleet's or run's name when the file gives none: its file name, lowercased, with what a
    name cannot hold turned into '-', starting with a letter."""
    name = re.sub(r"[^a-z0-9-]+", "-", Path(path).stem.lower().split(".")[0]).strip("-") or fallback
    if not name[0].isalpha():
        name = f"{fallback}-{name}"
    return name[:limit]


def validate(model: Any, src: YamlSource, context: dict | None = None,
             unsupported: Mapping[str, str] | None = None) -> Any:
    """Validate ``src.data`` against a pydantic model (or a TypeAdapter), errors with positions.

    An unknown field gets a "did you mean" (when ``model`` is a model class) or, for a top-level
    field in ``unsupported`` (dstack's fields that gpufleet does not take), that it is one, with
    the hint given for it: what to do instead ("" where there is nothing to say)."""
    adapter = model if isinstance(model, TypeAdapter) else TypeAdapter(model)
    try:
        return adapter.validate_python(src.data, context=context)
    except ValidationError as e:
        root = model if isinstance(model, type) and issubclass(model, BaseModel) else None
        problems = sorted(_problems(e, src, root, unsupported or {}), key=lambda p: (p.line or 0, p.column or 0))
        raise ConfigError(problems) from None


def resolve(cfg: FleetConfig, src: YamlSource, default_name: str) -> Fleet:
    ssh = cfg.ssh_config
    problems: list[ConfigProblem] = []
    aliases = target_aliases([(h.hostname, h.port or ssh.port or 22) for h in ssh.hosts])
    targets: list[Target] = []
    seen: dict[str, int] = {}
    for i, (h, alias) in enumerate(zip(ssh.hosts, aliases, strict=True)):
        user = h.user or ssh.user
        key = h.identity_file or ssh.identity_file
        chain = h.proxy_jump if h.proxy_jump is not None else (ssh.proxy_jump or [])
        jumps = tuple(Hop(hostname=j.hostname, port=j.port or 22, user=j.user or ssh.user,
                          identity_file=j.identity_file or ssh.identity_file) for j in chain)
        t = Target(alias=alias, hostname=h.hostname, port=h.port or ssh.port or 22, user=user, identity_file=key,
                   jumps=jumps, blocks=h.blocks if h.blocks is not None else cfg.blocks,
                   internal_ip=str(h.internal_ip) if h.internal_ip else None)
        loc: Loc = ("ssh_config", "hosts", i)
        if user is None:
            problems.append(src.problem(loc, "no user: set ssh_config.user or the host's user"))
        if t.address in seen:
            problems.append(src.problem(loc, f"{t.address} is listed twice (first as hosts[{seen[t.address]}])"))
        seen.setdefault(t.address, i)
        targets.append(t)
    name = cfg.name or name_from_file(default_name, "fleet", limit=1 << 16)
    if not problems:
        problems += _alias_clashes(src, name, targets)
    if problems:
        raise ConfigError(problems)
    env, _secrets = split_env(cfg.env)
    return Fleet(name=name, source=src.file, placement=cfg.placement, env=env, network=ssh.network,
                 targets=tuple(targets), config=cfg)


def _alias_clashes(src: YamlSource, fleet_name: str, targets: list[Target]) -> list[ConfigProblem]:
    """Two hosts may not get the same Host alias in ssh_config and inventory (e.g. `n` on ports 1 and
    2 becomes n-1 and n-2, which clashes with a host named n-1), nor a jump hop's alias."""
    out = []
    first: dict[str, int] = {}
    for i, alias in enumerate(t.alias for t in targets):
        if alias in first:
            out.append(src.problem(("ssh_config", "hosts", i), f"its inventory name {alias!r} is also the name "
                                                              f"of hosts[{first[alias]}]; rename one"))
        elif re.fullmatch(re.escape(fleet_name) + r"-jump\d+", alias):
            out.append(src.problem(("ssh_config", "hosts", i),
                                   f"{alias!r} is the name gpufleet gives to jump hosts of fleet {fleet_name}"))
        first.setdefault(alias, i)
    return out


def _problems(err: ValidationError, src: YamlSource, model: type[BaseModel] | None,
              unsupported: Mapping[str, str]) -> list[ConfigProblem]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        if model is None and loc and isinstance(loc[0], str) and loc[0] not in (src.data or {}):
            loc = loc[1:]  # a tagged union's member name (e.g. 'task'), not a field of the file
        loc = _source_loc(src.data, loc)
        kind = e["type"]
        if kind == "extra_forbidden":
            field = loc[-1]
            if len(loc) == 1 and field in unsupported:
                hint = unsupported[field]
                msg = f"a dstack field that gpufleet does not support: {field!r}" + (f"; {hint}" if hint else "")
            else:
                msg = f"unknown field {field!r}"
                close = difflib.get_close_matches(str(field), _fields_at(model, loc[:-1]), n=1) if model else []
                if close:
                    msg += f"; did you mean {close[0]!r}?"
            out.append(src.problem(loc, msg, prefer_key=True))
        elif kind == "missing":
            out.append(src.problem(loc, f"required field {loc[-1]!r} is missing"))
        elif kind == "string_type" and _read_as_mapping(e.get("input")):
            out.append(src.problem(loc, _mapping_instead_of_text(e["input"])))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if kind == "literal_error":
                msg = f"{msg} (got {e.get('input')!r})"
            out.append(src.problem(loc, msg))
    return out


def _read_as_mapping(value: Any) -> bool:
    """A one-entry mapping where text was expected: a plain line with ': ' in it (`- echo a: b`)."""
    return isinstance(value, dict) and len(value) == 1 and \
        all(isinstance(v, (str, int, float)) or v is None for v in value.values())


def _mapping_instead_of_text(value: dict) -> str:
    msg = "this line is read as a YAML mapping because of ': ' — quote the whole line"
    (key, val), = value.items()
    if isinstance(val, bool) or not isinstance(val, (str, int, type(None))):
        return msg  # written as YAML reads it (yes, 1.5e3): no example rebuilt from the value
    line = f"{key}:" if val is None else f"{key}: {val}"
    return msg + ": '" + line.replace("'", "''") + "'"


_UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _source_loc(data: Any, loc: tuple) -> Loc:
    """Pydantic's loc, minus the list indices our validators added (a single hop given as a mapping)
    and the names pydantic gives the members of a union (`env.dict[str,union].A.str`)."""
    out = []
    for part in loc:
        if isinstance(part, int) and not isinstance(data, list):
            continue
        if isinstance(part, str) and ("[" in part or part in _UNION_MEMBERS) and \
                not (isinstance(data, dict) and part in data):
            continue
        out.append(part)
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            data = None
    return tuple(out)


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        if info is None:
            return []
        nested = _model_in(info.annotation)
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found:
            return found
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and isinstance(origin, type) and issubclass(origin, BaseModel):
        return origin
    return None
