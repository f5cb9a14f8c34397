"""A /probe module's `allowed_targets` is a fence (exporter/config/fence.py), against real
peers on loopback and real ipc sockets:

- an address pattern or CIDR block admits address literals only, never a name that merely
  starts like one (`127.0.0.1.evil.test`) nor what the resolver would read as an address
  (`127.0.1`, `0x7f000001`);
- a name admitted by a name pattern is probed only if the address it resolves to passes
  the fence too, and that address is the one connected to. Names that resolve without any
  DNS or /etc/hosts: glibc's getaddrinfo reads `0x7f000001` as 127.0.0.1 (inet_aton);
- ipc paths are normalised and `..` refused; symbolic links are followed only into the
  fence;
- a refused target's answer, `debug=true` included, is the same whether or not a file
  exists at its path;
- CIDR blocks, IPv4 and IPv6.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config.fence import parse_pattern
from exporter.config.modules import ProbeModule
from exporter.core.endpoints import shown
from exporter.prober import Prober

from helpers import missing_tool, parse_metrics, value

Ctx = zmq.Context[zmq.Socket[bytes]]
RESOLVES_TO_LOOPBACK = "0x7f000001"  # a name to ipaddress, 127.0.0.1 to getaddrinfo


def prober_for(*patterns: str) -> Prober:
    module = ProbeModule("fenced", allowed_targets=patterns)
    return Prober(lambda: {"fenced": module}, max_concurrent=4)


def probe(prober: Prober, target: str, debug: bool = False) -> tuple[int, str]:
    query = {"target": [target], "module": ["fenced"]}
    if debug:
        query["debug"] = ["true"]
    status, _, body = prober.handle_probe(query, {"X-Prometheus-Scrape-Timeout-Seconds": "3"})
    return status, body.decode()


def outcome(body: str) -> tuple[float | None, str | None]:
    samples = parse_metrics(body)
    reasons = [dict(ls)["reason"] for name, ls in samples if name == "probe_zmtp_failure_info"]
    return value(samples, "probe_success"), (reasons[0] if reasons else None)


def debug_outcome(text: str) -> tuple[float | None, str | None]:
    metrics_text = text.split("Metrics that would have been returned:\n")[1]
    return outcome(metrics_text.split("\n\n\nModule configuration:\n")[0])


@pytest.fixture
def router(ctx: Ctx) -> Iterator[int]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield port
    sock.close()


def test_address_patterns_admit_address_literals_only(router: int) -> None:
    port = router
    for pattern in (f"tcp://127.0.*:{port}", f"tcp://127.0.0.0/16:{port}", "tcp://127.0.0.1:*"):
        prober = prober_for(pattern)
        status, body = probe(prober, f"tcp://127.0.0.1:{port}")
        assert status == 200 and outcome(body) == (1.0, None), (pattern, body)
        for name in ("127.0.0.1.evil.test", "127.0.1", RESOLVES_TO_LOOPBACK, "2130706433"):
            status, body = probe(prober, f"tcp://{name}:{port}")
            assert status in (400, 403), (pattern, name, status, body)  # 400: no target


def test_resolved_address_must_pass_the_fence(router: int) -> None:
    port = router
    target = f"tcp://{RESOLVES_TO_LOOPBACK}:{port}"
    # The name matches the name pattern, but it resolves to 127.0.0.1, which no address
    # pattern allows: nothing is connected.
    prober = prober_for(f"tcp://0x7f*:{port}", f"tcp://127.0.0.2:{port}")
    status, text = probe(prober, target, debug=True)
    assert status == 200
    assert debug_outcome(text) == (0.0, "dns"), text
    assert "not allowed by the module's allowed_targets" in text and "Connecting" not in text
    # Another port for the address: still outside.
    prober = prober_for(f"tcp://0x7f*:{port}", "tcp://127.0.0.1:1")
    assert debug_outcome(probe(prober, target, debug=True)[1]) == (0.0, "dns")
    # With the address allowed, the name is probed, and the address checked is the one
    # connected to.
    prober = prober_for(f"tcp://0x7f*:{port}", f"tcp://127.0.0.0/8:{port}")
    status, text = probe(prober, target, debug=True)
    assert status == 200 and debug_outcome(text) == (1.0, None), text
    assert "ip=127.0.0.1" in text and f"address=127.0.0.1:{port}" in text
    # The name pattern never admits an address literal, and a `*` host admits both.
    assert probe(prober_for(f"tcp://0x7f*:{port}"), f"tcp://127.0.0.1:{port}")[0] == 403
    status, body = probe(prober_for(f"tcp://*:{port}"), target)
    assert status == 200 and outcome(body) == (1.0, None)


def test_cidr_blocks_ipv4_and_ipv6(ctx: Ctx, router: int) -> None:
    port = router
    prober = prober_for(f"tcp://127.0.0.0/8:{port}", "tcp://[::1/128]:*")
    status, body = probe(prober, f"tcp://127.0.0.1:{port}")
    assert status == 200 and outcome(body) == (1.0, None), body
    assert probe(prober, f"tcp://127.0.0.1:{port + 1 if port < 65535 else 1}")[0] == 403
    # An IPv4-mapped IPv6 address is checked as the IPv4 address it reaches.
    assert probe(prober, f"tcp://[::ffff:127.0.0.1]:{port}")[0] == 200
    assert probe(prober, f"tcp://[::ffff:10.0.0.1]:{port}")[0] == 403
    assert probe(prober, f"tcp://10.0.0.1:{port}")[0] == 403
    if not socket.has_ipv6:
        missing_tool("IPv6")
    six = ctx.socket(zmq.ROUTER)
    six.setsockopt(zmq.LINGER, 0)
    six.setsockopt(zmq.IPV6, 1)
    try:
        six_port = six.bind_to_random_port("tcp://[::1]")
    except zmq.ZMQError:
        six.close()
        missing_tool("the IPv6 loopback ::1")
    try:
        status, body = probe(prober, f"tcp://[::1]:{six_port}")
        assert status == 200 and outcome(body) == (1.0, None), body
        assert probe(prober, f"tcp://[::2]:{six_port}")[0] == 403
        assert probe(prober_for("tcp://[fd00::/8]:*"), f"tcp://[::1]:{six_port}")[0] == 403
    finally:
        six.close()


@pytest.fixture
def tree(ctx: Ctx) -> Iterator[Path]:
    """tmp/dir/a.sock and tmp/secret.sock, both live ROUTERs; tmp/passwd a plain file.
    A short directory: ipc paths are at most 107 bytes, and messages quote targets whole."""
    with tempfile.TemporaryDirectory(prefix="zxfence", dir="/tmp") as name:
        yield from _tree(ctx, Path(name))


def _tree(ctx: Ctx, tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "dir").mkdir()
    (tmp_path / "passwd").write_text("root:x:0:0\n")
    socks = []
    for path in (tmp_path / "dir" / "a.sock", tmp_path / "secret.sock"):
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"ipc://{path}")
        socks.append(sock)
    yield tmp_path
    for sock in socks:
        sock.close()


def test_ipc_paths_normalised_and_dotdot_refused(tree: Path) -> None:
    prober = prober_for(f"ipc://{tree}/dir/*")
    for target in (f"ipc://{tree}/dir/a.sock", f"ipc://{tree}/dir//a.sock",
                   f"ipc://{tree}/dir/./a.sock"):  # fmt: skip
        status, body = probe(prober, target)
        assert status == 200 and outcome(body) == (1.0, None), (target, body)
    for target in (f"ipc://{tree}/dir/../secret.sock", f"ipc://{tree}/dir/x/../../secret.sock",
                   f"ipc://{tree}/dir/../dir/a.sock", f"ipc://{tree}/secret.sock"):  # fmt: skip
        assert probe(prober, target)[0] == 403, target


def test_refused_target_says_nothing_about_the_filesystem(tree: Path) -> None:
    prober = prober_for(f"ipc://{tree}/dir/*", "tcp://127.0.0.1:*")
    answers = set()
    for name in ("secret.sock", "passwd", "missing"):  # a socket, a file, nothing
        for target in (f"ipc://{tree}/dir/../{name}", f"ipc://{tree}/{name}"):
            for debug in (False, True):
                status, body = probe(prober, target, debug)
                answers.add((status, body.replace(shown(target), "TARGET")))
    assert len(answers) == 1, answers
    status, body = answers.pop()
    assert status == 403 and "TARGET" in body and "ENOENT" not in body


def test_symbolic_links_followed_only_into_the_fence(tree: Path) -> None:
    os.symlink(tree / "secret.sock", tree / "dir" / "out.sock")
    os.symlink(tree / "dir" / "a.sock", tree / "dir" / "alias.sock")
    prober = prober_for(f"ipc://{tree}/dir/*")
    status, text = probe(prober, f"ipc://{tree}/dir/out.sock", debug=True)
    assert status == 200 and debug_outcome(text) == (0.0, "connect_refused"), text
    assert "secret.sock" not in text and "Connecting" not in text
    status, text = probe(prober, f"ipc://{tree}/dir/alias.sock", debug=True)
    assert status == 200 and debug_outcome(text) == (1.0, None), text
    # The link's destination is what is connected to.
    assert f"address={tree}/dir/a.sock" in text


def test_pattern_matching_table() -> None:
    module = ProbeModule(
        "m",
        allowed_targets=(
            "tcp://10.20.*:5555",
            "tcp://10.30.0.0/16:*",
            "tcp://[fd00::/8]:55*",
            "tcp://*.orders.internal:5555",
            "ipc:///run/orders/*",
            "ipc://@orders-*",
        ),
    )
    allowed = {
        "tcp://10.20.0.1:5555": True,
        "tcp://10.20.0.1:5556": False,
        "tcp://10.20.0.1.evil.test:5555": False,
        "tcp://10.30.255.255:1": True,
        "tcp://10.31.0.1:1": False,
        "tcp://[fd00::1]:5599": True,
        "tcp://[fd00::1]:5600": False,
        "tcp://[fe80::1]:5555": False,
        "tcp://db.orders.internal:5555": True,
        "tcp://DB.Orders.Internal:5555": True,
        "tcp://orders.internal:5555": False,
        "tcp://db.orders.internal.evil.test:5555": False,
        "ipc:///run/orders/a.sock": True,
        "ipc:///run/orders//a.sock": True,
        "ipc:///run/orders/../secret.sock": False,
        "ipc:///run/ordersx/a.sock": False,
        "ipc://@orders-1": True,
        "ipc://@other": False,
    }
    assert {t: module.allows(t) for t in allowed} == allowed
    assert module.allows_address("10.30.1.2", 7) and not module.allows_address("10.40.1.2", 7)
    assert module.allows_address("fd00::1", 5501) and not module.allows_address("fd00::1", 22)


PATTERN_TEXT = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda transport, body: f"{transport}://{body}",
        st.sampled_from(["tcp", "ipc"]),
        st.text(alphabet="0123456789abcdef.:/[]*?!-@x", max_size=30),
    ),
)


@settings(max_examples=400, deadline=None)
@given(patterns=st.lists(PATTERN_TEXT, min_size=1, max_size=3), target=PATTERN_TEXT)
def test_any_text_is_a_clear_error_or_a_fence_that_never_raises(
    patterns: list[str], target: str
) -> None:
    try:
        for text in patterns:
            parse_pattern(text)
    except ValueError:
        return  # the config names the entry and says why
    module = ProbeModule("m", allowed_targets=tuple(patterns))
    assert module.allows(target) in (True, False)


@settings(max_examples=400, deadline=None)
@given(
    network=st.one_of(
        st.builds(
            lambda a, n: ipaddress.ip_network(f"{a}/{n}", strict=False),
            st.ip_addresses(v=4),
            st.integers(0, 32),
        ),
        st.builds(
            lambda a, n: ipaddress.ip_network(f"{a}/{n}", strict=False),
            st.ip_addresses(v=6),
            st.integers(0, 128),
        ),
    ),
    address=st.ip_addresses(),
    name_suffix=st.sampled_from(["", ".evil.test", ".0"]),
)
def test_cidr_blocks_admit_exactly_their_addresses(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    name_suffix: str,
) -> None:
    host = f"[{network}]" if network.version == 6 else str(network)
    module = ProbeModule("m", allowed_targets=(f"tcp://{host}:5555",))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return  # checked as the IPv4 address it reaches (test_cidr_blocks_ipv4_and_ipv6)
    shown_host = f"[{address}]" if address.version == 6 else str(address)
    inside = address in network if address.version == network.version else False
    assert module.allows(f"tcp://{shown_host}:5555") is inside
    assert module.allows_address(str(address), 5555) is inside
    assert not module.allows(f"tcp://{shown_host}:5556")
    if address.version == 4 and name_suffix:
        assert not module.allows(f"tcp://{address}{name_suffix}:5555")
