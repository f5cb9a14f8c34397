"""`--web.config.file` at run time: the validated settings (`exporter.config.web`) made
into what the web server uses, the SSL context (`exporter.webtls`) and the basic-auth
checker (`exporter.webauth`). Every problem is one `file:line: key.path: message` line,
like the main config's.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from exporter.config.web import load_web_settings
from exporter.webauth import BasicAuth
from exporter.webtls import server_context


@dataclass(frozen=True)
class WebConfig:
    file: str
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict, repr=False)

    def basic_auth(self) -> BasicAuth | None:
        return BasicAuth(self.users) if self.users else None


def load_web_config(file: str) -> WebConfig:
    """Read, validate and load `file`; a `ConfigError` for anything wrong with it."""
    settings = load_web_settings(file)
    return WebConfig(file, server_context(settings), settings.users)
