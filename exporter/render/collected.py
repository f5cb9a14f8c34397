"""`Collected`: families built already, as the `Collector` prometheus_client's encoders
(`generate_latest`) take."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class Collected(Collector):
    """Families collected already, handed to an encoder."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families
