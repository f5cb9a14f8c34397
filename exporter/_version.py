"""The package's version, alone in a module: anything may import it without importing
the package's entry points (exporter/__init__.py loads library mode on demand)."""

__version__ = "0.1.0"
