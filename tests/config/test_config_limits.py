"""Config loading under attack (issue 11): every failure to load is one ConfigError line
with file:line where there is one; bombs are bounded; what `--config.check` accepts starts;
secrets are never echoed."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from exporter.config import ConfigError, load_config, parse_config
from exporter.monitor.sockets import close_socket, open_socket

from helpers import ROOT, Daemon, http_post, run_cli, total
from testkit import free_port, wait_until

GIB = 1024**3


def run_bounded(
    *args: str, timeout: float = 20, memory: int = GIB
) -> subprocess.CompletedProcess[str]:
    """`zmq-exporter ARGS` with its address space capped: a bomb fails the test, not the
    machine."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit,
    )


def check_fails(path: Path | str, *, web: bool = False) -> str:
    """--config.check on `path`: exit 1, one line, no traceback; returns the line."""
    args = (
        (
            "--config.check",
            f"--config.file={ROOT / 'config' / 'zmq-exporter.yml'}",
            f"--web.config.file={path}",
        )
        if web
        else ("--config.check", f"--config.file={path}")
    )
    started = time.monotonic()
    proc = run_bounded(*args)
    elapsed = time.monotonic() - started
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert elapsed < 10, f"{elapsed:.1f}s"
    return lines[0]


# --- 1. loader exceptions -------------------------------------------------------------

LOADER_CASES = {
    "int-empty": ("!!int ", 1, "invalid !!int value"),
    "float": ("a: !!float x\n", 1, "invalid !!float value"),
    "timestamp": ("a: 1\nb: !!timestamp 2026-99-99\n", 2, "invalid !!timestamp value"),
    "int-digits": ("a:\n  b: !!int " + "9" * 5000 + "\n", 2, "invalid !!int value"),
    "deep": ("sockets: " + "[" * 600 + "]" * 600 + "\n", 1, "nested more than 64 levels"),
    "deep-map": ("".join("  " * i + f"k{i}:\n" for i in range(100)), 64, "nested more than 64"),
    "deep-alias": (
        "a: &x " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*x" + "]" * 30 + "\n",
        2,
        "nested more than 64 levels deep (via an alias)",
    ),
    "recursive-alias": ("a: &x [1, *x]\n", 1, "refers to a node that contains it"),
    "control-char": (
        'sockets: []\nglobal: {labels: {a: "x\x01"}}\n',
        2,
        "unacceptable character #x0001",
    ),
    "bad-tag": ("a: !!python/object:os.system x\n", 1, "could not determine a constructor"),
    "binary": ('a: !!binary "a"\n', 1, "bad YAML value: failed to decode base64"),
}


@pytest.mark.parametrize("name", LOADER_CASES)
def test_loader_errors_are_one_line_with_the_line(tmp_path: Path, name: str) -> None:
    text, line, fragment = LOADER_CASES[name]
    path = tmp_path / f"{name}.yml"
    path.write_text(text)
    message = check_fails(path)
    assert message.startswith(f"zmq-exporter: {path}:{line}: "), message
    assert fragment in message, message


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes(b"sockets:\n  - name: caf\xe9\n")
    message = check_fails(path)
    assert message.startswith(f"zmq-exporter: {path}:2: config is not valid UTF-8"), message


def test_failed_reload_of_a_broken_file_answers_and_sets_the_gauge(tmp_path: Path) -> None:
    port = free_port()
    good = f"sockets:\n  - {{name: a, type: ROUTER, bind: ['tcp://127.0.0.1:{port}']}}\n"
    with Daemon(good) as daemon:
        assert daemon.config_path is not None
        for broken in ("!!int ", "a: !!timestamp 2026-99-99\n", "x: " + "[" * 600 + "]" * 600):
            daemon.config_path.write_text(broken)
            status, body = http_post(daemon.url + "/-/reload", timeout=10)
            assert status >= 400 and "\n" not in body.strip(), (status, body)
            assert f"{daemon.config_path}:1:" in body, body
            samples = daemon.scrape()
            assert total(samples, "zmq_exporter_config_last_reload_successful") == 0
        daemon.config_path.write_text(good)
        assert http_post(daemon.url + "/-/reload")[0] == 200
        assert "Traceback" not in daemon.logs()


# --- 2. resource bombs ----------------------------------------------------------------


def billion_laughs() -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("sockets: *a9")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_by_node_count(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yml"
    path.write_text(billion_laughs())
    message = check_fails(path)
    assert "more than 200000 YAML nodes (aliases counted at every use)" in message, message
    assert message.startswith(f"zmq-exporter: {path}:"), message


def test_reload_of_a_bomb_keeps_the_daemon_small(tmp_path: Path) -> None:
    port = free_port()
    good = f"sockets:\n  - {{name: a, type: ROUTER, bind: ['tcp://127.0.0.1:{port}']}}\n"
    with Daemon(good) as daemon:
        assert daemon.config_path is not None and daemon.proc is not None
        daemon.config_path.write_text(billion_laughs())
        started = time.monotonic()
        status, body = http_post(daemon.url + "/-/reload", timeout=20)
        assert time.monotonic() - started < 5
        assert status >= 400 and "YAML nodes" in body, body
        rss_kb = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:")
            )
        )
        assert rss_kb < 300 * 1024, f"peak RSS {rss_kb} kB"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_devices_as_config_are_refused(device: str) -> None:
    message = check_fails(device)
    assert (
        message
        == f"zmq-exporter: {device}: cannot read config: a character device, not a regular file"
    )


def test_fifo_as_config_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yml"
    os.mkfifo(fifo)
    message = check_fails(fifo)
    assert message == f"zmq-exporter: {fifo}: cannot read config: a FIFO, not a regular file"


def test_directory_as_config(tmp_path: Path) -> None:
    assert "a directory, not a regular file" in check_fails(tmp_path)


def test_huge_comment_line_is_refused_by_size(tmp_path: Path) -> None:
    path = tmp_path / "big.yml"
    with open(path, "w") as handle:
        handle.write("sockets: []\n#")
        handle.write("x" * (50 * 1024 * 1024))
        handle.write("\n")
    message = check_fails(path)
    assert message.startswith(f"zmq-exporter: {path}: cannot read config: larger than 4 MiB"), (
        message
    )


def test_a_config_just_under_the_size_limit_loads_fast(tmp_path: Path) -> None:
    path = tmp_path / "comment.yml"
    path.write_text("modules: {}\n#" + "x" * (4 * 1024 * 1024 - 100) + "\n")
    started = time.monotonic()
    assert load_config(str(path)).sockets == ()
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "fifo"])
def test_devices_as_key_file_are_refused(tmp_path: Path, device: str) -> None:
    if device == "fifo":
        device = str(tmp_path / "key.fifo")
        os.mkfifo(device)
    path = tmp_path / "c.yml"
    path.write_text(
        "sockets:\n  - name: s\n    type: ROUTER\n    bind: [tcp://127.0.0.1:1]\n"
        f"    options: {{curve_server: true, curve_secretkey_file: '{device}'}}\n"
    )
    message = check_fails(path)
    assert message.startswith(
        f"zmq-exporter: {path}:5: sockets[0].options.curve_secretkey_file: cannot read key file: "
    ), message
    assert "not a regular file" in message, message


def test_large_key_file_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "big.key"
    key.write_text("x" * (65 * 1024))
    path = tmp_path / "c.yml"
    path.write_text(
        "sockets:\n  - name: s\n    type: ROUTER\n    bind: [tcp://127.0.0.1:1]\n"
        f"    options: {{curve_server: true, curve_secretkey_file: '{key}'}}\n"
    )
    assert "larger than 64 KiB" in check_fails(path)


@pytest.mark.parametrize("device", ["/dev/zero", "fifo"])
def test_devices_as_web_config_are_refused(tmp_path: Path, device: str) -> None:
    if device == "fifo":
        device = str(tmp_path / "web.fifo")
        os.mkfifo(device)
    message = check_fails(device, web=True)
    assert f"{device}: cannot read web config:" in message and "not a regular file" in message


# --- 3. the check equals the start ----------------------------------------------------

SOCKET = (
    "sockets:\n  - name: a\n    type: {type}\n    {role}: ['{endpoint}']\n"
    "    options:\n      {option}\n"
)


def socket_config(
    option: str = "linger: 0s",
    endpoint: str = "tcp://127.0.0.1:5555",
    role: str = "connect",
    type: str = "DEALER",
) -> str:
    return SOCKET.format(option=option, endpoint=endpoint, role=role, type=type)


REFUSED = {
    # libzmq's limits (src/options.cpp of 4.3.5) and the kernel's (TCP keepalive)
    "duration-int-max": ("reconnect_ivl: 2147483648ms", 6, "too long"),
    "duration-inf": ("linger: " + "9" * 400 + "h", 6, "too long"),
    "heartbeat-ttl": ("heartbeat_ttl: 2h", 6, "at most 6553.599s"),
    "heartbeat-ttl-edge": ("heartbeat_ttl: 6553600ms", 6, "at most 6553.599s"),
    "sndhwm": ("sndhwm: 2147483648", 6, "expected 0 to 2147483647"),
    "rcvhwm": ("rcvhwm: 99999999999999", 6, "expected 0 to 2147483647"),
    "backlog": ("backlog: 2147483648", 6, "expected 1 to 2147483647"),
    "keepalive-cnt": ("tcp_keepalive_cnt: 128", 6, "expected 1 to 127"),
    "keepalive-cnt-big": ("tcp_keepalive_cnt: 2147483648", 6, "expected 1 to 127"),
    "keepalive-idle": ("tcp_keepalive_idle: 32768s", 6, "at most 32767s"),
    "keepalive-intvl": ("tcp_keepalive_intvl: 10h", 6, "at most 32767s"),
    "routing-id-empty": ("routing_id: ''", 6, "expected 1 to 255 bytes"),
    "routing-id-long": ("routing_id: " + "é" * 128, 6, "expected 1 to 255 bytes"),
    "subscribe-surrogate": ('subscribe: ["\\ud800"]', 6, ""),
    "reconnect-max-below": (
        "{reconnect_ivl: 1s, reconnect_ivl_max: 500ms}",
        6,
        "libzmq would ignore it",
    ),
    "unicode-digit-duration": ("linger: \u0661s", 6, "invalid duration"),
    "unicode-digit-mixed": ("linger: 1\u0661s", 6, "invalid duration"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_option_limits_are_checked(tmp_path: Path, name: str) -> None:
    option, line, fragment = REFUSED[name]
    text = socket_config(option=option, type="SUB" if "subscribe" in option else "DEALER")
    path = tmp_path / "c.yml"
    path.write_text(text, encoding="utf-8")
    message = check_fails(path)
    assert message.startswith(f"zmq-exporter: {path}:{line}: "), message
    assert fragment in message, message


BAD_ENDPOINTS = {
    "arabic-port": ("connect", "tcp://127.0.0.1:\u0662\u0665\u0660\u0660\u0661", "is not 1-65535"),
    "fullwidth-port": ("connect", "tcp://127.0.0.1:\uff15\uff15\uff15\uff15", "is not 1-65535"),
    "ipv4-256": ("connect", "tcp://256.0.0.1:5555", "not an IPv4 address"),
    "ipv4-bind": ("bind", "tcp://256.0.0.1:5555", "not an IPv4 address"),
    "ipv4-three": ("connect", "tcp://1.2.3:5555", "not an IPv4 address"),
    "ipv4-leading-zero": ("bind", "tcp://01.2.3.4:5555", "not an IPv4 address"),
    "empty-label": ("connect", "tcp://a..b:5555", "empty name between dots"),
    "trailing-hyphen": ("connect", "tcp://a-.b:5555", "expected letters"),
    "ipv6-garbage": ("connect", "tcp://[zzz]:5555", "not an IPv6 address"),
    "ipv6-without-option": ("bind", "tcp://[::1]:5555", "needs `ipv6: true`"),
    "nul-ipc": ("bind", "ipc:///tmp/a\\0b", "NUL"),
    "nul-inproc": ("bind", "inproc://a\\0b", "NUL"),
    "newline-host": ("connect", "tcp://host\\n:5555", "bad host"),
}


@pytest.mark.parametrize("name", BAD_ENDPOINTS)
def test_endpoints_that_cannot_work_are_refused(tmp_path: Path, name: str) -> None:
    role, endpoint, fragment = BAD_ENDPOINTS[name]
    path = tmp_path / "c.yml"
    path.write_text(
        f'sockets:\n  - name: a\n    type: ROUTER\n    {role}: ["{endpoint}"]\n', encoding="utf-8"
    )
    message = check_fails(path)
    assert message.startswith(f"zmq-exporter: {path}:4: sockets[0].{role}"), message
    assert fragment in message, message


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('sockets:\n  - name: "a\\0b"\n    type: DEALER\n    connect: [tcp://h:1]\n', 2, "NUL"),
        ('global:\n  labels: {team: "x\\0"}\nsockets: []\n', 2, "NUL"),
        (
            'sockets:\n  - {name: a, type: DEALER, connect: [tcp://h:1], labels: {t: "\\0"}}\n',
            2,
            "NUL",
        ),
        ('global:\n  labels: {"a\\nb": x}\nsockets: []\n', 2, "invalid label name"),
        ("global:\n  bind_retry_interval: 0s\n", 2, "above zero"),
        ("global:\n  bind_retry_interval: 2s\n  bind_retry_max_interval: 1s\n", 3, "below"),
    ],
)
def test_names_and_labels(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = tmp_path / "c.yml"
    path.write_text(text)
    message = check_fails(path)
    assert message.startswith(f"zmq-exporter: {path}:{line}: "), message
    assert fragment in message, message


def test_merge_key_override_is_no_duplicate() -> None:
    text = (
        "sockets:\n"
        "  - &s {name: a, type: DEALER, connect: ['tcp://127.0.0.1:5555']}\n"
        "  - <<: *s\n"
        "    name: b\n"
    )
    settings = parse_config(text, "m.yml")
    assert [s.name for s in settings.sockets] == ["a", "b"]
    assert settings.sockets[1].connects == ("tcp://127.0.0.1:5555",)
    # A list of merges and a nested merge follow the same rules.
    text = (
        "global:\n  options: &o {linger: 1s}\n"
        "sockets:\n"
        "  - &s {name: a, type: DEALER, connect: ['tcp://127.0.0.1:5555']}\n"
        "  - &t {<<: *s, name: b, options: {<<: *o, linger: 2s}}\n"
        "  - {<<: [*t, *s], name: c}\n"
    )
    socks = parse_config(text, "m.yml").sockets
    assert [s.name for s in socks] == ["a", "b", "c"]
    assert socks[2].options.linger == pytest.approx(2)


def test_real_duplicate_keys_are_still_reported() -> None:
    text = "sockets:\n  - <<: {type: DEALER}\n    name: a\n    name: b\n    connect: [tcp://h:1]\n"
    with pytest.raises(ConfigError, match=r"^m.yml:4: sockets\[0\].name: duplicate key$"):
        parse_config(text, "m.yml")
    with pytest.raises(ConfigError, match=r"^m.yml:3: sockets.x: duplicate key$"):
        parse_config("sockets:\n  x: 1\n  x: 2\n", "m.yml")


LIMIT_VALUES = """\
sockets:
  - name: edge
    type: ROUTER
    bind: ['tcp://127.0.0.1:{port}', 'tcp://[::1]:{port6}']
    options:
      ipv6: true
      sndhwm: 2147483647
      rcvhwm: 2147483647
      backlog: 2147483647
      heartbeat_ivl: 596h31m23.647s
      heartbeat_timeout: 596h31m23.647s
      heartbeat_ttl: 6553.599s
      handshake_ivl: 2147483647ms
      reconnect_ivl: 2147483647ms
      reconnect_ivl_max: 2147483647ms
      linger: 0ms
      tcp_keepalive: true
      tcp_keepalive_cnt: 127
      tcp_keepalive_idle: 32767s
      tcp_keepalive_intvl: 32767s
      routing_id: {routing_id}
"""


def test_every_limit_value_that_passes_the_check_starts_and_accepts(tmp_path: Path) -> None:
    port, port6 = free_port(), free_port()
    text = LIMIT_VALUES.format(port=port, port6=port6, routing_id="r" * 255)
    settings = parse_config(text, "edge.yml")
    # The options as libzmq takes them, in-process...
    ctx = zmq.Context()
    try:
        managed = open_socket(ctx, settings.sockets[0])
        close_socket(managed)
    finally:
        ctx.term()
    # ...and as a daemon that a peer can connect to (keepalive options apply per connection).
    with Daemon(text) as daemon:
        peer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        try:
            peer.connect(f"tcp://127.0.0.1:{port}")
            wait_until(
                lambda: total(daemon.scrape(), "zmq_accepted_total", socket="edge") >= 1,
                timeout=10,
                what="an accepted connection",
            )
            assert total(daemon.scrape(), "zmq_accept_failed_total", socket="edge") == 0
        finally:
            peer.close()


# --- 4. secrets stay secret -----------------------------------------------------------


def test_secret_key_pasted_as_path_is_never_printed(tmp_path: Path) -> None:
    _, secret = zmq.curve_keypair()
    path = tmp_path / "c.yml"
    path.write_text(
        "sockets:\n  - name: s\n    type: ROUTER\n    bind: [tcp://127.0.0.1:1]\n"
        f"    options:\n      curve_server: true\n      curve_secretkey_file: '{secret.decode()}'\n"
    )
    proc = run_cli("--config.check", f"--config.file={path}")
    assert proc.returncode == 1
    assert secret.decode() not in proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        f"zmq-exporter: {path}:7: sockets[0].options.curve_secretkey_file: cannot read key file: "
        "No such file or directory (value not shown; it looks like a Z85 key, not a path: put "
        "the key in a file and name the file)"
    )


def test_secret_key_pasted_in_reload_never_reaches_response_or_log(tmp_path: Path) -> None:
    _, secret = zmq.curve_keypair()
    port = free_port()
    good = f"sockets:\n  - {{name: a, type: ROUTER, bind: ['tcp://127.0.0.1:{port}']}}\n"
    with Daemon(good) as daemon:
        assert daemon.config_path is not None
        daemon.config_path.write_text(
            f"sockets:\n  - name: a\n    type: ROUTER\n    bind: ['tcp://127.0.0.1:{port}']\n"
            f"    options: {{curve_server: true, curve_secretkey_file: '{secret.decode()}'}}\n"
        )
        status, body = http_post(daemon.url + "/-/reload")
        assert status >= 400 and "value not shown" in body, body
        assert secret.decode() not in body
    assert secret.decode() not in daemon.logs()


@pytest.mark.parametrize(
    "option",
    [
        "curve_secretkey_file: {secret_int}",
        "curve_secretkey_file: [{secret_int}]",
        "curve_secretkey_file: !!float {secret_int}x",
    ],
)
def test_wrong_type_of_secret_is_not_echoed(tmp_path: Path, option: str) -> None:
    secret_int = "739182736451928374655"
    path = tmp_path / "c.yml"
    path.write_text(socket_config(option=option.format(secret_int=secret_int)))
    proc = run_cli("--config.check", f"--config.file={path}")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert secret_int not in proc.stdout + proc.stderr


def test_otlp_header_value_of_the_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("sockets: []\notlp:\n  headers:\n    x-api-key: 9876543210123456789\n")
    proc = run_cli("--config.check", f"--config.file={path}")
    assert proc.returncode == 1, proc.stderr
    assert "9876543210123456789" not in proc.stdout + proc.stderr
    assert (
        f"{path}:4: otlp.headers.x-api-key: expected a string, got int (value not shown)"
        in proc.stderr
    )


def test_key_file_content_is_not_echoed(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("hunter2-this-is-my-password\n")
    path = tmp_path / "c.yml"
    path.write_text(
        socket_config(option=f"{{curve_server: true, curve_secretkey_file: '{key}'}}", role="bind")
    )
    proc = run_cli("--config.check", f"--config.file={path}")
    assert proc.returncode == 1
    assert "hunter2" not in proc.stderr and "holds no Z85 CURVE secret key" in proc.stderr
