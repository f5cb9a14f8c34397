"""zmq-exporter: ZeroMQ socket-monitor events as exact Prometheus/OpenTelemetry metrics."""

__version__ = "0.1.0"
