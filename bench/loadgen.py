"""Raw TCP connect+close churn: the cheapest monitor-event storm (ACCEPTED,
HANDSHAKE_FAILED_NO_DETAIL, DISCONNECTED per connection). Prints its own tally as JSON.

    python bench/loadgen.py --port 5555 --count 20000 --deadline 60
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def churn(
    host: str,
    port: int,
    count: int,
    deadline: float,
    source: str | None,
    connect_timeout: float,
    rate: float = 0.0,
) -> dict[str, float]:
    completed = failed = 0
    started = time.monotonic()
    end = started + deadline
    for i in range(count):
        now = time.monotonic()
        if now > end:
            break
        if rate:  # paced: connection i starts no earlier than i / rate seconds in
            ahead = started + i / rate - now
            if ahead > 0:
                time.sleep(ahead)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            if source:
                sock.bind((source, 0))
            sock.connect((host, port))
            completed += 1
        except OSError:
            failed += 1
        finally:
            sock.close()
    return {
        "completed": completed,
        "failed": failed,
        "attempted": completed + failed,
        "seconds": time.monotonic() - started,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--deadline", type=float, default=60.0, help="stop after this many seconds")
    p.add_argument("--source", default=None, help="source address, e.g. 127.0.0.2")
    p.add_argument("--connect-timeout", type=float, default=2.0)
    p.add_argument("--rate", type=float, default=0.0, help="connections/s (0: as fast as possible)")
    args = p.parse_args()
    tally = churn(
        args.host,
        args.port,
        args.count,
        args.deadline,
        args.source,
        args.connect_timeout,
        args.rate,
    )
    json.dump(tally, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
