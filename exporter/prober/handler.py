"""GET /probe for the web server: parameters, timeout, concurrency bound, debug output.

`Prober.handle_probe(query, headers) -> (status, headers, body)` is all the web side
calls; it never raises for a bad request or a failing target.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Mapping
from email.message import Message

from exporter.config.modules import DEFAULT_MODULE, ProbeModule
from exporter.core.endpoints import shown
from exporter.prober.base import Deadline, ProbeLog
from exporter.prober.render import CONTENT_TYPE, render
from exporter.prober.target import parse_target
from exporter.prober.zmtp import PROBERS

log = logging.getLogger("zmq_exporter")

DEFAULT_MAX_CONCURRENT = 100
DEFAULT_TIMEOUT_OFFSET = 0.5  # seconds, as blackbox_exporter's --timeout-offset
# Without X-Prometheus-Scrape-Timeout-Seconds (a curl by hand): Prometheus' default
# scrape_timeout, so that a hand-run probe behaves as a scraped one.
NO_HEADER_SCRAPE_TIMEOUT = 10.0
TIMEOUT_HEADER = "x-prometheus-scrape-timeout-seconds"
TEXT = "text/plain; charset=utf-8"

Response = tuple[int, dict[str, str], bytes]


def _error(status: int, message: str) -> Response:
    return status, {"Content-Type": TEXT}, (message + "\n").encode()


Headers = Mapping[str, str] | Message  # a dict, or the web server's http.client.HTTPMessage


def probe_timeout(headers: Headers, module: ProbeModule, offset: float) -> float:
    """The probe's time budget: the scrape's timeout minus `offset`, capped by the module's
    timeout (blackbox_exporter's getTimeout). ValueError for a header that is no number."""
    header = str(next((v for k, v in headers.items() if k.lower() == TIMEOUT_HEADER), ""))
    scrape = float(header) if header.strip() else 0.0
    if not scrape > 0 or scrape != scrape or scrape == float("inf"):
        if header.strip():
            raise ValueError(f"expected a positive number of seconds, got {shown(header)}")
        scrape = NO_HEADER_SCRAPE_TIMEOUT
    budget = scrape - offset
    if module.timeout is not None and (module.timeout < budget or budget <= 0):
        budget = module.timeout
    return budget if budget > 0 else scrape / 2  # an offset above the scrape's timeout


class Prober:
    def __init__(
        self,
        modules: Callable[[], Mapping[str, ProbeModule]],
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        timeout_offset: float = DEFAULT_TIMEOUT_OFFSET,
    ) -> None:
        self._modules = modules  # the running config's, read per request (reload)
        self.max_concurrent = max_concurrent
        self.timeout_offset = timeout_offset
        self._slots = threading.BoundedSemaphore(max_concurrent)

    def handle_probe(self, query: Mapping[str, list[str]], headers: Headers) -> Response:
        def param(name: str) -> str:
            values = query.get(name) or [""]
            return values[-1]

        target = param("target")
        if not target:
            return _error(400, "Target parameter is missing")
        name = param("module") or DEFAULT_MODULE
        module = self._modules().get(name)
        if module is None:
            return _error(400, f"Unknown module {shown(name)}")
        try:
            parse_target(target)
        except ValueError as err:
            return _error(400, f"Bad target: {err}")
        if not module.allows(target):
            return _error(403, f"Target {shown(target)} is not allowed by module {shown(name)}")
        try:
            seconds = probe_timeout(headers, module, self.timeout_offset)
        except ValueError as err:
            return _error(400, f"Failed to parse timeout from Prometheus header: {err}")
        started = time.monotonic()
        deadline = Deadline(seconds)
        # Waiting for a slot spends the probe's own time: a probe that cannot start before
        # its deadline is refused, never queued past the scrape.
        if not self._slots.acquire(timeout=seconds):
            return _error(
                503, f"Too many concurrent probes (--probe.max-concurrent={self.max_concurrent})"
            )
        plog = ProbeLog(name, target)
        try:
            plog.debug("Beginning probe", probe="zmtp", timeout_seconds=f"{seconds:g}")
            try:
                result = PROBERS["zmtp"](target, module, deadline, plog)
            except Exception as err:
                if getattr(err, "errno", None) in (errno.EMFILE, errno.ENFILE):
                    # Out of file descriptors (OSError) or libzmq sockets (ZMQError): a
                    # load condition, not a bug, and not the target's fault.
                    return _error(503, f"Cannot probe now: {err}")
                log.exception("probe failed internally", extra={"target": target})
                return _error(500, "The probe failed internally; see the exporter's log")
        finally:
            self._slots.release()
        duration = time.monotonic() - started
        body = render(result, duration)
        if result.success:
            plog.debug("Probe succeeded", duration_seconds=f"{duration:.6f}")
        else:
            plog.error("Probe failed", duration_seconds=f"{duration:.6f}")
        if param("debug") == "true":
            text = (
                "Logs for the probe:\n"
                + plog.text()
                + "\n\n\nMetrics that would have been returned:\n"
                + body
                + "\n\n\nModule configuration:\n"
                + module.describe()
            )
            return 200, {"Content-Type": TEXT}, text.encode()
        return 200, {"Content-Type": CONTENT_TYPE}, body.encode()
