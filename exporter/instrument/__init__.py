"""Instrumentation where applications live: sockets hooked at creation (hooks.py), the
zero-code launcher `zmq-exporter-instrument` (launcher.py, bootstrap/sitecustomize.py) and
its environment variables (env.py)."""
