"""Wires config -> engine -> renderers -> web, and owns reload and shutdown."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from exporter.config import ConfigError, Settings, load_config
from exporter.config.model import ConnectionsConfig
from exporter.config.otlp import OtlpSettings
from exporter.config.relay import relay_series_budget
from exporter.connections.sampler import ConnectionSample, ConnectionSampler, reads_gone_family
from exporter.connections.table import ConnectionTable
from exporter.core import metrics
from exporter.core.state import EngineSnapshot
from exporter.logs import dropped_log_lines
from exporter.monitor.engine import ApplyError, Engine, EngineStopped
from exporter.monitor.fdbudget import MISC_RESERVE
from exporter.monitor.sockets import build_labels
from exporter.otlp.export import OtlpOutput
from exporter.prober import Prober
from exporter.prober.handler import DEFAULT_MAX_CONCURRENT, DEFAULT_TIMEOUT_OFFSET
from exporter.prober.handshake import close_context as close_prober_context
from exporter.relay.server import RelayServer
from exporter.relay.wire import RelayLimits
from exporter.render.prometheus import StateCollector, one_sample
from exporter.web.app import DEFAULT_MAX_REQUESTS, MAX_CONNECTIONS, WebApp, WebServer
from exporter.web.live_config import WebConfig
from exporter.web.status import render_status

log = logging.getLogger("zmq_exporter")

APPLY_TIMEOUT = 30.0
# Descriptors one probe holds at most: its raw connection for the greeting, the libzmq
# socket's mailbox and connection, the monitor PAIR's mailbox, the probe context's share.
FDS_PER_PROBE = 5


def fd_reserve(probe_max_concurrent: int = DEFAULT_MAX_CONCURRENT, listeners: int = 1) -> int:
    """Descriptors kept free of sockets (fdbudget.py): the web server's connections and
    listeners, every concurrent probe's, and a margin."""
    return MAX_CONNECTIONS + listeners + FDS_PER_PROBE * probe_max_concurrent + MISC_RESERVE


FD_RESERVE = fd_reserve()


class Daemon:
    def __init__(
        self,
        settings: Settings,
        listen_address: str | Sequence[str],  # --web.listen-address, one or more
        telemetry_path: str,
        web_config: WebConfig | None = None,
        on_failure: Callable[[str], None] | None = None,
        otlp: OtlpSettings | None = None,
        probe_max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        probe_timeout_offset: float = DEFAULT_TIMEOUT_OFFSET,
        max_requests: int = DEFAULT_MAX_REQUESTS,  # --web.max-requests
        systemd_socket: bool = False,  # --web.systemd-socket: systemd's sockets instead
    ) -> None:
        self.config_file = settings.file
        # /probe: the running config's modules, replaced by a successful reload.
        self.modules = settings.modules
        self.prober = Prober(lambda: self.modules, probe_max_concurrent, probe_timeout_offset)
        # The web server's connections and a margin stay free of sockets (fdbudget.py).
        listeners = 1 if isinstance(listen_address, str) else max(1, len(listen_address))
        self.engine = Engine(
            on_failure=on_failure, fd_reserve=fd_reserve(probe_max_concurrent, listeners)
        )
        self._reload_lock = threading.Lock()
        self.last_reload_successful = True
        self.last_reload_success_time = time.time()
        # relay: relayed sockets join the engine's in every output. Its
        # listener is set at start; a reload does not change it (restart to change it).
        self.relay: RelayServer | None = None
        if settings.relay is not None:
            r = settings.relay
            self.relay = RelayServer(
                r.listen,
                expire=r.expire,
                limits=RelayLimits(
                    r.max_processes,
                    r.max_sockets_per_process,
                    r.max_message_bytes,
                    max_series=relay_series_budget(
                        settings.limits.max_series, settings.sockets, settings.connections
                    ),
                    max_series_per_process=r.max_series_per_process,
                ),
                ipc_mode=r.ipc_mode,
                curve_secret_key=r.curve_secretkey,
                curve_allowed_clients=r.curve_allowed_clients,
            )
        # Who is connected: the engine's own live fds only (relayed sockets' fds
        # belong to other processes), read from the kernel at request time for the API and
        # the status page, and by the sampler thread (`connections.metrics`) for /metrics.
        self.connections = ConnectionTable(self.engine.snapshot)
        self.sampler: ConnectionSampler | None = None  # started by start() / reload()
        # /metrics: the state (socket families pre-rendered, then the latest connection
        # sample's families) first, then this registry.
        self.state = StateCollector(self.snapshot, build_labels(), self.connection_sample)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ReloadCollector(self))
        self.registry.register(_SamplerCollector(self))
        self.registry.register(_LogCollector())
        self.registry.register(PROCESS_COLLECTOR)
        self.registry.register(PLATFORM_COLLECTOR)
        # Pushed over OTLP besides the snapshot's sockets and engine: the reload state, the
        # latest connection sample, and the relayed sockets' message counts (the relay's
        # self-metrics, like the web server's, stay on /metrics).
        pushed_extra: list[Collector] = [_ReloadCollector(self), _ConnectionFamilies(self)]
        if self.relay is not None:
            relayed_messages = self.relay.message_collector()
            self.registry.register(self.relay.collector())
            self.registry.register(relayed_messages)
            pushed_extra.append(relayed_messages)
        # OTLP push, when configured (`otlp`: resolved once, by exporter.otlp.export.check_otlp):
        # the same snapshots and rows as /metrics, on a thread of its own.
        self.otlp = (
            OtlpOutput(
                otlp,
                self.snapshot,
                build_labels(),
                extra=pushed_extra,
            )
            if otlp is not None
            else None
        )
        if self.otlp is not None:
            self.registry.register(self.otlp.collector())
        app = WebApp(
            registry=self.registry,
            telemetry_path=telemetry_path,
            is_ready=lambda: self.engine.snapshot().ready,
            # False once the engine thread ended: the process is about to exit non-zero.
            is_healthy=lambda: self.engine.failure is None,
            landing_page=lambda: render_status(
                self.snapshot(), telemetry_path, self.connections.all_rows()
            ),
            reload=self.reload,
            state=self.state,
            probe=self.prober.handle_probe,
            connections=self.connections.handle,
            max_concurrent_probes=probe_max_concurrent,
            max_concurrent_scrapes=max_requests,
        )
        self._initial = settings
        self.web = WebServer(app, listen_address, web_config, systemd_socket=systemd_socket)

    def snapshot(self) -> EngineSnapshot:
        """The engine's snapshot, with the relayed sockets after its own."""
        snap = self.engine.snapshot()
        if self.relay is None:
            return snap
        relayed = self.relay.snapshot_sockets()
        if not relayed:
            return snap
        return EngineSnapshot(snap.sockets + relayed, snap.stats, snap.ready, snap.failure)

    def connection_sample(self) -> ConnectionSample | None:
        """The latest connection sample, None while `connections.metrics` is off."""
        sampler = self.sampler
        return sampler.latest if sampler is not None else None

    def _apply_connections(self, settings: ConnectionsConfig) -> None:
        """Start, reconfigure or stop the connection sampler for a `connections:` section."""
        sampler = self.sampler
        if settings.metrics and sampler is None:
            sampler = ConnectionSampler(self.connections, self.engine.snapshot, settings)
            sampler.start()
            self.sampler = sampler
        elif settings.metrics and sampler is not None:
            sampler.configure(settings)
            sampler.refresh()  # the applied sockets, before the reload answers
        elif sampler is not None:
            self.sampler = None  # /metrics stops serving its families at once
            sampler.stop()

    def start(self) -> None:
        self.engine.start()
        if self.relay is not None:
            self.relay.start()
            log.info("relay listening", extra={"endpoints": self.relay.bound})
        # Web first: /-/healthy answers at once, /-/ready only once every socket exists.
        self.web.start()
        result = self.engine.apply(self._initial).result(APPLY_TIMEOUT)
        log.info("sockets started", extra={"sockets": len(result.added)})
        self._apply_connections(self._initial.connections)
        if self.otlp is not None:
            self.otlp.start()
        # One line per listener, as bound (`:0` resolved; `[::]` is every interface).
        for address in self.web.addresses:
            port = address.rpartition(":")[2]
            extra = {"address": address, "port": int(port) if port.isdigit() else None}
            log.info("listening", extra={**extra, "tls": self.web.tls})

    def reload(self) -> tuple[bool, str]:
        """Load the config file again and apply the difference; on any error keep the
        running config. Returns (ok, message): never raises, whatever the file holds."""
        with self._reload_lock:
            try:
                settings = load_config(self.config_file)
            except ConfigError as err:
                return self._reload_failed("reload failed; keeping the running config", str(err))
            except Exception as err:  # a loader bug must not kill the SIGHUP thread
                log.exception("unexpected error loading the config")
                return self._reload_failed(
                    "reload failed; keeping the running config",
                    f"{self.config_file}: cannot load: {type(err).__name__}: {err}",
                )
            try:
                result = self.engine.apply(settings).result(APPLY_TIMEOUT)
            except (ApplyError, EngineStopped) as err:
                return self._reload_failed(
                    "reload failed while applying; the running config is unchanged",
                    f"{self.config_file}: cannot apply: {err}",
                )
            except Exception as err:
                log.exception("unexpected error applying the config")
                return self._reload_failed(
                    "reload failed while applying",
                    f"{self.config_file}: cannot apply: {type(err).__name__}: {err}",
                )
            self.last_reload_successful = True
            self.last_reload_success_time = time.time()
            self.modules = settings.modules  # /probe
            self._apply_connections(settings.connections)
            if self.relay is not None and settings.relay is not None:
                self.relay.set_allowed_clients(settings.relay.curve_allowed_clients)
            if self.relay is not None:
                self.relay.set_max_series(
                    relay_series_budget(
                        settings.limits.max_series, settings.sockets, settings.connections
                    )
                )
            if settings.relay != self._initial.relay:
                # The relay's listener is bound once; changing it would drop every sender.
                log.warning("relay: section changed in the file; restart to apply it")
            message = (
                f"reloaded {self.config_file}: added {result.added}, removed {result.removed}, "
                f"recreated {result.recreated}, unchanged {len(result.unchanged)}"
            )
            log.info(
                "config reloaded",
                extra={
                    "added": result.added,
                    "removed": result.removed,
                    "recreated": result.recreated,
                },
            )
            return True, message

    def _reload_failed(self, what: str, message: str) -> tuple[bool, str]:
        self.last_reload_successful = False
        log.error(what, extra={"err": message})
        return False, message

    def stop(self) -> None:
        self.web.stop()
        if self.sampler is not None:
            self.sampler.stop()
        if self.otlp is not None:
            # The final export: bounded by otlp.shutdown_timeout (a dead collector delays
            # exit by at most that), retried while the receiver asks within it.
            self.otlp.stop()
        self.engine.stop()
        if self.relay is not None:
            self.relay.stop()
        close_prober_context()  # /probe's own sockets are closed by each probe


class _ReloadCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        daemon = self._daemon
        yield one_sample(metrics.RELOAD_SUCCESSFUL, 1 if daemon.last_reload_successful else 0)
        yield one_sample(metrics.RELOAD_SUCCESS_TIME, daemon.last_reload_success_time)


class _LogCollector(Collector):
    """Log lines dropped because stderr did not take them (exporter/logs.py)."""

    def collect(self) -> Iterator[Metric]:
        yield one_sample(metrics.LOG_MESSAGES_DROPPED, dropped_log_lines())


class _SamplerCollector(Collector):
    """The connection sampler's self-metrics (while it runs) and the connection table's
    refused reads (always: the API and the status page read too)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        sampler = self._daemon.sampler
        if sampler is not None:
            yield from sampler.self_metrics()
        yield reads_gone_family(self._daemon.connections)


class _ConnectionFamilies(Collector):
    """The latest connection sample's families, for the OTLP push (the same objects
    /metrics renders)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        sample = self._daemon.connection_sample()
        if sample is not None:
            yield from sample.families
