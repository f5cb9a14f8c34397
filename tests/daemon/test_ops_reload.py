"""Hot reload end to end: a real daemon, 20 DEALERs sending to its ROUTER while the config
is reloaded 20 times (SIGHUP and POST /-/reload alternately), the kernel's own count of
connections as witness, and a test-owned ROUTER whose monitor sees every recreation."""

from __future__ import annotations

import signal
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest
import zmq

from helpers import Daemon, Samples, total, value
from testkit import established, free_port, wait_until

DEALERS = 20
RELOADS = 20


def post(url: str, timeout: float = 10.0) -> tuple[int, str]:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def config(backend: int, side: int, variant: str, pull: int) -> str:
    """Variant "a": backend + side (reconnect 100ms). Variant "b": side changed (reconnect
    150ms, so recreated) and an extra PULL socket added."""
    text = textwrap.dedent(f"""\
        sockets:
          - name: backend
            type: ROUTER
            bind: [tcp://127.0.0.1:{backend}]
            labels: {{tier: test}}
          - name: side
            type: DEALER
            connect: [tcp://127.0.0.1:{side}]
            options: {{reconnect_ivl: {"100ms" if variant == "a" else "150ms"}}}
        """)
    if variant == "b":
        text += textwrap.indent(
            textwrap.dedent(f"""\
                - name: extra
                  type: PULL
                  bind: [tcp://127.0.0.1:{pull}]
                """),
            "  ",
        )
    return text


class Traffic:
    """Sends from every DEALER, round-robin, until stopped; owns the DEALERs meanwhile."""

    def __init__(self, dealers: list[zmq.Socket[bytes]]) -> None:
        self.dealers = dealers
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        deadline = time.monotonic() + 120  # bounded even if the test forgets to stop it
        while not self.stop.is_set() and time.monotonic() < deadline:
            for dealer in self.dealers:
                try:
                    dealer.send(b"x" * 64, zmq.NOBLOCK)
                    self.sent += 1
                except zmq.Again:
                    pass
            time.sleep(0.002)


def test_twenty_reloads_under_traffic(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    backend, side, pull = free_port(), free_port(), free_port()
    backend_ep = f"tcp://127.0.0.1:{backend}"
    # The ROUTER that the exporter's `side` DEALER connects to; its monitor counts accepts,
    # so every recreation of `side` is seen from outside the exporter.
    peer = ctx.socket(zmq.ROUTER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.bind(f"tcp://127.0.0.1:{side}")
    peer_monitor = peer.get_monitor_socket(zmq.EVENT_ACCEPTED)
    accepts = 0

    def peer_accepts() -> int:
        nonlocal accepts
        while peer_monitor.poll(0):
            peer_monitor.recv_multipart()
            accepts += 1
        return accepts

    daemon = Daemon(config(backend, side, "a", pull)).start()
    assert daemon.config_path is not None and daemon.proc is not None
    dealers = []
    traffic = None
    try:
        for _ in range(DEALERS):
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(backend_ep)
            dealers.append(dealer)

        def backend_settled(m: Samples) -> bool:
            return (
                value(m, "zmq_accepted_total", socket="backend") == DEALERS
                and value(m, "zmq_connections", socket="backend") == DEALERS
                and value(m, "zmq_connected_total", socket="side") == 1
            )

        wait_until(lambda: backend_settled(daemon.scrape()), what="20 dealers and side connected")
        wait_until(lambda: established(backend) == DEALERS, what="kernel sees 20")
        wait_until(lambda: peer_accepts() == 1, what="peer accepted side")
        before = daemon.scrape()
        handshakes = value(before, "zmq_handshake_succeeded_total", socket="backend")
        assert handshakes == DEALERS

        traffic = Traffic(dealers)
        traffic.thread.start()
        durations = []
        for index in range(RELOADS):
            variant = "b" if index % 2 == 0 else "a"
            daemon.config_path.write_text(config(backend, side, variant, pull))
            stamp = value(
                daemon.scrape(), "zmq_exporter_config_last_reload_success_timestamp_seconds"
            )
            started = time.monotonic()
            if index % 2 == 0:
                daemon.proc.send_signal(signal.SIGHUP)

                def reloaded(before: float | None = stamp) -> bool:
                    name = "zmq_exporter_config_last_reload_success_timestamp_seconds"
                    return value(daemon.scrape(), name) != before

                wait_until(reloaded, what=f"SIGHUP reload {index}: {daemon.logs()[-3000:]}")
            else:
                status, text = post(daemon.url + "/-/reload")
                assert status == 200, text
                assert "recreated ['side']" in text and "removed ['extra']" in text, text
            durations.append(time.monotonic() - started)

            m = daemon.scrape()
            assert value(m, "zmq_exporter_config_last_reload_successful") == 1
            # Unchanged socket: same counters, same live connections, same kernel count.
            assert value(m, "zmq_accepted_total", socket="backend", endpoint=backend_ep) == DEALERS
            assert value(m, "zmq_connections", socket="backend", tier="test") == DEALERS
            assert value(m, "zmq_disconnected_total", socket="backend") == 0
            assert value(m, "zmq_handshake_succeeded_total", socket="backend") == handshakes
            assert value(m, "zmq_bind_succeeded_total", socket="backend") == 1
            assert established(backend) == DEALERS
            # Added / removed socket: its series exist exactly while it is configured.
            extra = [k for k in m if dict(k[1]).get("socket") == "extra"]
            if variant == "b":
                assert value(m, "zmq_socket_info", socket="extra", type="PULL") == 1
                assert extra
            else:
                assert not extra, extra
            assert value(m, "zmq_exporter_sockets") == (3 if variant == "b" else 2)

            # Changed socket: recreated (the peer sees a new connection), counters restart.
            def recreated(want: int = index + 2) -> bool:
                return peer_accepts() == want

            wait_until(recreated, what=f"side recreated {index}")
            wait_until(
                lambda: value(daemon.scrape(), "zmq_connected_total", socket="side") == 1,
                what="side connected again, counter restarted at 1",
            )

        traffic.stop.set()
        traffic.thread.join(5)
        assert not traffic.thread.is_alive()
        assert traffic.sent > 1000, traffic.sent
        # Every message sent while reloading reached the unchanged ROUTER and was dropped:
        # its socket was never closed or recreated.
        wait_until(
            lambda: (
                total(daemon.scrape(), "zmq_exporter_inbound_messages_dropped_total")
                == traffic.sent
            ),
            what=f"{traffic.sent} messages received by backend",
        )
        after = daemon.scrape()
        assert value(after, "zmq_accepted_total", socket="backend") == DEALERS
        assert value(after, "zmq_connections", socket="backend") == DEALERS
        assert established(backend) == DEALERS
        print(
            f"{RELOADS} reloads under traffic ({traffic.sent} messages): "
            f"max {max(durations) * 1000:.0f} ms, mean "
            f"{sum(durations) / len(durations) * 1000:.0f} ms per reload"
        )
    finally:
        if traffic is not None:
            traffic.stop.set()
            traffic.thread.join(5)
        for dealer in dealers:
            dealer.close(linger=0)
        peer_monitor.close(linger=0)
        peer.close(linger=0)
        assert daemon.stop() == 0


BROKEN = [
    ("sockets:\n  - name: backend\n    type: ROUTER: x\n    bind: [tcp://127.0.0.1:1]\n", 3),
    ("sockets:\n  - name: backend\n    type: ROUTR\n    bind: [tcp://127.0.0.1:1]\n", 3),
]


@pytest.mark.parametrize(("broken", "line"), BROKEN, ids=["yaml-syntax", "unknown-type"])
def test_broken_reload_keeps_old_config(
    ctx: zmq.Context[zmq.Socket[bytes]], broken: str, line: int
) -> None:
    backend, side, pull = free_port(), free_port(), free_port()
    good = config(backend, side, "b", pull)
    with Daemon(good) as daemon:
        assert daemon.config_path is not None and daemon.proc is not None
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{backend}")
        try:
            wait_until(
                lambda: value(daemon.scrape(), "zmq_connections", socket="backend") == 1,
                what="dealer connected",
            )
            first = daemon.scrape()
            assert value(first, "zmq_exporter_config_last_reload_successful") == 1
            stamp = value(first, "zmq_exporter_config_last_reload_success_timestamp_seconds")

            daemon.config_path.write_text(broken)
            status, text = post(daemon.url + "/-/reload")
            assert status == 500
            assert f"{daemon.config_path}:{line}:" in text, text
            m = daemon.scrape()
            assert value(m, "zmq_exporter_config_last_reload_successful") == 0
            assert value(m, "zmq_exporter_config_last_reload_success_timestamp_seconds") == stamp
            # The old config keeps serving, untouched.
            assert value(m, "zmq_exporter_sockets") == 3
            assert value(m, "zmq_socket_info", socket="extra", type="PULL") == 1
            assert value(m, "zmq_connections", socket="backend") == 1
            assert value(m, "zmq_accepted_total", socket="backend") == 1
            assert established(backend) == 1
            assert f"{daemon.config_path}:{line}:" in daemon.logs()
            assert "reload failed; keeping the running config" in daemon.logs()

            # SIGHUP with the same broken file: still 0, still serving.
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: daemon.logs().count("reload failed; keeping the running config") == 2,
                what="SIGHUP reload failure logged",
            )
            m = daemon.scrape()
            assert value(m, "zmq_exporter_config_last_reload_successful") == 0
            assert value(m, "zmq_connections", socket="backend") == 1

            # A good file again: back to 1, with a new timestamp; `extra` removed.
            daemon.config_path.write_text(config(backend, side, "a", pull))
            status, text = post(daemon.url + "/-/reload")
            assert status == 200, text
            m = daemon.scrape()
            assert value(m, "zmq_exporter_config_last_reload_successful") == 1
            new_stamp = value(m, "zmq_exporter_config_last_reload_success_timestamp_seconds")
            assert new_stamp is not None and stamp is not None and new_stamp > stamp
            assert value(m, "zmq_exporter_sockets") == 2
            assert not [k for k in m if dict(k[1]).get("socket") == "extra"]
            assert value(m, "zmq_accepted_total", socket="backend") == 1
            assert value(m, "zmq_connections", socket="backend") == 1
        finally:
            dealer.close(linger=0)


def test_reload_endpoint_methods() -> None:
    with Daemon(config(free_port(), free_port(), "a", free_port())) as daemon:
        for method in ("GET", "PUT", "DELETE"):
            request = urllib.request.Request(daemon.url + "/-/reload", method=method)
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=5)
            assert err.value.code == 405, method
            assert err.value.headers["Allow"] == "POST"
        status, text = post(daemon.url + "/-/reload")
        assert status == 200 and "unchanged 2" in text, text
