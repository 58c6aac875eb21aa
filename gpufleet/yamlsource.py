"""Load YAML while remembering where every value came from (line and column).

Config models are validated by pydantic; this module lets every error point at
``file:line:column`` of the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpufleet.errors import ConfigError, ConfigProblem

MAX_CONFIG_BYTES = 1024 * 1024  # configs are small; a huge file is a mistake, not a fleet
MAX_NODES = 100_000  # guards against alias bombs

Loc = tuple[str | int, ...]


@dataclass
class YamlSource:
    """A parsed YAML document and the position of each value and key in it."""

    file: str
    data: Any
    values: dict[Loc, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Loc, tuple[int, int]] = field(default_factory=dict)

    def position(self, loc: Loc, prefer_key: bool = False) -> tuple[int | None, int | None]:
        """Position of ``loc``, or of its nearest ancestor that has one."""
        loc = tuple(loc)
        while True:
            table = (self.keys, self.values) if prefer_key else (self.values, self.keys)
            for t in table:
                if loc in t:
                    return t[loc]
            if not loc:
                return None, None
            loc = loc[:-1]

    def problem(self, loc: Loc, message: str, prefer_key: bool = False) -> ConfigProblem:
        line, col = self.position(loc, prefer_key)
        return ConfigProblem(self.file, line, col, format_loc(loc), message)


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _fail(file: str, line: int | None, col: int | None, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(file, line, col, "", message)])


def read_config_text(path: Path) -> str:
    display = str(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _fail(display, None, None, "no such file") from None
    except OSError as e:
        raise _fail(display, None, None, f"cannot read: {e.strerror}") from None
    if not path.is_file():
        raise _fail(display, None, None, "not a regular file")
    if size > MAX_CONFIG_BYTES:
        raise _fail(display, None, None, f"file is {size} bytes; a config may be at most {MAX_CONFIG_BYTES} bytes")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise _fail(display, line, col, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None


def load_yaml(text: str, file: str) -> YamlSource:
    src = YamlSource(file=file, data=None)
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise _fail(file, 1, 1, "the file is empty")
        count = [0]
        src.data = _walk(loader, node, (), src, count)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        reason = " ".join(x for x in (e.context, e.problem) if x)
        raise _fail(file, mark.line + 1 if mark else None, mark.column + 1 if mark else None,
                    f"invalid YAML: {reason}") from None
    except yaml.YAMLError as e:
        raise _fail(file, None, None, f"invalid YAML: {e}") from None
    finally:
        loader.dispose()
    return src


def _walk(loader: yaml.SafeLoader, node: yaml.Node, loc: Loc, src: YamlSource, count: list[int]) -> Any:
    count[0] += 1
    if count[0] > MAX_NODES:
        raise _fail(src.file, node.start_mark.line + 1, node.start_mark.column + 1,
                    f"document has more than {MAX_NODES} values")
    src.values[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _fail(src.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                            "a mapping key must be a plain value")
            key = loader.construct_object(key_node)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                key = str(key)
            if key in out:
                raise _fail(src.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                            f"{format_loc(loc + (key,))}: duplicate key {key!r}")
            src.keys[loc + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _walk(loader, value_node, loc + (key,), src, count)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(loader, item, loc + (i,), src, count) for i, item in enumerate(node.value)]
    return loader.construct_object(node)
