"""Load YAML keeping the line of every key path, and refuse duplicate keys.

PyYAML silently keeps the last of two equal keys; a config where `type:` is written twice
is a mistake we report instead.
"""

from __future__ import annotations

from typing import Any

import yaml

from exporter.config.errors import ConfigError, Path


def load_with_lines(text: str, file: str) -> tuple[Any, dict[Path, int]]:
    """Parse `text`; return the data and a map from key path to 1-based line."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        problem = err.problem or err.context or "invalid YAML"
        if err.context and err.context_mark and err.problem:
            problem += f" ({err.context} started at line {err.context_mark.line + 1})"
        raise ConfigError(file, line, (), f"YAML syntax error: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(file, None, (), f"YAML syntax error: {err}") from None
    lines: dict[Path, int] = {}
    if node is not None:
        _walk(node, (), lines, file)
    return data, lines


def _walk(node: yaml.Node, path: Path, lines: dict[Path, int], file: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[object] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            child = (*path, key)
            if key in seen:
                raise ConfigError(file, key_node.start_mark.line + 1, child, "duplicate key")
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            _walk(value_node, child, lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, index), lines, file)


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """Line of `path`, or of its nearest ancestor that exists in the file."""
    for end in range(len(path), -1, -1):
        line = lines.get(tuple(path[:end]))
        if line is not None:
            return line
    return None
