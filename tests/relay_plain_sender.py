"""A relay sender written from docs/relay.md alone, with plain pyzmq and json: it does
not import `exporter` (tests/relay/test_relay.py runs it), as a C++ or Go sender would not.

Usage: relay_plain_sender.py ENDPOINT PROCESS_ID
Sends hello, one socket's state (a ROUTER with one bind endpoint: 7 accepted, 2
connections), a heartbeat, then one malformed, one wrong-version and one oversized
message; prints "sent" and keeps heartbeating until stdin closes.
"""

import json
import os
import select
import sys
import time

import zmq

endpoint, process = sys.argv[1], sys.argv[2]
instance = os.urandom(8).hex()
seq = 0


def message(kind: str, **body: object) -> bytes:
    global seq
    seq += 1
    head = {"v": 1, "type": kind, "process": process, "instance": instance, "seq": seq}
    return json.dumps({**head, **body}).encode("utf-8")


ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.LINGER, 1000)
dealer.connect(endpoint)
state = {
    "name": "orders",
    "type": "ROUTER",
    "labels": {"team": "payments", "socket": "not-allowed"},
    "unknown_events": {},
    "endpoints": [
        {
            "endpoint": "tcp://*:5555",
            "role": "bind",
            "counts": {"LISTENING": 1, "ACCEPTED": 7, "DISCONNECTED": 5},
            "errno_counts": {},
            "handshake_failures": [
                {"reason": "protocol", "error": "zmtp_cryptographic", "count": 2}
            ],
            "connections": 2,
            "listening": True,
            "ready": False,
            "reconnect_interval_ms": 0,
            "last_event": "ACCEPTED",
            "last_event_time": time.time(),
        }
    ],
}
dealer.send(message("hello", heartbeat_ms=500, sender="plain-test/1"))
dealer.send(message("state", socket=state))
dealer.send(message("heartbeat", heartbeat_ms=500))
dealer.send(b"{not json")
dealer.send(json.dumps({"v": 99, "type": "hello"}).encode())
dealer.send(message("heartbeat", padding="x" * (100 * 1024)))
print("sent", flush=True)
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 0.5)
    if ready and not sys.stdin.read(1):
        break
    dealer.send(message("heartbeat", heartbeat_ms=500))
dealer.send(message("bye"))
dealer.close()
ctx.term()
