"""Configuration: parse and validate YAML into `Settings`, with errors naming file:line."""

from exporter.config.errors import ConfigError
from exporter.config.load import Settings, SocketSpec, load_config, parse_config

__all__ = ["ConfigError", "Settings", "SocketSpec", "load_config", "parse_config"]
