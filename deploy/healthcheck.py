"""The container image's HEALTHCHECK: GET /-/healthy on the address the daemon listens on.

A HEALTHCHECK command runs beside the daemon and does not get its arguments, so it reads
them from /proc/1/cmdline (the daemon is PID 1: exec-form ENTRYPOINT): the port follows
`--web.listen-address`, and `--web.config.file` says whether to speak TLS. Exit 0 when
healthy, 1 otherwise, one line on stdout (docker/podman keep it in the health log).

- TLS: the certificate is not verified (it names the service, not 127.0.0.1; this checks
  liveness on loopback, not identity).
- Basic auth: the check has no password, so 401 counts as healthy (the HTTP server
  answered). An engine that stopped still shows: the daemon then exits (status 70) and the
  container stops.

ZMQ_EXPORTER_HEALTHCHECK_PID names another process to read the arguments of (tests run the
daemon on the host, where PID 1 is not the daemon).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_LISTEN = ":19555"  # zmq-exporter's own default for --web.listen-address


def daemon_args() -> list[str]:
    pid = os.environ.get("ZMQ_EXPORTER_HEALTHCHECK_PID", "1")
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def flag(args: list[str], name: str) -> str | None:
    """The first value of `name` (`--name=value` or `--name value`), as argparse reads it."""
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


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


def uses_tls(web_config_file: str | None) -> bool:
    if not web_config_file:
        return False
    import yaml  # the exporter's own dependency, in the image's venv

    config = yaml.safe_load(Path(web_config_file).read_text()) or {}
    return bool(isinstance(config, dict) and config.get("tls_server_config"))


def main() -> int:
    try:
        args = daemon_args()
        target = url(
            flag(args, "--web.listen-address") or DEFAULT_LISTEN,
            uses_tls(flag(args, "--web.config.file")),
        )
    except Exception as err:  # unreadable /proc or web config: unhealthy, say why
        print(f"unhealthy: {err}")
        return 1
    context = None
    if target.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(target, timeout=4, context=context) as response:
            print(f"healthy: {target} {response.status}")
            return 0
    except urllib.error.HTTPError as err:
        if err.code == 401:
            print(f"healthy: {target} 401 (basic auth on; the server answers)")
            return 0
        print(f"unhealthy: {target} {err.code}")
        return 1
    except OSError as err:
        print(f"unhealthy: {target} {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
