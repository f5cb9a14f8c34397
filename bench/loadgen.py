"""Raw TCP connect+close churn: the cheapest monitor-event storm (ACCEPTED,
HANDSHAKE_FAILED_NO_DETAIL, DISCONNECTED per connection). Prints its own tally as JSON.

    python bench/loadgen.py --port 5555 --count 20000 --deadline 60
    python bench/loadgen.py --port 5555,5556 --window 0.25 --rate 1000 ...

With several ports and `--window`, the target takes turns: port k during windows k,
k+n, ... counted from `--start-at` (a CLOCK_MONOTONIC time, shared by every process on
the machine, so a benchmark can run its own work in step with the windows).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def churn(
    host: str,
    ports: list[int],
    count: int,
    deadline: float,
    source: str | None = None,
    connect_timeout: float = 2.0,
    rate: float = 0.0,
    window: float = 0.0,
    start_at: float | None = None,
) -> dict[str, object]:
    completed = failed = 0
    by_port = dict.fromkeys(ports, 0)
    now = time.monotonic()
    started = now if start_at is None else start_at
    if started > now:
        time.sleep(started - now)
    end = started + deadline
    for i in range(count):
        now = time.monotonic()
        if now > end:
            break
        if rate:  # paced: connection i starts no earlier than i / rate seconds in
            ahead = started + i / rate - now
            if ahead > 0:
                time.sleep(ahead)
                now += ahead
        port = ports[int((now - started) / window) % len(ports)] if window else ports[0]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            if source:
                sock.bind((source, 0))
            sock.connect((host, port))
            completed += 1
            by_port[port] += 1
        except OSError:
            failed += 1
        finally:
            sock.close()
    return {
        "completed": completed,
        "failed": failed,
        "attempted": completed + failed,
        "seconds": time.monotonic() - started,
        "completed_by_port": {str(p): n for p, n in by_port.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", required=True, help="a port, or several separated by commas")
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--deadline", type=float, default=60.0, help="stop after this many seconds")
    p.add_argument("--source", default=None, help="source address, e.g. 127.0.0.2")
    p.add_argument("--connect-timeout", type=float, default=2.0)
    p.add_argument("--rate", type=float, default=0.0, help="connections/s (0: as fast as possible)")
    p.add_argument("--window", type=float, default=0.0, help="seconds per port in turn")
    p.add_argument("--start-at", type=float, default=None, help="CLOCK_MONOTONIC start time")
    args = p.parse_args()
    tally = churn(
        args.host,
        [int(port) for port in args.port.split(",")],
        args.count,
        args.deadline,
        args.source,
        args.connect_timeout,
        args.rate,
        args.window,
        args.start_at,
    )
    json.dump(tally, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
