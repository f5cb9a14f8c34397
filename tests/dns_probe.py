"""Measuring client for tests/monitor/test_dns_isolation.py, run inside the test's network
namespace (`ip netns exec NS python tests/dns_probe.py URL PORT COUNT`), where the
daemon's web port and the ROUTER live.

It checks that the namespace's resolver really does not answer, then opens raw TCP
connections to the ROUTER one after another (at least COUNT, for at least MIN_SECONDS, so
the measure spans the daemon's first retries) and times each from connect() returning to
`zmq_accepted_total` of the socket "router" counting it in a scrape. Prints one JSON object:
{"dns_hangs": bool, "latencies": [seconds, ...], "slowest_scrape": seconds}.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
import urllib.request

NAME = "nonexistent.zmq-exporter.test"
POLL = 0.005  # scrape interval while waiting for the ACCEPTED to show
PAUSE = 0.1  # between connections
MIN_SECONDS = 5.0
MAX_CONNECTIONS = 200
GIVE_UP = 12.0  # per connection: longer than one dead lookup (2 x 5 s), so a stall shows whole
scrape_seconds: list[float] = []


def accepted(url: str) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(url + "/metrics", timeout=GIVE_UP) as response:
        text = response.read().decode()
    scrape_seconds.append(time.monotonic() - started)
    for line in text.splitlines():
        if line.startswith("zmq_accepted_total{") and 'socket="router"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def dns_hangs(seconds: float = 1.0) -> bool:
    """True if a lookup of NAME is still unanswered after `seconds` (the thread is left
    to time out on its own; it is a daemon thread)."""

    def lookup() -> None:
        with contextlib.suppress(OSError):
            socket.getaddrinfo(NAME, 5555, socket.AF_INET, socket.SOCK_STREAM)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(seconds)
    return thread.is_alive()


def main() -> None:
    url, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    result: dict[str, object] = {"dns_hangs": dns_hangs()}
    latencies: list[float] = []
    base = accepted(url)
    started_all = time.monotonic()
    for i in range(1, MAX_CONNECTIONS + 1):
        if i > count and time.monotonic() - started_all >= MIN_SECONDS:
            break
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            started = time.monotonic()
            deadline = started + GIVE_UP
            while accepted(url) < base + i and time.monotonic() < deadline:
                time.sleep(POLL)
            latencies.append(time.monotonic() - started)
        if latencies[-1] > 1.0:  # stalled: one is proof enough, do not wait out the rest
            break
        time.sleep(PAUSE)
    result["latencies"] = latencies
    result["slowest_scrape"] = max(scrape_seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
