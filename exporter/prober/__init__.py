"""/probe: blackbox-style probing of ZeroMQ endpoints.

One module per step, each behind the one-line `ProbeFn` type of `base`:
`dns` (tcp:// targets), `connect` (raw TCP or AF_UNIX), `greeting` (the peer's ZMTP
greeting over that raw connection), `wire` (NULL and PLAIN: the rest of the ZMTP 3.x
handshake, spoken by the prober on that same connection), `handshake` (CURVE: a real
libzmq handshake in the prober's own context); `zmtp` chains them; `render` builds the
text per request; `handler` is what the web server calls.
"""

from exporter.prober.base import REASONS, Deadline, ProbeFn, ProbeLog, ProbeResult
from exporter.prober.handler import Prober, probe_timeout

__all__ = ["REASONS", "Deadline", "ProbeFn", "ProbeLog", "ProbeResult", "Prober", "probe_timeout"]
