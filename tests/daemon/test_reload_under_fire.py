"""Reload under fire: 200 SIGHUPs and 200 concurrent POST /-/reload (from several threads)
alternate good, broken and unappliable config files while a churner connects to and
disconnects from a ROUTER (`front`) that is in every one of them, unchanged.

What must hold (issue 11, "Reload is a transaction"):
- every POST gets a complete answer, 200 or 500, one line, never a traceback;
- `front` is never missing from a scrape and its counters never go backwards;
- afterwards fds and threads of the daemon are back where they were (no leak per reload),
  `front` counted exactly the churner's connections, the daemon is ready, and a failed
  (unappliable) reload left the running sockets untouched;
- the final state matches the final file.

Two mixes: `config` (YAML errors, validation errors, loader bombs and an option libzmq
refuses) and `fd_budget` (the daemon's RLIMIT_NOFILE lowered; one file needs more fds than
that: it must be refused, not half-applied, and must not wedge the daemon).
"""

from __future__ import annotations

import random
import resource
import signal
import socket
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import zmq

from exporter.config import parse_config

from helpers import (
    Daemon,
    Samples,
    free_port,
    http_get,
    http_post,
    open_fds,
    parse_metrics,
    thread_count,
    value,
    wait_until,
    write_atomic,
)

# Slow (hundreds of reloads under churn: ~18 s, loaded 2 cores): `tests/run --quick` leaves it out.
pytestmark = pytest.mark.slow

SIGHUPS = 200
POSTS = 200
POST_THREADS = 6
FIRE_BUDGET = 50.0  # seconds for both channels together; the test fails if they need more
# The fd_budget mix: the daemon's RLIMIT_NOFILE (soft and hard, as `ulimit -n` sets it).
# Room for configs A and B plus the reserve a daemon keeps for HTTP and peers (320 at
# 2acc507); the over-budget file needs more than all of it.
FD_LIMIT = 2048
# Slack when comparing fds after the fire with before it (threads get none). The baseline
# is taken after a warm-up with the same concurrency, so nothing should differ; 2 covers a
# connection of the web server that the kernel has not yet closed when /proc is read.
# A leak per reload would show up as hundreds (400 reloads), so 2 cannot hide one.
SLACK = 2


@dataclass
class Ports:
    front: int
    peer: int
    pub: int
    ipc: str


def front_block(p: Ports) -> str:
    return textwrap.dedent(f"""\
          - name: front
            type: ROUTER
            bind: ['tcp://127.0.0.1:{p.front}']
            labels: {{tier: edge}}
            options: {{backlog: 4096}}
        """)


def config_a(p: Ports) -> str:
    return (
        "sockets:\n"
        + front_block(p)
        + textwrap.dedent(f"""\
          - name: a1
            type: DEALER
            connect: ['tcp://127.0.0.1:{p.peer}']
            options: {{reconnect_ivl: 100ms}}
          - name: a2
            type: PULL
            bind: ['ipc://{p.ipc}/a2']
        """)
    )


def config_b(p: Ports, a1_options: str = "{reconnect_ivl: 150ms}") -> str:
    """A different socket set: a1 changed (recreated), a2 gone, b1 and b2 new - b1 and b2
    come after a1, so a failure while creating a1 shows whether they are skipped."""
    return (
        "sockets:\n"
        + front_block(p)
        + textwrap.dedent(f"""\
          - name: a1
            type: DEALER
            connect: ['tcp://127.0.0.1:{p.peer}']
            options: {a1_options}
          - name: b1
            type: PUB
            bind: ['tcp://127.0.0.1:{p.pub}']
          - name: b2
            type: SUB
            connect: ['tcp://127.0.0.1:{p.pub}']
            options: {{subscribe: ['']}}
        """)
    )


def broken_yaml(p: Ports) -> str:
    return config_a(p).replace("type: PULL", "type: PULL: [")


def invalid(p: Ports) -> str:
    return config_a(p).replace("type: PULL", "type: PULLL")


def loader_bomb(p: Ports) -> str:
    # A YAML tag whose constructor raises outside the loader's error path (issue 11).
    return "!!float x\n"


def unappliable_option(p: Ports) -> str:
    """Valid at 8b429ee's validator, refused by libzmq when applied: a1 changed to an
    HWM that does not fit a C int. (The fixed validator rejects it; still a failed
    reload either way, and it must change nothing.)"""
    return config_b(p, "{reconnect_ivl: 150ms, sndhwm: 3000000000}")


def over_fd_budget(p: Ports) -> str:
    """Valid, but its sockets need more fds than the daemon may open (4 per monitored
    socket here): the reload must be refused before anything running is touched."""
    extra = "".join(
        f"- name: x{i}\n  type: PULL\n  bind: ['ipc://{p.ipc}/x{i}']\n"
        for i in range(FD_LIMIT // 4 + 100)
    )
    return config_b(p) + extra


GOOD: dict[str, Callable[[Ports], str]] = {"A": config_a, "B": config_b}
MIXES: dict[str, list[Callable[[Ports], str]]] = {
    "config": [
        config_a,
        config_b,
        broken_yaml,
        config_a,
        invalid,
        config_b,
        loader_bomb,
        config_a,
        unappliable_option,
    ],
    "fd_budget": [config_a, config_b, broken_yaml, config_a, over_fd_budget, config_b],
}
# The failing file each mix checks sequentially after the fire (the transaction property).
UNAPPLIABLE = {"config": unappliable_option, "fd_budget": over_fd_budget}


def socket_names(m: Samples) -> set[str]:
    return {dict(labels)["socket"] for (name, labels), _ in m.items() if name == "zmq_socket_info"}


def names_in(text: str) -> set[str]:
    return {line.split(":", 1)[1].strip() for line in text.splitlines() if "- name:" in line}


class Churner:
    """Raw TCP connect+close against `front` until stopped, with its own tally (3 monitor
    events per connection: ACCEPTED, HANDSHAKE_FAILED_NO_DETAIL, DISCONNECTED)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.completed = 0
        self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        deadline = time.monotonic() + 120  # bounded even if the test never stops it
        while not self.stop.is_set() and time.monotonic() < deadline:
            with socket.socket() as s:
                s.settimeout(2)
                try:
                    s.connect(("127.0.0.1", self.port))
                    self.completed += 1
                except OSError:
                    self.failed += 1
            time.sleep(0.002)  # ~300/s: a churn, not a storm (test_storm.py has those)


@dataclass
class Watch:
    """Scrapes during the fire: `front` present in every scrape, its counters (and the
    daemon's own) never going backwards."""

    url: str
    scrapes: int = 0
    errors: list[str] = field(default_factory=list)
    backwards: list[str] = field(default_factory=list)
    front_missing: int = 0
    last: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def watched(self, m: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        out = {}
        for key, v in m.items():
            name, labels = key
            sock = dict(labels).get("socket")
            if (name.endswith("_total") and sock in (None, "front")) or name == (
                "zmq_exporter_config_last_reload_success_timestamp_seconds"
            ):
                out[key] = v
        return out

    def check(self, m: Samples) -> None:
        now = self.watched(m)
        for key, v in now.items():
            before = self.last.get(key)
            if before is not None and v < before:
                self.backwards.append(f"{key[0]}{dict(key[1])}: {before} -> {v}")
        # A series that disappears is the same failure as one that resets (the placeholder
        # at 0 of a handshake failure reason gives way to the real error label by design).
        for key in self.last.keys() - now.keys():
            if dict(key[1]).get("socket") == "front" and self.last[key] > 0:
                self.backwards.append(f"{key[0]}{dict(key[1])} disappeared")
        self.last = now
        if "front" not in socket_names(m):
            self.front_missing += 1

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                m = parse_metrics(http_get(self.url + "/metrics", timeout=5))
            except OSError as err:
                self.errors.append(repr(err))
                if len(self.errors) > 20:  # the daemon is gone or wedged: stop asking
                    return
                continue
            self.scrapes += 1
            self.check(m)
            time.sleep(0.02)


@dataclass
class Fire:
    """Writes the next file of the mix (atomically) and reloads, on two channels."""

    daemon: Daemon
    ports: Ports
    mix: list[Callable[[Ports], str]]
    deadline: float
    answers: dict[int, int] = field(default_factory=dict)
    bad_answers: list[str] = field(default_factory=list)
    posts: int = 0  # attempted
    sighups: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, i: int) -> None:
        assert self.daemon.config_path is not None
        write_atomic(self.daemon.config_path, self.mix[i % len(self.mix)](self.ports))

    def poster(self, first: int, count: int) -> None:
        for i in range(first, first + count):
            if time.monotonic() > self.deadline:
                return
            self.write(i)
            with self.lock:
                self.posts += 1
            try:
                status, body = http_post(self.daemon.url + "/-/reload", timeout=15)
            except OSError as err:  # no answer at all: the daemon's reload path died
                with self.lock:
                    self.bad_answers.append(f"POST {i}: no response: {err!r}")
                continue
            with self.lock:
                self.answers[status] = self.answers.get(status, 0) + 1
                one_line = body.endswith("\n") and body.count("\n") == 1
                if status not in (200, 500) or not one_line or "Traceback" in body:
                    self.bad_answers.append(f"POST {i}: {status} {body[:300]!r}")

    def hupper(self) -> None:
        assert self.daemon.proc is not None
        rng = random.Random(11)
        for i in range(SIGHUPS):
            if time.monotonic() > self.deadline or self.daemon.proc.poll() is not None:
                return
            self.write(i + 1)  # out of phase with the posters
            self.daemon.proc.send_signal(signal.SIGHUP)
            self.sighups += 1
            time.sleep(rng.uniform(0.01, 0.06))


@pytest.fixture
def ports() -> Iterator[Ports]:
    with tempfile.TemporaryDirectory(prefix="zmqx-fire-") as ipc:
        yield Ports(free_port(), free_port(), free_port(), ipc)


@pytest.mark.parametrize("mix", list(MIXES))
def test_reload_under_fire(mix: str, ports: Ports) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    # The peer a1 connects to: a1 stays connected (1 fd) unless it is recreated.
    peer = ctx.socket(zmq.ROUTER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.bind(f"tcp://127.0.0.1:{ports.peer}")
    daemon = Daemon(config_a(ports)).start()
    assert daemon.proc is not None and daemon.config_path is not None
    pid = daemon.proc.pid
    if mix == "fd_budget":
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    churner = Churner(ports.front)
    watch = Watch(daemon.url)
    watcher = threading.Thread(target=watch.run, daemon=True)
    threads: list[threading.Thread] = []
    try:
        wait_until(
            lambda: value(daemon.scrape(), "zmq_connections", socket="a1") == 1,
            what="a1 connected to the peer",
        )
        # Warm-up with the same concurrency as the fire (web server threads, allocator
        # arenas, ...), then the baseline of fds and threads, on the same config A.
        warm = Fire(daemon, ports, [config_a, config_b], time.monotonic() + 30)
        warmers = [
            threading.Thread(target=warm.poster, args=(2 * k, 2)) for k in range(POST_THREADS)
        ]
        for t in warmers:
            t.start()
        for t in warmers:
            t.join(40)
        assert not warm.bad_answers, warm.bad_answers
        write_atomic(daemon.config_path, config_a(ports))
        status, body = http_post(daemon.url + "/-/reload")
        assert status == 200, body
        wait_until(
            lambda: value(daemon.scrape(), "zmq_connections", socket="a1") == 1,
            what="a1 connected again",
        )
        fds_before, threads_before = open_fds(pid), thread_count(pid)
        before = daemon.scrape()
        watch.check(before)

        # The fire.
        started = time.monotonic()
        churner.thread.start()
        watcher.start()
        fire = Fire(daemon, ports, MIXES[mix], started + FIRE_BUDGET)
        per_thread = POSTS // POST_THREADS
        threads = [
            threading.Thread(
                target=fire.poster,
                args=(k * per_thread, per_thread + (POSTS % POST_THREADS if k == 0 else 0)),
            )
            for k in range(POST_THREADS)
        ]
        threads.append(threading.Thread(target=fire.hupper))
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, started + FIRE_BUDGET + 20 - time.monotonic()))
        fire_seconds = time.monotonic() - started
        churner.stop.set()
        churner.thread.join(10)
        watch.stop.set()
        watcher.join(10)
        posted = sum(fire.answers.values())
        print(
            f"{mix}: {fire_seconds:.1f} s, {fire.sighups} SIGHUPs, {posted} POSTs answered "
            f"{fire.answers}, {len(fire.bad_answers)} bad; {watch.scrapes} scrapes, "
            f"{len(watch.errors)} failed; churn {churner.completed} (+{churner.failed} failed)"
        )
        # Every problem of the fire at once: one run shows all that is wrong.
        problems = []
        if daemon.proc.poll() is not None:
            problems.append(f"daemon died: {daemon.logs()[-2000:]}")
        if fire.bad_answers:
            problems.append(f"{len(fire.bad_answers)} bad answers: {fire.bad_answers[:3]}")
        if fire.posts != POSTS or fire.sighups != SIGHUPS:
            problems.append(
                f"the fire did not finish within {FIRE_BUDGET} s: {fire.posts} POSTs and "
                f"{fire.sighups} SIGHUPs sent"
            )
        if not (fire.answers.get(200, 0) > 0 and fire.answers.get(500, 0) > 0):
            problems.append(f"expected both 200 and 500 answers: {fire.answers}")
        if watch.errors:
            problems.append(f"{len(watch.errors)} scrapes failed: {watch.errors[:3]}")
        if watch.backwards:
            problems.append(f"counters went backwards: {watch.backwards[:5]}")
        if watch.front_missing:
            problems.append(f"front missing from {watch.front_missing} scrapes")
        if churner.completed < 1000:
            problems.append(f"churn too small to mean anything: {churner.completed}")
        assert not problems, "\n".join(problems)

        # Settle: every reload the SIGHUPs queued has run once `last_reload_successful`
        # is 1 after a good file, and stays so (a queued reload of the same file).
        final = config_a(ports)
        write_atomic(daemon.config_path, final)
        status, body = http_post(daemon.url + "/-/reload", timeout=30)
        assert status == 200, body

        def settled() -> bool:
            m = daemon.scrape()
            watch.check(m)
            return (
                value(m, "zmq_accepted_total", socket="front") == churner.completed
                and value(m, "zmq_disconnected_total", socket="front") == churner.completed
                and value(m, "zmq_connections", socket="front") == 0
                and value(m, "zmq_connections", socket="a1") == 1
                and value(m, "zmq_exporter_config_last_reload_successful") == 1
            )

        wait_until(settled, timeout=20, interval=0.2, what=f"front counted {churner.completed}")
        assert not watch.backwards, watch.backwards[:10]
        m = daemon.scrape()
        # The final state matches the final file.
        assert socket_names(m) == names_in(final) == {"front", "a1", "a2"}
        assert value(m, "zmq_socket_info", socket="front", type="ROUTER", tier="edge") == 1
        assert value(m, "zmq_exporter_sockets") == 3
        assert http_get(daemon.url + "/-/ready", timeout=5).strip() != ""
        # No leak: back to the baseline (the kernel closes a socket's fds asynchronously
        # after zmq_close, hence the wait).
        wait_until(
            lambda: open_fds(pid) <= fds_before + SLACK and thread_count(pid) <= threads_before,
            timeout=10,
            interval=0.2,
            what=f"fds {open_fds(pid)} <= {fds_before}+{SLACK}, "
            f"threads {thread_count(pid)} <= {threads_before}",
        )

        # The transaction, sequentially: B running; an unappliable file changing a1 (and,
        # for fd_budget, adding many sockets) fails and leaves B running untouched.
        write_atomic(daemon.config_path, config_b(ports))
        status, body = http_post(daemon.url + "/-/reload")
        assert status == 200, body
        wait_until(
            lambda: (
                value(m := daemon.scrape(), "zmq_connections", socket="a1") == 1
                and value(m, "zmq_connections", socket="b1") == 1
                and value(m, "zmq_connections", socket="b2") == 1
            ),
            what="a1 connected to the peer and b2 to b1 (config B running)",
        )
        running = daemon.scrape()
        write_atomic(daemon.config_path, UNAPPLIABLE[mix](ports))
        status, body = http_post(daemon.url + "/-/reload", timeout=30)
        assert status == 500, body
        assert body.count("\n") == 1 and "Traceback" not in body, body
        m = daemon.scrape()
        assert value(m, "zmq_exporter_config_last_reload_successful") == 0
        assert socket_names(m) == names_in(config_b(ports)), socket_names(m)
        for sock in ("front", "a1", "b1", "b2"):  # untouched: same counters, not reset
            for name in ("zmq_connected_total", "zmq_accepted_total", "zmq_bind_succeeded_total"):
                assert value(m, name, socket=sock) == value(running, name, socket=sock), (
                    sock,
                    name,
                )
        assert http_get(daemon.url + "/-/healthy", timeout=5)
        assert "Traceback" not in daemon.logs(), daemon.logs()[-3000:]
    finally:
        churner.stop.set()
        watch.stop.set()
        for t in threads:
            t.join(5)
        code = daemon.stop(timeout=10)
        peer.close(linger=0)
        ctx.term()
    assert code == 0, daemon.logs()[-3000:]


def test_failing_files_fail_for_the_intended_reason() -> None:
    """Guards the mixes: each file must fail for the reason it stands for, or the fire
    proves less than it claims. The fd_budget file parses and needs more than FD_LIMIT
    fds on its own (4 per monitored socket, measured at 8b429ee: 57 PULLs on ipc took 228); the
    broken ones are rejected by the loader."""
    p = Ports(free_port(), free_port(), free_port(), "/tmp")
    settings = parse_config(over_fd_budget(p), "fd.yml")
    assert len(settings.sockets) * 4 > FD_LIMIT
    assert {s.name for s in settings.sockets} == names_in(over_fd_budget(p))
    for good in (config_a, config_b):
        assert {s.name for s in parse_config(good(p), "good.yml").sockets} == names_in(good(p))
    for broken in (broken_yaml, invalid, loader_bomb):
        with pytest.raises(Exception):  # noqa: B017 - at 8b429ee the bomb is a ValueError
            parse_config(broken(p), "broken.yml")
