"""Prometheus-style durations: `500ms`, `1s`, `2m`, `1h`, and sums such as `1m30s`."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: object) -> float:
    """Seconds in `text`; ValueError names what is wrong."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise ValueError(
            f"expected a duration with a unit such as '500ms', '1s' or '2m', got {text!r}"
        )
    pos, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(
            f"invalid duration {text!r} (expected a number and a unit: ms, s, m, h; "
            f"for example '500ms', '1s', '2m', '1m30s')"
        )
    return total


def to_millis(seconds: float) -> int:
    return round(seconds * 1000)
