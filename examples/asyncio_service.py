"""An asyncio ROUTER echo service (zmq.asyncio) with its sockets' metrics.

    python examples/asyncio_service.py --port 5556 --metrics-port 8001

The socket is a zmq.asyncio socket; instrumenting it is the same call, made on the event
loop's thread (the thread that uses the socket). The metrics are served by
prometheus_client's own HTTP server thread here; an ASGI app would mount
`prometheus_client.make_asgi_app()` instead: both read the default registry.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import zmq
import zmq.asyncio
from prometheus_client import start_http_server

import exporter


async def serve(port: int, metrics_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    handle = exporter.instrument(sock, "frontend", labels={"service": "echo"})
    try:
        handle.bind(f"tcp://127.0.0.1:{port}")
        start_http_server(metrics_port, addr="127.0.0.1")
        print(f"serving on {port}, metrics on {metrics_port}", flush=True)
        stopped = asyncio.create_task(stop.wait())
        while not stop.is_set():
            received = asyncio.ensure_future(sock.recv_multipart())
            done, _ = await asyncio.wait({received, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if received in done:
                await sock.send_multipart(received.result())  # echo
            else:
                received.cancel()
    finally:
        handle.close()  # on the loop's thread, before the socket closes
        sock.close()
        ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5556)
    parser.add_argument("--metrics-port", type=int, default=8001)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.metrics_port))


if __name__ == "__main__":
    main()
