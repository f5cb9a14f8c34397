"""The container image's HEALTHCHECK: GET /-/healthy on every address the daemon listens on.

A HEALTHCHECK command runs beside the daemon and does not get its arguments, so it reads
them from /proc/1/cmdline (the daemon is PID 1: exec-form ENTRYPOINT) and follows them:
- every `--web.listen-address` is checked (default `:19555`), and all must answer;
- with `--web.systemd-socket` the addresses are those of the sockets passed to the daemon
  (descriptors 3 to 3 + LISTEN_FDS - 1, from /proc/1/environ, /proc/1/fd and the daemon's
  /proc/1/net/tcp and tcp6);
- `--web.config.file` with a `tls_server_config` means https.
Options are read as argparse reads them (`--name=value`, `--name value`, a unique prefix of
an option name); OPTIONS lists the daemon's options and tests/deploy/test_deploy_docker.py keeps it
equal to the daemon's parser. Exit 0 when healthy, 1 otherwise, one line on stdout
(docker/podman keep it in the health log).

- TLS: the certificate is not verified (it names the service, not 127.0.0.1; this checks
  liveness on loopback, not identity).
- Basic auth: the check has no password, so 401 counts as healthy (the HTTP server
  answered). An engine that stopped still shows: the daemon then exits (status 70) and the
  container stops.

ZMQ_EXPORTER_HEALTHCHECK_PID names another process to read the arguments of (tests run the
daemon on the host, where PID 1 is not the daemon). Standard library only, plus PyYAML (the
daemon's own dependency) when a web config is given: it runs every 30 s, and importing the
daemon's parser would cost ~0.6 s of CPU each time.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_LISTEN = ":19555"  # zmq-exporter's own default for --web.listen-address
SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first descriptor systemd passes
TCP_LISTEN = "0A"  # the LISTEN state in /proc/net/tcp

# The daemon's long options (exporter/cli.py): True when the option takes a value.
OPTIONS = {
    "--config.file": True,
    "--config.check": False,
    "--web.listen-address": True,
    "--web.systemd-socket": False,
    "--web.max-requests": True,
    "--web.config.file": True,
    "--web.telemetry-path": True,
    "--probe.max-concurrent": True,
    "--probe.timeout-offset": True,
    "--log.level": True,
    "--log.format": True,
    "--version": False,
    "--help": False,
}


def daemon_pid() -> str:
    return os.environ.get("ZMQ_EXPORTER_HEALTHCHECK_PID", "1")


def daemon_args(pid: str) -> list[str]:
    """The daemon's arguments: its command line after the program (python and the
    script, or the script alone)."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            return args[i:]
    return []


def option_name(text: str) -> str | None:
    """The option `text` names: itself, or the one option it is a unique prefix of."""
    if text in OPTIONS:
        return text
    matches = [name for name in OPTIONS if name.startswith(text)]
    return matches[0] if len(matches) == 1 else None


def parse(args: list[str]) -> dict[str, list[str]]:
    """Option name -> the values given, in order ("" for a flag)."""
    found: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("--"):
            continue
        text, has_value, inline = arg.partition("=")
        name = option_name(text)
        if name is None:
            continue
        if not OPTIONS[name]:
            found.setdefault(name, []).append("")
        elif has_value:
            found.setdefault(name, []).append(inline)
        elif i < len(args):
            found.setdefault(name, []).append(args[i])
            i += 1
    return found


def url(listen: str, tls: bool) -> str:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):  # all interfaces: loopback is one of them
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}/-/healthy"


def _hex_address(text: str) -> str:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(text)
    swapped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(swapped))


def listening_sockets(pid: str) -> dict[str, str]:
    """inode -> `host:port` of the TCP sockets listening in the daemon's network namespace."""
    found: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] != TCP_LISTEN:
                continue
            address, _, port = fields[1].partition(":")
            host = _hex_address(address)
            shown = f"[{host}]" if ":" in host else host
            found[fields[9]] = f"{shown}:{int(port, 16)}"
    return found


def systemd_addresses(pid: str) -> list[str]:
    """The addresses of the sockets systemd (or any socket activator) passed the daemon."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    counts = [e.partition(b"=")[2] for e in environ if e.startswith(b"LISTEN_FDS=")]
    if not counts or not counts[0].isdigit():
        raise ValueError("--web.systemd-socket, but the daemon got no LISTEN_FDS")
    listening = listening_sockets(pid)
    addresses = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(counts[0])):
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
        inode = re.fullmatch(r"socket:\[(\d+)\]", link)
        if inode is None or inode.group(1) not in listening:
            raise ValueError(f"descriptor {fd} ({link}) is not a listening TCP socket")
        addresses.append(listening[inode.group(1)])
    return addresses


def uses_tls(web_config_file: str | None) -> bool:
    if not web_config_file:
        return False
    import yaml  # the exporter's own dependency, in the image's venv

    config = yaml.safe_load(Path(web_config_file).read_text()) or {}
    return bool(isinstance(config, dict) and config.get("tls_server_config"))


def targets(pid: str) -> list[str]:
    options = parse(daemon_args(pid))
    if "--web.systemd-socket" in options:
        addresses = systemd_addresses(pid)
    else:
        addresses = options.get("--web.listen-address") or [DEFAULT_LISTEN]
    web_config = options.get("--web.config.file", [""])[-1]  # argparse: the last one wins
    tls = uses_tls(web_config)
    return [url(address, tls) for address in addresses]


def check(target: str) -> tuple[bool, str]:
    """Whether `target` answers, and what to say about it."""
    context = None
    if target.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(target, timeout=4, context=context) as response:
            response.read()
            return True, f"{target} {response.status}"
    except urllib.error.HTTPError as err:
        if err.code == 401:
            return True, f"{target} 401 (basic auth on; the server answers)"
        return False, f"{target} {err.code}"
    except OSError as err:
        return False, f"{target} {err}"


def main() -> int:
    """One line: `healthy: URL STATUS; ...` or `unhealthy: ...` naming what failed."""
    try:
        urls = targets(daemon_pid())
    except Exception as err:  # unreadable /proc or web config: unhealthy, say why
        print(f"unhealthy: {err}")
        return 1
    results = [check(target) for target in urls]
    failures = [shown for ok, shown in results if not ok]
    if failures:
        print(f"unhealthy: {'; '.join(failures)}")
        return 1
    print(f"healthy: {'; '.join(shown for _ok, shown in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
