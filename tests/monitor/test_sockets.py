"""Socket creation and teardown on real sockets: the configured `linger` takes effect."""

from __future__ import annotations

import textwrap
import time

import zmq

from exporter.config import parse_config
from exporter.monitor.sockets import close_socket, open_socket

from testkit import free_port


def linger_of_close(linger: str | None) -> float:
    """Seconds ctx.term() waits after close_socket() of a PUSH socket holding one message
    for a peer that never comes: the socket's linger at close."""
    options = f"options: {{linger: {linger}}}" if linger else ""
    settings = parse_config(
        textwrap.dedent(f"""\
            sockets:
              - name: p
                type: PUSH
                connect: ["tcp://127.0.0.1:{free_port()}"]
                {options}
            """),
        "test.yml",
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    managed = open_socket(ctx, settings.sockets[0])
    managed.socket.connect(settings.sockets[0].connects[0])
    managed.socket.send(b"queued", zmq.NOBLOCK)  # a pipe exists at once (immediate=0)
    close_socket(managed)
    start = time.monotonic()
    ctx.term()
    return time.monotonic() - start


def test_configured_linger_is_honoured_at_close() -> None:
    assert 0.25 <= linger_of_close("300ms") < 2.0
    assert linger_of_close(None) < 0.2  # default here: 0, shutdown never waits
    assert linger_of_close("0s") < 0.2
