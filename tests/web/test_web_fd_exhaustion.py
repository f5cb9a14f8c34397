"""The web server answers while the process has no descriptor free.

Peers flooding a monitored bind take every descriptor until the engine sheds that listener
(tests/monitor/test_peer_flood.py); a probe arriving meanwhile must be answered, not reset. Linux
reserves the descriptor before accept() looks at its queue, so with none free accept()
fails with EMFILE even when nobody waits: the server used to answer that by evicting the
connection waiting longest, which was the probe it had just accepted with the last free
descriptor (a reset at the client), and with none free at all it never accepted the probe.
It now accepts into a descriptor it holds in reserve.

The server runs in a child process whose descriptors are all taken (on /dev/null) but
`free`, as libzmq's accept loop leaves them.
"""

from __future__ import annotations

import http.client
import resource
import subprocess
import sys

import pytest

from helpers import ROOT

CHILD = r"""
import os, socket, sys
from exporter.web.server import HttpServer, LaneSpec

class Handler:
    def lanes(self):
        return [LaneSpec("probe", workers=1, backlog=4, reason="probe")]
    def lane_for(self, request):
        return "probe"
    def serve(self, request):
        return 200, {"Content-Type": "text/plain"}, b"Healthy\n"
    def reject(self, reason):
        pass

listener = socket.create_server(("127.0.0.1", 0))
server = HttpServer([listener], Handler())
server.start()
held = []
try:
    while True:  # every descriptor, as peers flooding a bind take them
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
for _ in range(int(sys.argv[1])):
    os.close(held.pop())
print(listener.getsockname()[1], flush=True)
sys.stdin.read()  # until the test is done
"""


def _limit_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


@pytest.mark.parametrize("free", [0, 1])
def test_a_probe_is_answered_with_no_descriptor_free(free: int) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(free)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        preexec_fn=_limit_nofile,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        for _ in range(5):  # each one's descriptor is given back when it closes
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/-/healthy", headers={"Connection": "close"})
                response = conn.getresponse()
                assert (response.status, response.read()) == (200, b"Healthy\n")
            finally:
                conn.close()
    finally:
        child.kill()
        child.wait(10)
