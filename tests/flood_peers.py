"""Plain TCP peers that hold connections to one port and open a new one whenever one
closes, until SIGTERM: what it takes to run a process out of file descriptors through a
monitored bind (tests/monitor/test_peer_flood.py runs it as a separate process). Stdlib only.

Usage: flood_peers.py PORT COUNT
Prints "opened COUNT" once the first COUNT connects were started, then every second
"made N" (connections attempted so far).
"""

import resource
import selectors
import signal
import socket
import sys
import time

port, count = int(sys.argv[1]), int(sys.argv[2])
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
selector = selectors.DefaultSelector()
made = 0


def connect() -> None:
    global made
    sock = socket.socket()
    sock.setblocking(False)
    try:
        sock.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    except OSError:  # refused while the listener is away: retried when it reads as closed
        pass
    selector.register(sock, selectors.EVENT_READ)
    made += 1


for _ in range(count):
    connect()
print(f"opened {count}", flush=True)
reported = time.monotonic()
while True:
    for key, _events in selector.select(0.1):
        sock = key.fileobj
        assert isinstance(sock, socket.socket)
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if not data:  # closed by the daemon (or refused): hold a new one instead
            selector.unregister(sock)
            sock.close()
            time.sleep(0.001)  # a refused connect returns at once: no tight loop
            connect()
    if time.monotonic() - reported >= 1:
        print(f"made {made}", flush=True)
        reported = time.monotonic()
