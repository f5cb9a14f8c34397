"""A web config file being rewritten never switches protection off: while a client hammers
every endpoint without credentials, the file is rewritten the ways that expose its
intermediate states (truncate, then write in pieces as `cat > web.yml` or an editor's
save does; left empty for longer than the settle time; cut right after its TLS block),
and not one request is served. A version that lowers protection (`webconfig.weakens`)
applies only once the file has held still for SETTLE_SECONDS and reads the same again;
an empty file never; a stronger one at once.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import bcrypt
from pki import Pki, make_pki
from test_web_config import web_server as serving

from exporter.web.live_config import SETTLE_SECONDS

from helpers import write_atomic
from testkit import wait_until

PATHS = ("/", "/metrics", "/-/healthy", "/-/ready", "/-/reload", "/nothing", "/probe")
HASH = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()
USERS = f"basic_auth_users:\n  prom: {HASH}\n  other: {HASH}\n"
GOOD = {"Authorization": "Basic " + base64.b64encode(b"prom:right").decode()}
TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"


def connect(port: int, tls: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if tls is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)


def get(
    port: int,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
    path: str = "/",
) -> int:
    conn = connect(port, tls)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class Hammer:
    """Two clients sending requests without credentials to every endpoint, over
    kept-alive connections, in bounded loops until stopped; every status is counted."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None, limit: int = 200_000):
        self.statuses: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(port, tls, limit), daemon=True)
            for _ in range(2)
        ]

    def _run(self, port: int, tls: ssl.SSLContext | None, limit: int) -> None:
        conn = connect(port, tls)
        for i in range(limit):
            if self.stop.is_set():
                break
            try:
                method = "POST" if i % 11 == 0 else "GET"
                conn.request(method, PATHS[i % len(PATHS)])
                response = conn.getresponse()
                response.read()
                status = response.status
                if response.will_close:
                    conn.close()
                    conn = connect(port, tls)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = connect(port, tls)
                continue
            with self.lock:
                self.statuses[status] += 1
        conn.close()

    def total(self) -> int:
        with self.lock:
            return sum(self.statuses.values())

    def __enter__(self) -> Hammer:
        for thread in self.threads:
            thread.start()
        wait_until(lambda: self.total() >= 50, timeout=30, what="the hammer running")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads)


def rewrite(file: Path, pieces: list[str], pause: float) -> None:
    """Rewrite `file` in place, as `cat > file` does: truncate, then write `pieces`
    one after the other with `pause` seconds between (each read by the server as is)."""
    fd = os.open(file, os.O_WRONLY | os.O_TRUNC)
    try:
        for piece in pieces:
            time.sleep(pause)
            os.write(fd, piece.encode())
    finally:
        os.close(fd)


def served(statuses: Counter[int]) -> dict[int, int]:
    """Requests answered past authentication: anything but 401."""
    return {status: n for status, n in statuses.items() if status != 401}


def test_truncated_and_empty_files_never_switch_auth_off(tmp_path: Path) -> None:
    file = tmp_path / "web.yml"
    headers = "http_server_config:\n  headers: {X-Frame-Options: deny}\n"
    file.write_text(USERS + headers)
    with serving(file) as server, Hammer(server.port) as hammer:
        for cycle in range(3):  # truncate, then write a line at a time
            rewrite(file, [line + "\n" for line in (USERS + headers).splitlines()], 0.05)
            assert get(server.port, GOOD) == 200, cycle
        # Left empty longer than the settle time: an empty file is never applied.
        rewrite(file, [], 0)
        started = time.monotonic()
        while time.monotonic() - started < SETTLE_SECONDS + 0.5:
            time.sleep(0.05)
        rewrite(file, [USERS + headers], 0)
        # Cut between the header block and the users (0.3 s, under the settle time).
        rewrite(file, [headers, USERS], 0.3)
        assert get(server.port, GOOD) == 200
        counted = hammer.total()
    print(f"\nrewrites under fire: {dict(hammer.statuses)} in {counted} requests")
    assert served(hammer.statuses) == {}
    assert counted > 100


def test_a_file_cut_after_its_tls_block_does_not_switch_auth_off(
    tmp_path: Path,
) -> None:
    pki: Pki = make_pki(tmp_path)
    file = tmp_path / "web.yml"
    file.write_text(TLS + USERS)
    client = ssl.create_default_context(cafile=str(pki.ca))
    with serving(file) as server, Hammer(server.port, client) as hammer:
        for _ in range(3):
            rewrite(file, [TLS, USERS], 0.3)  # the TLS block alone for 0.3 s
            assert get(server.port, GOOD, client) == 200
        counted = hammer.total()
    print(f"\nTLS file cut after its TLS block: {dict(hammer.statuses)}")
    assert served(hammer.statuses) == {}
    assert counted > 50


def test_an_operator_who_writes_a_no_auth_file_gets_it_after_the_settle_time(
    tmp_path: Path,
) -> None:
    file = tmp_path / "web.yml"
    file.write_text(USERS + "rate_limit: {interval: 1ms, burst: 100000}\n")
    with serving(file) as server:
        assert get(server.port) == 401
        written = time.monotonic()
        write_atomic(file, "# no authentication on this port\nbasic_auth_users: {}\n")
        assert get(server.port) == 401  # not yet: the file may still be changing
        wait_until(lambda: get(server.port) == 200, timeout=SETTLE_SECONDS + 10, what="no auth")
        waited = time.monotonic() - written
        print(f"\nno-auth file applied after {waited:.2f} s (settle {SETTLE_SECONDS} s)")
        assert waited >= SETTLE_SECONDS
        # Stronger applies at once: users back, then a rate limit added.
        write_atomic(file, USERS)
        assert get(server.port) == 401
        assert get(server.port, GOOD) == 200
        write_atomic(file, USERS + "rate_limit: {interval: 1h, burst: 1}\n")
        assert [get(server.port, GOOD, path="/metrics") for _ in range(2)] == [200, 429]
        # A rate limit loosened waits too, then applies.
        write_atomic(file, USERS + "rate_limit: {interval: 1ms, burst: 1000}\n")
        assert get(server.port, GOOD, path="/metrics") == 429
        wait_until(
            lambda: get(server.port, GOOD, path="/metrics") == 200,
            timeout=SETTLE_SECONDS + 10,
            what="the looser limit",
        )


def test_a_tls_change_waits_for_the_file_to_hold_still(tmp_path: Path) -> None:
    """Client certificates required, then not: the weaker TLS settings wait."""
    pki = make_pki(tmp_path)
    strict = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
    file = tmp_path / "web.yml"
    file.write_text(strict)
    anonymous = ssl.create_default_context(cafile=str(pki.ca))
    with serving(file) as server:
        with contextlib.suppress(ssl.SSLError, OSError, http.client.HTTPException):
            assert get(server.port, tls=anonymous) != 200
        rewrite(file, [TLS], 0)
        refused = 0
        with contextlib.suppress(ssl.SSLError, OSError, http.client.HTTPException):
            get(server.port, tls=anonymous)
            refused = -1
        assert refused == 0, "client certificates dropped before the file held still"
        wait_until(lambda: _answers(server.port, anonymous), timeout=SETTLE_SECONDS + 10)


def _answers(port: int, tls: ssl.SSLContext) -> bool:
    try:
        return get(port, tls=tls) == 200
    except (ssl.SSLError, OSError, http.client.HTTPException):
        return False
