"""Basic auth under attack, against a real web server on loopback: password guesses (from
one address or from 40) never starve a client whose credentials are cached, cost one
bcrypt check at a time, and are bounded per address (`webauth.AddressThrottle`);
`rate_limit` covers every request that checks a password, health probes included, and
with `burst: 0` refuses as exporter-toolkit's does; every 429 and 503 is counted in
`zmq_exporter_http_requests_rejected_total{reason}`.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import bcrypt

from exporter.web.app import WebApp, WebServer
from exporter.web.auth import AUTH_BURST, AUTH_INTERVAL, AddressThrottle
from exporter.web.live_config import load_web_config

from helpers import bare_web_app
from testkit import free_port, wait_until

TOOLKIT = Path(__file__).parent.parent / "testdata" / "webconfigs" / "toolkit"
PASSWORD = "right"


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


GOOD = basic("prom", PASSWORD)


@contextlib.contextmanager
def serving(file: Path) -> Iterator[tuple[WebServer, WebApp]]:
    app = bare_web_app()
    server = WebServer(app, f"127.0.0.1:{free_port()}", load_web_config(str(file)))
    server.start()
    try:
        yield server, app
    finally:
        server.stop()


def users_file(tmp_path: Path, extra: str = "", cost: int = 10) -> Path:
    """One user, `prom`, hashed at `cost` (10: the toolkit's, ~55 ms a check)."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost)).decode()
    file = tmp_path / "web.yml"
    file.write_text(f"basic_auth_users:\n  prom: {hashed}\n{extra}")
    return file


class Connection(http.client.HTTPConnection):
    """A client from `source` (any 127.0.0.0/8 address is loopback on Linux); the port is
    chosen at connect time (IP_BIND_ADDRESS_NO_PORT), so thousands of connections from
    one address do not run out of ports that a plain bind() would take."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        super().__init__("127.0.0.1", port, timeout=10)
        self.source = source

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def ask(conn: http.client.HTTPConnection, path: str, headers: dict[str, str], method: str) -> int:
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    response.read()
    if response.will_close:
        conn.close()
    return response.status


def request(
    port: int,
    path: str = "/-/healthy",
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> int:
    conn = Connection(port)
    try:
        return ask(conn, path, headers or {}, method)
    finally:
        conn.close()


class Guessers:
    """`count` clients, each sending wrong passwords to /-/healthy over a kept-alive
    connection (opened again when the server closes it) in a bounded loop (at most
    `tries` requests, until stopped), from `sources` (one address each, cycled)."""

    def __init__(self, port: int, count: int, sources: list[str], tries: int = 300) -> None:
        self.statuses: Counter[int | str] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(
                target=self._run, args=(port, i, sources[i % len(sources)], tries), daemon=True
            )
            for i in range(count)
        ]

    def _run(self, port: int, index: int, source: str, tries: int) -> None:
        conn = Connection(port, source)
        try:
            for attempt in range(tries):
                if self.stop.is_set():
                    return
                guess = basic("prom", f"guess-{index}-{attempt}")
                try:
                    status: int | str = ask(conn, "/-/healthy", guess, "GET")
                except (OSError, http.client.HTTPException) as err:
                    status = type(err).__name__
                    conn.close()
                with self.lock:
                    self.statuses[status] += 1
        finally:
            conn.close()

    def total(self) -> int:
        with self.lock:
            return sum(self.statuses.values())

    def __enter__(self) -> Guessers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self.threads)


def probe_cached(port: int, count: int, path: str = "/-/healthy") -> tuple[list[int], list[float]]:
    """`count` requests with the cached credentials: their statuses and latencies."""
    statuses, latencies = [], []
    for _ in range(count):
        started = time.monotonic()
        statuses.append(request(port, path, GOOD))
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    return statuses, latencies


def test_a_wrong_password_flood_does_not_starve_cached_users(tmp_path: Path) -> None:
    """40 clients guessing from one address: the cached user is served every time; the
    guesses cost one bcrypt check at a time, AUTH_BURST and then one per AUTH_INTERVAL,
    and the rest are answered 429 without hashing (reason auth_rate), or 503 (auth_busy)
    when more wait than the password-check lane holds."""
    with serving(users_file(tmp_path)) as (server, app):
        assert request(server.port, headers=GOOD) == 200  # now cached
        with Guessers(server.port, 40, ["127.0.0.1"]) as guessers:
            started = time.monotonic()
            wait_until(lambda: guessers.total() >= 200, timeout=30, what="guesses answered")
            statuses, latencies = probe_cached(server.port, 60)
            scrapes, _ = probe_cached(server.port, 10, "/metrics")
        elapsed = time.monotonic() - started
        guessed = dict(guessers.statuses)
        print(
            f"\n40 guessers, one address, {elapsed:.1f} s: {guessed}; cached user on "
            f"/-/healthy: {Counter(statuses)}, median {statistics.median(latencies) * 1000:.1f}"
            f" ms, max {max(latencies) * 1000:.0f} ms; /metrics {Counter(scrapes)}"
        )
        assert statuses == [200] * 60
        assert scrapes == [200] * 10
        # Each 401 is one bcrypt check: the bucket's burst, then one per interval.
        checks = guessers.statuses[401]
        assert checks <= AUTH_BURST + elapsed / AUTH_INTERVAL + 2, guessed
        # 40 at once are more than the password-check lane holds: 503 for the rest.
        assert set(guessers.statuses) <= {401, 429, 503}, guessed
        rejected = app.stats.rejected
        assert rejected["auth_rate"] == guessers.statuses[429] > 0
        assert rejected["auth_busy"] == guessers.statuses[503]
        assert rejected["unauthorized"] == checks


def test_guessers_from_many_addresses_cost_one_check_at_a_time(tmp_path: Path) -> None:
    """40 clients guessing from 40 addresses (127.0.0.2-41, no per-address bound helps):
    the checks run one at a time in their own lane; what does not fit is answered 503
    at once and counted (auth_busy); the cached user on 127.0.0.1 is served every time."""
    sources = [f"127.0.0.{2 + i}" for i in range(40)]
    with serving(users_file(tmp_path)) as (server, app):
        assert request(server.port, headers=GOOD) == 200
        cpu = time.process_time()
        with Guessers(server.port, 40, sources) as guessers:
            started = time.monotonic()
            wait_until(lambda: guessers.total() >= 200, timeout=30, what="guesses answered")
            statuses, latencies = probe_cached(server.port, 60)
            scrapes, _ = probe_cached(server.port, 10, "/metrics")
        elapsed = time.monotonic() - started
        cores = (time.process_time() - cpu) / elapsed
        guessed = dict(guessers.statuses)
        print(
            f"\n40 guessers, 40 addresses, {elapsed:.1f} s: {guessed}, {cores:.2f} cores; "
            f"cached user: {Counter(statuses)}, median "
            f"{statistics.median(latencies) * 1000:.1f} ms; /metrics {Counter(scrapes)}"
        )
        assert statuses == [200] * 60
        assert scrapes == [200] * 10
        assert set(guessers.statuses) <= {401, 429, 503}, guessed
        # Every refusal is counted under its reason.
        rejected = app.stats.rejected
        assert rejected["unauthorized"] == guessers.statuses[401] > 0
        assert rejected["auth_rate"] == guessers.statuses[429]
        assert rejected["auth_busy"] == guessers.statuses[503] > 0


def test_rate_limit_covers_guesses_on_health_probes(tmp_path: Path) -> None:
    """30 guesses on /-/healthy are rate limited like any request (reason rate_limit):
    a bcrypt check only for those the bucket lets through. Probes without credentials
    or with cached ones stay exempt while the bucket is empty."""
    file = users_file(tmp_path, "rate_limit:\n  interval: 10s\n  burst: 2\n", cost=4)
    with serving(file) as (server, app):
        assert request(server.port, headers=GOOD) == 200  # cached; one token used
        started = time.monotonic()
        guesses = [request(server.port, headers=basic("prom", f"no{i}")) for i in range(30)]
        elapsed = time.monotonic() - started
        print(f"\n30 guesses on /-/healthy: {Counter(guesses)} in {elapsed:.2f} s")
        assert guesses.count(401) <= 1 + int(elapsed / 10), guesses
        assert guesses.count(429) >= 29 - int(elapsed / 10)
        assert app.stats.rejected["rate_limit"] == guesses.count(429)
        assert app.stats.rejected["unauthorized"] == guesses.count(401)
        # The bucket is empty: exempt probes still pass, everything else gets 429.
        assert request(server.port) == 401  # no credentials: exempt, then refused by auth
        assert request(server.port, "/-/ready", GOOD) == 200
        assert request(server.port, "/-/healthy", GOOD) == 200
        assert request(server.port, "/metrics", GOOD) == 429
        assert request(server.port, "/-/healthy", basic("nobody", "x")) == 429


def test_burst_zero_refuses_every_limited_request_as_the_toolkit(tmp_path: Path) -> None:
    """exporter-toolkit's web_config_rate_limiter_one_second.yaml (interval 1s, burst 0):
    golang.org/x/time/rate's Allow() is false for every request when burst is 0 and the
    limit is finite, so every request is 429; here too, except health probes that check
    no password. With users, a guess on a probe path is refused too."""
    with serving(TOOLKIT / "web_config_rate_limiter_one_second.yaml") as (server, app):
        answers = [
            request(server.port, path, method=method)
            for _ in range(11)
            for method, path in (("GET", "/"), ("GET", "/metrics"), ("POST", "/-/reload"))
        ]
        assert answers == [429] * 33
        assert app.stats.rejected["rate_limit"] == 33
        assert request(server.port, "/-/healthy") == 200
    file = users_file(tmp_path, "rate_limit:\n  interval: 1s\n  burst: 0\n", cost=4)
    with serving(file) as (server, app):
        guesses = [request(server.port, headers=basic("prom", f"no{i}")) for i in range(11)]
        assert guesses == [429] * 11
        assert request(server.port, headers=GOOD) == 429  # never checked, so never cached
        assert request(server.port) == 401  # no credentials: exempt, then refused by auth
        assert app.stats.rejected["rate_limit"] == 12


def test_address_throttle_counts_failures_per_address() -> None:
    """One bucket per IPv4 address, per IPv6 /64 (an IPv4-mapped address is its IPv4
    one); one uncached check at a time per bucket; a success gives its token back."""
    key = AddressThrottle.key
    assert key("2001:db8::1") == key("2001:db8::ffff:1") != key("2001:db8:0:1::1")
    assert key("::ffff:192.0.2.7") == key("192.0.2.7") != key("192.0.2.8")
    throttle = AddressThrottle(burst=2, interval=3600)
    assert throttle.acquire("192.0.2.7")
    assert not throttle.acquire("192.0.2.7")  # one at a time
    assert throttle.acquire("192.0.2.8")  # another address, another bucket
    throttle.release("192.0.2.7", refund=True)  # a success: the token comes back
    for _ in range(2):
        assert throttle.acquire("192.0.2.7")
        throttle.release("192.0.2.7", refund=False)  # failures use the bucket up
    assert not throttle.acquire("192.0.2.7")
