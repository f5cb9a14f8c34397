"""zmq-exporter-instrument puts this directory first on PYTHONPATH, so Python's `site`
imports this module at the start of every process of the program (and of its children,
which inherit the environment). It instruments every pyzmq socket from its creation
(exporter/instrument/startup.py), then runs the sitecustomize this one hides, if any."""

import importlib
import os
import sys

try:
    from exporter.instrument import startup

    startup.run()
except Exception as err:  # an interpreter without zmq-exporter: the program runs as is
    print(f"zmq-exporter-instrument: not instrumenting: {err}", file=sys.stderr)

_here = os.path.dirname(os.path.abspath(__file__))
_saved = list(sys.path)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_ours = sys.modules.pop("sitecustomize", None)
try:
    importlib.import_module("sitecustomize")
except ImportError:
    pass
finally:
    sys.path[:] = _saved
    if _ours is not None:
        sys.modules["sitecustomize"] = _ours
