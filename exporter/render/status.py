"""The landing page: version, links, and one row per configured socket. No external
assets, so it works in an air-gapped cluster."""

from __future__ import annotations

import html
import time

from exporter import __version__
from exporter.state import EngineSnapshot


def render_status(snap: EngineSnapshot, telemetry_path: str) -> str:
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
</body></html>
"""
