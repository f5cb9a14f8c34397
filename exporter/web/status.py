"""The landing page: version, links, and one row per configured socket. No external
assets, so it works in an air-gapped cluster."""

from __future__ import annotations

import html
import time
import urllib.parse
from collections.abc import Sequence

from exporter._version import __version__
from exporter.connections.table import Row
from exporter.core.state import EngineSnapshot

TOP_CONNECTIONS = 10  # per socket, by send queue


def _num(value: float | None, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value * scale)


def render_connections(rows: Sequence[Row], top: int = TOP_CONNECTIONS) -> str:
    """Who is connected: per socket, the `top` connections with the largest
    kernel send queue (a slow consumer first), and a link to the whole table as JSON."""
    by_socket: dict[str, list[Row]] = {}
    for row in rows:
        by_socket.setdefault(row.socket, []).append(row)
    parts = []
    for name in sorted(by_socket):
        conns = sorted(
            by_socket[name],
            key=lambda r: (-(r.info.send_queue_bytes or 0), r.endpoint, r.info.fd),
        )
        shown = conns[:top]
        link = "/api/v1/connections?" + urllib.parse.urlencode({"socket": name})
        lines = []
        for r in shown:
            i = r.info
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.connected_since))
            retrans = "-" if i.tcp is None else str(i.tcp.total_retrans)
            peer = html.escape(i.peer_address)
            if i.peer_pid is not None:
                peer += f" (pid {i.peer_pid})"
            lines.append(
                f'<tr data-fd="{i.fd}"><td><code>{html.escape(r.endpoint)}</code></td>'
                f"<td>{peer}</td><td>{since} UTC</td>"
                f'<td class="num">{_num(i.rtt_seconds, 1e3, "{:.3f}")}</td>'
                f'<td class="num">{retrans}</td>'
                f'<td class="num">{_num(i.send_queue_bytes)}</td>'
                f'<td class="num">{_num(i.recv_queue_bytes)}</td></tr>'
            )
        esc = html.escape(name)
        parts.append(
            f"<h3>{esc}: {len(conns)} connections, top {len(shown)} by send queue "
            f'(<a href="{html.escape(link)}">all as JSON</a>)</h3>\n'
            f'<table class="connections" id="connections-{esc}">\n'
            "<thead><tr><th>Endpoint</th><th>Peer</th><th>Connected since</th>"
            "<th>RTT (ms)</th><th>Retransmits</th><th>Send-Q (bytes)</th>"
            "<th>Recv-Q (bytes)</th></tr></thead>\n"
            f"<tbody>{''.join(lines)}</tbody></table>"
        )
    if not parts:
        parts.append("<p>No live tcp or ipc connections.</p>")
    return "<h2>Who is connected</h2>\n" + "\n".join(parts) + "\n"


def render_status(
    snap: EngineSnapshot, telemetry_path: str, connections: Sequence[Row] | None = None
) -> str:
    rows = []
    for sock in snap.sockets:
        for ep in sock.endpoints:
            if ep.role is None:
                continue
            last = "-"
            if ep.last_event is not None:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ep.last_event_time))
                last = f"{ep.last_event.name} at {stamp} UTC"
            listening = ("yes" if ep.listening else "no") if ep.role == "bind" else "-"
            name, endpoint = html.escape(sock.name), html.escape(ep.endpoint)
            rows.append(
                f'<tr data-socket="{name}" data-endpoint="{endpoint}">'
                f"<td>{name}</td><td>{html.escape(sock.socket_type)}</td>"
                f"<td>{ep.role}</td><td><code>{endpoint}</code></td>"
                f'<td class="num">{ep.connections}</td><td>{listening}</td>'
                f"<td>{html.escape(last)}</td>"
                "</tr>"
            )
    path = html.escape(telemetry_path)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>zmq-exporter</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
th {{ background: #eee; }} td.num {{ text-align: right; }}
</style></head>
<body>
<h1>zmq-exporter</h1>
<p>Version {html.escape(__version__)} &middot; ready: {"yes" if snap.ready else "no"}
&middot; events processed: {snap.stats.events}</p>
<ul>
<li><a href="{path}">Metrics</a></li>
<li><a href="/-/healthy">Health</a></li>
<li><a href="/-/ready">Readiness</a></li>
</ul>
<table id="sockets">
<thead><tr><th>Socket</th><th>Type</th><th>Role</th><th>Endpoint</th><th>Connections</th>
<th>Listening</th><th>Last event</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody></table>
{"" if connections is None else render_connections(connections)}</body></html>
"""
