"""`zmq-exporter` command line, in the style of the Prometheus exporters."""

from __future__ import annotations

import argparse
import logging
import platform
import signal
import sys
import threading
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING

import zmq

from exporter._version import __version__
from exporter.config import ConfigError, load_config
from exporter.monitor.fdbudget import raise_nofile_limit, startup_fd_problem
from exporter.prober.handler import DEFAULT_MAX_CONCURRENT, DEFAULT_TIMEOUT_OFFSET
from exporter.web.app import DEFAULT_MAX_REQUESTS

if TYPE_CHECKING:
    from exporter.config import Settings
    from exporter.config.otlp import OtlpSettings
    from exporter.web.live_config import WebConfig

DEFAULT_LISTEN = ":19555"
DEFAULT_CONFIG_NAME = "default.yml"  # in exporter/config/, shipped as package data
# sysexits.h EX_SOFTWARE: the engine thread ended; distinct from 1 (bad config or flags).
EXIT_INTERNAL_FAILURE = 70
log = logging.getLogger("zmq_exporter")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zmq-exporter",
        description="Exports ZeroMQ socket-monitor events as Prometheus metrics.",
    )
    p.add_argument(
        "--config.file",
        dest="config_file",
        default=None,  # the embedded default, whatever the working directory
        metavar="PATH",
        help="YAML file listing the sockets (default: the embedded demo config, "
        "config/zmq-exporter.yml of the source: a ROUTER bound on 127.0.0.1:5555, a DEALER "
        f"connected to it and a DEALER to a port where nothing listens; at {default_config()})",
    )
    p.add_argument(
        "--config.check",
        dest="config_check",
        action="store_true",
        help="validate the config file and exit (0 valid, 1 invalid)",
    )
    p.add_argument(
        "--web.listen-address",
        dest="listen_address",
        action="append",  # repeatable, as the toolkit's: every address is served
        default=None,  # (append would add to a default list instead of replacing it)
        metavar="HOST:PORT",
        help=f"address for /metrics and the web endpoints; repeat for several "
        f"(default: {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--web.systemd-socket",
        dest="systemd_socket",
        action="store_true",
        help="serve on the sockets passed by systemd socket activation instead of "
        "--web.listen-address (Linux only)",
    )
    p.add_argument(
        "--web.max-requests",
        dest="max_requests",
        type=_non_negative_int,
        default=DEFAULT_MAX_REQUESTS,
        metavar="N",
        help="scrapes of the metrics endpoint served at once, 503 beyond; 0 for no limit "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default="",
        metavar="PATH",
        help="TLS and basic auth, in the Prometheus exporter-toolkit format (default: none)",
    )
    p.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        default="/metrics",
        metavar="PATH",
        help="path of the metrics endpoint (default: %(default)s)",
    )
    # /probe, named like blackbox_exporter's --timeout-offset.
    p.add_argument(
        "--probe.max-concurrent",
        dest="probe_max_concurrent",
        type=_positive_int,
        default=DEFAULT_MAX_CONCURRENT,
        metavar="N",
        help="probes served at once on /probe; more wait within their timeout, then get "
        "503 (default: %(default)s)",
    )
    p.add_argument(
        "--probe.timeout-offset",
        dest="probe_timeout_offset",
        type=float,
        default=DEFAULT_TIMEOUT_OFFSET,
        metavar="SECONDS",
        help="subtracted from X-Prometheus-Scrape-Timeout-Seconds for a probe's timeout "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--log.level",
        dest="log_level",
        default="info",
        # Both spellings, as Prometheus' exporters accept them; log lines say `warn`.
        choices=["debug", "info", "warn", "warning", "error"],
        help="minimum level of log lines (default: %(default)s)",
    )
    p.add_argument(
        "--log.format",
        dest="log_format",
        default="logfmt",
        choices=["logfmt", "json"],
        help="log line format (default: %(default)s)",
    )
    p.add_argument("--version", action="version", version=version_text())
    return p


def default_config() -> str:
    """The embedded default config (package data, a copy of config/zmq-exporter.yml that
    tests/deploy/test_distribution.py keeps identical): the daemon runs on it when no
    --config.file is given, from any directory, as installed from a wheel."""
    return str(resources.files("exporter.config").joinpath(DEFAULT_CONFIG_NAME))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def version_text() -> str:
    return (
        f"zmq-exporter {__version__} (pyzmq {zmq.pyzmq_version()}, libzmq "
        f"{zmq.zmq_version()}, python {platform.python_version()})"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config_file is None:
        args.config_file = default_config()
    from exporter.logs import setup_logging, start_async_logging, stop_logging

    # Synchronous until the daemon is built: a bad config's line is on stderr before exit 1.
    setup_logging(args.log_level, args.log_format)

    def fail(message: str) -> int:
        # One line on stderr, before anything starts: the plain `zmq-exporter: message`
        # with logfmt (the line the docs and scripts know), one JSON log object with json.
        stop_logging()  # lines queued before it first; then synchronous again
        if args.log_format == "json":
            log.error("cannot start", extra={"err": message})
        else:
            print(f"zmq-exporter: {message}", file=sys.stderr)
        return 1

    raise_nofile_limit()  # before the check, so that the check sees what the start will
    try:
        settings = load_config(args.config_file)
        from exporter.otlp.export import check_otlp

        # The `otlp:` section and the OTEL_* environment, resolved once; the daemon gets it.
        otlp = check_otlp(settings)
    except ConfigError as err:
        return fail(str(err))
    from exporter.daemon import fd_reserve

    reserve = fd_reserve(args.probe_max_concurrent, len(args.listen_address or [DEFAULT_LISTEN]))
    fd_problem = startup_fd_problem(settings.sockets, reserve)
    if fd_problem is not None:
        return fail(f"{settings.file}: {fd_problem}")
    web_config = None
    if args.web_config_file:
        from exporter.web.live_config import load_web_config

        try:
            web_config = load_web_config(args.web_config_file)
        except ConfigError as err:
            return fail(f"bad --web.config.file: {err}")
    if args.config_check:
        print(f"{args.config_file}: OK ({len(settings.sockets)} sockets)")
        return 0
    if not args.telemetry_path.startswith("/"):
        return fail("--web.telemetry-path must start with '/'")

    listen = args.listen_address or [DEFAULT_LISTEN]
    if args.systemd_socket:
        listen = ["the sockets systemd passed"]  # --web.listen-address is not used

    # Signals are taken synchronously by this thread (sigwait), blocked before any other
    # thread exists so that every thread inherits the mask. With a Python handler instead,
    # a signal that the kernel hands to another thread waits until the main thread wakes
    # up, which it never does while it sleeps in an untimed wait: SIGHUP reloads were lost.
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    main_thread = threading.get_ident()
    # From here on no thread waits for stderr: lines go through a bounded queue to a writer
    # thread (exporter/logs.py); an undrained stderr drops lines, counted, instead of
    # stalling the engine. Every exit below writes what is queued, within a timeout.
    start_async_logging()
    try:
        return _run(args, settings, otlp, web_config, listen, handled, main_thread, fail)
    finally:
        stop_logging()


def _run(
    args: argparse.Namespace,
    settings: Settings,
    otlp: OtlpSettings | None,
    web_config: WebConfig | None,
    listen: list[str],
    handled: set[signal.Signals],
    main_thread: int,
    fail: Callable[[str], int],
) -> int:
    from exporter.daemon import Daemon

    def engine_failed(reason: str) -> None:
        # Wakes the sigwait below; it sees the failure and exits non-zero.
        signal.pthread_kill(main_thread, signal.SIGTERM)

    try:
        daemon = Daemon(
            settings,
            listen,
            args.telemetry_path,
            web_config,
            engine_failed,
            otlp,
            probe_max_concurrent=args.probe_max_concurrent,  # /probe
            probe_timeout_offset=args.probe_timeout_offset,
            max_requests=args.max_requests,
            systemd_socket=args.systemd_socket,
        )
    except (ValueError, OSError) as err:
        return fail(f"cannot listen on {', '.join(listen)}: {err}")

    try:
        daemon.start()
    except Exception as err:  # a socket that cannot be created (EMFILE, ...): one line
        daemon.stop()
        return fail(f"cannot start: {err}")
    log.info("zmq-exporter started", extra={"version": __version__, "config": args.config_file})
    while signal.sigwait(handled) == signal.SIGHUP:
        threading.Thread(target=daemon.reload, name="zmq-exporter-reload", daemon=True).start()
    failure = daemon.engine.failure
    if failure is not None:
        # The engine logged the cause with its traceback; a supervisor restarts us.
        log.error("exiting after an internal failure", extra={"err": failure})
        daemon.stop()
        return EXIT_INTERNAL_FAILURE
    log.info("shutting down")
    daemon.stop()
    return 0
