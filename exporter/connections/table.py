"""The connection table: the engine snapshot's live fds read from the kernel with
`exporter.connections.kernel`: at request time for GET /api/v1/connections and the status page,
and by the connection sampler's thread (`read_batched`, exporter/connections/sampler.py) for the
per-endpoint metrics. One read path (`_read`) for all of them.

It owns the pins (docs/connections.md, "The fd-reuse race"): the first good read of a
connection pins its socket inode, later reads must find that very socket. Keys are
(socket, endpoint, fd, connected_since): a reused fd number is a new connection (the reducer
gives it a new since), so it never inherits the old pin. Pins whose key left the snapshot
are pruned on every walk. Only the engine's own sockets are read: relayed sockets carry no
live fds (their fds belong to another process).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from exporter.connections.kernel import (
    ConnectionInfo,
    EndpointConnections,
    Expected,
    Gone,
    read_connection,
    summarize,
)
from exporter.core import native
from exporter.core.state import EndpointSnapshot, EngineSnapshot, SocketSnapshot

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "SAMPLE_BATCH", "ConnectionTable", "Page", "Row"]

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
SAMPLE_BATCH = 256  # reads per hold of the lock in read_batched (the sampler's walk)
_JSON = {"Content-Type": "application/json"}
_PLAIN = {"Content-Type": "text/plain"}

Key = tuple[str, str, int, float]  # socket, endpoint label, fd, connected_since


@dataclass(frozen=True)
class Row:
    socket: str
    endpoint: str
    role: str
    connected_since: float
    ready: bool | None
    info: ConnectionInfo
    labels: dict[str, str]  # the socket's configured labels (shared, never changed)

    def to_json(self) -> dict[str, object]:
        row: dict[str, object] = {
            "socket": self.socket,
            "endpoint": self.endpoint,
            "role": self.role,
            "fd": self.info.fd,
            "connected_since": self.connected_since,
            "ready": self.ready,
        }
        row.update(self.info.to_json())
        return row


@dataclass(frozen=True)
class Page:
    rows: list[Row]
    total: int  # live connections matching the filter, from the snapshot (no reads)
    next: tuple[str, str, int] | None  # the last candidate read, when more follow
    gone: int  # candidates of this page no longer connected when read


@functools.lru_cache(maxsize=4096)
def _expected(address: str, role: str) -> Expected | None:
    # Bounded: one entry per endpoint address seen; parsing is pure.
    try:
        return Expected.for_endpoint(address, "bind" if role == "bind" else "connect")
    except ValueError:
        return None  # inproc, pgm, ...: no fd worth reading


def _candidates(
    snap: EngineSnapshot, sockets: frozenset[str] | None, endpoints: frozenset[str] | None
) -> Iterator[tuple[SocketSnapshot, EndpointSnapshot, int, float]]:
    """Live connections matching the filter, ordered by (socket, endpoint, fd)."""
    for sock in sorted(snap.sockets, key=lambda s: s.name):
        if sockets is not None and sock.name not in sockets:
            continue
        for ep in sorted(sock.endpoints, key=lambda e: e.endpoint):
            if not ep.live or (endpoints is not None and ep.endpoint not in endpoints):
                continue
            if ep.role is None or _expected(ep.address, ep.role) is None:
                continue
            for fd, since in ep.live:
                yield sock, ep, fd, since


class ConnectionTable:
    """Reads live connections for the API, the status page and the metrics. One lock: the
    pins are shared by the web lanes' threads."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]) -> None:
        self._snapshot = snapshot
        self._lock = native.Lock()
        self._pins: dict[Key, Expected] = {}
        self.gone: Counter[str] = Counter()  # reads refused, by Gone reason

    def _read(
        self, sock: SocketSnapshot, ep: EndpointSnapshot, fd: int, since: float
    ) -> Row | None:
        key = (sock.name, ep.endpoint, fd, since)
        exp = self._pins.get(key)
        if exp is None:
            base = _expected(ep.address, ep.role or "")
            if base is None:
                return None
            exp = base
        info = read_connection(fd, exp)
        if isinstance(info, Gone):
            self.gone[info.reason] += 1
            self._pins.pop(key, None)
            return None
        if exp.inode is None:
            self._pins[key] = exp.pinned(info)
        role = ep.role or ""
        return Row(
            sock.name,
            ep.endpoint,
            role,
            since,
            ep.ready if role == "connect" else None,
            info,
            sock.labels,
        )

    def _prune(self, snap: EngineSnapshot) -> None:
        if not self._pins:
            return
        live = {
            (sock.name, ep.endpoint, fd, since)
            for sock in snap.sockets
            for ep in sock.endpoints
            for fd, since in ep.live
        }
        for key in [k for k in self._pins if k not in live]:
            del self._pins[key]

    def page(
        self,
        sockets: frozenset[str] | None = None,
        endpoints: frozenset[str] | None = None,
        limit: int = DEFAULT_LIMIT,
        after: tuple[str, str, int] | None = None,
    ) -> Page:
        """At most `limit` candidates after `after` are read (keyset paging: correct under
        churn, where offsets would skip or repeat rows)."""
        snap = self._snapshot()
        rows: list[Row] = []
        total = taken = gone = 0
        last: tuple[str, str, int] | None = None
        more = False
        with self._lock:
            self._prune(snap)
            for sock, ep, fd, since in _candidates(snap, sockets, endpoints):
                total += 1
                if after is not None and (sock.name, ep.endpoint, fd) <= after:
                    continue
                if taken == limit:
                    more = True
                    continue
                taken += 1
                last = (sock.name, ep.endpoint, fd)
                row = self._read(sock, ep, fd, since)
                if row is None:
                    gone += 1
                else:
                    rows.append(row)
        return Page(rows, total, last if more else None, gone)

    def all_rows(self, sockets: frozenset[str] | None = None) -> list[Row]:
        """Every live connection (bounded by the live count), for metrics and status."""
        snap = self._snapshot()
        out: list[Row] = []
        with self._lock:
            self._prune(snap)
            for sock, ep, fd, since in _candidates(snap, sockets, None):
                row = self._read(sock, ep, fd, since)
                if row is not None:
                    out.append(row)
        return out

    def read_batched(
        self, snap: EngineSnapshot | None = None, batch: int = SAMPLE_BATCH
    ) -> list[Row]:
        """Every live connection of `snap` (default: a new snapshot), read as `all_rows`
        reads them (same pins, same checks) but holding the lock for at most `batch` reads
        at a time, so that an API request or the status page never waits for a whole
        sample (exporter/connections/sampler.py)."""
        if snap is None:
            snap = self._snapshot()
        out: list[Row] = []
        with self._lock:
            self._prune(snap)
        candidates = list(_candidates(snap, None, None))
        for start in range(0, len(candidates), batch):
            with self._lock:
                for sock, ep, fd, since in candidates[start : start + batch]:
                    row = self._read(sock, ep, fd, since)
                    if row is not None:
                        out.append(row)
        return out

    def gone_counts(self) -> dict[str, int]:
        """Reads refused so far, by Gone reason (a copy)."""
        with self._lock:
            return dict(self.gone)

    def summaries(self) -> list[tuple[dict[str, str], EndpointConnections]]:
        """Per endpoint with live connections, in (socket, endpoint) order: its metric
        labels (socket, endpoint, configured labels) and summarize() of its rows."""
        groups: dict[tuple[str, str], tuple[dict[str, str], list[ConnectionInfo]]] = {}
        for row in self.all_rows():
            key = (row.socket, row.endpoint)
            group = groups.get(key)
            if group is None:
                labels = {"socket": row.socket, "endpoint": row.endpoint, **row.labels}
                group = groups[key] = (labels, [])
            group[1].append(row.info)
        return [(labels, summarize(infos)) for labels, infos in groups.values()]

    # -- GET /api/v1/connections -------------------------------------------------------

    def handle(self, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        """?socket=&endpoint= (exact, repeatable), limit (default 100, 1..1000, else 400),
        after (the `next` cursor of the previous page)."""
        sockets = frozenset(query["socket"]) if "socket" in query else None
        endpoints = frozenset(query["endpoint"]) if "endpoint" in query else None
        limit = DEFAULT_LIMIT
        if "limit" in query:
            text = query["limit"][-1]
            if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
                return 400, _PLAIN, f"limit: an integer from 1 to {MAX_LIMIT}\n".encode()
            limit = int(text)
        after = None
        if "after" in query:
            after = decode_cursor(query["after"][-1])
            if after is None:
                return 400, _PLAIN, b"after: not a cursor from this API\n"
        page = self.page(sockets, endpoints, limit, after)
        body = {
            "connections": [row.to_json() for row in page.rows],
            "total": page.total,
            "next": None if page.next is None else encode_cursor(page.next),
            "gone": page.gone,
        }
        return 200, _JSON, json.dumps(body).encode()


def encode_cursor(key: tuple[str, str, int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[str, str, int] | None:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        value = json.loads(raw)
    except (ValueError, binascii.Error):
        return None
    if (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and isinstance(value[1], str)
        and type(value[2]) is int
    ):
        return value[0], value[1], value[2]
    return None
