"""A configuration error that names its place: file, line and key path."""

from __future__ import annotations

from collections.abc import Sequence

Path = tuple[str | int, ...]


def format_path(path: Sequence[str | int]) -> str:
    """`sockets[2].options.linger` for ("sockets", 2, "options", "linger")."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class ConfigError(Exception):
    """One clear line: `file:line: key.path: message`."""

    def __init__(self, file: str, line: int | None, path: Sequence[str | int], message: str):
        self.file = file
        self.line = line
        self.path = tuple(path)
        self.message = message
        where = f"{file}:{line}" if line else file
        key = format_path(self.path)
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")
