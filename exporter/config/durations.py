"""Prometheus-style durations: `500ms`, `1s`, `2m`, `1h`, and sums such as `1m30s`."""

from __future__ import annotations

import re

from exporter.config.errors import shown

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# [0-9], not \d: \d and float() accept any script's digits (Arabic-Indic 1 + 's' would
# be one second).
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
# Every duration ends up in milliseconds in a C int (libzmq options) or a timer.
MAX_MILLIS = 2**31 - 1


def parse_duration(text: object) -> float:
    """Seconds in `text`; ValueError names what is wrong."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise ValueError(
            "expected a duration with a unit such as '500ms', '1s' or '2m', got "
            f"{shown(text) if isinstance(text, int | float) or text is None else _kind(text)}"
        )
    pos, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(
            f"invalid duration {shown(text)} (expected a number and a unit: ms, s, m, h; "
            f"for example '500ms', '1s', '2m', '1m30s')"
        )
    # Compared as a float first: a long enough number of digits is inf, and round(inf) raises.
    if total * 1000 > MAX_MILLIS or to_millis(total) > MAX_MILLIS:
        raise ValueError(
            f"duration {shown(text)} is too long (at most {format_millis(MAX_MILLIS)}, about "
            "24.8 days: libzmq takes milliseconds as a C int)"
        )
    return total


def to_millis(seconds: float) -> int:
    return round(seconds * 1000)


def format_millis(millis: int) -> str:
    """`6553.599s` for 6553599: the limit in the unit a config writes."""
    whole, rest = divmod(millis, 1000)
    return f"{whole}.{rest:03d}s".replace(".000s", "s")


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    return "a list" if isinstance(value, list) else type(value).__name__
