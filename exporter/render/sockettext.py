"""The socket series of /metrics as pre-rendered text, byte for byte what prometheus_client's
encoders write for the `render_sockets` families, at a fraction of the cost.

A scrape of 10,000 sockets has ~120,000 series; building `Metric` objects and encoding them
costs ~8 µs a series. Here each socket's sample lines are rendered once per
`SocketSnapshot` object and kept: `Engine.snapshot()` hands out the same object while a
socket has no new event, so an idle socket costs a lookup and a join. Label strings (the
`{labels}` of a line, per endpoint and per set of extra labels) are kept per socket as long
as its configured labels do not change, so a changed socket costs little more than
formatting its values. Rows come from `socket_rows`, the one definition of the socket
series that `render_sockets` (and so OTLP) uses too.

Public names:
- `SocketText`: `render(sockets, openmetrics=False) -> bytes` and
  `render_counted(sockets, openmetrics=False) -> (bytes, series)`: the socket families in
  text format 0.0.4 or OpenMetrics 1.0 (without `# EOF`: the rest of the registry follows).
- `fast_format(encoder)`: whether an encoder from `prometheus_client`'s `choose_encoder`
  writes what `SocketText` pre-renders (False: text, True: OpenMetrics) or not (None:
  another escaping or version; render the families with that encoder instead).
- `format_value(value)`: a sample value as prometheus_client writes it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from operator import itemgetter

from prometheus_client import exposition
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporter.core.state import SocketSnapshot
from exporter.render.collected import Collected
from exporter.render.rows import SOCKET_FAMILIES, Labels, row_labels, socket_rows

__all__ = ["SocketText", "fast_format", "format_value"]

# Untyped in prometheus_client:
_go_string: Callable[[float], str] = floatToGoString
_om_generate_latest: Callable[[Collector], bytes] = om_exposition.generate_latest

_FAMILIES = len(SOCKET_FAMILIES)
_SAMPLE_NAMES = tuple(f.sample for f in SOCKET_FAMILIES)
_GETTERS = tuple(itemgetter(i) for i in range(_FAMILIES))
_NO_ENDPOINT = object()  # no row rendered yet (None is an endpoint: the socket-wide one)
# Escapings under which our names (all [a-zA-Z_][a-zA-Z0-9_]*: families, and configured
# label names, checked by the config) are written unchanged.
_PLAIN_ESCAPINGS = (om_exposition.UNDERSCORES, om_exposition.ALLOWUTF8)


def _headers(openmetrics: bool) -> tuple[bytes, ...]:
    """`# HELP`/`# TYPE` (and OpenMetrics' `# UNIT`) of each socket family, written by the
    encoder itself."""
    out = []
    for f in SOCKET_FAMILIES:
        family = Metric(f.name, f.help, f.type, f.unit)
        if openmetrics:
            text = _om_generate_latest(Collected([family]))
            out.append(text.removesuffix(b"# EOF\n"))
        else:
            out.append(exposition.generate_latest(Collected([family])))
    return tuple(out)


_HEADERS = {False: _headers(False), True: _headers(True)}


def fast_format(encoder: Callable[[Collector], bytes]) -> bool | None:
    """True for OpenMetrics 1.0.0, False for the text format, None when `encoder` (from
    `choose_encoder`) escapes names differently or writes another OpenMetrics version."""
    func: object = encoder
    keywords: dict[str, object] = {}
    if isinstance(encoder, functools.partial):
        if encoder.args:
            return None
        func, keywords = encoder.func, dict(encoder.keywords)
    if keywords.get("escaping", om_exposition.UNDERSCORES) not in _PLAIN_ESCAPINGS:
        return None
    if func is exposition.generate_latest and keywords.keys() <= {"escaping"}:
        return False
    if func is om_exposition.generate_latest and keywords.keys() <= {"escaping", "version"}:
        return True if keywords.get("version", "1.0.0") == "1.0.0" else None
    return None


def format_value(value: float) -> str:
    """`floatToGoString(value)`, with a shortcut for the small integers counters hold."""
    if value.__class__ is int and -(10**15) < value < 1_000_000:
        return f"{value}.0"
    return _go_string(value)


@functools.lru_cache(maxsize=1024)
def _label_name(name: str) -> str:
    return om_exposition.escape_label_name(name)


@functools.lru_cache(maxsize=4096)
def _pair(name: str, value: str) -> str:
    """`name="value"`, escaped as prometheus_client does in both formats. Cached: one
    socket's pairs recur in each of its label sets, extra labels recur everywhere."""
    escaped = value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return f'{_label_name(name)}="{escaped}"'


class _SocketLabels:
    """The label strings (`socket="…",endpoint="…",…`, sorted as the encoders sort them) of
    one socket: per endpoint, and per (endpoint, extra labels). Built once and kept as long
    as the socket's configured labels stay the same. Configured labels never share a name
    with extra ones (`metrics.RESERVED_LABELS`), so a row's pairs are its base pairs and
    its extra pairs, sorted together. Only the finished strings are kept (a relay sidecar
    holds tens of thousands of sockets): the base pairs live for one `_build`, and the
    extra labels in the keys are shared between sockets (`_canonical`)."""

    __slots__ = ("extras", "labels", "plain")

    def __init__(self, sock: SocketSnapshot) -> None:
        self.labels = dict(sock.labels)
        self.plain: dict[str | None, str] = {}  # endpoint -> label string
        self.extras: dict[tuple[str | None, Labels], str] = {}

    def build(
        self,
        sock: SocketSnapshot,
        endpoint: str | None,
        extra: Labels,
        bases: dict[str | None, list[tuple[str, str]]],
    ) -> str:
        """The label string of a row; `bases` (endpoint -> its labels without extras, as
        sorted (name, pair)) is the caller's, for the rows of one build."""
        items = bases.get(endpoint)
        if items is None:
            labels = row_labels(sock, endpoint, ())
            items = bases[endpoint] = sorted([(k, _pair(k, v)) for k, v in labels.items()])
        if extra:
            items = [*items, *_extra_items(extra)]
            items.sort()
            text = self.extras[(endpoint, _canonical(extra))] = ",".join([p for _, p in items])
        else:
            text = self.plain[endpoint] = ",".join([pair for _, pair in items])
        return text


@functools.lru_cache(maxsize=4096)
def _canonical(extra: Labels) -> Labels:
    """One object for equal extra labels (rows build new tuples each time)."""
    return extra


@functools.lru_cache(maxsize=4096)
def _extra_items(extra: Labels) -> tuple[tuple[str, str], ...]:
    return tuple((k, _pair(k, v)) for k, v in extra)


# One socket's rendered lines: (the snapshot they render, lines per family, series).
_Entry = tuple[SocketSnapshot, tuple[bytes, ...], int]
_Identity = tuple[str, str | None]


def identity(sock: SocketSnapshot) -> _Identity:
    """What tells one socket from another in one scrape: its name, and for a relayed
    socket its `process` label (same-named sockets of many processes are the relay's
    normal case)."""
    return sock.name, sock.labels.get("process")


class SocketText:
    """Renders the socket families (`render_sockets`) as exposition text, keeping each
    socket's lines for as long as its `SocketSnapshot` object is handed in again.

    Lines are kept per snapshot object (by `id`: the entry holds its snapshot, so no other
    object can have that id while the entry lives), label strings per socket identity
    (`identity`: name and `process`), never per name alone: relayed sockets of different
    processes share names, and keyed by name they evicted each other on every scrape.

    Thread-safe (one render at a time). Sockets not in the last render leave the caches.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lines: dict[int, _Entry] = {}
        self._labels: dict[_Identity, _SocketLabels] = {}
        self.built = 0  # sockets (re)rendered, for tests and benchmarks

    def render(self, sockets: Sequence[SocketSnapshot], openmetrics: bool = False) -> bytes:
        """The socket families in text format 0.0.4, or OpenMetrics 1.0 without `# EOF`."""
        return self.render_counted(sockets, openmetrics)[0]

    def render_counted(
        self, sockets: Sequence[SocketSnapshot], openmetrics: bool = False
    ) -> tuple[bytes, int]:
        """`render`, and the number of series (samples) written."""
        with self._lock:
            old = self._lines
            lines: dict[int, _Entry] = {}
            entries: list[tuple[bytes, ...]] = []
            series = 0
            for sock in sockets:
                key = id(sock)
                entry = old.get(key)
                if entry is None:
                    entry = self._build(sock)
                lines[key] = entry
                entries.append(entry[1])
                series += entry[2]
            self._lines = lines
            if len(self._labels) > len(lines):
                live = {identity(sock) for sock in sockets}
                self._labels = {k: v for k, v in self._labels.items() if k in live}
        parts: list[bytes] = []
        for header, getter in zip(_HEADERS[openmetrics], _GETTERS, strict=True):
            parts.append(header)
            parts.append(b"".join(map(getter, entries)))
        return b"".join(parts), series

    def _build(self, sock: SocketSnapshot) -> _Entry:
        self.built += 1
        key = identity(sock)
        labels = self._labels.get(key)
        if labels is None or labels.labels != sock.labels:
            labels = self._labels[key] = _SocketLabels(sock)
        plain, extras = labels.plain, labels.extras
        bases: dict[str | None, list[tuple[str, str]]] = {}
        names = _SAMPLE_NAMES
        lines = [b""] * _FAMILIES
        current: object = _NO_ENDPOINT  # endpoint of `body`: rows come grouped by endpoint
        body = ""
        count = 0
        for index, endpoint, extra, value in socket_rows(sock):
            if extra:
                text = extras.get((endpoint, extra))
                if text is None:
                    text = labels.build(sock, endpoint, extra, bases)
            else:
                if endpoint is not current:
                    current = endpoint
                    body = plain.get(endpoint) or labels.build(sock, endpoint, (), bases)
                text = body
            lines[index] += f"{names[index]}{{{text}}} {format_value(value)}\n".encode()
            count += 1
        return sock, tuple(lines), count
