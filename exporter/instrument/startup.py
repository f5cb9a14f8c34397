"""What the launcher runs at the start of every Python process of the program (from
bootstrap/sitecustomize.py): one meta path finder, and nothing else until the program
imports zmq. Then `zmq.Socket.__init__` is wrapped so that the program's first socket (made
by `ctx.socket(type)`, `zmq.Socket(ctx, type)` or a subclass) loads
library mode and `instrument_sockets()` from the environment (env.py): a program that never
creates a socket pays for neither, and gevent's `monkey.patch_all()`, which programs run
first, has run before anything of ours starts a thread or imports prometheus_client.

Standard library only, imported before the program's own code."""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

_started = False


class _Loader:
    """zmq's own loader, then our wrapper on its Context class."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: Any) -> ModuleType | None:
        module: ModuleType | None = self._inner.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._inner
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        self._inner.exec_module(module)
        _zmq_imported(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _ZmqFinder:
    """Finds nothing itself: lets the next finders find `zmq`, and wraps its loader."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "zmq":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                with_loader = spec.loader
                if with_loader is not None and hasattr(with_loader, "exec_module"):
                    spec.loader = _Loader(with_loader)  # type: ignore[assignment]
                return spec
        return None


def _zmq_imported(zmq: ModuleType) -> None:
    with_finder = [f for f in sys.meta_path if isinstance(f, _ZmqFinder)]
    for finder in with_finder:
        sys.meta_path.remove(finder)
    socket_class = zmq.Socket
    original = socket_class.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        global _started
        if socket_class.__init__ is __init__:
            socket_class.__init__ = original  # before the hooks wrap the original
        if not _started:
            _started = True
            _start()
        socket_class.__init__(self, *args, **kwargs)

    socket_class.__init__ = __init__


def _start() -> None:
    try:
        from exporter.instrument import hooks

        hooks.start_from_environment()
    except Exception as err:  # never stop the program for its instrumentation
        print(f"zmq-exporter-instrument: not instrumenting: {err}", file=sys.stderr)


def run() -> None:
    """Install the finder (or, if zmq is imported already, the wrapper)."""
    if os.environ.get("ZMQ_EXPORTER_DISABLED", "").strip().lower() in {"1", "true", "yes", "on"}:
        return
    zmq = sys.modules.get("zmq")
    if zmq is not None and hasattr(zmq, "Context"):
        _zmq_imported(zmq)
    else:
        sys.meta_path.insert(0, _ZmqFinder())
