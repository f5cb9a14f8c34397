"""The launcher's environment variables: what `zmq-exporter-instrument` sets from its
options, and what every process of the program reads at its first socket (docs/library.md
lists them). Read only when the program creates its first socket."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# name: (option, help). Read by instrument() itself: ZMQ_EXPORTER_RELAY,
# ZMQ_EXPORTER_RELAY_SERVER_KEY and ZMQ_EXPORTER_MESSAGES (message counting).
VARIABLES: dict[str, tuple[str, str]] = {
    "ZMQ_EXPORTER_RELAY": (
        "--relay",
        "the sidecar daemon's relay endpoint every process sends its sockets' state to "
        "(docs/relay.md); unset: the sockets are only in each process's prometheus_client "
        "REGISTRY",
    ),
    "ZMQ_EXPORTER_RELAY_SERVER_KEY": (
        "--relay-server-key",
        "the daemon's CURVE public key (Z85), for a relay over tcp off loopback",
    ),
    "ZMQ_EXPORTER_NAME": (
        "--name",
        "the socket name rule, a format string with {type}, {role}, {endpoint} "
        "(default {type}@{endpoint}; #2, #3... for more open sockets of one name)",
    ),
    "ZMQ_EXPORTER_LABELS": ("--labels", "extra labels on every series: k=v,k2=v2"),
    "ZMQ_EXPORTER_EVENTS": ("--events", "monitor events to watch, comma-separated (default all)"),
    "ZMQ_EXPORTER_HEARTBEAT": (
        "--heartbeat",
        "ZMTP heartbeat interval set on every socket at creation (e.g. 5s; timeout twice "
        "that); off by default",
    ),
    "ZMQ_EXPORTER_MAX_SOCKETS": (
        "--max-sockets",
        "at most this many sockets instrumented per process (default 1000)",
    ),
    "ZMQ_EXPORTER_MESSAGES": (
        "--messages",
        "1: count messages and bytes per socket too (instrument(..., messages=True))",
    ),
    "ZMQ_EXPORTER_DISABLED": ("--disabled", "1: the launcher's hooks do nothing"),
}


@dataclass
class LaunchConfig:
    name: str = "{type}@{endpoint}"
    labels: dict[str, str] = field(default_factory=dict)
    events: list[str] | None = None
    heartbeat: float | None = None
    max_sockets: int = 1000
    disabled: bool = False

    def hook_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "name": self.name,
            "labels": self.labels or None,
            "heartbeat": self.heartbeat,
            "max_sockets": self.max_sockets,
        }
        if self.events is not None:
            kwargs["events"] = self.events
        return kwargs


def _flag(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"ZMQ_EXPORTER_LABELS: expected k=v, got {item!r}")
        labels[key.strip()] = val.strip()
    return labels


def load(environ: Mapping[str, str] | None = None) -> LaunchConfig:
    """The launch settings from the environment; ValueError names a bad variable."""
    env = os.environ if environ is None else environ
    cfg = LaunchConfig()
    if env.get("ZMQ_EXPORTER_NAME"):
        cfg.name = env["ZMQ_EXPORTER_NAME"]
        try:
            cfg.name.format(type="ROUTER", role="bind", endpoint="tcp://*:1")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"ZMQ_EXPORTER_NAME: {err!r}") from None
    if env.get("ZMQ_EXPORTER_LABELS"):
        cfg.labels = parse_labels(env["ZMQ_EXPORTER_LABELS"])
    if env.get("ZMQ_EXPORTER_EVENTS"):
        cfg.events = [e.strip() for e in env["ZMQ_EXPORTER_EVENTS"].split(",") if e.strip()]
    if env.get("ZMQ_EXPORTER_HEARTBEAT"):
        # Imported here: exporter.config loads pydantic (~0.2 s), which the launcher and a
        # process without this variable need not pay at startup.
        from exporter.config.durations import parse_duration

        try:
            cfg.heartbeat = parse_duration(env["ZMQ_EXPORTER_HEARTBEAT"])
        except ValueError as err:
            raise ValueError(f"ZMQ_EXPORTER_HEARTBEAT: {err}") from None
    if env.get("ZMQ_EXPORTER_MAX_SOCKETS"):
        cfg.max_sockets = int(env["ZMQ_EXPORTER_MAX_SOCKETS"])
    cfg.disabled = _flag(env.get("ZMQ_EXPORTER_DISABLED", ""))
    return cfg
