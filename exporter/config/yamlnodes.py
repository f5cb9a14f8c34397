"""Load YAML keeping the line of every key path, and refuse duplicate keys.

PyYAML silently keeps the last of two equal keys; a config where `type:` is written twice
is a mistake we report instead. Merge keys (`<<: *defaults`) follow YAML's merge rules: a
key written in the mapping overrides a merged one and is no duplicate.

Whatever PyYAML raises becomes a `ConfigError`, and the document is bounded while it is
composed, before anything expands it: nesting depth, and the node count with every alias
counted at every use (the size the data has once expanded, which is what a
"billion laughs" document makes explode).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.resolver import Resolver

from exporter.config.errors import ConfigError, Path, shown

MAX_DEPTH = 64  # a config is 5 levels deep; pydantic and PyYAML recurse per level
MAX_NODES = 200_000  # ~8,000 sockets of 25 nodes; expanded aliases included
_MERGE_TAG = "tag:yaml.org,2002:merge"
_SURROGATE = re.compile("[\ud800-\udfff]")
# The line breaks PyYAML counts, so that positions agree with its own marks.
_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")


class _Limit(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _Parser(CParser):
        """libyaml scans and parses, 5x faster than PyYAML's pure-Python parser (a 4 MiB
        file in well under a second); composing stays in Python, where the bounds are."""

else:  # pragma: no cover - a PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, Parser):  # type: ignore[no-redef]
        def __init__(self, stream: bytes) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class _BoundedLoader(Composer, _Parser, SafeConstructor, Resolver):
    """A safe loader that counts nodes and depth as it composes, aliases expanded."""

    def __init__(self, data: bytes) -> None:
        _Parser.__init__(self, data)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._deepest = 0
        self._nodes = 0
        self._open: set[str] = set()  # anchors whose node is being composed
        self._size: dict[str, int] = {}  # anchor -> expanded node count
        self._height: dict[str, int] = {}  # anchor -> levels below it

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: Any = self.peek_event()
        line = event.start_mark.line + 1
        depth = self._depth + 1
        if depth > MAX_DEPTH:
            raise _Limit(line, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(event, yaml.AliasEvent):
            name = event.anchor
            if name in self._open:
                raise _Limit(line, f"alias *{name} refers to a node that contains it")
            if name in self._size:
                self._count(self._size[name], line)
                if depth + self._height[name] > MAX_DEPTH:
                    raise _Limit(line, f"nested more than {MAX_DEPTH} levels deep (via an alias)")
                self._deepest = max(self._deepest, depth + self._height[name])
            return super().compose_node(parent, index)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open.add(anchor)
        start, outer = self._nodes, self._deepest
        self._count(1, line)
        self._depth, self._deepest = depth, depth
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth = depth - 1
        if anchor is not None:
            self._open.discard(anchor)
            self._size[anchor] = self._nodes - start
            self._height[anchor] = self._deepest - depth
        self._deepest = max(outer, self._deepest)
        return node

    def _count(self, nodes: int, line: int) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            raise _Limit(line, f"more than {MAX_NODES} YAML nodes (aliases counted at every use)")

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as err:
            # ValueError (`!!float x`, `!!timestamp 2026-99-99`), IndexError (`!!int ''`),
            # OverflowError, RecursionError... The value itself is not quoted: it may be
            # a secret written under the wrong tag.
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise ConstructorError(
                None,
                None,
                f"invalid {shown(tag)[1:-1]} value ({type(err).__name__})",
                node.start_mark,
            ) from None


def line_at(text: str, position: int) -> int:
    """1-based line of character `position` of `text`, counted as YAML counts."""
    return len(_BREAK.findall(text, 0, position)) + 1


def load_with_lines(text: str, file: str) -> tuple[Any, dict[Path, int]]:
    """Parse `text`; return the data and a map from key path to 1-based line."""
    # Bytes for libyaml; a lone surrogate (possible only in a str built in memory) becomes
    # invalid UTF-8 that the reader reports with its position.
    data = text.encode("utf-8", "surrogatepass")
    node: yaml.Node | None = None
    try:
        loader = _BoundedLoader(data)
        try:
            node = loader.get_single_node()
            lines: dict[Path, int] = {}
            if node is not None:
                # Before construction: PyYAML's merge handling rewrites the nodes.
                _walk(node, (), lines, file)
            value = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except _Limit as err:
        raise ConfigError(file, err.line, (), f"YAML over a limit: {err.message}") from None
    except yaml.reader.ReaderError as err:
        prefix = data[: err.position].decode("utf-8", "replace")
        what = (
            f"unacceptable character #x{err.character:04x}: {err.reason}"
            if isinstance(err.character, int) and err.character >= 0
            else str(err.reason)
        )
        raise ConfigError(
            file, line_at(prefix, len(prefix)), (), f"YAML syntax error: {what}"
        ) from None
    except ConstructorError as err:
        mark = err.problem_mark or err.context_mark
        raise ConfigError(
            file,
            mark.line + 1 if mark else None,
            (),
            f"bad YAML value: {err.problem or err.context}",
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        if err.context and err.context_mark and err.problem:
            problem += f" ({err.context} started at line {err.context_mark.line + 1})"
        raise ConfigError(
            file, mark.line + 1 if mark else None, (), f"YAML syntax error: {problem}"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(file, None, (), f"YAML syntax error: {err}") from None
    except RecursionError:
        raise ConfigError(file, None, (), f"YAML nested too deep (max {MAX_DEPTH})") from None
    return value, lines


def decode(data: bytes, file: str, what: str = "config") -> str:
    """UTF-8 text of `data`; a ConfigError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            file,
            line,
            (),
            f"{what} is not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column})",
        ) from None


def _walk(node: yaml.Node, path: Path, lines: dict[Path, int], file: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.ScalarNode):
        found = _SURROGATE.search(node.value)
        if found:
            raise ConfigError(
                file,
                node.start_mark.line + 1,
                path,
                f"invalid Unicode: lone surrogate {found.group()!r} (cannot be encoded)",
            )
    elif isinstance(node, yaml.MappingNode):
        for key, key_node, value_node in _entries(node, path, file):
            child = (*path, key)
            lines.setdefault(child, key_node.start_mark.line + 1)
            _walk(value_node, child, lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), lines, file)


def _entries(
    node: yaml.MappingNode, path: Path, file: str
) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """The mapping's effective entries under YAML merge rules: its own keys (a key twice is
    an error), then merged keys it does not set itself, earlier merges first."""
    own: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    merges: list[yaml.MappingNode] = []
    seen_merge = False
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(
                file, key_node.start_mark.line + 1, path, "a mapping key must be a plain value"
            )
        if key_node.tag == _MERGE_TAG:
            if seen_merge:
                raise ConfigError(
                    file, key_node.start_mark.line + 1, (*path, "<<"), "duplicate key"
                )
            seen_merge = True
            # `<<: *a` or `<<: [*a, *b]`; anything else PyYAML's constructor reports.
            items = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            merges.extend(m for m in items if isinstance(m, yaml.MappingNode))
            continue
        key = key_node.value
        _check_scalar(key_node, (*path, key), file)
        if key in own:
            raise ConfigError(file, key_node.start_mark.line + 1, (*path, key), "duplicate key")
        own[key] = (key_node, value_node)
    out = [(key, k, v) for key, (k, v) in own.items()]
    taken = set(own)
    for merged in merges:
        for key, key_node, value_node in _entries(merged, path, file):
            if key not in taken:
                taken.add(key)
                out.append((key, key_node, value_node))
    return out


def _check_scalar(node: yaml.ScalarNode, path: Path, file: str) -> None:
    found = _SURROGATE.search(node.value)
    if found:
        raise ConfigError(
            file,
            node.start_mark.line + 1,
            path[:-1],
            f"invalid Unicode in a key: lone surrogate {found.group()!r} (cannot be encoded)",
        )


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """Line of `path`, or of its nearest ancestor that exists in the file."""
    for end in range(len(path), -1, -1):
        line = lines.get(tuple(path[:end]))
        if line is not None:
            return line
    return None
