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
MAX_DEPTH = 64  # guards against deeply nested documents (PyYAML's composer recurses)

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
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # never more, even if the file grows meanwhile
    except OSError as e:
        raise _fail(display, None, None, f"cannot read: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        # point at where the limit is passed: the line a runaway generator or paste went wrong on
        line = raw.count(b"\n", 0, MAX_CONFIG_BYTES) + 1
        col = MAX_CONFIG_BYTES - (raw.rfind(b"\n", 0, MAX_CONFIG_BYTES) + 1) + 1
        raise _fail(display, line, col, f"file is {max(size, len(raw))} bytes; a config may be at most "
                                         f"{MAX_CONFIG_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise _fail(display, line, col, f"not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than MAX_DEPTH, where PyYAML would hit Python's
    recursion limit, with the position of the first value too deep."""

    _depth = 0

    def compose_node(self, parent, index):  # type: ignore[override]
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _reader_position(text: str, position: int) -> tuple[int, int]:
    line = text.count("\n", 0, position) + 1
    return line, position - (text.rfind("\n", 0, position) + 1) + 1


def load_yaml(text: str, file: str) -> YamlSource:
    src = YamlSource(file=file, data=None)
    loader = None
    try:
        loader = _Loader(text)  # the reader checks every character here already
        node = loader.get_single_node()
        if node is None:
            raise _fail(file, 1, 1, "the file is empty")
        count = [0]
        src.data = _walk(loader, node, (), src, count)
    except yaml.reader.ReaderError as e:
        line, col = _reader_position(text, e.position)
        raise _fail(file, line, col, f"invalid YAML: character {e.character:#06x} is not allowed") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        reason = " ".join(x for x in (e.context, e.problem) if x)
        raise _fail(file, mark.line + 1 if mark else None, mark.column + 1 if mark else None,
                    f"invalid YAML: {reason}") from None
    except yaml.YAMLError as e:
        raise _fail(file, None, None, f"invalid YAML: {e}") from None
    except RecursionError:
        raise _fail(file, None, None, "invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return src


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _fail_at(src: YamlSource, node: yaml.Node, loc: Loc, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(src.file, node.start_mark.line + 1, node.start_mark.column + 1,
                                      format_loc(loc), message)])


def _construct(loader: yaml.SafeLoader, node: yaml.Node, src: YamlSource, loc: Loc) -> Any:
    """A scalar's value; one YAML reads but Python cannot build (2024-13-45, a 5000-digit number)
    or a binary value (which would skip the checks on strings) is an error at its position."""
    try:
        value = loader.construct_object(node)
    except (ValueError, OverflowError, TypeError) as e:
        shown = node.value if len(node.value) <= 40 else node.value[:37] + "..."
        reason = str(e).split(";")[0]
        raise _fail_at(src, node, loc, f"cannot read {shown!r}: {reason}") from None
    if isinstance(value, (bytes, bytearray)):
        raise _fail_at(src, node, loc, "binary values (!!binary) are not accepted")
    return value


def _walk(loader: yaml.SafeLoader, node: yaml.Node, loc: Loc, src: YamlSource, count: list[int]) -> Any:
    count[0] += 1
    if count[0] > MAX_NODES:
        raise _fail_at(src, node, loc[:1], f"document has more than {MAX_NODES} values (an alias bomb?)")
    src.values[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if not isinstance(node, yaml.ScalarNode) and node.tag not in _PLAIN_TAGS:
        # scalars are built by SafeLoader, which refuses unknown tags; collections are built here
        raise _fail_at(src, node, loc, f"the YAML tag {node.tag!r} is not accepted")
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _fail_at(src, key_node, loc, "a mapping key must be a plain value")
            key = _construct(loader, key_node, src, loc)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                key = str(key)
            if key in out:
                raise _fail_at(src, key_node, loc + (key,), f"duplicate key {key!r}")
            src.keys[loc + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _walk(loader, value_node, loc + (key,), src, count)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(loader, item, loc + (i,), src, count) for i, item in enumerate(node.value)]
    return _construct(loader, node, src, loc)
