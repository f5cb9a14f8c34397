"""A configuration error that names its place: file, line and key path."""

from __future__ import annotations

from collections.abc import Sequence

Path = tuple[str | int, ...]

_SHOWN_MAX = 80  # characters of a value quoted in a message


def format_path(path: Sequence[str | int]) -> str:
    """`sockets[2].options.linger` for ("sockets", 2, "options", "linger")."""
    out = ""
    for part in path:
        if isinstance(part, str) and len(part) > _SHOWN_MAX:
            part = f"{part[: _SHOWN_MAX - 10]}..."
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def shown(value: object) -> str:
    """`repr(value)`, cut to a readable length: a message quotes a value, never a file."""
    text = repr(value)
    if len(text) <= _SHOWN_MAX:
        return text
    return f"{text[: _SHOWN_MAX - 10]}... ({len(str(value))} characters)"


def one_line(text: str) -> str:
    """Control characters, line breaks and lone surrogates escaped: a message is always one
    printable line, and printing it can never fail (a surrogate cannot be encoded)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class ConfigError(Exception):
    """One clear line: `file:line: key.path: message`."""

    def __init__(self, file: str, line: int | None, path: Sequence[str | int], message: str):
        self.file = file
        self.line = line
        self.path = tuple(path)
        self.message = message
        where = f"{file}:{line}" if line else file
        key = format_path(self.path)
        super().__init__(one_line(f"{where}: {key}: {message}" if key else f"{where}: {message}"))
