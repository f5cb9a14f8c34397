"""Connections as the kernel sees them: per-fd reads, the table behind /api/v1/connections and the
sampler behind the connection metrics."""
