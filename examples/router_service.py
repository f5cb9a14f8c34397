"""A ROUTER echo service that exposes its own sockets' metrics with prometheus_client.

    python examples/router_service.py --port 5555 --metrics-port 8000
    curl -s localhost:8000/metrics | grep '^zmq_'

Library mode in five lines: instrument the socket before it binds, bind through the
handle (so the series are labelled `tcp://127.0.0.1:5555` as written here), serve the
default registry, and close the handle before the socket, from the thread that uses it.
"""

from __future__ import annotations

import argparse
import signal
import threading

import zmq
from prometheus_client import start_http_server

import exporter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--metrics-port", type=int, default=8000)
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    with exporter.instrument(sock, "backend", labels={"team": "payments"}) as handle:
        handle.bind(f"tcp://127.0.0.1:{args.port}")
        start_http_server(args.metrics_port, addr="127.0.0.1")
        print(f"serving on {args.port}, metrics on {args.metrics_port}", flush=True)
        while not stop.is_set():
            if sock.poll(100):  # wakes up for the stop flag every 100 ms
                sock.send_multipart(sock.recv_multipart())  # echo
    sock.close()  # after the handle: disable_monitor, close the PAIR, then the socket
    ctx.term()


if __name__ == "__main__":
    main()
