"""A probe's metrics as Prometheus text, built per request (nothing is kept between
probes). Names and help come from the metrics table (`exporter.core.metrics`, probe section)."""

from __future__ import annotations

from exporter.core import metrics
from exporter.prober.base import ProbeResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(f: metrics.Family, samples: list[tuple[dict[str, str], float]]) -> str:
    lines = [f"# HELP {f.name} {f.help}", f"# TYPE {f.name} {f.type}"]
    for labels, value in samples:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{f.name}{{{inner}}} {value!r}" if inner else f"{f.name} {value!r}")
    return "\n".join(lines) + "\n"


def render(result: ProbeResult, duration: float) -> str:
    """The families of one probe. A step's duration is there when the step ran (until it
    failed, if it did); the info families only when there is something to say."""
    out = [
        _family(metrics.PROBE_SUCCESS, [({}, 1.0 if result.success else 0.0)]),
        _family(metrics.PROBE_DURATION, [({}, duration)]),
    ]
    steps = (
        (metrics.PROBE_DNS_LOOKUP, result.dns_seconds),
        (metrics.PROBE_CONNECT, result.connect_seconds),
        (metrics.PROBE_HANDSHAKE, result.handshake_seconds),
    )
    out += [_family(f, [({}, float(seconds))]) for f, seconds in steps if seconds is not None]
    if result.greeting is not None:
        g = result.greeting
        labels = {
            "version": g.version,
            "mechanism": g.mechanism,
            "as_server": "true" if g.as_server else "false",
        }
        out.append(_family(metrics.PROBE_ZMTP_INFO, [(labels, 1.0)]))
    if result.reason is not None:
        out.append(_family(metrics.PROBE_FAILURE_INFO, [({"reason": result.reason}, 1.0)]))
    return "".join(out)
