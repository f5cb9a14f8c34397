"""The metrics contract: names, help texts and which event feeds each. Renderers
(Prometheus, OTLP, status page) and the README's table all come from here."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.events import Event


@dataclass(frozen=True)
class EventCounter:
    event: Event
    name: str  # Prometheus family name, without `_total`
    help: str
    errno_label: bool = False  # carries `errno`


EVENT_COUNTERS: tuple[EventCounter, ...] = (
    EventCounter(Event.CONNECTED, "zmq_connected", "Connections established by connect()."),
    EventCounter(
        Event.CONNECT_DELAYED,
        "zmq_connect_delayed",
        "Asynchronous connects in progress (EINPROGRESS).",
    ),
    EventCounter(
        Event.CONNECT_RETRIED,
        "zmq_connect_retried",
        "Reconnect attempts scheduled after a failed or lost connection.",
    ),
    EventCounter(Event.LISTENING, "zmq_listening", "Successful binds (a listener was opened)."),
    EventCounter(Event.BIND_FAILED, "zmq_bind_failed", "Failed bind() attempts.", errno_label=True),
    EventCounter(Event.ACCEPTED, "zmq_accepted", "Connections accepted on a bound endpoint."),
    EventCounter(
        Event.ACCEPT_FAILED, "zmq_accept_failed", "Failed accept() calls.", errno_label=True
    ),
    EventCounter(
        Event.CLOSED,
        "zmq_closed",
        "Closed fds: listeners, failed connect attempts and connections.",
    ),
    EventCounter(Event.CLOSE_FAILED, "zmq_close_failed", "Failed close() calls.", errno_label=True),
    EventCounter(
        Event.DISCONNECTED,
        "zmq_disconnected",
        "Connections that ended (one TCP/IPC connection, not the whole socket).",
    ),
    EventCounter(
        Event.MONITOR_STOPPED,
        "zmq_monitor_stopped",
        "Monitors stopped (the socket was closed by its owner).",
    ),
    EventCounter(
        Event.HANDSHAKE_SUCCEEDED,
        "zmq_handshake_succeeded",
        "ZMTP handshakes completed (security mechanism included).",
    ),
)

HANDSHAKE_FAILED = "zmq_handshake_failed"
HANDSHAKE_FAILED_HELP = (
    "ZMTP handshakes that failed, by reason (no_detail: errno, protocol: ZMTP error, "
    "auth: ZAP status) and decoded error."
)
CONNECTIONS = "zmq_connections"
CONNECTIONS_HELP = "Live connections (fds) of the endpoint, as the kernel sees them."
LISTENING = "zmq_listening"
LISTENING_HELP = "1 while the bound endpoint has an open listener, else 0."
RECONNECT_INTERVAL = "zmq_reconnect_interval_seconds"
RECONNECT_INTERVAL_HELP = "Interval libzmq chose for the last reconnect attempt."
LAST_EVENT = "zmq_last_event_timestamp_seconds"
LAST_EVENT_HELP = "Unix time of the last monitor event of the endpoint (0: none yet)."
UNKNOWN_EVENTS = "zmq_unknown_events"
UNKNOWN_EVENTS_HELP = "Monitor events with an id this exporter does not know."
