"""Types of the compiled message counting (exporter/messages/_counting.c)."""

from collections.abc import Callable
from typing import Any

# The libzmq found in this process at import (its path), or None: the extension unusable.
libzmq: str | None

class Counts:
    sent: int
    received: int
    bytes_sent: int
    bytes_received: int
    would_block: int
    blocked_seconds: float

class Sender:
    __wrapped__: Callable[..., Any]
    def __init__(
        self,
        counts: Counts,
        base: Callable[..., Any],
        direct: Callable[..., Any],
        again: type[BaseException],
        waits: bool,
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

class Receiver:
    __wrapped__: Callable[..., Any]
    def __init__(self, counts: Counts, base: Callable[..., Any]) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

def socket_type(handle: int, /) -> int: ...
